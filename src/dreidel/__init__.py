"""dreidel: fast deep learning on CPUs through structured (Walsh-Hadamard) layers and structure-aware optimizers."""

from dreidel import algo, api, data, io, layers, models, optim
from dreidel._native import available_isas, best_isa
from dreidel.algo import (
    fwht,
    fwht_reference,
    hadamard_matrix,
    is_hadamard_length,
    pad_to_hadamard,
)
from dreidel.api import Sequential, load

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "Sequential",
    "algo",
    "api",
    "data",
    "io",
    "layers",
    "load",
    "models",
    "optim",
    "available_isas",
    "best_isa",
    "fwht",
    "fwht_reference",
    "hadamard_matrix",
    "is_hadamard_length",
    "pad_to_hadamard",
]
