"""Shared base of dreidel's curvature optimizers: the closure contract and name-checked state dicts."""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from dreidel._checks import check_count, check_number
from dreidel._warnings import warn
from dreidel.optim._capture import curvature_dtype

Closure = Callable[[], torch.Tensor]


_CLOSURE_CHANGED_GRADIENTS = (
    "closure: it changed the parameters' gradients (it called zero_grad() or backward()); with dreidel's "
    "optimizers the closure only re-evaluates and returns the loss on the same batch: "
    "optimizer.zero_grad(); loss.backward(); optimizer.step(closure)"
)


class RecordingClosure:
    """The user's closure as the optimizer calls it: each call's loss is kept (``step`` returns the first),
    and ``restore()`` puts the running statistics of ``model`` (BatchNorm's running_mean/var and
    num_batches_tracked, any ``running_*`` buffer) back as they were before the first call, so that the
    optimizer's re-evaluations of the loss do not count as more training batches. Restoring waits for
    the end of the step: the batch-norm backward of a sampled-label pass still needs those buffers.
    A closure that changes the gradients of ``params`` (it called ``zero_grad`` or ``backward``, torch's
    LBFGS convention) raises ``ValueError``: the step would otherwise use gradients it did not expect."""

    def __init__(self, closure: Closure, model: nn.Module | None, params: list[torch.Tensor]) -> None:
        self.closure, self.model, self.params = closure, model, params
        self.losses: list[torch.Tensor] = []
        self._saved: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def __call__(self) -> torch.Tensor:
        if self._saved is None:
            buffers = running_statistics(self.model) if self.model is not None else []
            self._saved = [(b, b.detach().clone()) for b in buffers]
        grads = [(p.grad, None if p.grad is None else p.grad._version) for p in self.params]
        try:
            loss = self.closure()
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                got = f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
                raise ValueError(f"closure() must return the loss as a one-element tensor (the graph's root, "
                                 f"e.g. loss_fn(model(x), y) with its default mean reduction), got {got}")
        except RuntimeError as error:
            # Evaluations that need no graph (the damping checks) run without grad, where a closure's own
            # backward() fails inside torch before the check below could name the cause.
            if not torch.is_grad_enabled() and "does not require grad" in str(error):
                raise ValueError(_CLOSURE_CHANGED_GRADIENTS) from error
            raise
        for p, (grad, version) in zip(self.params, grads):
            if p.grad is not grad or (grad is not None and grad._version != version):
                raise ValueError(_CLOSURE_CHANGED_GRADIENTS)
        self.losses.append(loss.detach())
        return loss

    def restore(self) -> None:
        with torch.no_grad():
            for buffer, saved in self._saved or []:
                buffer.copy_(saved)


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
    got none raises ``ValueError``; so does a step with a closure but no gradient at all (torch's
    LBFGS convention of calling ``backward`` inside the closure). ``step`` returns the loss of its
    first closure evaluation, or None when it made none. The optimizer's own closure calls leave
    the model's running statistics (BatchNorm) as the training step's forward left them, where the
    optimizer was given the model (``DiagonalNewton(model)``): from a list of parameters it cannot
    find them, and a closure call updates them as any forward pass in train mode does.
    ``zero_grad()`` also drops the layer inputs recorded by forward
    passes since the previous step (e.g. a validation pass run with grad enabled).

    The loss is assumed to be a mean (``reduction="mean"``) over the model output's leading positions
    (the batch, or batch × positions for a ``(B, T, C)`` output), which fixes the scale of the curvature
    estimates; a gradient accumulated over micro-batches is assumed to sum their losses divided by their
    number, so that it is the mean over all their samples. With a loss summed over the T positions of
    each sample instead, the estimates are off by a factor of T.

    ``state_dict()`` also records every parameter's name and shape; ``load_state_dict`` compares
    them and raises ``ValueError`` naming the first parameter that does not match.
    """

    def __init__(self, params: Iterable, defaults: dict, names: list[str] | None = None) -> None:
        self._param_names: dict[torch.Tensor, str] = {}
        super().__init__(params, defaults)
        all_params = [p for group in self.param_groups for p in group["params"]]
        if names is not None:
            if len(names) != len(all_params):
                raise ValueError(f"names: expected {len(all_params)} names, got {len(names)}")
            self._param_names = dict(zip(all_params, names))

    def add_param_group(self, param_group: dict) -> None:
        """As ``torch.optim.Optimizer.add_param_group``; the new parameters are named by position."""
        super().add_param_group(param_group)
        self._name_new_parameters()

    def _name_new_parameters(self) -> None:
        for g, group in enumerate(self.param_groups):
            for i, p in enumerate(group["params"]):
                self._param_names.setdefault(p, f"param_groups[{g}].params[{i}]")

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Also forgets layer inputs recorded since the last step (the contract starts a step here)."""
        capture = self._capture_or_none()
        if capture is not None:
            capture.clear()
        super().zero_grad(set_to_none)

    def remove_hooks(self) -> None:
        """Detach the hooks that record layer inputs and the model's output for the curvature, and drop what
        they recorded. Call it when training with this optimizer is over: ``step()`` raises afterwards (an
        optimizer built over parameters alone, without hooks, steps on). (Hooks of an optimizer that is no
        longer referenced go away with it.)"""
        capture = self._capture_or_none()
        if capture is not None:
            capture.remove()

    def _capture_or_none(self):
        """The subclass's activation capture, if it has one."""
        return None

    def __getstate__(self):
        # torch.optim.Optimizer pickles only defaults, state and param_groups: a copy would lack the model, its
        # hooks and the parameter names, and fail at its first call. The state dict is the way to copy one.
        raise TypeError(f"{type(self).__name__} cannot be copied or pickled (it holds hooks on its model): save "
                        "optimizer.state_dict() and load it into a new optimizer built over the copied model "
                        "(torch.save(optimizer.state_dict(), path) works)")

    def closure_required(self, step: int) -> bool:
        """Whether step number ``step`` (0-based) calls the closure. Subclasses override."""
        return False

    @staticmethod
    def _check_gradients(params_with_grad: list, param_groups: list, closure: Closure | None) -> None:
        """A closure but no gradient at all: the caller followed torch's LBFGS convention (backward inside
        the closure, no backward before ``step``), which would silently do nothing."""
        if params_with_grad or closure is None:
            return
        if any(p.requires_grad for group in param_groups for p in group["params"]):
            raise ValueError(
                "step: no parameter has a gradient, but a closure was given. The contract is "
                "optimizer.zero_grad(); loss.backward(); optimizer.step(closure): call backward before step; "
                "closure() only re-evaluates and returns the loss on the same batch, without calling "
                "zero_grad() or backward() itself (not torch's LBFGS-style closure)"
            )

    def _model_or_none(self) -> nn.Module | None:
        """The model whose running statistics the optimizer's own closure calls must not change."""
        return None

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> torch.Tensor | None:
        """One optimization step; returns the loss of the first closure evaluation it made, else None."""
        capture = self._capture_or_none()
        # Without its hooks, a step would warn of missing records, or count the batch as one sample (the hook on
        # the model's output counts it) and take steps up to B times too long.
        if capture is not None and capture.removed:
            raise RuntimeError(f"{type(self).__name__}: remove_hooks() was called, so no layer inputs are recorded "
                               "for the curvature any more and this optimizer cannot step; create a new one to go on "
                               "training")
        self._check_group_options()
        params = [p for group in self.param_groups for p in group["params"]]
        recorder = RecordingClosure(closure, self._model_or_none(), params) if closure is not None else None
        try:
            self._step(recorder)
        finally:
            if recorder is not None:
                recorder.restore()
        return recorder.losses[0] if recorder is not None and recorder.losses else None

    def _check_group_options(self) -> None:
        """``ValueError`` naming the first param group option out of range. Checked at every step, before
        anything changes: a scheduler or a hand edit of ``param_groups`` (``lr = nan``) would otherwise
        write NaN into every parameter and the state."""

    def _step(self, closure: Closure | None) -> None:
        """The subclass's update, run under ``torch.no_grad``; ``closure`` (None when none was given)
        records its losses and restores running statistics, so subclasses just call it."""
        raise NotImplementedError

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

    def _state_record(self) -> dict:
        """The optimizer type and the settings that shape its per-parameter state (saved and compared)."""
        return {"type": type(self).__name__}

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["param_signature"] = self._param_signature()
        state["optimizer"] = self._state_record()
        return state

    def _check_state_record(self, state_dict: dict) -> None:
        """``ValueError`` naming the first difference between the saved record and ours (none saved: old
        states load as before)."""
        theirs = state_dict.get("optimizer")
        if theirs is None:
            return
        ours = self._state_record()
        for key in [*ours, *(k for k in theirs if k not in ours)]:
            if theirs.get(key) != ours.get(key):
                raise ValueError(
                    f"state_dict: saved by {theirs.get('type')} with {key}={theirs.get(key)!r}, but this "
                    f"{ours['type']} has {key}={ours.get(key)!r}"
                )

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        self._check_state_record(state_dict)
        state_dict.pop("optimizer", None)
        theirs = state_dict.pop("param_signature", None)
        if theirs is None:
            raise ValueError("state_dict: missing 'param_signature' (not saved by a dreidel optimizer)")
        ours = self._param_signature()
        for (our_name, our_shape), (their_name, their_shape) in zip(ours, theirs):
            if unwrapped_name(our_name) != unwrapped_name(their_name) or our_shape != list(their_shape):
                raise ValueError(
                    f"state_dict: parameter mismatch at {our_name!r} (shape {our_shape}): "
                    f"the saved state has {their_name!r} (shape {list(their_shape)})"
                )
        if len(ours) != len(theirs):
            first = ours[len(theirs)][0] if len(ours) > len(theirs) else theirs[len(ours)][0]
            raise ValueError(
                f"state_dict: {len(theirs)} saved parameters but {len(ours)} here; first unmatched: {first!r}"
            )
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        saved_state = state_dict["state"]
        for saved_id, p in zip(saved_ids, [p for group in self.param_groups for p in group["params"]]):
            problem = self._saved_state_problem(p, saved_state.get(saved_id) or {})
            if problem is not None:  # before anything is loaded: a truncated entry used to fail at the next step
                raise ValueError(f"state_dict: the saved state of {self._param_names.get(p, 'a parameter')!r}: "
                                 f"{problem}")
        super().load_state_dict(state_dict)
        # torch.optim casts every floating state tensor to its parameter's dtype, so a bfloat16 or float16
        # model's curvature, kept in float32, would come back rounded, underflowed to 0 or overflowed to inf:
        # it is taken again from the saved tensors, in its own dtype.
        keys = self._curvature_state_keys()
        params = [p for group in self.param_groups for p in group["params"]]
        for saved_id, p in zip(saved_ids, params):
            saved, state = saved_state.get(saved_id), self.state.get(p)
            if saved and state:
                for key, value in saved.items():
                    if key != "step" and key in state and (keys is None or key in keys):
                        state[key] = floating_to(value, curvature_dtype(p.dtype), p.device)

    def _saved_state_problem(self, p: torch.Tensor, saved: dict) -> str | None:
        """What is wrong with the saved per-parameter state ``saved`` of ``p`` (None: nothing this class checks)."""
        return None

    def _curvature_state_keys(self) -> set[str] | None:
        """The per-parameter state entries kept in the curvature dtype (float32 for low-precision
        parameters); ``None``: every entry but ``step``."""
        return None


def tensor_shape_problem(value, shape: tuple[int, ...]) -> str | None:
    """How a saved state entry ``value`` (absent: None) differs from a tensor of ``shape``, or None."""
    if value is None or (isinstance(value, torch.Tensor) and tuple(value.shape) == tuple(shape)):
        return None
    return f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__


def floating_to(value, dtype: torch.dtype, device: torch.device):
    """``value`` (a tensor, or a tuple of them and numbers) with its floating tensors in ``dtype`` on ``device``,
    copied (other tensors only moved)."""
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype, copy=True)
    if isinstance(value, tuple):
        return tuple(floating_to(v, dtype, device) for v in value)
    return value


def check_single_process(optimizer: str, model: nn.Module | None) -> None:
    """Refuse ``model`` where it is (or holds) a ``DistributedDataParallel`` or FSDP module of several ranks, and
    warn where a process group of several ranks is active: the curvature optimizers estimate the curvature (and
    K-FAC's damping tests the loss) from this process's batch alone and do not synchronise them across ranks, so
    under data parallelism each rank takes another step and the ranks' weights drift apart while DDP goes on
    averaging their gradients (gloo, 2 ranks, a LinearWHT model: 0.011 apart after one K-FAC step, 0.046 after
    one DiagonalNewton step, where Adam's stay equal). Synchronised curvature is not supported yet."""
    distributed = torch.distributed
    if not (distributed.is_available() and distributed.is_initialized()):  # no ranks: nothing to drift from
        return
    kinds = _data_parallel_types()
    for module in model.modules() if model is not None else ():
        # one rank (torchrun --nproc_per_node=1) has none to drift from; FSDP2's modules name no group: the default
        if isinstance(module, kinds) and distributed.get_world_size(getattr(module, "process_group", None)) > 1:
            raise ValueError(f"{optimizer}: the model is wrapped in {type(module).__name__}, but {optimizer} "
                             "estimates the curvature from each process's own batch and does not synchronise it "
                             "across ranks (not supported yet): the ranks' weights would drift apart. Train in one "
                             "process, or use a torch optimizer (Adam, SGD) under data parallelism")
    ranks = distributed.get_world_size()
    if ranks > 1:
        warn(f"{optimizer}: a process group of {ranks} ranks is active; {optimizer} estimates the curvature from "
             "this process's batch alone and does not synchronise it across ranks, so it only suits a model "
             "that each rank trains on its own (under data parallelism the ranks' weights drift apart)")


def _data_parallel_types() -> tuple[type, ...]:
    """DDP's and FSDP's module types in this torch: each FSDP type only where ``torch.distributed.fsdp`` has it
    (FSDP2's ``FSDPModule`` is a recent addition; this package takes torch 2.4 and later)."""
    from torch.distributed import fsdp

    return tuple(kind for kind in (nn.parallel.DistributedDataParallel, getattr(fsdp, "FullyShardedDataParallel", None),
                                   getattr(fsdp, "FSDPModule", None)) if kind is not None)


# Name parts that wrappers add to their model's parameter names: torch.compile's OptimizedModule (``_orig_mod``,
# around the model or a submodule) and activation checkpointing's and FSDP's wrappers, anywhere in a name;
# DistributedDataParallel and DataParallel (``module``) at its start.
_WRAPPER_PARTS = ("_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module")
_LEADING_WRAPPER_PART = "module"


def unwrapped_name(name: str) -> str:
    """A parameter's name without the parts wrappers add, so that a state saved by an optimizer built over
    ``torch.compile(model)`` (or DDP, or with a compiled submodule) loads into one built over ``model``, and
    back. (torch's optimizers match parameters by position alone; these compare names and shapes.)"""
    parts = [part for part in name.split(".") if part not in _WRAPPER_PARTS]
    while len(parts) > 1 and parts[0] == _LEADING_WRAPPER_PART:
        parts.pop(0)
    return ".".join(parts)


def named_model_parameters(model: nn.Module) -> tuple[list[str], list[nn.Parameter]]:
    """Names and parameters of ``model``, frozen ones included (as ``torch.optim`` optimizers built from
    ``model.parameters()``: a parameter unfrozen later trains, one without a gradient is skipped); lazy
    (uninitialised) ones are refused."""
    names, params = [], []
    for name, p in model.named_parameters():
        if nn.parameter.is_lazy(p):
            raise ValueError(
                f"model: parameter {name!r} is not initialised yet (lazy); run one forward pass first"
            )
        names.append(name)
        params.append(p)
    return names, params


def running_statistics(model: nn.Module) -> list[torch.Tensor]:
    """Buffers that a forward pass in training mode updates: ``running_*`` and ``num_batches_tracked``."""
    return [
        buffer
        for name, buffer in model.named_buffers()
        if name.rsplit(".", 1)[-1].startswith("running_") or name.endswith("num_batches_tracked")
    ]


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every value of ``tensors`` is finite, from the extremes of each (a NaN or an infinity becomes
    one; finite values cannot overflow there, as a sum can: a float16 gradient of 10^4 values of 10 is finite);
    a sparse tensor's stored values. One pass each, much faster on CPU than ``isfinite(t).all()``."""
    values = [t._values() if t.is_sparse else t for t in tensors]
    extremes = [x for v in values if v.numel() for x in torch.aminmax(v.reshape(-1))]
    return not extremes or bool(torch.isfinite(torch.stack(extremes)).all())


# Bounds of torch.optim's usual options, which torch checks only when an optimizer is built and whose "< 0" tests
# let NaN through (build_optimizer's adam and sgd, KFAC's param groups).
TORCH_OPTION_BOUNDS = {"lr": dict(low=0), "weight_decay": dict(low=0), "eps": dict(low=0, low_open=True),
                       "momentum": dict(low=0, high=1, high_open=True), "dampening": dict(low=0, high=1)}


def check_torch_options(options, names=tuple(TORCH_OPTION_BOUNDS), prefix: str = "") -> None:
    """``check_number`` on each of ``names`` that ``options`` (a dict) holds, within ``TORCH_OPTION_BOUNDS``."""
    for name in names:
        if name in options:
            check_number(f"{prefix}{name}", options[name], **TORCH_OPTION_BOUNDS[name])


def check_seed(seed) -> int:
    """``seed`` as an int ``torch.Generator.manual_seed`` takes (``-2**63 .. 2**64 - 1``), or an error naming it."""
    check_count("seed", seed, minimum=-(2**63), maximum=2**64 - 1)
    return int(seed)
