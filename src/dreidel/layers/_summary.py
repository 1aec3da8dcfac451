"""Small helpers over layers: explicit dense matrices and parameter counts."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.parameter import UninitializedParameter

from dreidel._checks import check_flag
from dreidel.layers._spectral import _SpectralLinearBase

__all__ = ["num_parameters", "to_dense"]


def to_dense(layer: nn.Module) -> torch.Tensor:
    """The ``(out_features, in_features)`` float64 matrix ``W`` of a linear layer (``y = W x + b`` before any activation).

    Works for ``nn.Linear`` and the spectral layers (``LinearWHT``, ``DeepSpectralLinear``).
    """
    if isinstance(layer, _SpectralLinearBase):
        return layer.dense_matrix()
    if isinstance(layer, nn.Linear) and not isinstance(layer.weight, UninitializedParameter):
        return layer.weight.detach().to(torch.float64).clone()
    raise TypeError(f"to_dense supports nn.Linear, LinearWHT and DeepSpectralLinear (materialised), got {type(layer).__name__}")


def num_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable, when ``trainable_only``) parameter entries; lazy, unmaterialised parameters count 0."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module: expected a torch.nn.Module, got {type(module).__name__}")
    trainable_only = check_flag("trainable_only", trainable_only)
    return sum(
        p.numel()
        for p in module.parameters()
        if not isinstance(p, UninitializedParameter) and (p.requires_grad or not trainable_only)
    )
