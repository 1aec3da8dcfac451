"""The console script's standard streams: names that are not valid in the locale's encoding, and a reader that
leaves early."""

from __future__ import annotations

import codecs
import io
import os
import sys
from typing import Callable


def tolerate_undecodable_names() -> Callable[[], None]:
    """File names need not be valid in the locale's encoding: Python holds their odd bytes as lone surrogates,
    which printing refused (`dreidel transcribe` decoded every file, then failed at the first such name before
    writing its outputs). A UTF-8 stream writes them back as the bytes they were; another escapes them. Returns
    what puts the streams back (``main`` may run in a process that goes on)."""
    before = []
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            before.append((stream, stream.errors))
            utf8 = codecs.lookup(stream.encoding).name == "utf-8"
            stream.reconfigure(errors="surrogateescape" if utf8 else "backslashreplace")

    def restore() -> None:
        for stream, errors in before:
            if not stream.closed:
                stream.reconfigure(errors=errors)
    return restore


def discard_stdout() -> None:
    """Point stdout at the null device, so that the flush at exit cannot fail again."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
