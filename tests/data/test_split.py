"""Argument checks of the shared split / DataLoader helpers, through the public loaders."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from dreidel.data import as_dataloader, load_digits, stratified_split


@pytest.mark.parametrize("seed", [None, -1, 1.5, "0", True, 2**64])
def test_seed_must_be_a_non_negative_int(seed):
    # None used to give a fresh random split on every call; the others failed inside numpy without naming `seed`.
    with pytest.raises(ValueError, match="seed must be an int"):
        load_digits("train", seed=seed)


def test_numpy_int_seed_and_batch_size_are_accepted():
    x, _ = load_digits("test", seed=np.int64(4))
    assert torch.equal(x, load_digits("test", seed=4)[0])
    loader = load_digits("test", seed=4, batch_size=np.int64(100))
    assert [len(y) for _, y in loader] == [100, 100, 100, 59]
    # a numpy seed passed the check, then manual_seed refused it
    numpy_seeded = [y for _, y in load_digits("train", seed=np.int64(4), batch_size=100)]
    int_seeded = [y for _, y in load_digits("train", seed=4, batch_size=100)]
    assert all(torch.equal(a, b) for a, b in zip(numpy_seeded, int_seeded, strict=True))


@pytest.mark.parametrize("batch_size", [0, True, 2.0])
def test_batch_size_must_be_a_positive_int(batch_size):
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        load_digits("train", batch_size=batch_size)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        as_dataloader(torch.zeros(4, 2), torch.zeros(4), batch_size)


@pytest.mark.parametrize("test_fraction", [0, 0.0, 1, 1.5, -0.2, True])
def test_stratified_split_rejects_fractions_outside_the_open_unit_interval(test_fraction):
    # 1.5 used to put every sample into the test part and 0 none, silently.
    with pytest.raises(ValueError, match="test_fraction must be a number in"):
        stratified_split(np.array([0, 1, 0, 1]), test_fraction, seed=0)


@pytest.mark.parametrize("test_fraction, expected", [(0.1, 5), (0.5, 25), (0.3, 15)])
def test_stratified_split_takes_the_fraction_asked_of_many_small_classes(test_fraction, expected):
    """5 samples in each of 10 classes: rounding each class alone gave no test sample at 0.1 and 20 at 0.5."""
    labels = np.repeat(np.arange(10), 5)
    train, test = stratified_split(labels, test_fraction, seed=0)
    assert len(test) == expected and len(train) == 50 - expected
    assert np.bincount(labels[test], minlength=10).max() <= np.ceil(test_fraction * 5)


@pytest.mark.parametrize("labels, test_fraction, message", [
    (np.array([[0, 1], [1, 0]]), 0.5, r"labels: expected an array of shape \(N,\), got shape \(2, 2\)"),
    (np.array([0, 1, 2]), 0.1, "leaves no test samples"),
    (np.array([0, 1, 2]), 0.9, "leaves no training samples"),
])
def test_stratified_split_refuses_labels_of_another_rank_and_empty_parts(labels, test_fraction, message):
    """2-D labels gave indices past the samples; a fraction too small for the data an empty test part."""
    with pytest.raises(ValueError, match=message):
        stratified_split(labels, test_fraction, seed=0)


def test_stratified_split_partitions_every_index_once():
    labels = np.repeat(np.arange(3), 10)
    train, test = stratified_split(labels, 0.2, seed=1)
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(30))
    assert np.bincount(labels[test]).tolist() == [2, 2, 2]


def test_numpy_numbers_and_read_only_arrays_are_taken():
    """np.float32 fractions were refused while np.float64 ones passed; a read-only array (a memory map) made
    torch warn that it is not writable."""
    labels = np.repeat(np.arange(4), 10)
    train, test = stratified_split(labels, np.float32(0.2), seed=0)
    assert len(test) == 8 and len(train) == 32
    x = np.zeros((8, 3), dtype=np.float32)
    x.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(as_dataloader(x, np.arange(8), batch_size=4)) == 2


def test_as_dataloader_refuses_scalars_by_name():
    with pytest.raises(ValueError, match="x must have a samples axis"):
        as_dataloader(np.float32(1.0), np.arange(1), batch_size=1)


@pytest.mark.parametrize("call, message", [
    (lambda: as_dataloader(np.zeros((4, 2)), np.zeros(4), 2, shuffle="no"), r"shuffle: expected a bool .* got str"),
    (lambda: as_dataloader(np.zeros((4, 2)), np.zeros(4), 2, generator=0),
     r"generator must be a torch.Generator or None .* got int"),
    (lambda: as_dataloader(None, np.zeros(4), 2), r"x: expected a tensor or array \(N, \.\.\.\), got NoneType"),
    (lambda: load_digits(as_tensors="no"), r"as_tensors: expected a bool .* got str 'no'"),
])
def test_flags_and_generators_are_checked_by_name(call, message):
    """'no' was taken as true: shuffled batches, tensors instead of arrays; generator=0 failed only when iterated."""
    with pytest.raises(TypeError, match=message):
        call()


def test_numpy_bools_are_flags_too():
    x, y = load_digits(as_tensors=np.bool_(False))
    assert isinstance(x, np.ndarray)
    batches = list(as_dataloader(np.arange(4.0)[:, None], np.arange(4), 2, shuffle=np.bool_(False)))
    assert torch.equal(batches[0][1], torch.tensor([0, 1]))
