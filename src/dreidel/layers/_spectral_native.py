"""Spectral linear layers on the fused native kernels (``csrc/spectral.h``): eager CPU, float32/float64.

The same maths as the composition of torch ops in ``_spectral_grads`` (the reference path: the test
oracle, and what other devices and other dtypes run), done in one native call for the forward pass and
one for the backward pass; ``_spectral_grads`` decides which runs. Each row goes through all its gathers, transforms and
scalings while it sits in cache; the forward pass keeps nothing but its inputs, and the backward pass
recomputes the row's stages (``O(depth · B·L log L)``, cheaper than storing and re-reading them) and sums
the parameter gradients in double. At width 256 this replaces about twenty small torch ops a step.
"""

from __future__ import annotations

import numpy as np
import torch

from dreidel._native import native
from dreidel.algo import hadamard_factor
from dreidel.algo._hadamard import small_hadamard_array

__all__ = ["NativeSpectralLinear", "native_spectral_forward", "native_spectral_grads"]

_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


def _view(t: torch.Tensor | None, dtype: torch.dtype) -> np.ndarray:
    """A zero-copy NumPy view of a contiguous tensor (an empty array for None): the kernels' argument form.

    NumPy views cross into the extension through the buffer protocol, which is several microseconds a
    tensor cheaper than torch's ``__dlpack__``.
    """
    if t is None:
        return np.empty(0, dtype=_NUMPY_DTYPES[dtype])
    return t.detach().contiguous().numpy()


def _layer_arrays(in_scale, inner_scale, out_scale, flat_perm, length):
    dtype = in_scale.dtype
    m, _ = hadamard_factor(length)
    return (_view(in_scale.reshape(in_scale.shape[0], -1), dtype), _view(inner_scale, dtype), _view(out_scale, dtype),
            flat_perm.numpy(), small_hadamard_array(m, dtype))


def native_spectral_forward(x: torch.Tensor, in_scale: torch.Tensor, inner_scale: torch.Tensor | None,
                            out_scale: torch.Tensor, bias: torch.Tensor | None, flat_perm: torch.Tensor,
                            length: int) -> torch.Tensor:
    """``y`` ``(rows, out)`` for ``x`` ``(rows, n)``; arguments as in ``SpectralLayout`` (no autograd)."""
    x = x.detach().contiguous()
    y = x.new_empty((x.shape[0], out_scale.shape[0]))
    scales_in, scales_inner, scales_out, perm, hadamard = _layer_arrays(in_scale, inner_scale, out_scale, flat_perm, length)
    native.spectral_forward(x.numpy(), y.numpy(), scales_in, scales_inner, scales_out, _view(bias, x.dtype), perm,
                            hadamard, torch.get_num_threads())
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
    x, grad = x.detach().contiguous(), grad.detach().contiguous()
    dtype, rows = x.dtype, x.shape[0]
    empty = x.new_empty
    grads = {"in_scale": empty(groups, *in_scale.shape), "out_scale": empty(groups, *out_scale.shape)}
    if inner_scale is not None:
        grads["inner_scale"] = empty(groups, *inner_scale.shape)
    if has_bias:
        grads["bias"] = empty(groups, *out_scale.shape)
    if want_input_grad:
        grads["input"] = empty(rows, x.shape[1])
    scales_in, scales_inner, scales_out, perm, hadamard = _layer_arrays(in_scale, inner_scale, out_scale, flat_perm, length)
    native.spectral_backward(
        x.numpy(), grad.numpy(), scales_in, scales_inner, scales_out, perm, hadamard,
        *(_view(grads.get(name), dtype) for name in ("input", "in_scale", "inner_scale", "out_scale", "bias")),
        groups, torch.get_num_threads(),
    )
    return grads


class NativeSpectralLinear(torch.autograd.Function):
    """``y = s_out ⊙ h_K[:, :out] + b`` for ``x`` ``(rows, n)`` on the native kernels.

    ``flat_perm`` and ``length`` are the ``SpectralLayout`` fields of the layer.
    """

    @staticmethod
    def forward(ctx, x, in_scale, inner_scale, out_scale, bias, flat_perm, length):
        ctx.length, ctx.has_bias, ctx.has_inner = length, bias is not None, inner_scale is not None
        ctx.save_for_backward(x, in_scale, inner_scale, out_scale, flat_perm)
        return native_spectral_forward(x, in_scale, inner_scale, out_scale, bias, flat_perm, length)

    @staticmethod
    @torch.autograd.function.once_differentiable  # the kernel's gradients are not themselves differentiable
    def backward(ctx, grad_y):
        x, in_scale, inner_scale, out_scale, flat_perm = ctx.saved_tensors
        grads = native_spectral_grads(x, grad_y, in_scale, inner_scale if ctx.has_inner else None, out_scale,
                                      ctx.has_bias, flat_perm, ctx.length, groups=1,
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
