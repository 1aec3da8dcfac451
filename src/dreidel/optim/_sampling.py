"""Random output-space vectors whose covariance is the loss Hessian at the model output.

Backpropagating such a vector ``v`` through the network gives a gradient ``g = J^T v`` with
``E[g g^T] = J^T H J``, the Gauss-Newton matrix (= Fisher for these likelihoods). This is the
"sampled labels from the model's predictive distribution" estimator of Martens & Grosse 2015
(arXiv:1503.05671, Sec. 5) and the Gauss-Newton-Bartlett estimator of Sophia-G (Liu et al. 2023,
arXiv:2305.14342), written directly in output space so that it matches the scale of a
mean-reduced loss:

- ``"categorical"`` (cross-entropy over the last axis, mean over the N leading positions):
  ``v = (softmax(z) - onehot(y_hat)) / sqrt(N)``, ``y_hat ~ softmax(z)``; ``E[v v^T] = (diag p - p p^T)/N``.
- ``"gaussian"`` (``F.mse_loss`` mean over all M elements): ``v = sqrt(2/M) * eps``, ``eps ~ N(0, I)``;
  ``E[v v^T] = (2/M) I``.
"""

from __future__ import annotations

import math

import torch

LIKELIHOODS = ("empirical", "categorical", "gaussian")


def check_likelihood(likelihood: str) -> str:
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"likelihood: expected one of {LIKELIHOODS}, got {likelihood!r}")
    return likelihood


def sample_output_vector(output: torch.Tensor, likelihood: str, generator: torch.Generator) -> torch.Tensor:
    """``v`` of ``output``'s shape and dtype with ``E[v v^T]`` = the output Hessian of the mean loss."""
    output = output.detach()
    if likelihood == "categorical":
        classes = output.shape[-1]
        probs = torch.softmax(output.reshape(-1, classes).double(), dim=-1)
        # Drawn where the generator lives (a CPU generator cannot draw on another device), then moved.
        labels = torch.multinomial(probs.to(generator.device), 1, generator=generator).squeeze(1).to(probs.device)
        one_hot = torch.nn.functional.one_hot(labels, classes).to(probs.dtype)
        v = (probs - one_hot) / math.sqrt(probs.shape[0])
        return v.to(output.dtype).reshape(output.shape)
    if likelihood == "gaussian":
        eps = torch.randn(output.shape, generator=generator, dtype=output.dtype, device=generator.device).to(output.device)
        return eps * math.sqrt(2.0 / output.numel())
    raise ValueError(f"likelihood: {likelihood!r} has no sampling distribution")
