"""Warnings attributed to the caller's own code.

``warn`` names the first frame on the stack outside dreidel and torch as the warning's source, as Python
3.12's ``warnings.warn(skip_file_prefixes=...)`` does, for any depth of calls: a warning from an optimizer
that ``Sequential.fit`` built, or from a hook that ran inside ``model(x)``, points at the line of the
program that made the call, which is also what ``warnings.filterwarnings(module=...)`` matches. A fixed
``stacklevel`` points at dreidel itself whenever the call came through one more of its functions.
"""

from __future__ import annotations

import os
import sys
import warnings

import torch

_SKIPPED_DIRS = tuple(os.path.dirname(os.path.abspath(path)) + os.sep for path in (__file__, torch.__file__))


def _skipped(filename: str) -> bool:
    return os.path.abspath(filename).startswith(_SKIPPED_DIRS)


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn(message, category)`` from the first calling frame outside dreidel and torch (the
    outermost frame if every one is inside them)."""
    level, frame = 2, sys._getframe(1)  # stacklevel 2 is warn's caller
    while frame.f_back is not None and _skipped(frame.f_code.co_filename):
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)
