"""dreidel: fast deep learning on CPUs through structured (Walsh-Hadamard) and hashed layers."""

from dreidel._native import available_isas, best_isa
from dreidel.algo import (
    fwht,
    fwht_reference,
    hadamard_matrix,
    is_hadamard_length,
    pad_to_hadamard,
)

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "available_isas",
    "best_isa",
    "fwht",
    "fwht_reference",
    "hadamard_matrix",
    "is_hadamard_length",
    "pad_to_hadamard",
]
