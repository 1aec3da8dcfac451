"""scikit-learn's 8x8 handwritten digits (1,797 samples, UCI optdigits test set), bundled with the wheel."""

from __future__ import annotations

import functools

import numpy as np

from dreidel.data._split import select_split

__all__ = ["load_digits"]

DIGITS_TEST_FRACTION = 0.2  # 1,438 train / 359 test, stratified (per-class rounding)


@functools.lru_cache(maxsize=1)
def _read_digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn import datasets
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            "load_digits reads the 8x8 digits from scikit-learn, which is not installed: pip install dreidel[data]"
        ) from error
    bunch = datasets.load_digits()
    pixels = (bunch.data / 16.0).astype(np.float32)  # (1797, 64) in [0, 1]; raw values are 0-16
    labels = bunch.target.astype(np.int64)  # (1797,)
    pixels.setflags(write=False)
    labels.setflags(write=False)
    return pixels, labels


def load_digits(
    split: str = "train",
    seed: int = 0,
    as_tensors: bool = True,
    batch_size: int | None = None,
):
    """Load the 8x8 digits, shuffled with ``seed`` and split 80 / 20 stratified by class.

    Args:
        split: ``"train"``, ``"test"`` or ``"all"`` (1,797, shuffled).
        seed: fixes the shuffle and the split; train and test of the same seed are disjoint.
        as_tensors: torch tensors if True, numpy arrays if False.
        batch_size: if given, return a DataLoader over the split instead (see ``load_mnist``).

    Returns:
        ``(x, y)``: ``x`` float32 of shape ``(N, 64)`` in [0, 1], ``y`` int64 of shape ``(N,)`` with labels 0-9;
        or a DataLoader yielding such batches.
    """
    pixels, labels = _read_digits()
    return select_split(pixels, labels, split, seed, DIGITS_TEST_FRACTION, as_tensors, batch_size)
