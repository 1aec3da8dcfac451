"""SubRip and WebVTT from timed segments, and the atomic text write behind them."""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest

from dreidel.io.subtitles import format_srt, format_vtt, write_text_file


@dataclass
class Cue:
    start: float
    end: float
    text: str


CUES = [Cue(0.0, 2.56, " Where did you put the keys?"), Cue(2.56, 2.56, "   "), Cue(61.0004, 3725.5, "An hour\n\nlater -->")]


def test_srt_numbers_the_cues_with_text_and_writes_comma_milliseconds():
    assert format_srt(CUES) == (
        "1\n00:00:00,000 --> 00:00:02,560\nWhere did you put the keys?\n\n"
        "2\n00:01:01,000 --> 01:02:05,500\nAn hour\nlater -->\n\n"  # a blank line would end the cue early
    )


def test_vtt_has_its_header_dot_milliseconds_and_no_arrow_in_text():
    assert format_vtt(CUES) == (
        "WEBVTT\n\n"
        "00:00:00.000 --> 00:00:02.560\nWhere did you put the keys?\n\n"
        "00:01:01.000 --> 01:02:05.500\nAn hour\nlater ->\n\n"
    )
    assert format_vtt([]) == "WEBVTT\n\n" and format_srt([]) == ""


def test_milliseconds_round_and_carry_into_seconds_minutes_and_hours():
    assert format_srt([Cue(59.9996, 3599.9995, "x")]).splitlines()[1] == "00:01:00,000 --> 01:00:00,000"
    assert format_srt([Cue(1.0014, 100 * 3600.0, "x")]).splitlines()[1] == "00:00:01,001 --> 100:00:00,000"


@pytest.mark.parametrize("start, end, message", [(-0.5, 1.0, "finite seconds >= 0"), (0.0, float("nan"), "finite"),
                                                 (2.0, 1.0, "ends before it starts"), (0.0, float("inf"), "finite")])
def test_bad_times_are_refused(start, end, message):
    for render in (format_srt, format_vtt):
        with pytest.raises(ValueError, match=message):
            render([Cue(start, end, "x")])


def test_the_write_is_atomic_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    target = tmp_path / "talk.srt"
    assert write_text_file(target, "first\n") == target and target.read_text(encoding="utf-8") == "first\n"

    def failing_replace(source, destination):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="No space left"):
        write_text_file(target, "second, never seen\n")
    assert target.read_text(encoding="utf-8") == "first\n"  # the old file, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["talk.srt"]  # the temporary file is gone
    monkeypatch.undo()
    write_text_file(target, "Ünïcode ✓\n")
    assert target.read_bytes() == "Ünïcode ✓\n".encode("utf-8")
