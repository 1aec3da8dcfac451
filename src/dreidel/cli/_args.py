"""Argument checks: a bad value becomes argparse's one-line usage error naming the option (exit 2)."""

from __future__ import annotations

import argparse
from pathlib import Path

from dreidel.models.whisper.decoding import MAX_BEAM_SIZE

MAX_BEAM = MAX_BEAM_SIZE  # the decoder's own cap: larger beams only exhaust memory for its key/value cache
MAX_THREADS = 256  # torch.set_num_threads(100000) segfaults while creating the OpenMP pool


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int, got {text!r}") from None


def int_in_range(low: int, high: int | None = None):
    """A ``type=`` for ints in ``[low, high]`` (no upper bound when ``high`` is None)."""
    def parse(text: str) -> int:
        value = _int(text)
        if value < low or (high is not None and value > high):
            expected = f"an int >= {low}" if high is None else f"an int in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
        return value

    parse.__name__ = "int"  # argparse names the type in its fallback message
    return parse


seed = int_in_range(0, 2**63 - 1)


def probability_or_none(text: str) -> float | None:
    """A ``type=`` for a probability strictly between 0 and 1 (NaN is not one), or ``none`` (any case): no value."""
    if text.strip().lower() == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a probability in (0, 1) or 'none', got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a probability in (0, 1) or 'none', got {text}")
    return value


def file_problem(text: str) -> str | None:
    """Why ``text`` is not a readable regular file's path, or None when it is one."""
    path = Path(text)
    if not path.exists():
        return f"no such file: {text}"
    if not path.is_file():
        return f"not a file: {text}"
    return None
