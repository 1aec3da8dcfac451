"""What ``Sequential.fit`` checks before and while it trains, and how it keeps its optimizer in step with the
model: BatchNorm and batches of one, non-finite inputs, layers added by ``nn.Sequential``'s own methods,
optimizer instances over other modules, index inputs, argument types, ``initial_epoch``."""

from __future__ import annotations

import copy
import json
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

import dreidel.api.sequential as sequential
from dreidel import api
from dreidel.api import callbacks
from dreidel.api.callbacks import ModelCheckpoint


def _data(n: int = 64, features: int = 8, classes: int = 3, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, features, generator=generator), torch.randint(0, classes, (n,), generator=generator)


def _bn_model(track_running_stats: bool = True) -> api.Sequential:
    torch.manual_seed(0)
    return api.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16, track_running_stats=track_running_stats),
                          nn.ReLU(), nn.Linear(16, 3))


def _training_batch_sizes(model: nn.Module) -> list[int]:
    """Records the size of every batch the model's first layer sees in training mode."""
    sizes: list[int] = []
    model[0].register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]) if module.training else None)
    return sizes


# ------------------------------------------------------------------------------------------- BatchNorm
def test_batch_norm_without_running_statistics_fits_and_summarises():
    x, y = _data()
    model = _bn_model(track_running_stats=False).compile("adam", lr=1e-2)
    history = model.fit(x, y, batch_size=16, epochs=3, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    assert "BatchNorm1d" in model.summary()
    assert "BatchNorm1d" in _bn_model(track_running_stats=False).summary(input_shape=(8,))


def test_a_last_batch_of_one_joins_the_batch_before_it_where_the_model_has_batch_norm():
    x, y = _data(65)
    model = _bn_model().compile("sgd", lr=0.01)
    sizes = _training_batch_sizes(model)
    model.fit(x, y, batch_size=32, verbose=0)
    assert sizes == [32, 33]
    assert model.evaluate(x, y, batch_size=32)["loss"] > 0  # eval batches likewise: 32 and 33
    plain = api.Sequential(nn.Linear(8, 3)).compile("sgd")
    plain_sizes = _training_batch_sizes(plain)
    plain.fit(x, y, batch_size=32, verbose=0)
    assert plain_sizes == [32, 32, 1]  # nothing merged without BatchNorm


def test_a_batch_norm_batch_of_one_is_named_and_spatial_batch_norm_trains_on_one():
    """torch refuses to normalise one value per channel in training: its error now names the batch and what to
    change. BatchNorm2d over a feature map has more than one value per channel in a batch of one sample, and
    trains on it (a first version of this check refused it)."""
    x, y = _data(65)
    model = _bn_model().compile("sgd")
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"epoch 1, batch 1 holds 1 sample\(s\), too few for the model's BatchNorm"):
        model.fit(x[:1], y[:1], verbose=0)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # refused before a step
    with pytest.raises(ValueError, match="batch 3 holds 1 sample.*drop_last=True"):
        model.fit(DataLoader(TensorDataset(x, y), batch_size=32), verbose=0)
    model.fit(DataLoader(TensorDataset(x, y), batch_size=32, drop_last=True), verbose=0)
    torch.manual_seed(0)
    images = api.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                            nn.Linear(64, 3)).compile("sgd")
    images.fit(torch.randn(5, 1, 4, 4), torch.randint(0, 3, (5,)), batch_size=1, verbose=0)
    images.fit(DataLoader(TensorDataset(torch.randn(5, 1, 4, 4), torch.randint(0, 3, (5,))), batch_size=4), verbose=0)


# ------------------------------------------------------------------------------------- non-finite inputs
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_inputs_are_refused_before_any_step(bad):
    x, y = _data()
    x[5, 2] = bad
    model = _bn_model().compile("sgd")
    before = {k: t.clone() for k, t in model.state_dict().items()}
    with pytest.raises(ValueError, match="1 of 64 samples, the first at index 5"):
        model.fit(x, y, verbose=0)
    assert all(torch.equal(before[k], t) for k, t in model.state_dict().items())


def test_a_loader_batch_with_nan_is_refused_before_it_reaches_batch_norm():
    x, y = _data()
    x[40, 0] = float("nan")
    model = _bn_model().compile("sgd")
    with pytest.raises(ValueError, match="epoch 1, batch 2"):
        model.fit(DataLoader(TensorDataset(x, y), batch_size=32), verbose=0)
    assert all(torch.isfinite(t).all() for t in model.state_dict().values())
    assert torch.isfinite(model.predict(x[:2])).all()


# ------------------------------------------------------------------------------- optimizer and layers
@pytest.mark.parametrize("change", ["append", "insert", "extend", "setitem"])
def test_layers_added_by_nn_sequential_methods_after_compile_are_trained(change):
    x, y = _data()
    torch.manual_seed(0)
    model = api.Sequential(nn.Linear(8, 16), nn.ReLU()).compile("adam", lr=0.05)
    assert model.optimizer is not None  # built by compile: the model has no lazy layer
    head = nn.Linear(16, 3)
    if change == "append":
        model.append(head)
    elif change == "insert":
        model.insert(2, head)
    elif change == "extend":
        model.extend([head])
    else:
        model.append(nn.Identity())
        model[2] = head
    start = head.weight.detach().clone()
    model.fit(x, y, epochs=2, verbose=0)
    assert not torch.equal(start, head.weight)


def test_the_optimizer_is_kept_while_the_layers_stay_and_rebuilt_when_they_change():
    x, y = _data()
    model = api.Sequential(nn.Linear(8, 3)).compile("adam")
    model.fit(x, y, verbose=0)
    first = model.optimizer
    model.fit(x, y, verbose=0)
    assert model.optimizer is first and first.state  # its moments carry over
    model[0] = nn.Linear(8, 3)
    model.fit(x, y, verbose=0)
    assert model.optimizer is not first
    assert {id(p) for p in model.optimizer.param_groups[0]["params"]} == {id(p) for p in model.parameters()}


def test_an_optimizer_instance_over_another_module_is_refused_and_a_partial_one_warned():
    x, y = _data()
    model = api.Sequential(nn.Linear(8, 8), nn.Linear(8, 3))
    with pytest.raises(ValueError, match="updates none of the model's parameters"):
        model.compile(torch.optim.Adam(nn.Linear(8, 3).parameters()))
    with pytest.warns(UserWarning, match=r"does not update 2 trainable parameter\(s\) of the model \(1.weight, 1.bias"):
        model.compile(torch.optim.Adam(model[0].parameters()))
    model[1].requires_grad_(False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.fit(x, y, verbose=0)  # the frozen layer needs no update: no warning
    model.append(nn.Linear(3, 3))
    with pytest.warns(UserWarning, match=r"fit: the optimizer instance does not update 2"):
        model.fit(x, y, verbose=0)


def test_copies_and_pickles_of_a_compiled_model_train_on():
    """A model compiled with a curvature optimizer could not be copied or pickled once those refused to be (the
    optimizer went with the model); an Adam copy kept its moments, and must still (a review)."""
    import io

    x, y = _data()
    for name in ("kfac", "diagonal_newton", "adam"):
        model = api.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).compile(name)
        model.fit(x, y, verbose=0)
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        for copied in (copy.deepcopy(model), torch.load(buffer, weights_only=False)):
            copied.fit(x, y, verbose=0)
            assert copied.optimizer is not model.optimizer
            held = {id(p) for group in copied.optimizer.param_groups for p in group["params"]}
            assert held == {id(p) for p in copied.parameters()}
            if name == "adam":  # its moments came along: one step per batch of both fits
                assert copied.optimizer.state[copied[0].weight]["step"] == 2 * 2
    for make_copy in (copy.deepcopy, _pickled):  # a copy whose head is swapped trains the new head
        model = api.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).compile("adam")
        model.fit(x, y, verbose=0)
        tuned = make_copy(model)
        tuned[2] = nn.Linear(16, 3)
        head = tuned[2].weight.detach().clone()
        tuned.fit(x, y, verbose=0)
        assert not torch.equal(head, tuned[2].weight)
    given = api.Sequential(nn.Linear(8, 3))
    given.compile(torch.optim.SGD(given.parameters(), lr=0.1))
    given.fit(x, y, verbose=0)
    twin = copy.deepcopy(given)
    assert twin.evaluate(x, y)["loss"] == given.evaluate(x, y)["loss"]
    with pytest.raises(RuntimeError, match=r"compile\(...\) on the copy"):
        twin.fit(x, y, verbose=0)


def _pickled(model: api.Sequential) -> api.Sequential:
    import io

    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def test_a_fit_refused_by_any_error_leaves_the_input_shape_unset():
    x, y = _data(8)

    def broken_metric(output, target):
        raise RuntimeError("metric failed")

    model = api.Sequential(nn.Linear(8, 3)).compile(metrics=[broken_metric])
    with pytest.raises(RuntimeError, match="metric failed"):
        model.fit(x, y, verbose=0)
    assert model.input_shape is None and model.input_dtype is None


# ------------------------------------------------------------------------------------------ index inputs
def test_index_inputs_are_checked_against_the_dtype_and_the_embedding():
    indices, labels = torch.randint(0, 10, (8, 3)), torch.randint(0, 2, (8,))
    model = api.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 2)).compile()
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 9\].*from 20 to 29 in x"):
        model.fit(indices + 20, labels, verbose=0)
    assert model.input_shape is None
    model.fit(indices, labels, verbose=0)
    with pytest.raises(TypeError, match=r"takes torch.int64 indices .* got torch.uint8"):
        model.predict(indices.to(torch.uint8))
    assert torch.equal(model.predict(indices.int()), model.predict(indices))  # an embedding takes either
    with pytest.raises(ValueError, match="from 50 to 50 in prediction batch 1"):
        model.predict(torch.full((2, 3), 50))
    assert model.predict(indices.to(torch.uint8).long()).shape == (8, 2)


def test_load_refuses_an_input_dtype_the_layers_cannot_take(tmp_path):
    x, y = _data()
    model = api.Sequential(nn.Linear(8, 3)).compile()
    model.fit(x, y, verbose=0)
    path = model.save(tmp_path / "model")
    config = json.loads((path / "config.json").read_text())
    config["input_dtype"] = "int64"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config.json: the layers do not run on 'input_shape' \[8\]"):
        api.load(path)


# ------------------------------------------------------------------------------------------ arguments
@pytest.mark.parametrize("call, error, message", [
    (lambda m, x, y: m.fit(x, y, verbose="yes"), TypeError, "verbose must be an int"),
    (lambda m, x, y: m.fit(x, y, validation_split="0.2", verbose=0), TypeError, "validation_split must be a number"),
    (lambda m, x, y: m.fit(x, y, seed=1.5, verbose=0), TypeError, "seed must be an int"),
    (lambda m, x, y: m.fit(x, y, generator=1, verbose=0), TypeError, "generator must be a torch.Generator"),
    (lambda m, x, y: m.fit(x, y, validation_data=(x[:5], y[:4]), verbose=0), ValueError,
     r"validation_data\[0\] and validation_data\[1\] must have the same number of samples, got 5 and 4"),
    (lambda m, x, y: m.fit(x, y, epochs=2, initial_epoch=2, verbose=0), ValueError, "initial_epoch must be below"),
    (lambda m, x, y: m.fit(x, y, initial_epoch=-1, verbose=0), ValueError, "initial_epoch must be a non-negative"),
    (lambda m, x, y: m.summary(input_shape=8), TypeError, "input_shape must be a tuple \\(or list\\) of ints"),
    (lambda m, x, y: m.build((8, 0)), ValueError, "input_shape must hold positive ints"),
    (lambda m, x, y: m.build((8,), "int64"), TypeError, "dtype: expected a torch.dtype"),
    (lambda m, x, y: m.fit(x, y, shuffle="no", verbose=0), TypeError, r"shuffle: expected a bool .* got str 'no'"),
    (lambda m, x, y: m.fit(x, y, callbacks=callbacks.EarlyStopping("loss"), verbose=0), TypeError,
     r"callbacks: expected a list of callbacks, got one EarlyStopping; pass callbacks=\[EarlyStopping\(\.\.\.\)\]"),
    (lambda m, x, y: m.fit(x, -torch.rand(len(x), 3), verbose=0), ValueError,
     r"cross_entropy's float targets are class probabilities, each row non-negative and summing to 1; in y they "
     r"range from -.* rows summing to"),
    (lambda m, x, y: m.fit(x, (torch.rand(len(x), 3) > 0.5).float(), verbose=0), ValueError,
     r"several labels per sample with a binary loss"),
])
def test_bad_arguments_are_named(call, error, message):
    x, y = _data()
    model = api.Sequential(nn.Linear(8, 3)).compile()
    with pytest.raises(error, match=message):
        call(model, x, y)
    assert model.input_shape is None


def test_verbose_false_and_numpy_or_negative_seeds_are_taken():
    x, y = _data()
    model = api.Sequential(nn.Linear(8, 3)).compile()
    model.fit(x, y, verbose=False, seed=-1)
    model.fit(x, y, verbose=0, seed=np.int64(3))
    with pytest.raises(ValueError, match=r"seed must lie in \[-2\*\*63, 2\*\*64\)"):
        model.fit(x, y, verbose=0, seed=2**64)


def test_none_means_no_metrics_or_callbacks_and_a_non_scalar_loss_is_named():
    x, y = _data()
    model = api.Sequential(nn.Linear(8, 3)).compile(metrics=None)
    assert list(model.fit(x, y, callbacks=None, verbose=0).history) == ["loss", "lr"]
    elementwise = api.Sequential(nn.Linear(8, 3)).compile(loss=lambda output, target: (output - 1) ** 2)
    with pytest.raises(ValueError, match=r"returned a tensor of shape \(32, 3\) at epoch 1, batch 1, expected a scalar"):
        elementwise.fit(x, y, verbose=0)


def test_read_only_numpy_inputs_are_shared_but_never_written(tmp_path):
    """A read-only array (a memory-mapped file) is not copied whole, and no warning comes of it; its batches are
    copies, so a first layer that works in place writes none of it (sharing the batches crashed on a read-only
    mapping, a review)."""
    x, y = (t.numpy() for t in _data())
    np.save(tmp_path / "x.npy", x)
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")
    frozen = x.copy()
    frozen.flags.writeable = False
    model = api.Sequential(nn.ReLU(inplace=True), nn.Linear(8, 3)).compile()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for data in (mapped, frozen):
            model.fit(data, y, shuffle=False, verbose=0)
            model.predict(data)
            assert np.array_equal(data, x)


# ------------------------------------------------------------------------------------ epochs and logs
def test_initial_epoch_numbers_the_history_and_checkpoints(tmp_path):
    x, y = _data()
    model = api.Sequential(nn.Linear(8, 3)).compile()
    model.fit(x, y, epochs=2, verbose=0, callbacks=[ModelCheckpoint(str(tmp_path / "e{epoch}"))])
    first = (tmp_path / "e2" / "model.safetensors").read_bytes()
    history = model.fit(x, y, epochs=4, initial_epoch=2, verbose=0,
                        callbacks=[ModelCheckpoint(str(tmp_path / "e{epoch}"))])
    assert history.epoch == [2, 3] and len(history.history["loss"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e1", "e2", "e3", "e4"]
    assert (tmp_path / "e2" / "model.safetensors").read_bytes() == first  # the first run's files are kept


def test_validation_figures_follow_each_epochs_progress_bar(monkeypatch, capsys):
    x, y = _data()
    monkeypatch.setattr(sequential, "progress_enabled", lambda verbose: verbose > 0)
    model = api.Sequential(nn.Linear(8, 3)).compile(metrics=["accuracy"])
    model.fit(x, y, epochs=2, validation_split=0.25, verbose=1)
    lines = [line for line in capsys.readouterr().err.splitlines() if "val_loss" in line]
    assert [line.split(":")[0] for line in lines] == ["epoch 1/2", "epoch 2/2"]
    assert "val_accuracy" in lines[0]
    model.fit(x, y, epochs=1, validation_split=0.25, verbose=0)
    assert "val_loss" not in capsys.readouterr().err


def test_probability_targets_and_label_smoothing_train():
    """Rows that sum to 1 within their dtype's rounding pass the check of cross_entropy's float targets."""
    x, y = _data()
    probabilities = torch.nn.functional.one_hot(y, 3).float() * 0.9 + 0.1 / 3
    model = api.Sequential(nn.Linear(8, 3)).compile()
    model.fit(x, probabilities, verbose=0)
    model.fit(x, probabilities.half().float(), verbose=0)


def test_kl_divergence_refuses_probabilities_as_teacher_targets():
    """Probabilities (Keras's convention) were softmaxed again: a teacher sure at 0.999 became 0.58."""
    x, _ = _data()
    teacher_logits = 4 * torch.randn(len(x), 3, generator=torch.Generator().manual_seed(1))
    model = api.Sequential(nn.Linear(8, 3)).compile(loss="kl_divergence")
    with pytest.raises(ValueError, match=r"kl_divergence takes the teacher's logits, but every target row in y is "
                                         r"non-negative and sums to 1.*"
                                         r"p.clamp_min\(torch.finfo\(p.dtype\).tiny\).log\(\)"):
        model.fit(x, teacher_logits.softmax(-1), verbose=0)
    model.fit(x, teacher_logits, verbose=0)
    model.fit(x, teacher_logits.softmax(-1).log(), verbose=0)


@pytest.mark.parametrize("loss", ["cross_entropy", "kl_divergence"])
def test_a_softmax_before_a_loss_on_logits_is_warned_of(loss):
    x, y = _data()
    targets = y if loss == "cross_entropy" else torch.randn(len(x), 3)
    model = api.Sequential(nn.Linear(8, 3), nn.Softmax(dim=-1)).compile(loss=loss)
    with pytest.warns(UserWarning, match=f"the model ends in nn.Softmax, but {loss} takes logits"):
        model.fit(x, targets, verbose=0)
    quiet = api.Sequential(nn.Linear(8, 3), nn.LogSoftmax(dim=-1)).compile(loss=loss)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet.fit(x, targets, verbose=0)


def test_the_probability_check_does_not_scale_with_the_class_count_or_dtype():
    """The tolerance grew with the class count: in bfloat16 over 1000 classes any non-negative row summing below
    32 passed for probabilities, and kl_divergence refused small non-negative teacher logits. Soft labels rounded
    to two decimals sum to 0.99 and pass."""
    x = torch.randn(16, 8)
    generator = torch.Generator().manual_seed(2)
    teacher = 0.02 * torch.rand(16, 1000, generator=generator)  # non-negative logits, rows summing to about 10
    wide = api.Sequential(nn.Linear(8, 1000)).to(torch.bfloat16).compile(loss="kl_divergence")
    wide.fit(x, teacher, verbose=0)
    multi_hot = (torch.rand(16, 1000, generator=generator) > 0.99).float()
    multi_hot[:, 0] = 1.0  # every row holds at least two labels, or one where the draw gave none
    multi_hot[0, 1] = 1.0
    with pytest.raises(ValueError, match="several labels per sample"):
        api.Sequential(nn.Linear(8, 1000)).to(torch.bfloat16).compile().fit(x, multi_hot, verbose=0)
    rounded = torch.tensor([[0.33, 0.33, 0.33]]).expand(16, 3)
    api.Sequential(nn.Linear(8, 3)).compile().fit(x, rounded, verbose=0)
