"""LinearWHT / DeepSpectralLinear against explicit dense matrices, autograd, statistics and serialisation."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.parameter import UninitializedParameter

from dreidel.layers import _spectral_grads
from dreidel.layers import SPECTRAL_INITS, DeepSpectralLinear, LinearWHT, PerSampleGradients, transform_length

from ._oracle import spectral_matrix

WIDTHS = [(384, 384), (768, 768), (1000, 1000), (784, 1024), (200, 64), (64, 200), (5, 70)]


def make_layer(in_features, out_features, depth, seed=0, **kwargs):
    gen = torch.Generator().manual_seed(seed)
    if depth == 1:
        return LinearWHT(in_features, out_features, generator=gen, **kwargs)
    return DeepSpectralLinear(in_features, out_features, depth=depth, generator=gen, **kwargs)


def randomize_bias(layer, seed=1):
    with torch.no_grad():
        layer.bias.copy_(torch.randn(layer.bias.shape, generator=torch.Generator().manual_seed(seed)))


@pytest.fixture(params=["native", "reference"])
def path(request, monkeypatch):
    """Run a test on the fused native kernels (the eager CPU default) and on the reference torch-op path."""
    if request.param == "reference":
        monkeypatch.setattr(_spectral_grads, "runs_native_eager", lambda *tensors: False)
    return request.param


@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("widths", WIDTHS, ids=lambda w: f"{w[0]}to{w[1]}")
def test_forward_matches_explicit_matrix_float64(widths, depth, path):
    n, out = widths
    layer = make_layer(n, out, depth, dtype=torch.float64)
    randomize_bias(layer)
    x = torch.randn(3, 2, n, dtype=torch.float64)
    oracle = spectral_matrix(layer)
    torch.testing.assert_close(layer(x), x @ oracle.T + layer.bias, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer.dense_matrix(), oracle, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("depth", [1, 2])
def test_low_precision_dtypes_follow_the_float64_matrix(dtype, depth):
    layer = make_layer(300, 500, depth, dtype=dtype, activation="gelu")
    x = torch.randn(4, 300).to(dtype)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (4, 500)
    expected = torch.nn.functional.gelu(x.double() @ spectral_matrix(layer).T + layer.bias.double())
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(y.double(), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("depth", [1, 2])
def test_an_empty_batch_gives_empty_outputs_and_zero_gradients(dtype, depth, path):
    """As nn.Linear: float16/bfloat16 (and the reference path) used to fail reshaping zero rows."""
    layer = make_layer(12, 30, depth, dtype=dtype)
    x = torch.zeros(0, 12, dtype=dtype, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, 30) and y.dtype == dtype
    y.sum().backward()
    assert x.grad.shape == (0, 12)
    for p in layer.parameters():
        assert torch.equal(p.grad, torch.zeros_like(p))


def test_transform_length_uses_native_factors_without_padding():
    assert transform_length(384) == 384 and transform_length(640) == 640 and transform_length(1000) == 1024
    layer = LinearWHT(784, 1024)
    assert layer.transform_length == 896 and layer.num_blocks == 2
    assert layer.permutation.shape == (1, 2, 896) and layer.in_scale.shape == (2, 784)


@pytest.mark.parametrize("activation", [None, "tanh"])
@pytest.mark.parametrize("widths,depth", [((5, 7), 1), ((12, 30), 2), ((20, 9), 3)])
def test_gradcheck(widths, depth, activation, path):
    layer = make_layer(*widths, depth, dtype=torch.float64, activation=activation)
    randomize_bias(layer)
    x = torch.randn(3, widths[0], dtype=torch.float64, requires_grad=True)
    params = [p for p in layer.parameters()]

    def f(x, *ps):
        state = dict(zip([name for name, _ in layer.named_parameters()], ps))
        return torch.func.functional_call(layer, state, (x,))

    assert torch.autograd.gradcheck(f, (x, *params))


@pytest.mark.parametrize("widths,depth", [((5, 7), 1), ((12, 30), 2), ((20, 9), 3)])
def test_gradgradcheck_on_the_native_path(widths, depth):
    """A backward that builds a graph (gradient penalties) differentiates the layer's torch-op form."""
    layer = make_layer(*widths, depth, dtype=torch.float64, activation="tanh")
    randomize_bias(layer)
    x = torch.randn(3, widths[0], dtype=torch.float64, requires_grad=True)
    names = [name for name, _ in layer.named_parameters()]

    def f(x, *ps):
        return torch.func.functional_call(layer, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradgradcheck(f, (x, *layer.parameters()))
    # and the first-order gradient is still the kernel's, equal to the graph-building one
    (plain,) = torch.autograd.grad(layer(x).sum(), x)
    (graphed,) = torch.autograd.grad(layer(x).sum(), x, create_graph=True)
    torch.testing.assert_close(plain, graphed, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("widths,depth", [((20, 20), 1), ((30, 70), 2), ((100, 40), 3)])
def test_per_sample_grads_match_autograd(widths, depth, activation, path):
    layer = make_layer(*widths, depth, dtype=torch.float64, activation=activation)
    randomize_bias(layer)
    x = torch.randn(4, 3, widths[0], dtype=torch.float64)  # (batch, tokens, in)
    target = torch.randn(4, 3, widths[1], dtype=torch.float64)
    out = layer(x)
    out.retain_grad()
    ((out - target) ** 2).sum().backward()
    assert isinstance(layer, PerSampleGradients)
    per_sample = layer.per_sample_grads((x,), out.grad)
    assert set(per_sample) == set(layer.parameters())
    for p, g in per_sample.items():
        assert g.shape == (4, *p.shape)
        torch.testing.assert_close(g.sum(0), p.grad, rtol=1e-10, atol=1e-10)
    for i in range(4):
        layer.zero_grad()
        ((layer(x[i : i + 1]) - target[i : i + 1]) ** 2).sum().backward()
        for p, g in per_sample.items():
            torch.testing.assert_close(g[i], p.grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("widths,depth", [((20, 20), 1), ((30, 70), 2), ((100, 40), 3)])
def test_torch_func_transforms_match_eager_autograd(widths, depth):
    """vmap, grad and jacrev run the layer as torch ops and fwht (the kernels' wrappers-free paths are skipped);
    the oracles are the explicit matrix and eager autograd one sample at a time."""
    layer = make_layer(*widths, depth, dtype=torch.float64, activation="tanh")
    randomize_bias(layer)
    params = {name: p.detach() for name, p in layer.named_parameters()}
    x = torch.randn(5, widths[0], dtype=torch.float64)

    def loss(state, sample):
        return torch.func.functional_call(layer, state, (sample.unsqueeze(0),)).pow(2).sum()

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x)
    for i in range(5):
        layer.zero_grad()
        loss(dict(layer.named_parameters()), x[i]).backward()
        for name, p in layer.named_parameters():
            torch.testing.assert_close(per_sample[name][i], p.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(torch.func.vmap(layer)(x), layer(x), rtol=1e-12, atol=1e-12)
    pre_activation = torch.tanh(x[0] @ spectral_matrix(layer).T + layer.bias)
    jacobian = (1 - pre_activation**2).unsqueeze(1) * spectral_matrix(layer)
    torch.testing.assert_close(torch.func.jacrev(layer)(x[0]), jacobian, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("first_use", ["fake_mode", "grad", "jvp"])
@pytest.mark.parametrize("stale", ["moved", "edited"])
def test_indices_made_stale_then_used_under_a_transform_are_not_kept(first_use, stale):
    """After .to() (or an in-place change to the permutation) the indices are rebuilt at their next use; where
    that use ran under a fake mode or a torch.func transform, fake or wrapped tensors were kept as buffers: the
    next eager forward crashed (fake) or raised (functorch), and so did every later transform."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    layer = make_layer(24, 20, 2, dtype=torch.float64)
    if stale == "moved":
        layer = layer.to("cpu").double()
    else:
        with torch.no_grad():
            layer.permutation[0, 0, :2] = layer.permutation[0, 0, [1, 0]].clone()
    x = torch.randn(3, 24, dtype=torch.float64)
    params = {name: p.detach() for name, p in layer.named_parameters()}

    def loss(state):
        return torch.func.functional_call(layer, state, (x,)).pow(2).sum()

    for _ in range(2):
        if first_use == "fake_mode":
            with FakeTensorMode(allow_non_fake_inputs=True):
                assert layer(torch.empty(3, 24, dtype=torch.float64)).shape == (3, 20)
        elif first_use == "grad":
            grads = torch.func.grad(loss)(params)
        else:
            out, tangent = torch.func.jvp(layer, (x,), (torch.ones_like(x),))
            torch.testing.assert_close(tangent, torch.ones_like(x) @ spectral_matrix(layer).T, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer(x), x @ spectral_matrix(layer).T + layer.bias, rtol=1e-10, atol=1e-10)
    if first_use == "grad":
        layer.zero_grad()
        loss(dict(layer.named_parameters())).backward()
        for name, p in layer.named_parameters():
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-10, atol=1e-10)


def test_a_functional_call_with_the_layers_own_state_leaves_its_indices_right():
    """An in-place change to the permutation, then a functional_call given the layer's own buffers: the call
    rebuilds the indices, and functional_call puts the stale ones back when it ends. They were then kept, and
    every later forward was wrong."""
    layer = make_layer(16, 16, 2, dtype=torch.float64)
    x = torch.randn(3, 16, dtype=torch.float64)
    layer(x)
    with torch.no_grad():
        layer.permutation[..., [0, 1]] = layer.permutation[..., [1, 0]]
    want = x @ spectral_matrix(layer).T + layer.bias
    state = {**dict(layer.named_parameters()), **dict(layer.named_buffers())}
    torch.testing.assert_close(torch.func.functional_call(layer, state, (x,)), want, rtol=1e-10, atol=1e-10)
    for _ in range(2):
        torch.testing.assert_close(layer(x), want, rtol=1e-10, atol=1e-10)


def test_a_permutation_given_for_one_call_after_a_move_is_not_kept():
    """After .to(), a functional_call with another layer's permutation rebuilt the indices from it and kept
    them: the layer's own permutation then counted as replaced, its indices derived again on every forward."""
    layer, other = make_layer(24, 20, 2, dtype=torch.float64), make_layer(24, 20, 2, seed=5, dtype=torch.float64)
    layer = layer.to("cpu").double()
    x = torch.randn(3, 24, dtype=torch.float64)
    swapped = copy.deepcopy(layer)
    with torch.no_grad():
        swapped.permutation.copy_(other.permutation)
    got = torch.func.functional_call(layer, {"permutation": other.permutation}, (x,))
    torch.testing.assert_close(got, x @ spectral_matrix(swapped).T + layer.bias, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer(x), x @ spectral_matrix(layer).T + layer.bias, rtol=1e-10, atol=1e-10)
    rebuilt = make_layer(24, 20, 2, dtype=torch.float64)
    rebuilt.load_state_dict(layer.state_dict())  # indices built from the layer's own permutation
    built = layer._buffers["_flat_perm"]
    assert torch.equal(built, rebuilt._buffers["_flat_perm"])  # kept for its own permutation, not the other's
    layer(x)
    assert layer._buffers["_flat_perm"] is built  # and not built again


def test_a_width_whose_buffers_cannot_fit_in_memory_is_refused_before_anything_is_allocated(monkeypatch):
    from dreidel.layers import _spectral

    assert _spectral.usable_memory_bytes() > 2**30  # what the OS reports here
    monkeypatch.setattr(_spectral, "usable_memory_bytes", lambda: 2**16)  # a machine (or a container) with 64 KiB
    with pytest.raises(MemoryError, match=r"LinearWHT\(in_features=8192, out_features=8192, depth=1\) needs about "
                                          r"0\.0 GiB .* \(8192 indices\), more than the 0\.0 GiB of memory this "
                                          r"process may use"):
        LinearWHT(8192, 8192)
    with pytest.raises(MemoryError, match=r"DeepSpectralLinear\(in_features=4096, out_features=100, depth=3\)"):
        DeepSpectralLinear(4096, 100, depth=3)
    lazy = LinearWHT(8192)  # lazy: refused at its first forward, and left lazy
    with pytest.raises(MemoryError):
        lazy(torch.randn(2, 8000))
    assert lazy.in_features is None and lazy.has_uninitialized_params()
    assert LinearWHT(8192, device="meta").permutation.is_meta  # shapes only: nothing to refuse
    assert LinearWHT(64, 32)(torch.randn(2, 64)).shape == (2, 32)  # 64 * 66 bytes fit


def test_a_lazy_layer_is_not_materialised_inside_a_transform():
    layer = LinearWHT(64)
    with pytest.raises(RuntimeError, match="cannot infer in_features inside a torch.func transform"):
        torch.func.grad(lambda t: layer(t).sum())(torch.randn(30))
    assert layer.in_features is None
    assert layer(torch.randn(2, 30)).shape == (2, 64)


@pytest.mark.parametrize("depth", [1, 3])
def test_batched_gradients_give_the_dense_jacobian(depth, path):
    """jacobian(vectorize=True), is_grads_batched and hessian(vectorize=True) send legacy-vmap batched tensors
    through the backward, which neither the kernels (no memory) nor the registered op (no batching rule) take."""
    layer = make_layer(12, 9, depth, dtype=torch.float64)
    randomize_bias(layer)
    x = torch.randn(2, 12, dtype=torch.float64)
    matrix = spectral_matrix(layer)
    expected = torch.einsum("ik,jl->ijkl", torch.eye(2, dtype=torch.float64), matrix)  # (2, 9, 2, 12)
    torch.testing.assert_close(torch.autograd.functional.jacobian(layer, x, vectorize=True), expected)
    xr = x.clone().requires_grad_(True)
    seeds = torch.eye(18, dtype=torch.float64).view(18, 2, 9)
    (rows,) = torch.autograd.grad(layer(xr), xr, seeds, is_grads_batched=True)
    torch.testing.assert_close(rows, expected.reshape(18, 2, 12))

    def loss(in_scale):
        return torch.func.functional_call(layer, {"in_scale": in_scale}, (x,)).square().sum()

    in_scale = layer.in_scale.detach()
    torch.testing.assert_close(torch.autograd.functional.hessian(loss, in_scale, vectorize=True),
                               torch.autograd.functional.hessian(loss, in_scale))
    # both jacobians vectorized: the outer one batches the inner one's graph-building backward
    hessian = torch.autograd.functional.hessian(lambda t: layer(t).square().sum(), x, vectorize=True,
                                                outer_jacobian_strategy="reverse-mode")
    torch.testing.assert_close(hessian, 2 * torch.einsum("ik,jl->ijkl", torch.eye(2, dtype=torch.float64),
                                                         matrix.T @ matrix))


@pytest.mark.parametrize("out_features", [9, 16])  # a slice of the transform's output, or all of it
def test_batched_gradients_of_a_low_precision_layer(out_features):
    layer = make_layer(12, out_features, 2, dtype=torch.bfloat16)
    x = torch.randn(2, 12).bfloat16()
    jacobian = torch.autograd.functional.jacobian(layer, x, vectorize=True)
    expected = torch.einsum("ik,jl->ijkl", torch.eye(2, dtype=torch.float64), spectral_matrix(layer))
    torch.testing.assert_close(jacobian.double(), expected, rtol=5e-2, atol=5e-2)
    # the legacy vmap behind batched gradients, on the forward pass itself
    batch = torch.randn(3, 2, 12).bfloat16()
    torch.testing.assert_close(torch._vmap_internals._vmap(layer)(batch), layer(batch), rtol=0, atol=0)


@pytest.mark.parametrize("depth", [1, 3])
def test_forward_mode_ad_gives_the_jacobian_vector_product(depth):
    import torch.autograd.forward_ad as fwAD

    layer = make_layer(20, 9, depth, dtype=torch.float64)
    randomize_bias(layer)
    x, tangent = torch.randn(3, 20, dtype=torch.float64), torch.randn(3, 20, dtype=torch.float64)
    with fwAD.dual_level():
        primal, jvp = fwAD.unpack_dual(layer(fwAD.make_dual(x, tangent)))
    torch.testing.assert_close(primal, x @ spectral_matrix(layer).T + layer.bias)
    torch.testing.assert_close(jvp, tangent @ spectral_matrix(layer).T)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("depth", [1, 2])
def test_jit_trace_without_autograd_records_the_layer(depth):
    """Traced for inference (no_grad): the tracer cannot see a raw kernel call, so the layer must take its ops."""
    layer = make_layer(40, 70, depth, activation="gelu").eval()
    with torch.no_grad():
        traced = torch.jit.trace(layer, (torch.randn(4, 40),), check_trace=False)
    x = torch.randn(4, 40)
    torch.testing.assert_close(traced(x), layer(x))


@pytest.mark.parametrize("depth", [1, 3])
def test_the_permutation_in_use_is_the_one_in_the_state(depth):
    a, b = (make_layer(24, 40, depth, seed=seed, dtype=torch.float64) for seed in (1, 2))
    randomize_bias(b)
    x = torch.randn(3, 24, dtype=torch.float64)
    # functional_call with another layer's state dict (which carries the permutation, not derived indices)
    torch.testing.assert_close(torch.func.functional_call(a, b.state_dict(), (x,)), b(x))
    torch.testing.assert_close(a(x), x @ spectral_matrix(a).T + a.bias)  # a is itself again afterwards
    with torch.no_grad():  # edited in place: the forward and dense_matrix follow
        for name, tensor in b.state_dict().items():
            getattr(a, name).copy_(tensor)
    torch.testing.assert_close(a(x), b(x))
    torch.testing.assert_close(a.dense_matrix(), b.dense_matrix())


@pytest.mark.parametrize("move", ["apply", "to_empty"])
def test_the_permutation_is_followed_after_the_buffers_are_replaced(move):
    """nn.Module._apply puts new tensors in every buffer (a device move: simulated by cloning, on a CPU-only
    machine; to_empty from meta): state copied in place afterwards is followed, as without the move."""
    b = make_layer(24, 40, 2, seed=2, dtype=torch.float64)
    randomize_bias(b)
    if move == "apply":
        a = make_layer(24, 40, 2, seed=1, dtype=torch.float64)
        a._apply(lambda t: t.clone())
    else:
        a = DeepSpectralLinear(24, 40, depth=2, device="meta", dtype=torch.float64).to_empty(device="cpu")
    with torch.no_grad():
        for name, tensor in b.state_dict().items():
            getattr(a, name).copy_(tensor)
    x = torch.randn(3, 24, dtype=torch.float64)
    torch.testing.assert_close(a(x), b(x))
    torch.testing.assert_close(a.dense_matrix(), b.dense_matrix())


@pytest.mark.parametrize("route", ["data", "numpy", "data-assigned"])
def test_a_permutation_rewritten_where_no_version_counter_sees_is_followed(route):
    # .data and NumPy views write the buffer's memory without bumping its version counter.
    a, b = (make_layer(24, 40, 2, seed=seed, dtype=torch.float64) for seed in (1, 2))
    x = torch.randn(3, 24, dtype=torch.float64)
    a(x)  # indices built from a's own permutation
    if route == "data":
        a.permutation.data.copy_(b.permutation)
    elif route == "numpy":
        a.permutation.numpy()[...] = b.permutation.numpy()
    else:
        a.permutation.data = b.permutation.clone()
    with torch.no_grad():
        for name in ("in_scale", "inner_scale", "out_scale", "bias"):
            getattr(a, name).copy_(getattr(b, name))
    torch.testing.assert_close(a(x), b(x))
    torch.testing.assert_close(a.dense_matrix(), b.dense_matrix())


def test_inputs_of_another_dtype_or_device_are_refused_like_nn_linear():
    layer = LinearWHT(16, 8)
    with pytest.raises(TypeError, match="input dtype torch.uint8 does not match the layer's torch.float32"):
        layer(torch.ones(2, 16, dtype=torch.uint8))
    with pytest.raises(TypeError, match="input dtype torch.float64"):
        layer(torch.ones(2, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="input on meta"):
        layer(torch.ones(2, 16, device="meta"))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast mixes dtypes on purpose
        y = layer(torch.ones(2, 16, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16  # computed in autocast's dtype, as nn.Linear is
    torch.testing.assert_close(y.float(), layer(torch.ones(2, 16)), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("depth", [1, 2])
def test_lazy_layers_can_be_copied_and_pickled_before_their_first_forward(depth):
    import copy
    import pickle

    lazy = make_layer(None, 8, depth)
    for clone in (copy.deepcopy(lazy), pickle.loads(pickle.dumps(lazy))):
        assert clone.in_features is None and clone.permutation.dtype == torch.int64
        x = torch.randn(2, 12)
        y = clone(x)
        assert y.shape == (2, 8) and clone.in_features == 12
        torch.testing.assert_close(y, x @ spectral_matrix(clone).T.float() + clone.bias)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("depth", [1, 2])
def test_per_sample_grads_of_a_low_precision_layer_from_float32_records(dtype, depth):
    # Curvature optimizers record float32 copies of a low-precision layer's input and output gradient.
    torch.manual_seed(0)
    layer = DeepSpectralLinear(8, 16, depth=depth, activation="tanh").to(dtype)
    exact = DeepSpectralLinear(8, 16, depth=depth, activation="tanh")
    exact.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in layer.state_dict().items()})
    x, grad = torch.randn(5, 8).to(dtype).float(), torch.randn(5, 16)
    got, expected = layer.per_sample_grads((x,), grad), exact.per_sample_grads((x,), grad)
    for (name, p), q in zip(layer.named_parameters(), exact.parameters()):
        assert got[p].dtype == torch.float32, name
        torch.testing.assert_close(got[p], expected[q], msg=name)


@pytest.mark.parametrize("dtype, tolerance", [(torch.bfloat16, 5e-2), (torch.float16, 1e-2)])
@pytest.mark.parametrize("depth", [1, 2])
def test_low_precision_layers_have_second_derivatives(dtype, tolerance, depth):
    # Hessian-vector products through the registered op's reference path, against the float32 layer
    torch.manual_seed(0)
    low = DeepSpectralLinear(8, 16, depth=depth, activation="tanh").to(dtype)
    exact = DeepSpectralLinear(8, 16, depth=depth, activation="tanh")
    exact.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in low.state_dict().items()})
    x = torch.randn(4, 8).to(dtype)
    products = []
    for layer, inputs in ((low, x), (exact, x.float())):
        params = list(layer.parameters())
        grads = torch.autograd.grad(layer(inputs).float().pow(2).sum(), params, create_graph=True)
        products.append(torch.autograd.grad(sum(g.sum() for g in grads), params))
    for got, expected in zip(*products):
        assert (got.float() - expected).abs().max() <= tolerance * expected.abs().max()


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", [(0, 12), (0, 3, 12), (2, 0, 12)], ids=str)
def test_per_sample_grads_of_no_rows_are_zeros(shape, dtype, path):
    layer = make_layer(12, 7, 2, dtype=dtype)
    per_sample = layer.per_sample_grads((torch.zeros(shape, dtype=dtype),), torch.zeros((*shape[:-1], 7), dtype=dtype))
    assert set(per_sample) == set(layer.parameters())
    for p, g in per_sample.items():
        assert torch.equal(g, torch.zeros((shape[0], *p.shape), dtype=dtype))


def test_per_sample_grads_rejects_mismatched_shapes():
    layer = make_layer(10, 6, 1)
    with pytest.raises(ValueError, match="grad_output must have shape"):
        layer.per_sample_grads((torch.randn(4, 10),), torch.randn(4, 7))
    with pytest.raises(ValueError, match="expected 10"):
        layer.per_sample_grads((torch.randn(4, 9),), torch.randn(4, 6))


@pytest.mark.parametrize("init", SPECTRAL_INITS)
@pytest.mark.parametrize("depth", [1, 3])
@pytest.mark.parametrize("widths", [(100, 100), (384, 1000), (1000, 300)], ids=str)
def test_initialisation_preserves_variance(widths, depth, init):
    n, out = widths
    sigma = 1.7
    layer = make_layer(n, out, depth, seed=3, init=init)
    x = sigma * torch.randn(4000, n, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        y = layer(x)
    ratio = y.var(dim=0).mean().item() / sigma**2
    assert abs(ratio - 1.0) < 0.06, ratio
    if init == "random_sign" and depth == 1:  # every output, not only the average, has variance sigma²
        per_output = y.var(dim=0) / sigma**2
        assert (per_output - 1).abs().max().item() < 0.2


@pytest.mark.parametrize("init", SPECTRAL_INITS)
def test_output_variance_is_exact_at_depth_one_and_exact_on_average_deeper(init):
    """What the module docstring states: Var(y_j) = σ² ‖W_j‖², with ‖W_j‖² = 1 for every draw at depth 1 and
    only on average over draws at depth > 1 (where single outputs spread widely)."""
    shallow = make_layer(13, 40, 1, init=init, dtype=torch.float64).dense_matrix().square().sum(1)
    torch.testing.assert_close(shallow, torch.ones(40, dtype=torch.float64))
    deep = torch.stack([make_layer(13, 40, 4, seed=seed, init=init, dtype=torch.float64).dense_matrix().square().sum(1)
                        for seed in range(200)])
    assert abs(deep.mean().item() - 1) < 0.05
    assert (deep - 1).abs().max().item() > 0.5


def test_random_sign_scales_are_signs():
    layer = make_layer(50, 60, 2, init="random_sign")
    assert set(layer.in_scale.unique().tolist()) == {-1.0, 1.0}
    assert set(layer.inner_scale.unique().tolist()) == {-1.0, 1.0}


def test_same_generator_seed_gives_the_same_layer():
    a, b = make_layer(100, 50, 2, seed=9), make_layer(100, 50, 2, seed=9)
    for (name, ta), tb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(ta, tb), name
    assert not torch.equal(a.permutation, make_layer(100, 50, 2, seed=10).permutation)


@pytest.mark.parametrize("depth", [1, 2])
def test_lazy_in_features_inferred_on_first_forward(depth):
    layer = LinearWHT(64, activation="relu") if depth == 1 else DeepSpectralLinear(64, depth=2)
    assert layer.in_features is None and isinstance(layer.in_scale, UninitializedParameter)
    assert layer.num_parameters() == 0
    y = layer(torch.randn(5, 30))
    assert y.shape == (5, 64) and layer.in_features == 30
    assert not layer.has_uninitialized_params()
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)  # built after the dry run
    before = layer.in_scale.detach().clone()
    layer(torch.randn(5, 30)).square().sum().backward()
    optimizer.step()
    assert not torch.equal(before, layer.in_scale)


def test_wrong_feature_count_after_materialisation_names_expected_and_got():
    layer = LinearWHT(16)
    layer(torch.randn(2, 10))
    with pytest.raises(ValueError, match=r"expected 10 .*got 12"):
        layer(torch.randn(2, 12))


@pytest.mark.parametrize(
    "kwargs,error",
    [
        ({"in_features": 0, "out_features": 4}, ValueError),
        ({"in_features": 4, "out_features": -1}, ValueError),
        ({"in_features": 4.0, "out_features": 4}, TypeError),
        ({"in_features": True, "out_features": 4}, TypeError),
        ({"in_features": 4, "out_features": 4, "activation": "swishy"}, ValueError),
        ({"in_features": 4, "out_features": 4, "init": "xavier"}, ValueError),
        ({"in_features": 4, "out_features": 4, "depth": 0}, ValueError),
        ({"in_features": 4, "out_features": 4, "depth": 2.0}, TypeError),
        ({"in_features": 4, "out_features": 4, "bias": "no"}, TypeError),
        ({"in_features": 4, "out_features": 4, "bias": 0}, TypeError),
    ],
)
def test_bad_constructor_arguments(kwargs, error):
    with pytest.raises(error):
        DeepSpectralLinear(**kwargs)


def test_widths_of_any_integer_type_are_taken_like_nn_linear():
    layer = DeepSpectralLinear(np.int64(12), np.int32(30), depth=np.int64(2))
    assert (layer.in_features, layer.out_features, layer.depth) == (12, 30, 2)
    assert all(type(v) is int for v in (layer.in_features, layer.out_features, layer.depth))
    assert layer(torch.randn(3, 12)).shape == (3, 30)


@pytest.mark.parametrize("value, error", [(0, ValueError), (-5, ValueError), (2.5, TypeError), (True, TypeError),
                                          ("8", TypeError)])
def test_transform_length_refuses_what_is_not_a_positive_int(value, error):
    with pytest.raises(error, match="in_features"):
        transform_length(value)
    assert transform_length(np.int64(1000)) == 1024


@pytest.mark.parametrize("lazy_target", [False, True])
@pytest.mark.parametrize("depth", [1, 2])
def test_safetensors_round_trip_is_bit_identical(tmp_path, depth, lazy_target):
    source = make_layer(300, 700, depth, seed=1, activation="relu")
    randomize_bias(source)
    path = tmp_path / "layer.safetensors"
    save_file(source.state_dict(), str(path))
    if lazy_target:
        target = LinearWHT(700, activation="relu") if depth == 1 else DeepSpectralLinear(700, depth=2, activation="relu")
    else:
        target = make_layer(300, 700, depth, seed=2, activation="relu")
    target.load_state_dict(load_file(str(path)))
    assert target.in_features == 300
    x = torch.randn(6, 300)
    assert torch.equal(source(x), target(x))


def test_loading_a_mismatched_state_dict_names_the_key():
    state = make_layer(300, 700, 1).state_dict()
    state["permutation"] = state["permutation"][..., :-1]
    with pytest.raises((ValueError, RuntimeError), match="permutation"):
        LinearWHT(700).load_state_dict(state)


def test_a_partial_state_dict_cannot_half_build_a_lazy_layer():
    # strict=False with in_scale alone used to end in torch's "uninitialized parameter" error from the hook
    state = make_layer(300, 700, 1).state_dict()
    with pytest.raises(RuntimeError, match=r"gives \['in_scale'\] but not \['bias', 'out_scale', 'permutation'\]"):
        LinearWHT(700).load_state_dict({"in_scale": state["in_scale"]}, strict=False)
    with pytest.raises(RuntimeError, match="learns its width from the state dict's 'in_scale'"):
        LinearWHT(700).load_state_dict({"out_scale": state["out_scale"]}, strict=False)
    empty = LinearWHT(700)
    empty.load_state_dict({}, strict=False)  # nothing given: the layer stays lazy
    assert empty.in_features is None


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("lazy, fault", [(lazy, fault) for lazy in (False, True)
                                         for fault in ("other output width", "repeated index", "float permutation")]
                         + [(True, "partial")])  # a built layer takes a partial state dict (strict=False)
def test_a_refused_state_dict_leaves_the_layer_as_it_was(depth, lazy, fault):
    """A review found a refused load half done: a lazy layer materialised at the wrong width (no later load or
    forward could mend it), a bad permutation copied in over the weights. Now the layer is untouched: a lazy one
    stays lazy and then takes a good state dict; a built one keeps its tensors and its outputs."""
    good = make_layer(300, 700, depth, seed=1).state_dict()
    bad = {"other output width": lambda: make_layer(300, 500, depth, seed=1).state_dict(),
           "repeated index": lambda: {**good, "permutation": torch.zeros_like(good["permutation"])},
           "float permutation": lambda: {**good, "permutation": good["permutation"].double()},
           "partial": lambda: {"in_scale": good["in_scale"]}}[fault]()
    if lazy:
        layer = LinearWHT(700) if depth == 1 else DeepSpectralLinear(700, depth=2)
    else:
        layer = make_layer(300, 700, depth, seed=2)
    before = {k: v.clone() for k, v in layer.state_dict().items()} if not lazy else None
    x = torch.randn(4, 300)
    out_before = None if lazy else layer(x)
    with pytest.raises(RuntimeError, match=r"Error\(s\) in loading state_dict for"):
        layer.load_state_dict(bad, strict=fault != "partial")
    if lazy:
        assert layer.in_features is None and layer.has_uninitialized_params()
        layer.load_state_dict(good)
        assert torch.equal(layer(x), make_layer(300, 700, depth, seed=1)(x))
    else:
        assert all(torch.equal(v, before[k]) for k, v in layer.state_dict().items())
        assert torch.equal(layer(x), out_before)


@pytest.mark.parametrize("strict", [True, False])
def test_a_refused_state_dict_raises_as_torch_does_naming_the_entry_with_its_prefix(strict):
    # As nn.Linear's size mismatches: a RuntimeError from load_state_dict (strict or not) that names the entry by
    # its full key; it used to be a ValueError naming 'in_scale' without the module's prefix.
    source = nn.Sequential(nn.Linear(4, 13), LinearWHT(13, 24))
    target = nn.Sequential(nn.Linear(4, 13), LinearWHT(14, 24))
    with pytest.raises(RuntimeError, match=r"loaded '1\.in_scale' has shape \(2, 13\), expected \(2, 14\)"):
        target.load_state_dict(source.state_dict(), strict=strict)
    state = source.state_dict()
    state["1.permutation"] = torch.zeros_like(state["1.permutation"])
    with pytest.raises(RuntimeError, match=r"loaded '1\.permutation' is not a permutation"):
        nn.Sequential(nn.Linear(4, 13), LinearWHT(13, 24)).load_state_dict(state, strict=strict)


@pytest.mark.parametrize("depth", [1, 2])
def test_module_type_casts_the_scales_and_keeps_the_permutation_integer(depth):
    # nn.Module.type casts every tensor; a float64 permutation made the next call fail inside scatter (review)
    layer = make_layer(13, 24, depth)
    x = torch.randn(3, 13, dtype=torch.float64)
    expected = copy.deepcopy(layer).double()(x)
    model = nn.Sequential(layer).type(torch.float64)
    assert layer.permutation.dtype == torch.int64 and layer.in_scale.dtype == torch.float64
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def test_num_parameters_is_linear_in_width():
    layer = LinearWHT(4096, 4096)
    assert layer.num_parameters() == 3 * 4096
    deep = DeepSpectralLinear(4096, 4096, depth=4, bias=False)
    assert deep.num_parameters() == 4096 * 5


@pytest.mark.parametrize("cls, kwargs", [(LinearWHT, {}), (DeepSpectralLinear, {"depth": 3})])
def test_config_rebuilds_the_layer(cls, kwargs):
    layer = cls(100, 300, activation="relu", **kwargs)
    rebuilt = type(layer)(**layer.config())
    assert rebuilt.config() == layer.config()
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in layer.state_dict().items()}


def test_indices_rebuilt_under_inference_mode_still_train():
    """A checkpoint loaded inside torch.inference_mode() used to leave inference-tensor indices, which autograd
    cannot save: a double backward (a gradient penalty) then failed. The same for a bfloat16 copy's first
    forward there."""
    torch.manual_seed(0)
    source, layer = LinearWHT(24, 40), LinearWHT(24, 40)
    with torch.inference_mode():
        layer.load_state_dict(source.state_dict())
    assert not layer._flat_perm.is_inference()
    x = torch.randn(4, 24, requires_grad=True)
    (grad,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
    grad.square().sum().backward()
    expected = torch.autograd.grad(source(x).square().sum(), x)[0]
    torch.testing.assert_close(grad, expected)
    half = DeepSpectralLinear(24, 40, depth=2).to(torch.bfloat16)
    with torch.inference_mode():
        half(torch.randn(2, 24, dtype=torch.bfloat16))
    half(torch.randn(4, 24, dtype=torch.bfloat16)).float().sum().backward()
    assert half.in_scale.grad is not None


@pytest.mark.parametrize("make", [lambda: LinearWHT(24, 40), lambda: DeepSpectralLinear(24, 40, depth=2)],
                         ids=["wht", "deep"])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.float16])
def test_autocast_computes_in_its_dtype_as_nn_linear_does(make, x_dtype):
    """Under autocast(bfloat16) the layer used to return float32 (nn.Linear: bfloat16), and a float64 input ran
    in float64 from float32 parameters, the promotion the layer refuses outside autocast."""
    torch.manual_seed(0)
    layer = make()
    x = torch.randn(8, 24).to(x_dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        with pytest.raises(TypeError, match="input dtype torch.float64 does not match"):
            layer(x.double())
    assert y.dtype == torch.bfloat16
    oracle = copy.deepcopy(layer).to(torch.bfloat16)  # the parameters cast as autocast casts them
    assert torch.equal(y, oracle(x.to(torch.bfloat16)))
    y.float().sum().backward()
    assert layer.in_scale.grad.dtype == torch.float32 and torch.isfinite(layer.in_scale.grad).all()


def test_a_lazy_layer_loads_the_state_of_a_lazy_layer():
    """The state dict of a model that has not seen data holds uninitialised parameters: LazyLinear loads it,
    LinearWHT used to raise ('Attempted to use an uninitialized parameter')."""
    source, target = torch.nn.Sequential(LinearWHT(40), torch.nn.ReLU()), torch.nn.Sequential(LinearWHT(40))
    target.load_state_dict(source.state_dict())
    assert target[0].in_features is None
    assert target(torch.randn(3, 24)).shape == (3, 40)


def test_per_sample_grads_of_a_parametrized_layer_are_refused():
    """They used to come back keyed by the parametrization's computed tensor, which no optimizer looks up."""
    layer = DeepSpectralLinear(12, 13, depth=2)
    torch.nn.utils.parametrize.register_parametrization(layer, "in_scale", _Doubled())
    x = torch.randn(3, 12)
    with pytest.raises(NotImplementedError, match="has a parametrization"):
        layer.per_sample_grads((x,), torch.randn(3, 13))


class _Doubled(torch.nn.Module):
    def forward(self, value: torch.Tensor) -> torch.Tensor:
        return 2 * value


def test_a_vmapped_ensemble_leaves_the_base_layer_as_it_was():
    """functional_call over vmap with stacked state dicts used to register the batched indices derived from the
    stacked permutation as the base layer's buffers: deepcopy and .double() of it then failed ('Cannot access
    storage of BatchedTensorImpl')."""
    torch.manual_seed(0)
    members, base = [LinearWHT(13, 40), LinearWHT(13, 40)], LinearWHT(13, 40)
    x = torch.randn(3, 13)
    before = base(x)
    stacked = {key: torch.stack([m.state_dict()[key] for m in members]) for key in members[0].state_dict()}
    ensemble = torch.func.vmap(lambda state: torch.func.functional_call(base, state, (x,)))(stacked)
    for output, member in zip(ensemble, members):
        torch.testing.assert_close(output, member(x))
    assert torch.equal(copy.deepcopy(base)(x), before)
    assert torch.equal(base(x), before)
    torch.testing.assert_close(copy.deepcopy(base).double()(x.double()), before.double(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("route", ["functional_call", "replaced_buffer", "data"])
@pytest.mark.parametrize("fault", ["out of range", "negative", "shape", "float", "uint16"])
def test_a_permutation_put_in_place_of_the_layers_is_checked(route, fault):
    layer = LinearWHT(10, 7, generator=torch.Generator().manual_seed(0))
    x = torch.randn(2, 10)
    layer(x)
    perm = layer.permutation.clone()
    if fault == "out of range":
        perm[0, 0, 0] = 99
    elif fault == "negative":
        perm[0, 0, 0] = -1
    elif fault == "shape":
        perm = torch.zeros(1, 1, 16, dtype=torch.long)
    elif fault == "uint16":
        perm = perm.to(torch.uint16)
    else:
        perm = perm.double()
    with pytest.raises(ValueError, match="permutation"):
        if route == "functional_call":
            torch.func.functional_call(layer, {"permutation": perm}, (x,))
        elif route == "replaced_buffer":
            layer.permutation = perm
            layer(x)
        else:
            layer.permutation.data = perm
            layer(x)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("depth", [1, 2])
def test_a_low_precision_layer_computes_in_float32_and_rounds_once(dtype, depth):
    layer = make_layer(24, 40, depth, dtype=dtype)
    randomize_bias(layer)
    wide = copy.deepcopy(layer).float()
    x = torch.randn(5, 24).to(dtype).requires_grad_()
    x_wide = x.detach().float().requires_grad_()
    y, y_wide = layer(x), wide(x_wide)
    assert y.dtype == dtype and torch.equal(y, y_wide.to(dtype))
    g = torch.randn(5, 40).to(dtype)
    y.backward(g)
    y_wide.backward(g.float())
    assert torch.equal(x.grad, x_wide.grad.to(dtype))
    for p, p_wide in zip(layer.parameters(), wide.parameters()):
        assert p.grad.dtype == dtype and torch.equal(p.grad, p_wide.grad.to(dtype))


def test_a_strided_permutation_put_in_place_is_followed():
    layer = make_layer(40, 130, 2)
    x = torch.randn(3, 40)
    other = make_layer(40, 130, 2, seed=5)
    strided = other.permutation.transpose(1, 2).contiguous().transpose(1, 2)  # same values, not contiguous
    expected = torch.func.functional_call(layer, {"permutation": other.permutation}, (x,))
    torch.testing.assert_close(torch.func.functional_call(layer, {"permutation": strided}, (x,)), expected)
    layer.permutation = strided
    torch.testing.assert_close(layer(x), expected)


def test_make_fx_traces_a_permutation_passed_to_functional_call():
    from torch.fx.experimental.proxy_tensor import make_fx

    layer, other = make_layer(40, 130, 2), make_layer(40, 130, 2, seed=5)
    x = torch.randn(3, 40)
    graph = make_fx(lambda perm, t: torch.func.functional_call(layer, {"permutation": perm}, (t,)))(
        layer.permutation.clone(), x)
    torch.testing.assert_close(graph(other.permutation, x), torch.func.functional_call(
        layer, {"permutation": other.permutation}, (x,)))


def test_torch_export_follows_a_permutation_passed_to_functional_call():
    layer, other = make_layer(40, 130, 2), make_layer(40, 130, 2, seed=5)
    x = torch.randn(3, 40)

    class WithPermutation(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self, perm, t):
            return torch.func.functional_call(self.layer, {"permutation": perm}, (t,))

    exported = torch.export.export(WithPermutation(), (layer.permutation.clone(), x)).module()
    expected = torch.func.functional_call(layer, {"permutation": other.permutation}, (x,))
    torch.testing.assert_close(exported(other.permutation, x), expected)
    torch.testing.assert_close(exported(layer.permutation, x), layer(x))


def test_num_parameters_function_checks_its_arguments():
    from dreidel.layers import num_parameters

    linear = nn.Linear(2, 2)
    linear.bias.requires_grad_(False)
    assert num_parameters(linear) == 4 and num_parameters(linear, False) == 6
    with pytest.raises(TypeError, match=r"trainable_only: expected a bool .* got str 'no'"):
        num_parameters(linear, "no")
    with pytest.raises(TypeError, match="module: expected a torch.nn.Module, got list"):
        num_parameters([linear])
