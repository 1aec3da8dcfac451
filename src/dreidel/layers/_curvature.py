"""The one protocol through which layers hand curvature information to dreidel's optimizers.

A module that knows the per-sample gradients of its own parameters cheaply (from its input and the
gradient at its output, both of which exist after an ordinary forward/backward) implements
``per_sample_grads``. Optimizers (``dreidel.optim``) use it to build exact diagonal Gauss-Newton /
Fisher estimates (sum over the batch of squared per-sample gradients) without ``isinstance`` chains.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class PerSampleGradients(Protocol):
    def per_sample_grads(
        self, inputs: tuple[torch.Tensor, ...], grad_output: torch.Tensor
    ) -> dict[nn.Parameter, torch.Tensor]:
        """Per-sample gradients of this module's own parameters.

        Args:
            inputs: the positional inputs of the forward call; ``inputs[0]`` has shape ``(B, ..., in)``.
            grad_output: gradient of the loss w.r.t. the module's output, shape ``(B, ..., out)``.

        Returns:
            for each parameter ``p``, a tensor of shape ``(B, *p.shape)`` whose sum over the first
            dimension equals ``p.grad`` for that batch (dimensions between batch and features are summed).
        """
        ...
