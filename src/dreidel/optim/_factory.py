"""``build_optimizer``: an optimizer from a name, an instance or a factory."""

from __future__ import annotations

from typing import Callable, Union

import torch
from torch import nn

from dreidel.optim._base import check_torch_options, named_model_parameters
from dreidel.optim._diagonal_newton import DiagonalNewton
from dreidel.optim._kfac import KFAC

OptimizerSpec = Union[str, torch.optim.Optimizer, Callable[[nn.Module], torch.optim.Optimizer]]
OPTIMIZER_NAMES = ("adam", "sgd", "diagonal_newton", "kfac")


def check_named_optimizer(name: str, kwargs: dict) -> None:
    """What can be checked of a named optimizer before the model is built: the name, and the options of torch's
    Adam and SGD (NaN passes their own "< 0" tests). DiagonalNewton and KFAC check theirs when built."""
    if name.lower() not in OPTIMIZER_NAMES:
        raise ValueError(f"spec: unknown optimizer {name!r}; expected one of {OPTIMIZER_NAMES}")
    if name.lower() in ("adam", "sgd"):
        check_torch_options(kwargs)


def build_optimizer(spec: OptimizerSpec, model: nn.Module, **kwargs) -> torch.optim.Optimizer:
    """An optimizer for ``model``'s trainable parameters.

    Args:
        spec: ``"adam"`` (torch Adam, lr 1e-3 unless given), ``"sgd"`` (torch SGD, lr 0.01 and
            momentum 0.9 unless given), ``"diagonal_newton"`` (``DiagonalNewton(model, **kwargs)``),
            ``"kfac"`` (``KFAC(model, **kwargs)``), an ``Optimizer`` instance (returned as is; kwargs
            must be empty) or a callable ``factory(model) -> Optimizer``.
        model: the module to train; its parameters must be initialised (run a forward pass on
            lazy modules first).
        kwargs: hyper-parameters passed to the named optimizer.
    """
    if isinstance(spec, torch.optim.Optimizer):
        if kwargs:
            raise ValueError(f"kwargs: an optimizer instance takes no extra arguments, got {sorted(kwargs)}")
        return spec
    if isinstance(spec, str):
        name = spec.lower()
        check_named_optimizer(name, kwargs)
        if name == "adam":
            return torch.optim.Adam(named_model_parameters(model)[1], **{"lr": 1e-3, **kwargs})
        if name == "sgd":
            options = {"lr": 0.01, "momentum": 0.9, **kwargs}
            return torch.optim.SGD(named_model_parameters(model)[1], **options)
        if name == "diagonal_newton":
            return DiagonalNewton(model, **kwargs)
        if name == "kfac":
            return KFAC(model, **kwargs)
        raise AssertionError(name)  # check_named_optimizer knows the names
    if isinstance(spec, type) and issubclass(spec, torch.optim.Optimizer):  # torch's would fail on the module
        raise TypeError(f"spec: got the class {spec.__name__}, not an optimizer; pass a name, an instance over "
                        f"model.parameters() or a factory (lambda model: {spec.__name__}(model.parameters(), ...))")
    if callable(spec):
        optimizer = spec(model, **kwargs)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"spec: the factory returned {type(optimizer).__name__}, not a torch.optim.Optimizer")
        return optimizer
    raise TypeError(
        f"spec: expected a name in {OPTIMIZER_NAMES}, an Optimizer or a factory, got {type(spec).__name__}"
    )
