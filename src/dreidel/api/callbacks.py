"""Callbacks for ``Sequential.fit``: hooks called at the start/end of training and of each epoch.

The hooks receive the model (a ``dreidel.Sequential``) and, at epoch end, that epoch's logs (the keys of
``History``). A callback stops training by setting ``model.stop_training = True``.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import numbers
import os
import re
import string
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from dreidel._checks import check_flag
from dreidel._files import check_file_target, check_parents, replaced_atomically
from dreidel.io.checkpoint import check_checkpoint_target

__all__ = ["CSVLogger", "Callback", "EarlyStopping", "LearningRateScheduler", "ModelCheckpoint"]

logger = logging.getLogger(__name__)


class Callback:
    """Base class: override the hooks you need; each default does nothing."""

    def on_train_begin(self, model) -> None:
        pass

    def on_epoch_begin(self, model, epoch: int) -> None:
        pass

    def on_epoch_end(self, model, epoch: int, logs: dict[str, float]) -> None:
        pass

    def on_train_end(self, model) -> None:
        pass

    def check_log_keys(self, keys: list[str]) -> None:
        """Called by ``fit`` before training with the keys every epoch's logs will hold (and ``epoch``); raise
        a ``ValueError`` here for a key the callback needs that fit will not log."""


def _not_logged(owner: str, use: str, key: str, logged: list[str]) -> ValueError:
    """The error for a key a callback needs that fit will not log (before training: ``check_log_keys``)."""
    hint = " (val_* keys need validation_data or validation_split)" if key.startswith("val_") else ""
    return ValueError(f"{owner}: {use} {key!r}, which fit will not log{hint}; logged keys: {logged}")


def _monitored_value(logs: dict[str, float], monitor: str, owner: str) -> float:
    if monitor not in logs:
        raise ValueError(f"{owner}: monitor {monitor!r} is not logged; available: {sorted(logs)}")
    return logs[monitor]


def _check_monitor(monitor: object) -> None:
    """``monitor`` names a logged key: a non-empty str."""
    if not isinstance(monitor, str):
        raise TypeError(f"monitor: expected the name of a logged value such as 'val_loss', got {monitor!r:.40}")
    if not monitor:
        raise ValueError("monitor: expected the name of a logged value such as 'val_loss', got ''")


def _learning_rate(returned: object, epoch: int) -> float:
    """What a schedule returned, as a float: a real number, or a one-element array or tensor of a real dtype
    (``np.where(...)`` gives a 0-d array); ``TypeError`` for anything else, bools included (True was a rate of
    1.0)."""
    if isinstance(returned, torch.Tensor):
        if returned.numel() == 1 and not (returned.dtype.is_complex or returned.dtype == torch.bool):
            return float(returned.reshape(()))
    elif isinstance(returned, np.ndarray):
        if returned.size == 1 and returned.dtype.kind in "iuf":
            return float(returned.reshape(()))
    elif isinstance(returned, numbers.Real) and not isinstance(returned, (bool, np.bool_)):
        return float(returned)
    raise TypeError(f"schedule: expected a learning rate (a float) back at epoch {epoch}, got "
                    f"{type(returned).__name__} {returned!r:.40}")


def _improves(mode: str, monitor: str) -> tuple[Callable[[float, float, float], bool], float]:
    """``(improves(current, best, min_delta), worst)`` for ``mode`` in min/max/auto. ``"auto"``: max for
    ``accuracy`` or a name ending ``_accuracy``, min for ``loss`` or one ending ``_loss`` (``val_`` left aside),
    and for any other a ``ValueError`` asking for the mode,
    as Keras 3 does (a custom ``f1`` or ``auc`` was minimised: early stops on improvement, checkpoints of the
    worst epoch).

    ``best`` starts at ``worst`` (+inf, or -inf for max), as in Keras, so that the first value improves on it
    unless it is NaN: a NaN compares false, so it never counts as an improvement (nor becomes ``best``).
    """
    if mode not in ("auto", "min", "max"):
        raise ValueError(f"mode must be 'auto', 'min' or 'max', got {mode!r}")
    name = monitor.removeprefix("val_")
    accuracy = name == "accuracy" or name.endswith("_accuracy")  # top_5_accuracy too
    if mode == "auto" and not accuracy and not (name == "loss" or name.endswith("_loss")):
        raise ValueError(f"mode='auto' cannot tell whether {monitor!r} should fall or rise (it knows losses and "
                         "accuracies): pass mode='min' or mode='max'")
    if mode == "max" or (mode == "auto" and accuracy):
        return (lambda current, best, delta: current > best + delta), -math.inf
    return (lambda current, best, delta: current < best - delta), math.inf


class EarlyStopping(Callback):
    """Stop when ``monitor`` has not improved by more than ``min_delta`` for ``patience`` epochs.

    With ``restore_best_weights`` the model gets back the weights of its best epoch when training ends: when
    this callback stops it, and also when it runs all its epochs or another callback stops it (Keras restores
    only on its own early stop, leaving a run that ends on a worse epoch with that epoch's weights). ``best``
    is the best value so far (+inf, or -inf in max mode, until one improves on it: a NaN never does) and
    ``best_epoch`` its epoch; ``stopped_epoch`` is the epoch after which this callback stopped training (None
    if it did not). ``mode``: ``"min"``, ``"max"`` or ``"auto"`` (max for ``accuracy`` and ``*_accuracy``, min
    for ``loss`` and ``*_loss``, ``val_`` aside; any other key needs ``mode``, a ``ValueError`` says so).
    """

    def __init__(self, monitor: str = "val_loss", patience: int = 0, min_delta: float = 0.0, mode: str = "auto",
                 restore_best_weights: bool = False) -> None:
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
            raise ValueError(f"patience must be a non-negative int, got {patience!r}")
        if isinstance(min_delta, bool) or not isinstance(min_delta, numbers.Real) or not math.isfinite(min_delta):
            raise ValueError(f"min_delta must be a finite number, got {min_delta!r}")
        _check_monitor(monitor)
        self.monitor, self.patience, self.min_delta = monitor, patience, abs(float(min_delta))
        self.restore_best_weights = check_flag("restore_best_weights", restore_best_weights)
        self._improves, self._worst = _improves(mode, monitor)
        self.best = self._worst
        self.best_epoch: int | None = None
        self.stopped_epoch: int | None = None
        self._wait = 0
        self._best_state: dict[str, torch.Tensor] | None = None
        self._last_epoch: int | None = None

    def check_log_keys(self, keys: list[str]) -> None:
        if self.monitor not in keys:
            raise _not_logged("EarlyStopping", "monitor is", self.monitor, keys)

    def on_train_begin(self, model) -> None:
        self.best, self.best_epoch, self.stopped_epoch, self._wait, self._best_state = self._worst, None, None, 0, None
        self._last_epoch = None

    def on_epoch_end(self, model, epoch: int, logs: dict[str, float]) -> None:
        self._last_epoch = epoch
        current = _monitored_value(logs, self.monitor, "EarlyStopping")
        if self._improves(current, self.best, self.min_delta):
            self.best, self.best_epoch, self._wait = current, epoch, 0
            if self.restore_best_weights:
                self._best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            return
        self._wait += 1
        if self._wait >= self.patience:
            self.stopped_epoch = epoch
            model.stop_training = True
            logger.info("EarlyStopping: %s did not improve for %d epochs; stopping after epoch %d",
                        self.monitor, self._wait, epoch)

    def on_train_end(self, model) -> None:
        if self._best_state is not None and self.best_epoch != self._last_epoch:
            model.load_state_dict(self._best_state)


class ModelCheckpoint(Callback):
    """Save the model (``model.save``) at the end of every epoch, or only when ``monitor`` improves.

    ``path`` may contain ``{epoch}`` (1-based) and any logged key, e.g. ``"ckpt/e{epoch:02d}-{val_loss:.3f}"``.
    With ``save_best_only``, ``best`` is the best value saved so far, over every ``fit`` the callback is given to
    (+inf, or -inf in max mode, before the first save; as Keras keeps it), so a later fit never overwrites a
    better checkpoint; a NaN never counts as an improvement. ``mode`` as for ``EarlyStopping`` (used only with
    ``save_best_only``).
    """

    def __init__(self, path: str | os.PathLike, monitor: str = "val_loss", save_best_only: bool = False,
                 mode: str = "auto") -> None:
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path: expected a str or os.PathLike, got {type(path).__name__}")
        _check_monitor(monitor)
        self.path = os.fspath(path)
        if isinstance(self.path, bytes):
            raise TypeError("path: expected a str or os.PathLike of str, got bytes")
        self.monitor, self.save_best_only = monitor, check_flag("save_best_only", save_best_only)
        # Without save_best_only the monitor is not compared: any key will do with "auto"
        self._improves, self._worst = _improves("min" if mode == "auto" and not save_best_only else mode, monitor)
        self.best = self._worst
        self.saved_paths: list[Path] = []
        try:
            fields = [field for _, field, _, _ in string.Formatter().parse(self.path) if field is not None]
        except ValueError as error:
            raise ValueError(f"path {self.path!r} is not a valid format string: {error}") from error
        if "" in fields or any(field[0].isdigit() for field in fields if field):
            raise ValueError(f"path {self.path!r}: placeholders must name a logged key, e.g. {{epoch}} or {{val_loss}}")
        self._path_keys = list(dict.fromkeys(re.split(r"[.\[]", field, maxsplit=1)[0] for field in fields))
        try:  # a bad format spec ({epoch:zz}) would otherwise fail only after the first epoch's training
            self.path.format(**{key: 1 if key == "epoch" else 0.5 for key in self._path_keys})
        except (ValueError, KeyError, IndexError, AttributeError, TypeError) as error:
            raise ValueError(f"path {self.path!r} is not a valid format string for the logged numbers: "
                             f"{type(error).__name__}: {error}") from None

    def check_log_keys(self, keys: list[str]) -> None:
        needed = [key for key in self._path_keys if key != "epoch"]
        if self.save_best_only:
            needed.append(self.monitor)
        missing = [key for key in needed if key not in keys]
        if missing:
            use = f"path {self.path!r} uses" if missing[0] in self._path_keys else "monitor is"
            raise _not_logged("ModelCheckpoint", use, missing[0], ["epoch", *keys])

    def on_train_begin(self, model) -> None:
        """Checks the path before the first epoch trains (it used to fail only after it): the checkpoint itself
        where the path has no placeholders, else the directories above the first one it would write."""
        sample = Path(self.path.format(**{key: 1 if key == "epoch" else 0.5 for key in self._path_keys}))
        try:
            if self._path_keys:
                check_parents(sample)
            else:
                check_checkpoint_target(sample)
        except (ValueError, PermissionError) as error:
            raise _naming_callback(error, "ModelCheckpoint") from None

    def on_epoch_end(self, model, epoch: int, logs: dict[str, float]) -> None:
        if self.save_best_only:
            current = _monitored_value(logs, self.monitor, "ModelCheckpoint")
            if not self._improves(current, self.best, 0.0):
                return
            self.best = current
        target = Path(self.path.format(epoch=epoch + 1, **logs))
        model.save(target)
        self.saved_paths.append(target)


def _naming_callback(error: ValueError | PermissionError, callback: str) -> ValueError | PermissionError:
    """The same refusal of a path, its message starting with the callback's name (the path kept, where the OS
    gave it apart from the message)."""
    if isinstance(error, PermissionError):
        return PermissionError(error.errno, f"{callback}: {error.strerror}", error.filename)
    return ValueError(f"{callback}: {error}")


class CSVLogger(Callback):
    """Write one CSV row per epoch (``epoch`` then the logged keys); the file is rewritten atomically each epoch.

    With ``append`` (Keras's name), the rows already in the file are kept at the start of each ``fit``, up to
    the fit's first epoch: a run resumed with ``initial_epoch`` supersedes the old rows from there on. Without
    it each ``fit`` starts the file afresh.
    """

    def __init__(self, path: str | os.PathLike, append: bool = False) -> None:
        if not isinstance(append, bool):
            raise TypeError(f"append must be a bool, got {type(append).__name__}")
        self.path = Path(path)
        self.append = append
        self._rows: list[dict[str, object]] = []
        self._first_of_fit = True

    def on_train_begin(self, model) -> None:
        try:  # before the first epoch trains, not after it
            check_file_target(self.path)
        except (ValueError, PermissionError) as error:
            raise _naming_callback(error, "CSVLogger") from None
        self._rows = self._earlier_rows() if self.append else []
        self._first_of_fit = True

    def _earlier_rows(self) -> list[dict[str, object]]:
        """The rows of the file this logger writes, if there is one: a CSV log with an ``epoch`` column."""
        if not self.path.is_file():
            return []
        refusal = (f"CSVLogger: {self.path} is not a CSV log with an 'epoch' column of epoch numbers, so "
                   "append=True cannot go on with it")
        try:  # utf-8-sig: a byte-order mark (a spreadsheet's "CSV UTF-8") is not part of the first column's name
            with open(self.path, encoding="utf-8-sig", newline="") as file:
                reader = csv.DictReader(file)
                rows = list(reader)
        except (UnicodeDecodeError, csv.Error):
            raise ValueError(refusal) from None
        # a short row has None for the fields it lacks, a long one its extra fields under the key None
        if rows and (reader.fieldnames is None or "epoch" not in reader.fieldnames
                     or not all(None not in row and (row["epoch"] or "").isdigit() for row in rows)):
            raise ValueError(refusal)
        return [{**row, "epoch": int(row["epoch"])} for row in rows]

    def on_epoch_end(self, model, epoch: int, logs: dict[str, float]) -> None:
        if self._first_of_fit:  # a resumed run supersedes the old rows from its first epoch on
            self._rows = [row for row in self._rows if row["epoch"] < epoch]
            self._first_of_fit = False
        self._rows = [row for row in self._rows if row["epoch"] != epoch]
        self._rows.append({"epoch": epoch, **logs})
        columns = list(dict.fromkeys(key for row in self._rows for key in row))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, restval="", lineterminator="\n")
        writer.writeheader()
        writer.writerows(self._rows)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with replaced_atomically(self.path) as (handle, _):
            with os.fdopen(handle, "w", encoding="utf-8", newline="") as file:
                file.write(buffer.getvalue())


class LearningRateScheduler(Callback):
    """Set every parameter group's learning rate to ``schedule(epoch, lr)`` at the start of each epoch.

    ``epoch`` is 0-based and ``lr`` the current learning rate of the first parameter group.
    """

    def __init__(self, schedule: Callable[[int, float], float]) -> None:
        if not callable(schedule):
            raise TypeError(f"schedule must be a callable (epoch, lr) -> lr, got {type(schedule).__name__}")
        self.schedule = schedule

    def on_epoch_begin(self, model, epoch: int) -> None:
        optimizer = model.optimizer
        new_lr = _learning_rate(self.schedule(epoch, optimizer.param_groups[0]["lr"]), epoch)
        if not math.isfinite(new_lr) or new_lr < 0:
            raise ValueError(f"schedule returned an invalid learning rate {new_lr} at epoch {epoch}")
        for group in optimizer.param_groups:
            group["lr"] = new_lr
