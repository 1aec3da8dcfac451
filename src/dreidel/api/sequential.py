"""``dreidel.Sequential``: a Keras-like ``add`` / ``compile`` / ``fit`` / ``evaluate`` / ``predict`` / ``save``.

Underneath it is an ordinary ``torch.nn.Sequential``: index it, iterate it, call it, hand its parameters to a
hand-written loop — the high-level methods only add a training loop and a checkpoint format.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import json
import numbers
import operator
import os
import sys
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from dreidel._checks import check_flag, check_generator
from dreidel._warnings import warn
from dreidel.api import _training
from dreidel.api._training import progress_enabled
from dreidel.api._batches import BatchSource, check_targets, int_at_least, make_source, targets_like
from dreidel.api.callbacks import Callback
from dreidel.api.history import History
from dreidel.api import _loading
from dreidel.api.layer_specs import (CONSTRUCTOR_REFUSALS, check_layer_spec, construct_layer, holds_lazy_tensors,
                                     layer_spec)
from dreidel.api.losses import CrossEntropy, KLDivergence, resolve_loss
from dreidel.api.metrics import metric_name, resolve_metric
from dreidel.api.summary import format_summary, summarize
from dreidel.io.checkpoint import CheckpointFiles, load_state_strict, open_checkpoint, write_checkpoint
from dreidel.optim import CurvatureOptimizer, build_optimizer
from dreidel.optim._factory import check_named_optimizer

__all__ = ["Sequential", "load"]

CHECKPOINT_FORMAT = "dreidel.Sequential"
CHECKPOINT_VERSION = 1
# What a Sequential keeps besides its children (set in __init__): a child of one of these names, of a method's
# or of one of nn.Module's own attributes would be replaced by it, or refused with a KeyError.
_MODEL_ATTRIBUTES = ("input_shape", "input_dtype", "stop_training", "history", "_compiled")
_MODULE_ATTRIBUTES = frozenset(vars(nn.Module()))


def reserved_layer_name(name: str) -> bool:
    """Whether a child layer of a ``Sequential`` cannot be called ``name`` (an attribute of the model's)."""
    return name in _MODEL_ATTRIBUTES or name in _MODULE_ATTRIBUTES or hasattr(Sequential, name)


@dataclass
class _Compiled:
    """What ``compile`` chose; the optimizer itself is built once every parameter exists (lazy layers).
    ``built_over``: the ids of the model's parameters when the optimizer was built from a name or a factory (the
    layers changed since, it is built again)."""

    optimizer_spec: object
    optimizer_kwargs: dict
    loss: object
    metrics: list
    optimizer: torch.optim.Optimizer | None = None
    built_over: frozenset | None = frozenset()  # None: not known (unpickled), checked at the next fit
    jit: dict | None = None  # torch.compile's keyword arguments (jit_compile); None: eager
    runner: nn.Module | None = None  # the model's torch.compile wrapper, made at its first use; never copied

    def __deepcopy__(self, memo: dict) -> "_Compiled":
        """A copied model's choice: the optimizer is copied with it (over the copy's parameters, which ``memo``
        maps), except a curvature optimizer (its hooks stay on the original model), which the copy builds
        afresh at its next ``fit``; an optimizer instance given to ``compile`` stays with the original."""
        spec = None if isinstance(self.optimizer_spec, torch.optim.Optimizer) else self.optimizer_spec
        copied = _Compiled(copy.deepcopy(spec, memo), copy.deepcopy(self.optimizer_kwargs, memo),
                           copy.deepcopy(self.loss, memo), copy.deepcopy(self.metrics, memo),
                           jit=copy.deepcopy(self.jit, memo))
        if spec is not None and not isinstance(self.optimizer, CurvatureOptimizer):
            copied.optimizer = copy.deepcopy(self.optimizer, memo)
            # The parameters it was built over, as the copy's (the model's were copied first, into memo)
            known = self.built_over is not None and all(i in memo for i in self.built_over)
            copied.built_over = frozenset(id(memo[i]) for i in self.built_over) if known else None
        return copied

    def __getstate__(self) -> dict:
        """Pickled (``torch.save`` of the model) as it is copied: the optimizer, but not a curvature one or an
        instance given to ``compile``."""
        state = dict(self.__dict__, runner=None)
        if isinstance(self.optimizer_spec, torch.optim.Optimizer):
            state.update(optimizer_spec=None, optimizer=None, built_over=frozenset())
        elif isinstance(self.optimizer, CurvatureOptimizer):
            state.update(optimizer=None, built_over=frozenset())
        else:
            state["built_over"] = None
        return state


class Sequential(nn.Sequential):
    """Layers applied in order. ``Sequential(layer, ...)``, ``Sequential(OrderedDict(name=layer, ...))`` (named
    children, kept by ``save``) or ``Sequential()`` then ``add(layer)``.

    Inputs are ``(N, *input_shape)`` tensors; ``input_shape`` is fixed by the first batch the model sees in
    ``fit`` / ``evaluate`` / ``predict`` / ``build`` (lazy layers such as ``LinearWHT(1024)`` learn their
    input width then), and every later batch must match it.

    Note: ``compile`` here is Keras's (choose optimizer, loss, metrics); ``compile(..., jit_compile=True)``
    runs ``fit`` / ``evaluate`` / ``predict`` through ``torch.compile``. (``torch.compile(model)`` compiles
    calls of the model, but its ``fit`` is the model's own and trains eagerly.)
    """

    def __init__(self, *layers: nn.Module) -> None:
        if len(layers) == 1 and isinstance(layers[0], (list, tuple)):  # Keras's Sequential([...])
            raise TypeError("layers: Sequential takes the layers as arguments, as torch's does: "
                            "Sequential(*layers), not Sequential([...])")
        if len(layers) == 1 and isinstance(layers[0], OrderedDict):
            for name in layers[0]:
                if isinstance(name, str) and reserved_layer_name(name):
                    raise ValueError(f"layers: the name {name!r} is taken by an attribute of Sequential "
                                     "(a method, or what the model keeps); name the layer otherwise")
        super().__init__(*layers)
        self.input_shape: tuple[int, ...] | None = None
        self.input_dtype: torch.dtype | None = None  # an integer dtype for index inputs; None: floating
        self.stop_training = False
        self.history: History | None = None
        self._compiled: _Compiled | None = None

    # --------------------------------------------------------------------------------- building
    def add(self, layer: nn.Module) -> "Sequential":
        """Append ``layer`` (any ``nn.Module``); returns the model so calls can be chained."""
        if not isinstance(layer, nn.Module):
            raise TypeError(f"layer must be a torch.nn.Module, got {type(layer).__name__}")
        # nn.Sequential.append names it str(len(self)), which a model built from named layers may hold already
        # (OrderedDict([("2", ...), ("act", ...)])): that layer was replaced. The first free index instead.
        index = len(self)
        while str(index) in self._modules:
            index += 1
        self.add_module(str(index), layer)
        if self._compiled is None:
            return self
        if not isinstance(self._compiled.optimizer_spec, torch.optim.Optimizer):
            _release(self._compiled.optimizer)
            self._compiled.optimizer = None  # rebuilt over the new parameters at the next fit
        elif any(p.requires_grad for p in layer.parameters()):
            warn(f"add: the optimizer instance given to compile does not update the new layer's "
                 f"parameters ({type(layer).__name__}); fit will not train them. Compile again with "
                 "an optimizer over model.parameters(), or a name or factory, which cover new layers")
        return self

    @property
    def is_built(self) -> bool:
        """Whether every parameter and buffer exists (no lazy layer waits for its first input)."""
        return not holds_lazy_tensors(self)

    def build(self, input_shape: tuple[int, ...], dtype: torch.dtype | None = None) -> "Sequential":
        """Fix ``input_shape`` (per sample, without the batch dimension) and materialise lazy layers.

        ``dtype``: an integer dtype for models whose input is indices (an ``nn.Embedding`` first; ``fit`` and
        ``predict`` pass the data's), kept as ``input_dtype``; None or a floating dtype: floating inputs.
        """
        input_shape = _sample_shape(input_shape)
        if dtype is not None and not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype: expected a torch.dtype (e.g. torch.int64 for indices) or None, got {dtype!r}")
        if dtype is None and self.input_shape is not None:  # built already: the dtype it was built for
            dtype = self.input_dtype
        if dtype is not None and dtype.is_floating_point:
            dtype = None
        elif dtype is not None and dtype not in _loading.INPUT_DTYPES.values():
            raise ValueError(f"dtype: expected a floating dtype or one of {list(_loading.INPUT_DTYPES)}, got {dtype}")
        if self.input_shape is not None and input_shape != self.input_shape:
            raise ValueError(f"input_shape: the model was built for samples of shape {self.input_shape}, "
                             f"got {input_shape}")
        if len(self) == 0:
            raise ValueError("the model has no layers: add some before building it")
        if not self.is_built:  # a dry run that fails may have materialised some lazy layers: try a copy first
            with self._random_state_kept():
                self._probe()._dry_run(input_shape, dtype)
        self._dry_run(input_shape, dtype)
        self.input_shape, self.input_dtype = input_shape, dtype
        return self

    def _dry_run(self, input_shape: tuple[int, ...], dtype: torch.dtype | None) -> None:
        """Two zero samples through the layers (materialising lazy ones), or an error naming the input."""
        device, model_dtype = self._device_and_dtype()
        was_training = self.training
        self.eval()  # the dry run must not move BatchNorm statistics
        try:
            with torch.no_grad():
                self(torch.zeros((2, *input_shape), dtype=model_dtype if dtype is None else dtype, device=device))
        except (RuntimeError, ValueError) as error:
            if dtype is not None:  # integer samples, taken as indices: a model whose first layer takes features?
                raise TypeError(f"x: {dtype} samples of shape {input_shape} do not fit the model's layers: {error} "
                                "(integer x is taken as indices, for a model whose first layer is an embedding; "
                                "features must be floating point: x.float())") from error
            first = _first_layer(self)
            hint = (" (the first layer is an nn.Embedding, which takes integer indices: give an integer dtype, "
                    "e.g. build(input_shape, torch.int64))" if isinstance(first, nn.Embedding) else "")
            raise ValueError(f"x: samples of shape {input_shape} do not fit the model's layers: {error}{hint}"
                             ) from error
        finally:
            self.train(was_training)

    def _probe(self) -> "Sequential":
        """A copy of the model for checks that may materialise lazy layers and then fail (lazy parameters cost
        nothing to copy; built ones are copied); it shares what ``compile`` chose and the history."""
        return copy.deepcopy(self, memo={id(self._compiled): self._compiled, id(self.history): self.history})

    def _random_state_kept(self):
        """A context that restores torch's random state on the model's device afterwards: the layers a probe
        materialises draw their initial weights from it, and the model's own weights must not depend on
        whether it was probed (``build`` then ``fit`` and ``fit`` alone start alike)."""
        device = self._device_and_dtype()[0]
        return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])

    def _device_and_dtype(self) -> tuple[torch.device, torch.dtype]:
        """Where the parameters live and their floating dtype (a materialised parameter's first), for dry runs.

        A model without parameters or buffers answers the CPU and torch's default dtype.
        """
        tensors = [*self.parameters(), *self.buffers()]
        device = tensors[0].device if tensors else torch.device("cpu")
        floating = [t for t in tensors if t.is_floating_point()]
        materialised = [t for t in floating if not nn.parameter.is_lazy(t)]
        dtype = (materialised or floating)[0].dtype if floating else torch.get_default_dtype()
        return device, dtype

    def _check_input(self, x: torch.Tensor, where: str) -> None:
        if not x.is_floating_point() and x.dtype not in _loading.INPUT_DTYPES.values():
            raise TypeError(f"x: expected floating-point features or integer indices ({', '.join(_loading.INPUT_DTYPES)}),"
                            f" got {x.dtype} in {where}")
        if self.input_shape is None:
            self.build(tuple(x.shape[1:]), dtype=None if x.is_floating_point() else x.dtype)
        elif self.input_dtype is not None and x.is_floating_point():
            raise TypeError(f"x: the model takes indices ({self.input_dtype}, the dtype it was built for), got "
                            f"{x.dtype} in {where}")
        elif self.input_dtype is None and not x.is_floating_point():
            raise TypeError(f"x: the model takes floating-point features (it was built for them), got {x.dtype} in "
                            f"{where}: convert them (x.float(); image bytes: x.float() / 255)")
        elif tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"x: expected samples of shape {self.input_shape} (the shape the model was built for), "
                             f"got {tuple(x.shape[1:])} in {where}")
        elif self.input_dtype is not None and x.dtype != self.input_dtype and not {x.dtype, self.input_dtype} <= {
                torch.int32, torch.int64}:  # an embedding takes either
            raise TypeError(f"x: the model takes {self.input_dtype} indices (the dtype it was built for), got "
                            f"{x.dtype} in {where}: convert them (x.to({self.input_dtype}))")
        if self.input_dtype is not None:
            _check_indices(self, x, where)

    def _check_training_batch(self, x: torch.Tensor, where: str) -> None:
        """``_check_input``, and finite values besides (a NaN would reach BatchNorm's running statistics before
        the loss shows it)."""
        self._check_input(x, where)
        _check_finite(x, "x", where)

    # -------------------------------------------------------------------------------- compiling
    def compile(self, optimizer="adam", loss="cross_entropy", metrics=(), *, jit_compile=False,
                **optimizer_kwargs) -> "Sequential":
        """Choose how ``fit`` trains.

        Args:
            optimizer: a name (``"adam"``, ``"sgd"``, ``"diagonal_newton"``, ``"kfac"``), a
                ``torch.optim.Optimizer`` instance, or a factory ``(model) -> Optimizer``; resolved by
                ``dreidel.optim.build_optimizer`` once the model is built.
            loss: ``"cross_entropy"``, ``"mse"``, ``"kl_divergence"`` (distillation: targets are a teacher's
                logits, not probabilities as Keras's loss of that name takes; see ``losses.KLDivergence``), an
                instance from ``dreidel.api.losses``
                (e.g. ``CrossEntropy(label_smoothing=0.1)``) or any callable ``(output, target) -> scalar``.
            metrics: names (``"accuracy"``, ``"top_5"``) or callables ``(output, target) -> float``, logged
                under distinct names (``metric_name``), none of them ``loss``, ``lr``, ``epoch`` or ``val_*``.
            jit_compile: run the forward passes of ``fit`` / ``evaluate`` / ``predict`` through ``torch.compile``
                (Keras's name): ``True`` for its defaults, or a dict of its keyword arguments
                (``{"mode": "max-autotune"}``). With ``"diagonal_newton"`` or ``"kfac"`` the graph breaks at
                each layer their hooks record (the steps are the same; ``fullgraph`` refuses them).
            optimizer_kwargs: hyper-parameters of a named optimizer (``lr=...``).
        """
        # A factory takes any keyword (its own `mode`, say); a named optimizer's are known not to be these
        given_to_torch = sorted(set(optimizer_kwargs) & set(_TORCH_COMPILE_ARGS)) if isinstance(optimizer, str) else []
        if given_to_torch:
            raise TypeError(f"compile() chooses the optimizer, loss and metrics (Keras's); torch.compile's "
                            f"{given_to_torch} go in jit_compile={{...}}, e.g. compile('adam', jit_compile="
                            f"{{{given_to_torch[0]!r}: ...}})")
        jit = _jit_arguments(jit_compile)
        metrics = () if metrics is None else metrics
        if isinstance(metrics, str):
            raise TypeError("metrics must be a list of names or callables, e.g. ['accuracy'], not a string")
        if isinstance(optimizer, torch.optim.Optimizer) and optimizer_kwargs:
            raise ValueError(f"optimizer_kwargs: an optimizer instance takes no extra arguments, got {sorted(optimizer_kwargs)}")
        if not isinstance(optimizer, (str, torch.optim.Optimizer)) and not callable(optimizer):
            raise TypeError(f"optimizer must be a name, an Optimizer or a factory, got {type(optimizer).__name__}")
        if isinstance(optimizer, str):  # now, not only once a lazy model is built (at fit)
            check_named_optimizer(optimizer, optimizer_kwargs)
        if isinstance(optimizer, torch.optim.Optimizer):
            self._check_optimizer_instance(optimizer, "compile")
        resolved = [resolve_metric(m) for m in metrics]
        _check_metric_names(resolved)
        compiled = _Compiled(optimizer, dict(optimizer_kwargs), resolve_loss(loss), resolved, jit=jit)
        if self.is_built and len(self):
            compiled.optimizer = build_optimizer(optimizer, self, **optimizer_kwargs)
            compiled.built_over = _parameter_ids(self)
        # Only now, everything accepted: a refused compile keeps the previous choice whole (a curvature
        # optimizer released first would have stepped on as plain SGD, its recording hooks gone).
        if self.optimizer is not compiled.optimizer:
            _release(self.optimizer)
        self._compiled = compiled
        return self

    def _runner(self) -> nn.Module:
        """What ``fit`` / ``evaluate`` / ``predict`` call for outputs: the model, or (``jit_compile``) its
        ``torch.compile`` wrapper, made at the first call and kept with what ``compile`` chose."""
        compiled = self._compiled
        if compiled is None or compiled.jit is None:
            return self
        if compiled.runner is None:
            compiled.runner = torch.compile(self, **compiled.jit)
        return compiled.runner

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        """The optimizer ``fit`` steps (None until ``compile`` and, for lazy layers, the first batch)."""
        return None if self._compiled is None else self._compiled.optimizer

    def _require_compiled(self, method: str) -> _Compiled:
        if self._compiled is None:
            raise RuntimeError(f"call compile(optimizer, loss, metrics) before {method}()")
        return self._compiled

    def _ensure_optimizer(self) -> torch.optim.Optimizer:
        """The optimizer for ``fit``: one built from a name or a factory is built again when the model's
        parameters have changed since (layers added with ``append``, ``insert``, ``extend`` or replaced by
        index, which ``add`` alone used to catch); an instance given to ``compile`` is checked instead."""
        compiled = self._compiled
        if compiled.optimizer_spec is None:
            raise RuntimeError("this model is a copy of one compiled with an optimizer instance, which stays with the "
                               "original's parameters: call compile(...) on the copy before fit()")
        if isinstance(compiled.optimizer_spec, torch.optim.Optimizer):
            self._check_optimizer_instance(compiled.optimizer, "fit")
            return compiled.optimizer
        if compiled.optimizer is not None and compiled.built_over is None:  # unpickled: what it was built over is
            # not known; kept if it holds every parameter the model has now (layers may have changed since)
            held = {id(p) for group in compiled.optimizer.param_groups for p in group["params"]}
            compiled.built_over = _parameter_ids(self) if _parameter_ids(self) <= held else frozenset()
        if compiled.optimizer is not None and compiled.built_over != _parameter_ids(self):
            _release(compiled.optimizer)
            compiled.optimizer = None
        if compiled.optimizer is None:
            compiled.optimizer = build_optimizer(compiled.optimizer_spec, self, **compiled.optimizer_kwargs)
            compiled.built_over = _parameter_ids(self)
        return compiled.optimizer

    def _check_optimizer_instance(self, optimizer: torch.optim.Optimizer, method: str) -> None:
        """An optimizer instance must update the model: ``ValueError`` if it holds none of its trainable
        parameters (built over another module), a warning naming those it leaves out."""
        if not self.is_built:
            return  # lazy layers: their parameters do not exist yet, the check waits for fit
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        trainable = [(name, p) for name, p in self.named_parameters() if p.requires_grad]
        missing = [name for name, p in trainable if id(p) not in held]
        if trainable and len(missing) == len(trainable):
            raise ValueError(f"optimizer: the optimizer instance given to {method} updates none of the model's "
                             "parameters (was it built over another module?); build it over model.parameters(), "
                             "or give compile a name or a factory")
        if missing:
            warn(f"{method}: the optimizer instance does not update {len(missing)} trainable parameter(s) of "
                 f"the model ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); fit will not "
                 "train them. Compile again with an optimizer over model.parameters(), or a name or factory")

    # ---------------------------------------------------------------------------------- training
    def fit(self, x, y=None, *, epochs: int = 1, batch_size: int = 32, validation_data=None,
            validation_split: float = 0.0, callbacks: list[Callback] | tuple | None = (), verbose: int = 1,
            shuffle: bool = True, seed: int | None = None, generator: torch.Generator | None = None,
            initial_epoch: int = 0) -> History:
        """Train for ``epochs`` passes over ``(x, y)`` (tensors/arrays ``(N, ...)``) or a DataLoader ``x``.

        Args:
            validation_data: ``(x_val, y_val)`` or a DataLoader, evaluated after every epoch (``val_*`` logs).
            validation_split: instead, hold out this last fraction of ``x``/``y`` (taken before shuffling).
            callbacks: ``dreidel.api.callbacks`` objects.
            verbose: 0 silences the progress bar (it is also off when stderr is not a terminal).
            shuffle: reshuffle in-memory data every epoch (a DataLoader shuffles as configured).
            seed / generator: the source of the shuffling order of in-memory data (give at most one; a
                DataLoader ``x`` shuffles with its own generator, and refuses these).
            initial_epoch: the epoch to start at, as Keras's: a second ``fit(..., epochs=10, initial_epoch=5)``
                trains epochs 5 to 9, numbered so in the history and for the callbacks (a ``ModelCheckpoint``
                path with ``{epoch}`` then does not replace the first run's files).

        Training checks its data first: in-memory ``x`` must be finite (every batch of a DataLoader is checked
        before it reaches the model: a NaN would corrupt BatchNorm's running statistics before the loss showed
        it), and where the model has BatchNorm, a last in-memory batch of one sample joins the batch before it
        (torch's refusal to normalise a DataLoader's batch of one names the batch: give it ``drop_last=True``).

        Dtypes: floating-point ``x`` (tensor or numpy array, in memory or from a DataLoader) is cast to the
        model's dtype (that of its parameters), so a float64 array and a float64 tensor train a float32 model
        alike; floating-point ``y`` is cast to the output's dtype; numpy integer arrays become int64.
        ``evaluate`` and ``predict`` cast the same way.

        Returns:
            the ``History`` (also kept as ``model.history``).
        """
        compiled = self._require_compiled("fit")
        epochs = int_at_least(epochs, "epochs")
        initial_epoch = int_at_least(initial_epoch, "initial_epoch", minimum=0)
        if initial_epoch >= epochs:
            raise ValueError(f"initial_epoch must be below epochs (the index of the last epoch plus one, as Keras's), "
                             f"got initial_epoch={initial_epoch}, epochs={epochs}")
        if not isinstance(verbose, numbers.Integral):  # a bool too, as Keras takes it
            raise TypeError(f"verbose must be an int (0: silent, 1: progress bars), got {verbose!r}")
        if seed is not None:
            if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
                raise TypeError(f"seed must be an int, got {seed!r}")
            if not -2**63 <= int(seed) < 2**64:  # what torch.Generator.manual_seed takes
                raise ValueError(f"seed must lie in [-2**63, 2**64), got {seed}")
            seed = int(seed)  # a NumPy integer too
        check_generator("generator", generator)
        if seed is not None and generator is not None:
            raise ValueError("give seed or generator, not both")
        if isinstance(x, DataLoader) and (seed is not None or generator is not None):
            raise ValueError(f"{'seed' if seed is not None else 'generator'}: a DataLoader x is shuffled by its own "
                             "sampler, not by fit: give it the generator (DataLoader(..., shuffle=True, "
                             "generator=torch.Generator().manual_seed(seed)))")
        if seed is not None:
            generator = torch.Generator().manual_seed(seed)
        shuffle = check_flag("shuffle", shuffle)
        train, validation = self._split_sources(x, y, batch_size, validation_data, validation_split)
        if isinstance(callbacks, Callback):
            raise TypeError(f"callbacks: expected a list of callbacks, got one {type(callbacks).__name__}; pass "
                            f"callbacks=[{type(callbacks).__name__}(...)]")
        callbacks = [] if callbacks is None else list(callbacks)
        for callback in callbacks:
            if not isinstance(callback, Callback):
                raise TypeError(f"callbacks must hold dreidel.api.callbacks.Callback objects, got {type(callback).__name__}")
        self._warn_of_softmax_before_loss(compiled.loss)
        log_keys = ["loss", *(metric_name(m) for m in compiled.metrics)]
        log_keys += [f"val_{key}" for key in log_keys] if validation is not None else []
        for callback in callbacks:
            callback.check_log_keys([*log_keys, "lr"])
        train.check_not_empty("x")
        if validation is not None:
            validation.check_not_empty("validation_data")
        shape_unset = self.input_shape is None
        # A refused fit leaves the model as it was: the data may be what was wrong, and the next fit's data sets
        # the input shape. A lazy model is checked on a copy (its layers would keep the refused data's widths).
        checked = self._probe() if shape_unset and not self.is_built else self
        try:
            with self._random_state_kept() if checked is not self else contextlib.nullcontext():
                checked._check_input(train.x if train.x is not None else train.first_input(), "x")
                # In-memory targets are checked whole before any step (a bad label in batch 5 used to fail after
                # four steps had changed the weights); a DataLoader's batches are checked as they come.
                if train.x is not None:
                    _check_finite(train.x, "x", "the training samples")
                    checked._check_targets_up_front(train, compiled.loss, "y", compiled.metrics)
                if validation is not None and validation.x is not None:
                    checked._check_targets_up_front(validation, compiled.loss, "validation_data")
        except Exception:  # whatever refused the data (an IndexError from an embedding, a metric's error)
            if shape_unset:
                self.input_shape = self.input_dtype = None
            raise
        if checked is not self:  # the probe has shown that the dry run succeeds: the model itself takes it now
            self._dry_run(checked.input_shape, checked.input_dtype)
            self.input_shape, self.input_dtype = checked.input_shape, checked.input_dtype
        optimizer = self._ensure_optimizer()  # after the lazy layers have their parameters
        self.stop_training = False
        for callback in callbacks:
            callback.on_train_begin(self)
        self.history = history = History()  # after the callbacks' checks: a refused fit keeps the last history
        try:
            runner = self._runner()  # inside: a torch.compile argument it refuses still ends the callbacks' run
            for epoch in range(initial_epoch, epochs):
                for callback in callbacks:
                    callback.on_epoch_begin(self, epoch)
                logs = _training.train_epoch(runner, train, optimizer, compiled.loss, compiled.metrics, epoch,
                                             self._check_training_batch, shuffle, generator, verbose,
                                             f"epoch {epoch + 1}/{epochs}")
                if validation is not None:
                    logs.update(_training.evaluate_pass(runner, validation, compiled.loss, compiled.metrics,
                                                        self._check_input, prefix="val_"))
                    if progress_enabled(verbose):  # the bar showed the training figures; these come after it
                        figures = ", ".join(f"{key} {value:.4f}" for key, value in logs.items() if key.startswith("val_"))
                        tqdm.write(f"epoch {epoch + 1}/{epochs}: {figures}", file=sys.stderr)
                logs["lr"] = float(optimizer.param_groups[0]["lr"])  # a one-element tensor lr too
                history.append(epoch, logs)
                for callback in callbacks:
                    callback.on_epoch_end(self, epoch, logs)
                if self.stop_training:
                    break
        finally:
            for callback in callbacks:
                callback.on_train_end(self)
        return history

    def _split_sources(self, x, y, batch_size, validation_data, validation_split) -> tuple[BatchSource, BatchSource | None]:
        if isinstance(validation_split, bool) or not isinstance(validation_split, numbers.Real):
            raise TypeError(f"validation_split must be a number in [0, 1), got {validation_split!r}")
        if not 0.0 <= validation_split < 1.0:
            raise ValueError(f"validation_split must be in [0, 1), got {validation_split}")
        if validation_split and validation_data is not None:
            raise ValueError("give validation_data or validation_split, not both")
        device, dtype = self._device_and_dtype()
        single = _has_batch_norm(self)
        train = make_source(x, y, batch_size, need_targets=True, dtype=dtype, device=device, no_single_last=single)
        if validation_split:
            if train.loader is not None:
                raise ValueError("validation_split needs in-memory x and y, not a DataLoader; pass validation_data")
            held_out = int(round(train.x.shape[0] * validation_split))
            if held_out < 1 or held_out >= train.x.shape[0]:
                raise ValueError(f"validation_split={validation_split} leaves {held_out} of {train.x.shape[0]} "
                                 "samples for validation; need at least one on each side")
            cut = train.x.shape[0] - held_out
            validation = dataclasses.replace(train, x=train.x[cut:], y=train.y[cut:])
            train = dataclasses.replace(train, x=train.x[:cut], y=train.y[:cut])
            return train, validation
        if validation_data is None:
            return train, None
        if isinstance(validation_data, DataLoader):
            return train, make_source(validation_data, None, batch_size, need_targets=True, dtype=dtype, device=device,
                                      names=("validation_data", "y"))
        if not isinstance(validation_data, (tuple, list)) or len(validation_data) != 2:
            raise ValueError("validation_data must be an (x_val, y_val) pair or a DataLoader")
        return train, make_source(validation_data[0], validation_data[1], batch_size, need_targets=True, dtype=dtype,
                                  device=device, names=("validation_data[0]", "validation_data[1]"),
                                  no_single_last=single)

    def _warn_of_softmax_before_loss(self, loss) -> None:
        """Warn where the model ends in ``nn.Softmax`` and ``loss`` takes logits (cross_entropy, kl_divergence):
        softmaxed twice, the probabilities flatten and training stalls, without an error."""
        if len(self) and isinstance(self[-1], nn.Softmax) and isinstance(loss, (CrossEntropy, KLDivergence)):
            warn(f"the model ends in nn.Softmax, but {loss.name} takes logits and applies the softmax itself "
                 "(twice, the probabilities flatten and training stalls): leave out the last Softmax, and apply "
                 "torch.softmax to predict's output where probabilities are wanted")

    def _check_targets_up_front(self, source: BatchSource, loss, where: str, metrics=()) -> None:
        """Check the inputs' shape and every target of the in-memory ``source`` against the output of one sample
        (in eval mode, without gradients), and ``metrics`` on that sample, so that bad labels or a metric that
        cannot apply (top_5 of 3 classes) fail before training changes any weight."""
        self._check_input(source.x[:1], where)
        was_training = self.training
        self.eval()
        try:  # two samples where there are: a BatchNorm without running statistics takes no fewer in eval mode
            with torch.no_grad():
                output = self(next(source.batches(False, None))[0][:2])[:1]  # (1, *output_shape)
        finally:
            self.train(was_training)
        one = output
        output = output.expand(source.num_samples, *output.shape[1:])
        check_targets(loss, output, targets_like(source.y, output), where)
        for metric in metrics:
            metric(one, targets_like(source.y[:1], one))

    def evaluate(self, x, y=None, batch_size: int = 256) -> dict[str, float]:
        """Mean loss and compiled metrics over ``(x, y)`` or a DataLoader, in eval mode, without gradients."""
        compiled = self._require_compiled("evaluate")
        device, dtype = self._device_and_dtype()
        source = make_source(x, y, batch_size, need_targets=True, dtype=dtype, device=device,
                             no_single_last=_has_batch_norm(self))
        return _training.evaluate_pass(self._runner(), source, compiled.loss, compiled.metrics, self._check_input)

    def predict(self, x, batch_size: int = 256) -> torch.Tensor:
        """Outputs ``(N, *output_shape)`` for ``x`` ``(N, *input_shape)`` (or a DataLoader), in eval mode."""
        device, dtype = self._device_and_dtype()
        source = make_source(x, None, batch_size, need_targets=False, dtype=dtype, device=device,
                             no_single_last=_has_batch_norm(self))
        runner = self._runner()
        was_training = self.training
        self.eval()
        outputs = []
        try:
            with torch.no_grad():
                for index, (batch, _) in enumerate(source.batches(False, None)):
                    self._check_input(batch, f"prediction batch {index + 1}")
                    outputs.append(runner(batch))
        finally:
            self.train(was_training)
        if not outputs:
            raise ValueError("x is empty: nothing to predict")
        return torch.cat(outputs)

    # ----------------------------------------------------------------------------------- reporting
    def summary(self, input_shape: tuple[int, ...] | None = None, dtype: torch.dtype | None = None) -> str:
        """A table of layers, output shapes, parameters and FLOPs per sample (returned as text, not printed).

        ``input_shape`` / ``dtype``: build the model first (``build``'s arguments; an integer ``dtype`` for a
        model whose input is indices), where it has not seen data yet."""
        if input_shape is not None:
            self.build(input_shape, dtype)
        if self.input_shape is None:
            raise ValueError("input_shape: the model's input shape is not set (fit, evaluate, predict or build set it; "
                             "calling the model does not); pass summary(input_shape=(features,))")
        device, dtype = self._device_and_dtype()
        rows = summarize(self, self.input_shape, self.input_dtype or dtype, device)
        total_params = sum(p.numel() for p in self.parameters())
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        known_flops = sum(r.flops for r in rows if r.flops is not None)
        flops_note = "" if all(r.flops is not None for r in rows) else " (layers marked ? not counted)"
        lines = [format_summary(rows),
                 f"input shape: {self.input_shape}",
                 f"parameters: {total_params:,} ({trainable:,} trainable)",
                 f"FLOPs per sample: {known_flops:,}{flops_note}"]
        return "\n".join(lines)

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Number of parameter elements (only those with ``requires_grad`` when ``trainable_only``); a lazy
        layer's parameters count 0 until it has seen data."""
        return sum(p.numel() for p in self.parameters()
                   if not nn.parameter.is_lazy(p) and (p.requires_grad or not trainable_only))

    # --------------------------------------------------------------------------------- checkpoints
    def save(self, path: str | os.PathLike) -> Path:
        """Write ``path/config.json`` (layer specs, input shape) and ``path/model.safetensors``, atomically.

        The optimizer state is not saved; which parameters are frozen (``requires_grad=False``) is. Returns the
        checkpoint directory. A layer object used at several
        positions is saved once per position, which is the same model where it holds no tensors (one
        ``nn.ReLU()`` used twice); a model whose layers share a tensor (weight tying, or a repeated layer with
        parameters or buffers) is refused with a ``ValueError``: the format keeps layers' tensors apart.
        """
        if len(self) == 0:
            raise ValueError("the model has no layers: add some before save() (load() refuses a model without any)")
        if not self.is_built:
            raise RuntimeError("the model has lazy layers that have not seen data: fit, predict or build it before save()")
        _refuse_shared_layers(self)
        specs = {name: _as_saved(layer_spec(layer), name) for name, layer in self._modules.items()}
        with self._random_state_kept():
            for name, layer in self._modules.items():
                _refuse_state_beyond_spec(name, layer, specs[name])
        config = {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION,
                  "input_shape": None if self.input_shape is None else list(self.input_shape),
                  **({} if self.input_dtype is None else {"input_dtype": str(self.input_dtype).removeprefix("torch.")}),
                  "layers": [{"name": name, **spec} for name, spec in specs.items()]}
        frozen = [name for name, p in self.named_parameters() if not p.requires_grad]
        if frozen:
            config["frozen"] = frozen
        return write_checkpoint(path, config, self.state_dict())


def _refuse_shared_layers(model: Sequential) -> None:
    """A checkpoint holds one spec and its own tensors per position: a parameter or buffer shared by two
    positions (weight tying, or one layer with tensors used twice) would load as independent copies, so
    ``save`` refuses it rather than write a checkpoint that loads as another model. A layer without tensors
    used twice loads as two equal layers, the same model."""
    owners: dict[int, str] = {}
    for name, layer in model._modules.items():
        for tensor in (*layer.parameters(), *layer.buffers()):
            if owners.setdefault(id(tensor), name) != name:
                raise ValueError(f"cannot save a model whose layers {owners[id(tensor)]!r} and {name!r} share a "
                                 "parameter or buffer (weight tying, or one layer object used twice): a checkpoint "
                                 "holds each layer's tensors separately")


def _as_saved(spec: dict, name: str) -> dict:
    """``spec`` as ``config.json`` will hold it and ``load`` will read it (tuples become lists), or a
    ``ValueError`` naming the layer where it is not JSON data."""
    try:
        return json.loads(json.dumps(spec))
    except (TypeError, ValueError) as error:
        raise ValueError(f"cannot save layer {name!r}: its arguments {spec['args']!r} are not JSON data ({error})") \
            from None


def _refuse_state_beyond_spec(name: str, layer: nn.Module, spec: dict) -> None:
    """``load`` rebuilds each layer from its spec and reads exactly the tensors such a layer has: a layer whose
    ``state_dict`` differs from that (pruned by ``torch.nn.utils.prune``, which keeps ``weight_orig`` and
    ``weight_mask``; the hook-based ``weight_norm`` / ``spectral_norm``; a buffer registered on it afterwards)
    would save a checkpoint that cannot load, so ``save`` refuses it, naming the tensors. The layer is rebuilt
    on the meta device (nothing allocated; the caller keeps torch's random state) as ``load`` rebuilds it: on
    the CPU where an operator has no meta kernel there (``.item()``), and what its constructor refuses (an
    ``args_of`` that leaves an argument out) is a ``ValueError`` naming the layer, as ``load`` would raise."""
    where = f"layer {name!r}"
    cls, args = check_layer_spec(spec, where)
    try:
        with torch.device("meta"):
            rebuilt = cls(**args)
    except RuntimeError:  # no meta kernel (NotImplementedError too): load builds it for real, and so does this
        with torch.device("cpu"):
            rebuilt = construct_layer(cls, args, where)
    except CONSTRUCTOR_REFUSALS as error:
        raise ValueError(f"cannot save {where}: load() could not build {cls.__name__} from args {args}: {error}") \
            from error
    if holds_lazy_tensors(rebuilt):
        raise ValueError(f"cannot save layer {name!r} ({type(layer).__name__}): its arguments {spec['args']} leave a "
                         "size to be learnt from data (a lazy layer), so load() could not rebuild it: its "
                         "registered args_of must give every size")
    # Tensors only: extra state (get_extra_state) is refused by name when the tensors are written
    have = {key: tuple(t.shape) for key, t in layer.state_dict().items() if isinstance(t, torch.Tensor)}
    expected = {key: tuple(t.shape) for key, t in rebuilt.state_dict().items() if isinstance(t, torch.Tensor)}
    extra = sorted(set(have) - set(expected))
    missing = sorted(set(expected) - set(have))
    if extra or missing:
        found = " and ".join(part for part in (f"has {extra}" if extra else "", f"lacks {missing}" if missing else "")
                             if part)
        raise ValueError(
            f"cannot save layer {name!r} ({type(layer).__name__}): its state_dict {found}, but load() rebuilds it "
            f"from its arguments with exactly {sorted(expected)}. Make such a change permanent first (after "
            "torch.nn.utils.prune: prune.remove(layer, 'weight'); after the hook-based weight_norm / spectral_norm: "
            "torch.nn.utils.remove_weight_norm / remove_spectral_norm); a buffer registered on a layer after it was "
            "built cannot be saved")
    resized = sorted(key for key in have if have[key] != expected[key])
    if resized:
        key = resized[0]
        raise ValueError(f"cannot save layer {name!r} ({type(layer).__name__}): its tensor {key!r} has shape "
                         f"{have[key]}, but load() rebuilds it with {expected[key]} from its arguments "
                         f"{spec['args']}")


# torch.compile's keyword arguments: given to compile(...) here, they would be taken for an optimizer's.
_TORCH_COMPILE_ARGS = tuple(name for name in inspect.signature(torch.compile).parameters if name != "model")


def _jit_arguments(jit_compile) -> dict | None:
    """``compile``'s ``jit_compile`` as torch.compile's keyword arguments (None: eager), or ``TypeError``."""
    if isinstance(jit_compile, bool):
        return {} if jit_compile else None
    if not isinstance(jit_compile, dict):
        raise TypeError(f"jit_compile must be a bool or a dict of torch.compile's keyword arguments, got "
                        f"{type(jit_compile).__name__}")
    unknown = sorted(str(key) for key in jit_compile if key not in _TORCH_COMPILE_ARGS)
    if unknown:
        raise TypeError(f"jit_compile: {unknown} are not torch.compile's keyword arguments {list(_TORCH_COMPILE_ARGS)}")
    return dict(jit_compile)


# Log keys fit writes besides the metrics' (and CSVLogger / ModelCheckpoint paths use "epoch").
_RESERVED_LOG_KEYS = ("loss", "lr", "epoch")


def _check_metric_names(metrics: list) -> None:
    """Refuse metrics whose log keys would overwrite one another or fit's own keys in the logs and History."""
    seen: set[str] = set()
    for metric in metrics:
        name = metric_name(metric)
        if name in _RESERVED_LOG_KEYS or name.startswith("val_"):
            raise ValueError(f"metrics: a metric logged as {name!r} would collide with fit's own log keys "
                             f"{list(_RESERVED_LOG_KEYS)} or their val_ copies; give the function another name")
        if name in seen:
            raise ValueError(f"metrics: two metrics are logged as {name!r} (a callable is logged under its "
                             "function name, 'accuracy' and 'top_1' alike as 'accuracy'); give each a distinct name")
        seen.add(name)


def _sample_shape(input_shape) -> tuple[int, ...]:
    """``input_shape`` as a tuple of positive ints, or ``TypeError`` / ``ValueError`` naming it."""
    if isinstance(input_shape, (str, bytes)) or not isinstance(input_shape, (tuple, list, torch.Size)):
        raise TypeError(f"input_shape must be a tuple (or list) of ints, the shape of one sample without the batch "
                        f"dimension (e.g. (784,)), got {input_shape!r}")
    try:
        shape = tuple(None if isinstance(d, bool) else operator.index(d) for d in input_shape)
    except TypeError:
        shape = (None,)
    if any(d is None or d < 1 for d in shape):
        raise ValueError(f"input_shape must hold positive ints (one sample, without the batch dimension), got "
                         f"{tuple(input_shape)}")
    return shape


def _parameter_ids(model: nn.Module) -> frozenset:
    return frozenset(id(p) for p in model.parameters())


def _has_batch_norm(model: nn.Module) -> bool:
    """Whether ``model`` normalises by batch statistics in training (a ``BatchNorm1d`` over features cannot
    train on one sample)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


_FINITE_CHECK_VALUES = 1 << 22  # values per chunk of _check_finite (a 4 M-value mask at a time, 4 MB)


def _check_finite(x: torch.Tensor, name: str, where: str) -> None:
    """``ValueError`` naming ``name`` and ``where`` if floating ``x`` holds a NaN or an infinity (samples
    ``(N, ...)``: the first bad one is named)."""
    if not x.is_floating_point() or x.is_meta or x.numel() == 0:  # meta tensors have no values to check
        return
    rows = max(1, _FINITE_CHECK_VALUES // max(1, x[0].numel()))  # in chunks: x may be a memory-mapped file
    bad: list[int] = []
    for start in range(0, x.shape[0], rows):
        chunk = x[start:start + rows]
        bad += ((~torch.isfinite(chunk)).reshape(chunk.shape[0], -1).any(dim=1).nonzero().flatten() + start).tolist()
    if bad:
        raise ValueError(f"{name}: {where} hold NaN or infinite values ({len(bad)} of {x.shape[0]} samples, the first "
                         f"at index {bad[0]}); training on them would corrupt the model (BatchNorm statistics, "
                         "weights): drop or clean those samples")


def _first_layer(model: nn.Module) -> nn.Module | None:
    """The first module without children of ``model`` in order: the layer its input reaches first."""
    return next((m for m in model.modules() if not list(m.children())), None)


def _check_indices(model: nn.Module, x: torch.Tensor, where: str) -> None:
    """Integer ``x`` for a model whose first layer is an embedding: every index must name one of its rows."""
    first = _first_layer(model)
    if not isinstance(first, (nn.Embedding, nn.EmbeddingBag)) or x.numel() == 0 or x.is_meta:
        return
    low, high = int(x.min()), int(x.max())
    if low < 0 or high >= first.num_embeddings:
        raise ValueError(f"x: indices must lie in [0, {first.num_embeddings - 1}] (the first layer, "
                         f"{type(first).__name__}, has {first.num_embeddings} rows), got indices from {low} to {high} "
                         f"in {where}")


def _release(optimizer: torch.optim.Optimizer | None) -> None:
    """Detach the hooks of an optimizer the model no longer steps (a curvature optimizer's would keep
    recording every forward pass)."""
    if isinstance(optimizer, CurvatureOptimizer):
        optimizer.remove_hooks()


def load(path: str | os.PathLike) -> Sequential:
    """Rebuild a ``Sequential`` saved by ``Sequential.save`` (JSON + safetensors; nothing is unpickled).

    The model comes back uncompiled, in train mode, on the CPU, with the dtype it was saved in. Before any
    tensor is read or any layer allocated, ``config.json`` is checked: its keys, the layer types, the
    constructor arguments (``device`` / ``dtype`` / ``generator`` are refused), every declared parameter shape
    against the safetensors header, and ``input_shape`` against the layers.

    Raises:
        FileNotFoundError: no checkpoint at ``path``.
        ValueError: a corrupted file, a bad or missing config key, an unknown layer type, bad layer arguments,
            or a tensor that is missing, unexpected or mis-shaped (the message names the file and the layer).
    """
    with open_checkpoint(path) as files:  # both files of one checkpoint, even while another process saves
        return _load_from(files)


def _load_from(files: CheckpointFiles) -> Sequential:
    config_file, tensors_file = files.config_path, str(files.tensors_path)
    config, header = files.config(), files.tensor_header()
    plans, input_shape, input_dtype = _loading.check_config(config, str(config_file), CHECKPOINT_FORMAT,
                                                            CHECKPOINT_VERSION)
    for plan in plans:
        if reserved_layer_name(plan.name):
            raise ValueError(f"{plan.where}: the name {plan.name!r} is taken by an attribute of Sequential")
    meta = _loading.meta_layers(plans)
    _loading.check_tensor_header(plans, meta, header, tensors_file)
    if input_shape is not None and all(layer is not None for layer in meta):
        _loading.check_input_shape(plans, meta, input_shape, str(config_file), input_dtype)
    tensors = files.tensors()
    # The meta layers take the file's tensors as they are (no second allocation, each tensor's dtype kept)
    budget = _loading.BuildBudget()
    model = Sequential(OrderedDict((plan.name, _loading.build_within_tensor_file(plan, header, budget)
                                    if layer is None else layer) for plan, layer in zip(plans, meta)))
    load_state_strict(model, tensors, source=tensors_file, keep_dtypes=True)
    for plan in plans:
        layer = getattr(model, plan.name)
        if any(t.is_meta for t in (*layer.parameters(), *layer.buffers())):  # state the tensor file does not hold
            layer = construct_layer(plan.cls, plan.args, plan.where)
            prefix = f"{plan.name}."
            load_state_strict(layer, {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)},
                              source=tensors_file, keep_dtypes=True)
            setattr(model, plan.name, layer)
    # Not checked on meta: layers built for real, or integer input (meta kernels do not compare dtypes, so a
    # config could give index input to a model that takes features). Checked on two real samples now.
    if input_shape is not None and (input_dtype is not None or any(layer is None for layer in meta)):
        _loading.check_dry_run_size(input_shape, input_dtype or model._device_and_dtype()[1], budget, str(config_file))
        try:
            model.build(input_shape, input_dtype)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{config_file}: the layers do not run on 'input_shape' {list(input_shape)}: "
                             f"{error}") from error
    model.input_shape, model.input_dtype = input_shape, input_dtype
    parameters = dict(model.named_parameters())
    for name in config.get("frozen", []):
        if name not in parameters:
            raise ValueError(f"{config_file}: 'frozen' names {name!r:.80}, which is not a parameter of the model")
        parameters[name].requires_grad_(False)
    return model
