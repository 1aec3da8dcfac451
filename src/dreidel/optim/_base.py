"""Shared base of dreidel's curvature optimizers: the closure contract and name-checked state dicts."""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

Closure = Callable[[], torch.Tensor]


class CurvatureOptimizer(torch.optim.Optimizer):
    """Base class of optimizers that may re-evaluate the loss on curvature-refresh steps.

    Training-step contract (what ``dreidel.Sequential.fit`` and any hand-written loop must do)::

        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step(closure)

    ``closure()`` re-evaluates the loss **on the same batch** with gradients enabled and returns the
    scalar loss tensor **without** calling ``backward`` on it. The optimizer calls it only on
    steps that need it (a Hutchinson Hessian-vector product, a sampled-label Fisher backward, a
    Levenberg-Marquardt damping check), so on most steps it costs nothing. Subclasses say in
    ``closure_required(step)`` whether the coming step will call it; a step that needs a closure and
    got none raises ``ValueError``. ``zero_grad()`` also drops the layer inputs recorded by forward
    passes since the previous step (e.g. a validation pass run with grad enabled).

    The loss is assumed to be a mean over the batch (``reduction="mean"``), which fixes the scale
    of the curvature estimates.

    ``state_dict()`` also records every parameter's name and shape; ``load_state_dict`` compares
    them and raises ``ValueError`` naming the first parameter that does not match.
    """

    def __init__(self, params: Iterable, defaults: dict, names: list[str] | None = None) -> None:
        super().__init__(params, defaults)
        all_params = [p for group in self.param_groups for p in group["params"]]
        if names is None:
            names = [
                f"param_groups[{g}].params[{i}]"
                for g, group in enumerate(self.param_groups)
                for i in range(len(group["params"]))
            ]
        if len(names) != len(all_params):
            raise ValueError(f"names: expected {len(all_params)} names, got {len(names)}")
        self._param_names: dict[torch.Tensor, str] = dict(zip(all_params, names))

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Also forgets layer inputs recorded since the last step (the contract starts a step here)."""
        capture = self._capture_or_none()
        if capture is not None:
            capture.clear()
        super().zero_grad(set_to_none)

    def _capture_or_none(self):
        """The subclass's activation capture, if it has one."""
        return None

    def closure_required(self, step: int) -> bool:
        """Whether step number ``step`` (0-based) calls the closure. Subclasses override."""
        return False

    @staticmethod
    def _check_closure(closure: Closure | None, why: str) -> Closure:
        if closure is None:
            raise ValueError(
                f"closure: this step needs a closure that re-evaluates the loss on the same batch ({why}); "
                "call optimizer.step(closure) with closure() returning the loss, without backward"
            )
        return closure

    def _param_signature(self) -> list[list]:
        return [
            [self._param_names[p], list(p.shape)] for group in self.param_groups for p in group["params"]
        ]

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["param_signature"] = self._param_signature()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        theirs = state_dict.pop("param_signature", None)
        if theirs is None:
            raise ValueError("state_dict: missing 'param_signature' (not saved by a dreidel optimizer)")
        ours = self._param_signature()
        for (our_name, our_shape), (their_name, their_shape) in zip(ours, theirs):
            if our_name != their_name or our_shape != list(their_shape):
                raise ValueError(
                    f"state_dict: parameter mismatch at {our_name!r} (shape {our_shape}): "
                    f"the saved state has {their_name!r} (shape {list(their_shape)})"
                )
        if len(ours) != len(theirs):
            first = ours[len(theirs)][0] if len(ours) > len(theirs) else theirs[len(ours)][0]
            raise ValueError(
                f"state_dict: {len(theirs)} saved parameters but {len(ours)} here; first unmatched: {first!r}"
            )
        super().load_state_dict(state_dict)


def named_trainable_parameters(model: nn.Module) -> tuple[list[str], list[nn.Parameter]]:
    """Names and parameters of ``model`` that require grad; lazy (uninitialised) ones are refused."""
    names, params = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if nn.parameter.is_lazy(p):
            raise ValueError(
                f"model: parameter {name!r} is not initialised yet (lazy); run one forward pass first"
            )
        names.append(name)
        params.append(p)
    return names, params
