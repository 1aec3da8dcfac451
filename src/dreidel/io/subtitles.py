"""Timed text as subtitle files: SubRip (``.srt``) and WebVTT (``.vtt``), written atomically.

A segment is anything with ``start`` and ``end`` (seconds) and ``text``, such as the segments of a Whisper
``Transcription``. SubRip numbers its cues from 1 and writes times as ``HH:MM:SS,mmm``; WebVTT starts with a
``WEBVTT`` line and writes ``HH:MM:SS.mmm`` (W3C WebVTT, section 4). Cue text keeps no blank line (one would end
the cue); in WebVTT its ``&``, ``<`` and ``>`` are written as ``&amp;``, ``&lt;`` and ``&gt;`` (markup otherwise),
so it holds no "-->" either. Times are real numbers of seconds (Python or numpy), finite, >= 0, no segment ending
before it starts and no segment starting before the one before it; a cue that would last no time once its times
are rounded to the millisecond (a segment heard past the end of the audio, clamped to it) lasts 1 ms.
"""

from __future__ import annotations

import math
import numbers
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


def _seconds(value, what: str) -> float:
    """``value`` as float seconds: a real number (Python or numpy), finite and >= 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{what} must be a number of seconds, got {type(value).__name__} {value!r}")
    seconds = float(value)
    if not (math.isfinite(seconds) and seconds >= 0):
        raise ValueError(f"{what}: segment times must be finite seconds >= 0, got {value!r}")
    return seconds


def _clock(milliseconds: int, separator: str) -> str:
    hours, rest = divmod(milliseconds, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    return f"{hours:02d}:{minutes:02d}:{rest // 1000:02d}{separator}{rest % 1000:03d}"


def _cues(segments: Iterable[TimedText], separator: str) -> list[tuple[str, str]]:
    """(time line, text) of each segment with text, checked: starts in order, end not before start."""
    if hasattr(segments, "segments") or hasattr(segments, "start"):  # a Transcription, or one Segment
        raise TypeError(f"segments: expected a sequence of segments, got one {type(segments).__name__}; pass "
                        f"{'result.segments' if hasattr(segments, 'segments') else '[segment]'}")
    cues = []
    previous_start = 0.0
    for index, segment in enumerate(segments):
        try:
            given_start, given_end, given_text = segment.start, segment.end, segment.text
        except AttributeError:  # a (start, end, text) tuple, say
            raise TypeError(f"segment {index} must have start, end and text attributes (a Whisper Segment), got "
                            f"{type(segment).__name__}") from None
        start = _seconds(given_start, f"segment {index} start")
        end = _seconds(given_end, f"segment {index} end")
        if end < start:
            raise ValueError(f"segment {index} ends before it starts: {given_start!r} -> {given_end!r}")
        if start < previous_start:
            raise ValueError(f"segment {index} starts at {given_start!r}, before segment {index - 1} "
                             f"({previous_start!r}): segments must be in time order")
        previous_start = start
        text = "\n".join(line for line in str(given_text).strip().splitlines() if line.strip())
        if text:
            # a cue ends after it starts (WebVTT requires it; a player may skip an empty SubRip cue): one that
            # would not, once rounded to the millisecond, lasts one
            start_ms = round(start * 1000)
            end_ms = max(round(end * 1000), start_ms + 1)
            cues.append((f"{_clock(start_ms, separator)} --> {_clock(end_ms, separator)}", text))
    return cues


def format_srt(segments: Iterable[TimedText]) -> str:
    """SubRip text: numbered cues ``n``, ``HH:MM:SS,mmm --> HH:MM:SS,mmm``, the text, a blank line.

    Raises:
        TypeError: a segment without ``start``, ``end`` and ``text`` (a plain tuple), or times that are not
            numbers. ValueError: times out of order or not finite seconds >= 0 (see the module docstring).
    """
    return "".join(f"{n}\n{times}\n{text}\n\n" for n, (times, text) in enumerate(_cues(segments, ","), 1))


def format_vtt(segments: Iterable[TimedText]) -> str:
    """WebVTT text: ``WEBVTT``, then cues ``HH:MM:SS.mmm --> HH:MM:SS.mmm`` and their text; raises as
    ``format_srt`` does."""
    cues = _cues(segments, ".")
    return "WEBVTT\n\n" + "".join(f"{times}\n{_escape_vtt(text)}\n\n" for times, text in cues)


def _escape_vtt(text: str) -> str:
    """Cue text as WebVTT reads it literally: ``&``, ``<`` and ``>`` as character references (``<`` would open a
    tag, ``&`` a reference), which also leaves no "-->" to end the cue."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def write_text_file(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically: under a temporary name beside it, synced, then renamed
    into place, so a reader sees the old file or the whole new one, never a part. ``ValueError`` where
    ``path``'s folder does not exist (or is a file)."""
    path = Path(path)
    with replaced_atomically(path) as (handle, _), os.fdopen(handle, "w", encoding="utf-8") as file:
        file.write(text)
    return path
