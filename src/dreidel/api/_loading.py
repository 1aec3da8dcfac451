"""Checks behind ``dreidel.load``: a checkpoint's config is trusted only after it has been checked.

The order matters: ``config.json`` is validated first (keys, layer types, constructor arguments); then every
layer is built on the meta device (no memory, no random draws) so that its declared parameter shapes can be
compared with the safetensors header, and the declared ``input_shape`` is run through the meta layers. Only
then are the tensors read and the layers built for real, so a small tensor file whose config declares a huge
layer fails before anything is allocated. Every error names the file and the layer.
"""

from __future__ import annotations

import math

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves
from torch.utils._python_dispatch import TorchDispatchMode

from dreidel.api.layer_specs import CONSTRUCTOR_REFUSALS, check_layer_spec, construct_layer, holds_lazy_tensors
from dreidel.io.checkpoint import TensorHeader, require_config_keys

__all__ = ["BuildBudget", "LayerPlan", "build_within_tensor_file", "check_config", "check_dry_run_size",
           "check_input_shape", "check_tensor_header", "meta_layers"]

CONFIG_KEYS = ("format", "format_version", "input_shape", "layers")
OPTIONAL_CONFIG_KEYS = ("input_dtype", "frozen")  # absent: floating inputs; every parameter trainable
MAX_INPUT_DIMS = 32  # dimensions of one sample in a config's input_shape (a hand-made file could list 200,000)
# Layers a config may list: a model of more is not a Sequential anyone saves, and each spec is built on the meta
# device to check it (about 1 ms a layer: 200,000 would take minutes before any error).
MAX_LAYERS = 10_000
# Integer inputs a model can be built for (token or class indices, e.g. an nn.Embedding first).
INPUT_DTYPES = {"int64": torch.int64, "int32": torch.int32, "int16": torch.int16, "int8": torch.int8,
                "uint8": torch.uint8}


@dataclass(frozen=True)
class LayerPlan:
    """One checked layer spec: its child name, class and constructor arguments, and how errors name it."""

    name: str
    cls: type[nn.Module]
    args: dict[str, Any]
    where: str


def check_config(config: dict[str, Any], where: str, format_name: str, version: int
                 ) -> tuple[list[LayerPlan], tuple[int, ...] | None, torch.dtype | None]:
    """Validate a Sequential ``config.json`` (``where`` names the file); returns the layer plans, the input shape
    and the input dtype (None: floating)."""
    require_config_keys(config, CONFIG_KEYS, where)
    unknown = sorted(set(config) - set(CONFIG_KEYS) - set(OPTIONAL_CONFIG_KEYS))
    if unknown:
        raise ValueError(f"{where} has unknown key {unknown[0]!r} (expected keys: "
                         f"{list(CONFIG_KEYS + OPTIONAL_CONFIG_KEYS)})")
    input_dtype = config.get("input_dtype")
    if input_dtype is not None and input_dtype not in INPUT_DTYPES:
        raise ValueError(f"{where}: 'input_dtype' must be null or one of {list(INPUT_DTYPES)}, got {input_dtype!r:.40}")
    if config["format"] != format_name:
        raise ValueError(f"{where}: 'format' is {config['format']!r}, expected {format_name!r}")
    if type(config["format_version"]) is not int or config["format_version"] != version:  # not true, not 1.0
        raise ValueError(f"{where}: 'format_version' {config['format_version']!r} is not supported "
                         f"(this dreidel reads version {version})")
    specs = config["layers"]
    if not isinstance(specs, list) or not specs:
        raise ValueError(f"{where}: 'layers' must be a non-empty list of layer specs")
    if len(specs) > MAX_LAYERS:
        raise ValueError(f"{where}: 'layers' holds {len(specs)} specs; at most {MAX_LAYERS} are read")
    input_shape = config["input_shape"]
    if input_shape is not None and (
            not isinstance(input_shape, list)
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in input_shape)):
        raise ValueError(f"{where}: 'input_shape' must be null or a list of positive ints, got {input_shape!r:.80}")
    if input_shape is not None and len(input_shape) > MAX_INPUT_DIMS:
        raise ValueError(f"{where}: 'input_shape' has {len(input_shape)} dimensions; at most {MAX_INPUT_DIMS} are "
                         "supported")
    plans = []
    for index, (name, spec) in enumerate(zip(_layer_names(specs, where), specs)):
        layer_where = f"{where} layers[{index}] named {name!r}"
        cls, args = check_layer_spec(spec, layer_where)
        plans.append(LayerPlan(name, cls, args, f"{layer_where} ({spec['type']})"))
    frozen = config.get("frozen", [])
    if not isinstance(frozen, list) or not all(isinstance(n, str) for n in frozen) or len(set(frozen)) != len(frozen):
        raise ValueError(f"{where}: 'frozen' must be a list of distinct parameter names, got {frozen!r:.80}")
    return plans, None if input_shape is None else tuple(input_shape), INPUT_DTYPES.get(input_dtype)


def _layer_names(specs: list, where: str) -> list[str]:
    """The child names of the saved layers (``"0"``, ``"1"``, ... for specs without a ``name``, as in old files)."""
    names: dict[str, None] = {}  # ordered, and looked up in constant time (a list made 80k names take a minute)
    for index, spec in enumerate(specs):
        if not isinstance(spec, dict):
            raise ValueError(f"{where} layers[{index}] must be a JSON object (a layer spec), got "
                             f"{type(spec).__name__}")
        name = spec.get("name", str(index))
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"{where} layers[{index}] has an invalid 'name' {name!r}: expected a non-empty string "
                             "without '.'")
        if name in names:
            raise ValueError(f"{where} layers[{index}] repeats the name {name!r} of an earlier layer")
        names[name] = None
    return list(names)


def meta_layers(plans: list[LayerPlan]) -> list[nn.Module | None]:
    """Each layer built on the meta device (None for a layer whose constructor needs real tensors: such a layer
    is built for real and checked by ``load_state_strict`` instead, like every layer's tensor values).

    Raises:
        ValueError: bad constructor arguments, or a layer that would learn a size from data (lazy).
    """
    layers = []
    for plan in plans:
        try:
            with torch.device("meta"):
                layer = plan.cls(**plan.args)
        except CONSTRUCTOR_REFUSALS as error:
            raise ValueError(f"{plan.where}: cannot build {plan.cls.__name__} from args {plan.args}: {error}") from error
        except RuntimeError:  # e.g. .item() or an operator without a meta kernel: built for real within the
            layers.append(None)  # tensor file's size (build_within_tensor_file) and checked after that
            continue
        if holds_lazy_tensors(layer):
            raise ValueError(f"{plan.where}: args {plan.args} leave a size to be learnt from data (a lazy layer); "
                             "a checkpoint must declare every size (e.g. in_features)")
        layers.append(layer)
    return layers


def check_tensor_header(plans: list[LayerPlan], layers: list[nn.Module | None], header: dict[str, TensorHeader],
                        tensors_file: str) -> None:
    """Compare the declared layers' tensors (names, shapes, float or not) with the tensor file's header."""
    declared: set[str] = set()
    unchecked = {plan.name for plan, layer in zip(plans, layers) if layer is None}
    for plan, layer in zip(plans, layers):
        if layer is None:
            continue
        floating: dict[str, str] = {}  # a layer's floating tensors share one dtype, as a built layer's do
        for key, tensor in layer.state_dict().items():
            full_key = f"{plan.name}.{key}"
            declared.add(full_key)
            if full_key not in header:
                raise ValueError(f"{tensors_file} lacks tensor {full_key!r} that {plan.where} declares")
            found = header[full_key]
            if found.shape != tuple(tensor.shape):
                raise ValueError(f"{tensors_file} tensor {full_key!r} has shape {found.shape}, but {plan.where} "
                                 f"declares {tuple(tensor.shape)}")
            if found.is_floating_point != tensor.is_floating_point():
                raise ValueError(f"{tensors_file} tensor {full_key!r} has dtype {found.dtype}, but {plan.where} "
                                 f"expects a {'floating-point' if tensor.is_floating_point() else 'integer'} tensor")
            if found.is_floating_point:
                floating[full_key] = found.dtype
        if len(set(floating.values())) > 1:
            raise ValueError(f"{tensors_file}: the floating-point tensors of {plan.where} must share one dtype, got "
                             + ", ".join(f"{key} {dtype}" for key, dtype in floating.items()))
    unexpected = sorted(key for key in header if key not in declared and key.split(".", 1)[0] not in unchecked)
    if unexpected:
        raise ValueError(f"{tensors_file} has tensor {unexpected[0]!r} that no layer of the config declares "
                         f"(unexpected: {unexpected})")


def check_input_shape(plans: list[LayerPlan], layers: list[nn.Module], input_shape: tuple[int, ...],
                      where: str, input_dtype: torch.dtype | None = None) -> None:
    """Run a meta batch ``(2, *input_shape)`` (of ``input_dtype``, else floating) through the meta ``layers``; a
    failure names the file."""
    model = nn.Sequential(OrderedDict((plan.name, layer) for plan, layer in zip(plans, layers))).eval()
    hooks = [module.register_forward_pre_hook(_check_softmax_dim) for module in model.modules()
             if isinstance(module, (nn.Softmax, nn.Softmin))]
    try:
        with torch.no_grad():
            model(torch.zeros((2, *input_shape), dtype=input_dtype, device="meta"))
    except NotImplementedError:
        return  # a layer without meta kernels: the shapes were checked against the tensor file already
    except (RuntimeError, ValueError, TypeError, IndexError) as error:  # IndexError: a dim argument out of range
        raise ValueError(f"{where}: the layers do not run on 'input_shape' {list(input_shape)}: {error}") from error
    finally:
        for hook in hooks:
            hook.remove()


def _check_softmax_dim(module: nn.Softmax | nn.Softmin, args: tuple) -> None:
    """The range check of ``dim`` that softmax and softmin make on real tensors and skip on meta ones (torch 2.13;
    log_softmax's meta kernel makes it)."""
    if module.dim is None or not args or not isinstance(args[0], torch.Tensor):
        return
    rank = max(args[0].dim(), 1)
    if not -rank <= module.dim < rank:
        raise IndexError(f"{type(module).__name__}: dim {module.dim} is out of range for an input of "
                         f"{args[0].dim()} dimensions (expected in [{-rank}, {rank - 1}])")


# What the layers built for real may create, all together, beyond twice the bytes the tensor file holds for each:
# temporaries, and state rebuilt rather than saved (a non-persistent buffer drawn from a seed argument).
BUILD_ALLOWANCE_BYTES = 1 << 30


class BuildBudget:
    """The part of ``BUILD_ALLOWANCE_BYTES`` one load has not spent yet: shared by its layers built for real (it
    was 1 GiB per layer, so a config of k such layers could take k GiB) and its real dry run."""

    def __init__(self) -> None:
        self.spare = BUILD_ALLOWANCE_BYTES


def build_within_tensor_file(plan: LayerPlan, header: dict[str, TensorHeader], budget: BuildBudget) -> nn.Module:
    """Build a layer that could not be built on meta for real, within a bound on what it creates.

    The bound is twice the bytes the tensor file holds for the layer plus what is left of the load's ``budget``
    (1 GiB for all its layers), counted over the tensors the constructor makes from nothing (``empty``,
    ``zeros``, ``randn``, ...: operators without tensor inputs), each sized on the meta device before it runs: a
    config that declares a huge layer beside a small tensor file fails before that memory is taken (it used to
    be allocated in full). Tensors derived from others (``repeat``, ``new_zeros``, ``clone``) are not counted;
    the comparison with the file's shapes after the build refuses what they make.

    Raises:
        ValueError: naming ``plan.where`` (the constructor's own refusals too, as ``construct_layer``).
    """
    prefix = f"{plan.name}."
    held = sum(found.nbytes for key, found in header.items() if key.startswith(prefix))
    limit = 2 * held + budget.spare
    guard = _CreationLimit(limit, f"{plan.where}: {plan.cls.__name__} cannot be built on the meta device, and "
                                  f"building it for real would create at least {{created}} bytes of tensors, more "
                                  f"than the {limit} allowed beside the {held} bytes the tensor file holds for it "
                                  "(twice those, plus what is left of 1 GiB for all such layers): the config declares "
                                  "a larger layer than the file holds")
    try:
        with guard:
            layer = construct_layer(plan.cls, plan.args, plan.where)
    except ValueError as error:
        if isinstance(error.__cause__, _OverLimit):  # construct_layer wrapped the guard's own error
            raise error.__cause__ from None
        raise
    budget.spare -= max(0, guard.created - 2 * held)
    return layer


def check_dry_run_size(input_shape: tuple[int, ...], dtype: torch.dtype, budget: BuildBudget, where: str) -> None:
    """A dry run on real memory (a model with layers that have no meta kernels) starts from a batch of two
    samples: refused, naming ``where``, if that batch alone passes what is left of the load's ``budget``."""
    nbytes = 2 * math.prod(input_shape) * dtype.itemsize
    if nbytes > budget.spare:
        raise ValueError(f"{where}: 'input_shape' {list(input_shape)} makes a dry-run batch of {nbytes} bytes, more "
                         f"than the {budget.spare} left of the 1 GiB a load may create beside the tensor file")


class _OverLimit(ValueError):
    """A layer's build went past ``_CreationLimit``."""


class _CreationLimit(TorchDispatchMode):
    """Counts the bytes of tensors made from nothing (``empty``, ``zeros``, ``randn``, ... : the operators without
    tensor inputs) and raises ``_OverLimit`` (``message``, its ``{created}`` filled in), before running the
    operator, at the one that passes ``limit``. Its size comes from running it on the meta device first."""

    def __init__(self, limit: int, message: str) -> None:
        super().__init__()
        self.limit, self.message, self.created = limit, message, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not any(isinstance(leaf, torch.Tensor) for leaf in tree_leaves((args, kwargs))):
            try:
                planned = func(*args, **{**kwargs, "device": torch.device("meta")})
            except (RuntimeError, TypeError):  # an operator without a meta kernel or a device argument
                planned = None
            self.created += sum(t.nbytes for t in tree_leaves(planned) if isinstance(t, torch.Tensor))
            if self.created > self.limit:
                raise _OverLimit(self.message.format(created=self.created))
        return func(*args, **kwargs)
