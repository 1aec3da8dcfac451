"""dreidel.layers: spectral (Walsh-Hadamard) layers and the registry of linear-layer kinds."""

from dreidel.layers._activation import ACTIVATIONS, resolve_activation
from dreidel.layers._attention import KVCache, MultiHeadAttentionSpectral
from dreidel.layers._conv import Conv2dSpectral, Conv3dSpectral
from dreidel.layers._curvature import PerSampleGradients
from dreidel.layers._registry import build_linear, linear_kinds, register_linear
from dreidel.layers._spectral import (
    SPECTRAL_INITS,
    DeepSpectralLinear,
    LinearWHT,
    transform_length,
)
from dreidel.layers._summary import num_parameters, to_dense

__all__ = [
    "ACTIVATIONS",
    "SPECTRAL_INITS",
    "Conv2dSpectral",
    "Conv3dSpectral",
    "DeepSpectralLinear",
    "KVCache",
    "LinearWHT",
    "MultiHeadAttentionSpectral",
    "PerSampleGradients",
    "build_linear",
    "linear_kinds",
    "num_parameters",
    "register_linear",
    "resolve_activation",
    "to_dense",
    "transform_length",
]
