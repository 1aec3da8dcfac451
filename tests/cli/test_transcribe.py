"""`dreidel transcribe` on real files with tiny.en."""

from __future__ import annotations

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
