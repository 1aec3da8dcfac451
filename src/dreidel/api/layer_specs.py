"""Layer specs: a layer as plain JSON data, ``{"type": "LinearWHT", "args": {...}}``, and back.

A checkpoint's ``config.json`` lists one spec per layer. Rebuilding looks the ``type`` up in an explicit
registry of classes (never imports or evaluates anything named in the file) and calls the class with
``args``; the weights then come from ``model.safetensors``.
"""

from __future__ import annotations

import inspect
import types
import typing
from typing import Any, Callable

import torch
from torch import nn
from torch.nn.utils import parametrize

from dreidel.layers import Conv2dSpectral, Conv3dSpectral, DeepSpectralLinear, LinearWHT, MultiHeadAttentionSpectral
from dreidel.layers._registry import INIT_ONLY_ARGS

__all__ = ["CONSTRUCTOR_REFUSALS", "LAYER_TYPES", "REFUSED_ARGS", "build_layer", "check_layer_spec", "construct_layer",
           "holds_lazy_tensors", "layer_spec", "register_layer_type"]

ArgsOf = Callable[[nn.Module], dict[str, Any]]


def _no_args(module: nn.Module) -> dict[str, Any]:
    return {}


def _linear_args(module: nn.Linear) -> dict[str, Any]:
    return {"in_features": module.in_features, "out_features": module.out_features, "bias": module.bias is not None}


def _config_args(module: nn.Module) -> dict[str, Any]:
    """dreidel's own layers describe themselves: ``module.config()``."""
    return module.config()


def _layer_norm_args(module: nn.LayerNorm) -> dict[str, Any]:
    return {"normalized_shape": list(module.normalized_shape), "eps": module.eps,
            "elementwise_affine": module.elementwise_affine, "bias": module.bias is not None}


def _batch_norm_args(module: nn.BatchNorm1d) -> dict[str, Any]:
    args = {"num_features": module.num_features, "eps": module.eps, "momentum": module.momentum,
            "affine": module.affine, "track_running_stats": module.track_running_stats}
    if module.affine and module.bias is None:  # bias=False (torch >= 2.13); left out otherwise, so that a
        args["bias"] = False                   # default layer still loads with a torch that lacks the keyword
    return args


def _embedding_args(module: nn.Embedding) -> dict[str, Any]:
    return {"num_embeddings": module.num_embeddings, "embedding_dim": module.embedding_dim,
            "padding_idx": module.padding_idx, "max_norm": module.max_norm, "norm_type": module.norm_type,
            "scale_grad_by_freq": module.scale_grad_by_freq, "sparse": module.sparse}


# type name -> (class, function giving the constructor arguments of an instance as JSON data)
LAYER_TYPES: dict[str, tuple[type[nn.Module], ArgsOf]] = {
    "Linear": (nn.Linear, _linear_args),
    "LinearWHT": (LinearWHT, _config_args),
    "DeepSpectralLinear": (DeepSpectralLinear, _config_args),
    "Conv2dSpectral": (Conv2dSpectral, _config_args),
    "Conv3dSpectral": (Conv3dSpectral, _config_args),
    "MultiHeadAttentionSpectral": (MultiHeadAttentionSpectral, _config_args),
    "ReLU": (nn.ReLU, _no_args),
    "GELU": (nn.GELU, lambda m: {"approximate": m.approximate}),
    "SiLU": (nn.SiLU, _no_args),
    "Tanh": (nn.Tanh, _no_args),
    "Sigmoid": (nn.Sigmoid, _no_args),
    "Identity": (nn.Identity, _no_args),
    "Dropout": (nn.Dropout, lambda m: {"p": m.p}),
    "Flatten": (nn.Flatten, lambda m: {"start_dim": m.start_dim, "end_dim": m.end_dim}),
    "Softmax": (nn.Softmax, lambda m: {"dim": m.dim}),
    "LogSoftmax": (nn.LogSoftmax, lambda m: {"dim": m.dim}),
    "LayerNorm": (nn.LayerNorm, _layer_norm_args),
    "BatchNorm1d": (nn.BatchNorm1d, _batch_norm_args),
    "Embedding": (nn.Embedding, _embedding_args),
}


def register_layer_type(cls: type[nn.Module], args_of: ArgsOf, name: str | None = None) -> None:
    """Make instances of ``cls`` savable: ``args_of(module)`` must return JSON data with ``cls(**args)`` rebuilding it."""
    name = cls.__name__ if name is None else name
    if name in LAYER_TYPES and LAYER_TYPES[name][0] is not cls:
        raise ValueError(f"layer type name {name!r} is already registered for {LAYER_TYPES[name][0].__name__}")
    LAYER_TYPES[name] = (cls, args_of)


def layer_spec(module: nn.Module) -> dict[str, Any]:
    """``{"type": name, "args": {...}}`` for a registered layer (exact class match, so subclasses must register)."""
    for name, (cls, args_of) in LAYER_TYPES.items():
        if type(module) is cls:
            return {"type": name, "args": args_of(module)}
    if parametrize.is_parametrized(module):
        raise ValueError(f"cannot save a layer of type {type(module).__name__}: a parametrized layer (weight_norm, "
                         "orthogonal, ...); make it plain first with torch.nn.utils.parametrize."
                         "remove_parametrizations(layer, 'weight')")
    raise ValueError(
        f"cannot save a layer of type {type(module).__name__}: register it with "
        f"dreidel.api.register_layer_type (registered: {sorted(LAYER_TYPES)})"
    )


# A checkpoint may not set them: a model loads on the CPU with the dtypes its tensors were saved in, and its
# values come from the tensor file.
REFUSED_ARGS = INIT_ONLY_ARGS
SPEC_KEYS = ("name", "type", "args")


def check_layer_spec(spec: Any, where: str = "layer spec") -> tuple[type[nn.Module], dict[str, Any]]:
    """Check a spec before anything is built: its keys, a registered ``type``, and ``args`` against the constructor.

    Every argument must be a public parameter of the constructor (not ``device`` / ``dtype`` / ``generator``, nor
    one named with a leading underscore, such as Embedding's ``_weight``), and its value must fit the
    constructor's annotation (``int | None``, ``tuple[int, int]`` as a JSON list of two ints, ...); where there is
    none, the default's type decides (a bool, an int or list of ints, a float or a string, or null). An argument
    named ``*_kwargs`` (``linear_kwargs``) must be a JSON object or null without ``device`` / ``dtype`` /
    ``generator`` keys. The constructor itself (run on the meta device by ``dreidel.load``) judges the rest.

    Returns:
        ``(cls, args)``.

    Raises:
        ValueError: naming ``where`` and the offending key.
    """
    if not isinstance(spec, dict):
        raise ValueError(f"{where} must be a JSON object with 'type' and 'args', got {type(spec).__name__}")
    for key in ("type", "args"):
        if key not in spec:
            raise ValueError(f"{where} is missing the key {key!r}")
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown:
        raise ValueError(f"{where} has unknown key {unknown[0]!r} (a layer spec holds {list(SPEC_KEYS)})")
    type_name, args = spec["type"], spec["args"]
    if not isinstance(type_name, str) or type_name not in LAYER_TYPES:
        raise ValueError(f"{where} has unknown layer type {type_name!r}; known types: {sorted(LAYER_TYPES)}")
    if not isinstance(args, dict):
        raise ValueError(f"{where} 'args' must be a JSON object, got {type(args).__name__}")
    cls = LAYER_TYPES[type_name][0]
    parameters = {name: parameter for name, parameter in _signature(cls).parameters.items()
                  if parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)}
    allowed = sorted(set(parameters) - set(REFUSED_ARGS))
    for key, value in args.items():
        if key in REFUSED_ARGS:
            raise ValueError(f"{where}: {type_name} argument {key!r} is not allowed in a checkpoint (models load on "
                             "the CPU with the dtypes their tensors were saved in; move them with .to() afterwards)")
        if key not in parameters or key.startswith("_"):  # private ones (Embedding's _weight, _freeze) too
            raise ValueError(f"{where}: cannot build {type_name}: unknown argument {key!r:.80} (allowed: "
                             f"{[name for name in allowed if not name.startswith('_')]})")
        if key.endswith("_kwargs"):
            _check_nested_kwargs(value, f"{where}: {type_name} argument {key!r}")
            continue
        annotation = parameters[key].annotation
        accepted = _annotation_accepts(value, annotation)
        if accepted is False:
            raise ValueError(f"{where}: {type_name} argument {key!r} must be {_describe(annotation)}, "
                             f"got {value!r:.80}")
        if accepted is None:  # no usable annotation: judged by the default's type
            expected = _expected_json_type(parameters[key].default)
            if value is not None and expected is not None and not _is_json_type(value, expected):
                allowed_types = "int or a list of ints" if expected is int else expected.__name__
                raise ValueError(f"{where}: {type_name} argument {key!r} must be {allowed_types} (or null), "
                                 f"got {value!r:.80}")
    return cls, args


def _signature(cls: type[nn.Module]) -> inspect.Signature:
    """The constructor's signature, its annotations evaluated where they can be (else left as strings, which
    ``_annotation_accepts`` does not judge)."""
    try:
        return inspect.signature(cls, eval_str=True)
    except (NameError, TypeError, SyntaxError, AttributeError):
        return inspect.signature(cls)


def _union_members(annotation: Any) -> tuple:
    """The members of ``X | Y`` / ``Union[X, Y]``; ``()`` for any other annotation."""
    return typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else ()


def _annotation_accepts(value: Any, annotation: Any) -> bool | None:
    """Whether the JSON ``value`` fits the constructor's ``annotation`` (``int | None``, ``tuple[int, int]``,
    ``list[int]``, ``torch.Size``, ...): True, False, or None where the annotation says nothing usable."""
    if annotation is inspect.Parameter.empty or annotation is Any:
        return None
    members = _union_members(annotation)
    if members:
        verdicts = [_annotation_accepts(value, member) for member in members]
        return True if True in verdicts else None if None in verdicts else False
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation in (int, float):
        return (isinstance(value, int) or (annotation is float and isinstance(value, float))) and \
            not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if annotation is torch.Size:
        return isinstance(value, list) and all(_annotation_accepts(v, int) for v in value)
    origin, items = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (list, tuple):  # JSON has lists only
        if not isinstance(value, list):
            return False
        if origin is tuple and items and items[-1] is not Ellipsis and len(items) != len(value):
            return False
        item = items[0] if items else Any
        return all(_annotation_accepts(v, item) is not False for v in value)
    if origin is dict or annotation is dict:
        return isinstance(value, dict)
    if isinstance(annotation, type):  # a tensor, a generator, a device: nothing JSON holds
        return False
    return None


def _describe(annotation: Any) -> str:
    """``int | None`` as "int or null", ``tuple[int, int]`` as "a list of 2 int", for messages."""
    members = _union_members(annotation)
    if members:
        return " or ".join(_describe(member) for member in members)
    if annotation is type(None):
        return "null"
    if annotation is torch.Size:
        return "a list of int"
    origin, items = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (list, tuple):
        fixed = origin is tuple and items and items[-1] is not Ellipsis
        count = f"{len(items)} " if fixed else ""
        return f"a list of {count}{_describe(items[0]) if items else 'values'}"
    return getattr(annotation, "__name__", str(annotation))


def _check_nested_kwargs(value: Any, where: str) -> None:
    """Arguments passed on to an inner constructor (``linear_kwargs``): a JSON object or null, whose keys may not
    be ``REFUSED_ARGS`` either (a nested ``device`` would build the inner layer for real even on meta)."""
    if value is None:
        return
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be a JSON object (or null), got {type(value).__name__}")
    for key in value:
        if key in REFUSED_ARGS:
            raise ValueError(f"{where}: {key!r} is not allowed in a checkpoint (models load on the CPU with the "
                             "dtypes their tensors were saved in; move them with .to() afterwards)")


def _expected_json_type(default: Any) -> type | None:
    """The JSON type an argument must have, judged from the constructor's default; None when it says nothing."""
    for kind in (bool, int, float, str):  # bool before int: True is an int
        if isinstance(default, kind):
            return kind
    return None


def _is_json_type(value: Any, expected: type) -> bool:
    if expected is int and isinstance(value, list):  # int-or-tuple arguments (kernel_size) come back as lists
        return all(_is_json_type(v, int) for v in value)
    if expected is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    return isinstance(value, (int, float)) if expected is float else isinstance(value, expected)


def build_layer(spec: Any, where: str = "layer spec") -> nn.Module:
    """Rebuild a layer from ``{"type": ..., "args": {...}}``; ``where`` names the spec in error messages."""
    cls, args = check_layer_spec(spec, where)
    return construct_layer(cls, args, where)


# What a constructor raises for arguments it refuses: torch asserts some (Embedding's padding_idx in range), and
# a value of an unexpected type fails as the constructor first uses it. (A RuntimeError may be a missing meta
# kernel instead: the meta builds of load and save tell the two apart.)
CONSTRUCTOR_REFUSALS = (TypeError, ValueError, IndexError, KeyError, AttributeError, AssertionError)


def holds_lazy_tensors(module: nn.Module) -> bool:
    """Whether a parameter or buffer of ``module`` still waits for its first input to learn its size."""
    return any(nn.parameter.is_lazy(t) for t in (*module.parameters(), *module.buffers()))


def construct_layer(cls: type[nn.Module], args: dict[str, Any], where: str) -> nn.Module:
    """``cls(**args)`` with the constructor's own complaints (bad values) raised as a ValueError naming ``where``."""
    try:
        return cls(**args)
    except NotImplementedError:  # an operator missing on this device (e.g. meta), not a bad argument
        raise
    except (*CONSTRUCTOR_REFUSALS, RuntimeError) as error:
        raise ValueError(f"{where}: cannot build {cls.__name__} from args {args}: {error}") from error
