"""Layer specs: a layer as plain JSON data, ``{"type": "LinearWHT", "args": {...}}``, and back.

A checkpoint's ``config.json`` lists one spec per layer. Rebuilding looks the ``type`` up in an explicit
registry of classes (never imports or evaluates anything named in the file) and calls the class with
``args``; the weights then come from ``model.safetensors``.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from dreidel.layers import Conv2dSpectral, Conv3dSpectral, DeepSpectralLinear, LinearWHT, MultiHeadAttentionSpectral

__all__ = ["LAYER_TYPES", "build_layer", "layer_spec", "register_layer_type"]

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
    return {"num_features": module.num_features, "eps": module.eps, "momentum": module.momentum,
            "affine": module.affine, "track_running_stats": module.track_running_stats}


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
    raise ValueError(
        f"cannot save a layer of type {type(module).__name__}: register it with "
        f"dreidel.api.register_layer_type (registered: {sorted(LAYER_TYPES)})"
    )


def build_layer(spec: Any, where: str = "layer spec") -> nn.Module:
    """Rebuild a layer from ``{"type": ..., "args": {...}}``; ``where`` names the spec in error messages."""
    if not isinstance(spec, dict):
        raise ValueError(f"{where} must be a JSON object with 'type' and 'args', got {type(spec).__name__}")
    for key in ("type", "args"):
        if key not in spec:
            raise ValueError(f"{where} is missing the key {key!r}")
    type_name, args = spec["type"], spec["args"]
    if type_name not in LAYER_TYPES:
        raise ValueError(f"{where} has unknown layer type {type_name!r}; known types: {sorted(LAYER_TYPES)}")
    if not isinstance(args, dict):
        raise ValueError(f"{where} 'args' must be a JSON object, got {type(args).__name__}")
    cls = LAYER_TYPES[type_name][0]
    try:
        return cls(**args)
    except TypeError as error:
        raise ValueError(f"{where}: cannot build {type_name} from args {args}: {error}") from error
