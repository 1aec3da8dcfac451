"""Batch iteration for ``Sequential``: in-memory tensors or a DataLoader, plus the per-batch input checks."""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Sized
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from dreidel.api.losses import CrossEntropy, KLDivergence, MeanSquaredError

__all__ = ["BatchSource", "as_tensor", "check_targets", "make_source"]


def as_tensor(value, name: str) -> torch.Tensor:
    """``value`` (tensor or numpy array) as a tensor, float arrays as float32; ``name`` is used in errors."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        tensor = torch.from_numpy(np.ascontiguousarray(value))
        if tensor.is_floating_point():
            return tensor.float()
        return tensor.long() if tensor.dtype != torch.bool else tensor
    raise TypeError(f"{name} must be a torch.Tensor, a numpy array or (for x) a DataLoader, got {type(value).__name__}")


@dataclass
class BatchSource:
    """Where batches come from: in-memory ``x`` ``(N, ...)`` / ``y`` ``(N, ...)``, or a DataLoader of pairs."""

    x: torch.Tensor | None = None
    y: torch.Tensor | None = None
    loader: DataLoader | None = None
    batch_size: int = 32

    @property
    def num_samples(self) -> int | None:
        if self.loader is None:
            return self.x.shape[0]
        return len(self.loader.dataset) if isinstance(self.loader.dataset, Sized) else None

    def first_input(self) -> torch.Tensor:
        """One input batch ``(b, ...)`` to build lazy layers from, without advancing a loader's shuffling RNG."""
        if self.loader is None:
            return self.x[:1]
        dataset = self.loader.dataset
        if isinstance(dataset, IterableDataset):
            return next(self.batches(False, None))[0]
        sample = dataset[0]
        return (sample[0] if isinstance(sample, (tuple, list)) else sample).unsqueeze(0)

    def batches(self, shuffle: bool, generator: torch.Generator | None) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        if self.loader is not None:
            for batch in self.loader:
                if isinstance(batch, (tuple, list)):
                    yield batch[0], (batch[1] if len(batch) > 1 else None)
                else:
                    yield batch, None
            return
        n = self.x.shape[0]
        order = torch.randperm(n, generator=generator) if shuffle else None
        for start in range(0, n, self.batch_size):
            index = slice(start, start + self.batch_size) if order is None else order[start : start + self.batch_size]
            yield self.x[index], (None if self.y is None else self.y[index])


def make_source(x, y, batch_size: int, need_targets: bool) -> BatchSource:
    """Validate the ``x``/``y``/``batch_size`` arguments of fit/evaluate/predict and wrap them."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if isinstance(x, DataLoader):
        if y is not None:
            raise ValueError("y must be None when x is a DataLoader (the loader yields (x, y) pairs)")
        return BatchSource(loader=x)
    x = as_tensor(x, "x")
    if x.dim() < 2:
        raise ValueError(f"x must have shape (N, features...), got shape {tuple(x.shape)}")
    if y is None:
        if need_targets:
            raise ValueError("y is required when x is a tensor or array")
        return BatchSource(x=x, batch_size=batch_size)
    y = as_tensor(y, "y")
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"x and y must have the same number of samples, got {x.shape[0]} and {y.shape[0]}")
    return BatchSource(x=x, y=y, batch_size=batch_size)


def check_targets(loss, output: torch.Tensor, target: torch.Tensor | None, where: str) -> None:
    """Cheap per-batch checks that ``target`` suits ``loss`` and ``output`` ``(B, C)``; ``where`` names the batch."""
    if target is None:
        raise ValueError(f"y: {where} has no targets (a DataLoader must yield (x, y) pairs)")
    if isinstance(loss, (MeanSquaredError, KLDivergence)) and target.shape != output.shape:
        raise ValueError(f"y: {loss.name} expects targets shaped like the output {tuple(output.shape)}, "
                         f"got {tuple(target.shape)} in {where}")
    if not isinstance(loss, CrossEntropy):
        return
    if target.is_floating_point():
        if target.shape != output.shape:
            raise ValueError(
                f"y: cross_entropy takes int64 class indices (B,) or probabilities shaped like the output "
                f"{tuple(output.shape)}; got float targets of shape {tuple(target.shape)} in {where}"
            )
        return
    if target.dtype != torch.int64 or target.shape != output.shape[:1]:
        raise ValueError(f"y: cross_entropy expects int64 class indices of shape ({output.shape[0]},), "
                         f"got {target.dtype} of shape {tuple(target.shape)} in {where}")
    low, high = int(target.min()), int(target.max())
    classes = output.shape[-1]
    if low < 0 or high >= classes:
        raise ValueError(f"y: labels must lie in [0, {classes - 1}] (the model has {classes} outputs), "
                         f"got labels from {low} to {high} in {where}")
