"""Loads the compiled core (``dreidel._C``) and reports what it dispatched to."""

from __future__ import annotations

try:
    from dreidel import _C
except ImportError as exc:  # pragma: no cover - only on a broken install
    raise ImportError(
        "dreidel's native core (dreidel._C) is not built. Install the package with "
        "`pip install -e .` (or run `make test`), which compiles it."
    ) from exc

__all__ = ["native", "best_isa", "available_isas"]

native = _C


def best_isa() -> str:
    """The instruction set the kernels dispatch to on this CPU: ``"avx512"``, ``"avx2"`` or ``"portable"``."""
    return _C.best_isa()


def available_isas() -> list[str]:
    """Every instruction set compiled in that this CPU can run (tests compare them against each other)."""
    return list(_C.available_isas())
