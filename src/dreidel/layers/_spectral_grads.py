"""The spectral linear layers' maths as torch ops (the reference path), and the dispatch to the native kernels.

Notation (one row; ``B`` stacked blocks of transform length ``L``, flattened to ``B·L``):
``a_1 = P_1 (s_in ⊙ pad(x))``, ``h_k = H a_k``, ``a_k = P_k (s_{k-1} ⊙ h_{k-1})`` for ``k = 2..K``,
``y = s_out ⊙ h_K[:out] + b``. The gradient ``g`` at ``y`` gives
``∂b = g``, ``∂s_out = g ⊙ h_K``, and, going down with ``∂h_K = pad(s_out ⊙ g)``:
``∂a_k = H ∂h_k`` (``H`` is symmetric), ``∂s_{k-1} = (P_kᵀ ∂a_k) ⊙ h_{k-1}``, ``∂h_{k-1} = (P_kᵀ ∂a_k) ⊙ s_{k-1}``,
and at the bottom ``u = P_1ᵀ ∂a_1`` (restricted to the unpadded entries), ``∂s_in = u ⊙ x``, ``∂x = Σ_blocks u ⊙ s_in``.

Every quantity is an elementwise product of vectors recomputed in ``O(K · B·L log L)`` per row, so the same
code serves the autograd backward (everything summed over rows) and the per-sample gradients of the
``PerSampleGradients`` protocol (summed only over the positions between batch and features). Writing the
backward by hand (rather than letting autograd differentiate gathers) replaces scatter-adds by gathers with
the inverse permutation and runs the transforms in place.

Three entry points share these functions: eager CPU float32/float64 calls the fused native kernels
(``_spectral_native``); everything else calls the registered ops ``dreidel::spectral_linear`` and
``dreidel::spectral_linear_backward``, whose implementations pick the native kernels where they run (CPU,
float32/float64, e.g. inside a ``torch.compile`` graph) and this reference path elsewhere (other devices);
and the per-sample gradients call the same pair directly. CPU float16/bfloat16 layers compute in float32
(``spectral_linear`` upcasts, then takes float32's path) and round their output once. Inside ``torch.func``
transforms (vmap, grad, jacrev, ...), which neither the raw kernels nor custom ops' generated autograd
support, the layer is the plain composition of differentiable torch ops and ``fwht`` in
``spectral_linear_composed``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from dreidel.algo import fwht, fwht_into, in_functorch_transform, runs_native_eager
from dreidel.algo._fwht import _is_legacy_batched, _refuse_a_tangent
from dreidel.layers._spectral_native import (NativeSpectralLinear, native_spectral_forward, native_spectral_grads,
                                             needs_differentiable_backward, vjp_of)

if TYPE_CHECKING:
    from dreidel.layers._spectral import _SpectralLinearBase

__all__ = ["SpectralLayout", "spectral_forward", "spectral_grads", "spectral_linear", "spectral_linear_composed",
           "spectral_per_sample_grads", "spectral_stages"]

_forward_ad = torch.autograd.forward_ad
_LOW_PRECISION = (torch.float16, torch.bfloat16)
_is_compiling = torch.compiler.is_compiling


class SpectralLayout(NamedTuple):
    """Index tensors and sizes of one spectral layer (see ``_SpectralLinearBase._build_indices``)."""

    input_gather: torch.Tensor  # (B·L,) int32: position of x read by each entry of a_1 (pads read n: a zero column)
    scale_gather: torch.Tensor  # (B·L,) int32: position in s_in (padded by 1 zero per block if n < L) per entry of a_1
    flat_perm: torch.Tensor  # (K, B·L) int32: P_k over the stacked layout
    flat_inverse: torch.Tensor  # (K, B·L) int32: P_kᵀ
    input_scatter: torch.Tensor  # (B·n,) int32: where x_i of block b sits in a_1
    length: int
    blocks: int
    out_features: int


def _transform_(z: torch.Tensor, layout: SpectralLayout) -> torch.Tensor:
    """In-place orthonormal FWHT of each length-``L`` block of ``z`` ``(rows, B·L)``."""
    rows = z.shape[0]
    if runs_native_eager(z):  # the kernel directly, without the custom op's dispatch; traced code keeps the op
        fwht_into(z.view(-1, layout.length), z.view(-1, layout.length), True)
        return z
    return fwht(z.view(rows, layout.blocks, layout.length), inplace=True).view(z.shape)  # -1: ambiguous at 0 rows


def _gathered_input(x: torch.Tensor, layout: SpectralLayout) -> torch.Tensor:
    """``x`` ``(rows, n)`` gathered into the first stage's order ``(rows, B·L)``; where ``n < L`` the padded
    entries read a zero column appended to ``x`` (``input_gather``)."""
    return (x if x.shape[1] == layout.length else F.pad(x, (0, 1))).index_select(1, layout.input_gather)


def spectral_stages(
    x: torch.Tensor, in_scale: torch.Tensor, inner_scale: torch.Tensor | None, layout: SpectralLayout
) -> list[torch.Tensor]:
    """``[h_1, …, h_K]``, each ``(rows, B·L)``, for ``x`` ``(rows, n)``. No autograd: call under no_grad or in a Function."""
    if in_scale.shape[-1] == layout.length:  # no padding: scale_gather is P_1 itself
        scale = in_scale.reshape(-1).index_select(0, layout.scale_gather)
    else:  # one zero slot per block stands for the padded entries
        scale = F.pad(in_scale, (0, 1)).reshape(-1).index_select(0, layout.scale_gather)
    z = _gathered_input(x, layout).mul_(scale)
    stages = [_transform_(z, layout)]
    for k in range(1, layout.flat_perm.shape[0]):
        perm = layout.flat_perm[k]
        scale = inner_scale[k - 1].reshape(-1).index_select(0, perm)
        z = stages[-1].index_select(1, perm).mul_(scale)
        stages.append(_transform_(z, layout))
    return stages


def _spectral_vjp(
    x: torch.Tensor,
    grad: torch.Tensor,
    stages: list[torch.Tensor],
    in_scale: torch.Tensor,
    inner_scale: torch.Tensor | None,
    out_scale: torch.Tensor,
    layout: SpectralLayout,
    want_input_grad: bool,
) -> dict[str, torch.Tensor]:
    """Gradients per group: inputs are ``(G, M, ·)``; parameter gradients are summed over ``M`` → ``(G, ·)``.

    ``x`` ``(G, M, n)``, ``grad`` ``(G, M, out)`` (at the pre-activation), ``stages[k]`` ``(G, M, B·L)``.
    Returns "bias", "out_scale", "inner_scale" (``(G, K-1, B, L)``, if any), "in_scale" (``(G, B, n)``) and,
    when asked, "input" ``(G, M, n)``.
    """
    groups, rows_per_group, n = x.shape
    blocks, length, out = layout.blocks, layout.length, layout.out_features
    rows, width = groups * rows_per_group, blocks * length
    # Two full-size allocations in all (large CPU allocations cost page faults): ``scratch`` and ``at_inputs``.
    scratch = torch.empty((groups, rows_per_group, width), dtype=grad.dtype, device=grad.device)
    head = scratch[..., :out]
    grads = {"bias": grad.sum(1), "out_scale": torch.mul(grad, stages[-1][..., :out], out=head).sum(1)}
    torch.mul(grad, out_scale, out=head)  # ∂h_K, zero-padded to B·L
    if width > out:
        scratch[..., out:].zero_()
    grad_h = scratch.view(rows, width)
    inner_grads = []
    for k in range(layout.flat_perm.shape[0] - 1, 0, -1):
        unpermuted = _transform_(grad_h, layout).index_select(1, layout.flat_inverse[k])  # P_kᵀ H ∂h_k
        product = torch.mul(unpermuted, stages[k - 1].reshape(rows, width), out=grad_h)
        inner_grads.append(product.view(groups, rows_per_group, blocks, length).sum(1))
        grad_h = unpermuted.mul_(inner_scale[k - 1].reshape(-1))  # ∂h_{k-1}
    if inner_grads:
        grads["inner_scale"] = torch.stack(inner_grads[::-1], dim=1)
    at_inputs = _transform_(grad_h, layout).index_select(1, layout.input_scatter).view(rows, blocks, n)
    product = torch.mul(at_inputs, x.reshape(rows, 1, n), out=grad_h[:, : blocks * n].view(rows, blocks, n))
    grads["in_scale"] = product.view(groups, rows_per_group, blocks, n).sum(1)
    if want_input_grad:
        at_inputs = at_inputs.view(groups, rows_per_group, blocks, n).mul_(in_scale)
        grads["input"] = at_inputs[..., 0, :] if blocks == 1 else at_inputs.sum(-2)
    return grads


def spectral_forward(x: torch.Tensor, in_scale: torch.Tensor, inner_scale: torch.Tensor | None,
                     out_scale: torch.Tensor, bias: torch.Tensor | None, layout: SpectralLayout) -> torch.Tensor:
    """``y`` ``(rows, out)`` for ``x`` ``(rows, n)``, no autograd: the native kernel where it runs, else the reference."""
    if runs_native_eager(x, in_scale, inner_scale, out_scale, bias):
        return native_spectral_forward(x, in_scale, inner_scale, out_scale, bias, layout.flat_perm, layout.length)
    spectral = spectral_stages(x, in_scale, inner_scale, layout)[-1][:, : layout.out_features]
    return spectral * out_scale if bias is None else torch.addcmul(bias, spectral, out_scale)


def spectral_grads(x: torch.Tensor, grad: torch.Tensor, in_scale: torch.Tensor, inner_scale: torch.Tensor | None,
                   out_scale: torch.Tensor, has_bias: bool, layout: SpectralLayout, groups: int,
                   want_input_grad: bool) -> dict[str, torch.Tensor]:
    """Gradients for ``x`` ``(rows, n)`` and ``grad`` ``(rows, out)``, parameter gradients summed within ``groups``
    equal groups of rows; keys and shapes as ``_spectral_native.native_spectral_grads``. No autograd."""
    if runs_native_eager(x, grad, in_scale, inner_scale, out_scale):
        return native_spectral_grads(x, grad, in_scale, inner_scale, out_scale, has_bias, layout.flat_perm,
                                     layout.length, groups, want_input_grad)
    rows, n = x.shape
    per_group = rows // groups  # the widths below are spelled out: -1 is ambiguous when there are no rows
    with torch.no_grad():
        stages = [h.view(groups, per_group, h.shape[-1]) for h in spectral_stages(x, in_scale, inner_scale, layout)]
    grads = _spectral_vjp(x.view(groups, per_group, n), grad.view(groups, per_group, grad.shape[-1]), stages,
                          in_scale, inner_scale, out_scale, layout, want_input_grad)
    if not has_bias:
        del grads["bias"]
    if want_input_grad:
        grads["input"] = grads["input"].reshape(rows, n)
    return grads


# The traceable form: custom ops (with fake implementations and autograd) that torch.compile keeps as calls,
# so compiled models run the same native kernels on CPU; elsewhere they run the reference path.
@torch.library.custom_op("dreidel::spectral_linear", mutates_args=())
def _spectral_linear_op(x: torch.Tensor, in_scale: torch.Tensor, inner_scale: torch.Tensor | None,
                        out_scale: torch.Tensor, bias: torch.Tensor | None, indices: list[torch.Tensor], length: int,
                        blocks: int, out_features: int) -> torch.Tensor:
    for tensor in (x, in_scale, inner_scale, out_scale, bias):
        if tensor is not None:  # no forward-mode formula: a tangent would be dropped (the layers go around)
            _refuse_a_tangent(tensor, "dreidel::spectral_linear", instead="the spectral layer")
    return spectral_forward(x, in_scale, inner_scale, out_scale, bias,
                            SpectralLayout(*indices, length, blocks, out_features))


@_spectral_linear_op.register_fake
def _spectral_linear_op_fake(x, in_scale, inner_scale, out_scale, bias, indices, length, blocks, out_features):
    return x.new_empty((x.shape[0], out_features))


_GRAD_NAMES = ("input", "in_scale", "inner_scale", "out_scale", "bias")


@torch.library.custom_op("dreidel::spectral_linear_backward", mutates_args=())
def _spectral_linear_backward_op(
    x: torch.Tensor, grad: torch.Tensor, in_scale: torch.Tensor, inner_scale: torch.Tensor | None,
    out_scale: torch.Tensor, indices: list[torch.Tensor], length: int, blocks: int, out_features: int,
    has_bias: bool, want_input_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients in ``_GRAD_NAMES`` order, parameter ones with a leading group dimension of 1; an empty
    tensor stands for one that does not exist or is not wanted."""
    grads = spectral_grads(x, grad, in_scale, inner_scale, out_scale, has_bias,
                           SpectralLayout(*indices, length, blocks, out_features), 1, want_input_grad)
    return tuple(grads[name] if name in grads else x.new_empty(0) for name in _GRAD_NAMES)


@_spectral_linear_backward_op.register_fake
def _spectral_linear_backward_op_fake(x, grad, in_scale, inner_scale, out_scale, indices, length, blocks,
                                      out_features, has_bias, want_input_grad):
    shapes = {"input": x.shape if want_input_grad else None, "in_scale": (1, *in_scale.shape),
              "inner_scale": None if inner_scale is None else (1, *inner_scale.shape),
              "out_scale": (1, *out_scale.shape), "bias": (1, *out_scale.shape) if has_bias else None}
    return tuple(x.new_empty(shapes[name] if shapes[name] is not None else 0) for name in _GRAD_NAMES)


def _spectral_linear_setup_context(ctx, inputs, output) -> None:
    x, in_scale, inner_scale, out_scale, bias, indices, length, blocks, out_features = inputs
    ctx.sizes = (length, blocks, out_features)
    ctx.has_inner, ctx.has_bias = inner_scale is not None, bias is not None
    ctx.save_for_backward(x, in_scale, inner_scale, out_scale, *indices)


def _spectral_linear_backward(ctx, grad):
    x, in_scale, inner_scale, out_scale, *indices = ctx.saved_tensors
    # create_graph=True, batched gradients or a tangent (see needs_differentiable_backward): differentiate the
    # composed form, whose ops have derivatives, batching rules and forward-mode formulas
    if needs_differentiable_backward(grad):
        return (*_composed_vjp(ctx, grad, x, in_scale, inner_scale, out_scale, indices), [None] * len(indices),
                None, None, None)
    grads = dict(zip(_GRAD_NAMES, _spectral_linear_backward_op(
        x, grad.contiguous(), in_scale, inner_scale if ctx.has_inner else None, out_scale, indices, *ctx.sizes,
        ctx.has_bias, ctx.needs_input_grad[0])))
    return (
        grads["input"] if ctx.needs_input_grad[0] else None,
        grads["in_scale"][0],
        grads["inner_scale"][0] if ctx.has_inner else None,
        grads["out_scale"][0],
        grads["bias"][0] if ctx.has_bias else None,
        [None] * len(indices),
        None, None, None,
    )


def _composed_vjp(ctx, grad, x, in_scale, inner_scale, out_scale, indices) -> list[torch.Tensor | None]:
    """The op's input gradients as a differentiable graph (second derivatives, Hessian-vector products)."""
    layout = SpectralLayout(*indices, *ctx.sizes)
    # The bias enters additively: its value does not change any gradient, a zero stands in for it.
    bias = out_scale.new_zeros(out_scale.shape).requires_grad_() if ctx.has_bias else None
    inputs = (x, in_scale, inner_scale if ctx.has_inner else None, out_scale, bias)
    return vjp_of(lambda *aliases: spectral_linear_composed(*aliases, layout), inputs, ctx.needs_input_grad[:5], grad)


_spectral_linear_op.register_autograd(_spectral_linear_backward, setup_context=_spectral_linear_setup_context)


def spectral_linear_composed(rows: torch.Tensor, in_scale: torch.Tensor, inner_scale: torch.Tensor | None,
                             out_scale: torch.Tensor, bias: torch.Tensor | None,
                             layout: SpectralLayout) -> torch.Tensor:
    """``y`` ``(rows, out)`` for ``rows`` ``(rows, n)`` as differentiable torch ops and ``fwht`` (which carries
    ``torch.func`` transforms): the forward of ``spectral_stages`` without in-place updates, left to autograd."""
    if in_scale.shape[-1] == layout.length:
        scale = in_scale.reshape(-1).index_select(0, layout.scale_gather)
    else:  # one zero slot per block stands for the padded entries
        scale = F.pad(in_scale, (0, 1)).reshape(-1).index_select(0, layout.scale_gather)
    blocks, stacked = (-1, layout.blocks, layout.length), (rows.shape[0], layout.blocks * layout.length)
    # reshape, not flatten: legacy vmap (batched gradients) has no batching rule for flatten
    h = fwht(_gathered_input(rows, layout).mul(scale).reshape(blocks)).reshape(stacked)
    for k in range(1, layout.flat_perm.shape[0]):
        perm = layout.flat_perm[k]
        scale = inner_scale[k - 1].reshape(-1).index_select(0, perm)
        h = fwht(h.index_select(1, perm).mul(scale).reshape(blocks)).reshape(stacked)
    # a slice of all of h is an alias, which legacy vmap cannot batch either
    spectral = h if layout.out_features == stacked[1] else h[:, : layout.out_features]
    return spectral * out_scale if bias is None else torch.addcmul(bias, spectral, out_scale)


def spectral_linear(x: torch.Tensor, in_scale: torch.Tensor, inner_scale: torch.Tensor | None,
                    out_scale: torch.Tensor, bias: torch.Tensor | None, layout: SpectralLayout) -> torch.Tensor:
    """The affine part of a spectral layer for ``x`` ``(*, n)`` → ``(*, out)``; differentiable in all inputs.

    Eager CPU float32/float64 calls the fused native kernels through a plain ``autograd.Function`` (a few
    microseconds of overhead); traced code, other devices and other dtypes go through the registered op
    ``dreidel::spectral_linear``, which runs the same kernels on CPU and the reference path elsewhere;
    ``torch.func`` transforms and forward-mode AD get ``spectral_linear_composed``.
    """
    flat = x.dim() == 2  # the common case: no reshape and no view back (each costs microseconds a call)
    rows = x if flat else x.reshape(-1, x.shape[-1])
    if rows.dtype in _LOW_PRECISION and rows.is_cpu:
        # float16/bfloat16 on CPU: computed in float32 on upcast copies (differentiable casts) by whichever path
        # float32 takes, the result rounded once, as fwht computes them; the reference path in the low dtype ran
        # 3.6x slower (batch 256, 1024 features, 1 thread, Xeon) and rounded at every stage.
        y = spectral_linear(rows.float(), *(None if t is None else t.float() for t in (in_scale, inner_scale,
                                                                                     out_scale, bias)),
                            layout).to(rows.dtype)
    # torch.func, forward-mode AD, or legacy vmap (batched gradients), which torch.compile cannot trace a test
    # for (a graph break) and never carries
    elif (in_functorch_transform() or _forward_ad._current_level >= 0
            or (not _is_compiling() and _is_legacy_batched(rows))):
        y = spectral_linear_composed(rows, in_scale, inner_scale, out_scale, bias, layout)
    elif not runs_native_eager(rows, in_scale, inner_scale, out_scale, bias):
        y = _spectral_linear_op(rows, in_scale, inner_scale, out_scale, bias, list(layout[:5]), *layout[5:])
    elif torch.is_grad_enabled() and (x.requires_grad or in_scale.requires_grad or out_scale.requires_grad
                                      or (inner_scale is not None and inner_scale.requires_grad)
                                      or (bias is not None and bias.requires_grad)):
        y = NativeSpectralLinear.apply(rows, in_scale, inner_scale, out_scale, bias, layout, spectral_linear_composed)
    else:
        y = native_spectral_forward(rows, in_scale, inner_scale, out_scale, bias, layout.flat_perm, layout.length)
    return y if flat else y.view(*x.shape[:-1], layout.out_features)


def spectral_per_sample_grads(
    layer: "_SpectralLinearBase", inputs: tuple[torch.Tensor, ...], grad_output: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients ``{param: (batch, *param.shape)}`` of a ``LinearWHT`` / ``DeepSpectralLinear``.

    Args:
        inputs: the forward call's positional inputs; ``inputs[0]`` is ``(batch, ..., in_features)``.
        grad_output: ``(batch, ..., out_features)``, the loss gradient at the layer output (after the activation).
    """
    if torch.nn.utils.parametrize.is_parametrized(layer):  # its parameters are not the tensors the forward uses
        raise NotImplementedError(f"per_sample_grads: {type(layer).__name__} has a parametrization "
                                  "(torch.nn.utils.parametrize); per-sample gradients of its original parameters "
                                  "are not computed")
    x = inputs[0]
    weight_dtype = layer.in_scale.dtype
    # Curvature code hands over float32 copies of a low-precision layer's input and output gradient: the
    # per-sample gradients are then computed in float32 too (with float32 copies of the parameters).
    compute_dtype = x.dtype if (isinstance(x, torch.Tensor) and x.dtype == torch.float32
                                and weight_dtype in (torch.float16, torch.bfloat16)) else weight_dtype
    # Checked as the layer's own input would be; for a float32 copy, a stand-in of the parameters' dtype with
    # x's shape and device (an expanded scalar: converting x would copy all of it just for the check).
    layer._check_input(x if compute_dtype == weight_dtype
                       else torch.empty((), dtype=weight_dtype, device=x.device).expand(x.shape))
    if x.dim() < 2:
        raise ValueError(f"inputs[0] needs a batch dimension: expected (batch, ..., in_features), got {tuple(x.shape)}")
    if grad_output.shape[:-1] != x.shape[:-1] or grad_output.shape[-1] != layer.out_features:
        raise ValueError(
            f"grad_output must have shape {(*x.shape[:-1], layer.out_features)}, got {tuple(grad_output.shape)}"
        )
    batch, n, out = x.shape[0], layer.in_features, layer.out_features
    named = {"in_scale": layer.in_scale, "inner_scale": layer.inner_scale, "out_scale": layer.out_scale,
             "bias": layer.bias}
    if x.numel() == 0:  # no rows (an empty batch, or samples of no positions): every sum below is empty
        return {p: torch.zeros((batch, *p.shape), dtype=compute_dtype, device=p.device)
                for p in named.values() if p is not None}
    layout = layer.layout()
    x2 = x.detach().reshape(-1, n)  # (batch·M, n): M positions per sample, consecutive
    grad2 = grad_output.detach().reshape(-1, out).to(compute_dtype)
    in_scale, out_scale = layer.in_scale.detach().to(compute_dtype), layer.out_scale.detach().to(compute_dtype)
    inner_scale = None if layer.inner_scale is None else layer.inner_scale.detach().to(compute_dtype)
    bias = None if layer.bias is None else layer.bias.detach().to(compute_dtype)
    if layer._activation_fn is not None:  # chain through the activation at the recomputed pre-activation
        with torch.enable_grad():
            pre = spectral_forward(x2, in_scale, inner_scale, out_scale, bias, layout).requires_grad_(True)
            (grad2,) = torch.autograd.grad(layer._activation_fn(pre), pre, grad2)
    grads = spectral_grads(x2, grad2, in_scale, inner_scale, out_scale, bias is not None, layout, groups=batch,
                           want_input_grad=False)
    return {named[name]: value for name, value in grads.items() if named[name] is not None}
