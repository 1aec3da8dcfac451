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


def real_or_none(what: str, low: float, high: float, open_interval: bool = False):
    """A ``type=`` for ``what``, a float in ``[low, high]`` (``(low, high)`` with ``open_interval``; NaN is in
    neither), or ``none`` (any case): no value."""
    bounds = f"({low:g}, {high:g})" if open_interval else f"[{low:g}, {high:g}]"
    expected = f"expected {what} in {bounds} or 'none'"

    def parse(text: str) -> float | None:
        if text.strip().lower() == "none":
            return None
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{expected}, got {text!r}") from None
        if not (low < value < high if open_interval else low <= value <= high):
            raise argparse.ArgumentTypeError(f"{expected}, got {text}")
        return value

    parse.__name__ = "float"  # argparse names the type in its fallback message
    return parse


probability_or_none = real_or_none("a probability", 0, 1, open_interval=True)


def file_problem(text: str) -> str | None:
    """Why ``text`` is not a readable regular file's path, or None when it is one."""
    path = Path(text)
    if not path.exists():
        return f"no such file: {text}"
    if not path.is_file():
        return f"not a file: {text}"
    return None
