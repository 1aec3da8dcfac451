"""Hooks that record what curvature estimates need: each layer's input and the gradient at its output.

Also the exact per-sample squared-gradient sums ``sum_i (dL_i/dp)^2`` of the layers that can give them
cheaply: modules implementing ``dreidel.layers.PerSampleGradients``, ``nn.Linear`` (per-sample
gradients are outer products ``g_i a_i^T``) and ``nn.LayerNorm`` (``g_i * x_hat_i``).
"""

from __future__ import annotations

import contextlib
import math
import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from dreidel._warnings import warn
from dreidel.layers._curvature import PerSampleGradients


def curvature_dtype(dtype: torch.dtype) -> torch.dtype:
    """Curvature estimates are formed in float32 (bfloat16/float16 products and solves lose too much, and
    CPU Cholesky has no bfloat16 kernel); float64 stays float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def working_precision(t: torch.Tensor) -> torch.Tensor:
    """``t`` in its curvature dtype: a low-precision float tensor (autocast, bfloat16 layers) as float32."""
    if t.is_floating_point() and t.dtype != curvature_dtype(t.dtype):
        return t.to(curvature_dtype(t.dtype))
    return t


def _is_unbatched(module: nn.Module, x: torch.Tensor) -> bool | None:
    """Whether ``x`` is one sample without a batch dimension for ``module`` (torch's unbatched forms); None
    for a module whose unbatched form is not known."""
    if isinstance(module, (nn.Linear, PerSampleGradients)):  # features last: (*, in_features)
        return x.dim() == 1
    if isinstance(module, nn.LayerNorm):
        return x.dim() == len(module.normalized_shape)
    if isinstance(module, nn.Conv1d):
        return x.dim() == 2
    if isinstance(module, nn.Conv2d):
        return x.dim() == 3
    return None


# The id of the backward pass running on this thread, -1 outside one.
_current_graph_task = torch._C._current_graph_task_id
# Inside torch.func transforms (vmap, grad, ...: per-sample gradients by functional_call, say) nothing is recorded:
# their wrapped tensors would be dead by the step that used them.
_in_functorch_transform = torch._C._are_functorch_transforms_active


def _will_execute(node) -> bool | None:
    """Whether the backward pass running now executes ``node``, an AccumulateGrad node (a leaf); None inside
    ``torch.autograd.grad()``, which accumulates nothing and where torch refuses to answer for a leaf."""
    try:
        return torch._C._will_engine_execute_node(node)
    except RuntimeError as error:
        if "autograd.grad" not in str(error):
            raise
        return None


def _accumulator(p: torch.Tensor):
    """The AccumulateGrad node of a leaf tensor that requires grad."""
    return torch.autograd.graph.get_gradient_edge(p).node


def _output_rows(output: torch.Tensor) -> int:
    """The leading positions of a model output: B for ``(B, C)`` or ``(B,)``, B·T for ``(B, T, C)``, 1 for a
    0-d one. A mean loss over the output (cross-entropy over the last axis, mean over these positions) has
    one term per position."""
    if output.dim() <= 1:
        return int(output.shape[0]) if output.dim() == 1 else 1
    return math.prod(int(d) for d in output.shape[:-1])


def _first_tensor(values: object, min_dim: int = 0) -> torch.Tensor | None:
    """The first tensor of at least ``min_dim`` dimensions in a tuple, list or dict (its values), if any."""
    items = values.values() if isinstance(values, dict) else values if isinstance(values, (tuple, list)) else ()
    return next((x for x in items if isinstance(x, torch.Tensor) and x.dim() >= min_dim), None)


class RandomDraws:
    """The states of torch's default generators (the CPU's, and each CUDA device's once CUDA is initialised),
    so that later code can draw again what was drawn from them: the same dropout masks, say."""

    def __init__(self) -> None:
        self._cpu = torch.get_rng_state()
        self._cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    @contextlib.contextmanager
    def replayed(self):
        """Run the block from these states; afterwards the generators are where they were before it."""
        with torch.random.fork_rng(devices=range(len(self._cuda)) if self._cuda is not None else []):
            torch.set_rng_state(self._cpu)
            if self._cuda is not None:
                torch.cuda.set_rng_state_all(self._cuda)
            yield


@dataclass
class LayerRecord:
    """One forward call of a watched module: its inputs and (after backward) the output gradient."""

    inputs: tuple[torch.Tensor, ...]
    grad_output: torch.Tensor | None = None
    group: int = 0  # which group of forward passes (those between two backward passes) made it; see ActivationCapture


@dataclass
class ActivationCapture:
    """Records ``LayerRecord``s for ``modules`` while ``enabled`` and grad mode is on.

    Also keeps the root model's last output (``root_output``) so that a sampled-label backward can start from
    it, and ``output_rows``: the number of terms of the mean loss the empirical Fisher is scaled by.

    Forward passes are grouped: a group is the passes between two backward passes that reached recorded
    layers. The passes of one group feed one backward (a siamese encoder applied twice, a cell unrolled by
    the training loop): a layer's calls in them are summed per sample before squaring, and the group counts
    the output rows of its last pass that the backward reached (a pass whose output no loss used, such as a
    monitoring forward with grad enabled before ``backward()``, counts nothing), or of its last pass if the
    backward reached none of their outputs. Groups are the micro-batches of an accumulated gradient (each loss
    divided by their number): their samples are different samples, and their rows add. A group none of whose
    records received a gradient (a validation forward with grad enabled between ``backward()`` and the
    step) counts nothing. While nothing is recorded (``enabled`` off), the last group's rows are reported.

    A pass counts its output's leading positions (B for a ``(B, C)`` output, B·T for ``(B, T, C)``, the
    convention of the categorical sampled likelihood, ``_sampling``); one whose output is no tensor (a tuple, a
    dict) counts the leading dimension of its first tensor argument. A pass whose output holds no rows (a model
    that returns its loss, a 0-d tensor) counts those of the last watched layer's output in it, as do the passes
    of a model whose own forward is never called (an ``nn.ModuleList`` whose layers the training loop calls). A
    pass in which every watched layer whose unbatched form torch defines saw an unbatched input (a 1-D Linear
    input, a (C, L) Conv1d or (C, H, W) Conv2d input) counts 1: one sample (a layer applied to a single vector
    inside a batched model, such as a learned query, does not make its pass unbatched).

    Only backward passes that accumulate into the watched layers' ``.grad`` (``backward()``) give records
    their gradients and mark groups, as only they feed the step: a ``torch.autograd.grad()`` call (a gradient
    penalty, a monitored gradient norm) is left out, unless ``sampling`` is on (the optimizer's own sampled
    backward, which is such a call: ``sampled_gradients``).

    With ``keep_random_state``, each root pass with gradients keeps the random generators' states it started
    from (``random_state``, a ``RandomDraws``): the last pass's, until ``clear()``.

    Call ``clear()`` after using the records and ``remove()`` to detach the hooks. The hooks hold the capture
    only weakly: once nothing else refers to it (its optimizer was dropped), they are removed. At most
    ``MAX_RECORDS`` calls per module are kept between two ``clear()``s (forward passes with gradients but no
    optimizer step, e.g. after training, would otherwise pile up copies of their inputs); beyond that the
    oldest are dropped, with one warning.
    """

    MAX_RECORDS = 1024

    root: nn.Module | None
    modules: list[nn.Module]
    enabled: bool = False
    records: dict[nn.Module, list[LayerRecord]] = field(default_factory=dict)
    root_output: torch.Tensor | None = None
    keep_random_state: bool = False
    random_state: RandomDraws | None = None
    sampling: bool = False  # the optimizer's own backward (torch.autograd.grad) is running: its gradients count
    _accumulators: dict = field(default_factory=dict)  # module (None: the model) -> an AccumulateGrad node
    _group: int = 0
    _backward_since_forward: bool = False  # a recorded layer received its gradient since the last forward call
    _group_rows: dict[int, int] = field(default_factory=dict)  # the rows of each group's last pass
    _layer_rows: dict[int, int] = field(default_factory=dict)  # ... of the last watched layer's output in it
    _reached_rows: dict[int, int] = field(default_factory=dict)  # ... of its last pass the backward reached
    _groups_with_gradients: set[int] = field(default_factory=set)
    _pass_saw_batched: bool = False
    _pass_saw_unbatched: bool = False
    _handles: list = field(default_factory=list)
    _warned_full: bool = False
    removed: bool = False  # remove() was called: nothing is recorded any more

    def __post_init__(self) -> None:
        for module in self.modules:
            self._handles.append(module.register_forward_hook(_CaptureHook(self, root=False), with_kwargs=True))
        if self.root is not None:
            self._handles.append(self.root.register_forward_hook(_CaptureHook(self, root=True), with_kwargs=True))
            self._handles.append(self.root.register_forward_pre_hook(_PassStartHook(self)))
        weakref.finalize(self, _remove_handles, self._handles)

    @property
    def output_rows(self) -> int | None:
        """The output rows of the groups whose records received gradients, summed (see the class docstring)."""
        counted = [rows for group in self._groups_with_gradients if (rows := self._rows_of(group)) is not None]
        return sum(counted) if counted else self._rows_of(self._group)

    def _rows_of(self, group: int) -> int | None:
        if group in self._reached_rows:
            return self._reached_rows[group]
        return self._group_rows.get(group, self._layer_rows.get(group))

    def _start_pass(self) -> None:
        """A forward call after a backward pass: the first of a new group. (Not a call made by the backward
        itself: a reentrant activation checkpoint recomputes its part of the pass being differentiated.)"""
        if self._backward_since_forward and _current_graph_task() == -1:
            self._group += 1
            self._backward_since_forward = False
            # forward/backward passes without steps: forget the groups before the last MAX_RECORDS
            stale = self._group - self.MAX_RECORDS
            for rows in (self._group_rows, self._reached_rows, self._layer_rows):
                rows.pop(stale, None)
            self._groups_with_gradients.discard(stale)

    def _gradient_reached(self, group: int) -> None:
        self._groups_with_gradients.add(group)
        self._backward_since_forward = True

    def sampled_gradients(self, output: torch.Tensor, params: list[torch.Tensor],
                          output_gradient: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """``torch.autograd.grad(output, params, output_gradient)`` as the optimizer's own sampled backward, whose
        gradients reach the records (``sampling``, for this call only: not one the closure itself may run)."""
        self.sampling = True
        try:
            return torch.autograd.grad(output, params, output_gradient, allow_unused=True)
        finally:
            self.sampling = False

    def _counts_this_pass(self, module: nn.Module | None) -> bool:
        """Whether the backward running now feeds the records: it is the optimizer's own (``sampling``), or it
        accumulates into the ``.grad`` of a trainable parameter of ``module`` (of the model for None, or where
        ``module`` has none), or nothing is trainable. The AccumulateGrad node that last said yes is kept per
        module and asked first (as DDP keeps them): a yes from it stands, anything else is asked again of the
        current parameters (one may have been replaced)."""
        if self.sampling:
            return True
        known = self._accumulators.get(module)
        if known is not None and (answer := _will_execute(known)) is not False:
            return bool(answer)  # None: inside torch.autograd.grad(), which accumulates into no .grad
        params = [p for p in module.parameters() if p.requires_grad] if module is not None else []
        if not params:
            whole = [self.root] if self.root is not None else self.modules
            params = [p for m in whole for p in m.parameters() if p.requires_grad]
        for p in params:
            node = _accumulator(p)
            if (answer := _will_execute(node)) is not False:
                if answer:
                    self._accumulators[module] = node
                return bool(answer)
        return not params

    def _output_reached(self, group: int, rows: int) -> None:
        """The backward reached the output of a root pass of ``group`` that had ``rows`` output rows."""
        if not self._counts_this_pass(None):
            return
        self._reached_rows[group] = rows
        self._gradient_reached(group)

    def _gradient_arrived(self, module: nn.Module, record: LayerRecord, grad: torch.Tensor) -> None:
        if not self._counts_this_pass(module):
            return
        grad = working_precision(grad.detach())
        # a second backward through a retained graph adds to the gradient, as it adds to p.grad
        record.grad_output = grad if record.grad_output is None else record.grad_output + grad
        self._gradient_reached(record.group)

    def _on_forward(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if not torch.is_grad_enabled() or _in_functorch_transform():
            return
        self._start_pass()
        unbatched = _is_unbatched(module, inputs[0]) if inputs and isinstance(inputs[0], torch.Tensor) else None
        if unbatched is not None:
            self._pass_saw_unbatched |= unbatched
            self._pass_saw_batched |= not unbatched
        if isinstance(output, torch.Tensor):
            self._layer_rows[self._group] = 1 if unbatched else _output_rows(output)
        if not (self.enabled and isinstance(output, torch.Tensor)):
            return
        if not output.requires_grad:
            return
        record = LayerRecord(tuple(working_precision(x.detach()) if isinstance(x, torch.Tensor) else x for x in inputs),
                             group=self._group)
        kept = self.records.setdefault(module, [])
        if len(kept) >= self.MAX_RECORDS:
            del kept[0]
            if not self._warned_full:
                self._warned_full = True
                warn(f"curvature capture: more than {self.MAX_RECORDS} calls of a layer recorded since the "
                     "optimizer's last step or zero_grad(); the oldest are dropped, so the next curvature "
                     "update sees only the latest. Forward passes with gradients outside training keep "
                     "recording: call optimizer.zero_grad() before them, or optimizer.remove_hooks() once "
                     "training is over")
        kept.append(record)
        output.register_hook(self._weak_gradient_hook(lambda capture, grad: capture._gradient_arrived(module, record,
                                                                                                   grad)))

    def _weak_gradient_hook(self, arrived: Callable[[ActivationCapture, torch.Tensor], None]):
        """A tensor hook calling ``arrived(capture, grad)`` while this capture lives: it holds the capture
        weakly, since the graph may outlive the optimizer and must not keep its capture alive."""
        capture = weakref.ref(self)

        def hook(grad: torch.Tensor) -> None:
            live = capture()
            if live is not None:
                arrived(live, grad)

        return hook

    def _on_root_forward(self, module: nn.Module, inputs: tuple, output: object) -> None:
        if not torch.is_grad_enabled() or _in_functorch_transform():
            return
        self._start_pass()  # a model without watched layers starts its groups here
        if self._pass_saw_unbatched and not self._pass_saw_batched:
            rows = 1
        elif isinstance(output, torch.Tensor) and output.dim() == 0:  # the model returns its loss
            rows = self._layer_rows.get(self._group, 1)
        elif isinstance(output, torch.Tensor):
            rows = _output_rows(output)
        elif (inner := _first_tensor(output, min_dim=2)) is not None:  # a tuple or dict: logits (B, T, V) first
            rows = _output_rows(inner)
        else:
            first = _first_tensor(inputs)
            rows = int(first.shape[0]) if first is not None and first.dim() > 0 else 1
        self._group_rows[self._group] = rows
        self._pass_saw_batched = self._pass_saw_unbatched = False
        if isinstance(output, torch.Tensor) and output.requires_grad:
            # the backward reaching the output marks the group, recorded layers or not (curvature="gnb"), and
            # says which pass's rows count
            group = self._group
            output.register_hook(self._weak_gradient_hook(lambda capture, grad: capture._output_reached(group, rows)))
        if self.enabled and isinstance(output, torch.Tensor):
            self.root_output = output

    def _on_root_pass_start(self) -> None:
        if self.keep_random_state and torch.is_grad_enabled() and not _in_functorch_transform():
            self.random_state = RandomDraws()

    def complete_records(self, module: nn.Module) -> list[LayerRecord]:
        """Records of ``module`` whose backward has run."""
        return [r for r in self.records.get(module, []) if r.grad_output is not None]

    def clear(self) -> None:
        self.records = {}
        self.root_output = None
        self.random_state = None
        self._group, self._backward_since_forward = 0, False
        self._group_rows, self._reached_rows, self._groups_with_gradients = {}, {}, set()
        self._layer_rows = {}
        self._pass_saw_batched = self._pass_saw_unbatched = False

    def remove(self) -> None:
        _remove_handles(self._handles)
        self._accumulators.clear()
        self.clear()
        self.removed = True


class _WeakCaptureHook:
    """A hook that feeds its capture while the capture lives (it holds it weakly).

    A copy or a pickle of the model gets an inert hook: the copy must not feed this capture (an evaluation
    or EMA copy would change the batch size and the records of the next step), and a capture is no state
    of the model. Subclasses pass what else they are built with as ``args``, which a copy keeps.
    """

    def __init__(self, capture: "ActivationCapture | None", *args: object) -> None:
        self._capture = None if capture is None else weakref.ref(capture)
        self._args = args

    def _live_capture(self) -> "ActivationCapture | None":
        return None if self._capture is None else self._capture()

    def __reduce__(self):
        return type(self), (None, *self._args)

    def __deepcopy__(self, memo: dict) -> "_WeakCaptureHook":
        return type(self)(None, *self._args)


class _CaptureHook(_WeakCaptureHook):
    """A forward hook on a recorded layer (``root=False``) or on the root model (``root=True``)."""

    def __init__(self, capture: "ActivationCapture | None", root: bool) -> None:
        super().__init__(capture, root)
        self._root = root

    def __call__(self, module: nn.Module, args: tuple, *kwargs_and_output) -> None:
        # Registered with its keyword arguments (module(input=x) has no positional one): (kwargs, output); a
        # hook pickled by an earlier version comes without: (output,).
        kwargs, output = kwargs_and_output if len(kwargs_and_output) == 2 else ({}, kwargs_and_output[0])
        capture = self._live_capture()
        if capture is not None:
            inputs = args if args or not kwargs else tuple(v for v in kwargs.values() if isinstance(v, torch.Tensor))
            (capture._on_root_forward if self._root else capture._on_forward)(module, inputs, output)


class _PassStartHook(_WeakCaptureHook):
    """A forward pre-hook on the root model that tells its capture a pass starts."""

    def __call__(self, module: nn.Module, args: tuple) -> None:
        capture = self._live_capture()
        if capture is not None:
            capture._on_root_pass_start()


def warn_no_records(optimizer: str, step: int) -> None:
    """Warn that a step meant to use recorded layer inputs found none."""
    warn(f"{optimizer}: no layer inputs were recorded for the curvature of step {step}, so it falls back "
         "or skips the update: zero_grad() between the forward pass and backward() drops them, and "
         "gradients taken with torch.autograd.grad() give none. Call optimizer.zero_grad() before the "
         "forward pass and loss.backward() after it. A model compiled with torch.compile that ran a "
         "forward pass with gradients before this optimizer was built keeps running that compiled code, "
         "without the optimizer's hooks: build the optimizer before the first compiled forward pass, or "
         "call torch._dynamo.reset() after building it")


def _remove_handles(handles: list) -> None:
    for handle in handles:
        handle.remove()
    handles.clear()


def _is_per_sample_module(module: nn.Module) -> bool:
    # A parametrised weight (torch.nn.utils.parametrize: weight norm, orthogonal, ...) is a function of the
    # parameters, not one of them: its per-sample gradients are not theirs.
    return isinstance(module, (PerSampleGradients, nn.Linear, nn.LayerNorm)) and not parametrize.is_parametrized(module)


def per_sample_modules(model: nn.Module) -> list[nn.Module]:
    """Modules of ``model`` with exact per-sample gradients; a matched module's children are not visited
    (a composite layer implementing the protocol already covers its sub-layers)."""
    found: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        if _is_per_sample_module(module):
            found.append(module)
            return
        for child in module.children():
            visit(child)

    visit(model)
    return found


def _as_samples(t: torch.Tensor) -> torch.Tensor:
    """``(B, ..., F)`` -> ``(B, T, F)`` with the middle dimensions flattened (T=1 for 2-D input); an
    unbatched ``(F,)`` is a batch of one."""
    return t.reshape(1, 1, -1) if t.dim() == 1 else t.reshape(t.shape[0], -1, t.shape[-1])


def per_sample_grads(module: nn.Module, record: LayerRecord) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients ``(B, *p.shape)`` of ``module``'s parameters for one recorded call."""
    if isinstance(module, PerSampleGradients):
        inputs, grad_output = record.inputs, record.grad_output
        if isinstance(inputs[0], torch.Tensor) and inputs[0].dim() == 1:  # unbatched (in,): a batch of one
            inputs, grad_output = (inputs[0].unsqueeze(0), *inputs[1:]), grad_output.unsqueeze(0)
        return module.per_sample_grads(inputs, grad_output)
    x, g = record.inputs[0], record.grad_output
    out: dict[nn.Parameter, torch.Tensor] = {}
    if isinstance(module, nn.Linear):
        x3, g3 = _as_samples(x), _as_samples(g)  # (B, T, in), (B, T, out)
        out[module.weight] = torch.einsum("bto,bti->boi", g3, x3)
        if module.bias is not None:
            out[module.bias] = g3.sum(1)
        return out
    if isinstance(module, nn.LayerNorm):
        shape = module.normalized_shape
        if x.dim() == len(shape):  # unbatched: a batch of one
            x, g = x.unsqueeze(0), g.unsqueeze(0)
        x_hat = F.layer_norm(x, shape, None, None, module.eps)
        reduce_dims = tuple(range(1, x.dim() - len(shape)))
        if module.weight is not None:
            out[module.weight] = (g * x_hat).sum(reduce_dims) if reduce_dims else g * x_hat
        if module.bias is not None:
            out[module.bias] = g.sum(reduce_dims) if reduce_dims else g
        return out
    raise TypeError(f"module: no per-sample gradients for {type(module).__name__}")


def parameter_owners(model: nn.Module, units: list[nn.Module]) -> dict[nn.Parameter, list[nn.Module]]:
    """Each parameter of ``model`` -> the distinct modules that own it: a module in ``units`` owns every
    parameter of its sub-tree, any other module the parameters it registers itself. A parameter with
    more than one owner is shared (a tied embedding and output head, two layers with one weight)."""
    unit_ids = {id(m) for m in units}
    owners: dict[nn.Parameter, list[nn.Module]] = {}
    visited: set[int] = set()

    def add(module: nn.Module, params) -> None:
        for p in params:
            listed = owners.setdefault(p, [])
            if not any(m is module for m in listed):
                listed.append(module)

    def visit(module: nn.Module) -> None:
        if id(module) in visited:  # a module reused at two places of the tree is one owner
            return
        visited.add(id(module))
        if id(module) in unit_ids:
            add(module, module.parameters())
            return
        add(module, module.parameters(recurse=False))
        for child in module.children():
            visit(child)

    visit(model)
    return owners


def summed_per_sample_grads(calls: list[tuple[nn.Module, LayerRecord]]) -> dict[nn.Parameter, torch.Tensor] | None:
    """Per-sample gradients ``(B, *p.shape)`` summed over several calls of one group of forward passes (a
    module applied twice, or modules sharing a weight); None when the calls do not see the same batch size."""
    sums: dict[nn.Parameter, torch.Tensor] = {}
    for module, record in calls:
        for p, psg in per_sample_grads(module, record).items():
            if p in sums and sums[p].shape[0] != psg.shape[0]:
                return None
            sums[p] = sums[p] + psg if p in sums else psg
    return sums


def _squared_grad_sums_of_call(module: nn.Module, record: LayerRecord) -> dict[nn.Parameter, torch.Tensor]:
    """``sum_i (per-sample grad_i)^2`` of one call; for a 2-D ``nn.Linear`` input as ``(g^2)^T (a^2)``, without
    forming per-sample tensors."""
    if isinstance(module, nn.Linear) and record.inputs[0].dim() == 2:
        x, g = record.inputs[0], record.grad_output
        parts = {module.weight: (g * g).t() @ (x * x)}
        if module.bias is not None:
            parts[module.bias] = (g * g).sum(0)
        return parts
    return {p: (psg * psg).sum(0) for p, psg in per_sample_grads(module, record).items()}


def squared_grad_sums(
    calls: list[tuple[nn.Module, LayerRecord]], per_call_fallback: bool = True
) -> dict[nn.Parameter, torch.Tensor] | None:
    """``sum_i (per-sample grad_i)^2`` per parameter over recorded calls.

    Within one group of forward passes (``ActivationCapture``), the per-sample gradient of sample i is summed
    over the group's calls before squaring (exact for a module applied several times, or a weight shared by
    several modules). Different groups are different samples (the micro-batches of an accumulated gradient):
    their squares add. Calls of one group with different batch sizes cannot be matched sample by sample:
    their squares are summed per call, or, without ``per_call_fallback``, the result is None.
    """
    by_group: dict[int, list[tuple[nn.Module, LayerRecord]]] = {}
    for module, record in calls:
        by_group.setdefault(record.group, []).append((module, record))
    sums: dict[nn.Parameter, torch.Tensor] = {}
    for group_calls in by_group.values():
        summed = summed_per_sample_grads(group_calls) if len(group_calls) > 1 else None
        if summed is not None:
            parts = [{p: (psg * psg).sum(0) for p, psg in summed.items()}]
        elif len(group_calls) > 1 and not per_call_fallback:
            return None
        else:
            parts = [_squared_grad_sums_of_call(module, record) for module, record in group_calls]
        for part in parts:
            for p, value in part.items():
                sums[p] = sums[p] + value if p in sums else value
    return sums
