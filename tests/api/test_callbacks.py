"""Callbacks and History: early stopping, checkpoints, CSV logs, learning-rate schedules, plots."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
from torch import nn

import dreidel.api as api
from dreidel.data import load_digits


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits("train", seed=1)
    return x[:400], y[:400], x[400:600], y[400:600]


def _model() -> api.Sequential:
    torch.manual_seed(0)
    return api.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))


def test_early_stopping_stops_when_nothing_improves(digits):
    x, y, x_val, y_val = digits
    model = _model().compile("sgd", "cross_entropy", lr=0.0)  # a frozen model: val_loss never improves
    stopper = api.EarlyStopping(monitor="val_loss", patience=2)
    history = model.fit(x, y, epochs=10, validation_data=(x_val, y_val), callbacks=[stopper], verbose=0)
    assert history.epoch == [0, 1, 2] and stopper.stopped_epoch == 2 and stopper.best_epoch == 0


class _Snapshots(api.Callback):
    """The model's state dict after every epoch."""

    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []

    def on_epoch_end(self, model, epoch, logs):
        self.states.append({k: v.clone() for k, v in model.state_dict().items()})


# "lr" cannot rise above its first value in max mode: epoch 0 stays the best, and a patience of 1 stops after
# epoch 1, one of 10 outlasts the 3 epochs
@pytest.mark.parametrize("patience, epochs_run", [(1, [0, 1]), (10, [0, 1, 2])])
def test_early_stopping_restores_best_weights_when_it_stops_training_or_training_ends(digits, patience, epochs_run):
    x, y, *_ = digits
    model = _model().compile("sgd", "cross_entropy", ["accuracy"], lr=0.5)
    snapshots = _Snapshots()
    stopper = api.EarlyStopping(monitor="lr", patience=patience, mode="max", restore_best_weights=True)
    history = model.fit(x, y, epochs=3, callbacks=[snapshots, stopper], verbose=0, seed=0)
    assert history.epoch == epochs_run and stopper.best_epoch == 0
    assert stopper.stopped_epoch == (1 if patience == 1 else None)
    for key, value in model.state_dict().items():
        assert torch.equal(value, snapshots.states[0][key]), key
    assert not torch.equal(snapshots.states[0]["0.weight"], snapshots.states[-1]["0.weight"])


def test_monitoring_an_unlogged_key_is_an_error_before_training(digits):
    x, y, *_ = digits
    model = _model().compile("sgd", lr=0.01)
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="EarlyStopping: monitor is 'val_loss', which fit will not log"):
        model.fit(x, y, epochs=2, callbacks=[api.EarlyStopping()], verbose=0)
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters()))  # stopped before the first step


@pytest.mark.parametrize("kwargs, message", [(dict(min_delta=float("nan")), "min_delta must be a finite number"),
                                             (dict(min_delta="0.1"), "min_delta must be a finite number"),
                                             (dict(patience=True), "patience must be a non-negative int"),
                                             (dict(patience=-1), "patience must be a non-negative int")])
def test_early_stopping_refuses_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        api.EarlyStopping(**kwargs)


def test_model_checkpoint_writes_loadable_models(tmp_path, digits):
    x, y, x_val, y_val = digits
    model = _model().compile("adam", "cross_entropy", ["accuracy"], lr=1e-2)
    every = api.ModelCheckpoint(tmp_path / "epoch{epoch:02d}")
    best = api.ModelCheckpoint(tmp_path / "best", monitor="val_accuracy", save_best_only=True)
    history = model.fit(x, y, epochs=3, validation_data=(x_val, y_val), callbacks=[every, best], verbose=0, seed=0)
    assert [p.name for p in every.saved_paths] == ["epoch01", "epoch02", "epoch03"]
    assert torch.equal(api.load(tmp_path / "epoch03").predict(x_val), model.predict(x_val))
    best_accuracy = max(history.history["val_accuracy"])
    reloaded = api.load(tmp_path / "best").compile(metrics=["accuracy"])
    assert reloaded.evaluate(x_val, y_val)["accuracy"] == pytest.approx(best_accuracy)


def test_a_best_checkpoint_is_not_overwritten_by_a_worse_later_fit(tmp_path, digits):
    """save_best_only keeps its best over every fit it is given to: a second fit at a ruinous learning rate used
    to start from +inf again and overwrite the best model with its first, worse, epoch."""
    x, y, x_val, y_val = digits
    model = _model().compile("adam", "cross_entropy", ["accuracy"], lr=1e-2)
    best = api.ModelCheckpoint(tmp_path / "best", save_best_only=True)
    first = model.fit(x, y, epochs=2, validation_data=(x_val, y_val), callbacks=[best], verbose=0, seed=0)
    model.compile("sgd", "cross_entropy", ["accuracy"], lr=50.0)
    second = model.fit(x, y, epochs=1, validation_data=(x_val, y_val), callbacks=[best], verbose=0, seed=0)
    assert second.history["val_loss"][0] > min(first.history["val_loss"])  # the later fit is worse
    reloaded = api.load(tmp_path / "best").compile(loss="cross_entropy")
    assert reloaded.evaluate(x_val, y_val)["loss"] == pytest.approx(min(first.history["val_loss"]), rel=1e-5)


@pytest.mark.parametrize(
    "checkpoint, message",
    [
        (dict(path="ck/{val_loss:.2f}"), r"path '.*ck/\{val_loss:.2f\}' uses 'val_loss', which fit will not log \(val_\* "
                                          r"keys need validation_data or validation_split\); logged keys: "
                                          r"\['epoch', 'loss', 'accuracy', 'lr'\]"),
        (dict(path="ck/{epoch}-{top_5_accuracy}"), "uses 'top_5_accuracy', which fit will not log"),
        (dict(path="ck/best", monitor="val_accuracy", save_best_only=True), "monitor is 'val_accuracy'"),
    ],
)
def test_model_checkpoint_names_a_missing_metric_before_training(tmp_path, digits, checkpoint, message):
    x, y, *_ = digits
    model = _model().compile("sgd", "cross_entropy", ["accuracy"], lr=0.1)
    before = [p.clone() for p in model.parameters()]
    checkpoint["path"] = tmp_path / checkpoint["path"]
    with pytest.raises(ValueError, match=message):
        model.fit(x, y, epochs=2, callbacks=[api.ModelCheckpoint(**checkpoint)], verbose=0)
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters()))  # stopped before the first step
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("path, message", [("ck/{}", "placeholders must name a logged key"),
                                           ("ck/{0}", "placeholders must name a logged key"),
                                           ("ck/{loss", "not a valid format string"),
                                           ("ck/{epoch:zz}", "not a valid format string for the logged numbers"),
                                           ("ck/{loss.real.x}", "not a valid format string for the logged numbers")])
def test_model_checkpoint_rejects_malformed_paths(path, message):
    with pytest.raises(ValueError, match=message):
        api.ModelCheckpoint(path)


def test_model_checkpoint_path_may_use_any_logged_key(tmp_path, digits):
    x, y, x_val, y_val = digits
    model = _model().compile("sgd", "cross_entropy", ["accuracy"], lr=0.1)
    saver = api.ModelCheckpoint(tmp_path / "e{epoch}-{loss:.1f}-{val_accuracy:.2f}-{lr}")
    history = model.fit(x, y, epochs=1, validation_data=(x_val, y_val), callbacks=[saver], verbose=0)
    logs = {key: values[0] for key, values in history.history.items()}
    assert [p.name for p in saver.saved_paths] == [f"e1-{logs['loss']:.1f}-{logs['val_accuracy']:.2f}-{logs['lr']}"]


def test_csv_logger_rows_match_history(tmp_path, digits):
    x, y, x_val, y_val = digits
    model = _model().compile("adam", "cross_entropy", ["accuracy"])
    history = model.fit(x, y, epochs=3, validation_data=(x_val, y_val), verbose=0,
                        callbacks=[api.CSVLogger(tmp_path / "logs" / "train.csv")])
    with open(tmp_path / "logs" / "train.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
    for key, values in history.history.items():
        assert [float(r[key]) for r in rows] == values
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == ["train.csv"]  # no temporary files left


@pytest.mark.parametrize("make, where, message", [
    (lambda d: api.CSVLogger(d / "afile" / "log.csv"), "afile", r"CSVLogger: '.*afile' is not a directory"),
    (lambda d: api.CSVLogger(d / "adir"), "adir", r"CSVLogger: '.*adir' is a directory; expected the path of a file"),
    (lambda d: api.ModelCheckpoint(d / "afile"), "afile", r"ModelCheckpoint: path '.*afile' exists and is not a dreidel"),
    (lambda d: api.ModelCheckpoint(d / "afile" / "e{epoch}"), "afile", r"ModelCheckpoint: '.*afile' is not a directory"),
    (lambda d: api.ModelCheckpoint(d / "adir"), "adir", r"ModelCheckpoint: path '.*adir' exists and is not a dreidel"),
])
def test_callbacks_refuse_a_path_they_cannot_write_before_training(tmp_path, digits, make, where, message):
    """Such paths used to fail after the first epoch had trained, some naming a hidden temporary file."""
    (tmp_path / "afile").write_text("not a directory")
    (tmp_path / "adir").mkdir()
    (tmp_path / "adir" / "notes.txt").write_text("someone's data")
    x, y, x_val, y_val = digits
    model = _model().compile("sgd", lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=message):
        model.fit(x, y, epochs=1, validation_data=(x_val, y_val), callbacks=[make(tmp_path)], verbose=0)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "afile"]
    assert (tmp_path / "afile").read_text() == "not a directory" and (tmp_path / "adir" / "notes.txt").exists()


@pytest.mark.parametrize("make", [lambda d: api.CSVLogger(d / "log.csv"), lambda d: api.ModelCheckpoint(d / "best"),
                                  lambda d: api.ModelCheckpoint(d / "runs" / "e{epoch}")],
                         ids=["CSVLogger", "ModelCheckpoint", "ModelCheckpoint-pattern"])
def test_callbacks_refuse_a_folder_they_may_not_write_in_before_training(locked_folder, digits, make):
    """A review: these trained an epoch, then failed with a PermissionError naming a hidden staging name."""
    x, y, x_val, y_val = digits
    model = _model().compile("sgd", lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(PermissionError, match=r"(CSVLogger|ModelCheckpoint): no permission to write in folder "
                                              r"'.*locked', so nothing can be written at '.*locked/"):
        model.fit(x, y, epochs=1, validation_data=(x_val, y_val), callbacks=[make(locked_folder)], verbose=0)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    with pytest.raises(PermissionError, match=r"no permission to write in folder '.*locked', so nothing can be "
                                              r"written at '.*locked/m'"):
        model.save(locked_folder / "m")
    assert list(locked_folder.iterdir()) == []


def test_history_plot_onto_a_directory_names_it(tmp_path, digits):
    x, y, *_ = digits
    history = _model().compile("sgd", lr=0.1).fit(x, y, epochs=1, verbose=0)
    with pytest.raises(ValueError, match=r"'.*plots' is a directory; expected the path of a file"):
        history.plot((tmp_path / "plots").mkdir() or tmp_path / "plots")
    assert [p.name for p in (tmp_path / "plots").iterdir()] == []


def test_learning_rate_scheduler_sets_every_group(digits):
    x, y, *_ = digits
    model = _model()
    optimizer = torch.optim.SGD([{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 9.0}], lr=1.0)
    model.compile(optimizer)
    history = model.fit(x, y, epochs=3, verbose=0, callbacks=[api.LearningRateScheduler(lambda epoch, lr: 0.1 * 0.5**epoch)])
    assert history.history["lr"] == [0.1, 0.05, 0.025]
    assert [group["lr"] for group in optimizer.param_groups] == [0.025, 0.025]
    with pytest.raises(ValueError, match="invalid learning rate"):
        model.fit(x, y, verbose=0, callbacks=[api.LearningRateScheduler(lambda epoch, lr: float("nan"))])


def test_history_plot_writes_a_png(tmp_path, digits):
    x, y, x_val, y_val = digits
    model = _model().compile("adam", "cross_entropy", ["accuracy"])
    history = model.fit(x, y, epochs=2, validation_data=(x_val, y_val), verbose=0)
    path = history.plot(tmp_path / "plots" / "history.png")
    assert path == tmp_path / "plots" / "history.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="history is empty"):
        api.History().plot(tmp_path / "empty.png")


class _Saves:
    """Stands in for a model: records where ModelCheckpoint saves it."""

    stop_training = False

    def __init__(self) -> None:
        self.saved: list[str] = []

    def save(self, path) -> None:
        self.saved.append(str(path))

    def state_dict(self) -> dict:
        return {}


@pytest.mark.parametrize("mode, values, best", [("min", [math.nan, 3.0, 2.0, math.nan], 2.0),
                                                ("max", [math.nan, 0.5, 0.7, math.nan], 0.7)])
def test_a_nan_monitored_value_never_counts_as_an_improvement(tmp_path, mode, values, best):
    """A first NaN used to become ``best``, and nothing compares better than NaN: no save or improvement again."""
    model = _Saves()
    checkpoint = api.ModelCheckpoint(tmp_path / "e{epoch}", monitor="m", save_best_only=True, mode=mode)
    stopper = api.EarlyStopping(monitor="m", patience=2, mode=mode)
    for callback in (checkpoint, stopper):
        callback.on_train_begin(model)
    for epoch, value in enumerate(values):
        for callback in (checkpoint, stopper):
            callback.on_epoch_end(model, epoch, {"m": value})
    assert model.saved == [str(tmp_path / "e2"), str(tmp_path / "e3")]
    assert checkpoint.best == stopper.best == best and stopper.best_epoch == 2 and stopper.stopped_epoch is None


def test_a_permission_error_the_os_raises_keeps_its_path_when_a_callback_names_itself():
    from dreidel.api.callbacks import _naming_callback

    named = _naming_callback(PermissionError(13, "Permission denied", "/data/secret/sub/log.csv"), "CSVLogger")
    assert isinstance(named, PermissionError) and named.errno == 13
    assert str(named) == "[Errno 13] CSVLogger: Permission denied: '/data/secret/sub/log.csv'"


def _small_problem():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, generator=generator)
    return x, (x[:, 0] > 0).long()


def test_csv_logger_with_append_keeps_the_rows_of_the_run_it_resumes(tmp_path):
    """Each fit rewrote the file from its own rows only: resuming with initial_epoch lost the first run's rows
    (a user audit). append=True (Keras's name) keeps them; an epoch logged again replaces its row."""
    x, y = _small_problem()
    path = tmp_path / "log.csv"
    model = api.Sequential(nn.Linear(6, 2)).compile("sgd", metrics=["accuracy"], lr=0.1)
    model.fit(x, y, epochs=3, verbose=0, callbacks=[api.CSVLogger(path)])
    model.fit(x, y, epochs=5, initial_epoch=2, verbose=0, validation_data=(x, y),
              callbacks=[api.CSVLogger(path, append=True)])
    with open(path, newline="") as file:
        rows = list(csv.DictReader(file))
    assert [row["epoch"] for row in rows] == ["0", "1", "2", "3", "4"]
    assert rows[0]["val_loss"] == "" and rows[4]["val_loss"] != ""  # validation came with the second run
    model.fit(x, y, epochs=1, verbose=0, callbacks=[api.CSVLogger(path)])  # without append: afresh
    with open(path, newline="") as file:
        assert [row["epoch"] for row in csv.DictReader(file)] == ["0"]
    for text in ("not,a,log\n1,2,3\n", "loss,epoch\n0.7,0\n0.6\n", "epoch,loss\n0,0.7,extra\n"):
        path.write_text(text)  # no epoch column; a short row; a long row
        with pytest.raises(ValueError, match="is not a CSV log with an 'epoch' column"):
            model.fit(x, y, epochs=1, verbose=0, callbacks=[api.CSVLogger(path, append=True)])
    path.write_bytes(b"epoch,loss\n0,\xe9\n")  # not UTF-8
    with pytest.raises(ValueError, match="is not a CSV log"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[api.CSVLogger(path, append=True)])


def test_csv_logger_append_drops_the_rows_a_resumed_run_supersedes(tmp_path):
    """A resume from epoch 2 that stopped after epoch 3 left the old run's rows 4 and 5 after them: epochs
    0, 1, 4, 5, 2, 3 in the file (a review). A spreadsheet's byte-order mark is read past."""
    x, y = _small_problem()
    path = tmp_path / "log.csv"
    model = api.Sequential(nn.Linear(6, 2)).compile("sgd", lr=0.1)
    model.fit(x, y, epochs=6, verbose=0, callbacks=[api.CSVLogger(path)])
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    model.fit(x, y, epochs=4, initial_epoch=2, verbose=0, callbacks=[api.CSVLogger(path, append=True)])
    with open(path, newline="") as file:
        assert [row["epoch"] for row in csv.DictReader(file)] == ["0", "1", "2", "3"]


@pytest.mark.parametrize("make", [
    lambda: api.EarlyStopping(monitor="val_f1"),
    lambda: api.ModelCheckpoint("ckpt", monitor="auc", save_best_only=True),
])
def test_auto_mode_asks_for_the_direction_of_a_key_it_does_not_know(make):
    """mode='auto' minimised every key without 'accuracy' in its name: a custom f1 or auc stopped early on
    improvement and kept the worst checkpoint (a user audit). Keras 3 refuses to guess too."""
    with pytest.raises(ValueError, match="mode='auto' cannot tell whether .* should fall or rise"):
        make()
    assert api.EarlyStopping(monitor="val_f1", mode="max")._improves(0.9, 0.8, 0.0)
    api.ModelCheckpoint("ckpt", monitor="auc")  # not compared without save_best_only
    with pytest.raises(ValueError, match="cannot tell"):  # names matched whole, not by substring (a review)
        api.EarlyStopping(monitor="inaccuracy")
    assert api.EarlyStopping(monitor="val_top_5_accuracy")._improves(0.9, 0.8, 0.0)
    assert api.EarlyStopping(monitor="val_kl_loss")._improves(0.1, 0.2, 0.0)


@pytest.mark.parametrize("make, error, message", [
    (lambda: api.callbacks.ModelCheckpoint(None), TypeError, "path: expected a str or os.PathLike, got NoneType"),
    (lambda: api.callbacks.ModelCheckpoint("ckpt", save_best_only="False"), TypeError,
     r"save_best_only: expected a bool .* got str 'False'"),
    (lambda: api.callbacks.EarlyStopping(restore_best_weights="no"), TypeError,
     r"restore_best_weights: expected a bool .* got str 'no'"),
    (lambda: api.callbacks.EarlyStopping(monitor=None), TypeError,
     "monitor: expected the name of a logged value such as 'val_loss', got None"),
])
def test_callback_arguments_are_checked_by_name(make, error, message, tmp_path, monkeypatch):
    """ModelCheckpoint(None) wrote a checkpoint to ./None; the string 'False' turned save_best_only on."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(error, match=message):
        make()


@pytest.mark.parametrize("returned", [True, None, "0.1", torch.tensor(True), torch.zeros(2)])
def test_a_schedule_returning_no_learning_rate_is_named(returned):
    """True became a learning rate of 1.0; None a bare float() TypeError."""
    model = api.Sequential(nn.Linear(4, 2)).compile("sgd", lr=0.1)
    schedule = api.callbacks.LearningRateScheduler(lambda epoch, lr: returned)
    with pytest.raises(TypeError, match=f"schedule: expected a learning rate \\(a float\\) back at epoch 0, got "
                                        f"{type(returned).__name__}"):
        model.fit(torch.randn(8, 4), torch.randint(0, 2, (8,)), callbacks=[schedule], verbose=0)
    assert model.optimizer.param_groups[0]["lr"] == 0.1


@pytest.mark.parametrize("returned", [np.float32(0.25), np.where(True, 0.25, 0.5), torch.tensor(0.25), 1])
def test_a_schedule_may_return_numpy_and_torch_numbers(returned):
    """np.where(...) gives a 0-d array; it was refused for a while."""
    model = api.Sequential(nn.Linear(4, 2)).compile("sgd", lr=0.1)
    schedule = api.callbacks.LearningRateScheduler(lambda epoch, lr: returned)
    model.fit(torch.randn(8, 4), torch.randint(0, 2, (8,)), callbacks=[schedule], verbose=0)
    assert model.optimizer.param_groups[0]["lr"] == float(returned)
