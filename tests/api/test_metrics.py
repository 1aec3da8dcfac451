"""Accuracy and top-k accuracy against a numpy computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dreidel.api.metrics import Accuracy, TopKAccuracy, metric_name, resolve_metric


def _numpy_top_k(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
    ranked = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return float(np.mean([label in row for row, label in zip(ranked, labels)]))


@pytest.mark.parametrize("k", [1, 2, 3, 7])
def test_top_k_against_numpy(k):
    generator = torch.Generator().manual_seed(k)
    scores = torch.randn(200, 7, generator=generator)
    labels = torch.randint(0, 7, (200,), generator=generator)
    expected = _numpy_top_k(scores.numpy(), labels.numpy(), k)
    assert TopKAccuracy(k)(scores, labels) == pytest.approx(expected, abs=1e-7)
    if k == 7:
        assert expected == 1.0


def test_accuracy_and_probability_targets():
    scores = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    labels = torch.tensor([1, 1, 1, 0])
    assert Accuracy()(scores, labels) == pytest.approx(0.75)
    one_hot = torch.nn.functional.one_hot(labels, 2).float()
    assert Accuracy()(scores, one_hot) == pytest.approx(0.75)


def test_resolve_metric_names():
    assert metric_name(resolve_metric("accuracy")) == "accuracy"
    assert resolve_metric("top_5").k == 5 and metric_name(resolve_metric("top_3_accuracy")) == "top_3_accuracy"

    def recall_of_zero(output, target):
        return 0.0

    assert metric_name(resolve_metric(recall_of_zero)) == "recall_of_zero"
    with pytest.raises(ValueError, match="unknown metric 'f1'"):
        resolve_metric("f1")
    with pytest.raises(ValueError, match="k=5 exceeds"):
        TopKAccuracy(5)(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))


def test_accuracy_refuses_a_single_output():
    """The arg-max of one output is always 0: every sample counted as right (1.0 for all-wrong predictions)."""
    with pytest.raises(ValueError, match="C >= 2"):
        Accuracy()(torch.tensor([[0.9], [0.1]]), torch.tensor([[0.0], [1.0]]))


def test_accuracy_is_an_exact_fraction():
    output = torch.zeros(1000, 2)
    output[:931, 1] = 1.0
    assert Accuracy()(output, torch.ones(1000, dtype=torch.long)) == 0.931  # a float32 mean gave 0.93099999...


def test_labels_as_a_column_and_ties_count_like_sklearn():
    """(N, 1) integer labels used to be arg-maxed over their one column (always class 0: accuracy 0.705 for a
    true 0.32); equal outputs were ranked as topk ranks them (index 8 of 10 first), so a model with a constant
    head scored 0.0 where argmax and scikit-learn give 1.0."""
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(100, 4, generator=generator)
    labels = torch.randint(0, 4, (100,), generator=generator)
    expected = _numpy_top_k(scores.numpy(), labels.numpy(), 1)
    assert Accuracy()(scores, labels.unsqueeze(1)) == pytest.approx(expected)
    tied = torch.zeros(6, 10)
    assert Accuracy()(tied, torch.zeros(6, dtype=torch.long)) == 1.0
    assert TopKAccuracy(3)(tied, torch.full((6,), 2)) == 1.0 and TopKAccuracy(3)(tied, torch.full((6,), 3)) == 0.0
    with pytest.raises(ValueError, match=r"targets of shape \(100, 3\) are neither labels nor scores"):
        Accuracy()(scores, torch.rand(100, 3, generator=generator))


@pytest.mark.parametrize("output, target, message", [
    (torch.randn(16), torch.randint(0, 2, (16,)), r"needs class scores \(B, C\) with C >= 2, got outputs of shape \(16,\)"),
    (torch.randn(4, 4, 3), torch.randint(0, 3, (4,)), r"labels of shape \(4,\) do not match the outputs \(4, 4, 3\)"),
])
def test_accuracy_refuses_outputs_and_labels_that_do_not_pair(output, target, message):
    """A (B,) output was ranked over the batch (each batch one sample), and (B,) labels broadcast against
    (B, T, C) outputs where B == T: silent nonsense (a user audit)."""
    with pytest.raises(ValueError, match=message):
        resolve_metric("accuracy")(output, target)


def test_top_k_refuses_a_bool_k():
    with pytest.raises(ValueError, match="k must be a positive int, got True"):
        TopKAccuracy(True)
