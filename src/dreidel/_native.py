"""Loads the compiled core (``dreidel._C``) and reports what it dispatched to."""

from __future__ import annotations

try:
    from dreidel import _C
except ImportError as exc:  # pragma: no cover - only on a broken install
    raise ImportError(
        f"dreidel's native core (dreidel._C) does not load ({exc}). Reinstall dreidel, which compiles it: "
        "`pip install --force-reinstall dreidel` from a wheel or sdist, or in a source checkout "
        "`pip install -e .` (`make test` does it)."
    ) from exc

__all__ = ["native", "best_isa", "available_isas"]

native = _C


def best_isa() -> str:
    """The instruction set the kernels dispatch to on this CPU: ``"avx512"``, ``"avx2"`` or ``"portable"``."""
    return _C.best_isa()


def available_isas() -> list[str]:
    """Every instruction set compiled in that this CPU can run (tests compare them against each other)."""
    return list(_C.available_isas())
