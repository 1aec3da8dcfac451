"""``Sequential.compile(..., jit_compile=...)``: fit / evaluate / predict through torch.compile (a user audit
found ``torch.compile(model).fit(...)`` training eagerly, and ``compile(fullgraph=True)`` failing inside Adam)."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

import dreidel.api as api
from dreidel.layers import LinearWHT


def _data():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(96, 16, generator=generator), torch.randint(0, 4, (96,), generator=generator)


def _model(optimizer: str, **compile_args) -> api.Sequential:
    torch.manual_seed(0)
    model = api.Sequential(LinearWHT(16, 32, activation="relu"), nn.Linear(32, 4))
    return model.compile(optimizer, metrics=["accuracy"], **compile_args)


@pytest.mark.parametrize("optimizer, jit", [
    ("adam", True),  # inductor, torch.compile's default
    ("adam", {"backend": "aot_eager"}),
    ("kfac", {"backend": "aot_eager"}),  # its hooks break the graph at each layer; the steps are the same
])
def test_jit_compiled_fit_evaluate_and_predict_match_eager_and_run_compiled(optimizer, jit):
    x, y = _data()
    eager = _model(optimizer)
    eager_history = eager.fit(x, y, epochs=2, batch_size=32, verbose=0).history
    torch._dynamo.reset()
    counters.clear()
    compiled = _model(optimizer, jit_compile=jit)
    history = compiled.fit(x, y, epochs=2, batch_size=32, verbose=0).history
    assert counters["stats"]["unique_graphs"] >= 1  # the forward passes went through dynamo
    for key in ("loss", "accuracy"):
        torch.testing.assert_close(history[key], eager_history[key], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(compiled.evaluate(x, y)["loss"], eager.evaluate(x, y)["loss"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(compiled.predict(x), eager.predict(x), rtol=1e-4, atol=1e-5)


def test_a_copy_of_a_jit_compiled_model_trains_itself_not_the_original():
    """The torch.compile wrapper holds the model it wraps: a copy (or an unpickled model) makes its own."""
    x, y = _data()
    model = _model("adam", jit_compile={"backend": "aot_eager"})
    model.fit(x, y, epochs=1, verbose=0)
    before = [p.detach().clone() for p in model.parameters()]
    for duplicate in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        duplicate.fit(x, y, epochs=1, verbose=0)
        assert duplicate._compiled.jit == {"backend": "aot_eager"}
        assert duplicate._compiled.runner is not model._compiled.runner
        assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
        assert not all(torch.equal(p, b) for p, b in zip(duplicate.parameters(), before))


@pytest.mark.parametrize("call, message", [
    (lambda m: m.compile("adam", fullgraph=True), r"torch.compile's \['fullgraph'\] go in jit_compile="),
    (lambda m: m.compile("adam", lr=0.1, mode="max-autotune"), r"torch.compile's \['mode'\] go in jit_compile="),
    (lambda m: m.compile("adam", jit_compile="yes"), "jit_compile must be a bool or a dict"),
    (lambda m: m.compile("adam", jit_compile={"fulgraph": True}), r"jit_compile: \['fulgraph'\] are not torch.compile"),
])
def test_torch_compile_arguments_in_the_wrong_place_are_named(call, message):
    model = api.Sequential(nn.Linear(4, 3))
    with pytest.raises(TypeError, match=message):
        call(model)
    assert model._compiled is None


def test_a_torch_compile_argument_refused_at_fit_still_ends_the_callbacks_run():
    """The runner was made outside fit's try: an invalid backend skipped on_train_end (a review)."""
    calls = []

    class Records(api.Callback):
        def on_train_begin(self, model):
            calls.append("begin")

        def on_train_end(self, model):
            calls.append("end")

    x, y = _data()
    model = _model("sgd", jit_compile={"backend": "no_such_backend"})
    with pytest.raises(Exception, match="no_such_backend"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[Records()])
    assert calls == ["begin", "end"]
