"""The registry of linear-layer kinds: models take ``linear="wht"`` instead of importing layer classes.

Every kind is a factory ``(in_features, out_features, bias, **kwargs) -> nn.Module`` whose module maps
``(*, in_features)`` to ``(*, out_features)`` like ``nn.Linear``; ``in_features=None`` asks for a lazy layer
(input width inferred on the first forward pass). Every built-in kind accepts ``generator=`` for
reproducible initialisation, so composite layers can pass one without knowing the kind.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Callable, Protocol

import torch
from torch import nn

from dreidel.algo._fwht import _refuse_flags
from dreidel.layers._spectral import DeepSpectralLinear, LinearWHT, _as_width

__all__ = ["INIT_ONLY_ARGS", "LinearFactory", "build_linear", "config_kwargs", "linear_kinds", "register_linear"]

# Constructor arguments that say how or where to initialise a layer, never what it is: configs leave them out
# (the saved tensors carry the values and dtypes) and checkpoints may not set them.
INIT_ONLY_ARGS = ("device", "dtype", "generator")


def config_kwargs(linear_kwargs: Mapping[str, object] | None) -> dict[str, object]:
    """``linear_kwargs`` as a layer's ``config()`` keeps them: without the ``INIT_ONLY_ARGS``.

    Raises:
        TypeError: ``linear_kwargs`` is not a dict of keyword arguments (or None).
    """
    if linear_kwargs is not None and (not isinstance(linear_kwargs, Mapping)
                                      or not all(isinstance(key, str) for key in linear_kwargs)):
        raise TypeError(f"linear_kwargs must be a dict of keyword arguments or None, got {linear_kwargs!r}")
    return {k: v for k, v in (linear_kwargs or {}).items() if k not in INIT_ONLY_ARGS}


class LinearFactory(Protocol):
    def __call__(self, in_features: int | None, out_features: int, bias: bool = True, **kwargs: object) -> nn.Module:
        ...


_LINEAR_KINDS: dict[str, LinearFactory] = {}


def register_linear(name: str) -> Callable[[LinearFactory], LinearFactory]:
    """Decorator: register ``factory`` as the linear kind ``name`` (a new name; re-registering is an error)."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty string, got {name!r}")

    def decorator(factory: LinearFactory) -> LinearFactory:
        if name in _LINEAR_KINDS:
            raise ValueError(f"linear kind {name!r} is already registered")
        _LINEAR_KINDS[name] = factory
        return factory

    return decorator


def linear_kinds() -> tuple[str, ...]:
    """The registered kind names, sorted."""
    return tuple(sorted(_LINEAR_KINDS))


def build_linear(kind: str, in_features: int | None, out_features: int, bias: bool = True,
                 **kwargs: object) -> nn.Module:
    """Build a linear layer of the registered ``kind`` mapping ``(*, in_features)`` → ``(*, out_features)``.

    ``kwargs`` go to the kind's constructor (e.g. ``depth=`` for "deep_wht", ``generator=``, ``dtype=``).

    Raises:
        ValueError: unknown ``kind`` (the message lists the known kinds), or a width that is not a positive int.
        TypeError: ``bias`` is not a bool (a truthy ``"no"`` would add one; a saved config could not be loaded).
    """
    if type(bias) is not bool:
        _refuse_flags(bias=bias)
    if not isinstance(kind, str) or kind not in _LINEAR_KINDS:
        raise ValueError(f"unknown linear kind {kind!r}; known kinds: {', '.join(linear_kinds())}")
    in_features = _as_width("in_features", in_features, allow_none=True)  # every kind, before torch's own errors
    out_features = _as_width("out_features", out_features, allow_none=False)
    return _LINEAR_KINDS[kind](in_features, out_features, bias, **kwargs)


@register_linear("dense")
def _dense(in_features: int | None, out_features: int, bias: bool = True,
           generator: torch.Generator | None = None, **kwargs: object) -> nn.Module:
    """``nn.Linear`` (``nn.LazyLinear`` when ``in_features`` is None); ``generator`` redraws its default init."""
    if in_features is None:
        if generator is not None:
            raise ValueError("generator= is not supported for a lazy dense layer (in_features=None)")
        return nn.LazyLinear(out_features, bias=bias, **kwargs)
    if generator is None:
        return nn.Linear(in_features, out_features, bias=bias, **kwargs)
    # Built on the meta device, so that nn.Linear's own initialisation does not draw from the global RNG; then
    # the same distributions as nn.Linear.reset_parameters, from the given generator.
    device = kwargs.pop("device", None) or torch.get_default_device()
    layer = nn.Linear(in_features, out_features, bias=bias, device="meta", **kwargs).to_empty(device=device)
    bound = 1.0 / math.sqrt(in_features)
    with torch.no_grad():
        nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
        if layer.bias is not None:
            nn.init.uniform_(layer.bias, -bound, bound, generator=generator)
    return layer


@register_linear("wht")
def _wht(in_features: int | None, out_features: int, bias: bool = True, **kwargs: object) -> nn.Module:
    return LinearWHT(in_features, out_features, bias=bias, **kwargs)


@register_linear("deep_wht")
def _deep_wht(in_features: int | None, out_features: int, bias: bool = True, **kwargs: object) -> nn.Module:
    kwargs.setdefault("depth", 2)
    return DeepSpectralLinear(in_features, out_features, bias=bias, **kwargs)
