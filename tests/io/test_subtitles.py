"""SubRip and WebVTT from timed segments, and the atomic text write behind them."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
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
        "00:01:01.000 --> 01:02:05.500\nAn hour\nlater --&gt;\n\n"
    )
    assert format_vtt([]) == "WEBVTT\n\n" and format_srt([]) == ""


def test_vtt_escapes_markup_and_every_arrow():
    """"--->" used to become "-->" (ending the cue), and "<" / "&" were read as tags and references."""
    text = format_vtt([Cue(0.0, 1.0, "He said ---> go"), Cue(1.0, 2.0, "x < y & z <b>bold</b> &amp;")])
    assert text.split("\n\n")[1:3] == ["00:00:00.000 --> 00:00:01.000\nHe said ---&gt; go",
                                        "00:00:01.000 --> 00:00:02.000\nx &lt; y &amp; z &lt;b&gt;bold&lt;/b&gt; "
                                        "&amp;amp;"]


def test_numpy_times_are_seconds():
    expected = format_srt([Cue(1.0, 2.5, "x")])
    for start in (np.float32(1.0), np.float64(1.0), np.int64(1)):
        assert format_srt([Cue(start, np.float32(2.5), "x")]) == expected


def test_segments_out_of_order_are_refused_naming_the_segment():
    for render in (format_srt, format_vtt):
        with pytest.raises(ValueError, match=r"segment 2 starts at 1\.0, before segment 1 \(5\.0\): segments must "
                                             "be in time order"):
            render([Cue(0.0, 1.0, "a"), Cue(5.0, 6.0, "b"), Cue(1.0, 2.0, "c")])


def test_milliseconds_round_and_carry_into_seconds_minutes_and_hours():
    assert format_srt([Cue(59.9996, 3599.9995, "x")]).splitlines()[1] == "00:01:00,000 --> 01:00:00,000"
    assert format_srt([Cue(1.0014, 100 * 3600.0, "x")]).splitlines()[1] == "00:00:01,001 --> 100:00:00,000"


def test_a_cue_that_would_last_no_time_lasts_a_millisecond():
    # a segment heard past the end of the audio, clamped to it, starts where it ends: WebVTT refuses such a cue
    cues = [Cue(0.0, 2.28, "a"), Cue(2.28, 2.28, "b"), Cue(3.0, 3.0004, "c")]
    assert [line for line in format_vtt(cues).splitlines() if "-->" in line] == [
        "00:00:00.000 --> 00:00:02.280", "00:00:02.280 --> 00:00:02.281", "00:00:03.000 --> 00:00:03.001"]
    assert format_srt(cues).splitlines()[5] == "00:00:02,280 --> 00:00:02,281"


@pytest.mark.parametrize("start, end, message", [(-0.5, 1.0, "finite seconds >= 0"), (0.0, float("nan"), "finite"),
                                                 (2.0, 1.0, "ends before it starts"), (0.0, float("inf"), "finite")])
def test_bad_times_are_refused(start, end, message):
    for render in (format_srt, format_vtt):
        with pytest.raises(ValueError, match=message):
            render([Cue(start, end, "x")])


@pytest.mark.parametrize("start, end, message", [(True, 1.0, "segment 0 start must be a number of seconds, got bool"),
                                                 (0.0, "1.0", "segment 0 end must be a number of seconds, got str")])
def test_times_that_are_not_numbers_are_type_errors(start, end, message):
    for render in (format_srt, format_vtt):
        with pytest.raises(TypeError, match=message):
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


def test_plain_tuples_are_type_errors_asking_for_segments():
    """(start, end, text) tuples raised AttributeError: 'tuple' object has no attribute 'start' (audit)."""
    for render in (format_srt, format_vtt):
        with pytest.raises(TypeError, match=r"segment 1 must have start, end and text attributes \(a Whisper "
                                            r"Segment\), got tuple"):
            render([Cue(0.0, 1.0, "x"), (1.0, 2.0, "y")])


def test_a_transcription_or_one_segment_is_named_with_what_to_pass():
    """Both failed with "... is not iterable"."""

    @dataclass
    class Result:
        segments: tuple

    with pytest.raises(TypeError, match=r"segments: expected a sequence of segments, got one Result; pass result.segments"):
        format_srt(Result(tuple(CUES)))
    with pytest.raises(TypeError, match=r"got one Cue; pass \[segment\]"):
        format_vtt(CUES[0])
    assert format_srt(Result(tuple(CUES)).segments) == format_srt(CUES)
