"""Hadamard matrices and the transform lengths dreidel supports.

A supported length is ``n = m * 2^k`` with ``m`` in ``{1, 12, 20, 28}`` and ``2^k <= 2^30``. The matrix of
that length is ``H_m ⊗ H_{2^k}``, where ``H_{2^k}`` is Sylvester's matrix in natural order
(``H_{2n} = [[H_n, H_n], [H_n, -H_n]]``, the order of ``scipy.linalg.hadamard``) and ``H_m`` is a Paley
matrix (Paley 1933, "On orthogonal matrices"):

Paley's construction II over GF(5), GF(9) and GF(13) for orders 12, 20 and 28. All factors are symmetric,
so ``H = Hᵀ``, the backward pass of the transform is the transform itself, and the normalized transform
is its own inverse.

Widths such as 384 = 12 * 32 (Whisper tiny, MiniLM) and 1536 = 12 * 128 then need no padding.
"""

from __future__ import annotations

import functools
import math
import operator

import torch
from torch.utils._python_dispatch import _disable_current_modes

__all__ = [
    "HADAMARD_FACTORS",
    "MAX_POW2_LOG2",
    "hadamard_factor",
    "is_hadamard_length",
    "nearest_hadamard_lengths",
    "hadamard_matrix",
    "small_hadamard",
    "small_hadamard_array",
]

HADAMARD_FACTORS = (1, 12, 20, 28)
MAX_POW2_LOG2 = 30


def _integer(n: object) -> int | None:
    """``n`` as an int when it is an integer of any type (NumPy's, a 0-d integer tensor), not a bool; else None."""
    if isinstance(n, bool) or (isinstance(n, torch.Tensor) and n.dtype == torch.bool):
        return None
    try:
        return operator.index(n)
    except TypeError:
        return None


def hadamard_factor(n: int) -> tuple[int, int] | None:
    """Return ``(m, 2^k)`` with ``n = m * 2^k`` for a supported length, else ``None``."""
    n = _integer(n)
    if n is None or n < 1:
        return None
    for m in HADAMARD_FACTORS:
        if n % m == 0:
            chunk = n // m
            if chunk & (chunk - 1) == 0 and chunk <= 1 << MAX_POW2_LOG2:
                return m, chunk
    return None


def is_hadamard_length(n: int) -> bool:
    """True when ``fwht`` can transform a dimension of length ``n`` without padding."""
    return hadamard_factor(n) is not None


def nearest_hadamard_lengths(n: int) -> tuple[int | None, int | None]:
    """The largest supported length ``<= n`` and the smallest ``>= n`` (``None`` where there is none); ``TypeError``
    where ``n`` is not an integer."""
    value = _integer(n)
    if value is None:
        raise TypeError(f"n must be an int, got {type(n).__name__} {n!r}")
    n = value
    # Plain loops over ints (no max(default=)): torch.compile traces them without a graph break, so a bad
    # length reaches the user as fwht's ValueError (under fullgraph=True, Dynamo reports that ValueError,
    # message and all, as an "Observed exception").
    below = above = None
    for m in HADAMARD_FACTORS:
        for k in range(MAX_POW2_LOG2 + 1):
            length = m << k
            if length <= n and (below is None or length > below):
                below = length
            if length >= n and (above is None or length < above):
                above = length
    return below, above


def _field_elements(q: int) -> list[tuple[int, int]]:
    """GF(q) for q = p (pairs (a, 0)) or q = 9 (pairs (a, b) meaning a + b·i with i² = -1 over GF(3))."""
    if q == 9:
        return [(a, b) for a in range(3) for b in range(3)]
    return [(a, 0) for a in range(q)]


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[x][y] = chi(y - x), chi the quadratic character of GF(q)."""
    p = 3 if q == 9 else q
    elements = _field_elements(q)

    def mul(u, v):  # (a + b i)(c + d i) with i² = -1; for a prime field b = d = 0
        return ((u[0] * v[0] - u[1] * v[1]) % p, (u[0] * v[1] + u[1] * v[0]) % p)

    squares = {mul(e, e) for e in elements if e != (0, 0)}

    def chi(e):
        return 0 if e == (0, 0) else (1 if e in squares else -1)

    return torch.tensor(
        [[chi(((y[0] - x[0]) % p, (y[1] - x[1]) % p)) for y in elements] for x in elements],
        dtype=torch.float64,
    )


def _paley_two(q: int) -> torch.Tensor:
    """Order 2(q + 1) for a prime power q ≡ 1 (mod 4): H = C ⊗ [[1, -1], [-1, -1]] + I ⊗ [[1, 1], [1, -1]].

    C = [[0, 1ᵀ], [1, Q]] is a symmetric conference matrix, so H is symmetric: H = Hᵀ and H² = 2(q + 1) I.
    """
    c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = _jacobsthal(q)
    off_diagonal = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    diagonal = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, off_diagonal) + torch.kron(torch.eye(q + 1, dtype=torch.float64), diagonal)


def _build_small_hadamard_f64(m: int) -> torch.Tensor:
    if m == 1:
        h = torch.ones(1, 1, dtype=torch.float64)
    elif m in (12, 20, 28):
        h = _paley_two(m // 2 - 1)
    else:
        raise ValueError(f"m must be one of {HADAMARD_FACTORS}, got {m}")
    if not (torch.equal(h, h.T) and torch.equal(h @ h, m * torch.eye(m, dtype=torch.float64))):
        raise AssertionError(f"the order-{m} construction is not a symmetric Hadamard matrix")
    return h


def _build_factors() -> dict[tuple[int, torch.dtype], torch.Tensor]:
    # Constants, built once at import as real CPU tensors of no inference mode: built on first use instead, they
    # took the state of the first caller (a TorchDispatchMode would trace them, or refuse their data-dependent
    # check; a default device would put them on the meta device; inference mode would make them inference
    # tensors, which no later autograd graph may save), and torch.compile would trace into that guarded build.
    with _disable_current_modes(), torch.device("cpu"), torch.inference_mode(False):
        factors = {}
        for m in HADAMARD_FACTORS:
            h = _build_small_hadamard_f64(m)
            for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
                factors[m, dtype] = h.to(dtype).contiguous()
        return factors


_FACTORS = _build_factors()


def small_hadamard(m: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The symmetric ``m x m`` factor ``H_m`` (entries ±1, ``H_m² = m I``) as a contiguous CPU tensor of a
    floating ``dtype``: a shared constant, not to be written to."""
    if m not in HADAMARD_FACTORS:
        raise ValueError(f"m must be one of {HADAMARD_FACTORS}, got {m}")
    if (m, dtype) not in _FACTORS:
        raise ValueError(f"dtype must be float64, float32, float16 or bfloat16, got {dtype}")
    return _FACTORS[m, dtype]


@functools.lru_cache(maxsize=None)
def small_hadamard_array(m: int, dtype: torch.dtype):
    """``small_hadamard(m, dtype)`` as a read-only NumPy array, the form the native kernels take it in (cached)."""
    array = small_hadamard(m, dtype).numpy().copy()
    array.setflags(write=False)
    return array


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The dense ``n x n`` matrix that ``fwht(x, normalized=False)`` applies along a dimension of length n.

    Entries are ±1, ``H`` is symmetric and ``H² = n I``. Meant for tests and small layers: it costs ``n²`` memory.
    On torch's default device, as ``torch.eye`` is.
    """
    if _integer(n) is None:
        raise TypeError(f"n must be an int, got {type(n).__name__} {n!r:.40}")
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype (e.g. torch.float32), got {type(dtype).__name__} {dtype!r:.40}")
    if dtype == torch.bool or (not dtype.is_floating_point and not dtype.is_complex and torch.iinfo(dtype).min == 0):
        raise TypeError(f"dtype must hold -1 (a floating, complex or signed integer dtype), got {dtype}")
    factor = hadamard_factor(n)
    if factor is None:
        raise ValueError(f"n={n} is not a supported Hadamard length (m * 2^k, m in {HADAMARD_FACTORS})")
    m, chunk = factor
    device = torch.get_default_device()
    with torch.device("cpu"):
        h = torch.ones(1, 1, dtype=torch.float64)
        sylvester = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        for _ in range(int(math.log2(chunk))):
            h = torch.kron(sylvester, h)
        return torch.kron(small_hadamard(m), h).to(device=device, dtype=dtype)
