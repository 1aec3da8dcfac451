"""Losses for ``Sequential.compile``: each maps ``(output, target)`` to a scalar mean over the batch."""

from __future__ import annotations

from typing import Callable

import torch
from torch.nn import functional as F

from dreidel._checks import check_number

__all__ = ["LOSSES", "CrossEntropy", "KLDivergence", "MeanSquaredError", "resolve_loss"]


class CrossEntropy:
    """Softmax cross-entropy on logits ``(B, C)`` against class indices ``(B,)`` (int64) or probabilities ``(B, C)``.

    ``label_smoothing`` mixes the one-hot target with the uniform distribution (Szegedy et al. 2016,
    "Rethinking the Inception Architecture", arXiv:1512.00567): target = (1 - eps) * onehot + eps / C.
    """

    name = "cross_entropy"
    takes_class_indices = True

    def __init__(self, label_smoothing: float = 0.0) -> None:
        check_number("label_smoothing", label_smoothing, low=0.0, high=1.0, high_open=True)
        self.label_smoothing = float(label_smoothing)

    def __call__(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, target, label_smoothing=self.label_smoothing)


class MeanSquaredError:
    """Mean over all elements of ``(output - target)**2``; output and target have the same shape."""

    name = "mse"
    takes_class_indices = False

    def __call__(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(output, target)


class KLDivergence:
    """Distillation loss: T² · KL(softmax(teacher/T) ‖ softmax(student/T)), averaged over the rows.

    ``output`` are the student's logits ``(B, C)`` (or ``(B, T, C)``: every position is a row), ``target`` the
    teacher's logits of the same shape. The T² factor
    keeps gradient magnitudes comparable across temperatures (Hinton, Vinyals & Dean 2015,
    "Distilling the Knowledge in a Neural Network", arXiv:1503.02531).
    """

    name = "kl_divergence"
    takes_class_indices = False

    def __init__(self, temperature: float = 1.0) -> None:
        check_number("temperature", temperature, low=0.0, low_open=True)
        self.temperature = float(temperature)

    def __call__(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        if student_logits.shape != teacher_logits.shape:  # reshaped alike below, any mismatch would pair wrong rows
            raise ValueError(f"KLDivergence: student and teacher logits must have one shape, got "
                             f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
        t = self.temperature
        classes = student_logits.shape[-1]  # every leading position is a row: (B, T, C) averages over B·T
        student_log_probs = F.log_softmax(student_logits.reshape(-1, classes) / t, dim=-1)
        teacher_log_probs = F.log_softmax(teacher_logits.reshape(-1, classes) / t, dim=-1)
        kl = F.kl_div(student_log_probs, teacher_log_probs, reduction="batchmean", log_target=True)
        return kl * (t * t)


LOSSES: dict[str, Callable[[], Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]] = {
    "cross_entropy": CrossEntropy,
    "mse": MeanSquaredError,
    "kl_divergence": KLDivergence,
}


def resolve_loss(loss) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A loss from a name in ``LOSSES`` (default settings) or any callable ``(output, target) -> scalar``."""
    if isinstance(loss, str):
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; expected one of {sorted(LOSSES)} or a callable")
        return LOSSES[loss]()
    if callable(loss):
        return loss
    raise TypeError(f"loss must be a name or a callable (output, target) -> scalar, got {type(loss).__name__}")
