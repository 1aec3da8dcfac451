"""`dreidel transcribe` on real files with tiny.en."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from dreidel.cli.main import main

soundfile = pytest.importorskip("soundfile")


def test_empty_audio_file_prints_no_nan(tmp_path, capsys):
    path = tmp_path / "empty.wav"
    soundfile.write(path, np.zeros(0, np.float32), 16000)
    assert main(["transcribe", str(path)]) == 0
    out = capsys.readouterr().out
    assert "nan" not in out  # the real-time factor of no audio used to print as 'RTF nan'
    assert out.splitlines()[1].strip().startswith("0.00 s audio") and out.splitlines()[1].endswith("RTF -")


def test_audio_too_short_to_decode_has_no_real_time_factor_and_no_total(tmp_path, capsys):
    """50 samples (3 ms, under one 10 ms mel frame) are not decoded: they used to print 'RTF 0.000', and a
    'total' line over nothing decoded."""
    short, empty = tmp_path / "short.wav", tmp_path / "empty.wav"
    soundfile.write(short, np.full(50, 0.01, np.float32), 16000)
    soundfile.write(empty, np.zeros(0, np.float32), 16000)
    assert main(["transcribe", str(short), str(empty)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and lines[0] == f"{short}: " and lines[1].endswith("RTF -") and lines[3].endswith("RTF -")


def test_a_float_file_beyond_full_scale_warns_once_naming_it(tmp_path, capsys):
    """It warned from inside the library, as if an array of integer values had been given (review)."""
    path = tmp_path / "loud.wav"
    soundfile.write(path, np.full(50, 20000.0, np.float32), 16000, subtype="FLOAT")
    assert main(["transcribe", str(path)]) == 0
    assert capsys.readouterr().err == (f"dreidel transcribe: warning: {path}: samples reach 20000, expected [-1, 1]: "
                                       "a float file of unscaled values?\n")


def test_a_file_name_that_is_not_utf8_is_printed_and_its_outputs_written(tmp_path, monkeypatch):
    """Python holds a name's non-UTF-8 bytes as lone surrogates, which printing refused: every file was decoded,
    then the command failed with a traceback at the first such name, before writing its outputs (a user audit).
    A UTF-8 stream now writes the name's own bytes."""
    import io
    import os
    import sys

    name = os.fsdecode(b"caf\xe9.wav")  # 'caf\udce9.wav'
    path = tmp_path / name
    soundfile.write(tmp_path / "plain.wav", np.zeros(800, np.float32), 16000)  # libsndfile takes str names only
    os.rename(os.fsencode(tmp_path / "plain.wav"), os.fsencode(path))
    stdout = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")
    monkeypatch.setattr(sys, "stdout", stdout)
    assert main(["transcribe", "--output-format", "txt", "--output-dir", str(tmp_path / "out"), "--", str(path)]) == 0
    stdout.flush()
    printed = stdout.buffer.getvalue()
    assert os.fsencode(str(path)) + b": " in printed
    assert (tmp_path / "out" / os.fsdecode(b"caf\xe9.txt")).exists()
    assert stdout.errors == "strict"  # put back: main may run in a process that goes on


def _quiet_files(folder, count: int) -> list[str]:
    """Half-second files of silence: each is written out (empty text) without a window to decode."""
    folder.mkdir()
    names = []
    for index in range(count):
        names.append(str(folder / f"clip{index:02d}.wav"))
        soundfile.write(names[-1], np.zeros(8000, np.float32), 16000)
    return names


def test_every_asked_for_file_is_written_when_the_reader_leaves_early(tmp_path):
    """`dreidel transcribe ... --output-format txt | head -1`: each file used to be written after its lines were
    printed, so the first print into the closed pipe ended the command with most files unwritten, silently (a
    user audit). Now the rest is printed to the null device, every file is written, and the exit is 141."""
    import os
    import subprocess
    import sys

    files = _quiet_files(tmp_path / "in", 10)  # two groups of files
    command = [sys.executable, "-c", "import sys; from dreidel.cli.main import main; sys.exit(main())",
               "transcribe", "--output-format", "txt", "--output-dir", str(tmp_path / "out"), *files]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})  # each line written as printed
    process.stdout.close()  # the reader has gone before the first line
    error = process.stderr.read().decode()
    assert process.wait(timeout=300) == 141, error
    assert "Traceback" not in error
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"clip{i:02d}.txt" for i in range(10)]


def test_files_of_groups_already_decoded_are_kept_when_interrupted(tmp_path, monkeypatch, capsys):
    """The outputs were written only once every input was decoded: a Ctrl-C (or a crash) on the last file lost
    all of them. Files are now decoded in groups of eight and written group by group."""
    from dreidel.models import whisper

    real = whisper.transcribe
    calls = []

    def interrupted_at_the_second_group(*args, **kwargs):
        calls.append(len(args[1]))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(whisper, "transcribe", interrupted_at_the_second_group)
    files = _quiet_files(tmp_path / "in", 10)
    assert main(["transcribe", "--output-format", "txt", "--output-dir", str(tmp_path / "out"), *files]) == 130
    assert calls == [8, 2]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"clip{i:02d}.txt" for i in range(8)]
    assert capsys.readouterr().out.count("  wrote ") == 8


def test_a_write_that_fails_leaves_the_files_before_it_reported(tmp_path, capsys, monkeypatch):
    """Writing a whole group before printing it left the files already written unreported when a later write
    failed (a review): each file is written, then printed."""
    from dreidel.cli import transcribe as command

    real = command.write_outputs

    def full_disk_at_the_third(result, targets):
        if any(path.name == "clip02.txt" for path in targets.values()):
            raise SystemExit("dreidel transcribe: error: cannot write clip02.txt: No space left on device")
        real(result, targets)

    monkeypatch.setattr(command, "write_outputs", full_disk_at_the_third)
    files = _quiet_files(tmp_path / "in", 3)
    with pytest.raises(SystemExit, match="No space left"):
        main(["transcribe", "--output-format", "txt", "--output-dir", str(tmp_path / "out"), *files])
    out = capsys.readouterr().out
    assert out.count("  wrote ") == 2 and "clip01.txt" in out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["clip00.txt", "clip01.txt"]


def test_a_long_initial_prompt_is_warned_about_once_for_all_groups(tmp_path, caplog):
    """Each group's call logged it: three times for 17 files (a review)."""
    files = _quiet_files(tmp_path / "in", 17)
    prompt = " ".join(["word"] * 400)
    with caplog.at_level("WARNING", logger="dreidel.models.whisper"):
        assert main(["transcribe", "--initial-prompt", prompt, *files]) == 0
    assert sum("initial_prompt is" in record.getMessage() for record in caplog.records) == 1
    assert not logging.getLogger("dreidel.models.whisper").filters  # taken off again
