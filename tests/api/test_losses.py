"""Losses against their textbook formulas written out in numpy float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dreidel.api.losses import CrossEntropy, KLDivergence, MeanSquaredError, resolve_loss


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


@pytest.fixture
def logits_and_labels():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(9, 5, generator=generator, dtype=torch.float64) * 3
    labels = torch.randint(0, 5, (9,), generator=generator)
    return logits, labels


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.5])
def test_cross_entropy_with_label_smoothing(logits_and_labels, smoothing):
    logits, labels = logits_and_labels
    classes = logits.shape[1]
    target = np.full((9, classes), smoothing / classes)
    target[np.arange(9), labels.numpy()] += 1 - smoothing
    expected = -(target * _log_softmax(logits.numpy())).sum(axis=1).mean()
    got = CrossEntropy(label_smoothing=smoothing)(logits, labels)
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.item(), expected, rtol=1e-12)


def test_cross_entropy_with_probability_targets(logits_and_labels):
    logits, _ = logits_and_labels
    probabilities = torch.softmax(torch.randn(9, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1)), -1)
    expected = -(probabilities.numpy() * _log_softmax(logits.numpy())).sum(axis=1).mean()
    np.testing.assert_allclose(CrossEntropy()(logits, probabilities).item(), expected, rtol=1e-12)


def test_mean_squared_error():
    generator = torch.Generator().manual_seed(2)
    output, target = torch.randn(6, 3, generator=generator, dtype=torch.float64), torch.randn(6, 3, generator=generator, dtype=torch.float64)
    np.testing.assert_allclose(MeanSquaredError()(output, target).item(), ((output - target).numpy() ** 2).mean(), rtol=1e-12)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_kl_divergence_distillation(logits_and_labels, temperature):
    student, _ = logits_and_labels
    teacher = torch.randn(9, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 2
    log_p_teacher = _log_softmax(teacher.numpy() / temperature)
    log_p_student = _log_softmax(student.numpy() / temperature)
    kl_per_sample = (np.exp(log_p_teacher) * (log_p_teacher - log_p_student)).sum(axis=1)
    expected = temperature**2 * kl_per_sample.mean()  # Hinton et al. 2015: T² keeps gradient scale
    np.testing.assert_allclose(KLDivergence(temperature)(student, teacher).item(), expected, rtol=1e-12)


def test_kl_divergence_is_zero_when_student_matches_teacher(logits_and_labels):
    logits, _ = logits_and_labels
    assert abs(KLDivergence(3.0)(logits, logits.clone()).item()) < 1e-14


def test_kl_gradient_scale_matches_hinton():
    """For large T the T²-scaled gradient approaches that of 0.5·mean-squared logit difference (zero-mean logits)."""
    generator = torch.Generator().manual_seed(4)
    student = torch.randn(4, 6, dtype=torch.float64, generator=generator)
    teacher = torch.randn(4, 6, dtype=torch.float64, generator=generator)
    student, teacher = student - student.mean(1, keepdim=True), teacher - teacher.mean(1, keepdim=True)
    student.requires_grad_(True)
    KLDivergence(temperature=1000.0)(student, teacher).backward()
    classes, batch = 6, 4
    expected = (student.detach() - teacher) / (classes * batch)
    assert (student.grad - expected).abs().max() < 1e-2 * expected.abs().max()


def test_resolve_loss():
    assert isinstance(resolve_loss("cross_entropy"), CrossEntropy)
    assert isinstance(resolve_loss("kl_divergence"), KLDivergence)
    custom = lambda output, target: (output - target).abs().mean()  # noqa: E731
    assert resolve_loss(custom) is custom
    with pytest.raises(ValueError, match="unknown loss 'hinge'"):
        resolve_loss("hinge")
    with pytest.raises(TypeError, match="loss must be"):
        resolve_loss(3)
    with pytest.raises(ValueError, match="label_smoothing"):
        CrossEntropy(label_smoothing=1.0)
    with pytest.raises(ValueError, match="temperature"):
        KLDivergence(temperature=0)


def test_kl_divergence_of_sequence_outputs_averages_over_positions():
    """(B, T, C) logits: the mean over the B·T rows (it was summed over T), as for (B·T, C)."""
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(3, 50, 7, generator=generator), torch.randn(3, 50, 7, generator=generator)
    loss = KLDivergence(temperature=2.0)
    torch.testing.assert_close(loss(student, teacher), loss(student.reshape(-1, 7), teacher.reshape(-1, 7)))


def test_kl_divergence_refuses_logits_of_two_shapes_and_an_infinite_temperature():
    # both were reshaped with the student's class count: a (6, 4) teacher for a (4, 6) student gave a number
    for student, teacher in ((torch.randn(4, 6), torch.randn(6, 4)), (torch.randn(2, 3, 4), torch.randn(3, 2, 4)),
                             (torch.randn(4, 6), torch.randn(4, 5))):
        with pytest.raises(ValueError, match=r"student and teacher logits must have one shape"):
            KLDivergence()(student, teacher)
    with pytest.raises(ValueError, match="temperature: expected a finite number, got inf"):
        KLDivergence(float("inf"))  # every call returned nan


@pytest.mark.parametrize("make, error, message", [
    (lambda: KLDivergence("2"), TypeError, "temperature: expected a real number, got str '2'"),
    (lambda: KLDivergence(0), ValueError, r"temperature: expected a number in \(0.0, inf\), got 0.0"),
    (lambda: CrossEntropy("0.1"), TypeError, "label_smoothing: expected a real number, got str '0.1'"),
    (lambda: CrossEntropy(1.0), ValueError, r"label_smoothing: expected a number in \[0.0, 1.0\), got 1.0"),
])
def test_loss_settings_are_checked_by_name(make, error, message):
    """Strings failed in a comparison with Python's own TypeError."""
    with pytest.raises(error, match=message):
        make()
