"""Forward stages, hand-written backward and per-sample gradients of the spectral linear layers.

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
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from dreidel.algo import fwht, fwht_into, runs_native_eager
from dreidel.layers._spectral_native import NativeSpectralLinear, native_spectral_forward, native_spectral_grads

if TYPE_CHECKING:
    from dreidel.layers._spectral import _SpectralLinearBase

__all__ = ["SpectralLayout", "spectral_linear", "spectral_per_sample_grads", "spectral_stages"]


class SpectralLayout(NamedTuple):
    """Index tensors and sizes of one spectral layer (see ``_SpectralLinearBase._build_indices``)."""

    input_gather: torch.Tensor  # (B·L,) int32: position of x read by each entry of a_1 (pads read 0)
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
    return fwht(z.view(rows, layout.blocks, layout.length), inplace=True).view(rows, -1)


def spectral_stages(
    x: torch.Tensor, in_scale: torch.Tensor, inner_scale: torch.Tensor | None, layout: SpectralLayout
) -> list[torch.Tensor]:
    """``[h_1, …, h_K]``, each ``(rows, B·L)``, for ``x`` ``(rows, n)``. No autograd: call under no_grad or in a Function."""
    if in_scale.shape[-1] == layout.length:  # no padding: scale_gather is P_1 itself
        scale = in_scale.reshape(-1).index_select(0, layout.scale_gather)
    else:  # one zero slot per block stands for the padded entries
        scale = F.pad(in_scale, (0, 1)).reshape(-1).index_select(0, layout.scale_gather)
    z = x.index_select(1, layout.input_gather).mul_(scale)
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


class _SpectralLinearFunction(torch.autograd.Function):
    """``y = s_out ⊙ h_K[:, :out] + b`` for ``x`` ``(rows, n)``, with the hand-written backward above."""

    @staticmethod
    def forward(ctx, x, in_scale, inner_scale, out_scale, bias, input_gather, scale_gather, flat_perm,
                flat_inverse, input_scatter, length, blocks, out_features):
        layout = SpectralLayout(input_gather, scale_gather, flat_perm, flat_inverse, input_scatter,
                                length, blocks, out_features)
        stages = spectral_stages(x, in_scale, inner_scale, layout)
        spectral = stages[-1][:, :out_features]
        y = spectral * out_scale if bias is None else torch.addcmul(bias, spectral, out_scale)
        ctx.layout_sizes = (length, blocks, out_features)
        ctx.has_inner, ctx.has_bias = inner_scale is not None, bias is not None
        inner = inner_scale if inner_scale is not None else in_scale.new_empty(0)
        ctx.save_for_backward(x, in_scale, inner, out_scale, input_gather, scale_gather, flat_perm,
                              flat_inverse, input_scatter, *stages)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, in_scale, inner, out_scale, *indices = ctx.saved_tensors
        layout = SpectralLayout(*indices[:5], *ctx.layout_sizes)
        stages = [s.unsqueeze(0) for s in indices[5:]]
        grads = _spectral_vjp(x.unsqueeze(0), grad_y.contiguous().unsqueeze(0), stages, in_scale,
                              inner if ctx.has_inner else None, out_scale, layout, ctx.needs_input_grad[0])
        return (
            grads["input"][0] if ctx.needs_input_grad[0] else None,
            grads["in_scale"][0],
            grads["inner_scale"][0] if ctx.has_inner else None,
            grads["out_scale"][0],
            grads["bias"][0] if ctx.has_bias else None,
            None, None, None, None, None, None, None, None,
        )


def spectral_linear(x: torch.Tensor, in_scale: torch.Tensor, inner_scale: torch.Tensor | None,
                    out_scale: torch.Tensor, bias: torch.Tensor | None, layout: SpectralLayout) -> torch.Tensor:
    """The affine part of a spectral layer for ``x`` ``(*, n)`` → ``(*, out)``; differentiable in all inputs.

    Eager CPU float32/float64 runs the fused native kernels (``_spectral_native``); everything else (traced
    code, other devices and dtypes) runs the reference composition of torch ops above.
    """
    lead = x.shape[:-1]
    rows = x.reshape(-1, x.shape[-1])
    params = (in_scale, out_scale) + tuple(t for t in (inner_scale, bias) if t is not None)
    native = runs_native_eager(rows, *params)
    differentiable = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))
    if differentiable and native:
        y = NativeSpectralLinear.apply(rows, in_scale, inner_scale, out_scale, bias, layout.flat_perm, layout.length)
    elif differentiable:
        y = _SpectralLinearFunction.apply(rows, in_scale, inner_scale, out_scale, bias, *layout)
    elif native:
        y = native_spectral_forward(rows, in_scale, inner_scale, out_scale, bias, layout.flat_perm, layout.length)
    else:  # inference: the same computation without the autograd.Function bookkeeping
        spectral = spectral_stages(rows, in_scale, inner_scale, layout)[-1][:, : layout.out_features]
        y = spectral * out_scale if bias is None else torch.addcmul(bias, spectral, out_scale)
    return y.view(*lead, layout.out_features)


def spectral_per_sample_grads(
    layer: "_SpectralLinearBase", inputs: tuple[torch.Tensor, ...], grad_output: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients ``{param: (batch, *param.shape)}`` of a ``LinearWHT`` / ``DeepSpectralLinear``.

    Args:
        inputs: the forward call's positional inputs; ``inputs[0]`` is ``(batch, ..., in_features)``.
        grad_output: ``(batch, ..., out_features)``, the loss gradient at the layer output (after the activation).
    """
    x = inputs[0]
    layer._check_input(x)
    if x.dim() < 2:
        raise ValueError(f"inputs[0] needs a batch dimension: expected (batch, ..., in_features), got {tuple(x.shape)}")
    if grad_output.shape[:-1] != x.shape[:-1] or grad_output.shape[-1] != layer.out_features:
        raise ValueError(
            f"grad_output must have shape {(*x.shape[:-1], layer.out_features)}, got {tuple(grad_output.shape)}"
        )
    batch, n, out = x.shape[0], layer.in_features, layer.out_features
    layout = layer.layout()
    x3 = x.detach().reshape(batch, -1, n)  # (batch, M, n)
    grad = grad_output.detach().reshape(batch, -1, out)  # (batch, M, out)
    in_scale, out_scale = layer.in_scale.detach(), layer.out_scale.detach()
    inner_scale = None if layer.inner_scale is None else layer.inner_scale.detach()
    bias = None if layer.bias is None else layer.bias.detach()
    native = runs_native_eager(x3, grad, in_scale, out_scale)
    if native:
        stages = None
        pre = None if layer._activation_fn is None else native_spectral_forward(
            x3.reshape(-1, n), in_scale, inner_scale, out_scale, bias, layout.flat_perm, layout.length
        ).view(batch, -1, out)
    else:
        with torch.no_grad():
            stages = [h.view(batch, -1, h.shape[-1]) for h in spectral_stages(x3.reshape(-1, n), in_scale, inner_scale, layout)]
        pre = stages[-1][..., :out] * out_scale if bias is None else torch.addcmul(bias, stages[-1][..., :out], out_scale)
    if layer._activation_fn is not None:  # chain through the activation at the recomputed pre-activation
        with torch.enable_grad():
            pre.requires_grad_(True)
            (grad,) = torch.autograd.grad(layer._activation_fn(pre), pre, grad)
    if native:
        grads = native_spectral_grads(x3.reshape(-1, n), grad.reshape(-1, out), in_scale, inner_scale, out_scale,
                                      bias is not None, layout.flat_perm, layout.length, groups=batch,
                                      want_input_grad=False)
    else:
        grads = _spectral_vjp(x3, grad, stages, in_scale, inner_scale, out_scale, layout, want_input_grad=False)
    named = {"in_scale": layer.in_scale, "inner_scale": layer.inner_scale, "out_scale": layer.out_scale,
             "bias": layer.bias}
    return {named[name]: value for name, value in grads.items() if named[name] is not None}
