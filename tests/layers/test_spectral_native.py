"""The fused native spectral kernels against the reference torch-op path, and their argument checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dreidel import _C
from dreidel.algo._hadamard import small_hadamard_array
from dreidel.layers import DeepSpectralLinear, LinearWHT
from dreidel.layers._spectral_grads import _SpectralLinearFunction
from dreidel.layers._spectral_native import NativeSpectralLinear, native_spectral_forward, native_spectral_grads

CASES = [  # (in, out, depth): powers of two, m * 2^k lengths (384 = 12 * 32), padding, stacked blocks
    (256, 256, 1), (384, 384, 2), (100, 700, 1), (1000, 300, 3), (20, 50, 2), (640, 1500, 2),
]


def make_layer(n, out, depth, dtype):
    gen = torch.Generator().manual_seed(n + out + depth)
    layer = (LinearWHT(n, out, generator=gen, dtype=dtype) if depth == 1
             else DeepSpectralLinear(n, out, depth=depth, generator=gen, dtype=dtype))
    with torch.no_grad():
        layer.bias.normal_(generator=gen)
    return layer


def both_paths(layer, x, grad):
    """(y, input grad, parameter grads) from the native Function and from the reference Function."""
    results = []
    layout = layer.layout()
    for function, layout_args in ((NativeSpectralLinear, (layout.flat_perm, layout.length)),
                                  (_SpectralLinearFunction, layout)):
        xr = x.clone().requires_grad_(True)
        params = [p.detach().clone().requires_grad_(True) if p is not None else None
                  for p in (layer.in_scale, layer.inner_scale, layer.out_scale, layer.bias)]
        y = function.apply(xr, *params, *layout_args)
        y.backward(grad)
        results.append((y.detach(), xr.grad, [p.grad for p in params if p is not None]))
    return results


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n,out,depth", CASES)
def test_native_forward_and_backward_match_the_reference_path(n, out, depth, dtype, threads):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        layer = make_layer(n, out, depth, dtype)
        x = torch.randn(150, n, dtype=dtype)  # enough rows for both threads to take part
        grad = torch.randn(150, out, dtype=dtype)
        (y, gx, gp), (y_ref, gx_ref, gp_ref) = both_paths(layer, x, grad)
    finally:
        torch.set_num_threads(previous)
    tol = {"rtol": 1e-10, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-4}
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(gx, gx_ref, **tol)
    for got, expected in zip(gp, gp_ref, strict=True):
        torch.testing.assert_close(got, expected, **tol)


def test_native_grouped_gradients_are_per_group_sums():
    layer = make_layer(100, 130, 2, torch.float64)
    x, grad = torch.randn(12, 100, dtype=torch.float64), torch.randn(12, 130, dtype=torch.float64)
    args = (layer.in_scale, layer.inner_scale, layer.out_scale, True, layer._flat_perm, layer.transform_length)
    per_group = native_spectral_grads(x, grad, *args, groups=4, want_input_grad=True)
    for g in range(4):
        rows = slice(3 * g, 3 * g + 3)
        single = native_spectral_grads(x[rows], grad[rows], *args, groups=1, want_input_grad=True)
        for name in ("in_scale", "inner_scale", "out_scale", "bias"):
            torch.testing.assert_close(per_group[name][g], single[name][0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(per_group["input"][rows], single["input"], rtol=1e-12, atol=1e-12)


def test_native_forward_of_no_rows_is_empty():
    layer = make_layer(30, 40, 1, torch.float32)
    y = native_spectral_forward(torch.empty(0, 30), layer.in_scale, None, layer.out_scale, layer.bias,
                                layer._flat_perm, layer.transform_length)
    assert y.shape == (0, 40)


def kernel_args(layer, x):
    y = np.empty((x.shape[0], layer.out_features), dtype=np.float32)
    return [x.numpy(), y, layer.in_scale.detach().numpy(), np.empty(0, np.float32),
            layer.out_scale.detach().numpy(), layer.bias.detach().numpy(), layer._flat_perm.numpy().copy(),
            small_hadamard_array(1, torch.float32), 1]


def test_native_kernel_rejects_a_permutation_leaving_its_block():
    layer = make_layer(64, 128, 1, torch.float32)  # two blocks of 64
    args = kernel_args(layer, torch.randn(3, 64))
    args[6][0, 5] = 64  # an index of block 1 inside block 0
    with pytest.raises(ValueError, match="perm has an index outside its block"):
        _C.spectral_forward(*args)
    args[6][0, 5] = -1
    with pytest.raises(ValueError, match="perm has an index outside its block"):
        _C.spectral_forward(*args)


@pytest.mark.parametrize("position,bad,message", [
    (0, np.zeros((3, 63), np.float32), "x must be"),
    (1, np.zeros((3, 127), np.float32), "y must be"),
    (3, np.zeros(5, np.float32), "inner_scale must hold"),
    (5, np.zeros(7, np.float32), "bias must be empty"),
    (6, np.zeros((1, 127), np.int32), "perm width"),
])
def test_native_kernel_rejects_inconsistent_sizes(position, bad, message):
    args = kernel_args(make_layer(64, 128, 1, torch.float32), torch.randn(3, 64))
    args[position] = bad
    with pytest.raises(ValueError, match=message):
        _C.spectral_forward(*args)
