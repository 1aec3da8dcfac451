"""Argument checks shared across the package: a clear ``TypeError`` / ``ValueError`` naming the argument and
what was expected, before any work is done."""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch


def check_number(name: str, value, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False) -> None:
    """``value`` is a finite real number (a bool, a string or NaN/inf is refused) within the bounds;
    ``TypeError``/``ValueError`` naming ``name`` otherwise."""
    is_scalar_tensor = isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype.is_complex
    if isinstance(value, bool) or not (isinstance(value, numbers.Real) or is_scalar_tensor):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__} {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name}: expected a finite number, got {number}")
    too_low = low is not None and (number <= low if low_open else number < low)
    too_high = high is not None and (number >= high if high_open else number > high)
    if too_low or too_high:
        left = "(" if low_open else "["
        right = ")" if high_open or high is None else "]"
        span = f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"
        raise ValueError(f"{name}: expected a number in {span}, got {number}")


def check_count(name: str, value, minimum: int = 1, maximum: int | None = None) -> None:
    """``value`` is an int (not a bool or a float; NumPy integers too) in ``[minimum, maximum]``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name}: expected an int <= {maximum}, got {value}")


def check_flag(name: str, value) -> bool:
    """``value`` as a bool: a Python or NumPy bool; ``TypeError`` naming ``name`` otherwise (a string such as
    ``"no"``, or a number, would pass an ``if`` as true or false without saying)."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{name}: expected a bool (True or False), got {type(value).__name__} {value!r:.40}")


def check_generator(name: str, generator: object) -> None:
    """``TypeError`` naming ``name`` unless ``generator`` is a ``torch.Generator`` or None."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{name} must be a torch.Generator or None (torch.Generator().manual_seed(seed)), got "
                        f"{type(generator).__name__}")
