"""Activation functions chosen by name, so that layer configs stay plain data (JSON-serialisable)."""

from __future__ import annotations

from typing import Callable

import torch
from torch.nn import functional as F

__all__ = ["ACTIVATIONS", "resolve_activation"]

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "tanh": torch.tanh,
    "silu": F.silu,
    "sigmoid": torch.sigmoid,
}


def resolve_activation(name: str | None) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The elementwise function for ``name`` (one of ``ACTIVATIONS``), or ``None`` for the identity.

    Raises:
        TypeError: ``name`` is not a string or None.
        ValueError: an unknown name; the message lists the known ones.
    """
    if name is None:
        return None
    if not isinstance(name, str):
        raise TypeError(f"activation must be a string or None, got {type(name).__name__}")
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)} or None")
    return ACTIVATIONS[name]
