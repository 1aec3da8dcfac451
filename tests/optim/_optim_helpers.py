"""Shared by the optimizer tests: the standard training step of the CurvatureOptimizer contract."""

from __future__ import annotations

import copy
from typing import Callable

import torch

from dreidel.optim import CurvatureOptimizer


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Callable, x, y) -> float:
    """``zero_grad; loss.backward(); step(closure)`` exactly as ``Sequential.fit`` does it."""

    def closure() -> torch.Tensor:
        return loss_fn(model(x), y)

    optimizer.zero_grad()
    loss = closure()
    loss.backward()
    if isinstance(optimizer, CurvatureOptimizer):
        optimizer.step(closure)
    else:
        optimizer.step()
    return float(loss.detach())


def brute_force_per_sample_grads(model, loss_fn, x, y, params) -> list[torch.Tensor]:
    """Per-sample gradients of the batch-mean loss by a loop over samples: ``(B, *p.shape)`` each."""
    batch = x.shape[0]
    rows = []
    for i in range(batch):
        loss_i = loss_fn(model(x[i : i + 1]), y[i : i + 1]) / batch
        rows.append(torch.autograd.grad(loss_i, params))
    return [torch.stack([r[k] for r in rows]) for k in range(len(params))]


def resumed_copy(make_model: Callable, make_optimizer: Callable, model, optimizer):
    """A fresh model and optimizer loaded from ``model``'s and ``optimizer``'s state dicts (deep copies, as if
    read from disk): ``(model, optimizer)``."""
    saved_model, saved_optimizer = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    resumed = make_model()
    resumed.load_state_dict(saved_model)
    resumed_optimizer = make_optimizer(resumed)
    resumed_optimizer.load_state_dict(saved_optimizer)
    return resumed, resumed_optimizer
