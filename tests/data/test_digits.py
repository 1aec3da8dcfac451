"""8x8 digits loader: checked against scikit-learn's reader, split properties, determinism."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from dreidel.data import as_dataloader, load_digits, stratified_split
from dreidel.data import digits as digits_module


def test_shapes_dtypes_and_split_sizes():
    x_train, y_train = load_digits("train", seed=0)
    x_test, y_test = load_digits("test", seed=0)
    assert x_train.shape[1] == 64 and x_train.dtype == torch.float32 and y_train.dtype == torch.int64
    assert len(y_train) + len(y_test) == 1797
    assert (len(y_train), len(y_test)) == (1438, 359)  # 20 % of each class, rounded per class
    assert 0.0 <= float(x_train.min()) and float(x_train.max()) == 1.0


def test_matches_sklearn_and_is_stratified():
    from sklearn.datasets import load_digits as sklearn_load_digits

    oracle = sklearn_load_digits()
    x_train, y_train = load_digits("train", seed=2, as_tensors=False)
    x_test, y_test = load_digits("test", seed=2, as_tensors=False)
    ours = np.concatenate([np.concatenate([x_train, x_test]) * 16.0, np.concatenate([y_train, y_test])[:, None]], 1)
    theirs = np.concatenate([oracle.data, oracle.target[:, None]], 1)
    np.testing.assert_array_equal(ours[np.lexsort(ours.T[::-1])], np.rint(theirs[np.lexsort(theirs.T[::-1])]))
    class_counts = np.bincount(oracle.target)
    np.testing.assert_array_equal(np.bincount(y_test, minlength=10), np.rint(0.2 * class_counts).astype(int))


def test_seed_determinism():
    assert torch.equal(load_digits("test", seed=5)[1], load_digits("test", seed=5)[1])
    assert not torch.equal(load_digits("test", seed=5)[1], load_digits("test", seed=6)[1])


@pytest.mark.parametrize("test_fraction", [0.1, 0.25, 0.5])
def test_stratified_split_partitions_indices(test_fraction):
    labels = np.repeat(np.arange(4), [10, 20, 30, 40])
    train, test = stratified_split(labels, test_fraction, seed=0)
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(100))
    exact = test_fraction * np.array([10, 20, 30, 40])
    per_class = np.bincount(labels[test], minlength=4)
    assert per_class.sum() == round(test_fraction * 100)  # the fraction asked, whole
    assert np.all((per_class == np.floor(exact)) | (per_class == np.ceil(exact)))  # each class rounded down or up


def test_stratified_split_refuses_nan_labels():
    # NaN equals no label: its samples went to neither part (review)
    with pytest.raises(ValueError, match="2 NaN labels"):
        stratified_split(np.array([0.0, 0, 1, 1, np.nan, np.nan, 2, 2, 3, 3]), 0.5, seed=0)


def test_as_dataloader_reproducible_shuffle():
    x, y = torch.arange(20.0).reshape(10, 2), torch.arange(10)
    first = [b[1].tolist() for b in as_dataloader(x, y, 4, generator=torch.Generator().manual_seed(0))]
    again = [b[1].tolist() for b in as_dataloader(x, y, 4, generator=torch.Generator().manual_seed(0))]
    assert first == again and sorted(sum(first, [])) == list(range(10))
    with pytest.raises(ValueError, match="same number of samples"):
        as_dataloader(x, y[:5], 4)


def test_missing_sklearn_names_the_extra(monkeypatch):
    digits_module._read_digits.cache_clear()
    monkeypatch.setitem(sys.modules, "sklearn", None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install dreidel\[data\]"):
        load_digits()
    digits_module._read_digits.cache_clear()
