"""`dreidel transcribe` through its own sub-parser (the shared main parser registers the same function)."""

from __future__ import annotations

import argparse

import pytest
from _whisper_helpers import speech_clips

from dreidel.cli import transcribe as transcribe_command


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dreidel")
    transcribe_command.register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_transcribe_command_prints_text_and_rtf(tmp_path, capsys):
    import soundfile

    (text, audio), = speech_clips(1, seed=6)
    path = tmp_path / "clip.wav"
    soundfile.write(path, audio.numpy(), 16000)
    args = parse(["transcribe", str(path), "--threads", "1"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert str(path) in out and "RTF" in out
    first_word = text.split()[0].lower()
    assert first_word in out.lower()


@pytest.mark.parametrize("argv", [["transcribe", "no-such-file.wav"], ["transcribe", "x.wav", "--beam", "0"]])
def test_transcribe_command_rejects_bad_arguments(argv, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.wav").write_bytes(b"")
    args = parse(argv)
    with pytest.raises(SystemExit):
        args.func(args)


@pytest.mark.parametrize("case", ["not-audio", "bad-model-dir", "english-only-language"])
def test_transcribe_command_reports_bad_input_in_one_line(case, tmp_path, monkeypatch):
    import soundfile
    import torch

    monkeypatch.chdir(tmp_path)
    soundfile.write(tmp_path / "clip.wav", torch.zeros(1600).numpy(), 16000)
    (tmp_path / "notes.wav").write_text("not audio")
    (tmp_path / "model").mkdir()
    argv, expected = {
        "not-audio": (["notes.wav"], "notes.wav"),
        "bad-model-dir": (["clip.wav", "--model", str(tmp_path / "model")], str(tmp_path / "model")),
        "english-only-language": (["clip.wav", "--language", "de"], "'de'"),
    }[case]
    args = parse(["transcribe", *argv])
    with pytest.raises(SystemExit) as raised:  # not a traceback
        args.func(args)
    message = str(raised.value.code)
    assert message.startswith("dreidel transcribe: error:") and expected in message


def test_transcribe_command_no_speech_threshold(tmp_path, capsys):
    """Noise that greedy tiny.en writes up as words (unsure of them) gives no text by default and with a threshold
    below its no-speech probability; 'none' keeps the words, as does a threshold above that probability.
    (--no-fallback: the fallback's beam search may hear this noise as a sure ". . . . .".)"""
    import soundfile
    import torch

    path = tmp_path / "noise.wav"
    noise = torch.randn(10 * 16000, generator=torch.Generator().manual_seed(0)) * 10 ** (-30 / 20)
    soundfile.write(path, noise.numpy(), 16000)
    outputs = {}
    for extra in ([], ["--no-speech-threshold", "0.5"], ["--no-speech-threshold", "None"],
                  ["--no-speech-threshold", "0.99"]):
        args = parse(["transcribe", str(path), "--no-fallback", *extra])
        assert args.func(args) == 0
        outputs[" ".join(extra)] = capsys.readouterr().out.splitlines()[0]
    empty = f"{path}: "
    assert outputs[""] == outputs["--no-speech-threshold 0.5"] == empty
    words = outputs["--no-speech-threshold None"]
    assert words.startswith(empty) and words[len(empty):].strip() and outputs["--no-speech-threshold 0.99"] == words
    with pytest.raises(SystemExit) as exit_info:  # not a probability: argparse's usage error
        parse(["transcribe", str(path), "--no-speech-threshold", "2"])
    assert exit_info.value.code == 2


@pytest.mark.parametrize("flag, keyword", [("--no-fallback", "fallback"), ("--no-timestamps", "timestamps")])
def test_no_flags_reach_transcribe(tmp_path, monkeypatch, flag, keyword):
    """--no-fallback gives plain greedy decoding, --no-timestamps consecutive 30 s windows of text (the
    fallback, and timestamps with seeking, are the default)."""
    import numpy as np
    import soundfile

    from dreidel.models import whisper

    path = tmp_path / "quiet.wav"
    soundfile.write(path, np.zeros(16000, dtype=np.float32), 16000)
    seen = []
    original = whisper.transcribe
    monkeypatch.setattr(whisper, "transcribe", lambda *a, **k: (seen.append(k[keyword]), original(*a, **k))[-1])
    for argv in (["transcribe", str(path)], ["transcribe", str(path), flag]):
        args = parse(argv)
        assert args.func(args) == 0
    assert seen == [True, False]


def test_prompt_flags_reach_transcribe(tmp_path, monkeypatch, capsys):
    """--initial-prompt gives its text, --condition-on-previous-text turns conditioning on (off by default); a
    blank prompt is a one-line error."""
    import numpy as np
    import soundfile

    from dreidel.models import whisper

    path = tmp_path / "quiet.wav"
    soundfile.write(path, np.zeros(16000, dtype=np.float32), 16000)
    seen = []
    original = whisper.transcribe
    monkeypatch.setattr(whisper, "transcribe", lambda *a, **k: (
        seen.append((k["initial_prompt"], k["condition_on_previous_text"])), original(*a, **k))[-1])
    for extra in ([], ["--initial-prompt", "Names: Kenobi.", "--condition-on-previous-text"]):
        args = parse(["transcribe", str(path), *extra])
        assert args.func(args) == 0
    assert seen == [(None, False), ("Names: Kenobi.", True)]
    args = parse(["transcribe", str(path), "--initial-prompt", " "])
    with pytest.raises(SystemExit) as raised:  # argparse's usage error, before the model loads
        args.func(args)
    assert raised.value.code == 2
    assert "argument --initial-prompt: expected some text, got a blank one" in capsys.readouterr().err


def test_silence_threshold_flag_reaches_transcribe(tmp_path, monkeypatch):
    """--silence-threshold-dbfs DB|none reaches transcribe as a float or None (left out: transcribe's default);
    a level above 0 dB is argparse's usage error."""
    import numpy as np
    import soundfile

    from dreidel.models import whisper

    path = tmp_path / "quiet.wav"
    soundfile.write(path, np.zeros(16000, dtype=np.float32), 16000)
    seen = []
    original = whisper.transcribe
    monkeypatch.setattr(whisper, "transcribe", lambda *a, **k: (
        seen.append(k.get("silence_threshold_dbfs", "default")), original(*a, **k))[-1])
    for extra in ([], ["--silence-threshold-dbfs", "-60"], ["--silence-threshold-dbfs", "None"]):
        args = parse(["transcribe", str(path), *extra])
        assert args.func(args) == 0
    assert seen == ["default", -60.0, None]
    with pytest.raises(SystemExit) as exit_info:
        parse(["transcribe", str(path), "--silence-threshold-dbfs", "5"])
    assert exit_info.value.code == 2


def test_segments_are_printed_with_their_times(tmp_path, capsys):
    import re

    import soundfile

    (_, audio), = speech_clips(1, seed=6)
    path = tmp_path / "clip.wav"
    soundfile.write(path, audio.numpy(), 16000)
    args = parse(["transcribe", str(path), "--segments", "--threads", "1"])
    assert args.func(args) == 0
    lines = capsys.readouterr().out.splitlines()
    text = lines[0].removeprefix(f"{path}: ")
    segments = [re.fullmatch(r"  \[ *(\d+\.\d\d) -> *(\d+\.\d\d)\] (.+)", line) for line in lines[1:-1]]
    assert segments and all(segments), lines
    assert " ".join(m.group(3) for m in segments) == text
    assert float(segments[0].group(1)) <= 1.0 and float(segments[-1].group(2)) <= len(audio) / 16000 + 0.01


def test_output_formats_write_the_transcript_and_its_subtitles(tmp_path, capsys):
    import soundfile

    (_, audio), = speech_clips(1, seed=6)
    path = tmp_path / "talk.wav"
    soundfile.write(path, audio.numpy(), 16000)
    out = tmp_path / "out" / "nested"  # created
    args = parse(["transcribe", str(path), "--output-format", "all", "--output-dir", str(out), "--threads", "1"])
    assert args.func(args) == 0
    text = capsys.readouterr().out.splitlines()[0].removeprefix(f"{path}: ")
    assert (out / "talk.txt").read_text(encoding="utf-8") == text + "\n"
    srt = (out / "talk.srt").read_text(encoding="utf-8").splitlines()
    vtt = (out / "talk.vtt").read_text(encoding="utf-8").splitlines()
    assert srt[0] == "1" and srt[1].startswith("00:00:0") and " --> 00:00:0" in srt[1] and srt[2] == text
    assert vtt[0] == "WEBVTT" and vtt[2] == srt[1].replace(",", ".") and vtt[3] == text
    assert sorted(p.name for p in out.iterdir()) == ["talk.srt", "talk.txt", "talk.vtt"]


def test_output_problems_are_one_line_errors_before_or_after_decoding(tmp_path, monkeypatch, capsys):
    import numpy as np
    import soundfile

    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        soundfile.write(tmp_path / folder / "same.wav", np.zeros(1600, dtype=np.float32), 16000)
    same = [str(tmp_path / "a" / "same.wav"), str(tmp_path / "b" / "same.wav")]
    from dreidel.io import subtitles
    from dreidel.models import whisper

    decoded = []
    original = whisper.transcribe
    monkeypatch.setattr(whisper, "transcribe", lambda *a, **k: (decoded.append(1), original(*a, **k))[-1])
    args = parse(["transcribe", *same, "--output-format", "srt", "--output-dir", str(tmp_path)])
    with pytest.raises(SystemExit):  # two inputs would write one file: refused before any decoding
        args.func(args)
    assert "would both be written to" in capsys.readouterr().err and not decoded
    args = parse(["transcribe", same[0], "--output-format", "txt", "--output-dir", same[1]])
    with pytest.raises(SystemExit):
        args.func(args)
    assert "is a file, not a directory" in capsys.readouterr().err and not decoded

    def full_disk(path, text):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(subtitles, "write_text_file", full_disk)
    args = parse(["transcribe", same[0], "--output-format", "txt", "--output-dir", str(tmp_path / "out")])
    with pytest.raises(SystemExit, match=r"dreidel transcribe: error: cannot write .*same.txt: No space left"):
        args.func(args)
    assert decoded

    def folder_made_since(path, text):  # a directory made where the file goes while decoding ran
        raise ValueError(f"{str(path)!r} is a directory; expected the path of a file")

    monkeypatch.setattr(subtitles, "write_text_file", folder_made_since)
    with pytest.raises(SystemExit, match=r"dreidel transcribe: error: cannot write .*same.txt: '.*' is a directory"):
        args.func(args)  # was a traceback, and the later files' texts were never printed


@pytest.mark.parametrize("through", ["the same name", "a symbolic link"])
def test_a_transcript_never_replaces_an_input(tmp_path, capsys, through):
    """A WAV named clip.txt with --output-format txt next to it was replaced by its own transcript (exit 0)."""
    import numpy as np
    import soundfile

    audio = tmp_path / "clip.txt"
    soundfile.write(audio, np.zeros(1600, dtype=np.float32), 16000, format="WAV")
    before = audio.read_bytes()
    given = audio
    if through == "a symbolic link":
        (tmp_path / "links").mkdir()
        given = tmp_path / "links" / "clip.wav"
        given.symlink_to(audio)
        (tmp_path / "links" / "clip.txt").symlink_to(audio)  # the target, in the output folder, is the input too
    args = parse(["transcribe", str(given), "--output-format", "txt", "--output-dir", str(given.parent)])
    with pytest.raises(SystemExit) as exit_info:
        args.func(args)
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert "argument --output-dir: the txt transcript of" in message and "would replace the input" in message
    assert audio.read_bytes() == before


def test_a_hard_link_to_an_input_at_an_output_path_is_replaced_and_the_input_kept(tmp_path, capsys):
    """The write renames a new file over that entry: the input, another entry of the same file, stays."""
    import os

    import numpy as np
    import soundfile

    audio = tmp_path / "a.wav"
    soundfile.write(audio, np.zeros(1600, dtype=np.float32), 16000)
    before = audio.read_bytes()
    (tmp_path / "out").mkdir()
    os.link(audio, tmp_path / "out" / "a.txt")
    args = parse(["transcribe", str(audio), "--output-format", "txt", "--output-dir", str(tmp_path / "out")])
    assert args.func(args) == 0
    assert audio.read_bytes() == before and (tmp_path / "out" / "a.txt").read_text().endswith("\n")
