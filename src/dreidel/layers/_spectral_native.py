"""Spectral linear layers on the fused native kernels (``csrc/spectral.h``): eager CPU, float32/float64.

The same maths as the composition of torch ops in ``_spectral_grads`` (the reference path: the test
oracle, and what other devices and other dtypes run), done in one native call for the forward pass and
one for the backward pass; ``_spectral_grads`` decides which runs. Each row goes through all its gathers, transforms and
scalings while it sits in cache; the forward pass keeps nothing but its inputs, and the backward pass
recomputes the row's stages (``O(depth · B·L log L)``, cheaper than storing and re-reading them) and sums
the parameter gradients in double. At width 256 this replaces about twenty small torch ops a step.
"""

from __future__ import annotations

from typing import Callable

import torch

from dreidel._native import native
from dreidel.algo._fwht import _is_legacy_batched, _kernel_copy, has_forward_tangent, kernel_constants

__all__ = ["NativeSpectralLinear", "native_spectral_forward", "native_spectral_grads", "needs_differentiable_backward",
           "vjp_of"]

_get_num_threads = torch.get_num_threads  # bound once: looked up on every call otherwise


def _layer_at(x: torch.Tensor, in_scale: torch.Tensor, inner_scale: torch.Tensor | None, out_scale: torch.Tensor,
              bias: torch.Tensor | None, flat_perm: torch.Tensor, length: int) -> tuple[int, ...]:
    """The kernels' ``layer`` argument: ``(in, out, length, blocks, depth, m)`` then the addresses of
    ``in_scale, inner_scale, out_scale, bias, flat_perm`` and ``H_m`` (0 for an absent one).

    The kernels take raw addresses (``csrc/module.cc``: at batch 1, NumPy views of the eight buffers cost
    several times the kernel), so this checks that every buffer is C-contiguous and has the shape the kernels
    will read, and that the float buffers are CPU tensors of ``x``'s dtype, float32 or float64 (the layers'
    callers have checked that with ``runs_native_eager``; called directly, a float32 scale with float64 ``x``
    was read past its end), and raises ``ValueError`` otherwise; the kernels check the permutation's entries.
    """
    # Sizes from three shapes; the rest by element counts, which is what bounds the kernels' reads.
    n = x.shape[1] if x.dim() == 2 else 0
    blocks, n_scale = in_scale.shape if in_scale.dim() == 2 else (0, 0)
    depth, width = flat_perm.shape if flat_perm.dim() == 2 else (0, 0)
    out = out_scale.numel() if out_scale.dim() == 1 else 0
    fits = (
        n > 0 and n_scale == n and blocks > 0 and depth > 0 and out > 0 and width == blocks * length
        and (inner_scale.numel() == (depth - 1) * width if inner_scale is not None else depth == 1)
        and (bias is None or bias.numel() == out)
        and flat_perm.dtype == torch.int32 and flat_perm.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and all(t is None or (t.dtype == x.dtype and t.device.type == "cpu")
                for t in (x, in_scale, inner_scale, out_scale, bias))
    )
    contiguous = (x.is_contiguous() and in_scale.is_contiguous() and out_scale.is_contiguous()
                  and flat_perm.is_contiguous() and (inner_scale is None or inner_scale.is_contiguous())
                  and (bias is None or bias.is_contiguous()))
    if not (fits and contiguous):
        described = ", ".join(
            f"{name} None" if t is None else f"{name} {tuple(t.shape)} {t.dtype}{'' if t.is_contiguous() else ' strided'}"
            for name, t in (("x", x), ("in_scale", in_scale), ("inner_scale", inner_scale), ("out_scale", out_scale),
                            ("bias", bias), ("flat_perm", flat_perm)))
        raise ValueError(
            f"spectral layer tensors do not fit together (transform length {length}): expected contiguous CPU "
            f"tensors of one dtype (float32 or float64): x (rows, n), in_scale (blocks, n), inner_scale "
            f"(depth - 1, blocks, length) or None at depth 1, out_scale (out,), bias (out,) or None, int32 "
            f"flat_perm (depth, blocks * length); got {described}"
        )
    constants = kernel_constants(length, x.dtype)
    return (n, out, length, blocks, depth, constants.m, in_scale.data_ptr(),
            0 if inner_scale is None else inner_scale.data_ptr(), out_scale.data_ptr(),
            0 if bias is None else bias.data_ptr(), flat_perm.data_ptr(), constants.hadamard_m_address)


def _kernel_copy_or_none(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else _kernel_copy(t)


def native_spectral_forward(x: torch.Tensor, in_scale: torch.Tensor, inner_scale: torch.Tensor | None,
                            out_scale: torch.Tensor, bias: torch.Tensor | None, flat_perm: torch.Tensor,
                            length: int) -> torch.Tensor:
    """``y`` ``(rows, out)`` for ``x`` ``(rows, n)``; arguments as in ``SpectralLayout`` (no autograd)."""
    # The kernels read raw memory: a lazily negated tensor (contiguous all the same) is resolved first, as fwht
    # does. The copies stay bound here until the kernel has returned (it holds only their addresses).
    x, in_scale, inner_scale, out_scale, bias = (_kernel_copy(x), _kernel_copy(in_scale),
                                                 _kernel_copy_or_none(inner_scale), _kernel_copy(out_scale),
                                                 _kernel_copy_or_none(bias))
    layer = _layer_at(x, in_scale, inner_scale, out_scale, bias, flat_perm, length)
    rows = x.shape[0]
    y = torch.empty((rows, layer[1]), dtype=x.dtype)
    native.spectral_forward_at(x.data_ptr(), y.data_ptr(), rows, layer, _get_num_threads(), x.dtype == torch.float64)
    return y


def native_spectral_grads(x: torch.Tensor, grad: torch.Tensor, in_scale: torch.Tensor,
                          inner_scale: torch.Tensor | None, out_scale: torch.Tensor, has_bias: bool,
                          flat_perm: torch.Tensor, length: int, groups: int,
                          want_input_grad: bool) -> dict[str, torch.Tensor]:
    """Gradients of a spectral layer, parameter gradients summed within ``groups`` equal groups of rows.

    ``x`` ``(rows, n)``, ``grad`` ``(rows, out)`` (at the pre-activation). Returns "in_scale" ``(G, B, n)``,
    "out_scale" ``(G, out)``, "inner_scale" ``(G, K-1, B, L)`` when ``K > 1``, "bias" ``(G, out)`` when
    ``has_bias`` and "input" ``(rows, n)`` when ``want_input_grad`` — the keys and shapes of
    ``_spectral_grads._spectral_vjp`` with ``G = groups``.
    """
    x, grad, in_scale, inner_scale, out_scale = (_kernel_copy(x), _kernel_copy(grad), _kernel_copy(in_scale),
                                                 _kernel_copy_or_none(inner_scale), _kernel_copy(out_scale))
    layer = _layer_at(x, in_scale, inner_scale, out_scale, None, flat_perm, length)
    rows = x.shape[0]
    if grad.shape != (rows, layer[1]) or grad.dtype != x.dtype or grad.device.type != "cpu":
        raise ValueError(f"grad must be a CPU tensor (rows, out_features) = {(rows, layer[1])} of x's dtype "
                         f"{x.dtype}, got {tuple(grad.shape)} {grad.dtype} on {grad.device}")
    empty, dtype = torch.empty, x.dtype
    grads = {"in_scale": empty((groups, *in_scale.shape), dtype=dtype),
             "out_scale": empty((groups, *out_scale.shape), dtype=dtype)}
    if inner_scale is not None:
        grads["inner_scale"] = empty((groups, *inner_scale.shape), dtype=dtype)
    if has_bias:
        grads["bias"] = empty((groups, *out_scale.shape), dtype=dtype)
    if want_input_grad:
        grads["input"] = empty(x.shape, dtype=dtype)
    addresses = tuple(grads[name].data_ptr() if name in grads else 0
                      for name in ("input", "in_scale", "inner_scale", "out_scale", "bias"))
    native.spectral_backward_at(x.data_ptr(), grad.data_ptr(), rows, layer, addresses, groups, _get_num_threads(),
                                dtype == torch.float64)
    return grads


def needs_differentiable_backward(grad: torch.Tensor) -> bool:
    """Whether a backward given ``grad`` must differentiate the composed form instead of running the kernel:
    it builds a graph (``create_graph=True``), ``grad`` is a legacy-vmap batched tensor (no memory for the
    kernel, no batching rule for the op), or ``grad`` carries a forward-mode tangent (forward-over-reverse:
    the kernel reads the primal alone, and the tangent was dropped)."""
    return torch.is_grad_enabled() or _is_legacy_batched(grad) or has_forward_tangent(grad)


def vjp_of(forward: Callable[..., torch.Tensor], inputs: tuple, needed: tuple[bool, ...],
           grad: torch.Tensor) -> list[torch.Tensor | None]:
    """``grad``'s vector-Jacobian product with ``forward(*inputs)`` for the ``inputs`` flagged ``needed`` (None
    for the others), as a differentiable graph. ``forward`` runs on aliases of the inputs (``view_as``), so the
    products are partial derivatives of this one call: differentiated with respect to the saved tensors
    themselves, autograd went on through a layer's earlier calls that made them (a layer applied twice, its
    second input computed by its first) and returned total derivatives, which the outer backward then added
    again, and fired their hooks twice."""
    with torch.enable_grad():  # off in a backward that builds no graph (batched gradients, a tangent)
        aliases = tuple(t.view_as(t) if isinstance(t, torch.Tensor) else t for t in inputs)
        y = forward(*aliases)
    wanted = [a for a, need in zip(aliases, needed) if a is not None and need]
    computed = iter(torch.autograd.grad(y, wanted, grad, create_graph=True, allow_unused=True))
    return [next(computed) if a is not None and need else None for a, need in zip(aliases, needed)]


class NativeSpectralLinear(torch.autograd.Function):
    """``y = s_out ⊙ h_K[:, :out] + b`` for ``x`` ``(rows, n)`` on the native kernels.

    ``layout`` is the layer's ``SpectralLayout``; ``differentiable_forward(x, in_scale, inner_scale,
    out_scale, bias, layout)`` computes the same map as differentiable torch ops. The kernel's gradients are
    not themselves differentiable, so a backward that builds a graph (``create_graph=True``: gradient
    penalties, Hessian-vector products) differentiates ``differentiable_forward`` instead; so does one whose
    incoming gradient is a legacy-vmap batched tensor (``is_grads_batched``, ``jacobian(vectorize=True)``),
    which has no memory for the kernel to read, as ``fwht`` routes such tensors to its reference.
    """

    @staticmethod
    def forward(ctx, x, in_scale, inner_scale, out_scale, bias, layout, differentiable_forward):
        ctx.layout, ctx.differentiable_forward = layout, differentiable_forward
        ctx.has_bias, ctx.has_inner = bias is not None, inner_scale is not None
        ctx.save_for_backward(x, in_scale, inner_scale, out_scale, bias)
        return native_spectral_forward(x, in_scale, inner_scale, out_scale, bias, layout.flat_perm, layout.length)

    @staticmethod
    def backward(ctx, grad_y):
        x, in_scale, inner_scale, out_scale, bias = ctx.saved_tensors
        inner_scale = inner_scale if ctx.has_inner else None
        bias = bias if ctx.has_bias else None
        if needs_differentiable_backward(grad_y):  # create_graph=True, batched gradients, a tangent
            inputs = (x, in_scale, inner_scale, out_scale, bias)
            grads = vjp_of(lambda *aliases: ctx.differentiable_forward(*aliases, ctx.layout), inputs,
                           ctx.needs_input_grad[:5], grad_y)
            return (*grads, None, None)
        grads = native_spectral_grads(x, grad_y, in_scale, inner_scale, out_scale, ctx.has_bias,
                                      ctx.layout.flat_perm, ctx.layout.length, groups=1,
                                      want_input_grad=ctx.needs_input_grad[0])
        return (
            grads.get("input"),
            grads["in_scale"][0],
            grads["inner_scale"][0] if ctx.has_inner else None,
            grads["out_scale"][0],
            grads["bias"][0] if ctx.has_bias else None,
            None,
            None,
        )
