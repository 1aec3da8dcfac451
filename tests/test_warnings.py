"""dreidel's warnings name the caller's line, however deep inside dreidel (and torch) they were raised."""

import inspect
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import dreidel.audio
from dreidel import api, optim
from dreidel._warnings import warn


def _caught(call):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    return caught


def _nested_warn():
    warn("from two dreidel-free frames deep")


def test_a_warning_from_this_file_names_this_file():
    caught = _caught(_nested_warn)
    assert len(caught) == 1 and caught[0].filename == __file__


def test_kfac_built_by_compile_names_the_compile_call():
    # K-FAC built inside Sequential.compile (-> build_optimizer -> KFAC.__init__) warns of the GRU's weights.
    class LastStep(nn.Module):
        def forward(self, x):
            return x[0][:, -1]

    model = api.Sequential(nn.GRU(3, 4, batch_first=True), LastStep(), nn.Linear(4, 2))
    caught = _caught(lambda: model.compile("kfac"))
    kfac = [w for w in caught if "no curvature factors" in str(w.message)]
    assert kfac and all(w.filename == __file__ for w in kfac), [(w.filename, w.lineno) for w in caught]


@pytest.mark.parametrize("through", ["pcm_to_float", "load_audio"])
def test_audio_level_warning_names_the_line_of_the_call(through):
    loud = np.full(160, 300.0, dtype=np.float32)  # int16-scale values given as floats
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = inspect.currentframe().f_lineno + 2
        if through == "pcm_to_float":
            dreidel.audio.pcm_to_float(loud)
        else:
            line += 3
            dreidel.audio.load_audio(loud, sample_rate=16000)
    caught = [w for w in caught if "expected [-1, 1]" in str(w.message)]
    assert len(caught) == 1 and (caught[0].filename, caught[0].lineno) == (__file__, line)


def test_optimizer_missing_parameters_warning_names_the_compile_call():
    model = api.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    caught = _caught(lambda: model.compile(torch.optim.SGD(model[0].parameters(), lr=0.1)))
    missing = [w for w in caught if "does not update" in str(w.message)]
    assert missing and all(w.filename == __file__ for w in missing)


def test_warning_inside_a_forward_hook_skips_torch_frames():
    # A curvature-capture warning raised in a forward hook that torch's Module.__call__ ran.
    model = nn.Sequential(nn.Linear(4, 4))
    optimizer = optim.KFAC(model, lr=0.1)
    limit = optimizer.capture.MAX_RECORDS

    def forwards():
        for _ in range(limit + 1):
            model(torch.randn(2, 4))

    caught = [w for w in _caught(forwards) if "curvature capture" in str(w.message)]
    assert len(caught) == 1 and caught[0].filename == __file__
