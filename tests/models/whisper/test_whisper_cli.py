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
