"""Seeded stratified train/test splits and DataLoader wrapping shared by the bundled data sets."""

from __future__ import annotations

import numbers

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from dreidel._checks import check_flag, check_generator

__all__ = ["SPLITS", "as_dataloader", "select_split", "stratified_split"]

SPLITS = ("train", "test", "all")


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a stratified train/test split, each shuffled.

    The test part holds ``round(test_fraction * N)`` samples, shared among the classes by largest remainder
    (each class gives ``test_fraction * class_count`` rounded down or up), so class proportions match in both
    parts. The same ``seed`` always gives the same split. A split that leaves either part empty is refused.

    Args:
        labels: int array of shape ``(N,)`` (``ValueError`` for another rank).
        test_fraction: in (0, 1).
        seed: seed of the numpy ``Generator`` that draws the permutations.

    Returns:
        ``(train_indices, test_indices)``, int64 arrays that together hold every index once.
    """
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, numbers.Real) or not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be a number in (0, 1), got {test_fraction!r}")
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels: expected an array of shape (N,), got shape {labels.shape}")
    if labels.dtype.kind in "fc" and np.isnan(labels).any():  # NaN equals no label: those samples would vanish
        raise ValueError(f"labels: {int(np.isnan(labels).sum())} NaN labels; expected class labels")
    rng = np.random.default_rng(check_seed(seed))
    classes, counts = np.unique(labels, return_counts=True)
    # Each class's share of round(test_fraction * N) by largest remainder, so that the test part has that many
    # samples (rounding each class alone gave 20 of 50 at 0.5 with 5 per class, or none at 0.1).
    exact = test_fraction * counts
    n_tests = np.floor(exact).astype(np.int64)
    short = int(round(test_fraction * len(labels))) - int(n_tests.sum())
    n_tests[np.argsort(-(exact - n_tests), kind="stable")[:max(short, 0)]] += 1
    if n_tests.sum() == 0 or n_tests.sum() == len(labels):
        raise ValueError(f"test_fraction={test_fraction} of {len(labels)} samples leaves "
                         f"{'no test' if n_tests.sum() == 0 else 'no training'} samples")
    train_parts, test_parts = [], []
    for label, n_test in zip(classes, n_tests):
        members = rng.permutation(np.flatnonzero(labels == label))
        test_parts.append(members[:n_test])
        train_parts.append(members[n_test:])
    train = rng.permutation(np.concatenate(train_parts)).astype(np.int64)
    test = rng.permutation(np.concatenate(test_parts)).astype(np.int64)
    return train, test


def check_seed(seed: object) -> int:
    """``seed`` as a Python int, checked to be a non-negative int (numpy's too): ``None`` would silently draw a
    fresh, unreproducible split, and ``random.Random`` and ``manual_seed`` refuse numpy integers."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
    return int(seed)


def _check_batch_size(batch_size: object) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")


def select_split(
    features: np.ndarray,
    labels: np.ndarray,
    split: str,
    seed: int,
    test_fraction: float,
    as_tensors: bool,
    batch_size: int | None,
) -> tuple:
    """Pick one split of ``(features, labels)`` and convert it as the public loaders promise.

    ``split="all"`` returns every sample in a seeded shuffled order. With ``batch_size`` a DataLoader is
    returned (shuffled for ``"train"``/``"all"``, with a generator seeded by ``seed``).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    as_tensors = check_flag("as_tensors", as_tensors)
    if batch_size is not None:
        _check_batch_size(batch_size)
    seed = check_seed(seed)
    train, test = stratified_split(labels, test_fraction, seed)  # checks test_fraction
    if split == "train":
        index = train
    elif split == "test":
        index = test
    else:
        index = np.random.default_rng(seed).permutation(len(labels))
    x, y = features[index], labels[index].astype(np.int64)
    if batch_size is not None:
        generator = torch.Generator().manual_seed(seed)
        return as_dataloader(x, y, int(batch_size), shuffle=split != "test", generator=generator)
    if as_tensors:
        return torch.from_numpy(x), torch.from_numpy(y)
    return x, y


def _as_tensor(data, name: str) -> torch.Tensor:
    """``torch.as_tensor(data)``, or a ``TypeError`` naming ``name`` (None gave torch's "Could not infer dtype
    of NoneType")."""
    try:
        return torch.as_tensor(data)
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(f"{name}: expected a tensor or array (N, ...), got {type(data).__name__} ({error})") from None


def as_dataloader(
    x: torch.Tensor | np.ndarray,
    y: torch.Tensor | np.ndarray,
    batch_size: int,
    shuffle: bool = True,
    generator: torch.Generator | None = None,
) -> DataLoader:
    """Wrap in-memory ``x`` of shape ``(N, ...)`` and ``y`` of shape ``(N, ...)`` in a DataLoader.

    Shuffling draws from ``generator`` (pass a seeded one for reproducible epochs).
    """
    # A read-only array (np.load(mmap_mode="r"), say) is copied: torch.as_tensor would warn it is not writable.
    x, y = (_as_tensor(np.array(a) if isinstance(a, np.ndarray) and not a.flags.writeable else a, name)
            for a, name in ((x, "x"), (y, "y")))
    for name, t in (("x", x), ("y", y)):
        if t.dim() == 0:
            raise ValueError(f"{name} must have a samples axis (N, ...), got a scalar")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must have the same number of samples, got {x.shape[0]} and {y.shape[0]}")
    _check_batch_size(batch_size)
    shuffle = check_flag("shuffle", shuffle)
    check_generator("generator", generator)
    return DataLoader(TensorDataset(x, y), batch_size=int(batch_size), shuffle=shuffle, generator=generator)
