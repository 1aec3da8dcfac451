"""Timed text as subtitle files: SubRip (``.srt``) and WebVTT (``.vtt``), written atomically.

A segment is anything with ``start`` and ``end`` (seconds) and ``text``, such as the segments of a Whisper
``Transcription``. SubRip numbers its cues from 1 and writes times as ``HH:MM:SS,mmm``; WebVTT starts with a
``WEBVTT`` line and writes ``HH:MM:SS.mmm`` (W3C WebVTT, section 4). Cue text keeps no blank line (one would end
the cue) and, in WebVTT, no "-->".
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from dreidel._files import replaced_atomically

__all__ = ["TimedText", "format_srt", "format_vtt", "write_text_file"]


class TimedText(Protocol):
    start: float
    end: float
    text: str


def _clock(seconds: float, separator: str) -> str:
    if not (isinstance(seconds, (int, float)) and math.isfinite(seconds) and seconds >= 0):
        raise ValueError(f"segment times must be finite seconds >= 0, got {seconds!r}")
    milliseconds = round(seconds * 1000)
    hours, rest = divmod(milliseconds, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    return f"{hours:02d}:{minutes:02d}:{rest // 1000:02d}{separator}{rest % 1000:03d}"


def _cues(segments: Iterable[TimedText], separator: str) -> list[tuple[str, str]]:
    """(time line, text) of each segment with text, checked: times in order, end not before start."""
    cues = []
    for segment in segments:
        if segment.end < segment.start:
            raise ValueError(f"a segment ends before it starts: {segment.start!r} -> {segment.end!r}")
        text = "\n".join(line for line in str(segment.text).strip().splitlines() if line.strip())
        if text:
            cues.append((f"{_clock(segment.start, separator)} --> {_clock(segment.end, separator)}", text))
    return cues


def format_srt(segments: Iterable[TimedText]) -> str:
    """SubRip text: numbered cues ``n``, ``HH:MM:SS,mmm --> HH:MM:SS,mmm``, the text, a blank line."""
    return "".join(f"{n}\n{times}\n{text}\n\n" for n, (times, text) in enumerate(_cues(segments, ","), 1))


def format_vtt(segments: Iterable[TimedText]) -> str:
    """WebVTT text: ``WEBVTT``, then cues ``HH:MM:SS.mmm --> HH:MM:SS.mmm`` and their text."""
    cues = _cues(segments, ".")
    return "WEBVTT\n\n" + "".join(f"{times}\n{text.replace('-->', '->')}\n\n" for times, text in cues)


def write_text_file(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically: under a temporary name beside it, synced, then renamed
    into place, so a reader sees the old file or the whole new one, never a part."""
    path = Path(path)
    with replaced_atomically(path) as (handle, _), os.fdopen(handle, "w", encoding="utf-8") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    return path
