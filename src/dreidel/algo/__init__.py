"""Algorithms: the Walsh-Hadamard transform (and, later, LSH tables and sparse active-set products)."""

from dreidel.algo._fwht import (
    fwht,
    fwht_into,
    fwht_reference,
    in_functorch_transform,
    pad_to_hadamard,
    runs_native_eager,
)
from dreidel.algo._hadamard import (
    HADAMARD_FACTORS,
    hadamard_factor,
    hadamard_matrix,
    is_hadamard_length,
    nearest_hadamard_lengths,
)

__all__ = [
    "HADAMARD_FACTORS",
    "fwht",
    "fwht_into",
    "fwht_reference",
    "hadamard_factor",
    "hadamard_matrix",
    "in_functorch_transform",
    "is_hadamard_length",
    "nearest_hadamard_lengths",
    "pad_to_hadamard",
    "runs_native_eager",
]
