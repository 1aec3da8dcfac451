"""Batch iteration for ``Sequential``: in-memory tensors or a DataLoader, plus the per-batch input checks."""

from __future__ import annotations

import operator
import warnings

from dataclasses import dataclass
from collections.abc import Sized
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from dreidel.api.losses import CrossEntropy, KLDivergence, MeanSquaredError

__all__ = ["BatchSource", "as_tensor", "check_targets", "make_source", "split_batch", "targets_like"]


def as_tensor(value, name: str) -> torch.Tensor:
    """``value`` (tensor or numpy array) as a tensor; integer arrays as int64, float arrays keep their dtype
    (``BatchSource`` casts floating inputs to the model's dtype per batch); ``name`` is used in errors."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        with warnings.catch_warnings():  # a read-only array (np.load(mmap_mode="r")) is shared, not copied whole:
            # BatchSource copies each batch of it instead (copy_batches), so torch's warning does not apply
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
            tensor = torch.from_numpy(np.ascontiguousarray(value))
        if tensor.is_floating_point():
            return tensor
        return tensor.long() if tensor.dtype != torch.bool else tensor
    raise TypeError(f"{name} must be a torch.Tensor, a numpy array or (for x) a DataLoader, got {type(value).__name__}")


def split_batch(batch, where: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A DataLoader batch as ``(x, y)``: a tensor ``x``, or a tuple/list ``(x,)`` or ``(x, y)`` of tensors."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and len(batch) in (1, 2) and all(isinstance(t, torch.Tensor) for t in batch):
        return batch[0], (batch[1] if len(batch) == 2 else None)
    if isinstance(batch, dict):
        got = f"a dict with keys {sorted(map(str, batch))}"
    elif isinstance(batch, (tuple, list)):
        got = f"a {type(batch).__name__} of {len(batch)} ({', '.join(type(t).__name__ for t in batch)})"
    else:
        got = f"a {type(batch).__name__}"
    raise TypeError(f"x: the DataLoader yielded {got} as {where}; fit, evaluate and predict take batches that are "
                    "a tensor x, or a tuple/list (x, y) or (x,) of tensors (map other structures to (x, y) in the "
                    "dataset or a collate_fn)")


@dataclass
class BatchSource:
    """Where batches come from: in-memory ``x`` ``(N, ...)`` / ``y`` ``(N, ...)``, or a DataLoader of pairs.

    Floating-point ``x`` batches are yielded cast to ``dtype`` (the model's) when it is set, and copied where
    ``copy_batches`` (``x`` shares a read-only array, which an in-place first layer would write). With
    ``no_single_last``, in-memory samples that would leave a last batch of one sample go with the batch before
    it instead (BatchNorm over features cannot train on one sample: its batch statistics need two).
    """

    x: torch.Tensor | None = None
    y: torch.Tensor | None = None
    loader: DataLoader | None = None
    batch_size: int = 32
    dtype: torch.dtype | None = None
    device: torch.device | None = None
    no_single_last: bool = False
    copy_batches: bool = False

    def _cast(self, x: torch.Tensor) -> torch.Tensor:
        """A batch of inputs on the model's device, floating ones in its dtype (a copy where ``copy_batches``)."""
        dtype = self.dtype if self.dtype is not None and x.is_floating_point() else x.dtype
        cast = x.to(device=self.device if self.device is not None else x.device, dtype=dtype)
        return cast.clone() if self.copy_batches and cast.data_ptr() == x.data_ptr() else cast

    @property
    def num_samples(self) -> int | None:
        if self.loader is None:
            return self.x.shape[0]
        return len(self.loader.dataset) if isinstance(self.loader.dataset, Sized) else None

    def check_not_empty(self, where: str) -> None:
        """``ValueError`` naming ``where`` (``"x"``, ``"validation_data"``) when this source would give no batch,
        so that ``fit`` refuses it before training starts. An iterable dataset is known only by iterating it."""
        if self.loader is None:
            if self.x.shape[0] == 0:
                raise ValueError(f"{where} has no samples")
            return
        dataset = self.loader.dataset
        if isinstance(dataset, IterableDataset) or not isinstance(dataset, Sized):
            return
        if len(dataset) == 0:
            raise ValueError(f"{where}: the DataLoader's dataset is empty")
        if len(self.loader) == 0:
            dropped = (f": its {len(dataset)} samples are fewer than batch_size={self.loader.batch_size} and it has "
                       "drop_last=True" if self.loader.drop_last else "")
            raise ValueError(f"{where}: the DataLoader gives no batches{dropped}")

    def first_input(self) -> torch.Tensor:
        """The first input batch ``(b, ...)`` as the model will see it (through the loader's ``collate_fn``),
        to build lazy layers from, without advancing a loader's shuffling RNG."""
        if self.loader is None:
            return self.x[:1]
        loader, dataset = self.loader, self.loader.dataset
        if isinstance(dataset, IterableDataset) or not isinstance(dataset, Sized):
            first = next(self.batches(False, None), None)
            if first is None:
                raise ValueError("x: the DataLoader yields no batches")
            return first[0]
        if len(dataset) == 0:
            raise ValueError("x: the DataLoader's dataset is empty")
        if loader.batch_sampler is None:  # automatic batching off: the collate_fn sees one sample at a time
            batch = loader.collate_fn(dataset[0])
        else:  # the first batch of the unshuffled order (one sample for a custom batch_sampler), collated as
            # the loader collates every batch
            size = min(loader.batch_size or 1, len(dataset))
            batch = loader.collate_fn([dataset[i] for i in range(size)])
        return split_batch(batch, "the first batch")[0]

    def batches(self, shuffle: bool, generator: torch.Generator | None) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        if self.loader is not None:
            for index, batch in enumerate(self.loader):
                x, y = split_batch(batch, f"batch {index + 1}")
                yield self._cast(x), y
            return
        n = self.x.shape[0]
        order = torch.randperm(n, generator=generator) if shuffle else None
        starts = list(range(0, n, self.batch_size))
        if self.no_single_last and len(starts) > 1 and n - starts[-1] == 1:
            starts.pop()  # the last sample joins the batch before it
        for start, end in zip(starts, [*starts[1:], n]):
            index = slice(start, end) if order is None else order[start:end]
            yield self._cast(self.x[index]), (None if self.y is None else self.y[index])


def int_at_least(value, name: str, minimum: int = 1) -> int:
    """``value`` as an int if it is an integer of any integral type (a NumPy integer too) of at least ``minimum``
    (positive by default), else ``ValueError`` naming ``name`` (a bool is refused)."""
    try:
        number = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        number = None
    if number is None or number < minimum:
        kind = "a positive int" if minimum == 1 else "a non-negative int" if minimum == 0 else f"an int >= {minimum}"
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    return number


def make_source(x, y, batch_size: int, need_targets: bool, dtype: torch.dtype | None = None,
                device: torch.device | None = None, names: tuple[str, str] = ("x", "y"),
                no_single_last: bool = False) -> BatchSource:
    """Validate the ``x``/``y``/``batch_size`` arguments of fit/evaluate/predict and wrap them (``x`` batches
    moved to ``device``, floating ones cast to ``dtype``; ``no_single_last`` as in ``BatchSource``). ``names``:
    what errors call ``x`` and ``y`` (``("validation_data[0]", "validation_data[1]")``)."""
    x_name, y_name = names
    batch_size = int_at_least(batch_size, "batch_size")
    if isinstance(x, DataLoader):
        if y is not None:
            raise ValueError(f"{y_name} must be None when {x_name} is a DataLoader (the loader yields (x, y) pairs)")
        return BatchSource(loader=x, dtype=dtype, device=device)
    read_only = isinstance(x, np.ndarray) and not x.flags.writeable
    x = as_tensor(x, x_name)
    if x.dim() < 2:
        raise ValueError(f"{x_name} must have shape (N, features...), got shape {tuple(x.shape)}")
    if y is None:
        if need_targets:
            raise ValueError(f"{y_name} is required when {x_name} is a tensor or array")
        return BatchSource(x=x, batch_size=batch_size, dtype=dtype, device=device, no_single_last=no_single_last,
                           copy_batches=read_only)
    y = as_tensor(y, y_name)
    if y.dim() == 0 or y.shape[0] != x.shape[0]:
        raise ValueError(f"{x_name} and {y_name} must have the same number of samples, got {x.shape[0]} and "
                         f"{y.shape[0] if y.dim() else 'a scalar'}")
    return BatchSource(x=x, y=y, batch_size=batch_size, dtype=dtype, device=device, no_single_last=no_single_last,
                       copy_batches=read_only)


def targets_like(target: torch.Tensor | None, output: torch.Tensor) -> torch.Tensor | None:
    """Targets on the output's device, floating-point ones in its dtype (missing targets as they are)."""
    if target is None:
        return None
    return target.to(device=output.device, dtype=output.dtype if target.is_floating_point() else target.dtype)


# How far a row of probabilities may sum from 1: soft labels rounded to two decimals ([.33, .33, .33]) and the
# rounding of a softmax (a few eps in any dtype, for any class count) stay within it; logits and multi-hot rows
# are far outside.
_PROBABILITY_SUM_TOLERANCE = 0.02


def _rows_are_distributions(target: torch.Tensor) -> bool:
    """Whether every row (last dimension) of floating ``target`` is non-negative and sums to 1, within
    ``_PROBABILITY_SUM_TOLERANCE`` (False for NaN or infinite values). Cheap enough for every batch: the minimum
    first (logits stop there), then a float32 sum."""
    if target.numel() == 0 or not bool(target.min() >= 0):
        return False
    sums = target.sum(dim=-1, dtype=torch.float32)
    return bool(((sums - 1).abs() <= _PROBABILITY_SUM_TOLERANCE).all())


def check_targets(loss, output: torch.Tensor, target: torch.Tensor | None, where: str) -> None:
    """Cheap per-batch checks that ``target`` suits ``loss`` and ``output`` ``(B, C)``; ``where`` names the batch."""
    if target is None:
        raise ValueError(f"y: {where} has no targets (a DataLoader must yield (x, y) pairs)")
    if isinstance(loss, (MeanSquaredError, KLDivergence)) and target.shape != output.shape:
        raise ValueError(f"y: {loss.name} expects targets shaped like the output {tuple(output.shape)}, "
                         f"got {tuple(target.shape)} in {where}")
    if isinstance(loss, KLDivergence) and target.is_floating_point() and _rows_are_distributions(target):
        raise ValueError(f"y: kl_divergence takes the teacher's logits, but every target row in {where} is "
                         "non-negative and sums to 1, as probabilities do (softmaxed again, they would flatten): "
                         "pass the teacher's logits, or the probabilities' log, with zeros kept finite "
                         "(p.clamp_min(torch.finfo(p.dtype).tiny).log())")
    if not isinstance(loss, CrossEntropy):
        return
    if output.dim() != 2:  # torch would take dimension 1 as the classes: (B, 1, C) against (B,) labels failed deep
        raise ValueError(f"cross_entropy takes the model's output as logits (B, C), one row per sample; the model "
                         f"gives {tuple(output.shape[1:])} per sample: end it with a layer that gives (C,), e.g. "
                         f"nn.Flatten() before the last Linear")
    if target.is_floating_point():
        if target.shape != output.shape:
            raise ValueError(
                f"y: cross_entropy takes int64 class indices (B,) or probabilities shaped like the output "
                f"{tuple(output.shape)}; got float targets of shape {tuple(target.shape)} in {where}"
            )
        if target.numel() and not _rows_are_distributions(target):
            sums = target.sum(dim=-1)
            raise ValueError(
                f"y: cross_entropy's float targets are class probabilities, each row non-negative and summing to "
                f"1; in {where} they range from {float(target.min()):.4g} to {float(target.max()):.4g}, rows "
                f"summing to {float(sums.min()):.4g} to {float(sums.max()):.4g}. A teacher's logits go with "
                "'kl_divergence', several labels per sample with a binary loss (a callable such as "
                "torch.nn.BCEWithLogitsLoss())"
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
