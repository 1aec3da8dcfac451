"""Metrics for ``Sequential.compile``: each maps ``(output, target)`` to a batch mean (a Python float)."""

from __future__ import annotations

import re
import types

import torch

__all__ = ["Accuracy", "TopKAccuracy", "metric_name", "resolve_metric"]


def _class_indices(target: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """Class indices ``(B,)`` from integer labels ``(B,)`` or ``(B, 1)``, or from probability/logit targets shaped
    like the output ``(B, C)``; ``ValueError`` for other shapes (the arg-max of a ``(B, 1)`` column is always 0)."""
    if not target.is_floating_point() and target.dim() == output.dim() and target.shape[-1] == 1:
        return target.squeeze(-1)
    if target.dim() == output.dim():
        if target.shape != output.shape:
            raise ValueError(f"accuracy: targets of shape {tuple(target.shape)} are neither labels nor scores shaped "
                             f"like the outputs {tuple(output.shape)}")
        return target.argmax(dim=-1)
    if target.shape != output.shape[:-1]:  # broadcasting (B,) labels against (B, T) rows counted nonsense
        raise ValueError(f"accuracy: labels of shape {tuple(target.shape)} do not match the outputs "
                         f"{tuple(output.shape)}: expected labels {tuple(output.shape[:-1])} (or with a trailing 1), "
                         "or scores shaped like the outputs")
    return target


class TopKAccuracy:
    """Fraction of samples whose true class is among the ``k`` largest of the ``(B, C)`` outputs (``C >= 2``;
    equal outputs are ranked lowest index first, as ``argmax`` ranks them: scikit-learn's
    ``top_k_accuracy_score`` ranks ties highest index first, so on tied outputs the two differ)."""

    def __init__(self, k: int = 5) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        self.k = k
        self.name = "accuracy" if k == 1 else f"top_{k}_accuracy"

    def __call__(self, output: torch.Tensor, target: torch.Tensor) -> float:
        # The arg-max of one output is always 0 (every sample right), and a (B,) output's runs over the batch
        # (each batch counted as one sample)
        if output.dim() < 2 or output.shape[-1] < 2:
            raise ValueError(f"{self.name} needs class scores (B, C) with C >= 2, got outputs of shape "
                             f"{tuple(output.shape)}; for one output, pass a callable metric that thresholds it")
        if self.k > output.shape[-1]:
            raise ValueError(f"k={self.k} exceeds the number of classes {output.shape[-1]}")
        labels = _class_indices(target, output)
        # A stable sort, not topk: topk ranks equal outputs in no stated order (index 8 of 10 first, measured)
        top = output.sort(dim=-1, descending=True, stable=True).indices[..., : self.k]  # (B, k)
        hits = (top == labels.unsqueeze(-1)).any(dim=-1)
        return int(hits.sum()) / max(hits.numel(), 1)  # counted exactly: a float32 mean gave 0.9309999... for 0.931


class Accuracy(TopKAccuracy):
    """Fraction of samples whose arg-max output is the true class."""

    def __init__(self) -> None:
        super().__init__(k=1)


_TOP_K_NAME = re.compile(r"top_(\d+)(_accuracy)?")


def resolve_metric(metric) -> TopKAccuracy:
    """A metric from ``"accuracy"``, ``"top_k"`` / ``"top_k_accuracy"`` (e.g. ``"top_5"``) or a callable.

    A callable must take ``(output, target)`` and return a float; it is logged under its function name
    (or its class name for a callable object).
    """
    if isinstance(metric, str):
        if metric == "accuracy":
            return Accuracy()
        match = _TOP_K_NAME.fullmatch(metric)
        if match:
            return TopKAccuracy(int(match.group(1)))
        raise ValueError(f"unknown metric {metric!r}; expected 'accuracy', 'top_<k>' or a callable")
    if callable(metric):
        return metric
    raise TypeError(f"metric must be a name or a callable, got {type(metric).__name__}")


def metric_name(metric) -> str:
    """The history key under which ``metric`` is logged."""
    if isinstance(metric, TopKAccuracy):
        return metric.name
    if isinstance(metric, types.FunctionType):
        return metric.__name__
    return type(metric).__name__
