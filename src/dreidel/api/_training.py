"""The loops behind ``Sequential.fit`` / ``evaluate``: one epoch of training, one pass of evaluation.

Training step, the contract shared with ``dreidel.optim``::

    optimizer.zero_grad()
    loss = loss_fn(model(x), y)
    loss.backward()
    optimizer.step(closure)   # CurvatureOptimizer: closure() re-evaluates the loss on the same batch
    optimizer.step()          # any other optimizer (torch's own would run an extra forward with a closure)
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from dreidel.api._batches import BatchSource, check_targets, targets_like
from dreidel.api.metrics import metric_name
from dreidel.optim import CurvatureOptimizer

__all__ = ["RunningMeans", "evaluate_pass", "progress_enabled", "train_epoch"]


def progress_enabled(verbose: int) -> bool:
    """Progress bars only when asked for and when stderr is a terminal (not in logs, CI or tests)."""
    return verbose > 0 and sys.stderr.isatty()


@dataclass
class RunningMeans:
    """Sample-weighted means of the loss and metrics over the batches seen so far."""

    names: list[str]
    totals: dict[str, float] = field(default_factory=dict)
    samples: int = 0

    def add(self, values: dict[str, float], batch_samples: int) -> None:
        for name, value in values.items():
            self.totals[name] = self.totals.get(name, 0.0) + value * batch_samples
        self.samples += batch_samples

    def means(self, prefix: str = "") -> dict[str, float]:
        if self.samples == 0:
            raise ValueError("no batches: the data is empty")
        return {prefix + name: self.totals[name] / self.samples for name in self.names}


def _forward(model: nn.Module, x: torch.Tensor, where: str) -> torch.Tensor:
    """``model(x)`` in training, torch's refusal to normalise one value per channel (BatchNorm on a batch of one
    sample, without spatial positions) named with the batch and what to change."""
    try:
        return model(x)
    except ValueError as error:
        if "Expected more than 1 value per channel" not in str(error):
            raise
        raise ValueError(f"x: {where} holds {x.shape[0]} sample(s), too few for the model's BatchNorm to normalise in "
                         "training (it needs more than one value per channel): give a DataLoader drop_last=True, or "
                         f"a batch_size that leaves no batch of one ({error})") from error


def _checked_loss(loss: torch.Tensor, where: str) -> torch.Tensor:
    """The loss function's value, which must be a scalar tensor (``ValueError`` naming ``where`` otherwise)."""
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        got = f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"loss: the loss function returned {got} at {where}, expected a scalar tensor (reduce it, "
                         "e.g. with .mean())")
    return loss


def _batch_metrics(loss_value: float, metrics: list, output: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    values = {"loss": loss_value}
    for metric in metrics:
        values[metric_name(metric)] = float(metric(output, target))
    return values


def train_epoch(
    model: nn.Module,
    source: BatchSource,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable,
    metrics: list,
    epoch: int,
    check_input: Callable[[torch.Tensor, str], None],
    shuffle: bool,
    generator: torch.Generator | None,
    verbose: int,
    description: str,
) -> dict[str, float]:
    """One pass over ``source`` with an optimizer step per batch; returns the epoch's mean loss and metrics."""
    model.train()
    uses_closure = isinstance(optimizer, CurvatureOptimizer)
    running = RunningMeans(["loss"] + [metric_name(m) for m in metrics])
    bar = tqdm(total=source.num_samples, desc=description, unit="sample", disable=not progress_enabled(verbose),
               leave=True, dynamic_ncols=True)
    start = time.perf_counter()
    try:
        for batch_index, (x, y) in enumerate(source.batches(shuffle, generator)):
            where = f"epoch {epoch + 1}, batch {batch_index + 1}"
            check_input(x, where)
            optimizer.zero_grad()
            output = _forward(model, x, where)
            y = targets_like(y, output)
            check_targets(loss_fn, output, y, where)
            loss = _checked_loss(loss_fn(output, y), where)
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise RuntimeError(f"the loss became {loss_value} at {where}; stopping before the optimizer step "
                                   "(lower the learning rate, or check the inputs for NaN/inf)")
            loss.backward()
            if uses_closure:
                def closure(x=x, y=y) -> torch.Tensor:
                    with torch.enable_grad():
                        return loss_fn(model(x), y)
                optimizer.step(closure)
            else:
                optimizer.step()
            with torch.no_grad():
                running.add(_batch_metrics(loss_value, metrics, output.detach(), y), x.shape[0])
            bar.update(x.shape[0])
            elapsed = time.perf_counter() - start
            bar.set_postfix({**{k: f"{v:.4f}" for k, v in running.means().items()},
                             "samples/s": f"{running.samples / max(elapsed, 1e-9):.0f}"}, refresh=False)
    finally:
        bar.close()
    return running.means()


def evaluate_pass(
    model: nn.Module,
    source: BatchSource,
    loss_fn: Callable,
    metrics: list,
    check_input: Callable[[torch.Tensor, str], None],
    prefix: str = "",
) -> dict[str, float]:
    """Mean loss and metrics over ``source`` in eval mode without gradients (keys prefixed with ``prefix``)."""
    was_training = model.training
    model.eval()
    running = RunningMeans(["loss"] + [metric_name(m) for m in metrics])
    try:
        with torch.no_grad():
            for batch_index, (x, y) in enumerate(source.batches(False, None)):
                where = f"evaluation batch {batch_index + 1}"
                check_input(x, where)
                output = model(x)
                y = targets_like(y, output)
                check_targets(loss_fn, output, y, where)
                running.add(_batch_metrics(_checked_loss(loss_fn(output, y), where).item(), metrics, output, y),
                            x.shape[0])
    finally:
        model.train(was_training)
    return running.means(prefix)
