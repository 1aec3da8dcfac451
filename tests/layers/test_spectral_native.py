"""The fused native spectral kernels against the reference torch-op path, and their argument checks."""

from __future__ import annotations

import pytest
import torch

from dreidel import _C
from dreidel.layers import DeepSpectralLinear, LinearWHT
from dreidel.layers import _spectral_grads, _spectral_native
from dreidel.layers._spectral_native import _layer_at, native_spectral_forward, native_spectral_grads

CASES = [  # (in, out, depth): powers of two, m * 2^k lengths (384 = 12 * 32, 448 = 28 * 16), padding, stacked
    # blocks, and a transform longer than the kernel's L1 leaf (8192: the cache-blocked path)
    (256, 256, 1), (384, 384, 2), (448, 448, 1), (100, 700, 1), (1000, 300, 3), (20, 50, 2), (640, 1500, 2),
    (8000, 64, 2),
]


def make_layer(n, out, depth, dtype):
    gen = torch.Generator().manual_seed(n + out + depth)
    layer = (LinearWHT(n, out, generator=gen, dtype=dtype) if depth == 1
             else DeepSpectralLinear(n, out, depth=depth, generator=gen, dtype=dtype))
    with torch.no_grad():
        layer.bias.normal_(generator=gen)
    return layer


def both_paths(layer, x, grad, monkeypatch):
    """(y, input grad, parameter grads) from the native kernels and from the reference torch-op path."""
    results = []
    for native in (True, False):
        with monkeypatch.context() as patch:
            if not native:
                patch.setattr(_spectral_grads, "runs_native_eager", lambda *tensors: False)
            xr = x.clone().requires_grad_(True)
            layer.zero_grad(set_to_none=True)
            y = layer(xr)
            y.backward(grad)
        results.append((y.detach(), xr.grad, [p.grad for p in layer.parameters()]))
    return results


@pytest.mark.parametrize("n,out,depth", CASES)
def test_native_forward_and_backward_match_the_reference_path_float64(n, out, depth, num_threads, monkeypatch):
    layer = make_layer(n, out, depth, torch.float64)
    x = torch.randn(150, n, dtype=torch.float64)  # enough rows for both threads to take part
    grad = torch.randn(150, out, dtype=torch.float64)
    (y, gx, gp), (y_ref, gx_ref, gp_ref) = both_paths(layer, x, grad, monkeypatch)
    for got, expected in zip([y, gx, *gp], [y_ref, gx_ref, *gp_ref], strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("n,out,depth", CASES)
def test_native_float32_error_is_within_twice_the_reference_paths(n, out, depth, num_threads, monkeypatch):
    """Against float64 ground truth, the native float32 results err at most 2x as much as the reference path's."""
    layer = make_layer(n, out, depth, torch.float64)
    x, grad = torch.randn(40, n, dtype=torch.float64), torch.randn(40, out, dtype=torch.float64)
    truth = both_paths(layer, x, grad, monkeypatch)[0]
    native, reference = both_paths(layer.float(), x.float(), grad.float(), monkeypatch)
    flat = lambda result: [result[0], result[1], *result[2]]  # noqa: E731
    for got, ref, exact in zip(flat(native), flat(reference), flat(truth), strict=True):
        error, ref_error = (got.double() - exact).abs().max(), (ref.double() - exact).abs().max()
        assert error <= 2 * ref_error + 1e-6 * exact.abs().max()


def test_eager_cpu_calls_take_the_native_kernels(monkeypatch):
    calls = []

    class Recorder:
        def __getattr__(self, name):
            calls.append(name)
            return getattr(_C, name)

    monkeypatch.setattr(_spectral_native, "native", Recorder())
    layer = make_layer(30, 40, 2, torch.float32)
    layer(torch.randn(5, 30, requires_grad=True)).sum().backward()
    layer.per_sample_grads((torch.randn(5, 30),), torch.randn(5, 40))
    assert calls == ["spectral_forward_at", "spectral_backward_at", "spectral_backward_at"]


def test_double_backward_matches_a_dense_layer():
    """A gradient penalty through the native path equals the same penalty through nn.Linear(dense_matrix)."""
    layer = make_layer(16, 12, 2, torch.float64)
    dense = torch.nn.Linear(16, 12, dtype=torch.float64)
    with torch.no_grad():
        dense.weight.copy_(layer.dense_matrix())
        dense.bias.copy_(layer.bias)
    x = torch.randn(3, 16, dtype=torch.float64)
    penalties = []
    for model in (layer, dense):
        xs = x.clone().requires_grad_()
        (gx,) = torch.autograd.grad(torch.tanh(model(xs)).sum(), xs, create_graph=True)
        (dx,) = torch.autograd.grad(gx.square().sum(), xs)
        penalties.append(dx)
    torch.testing.assert_close(penalties[0], penalties[1], rtol=1e-10, atol=1e-10)


def test_per_sample_grads_with_mixed_parameter_dtypes_use_the_reference_path():
    layer = make_layer(30, 40, 2, torch.float64)
    layer.inner_scale.data = layer.inner_scale.data.float()
    x, grad = torch.randn(4, 30, dtype=torch.float64), torch.randn(4, 40, dtype=torch.float64)
    per_sample = layer.per_sample_grads((x,), grad)
    layer(x).backward(grad)
    for p, g in per_sample.items():
        torch.testing.assert_close(g.sum(0).to(p.grad.dtype), p.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("depth", [1, 2])
def test_lazily_negated_tensors_are_read_with_their_sign(depth):
    """A contiguous torch._neg_view holds -x only as a flag: the kernels, reading raw memory, used to see x."""
    layer = make_layer(30, 40, depth, torch.float64)
    x, grad = torch.randn(4, 30, dtype=torch.float64), torch.randn(4, 40, dtype=torch.float64)
    negated_x, negated_grad = torch._neg_view(-x), torch._neg_view(-grad)
    assert negated_x.is_contiguous() and negated_x.is_neg()
    torch.testing.assert_close(layer(negated_x), layer(x), rtol=0, atol=0)
    inputs = []
    for xs, grads in ((x, grad), (negated_x, negated_grad)):
        layer.zero_grad(set_to_none=True)
        xr = xs.clone().requires_grad_(True)  # a clone keeps the flag
        layer(xr).backward(grads)
        inputs.append((xr.grad, [p.grad for p in layer.parameters()], layer.per_sample_grads((xs,), grads)))
    (dx, dparams, per_sample), (negated_dx, negated_dparams, negated_per_sample) = inputs
    torch.testing.assert_close(negated_dx, dx, rtol=0, atol=0)
    for p, expected, got in zip(layer.parameters(), dparams, negated_dparams):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        torch.testing.assert_close(negated_per_sample[p], per_sample[p], rtol=0, atol=0)
    negated_scale = {"in_scale": torch._neg_view(-layer.in_scale.detach())}
    torch.testing.assert_close(torch.func.functional_call(layer, negated_scale, (x,)), layer(x), rtol=0, atol=0)


def test_native_grouped_gradients_are_per_group_sums(num_threads):
    layer = make_layer(1000, 1300, 2, torch.float64)  # big enough for two threads to share the groups
    x, grad = torch.randn(40, 1000, dtype=torch.float64), torch.randn(40, 1300, dtype=torch.float64)
    args = (layer.in_scale, layer.inner_scale, layer.out_scale, True, layer._flat_perm, layer.transform_length)
    per_group = native_spectral_grads(x, grad, *args, groups=4, want_input_grad=True)
    for g in range(4):
        rows = slice(10 * g, 10 * g + 10)
        single = native_spectral_grads(x[rows], grad[rows], *args, groups=1, want_input_grad=True)
        for name in ("in_scale", "inner_scale", "out_scale", "bias"):
            torch.testing.assert_close(per_group[name][g], single[name][0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(per_group["input"][rows], single["input"], rtol=1e-12, atol=1e-12)


def test_native_forward_of_no_rows_is_empty():
    layer = make_layer(30, 40, 1, torch.float32)
    y = native_spectral_forward(torch.empty(0, 30), layer.in_scale, None, layer.out_scale, layer.bias,
                                layer._flat_perm, layer.transform_length)
    assert y.shape == (0, 40)


def kernel_call(layer, x, **changes):
    """The arguments of ``_C.spectral_forward_at`` for ``layer`` on ``x``, with fields of ``layer`` replaced."""
    fields = ("in", "out", "length", "blocks", "depth", "m", "in_scale", "inner_scale", "out_scale", "bias", "perm",
              "hadamard_m")
    described = dict(zip(fields, _layer_at(x, layer.in_scale, layer.inner_scale, layer.out_scale, layer.bias,
                                             layer._flat_perm, layer.transform_length), strict=True))
    described.update(changes)
    y = torch.empty(x.shape[0], layer.out_features)
    return (x.data_ptr(), y.data_ptr(), x.shape[0], tuple(described[f] for f in fields), 1, False)


@pytest.mark.parametrize("entry,message", [(64, "outside its block"), (-1, "outside its block"),
                                           (None, "not a permutation")])
def test_native_kernel_rejects_a_corrupted_permutation(entry, message):
    layer = make_layer(64, 128, 1, torch.float32)  # two blocks of 64
    perm = layer._flat_perm.clone()
    perm[0, 5] = perm[0, 6] if entry is None else entry  # None: a repeated index
    x = torch.randn(3, 64)
    with pytest.raises(ValueError, match=message):
        _C.spectral_forward_at(*kernel_call(layer, x, perm=perm.data_ptr()))


def test_loading_a_state_dict_with_a_non_permutation_raises():
    layer = make_layer(20, 30, 2, torch.float32)
    state = layer.state_dict()
    state["permutation"][1, 0, 3] = state["permutation"][1, 0, 4]
    with pytest.raises(RuntimeError, match="'permutation' is not a permutation"):
        make_layer(20, 30, 2, torch.float32).load_state_dict(state)


@pytest.mark.parametrize("change,message", [
    ({"in": 65}, "in must be at most length"),
    ({"out": 129}, "out must be at most blocks"),
    ({"length": 48}, "n must be m"),
    ({"m": 3}, "m must be"),
    ({"m": 2**40}, "m must be"),
    ({"depth": 0}, "must be positive"),
    ({"depth": 2}, "inner_scale must be given exactly when depth > 1"),
    ({"blocks": 2**63}, "fit in int64"),
    ({"blocks": 2**57 + 1}, "depth \\* blocks \\* length overflows"),  # wrapped to 64: passed, then walked off perm
    ({"depth": 2**62, "inner_scale": 8}, "depth \\* blocks \\* length overflows"),
    ({"in_scale": 0}, "in_scale must be a non-null"),
    ({"perm": 0}, "perm must be a non-null"),
    ({"out_scale": 2}, "out_scale must be a non-null address aligned"),
])
def test_native_kernel_rejects_inconsistent_layer_descriptions(change, message):
    layer = make_layer(64, 128, 1, torch.float32)
    with pytest.raises(ValueError, match=message):
        _C.spectral_forward_at(*kernel_call(layer, torch.randn(3, 64), **change))


def test_native_backward_kernel_rejects_rows_that_do_not_split_into_groups():
    layer = make_layer(64, 128, 1, torch.float32)
    x, grad = torch.randn(4, 64), torch.randn(4, 128)
    x_address, _, rows, described, threads, float64 = kernel_call(layer, x)
    grads = [torch.empty(4, 64), torch.empty(1, 2, 64), None, torch.empty(1, 128), torch.empty(1, 128)]
    addresses = tuple(0 if g is None else g.data_ptr() for g in grads)
    _C.spectral_backward_at(x_address, grad.data_ptr(), rows, described, addresses, 1, threads, float64)  # consistent
    with pytest.raises(ValueError, match="multiple of groups"):
        _C.spectral_backward_at(x_address, grad.data_ptr(), rows, described, addresses, 3, threads, float64)
    with pytest.raises(ValueError, match="grad_in_scale must be a non-null"):
        _C.spectral_backward_at(x_address, grad.data_ptr(), rows, described, (addresses[0], 0, 0, *addresses[3:]),
                                1, threads, float64)


@pytest.mark.parametrize("name,bad", [
    ("in_scale", torch.ones(2, 63)), ("in_scale", torch.ones(128)), ("out_scale", torch.ones(127)),
    ("out_scale", torch.ones(1, 128)), ("bias", torch.ones(7)), ("inner_scale", torch.ones(5)),
])
def test_native_path_refuses_parameters_of_the_wrong_shape(name, bad):
    """Parameters are the user's to replace: a wrong shape is a ValueError before the kernel reads anything."""
    layer = make_layer(64, 128, 1, torch.float32)
    setattr(layer, name, torch.nn.Parameter(bad))
    with pytest.raises(ValueError, match="spectral layer tensors do not fit together"):
        layer(torch.randn(3, 64))


def test_native_path_refuses_a_wrong_gradient_shape():
    layer = make_layer(64, 128, 1, torch.float32)
    args = (layer.in_scale, None, layer.out_scale, True, layer._flat_perm, layer.transform_length)
    with pytest.raises(ValueError, match=r"grad must be a CPU tensor \(rows, out_features\)"):
        native_spectral_grads(torch.randn(3, 64), torch.randn(3, 127), *args, groups=1, want_input_grad=True)


def test_the_native_helpers_refuse_buffers_of_another_dtype_than_x():
    """Called directly (they are in the module's __all__), a float32 scale or gradient beside float64 x was read
    as float64: twice its size, past its end (SIGSEGV at a guard page, a fuzzing helper found)."""
    layer = make_layer(64, 128, 1, torch.float64)
    x = torch.randn(3, 64, dtype=torch.float64)
    args = (layer.in_scale.detach(), None, layer.out_scale.detach(), None, layer._flat_perm, layer.transform_length)
    native_spectral_forward(x, *args)  # consistent
    for index in (0, 2):
        wrong = list(args)
        wrong[index] = wrong[index].float()
        with pytest.raises(ValueError, match="CPU tensors of one dtype"):
            native_spectral_forward(x, *wrong)
    with pytest.raises(ValueError, match="CPU tensors of one dtype"):
        native_spectral_forward(x.float(), *args)
    grad_args = (layer.in_scale.detach(), None, layer.out_scale.detach(), True, layer._flat_perm,
                 layer.transform_length)
    with pytest.raises(ValueError, match=r"grad must be a CPU tensor .* of x's dtype torch.float64, got .*float32"):
        native_spectral_grads(x, torch.randn(3, 128), *grad_args, groups=1, want_input_grad=True)


def test_strided_parameters_and_parametrized_layers_match_the_reference_path(monkeypatch):
    layer = make_layer(48, 40, 2, torch.float64)
    with torch.no_grad():  # the same values, stored with a stride of 2 (not contiguous)
        strided = torch.empty(*layer.in_scale.shape, 2, dtype=torch.float64)[..., 0]
        layer.in_scale.data = strided.copy_(layer.in_scale)
    assert not layer.in_scale.is_contiguous()
    x, grad = torch.randn(5, 48, dtype=torch.float64), torch.randn(5, 40, dtype=torch.float64)
    (y, gx, gp), (y_ref, gx_ref, gp_ref) = both_paths(layer, x, grad, monkeypatch)
    for got, expected in zip([y, gx, *gp], [y_ref, gx_ref, *gp_ref], strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)

    class Doubled(torch.nn.Module):
        def forward(self, value):
            return 2 * value

    with torch.no_grad():
        reference = layer(x).clone()
        layer.out_scale.mul_(0.5)
    torch.nn.utils.parametrize.register_parametrization(layer, "out_scale", Doubled())
    assert "out_scale" not in layer._parameters  # a property now: the forward pass must still see it
    torch.testing.assert_close(layer(x), reference, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])  # native kernel / reference inside the op
@pytest.mark.parametrize("n,out,depth", [(20, 50, 2), (384, 300, 1)])
def test_registered_ops_pass_opcheck(n, out, depth, dtype):
    layer = make_layer(n, out, depth, dtype)
    layout = layer.layout()
    indices, sizes = list(layout[:5]), tuple(layout[5:])
    x = torch.randn(6, n, dtype=dtype, requires_grad=True)
    params = [p.detach().clone().requires_grad_(True) if p is not None else None
              for p in (layer.in_scale, layer.inner_scale, layer.out_scale, layer.bias)]
    torch.library.opcheck(torch.ops.dreidel.spectral_linear.default, (x, *params, indices, *sizes))
    grad = torch.randn(6, out, dtype=dtype)
    backward_args = (x.detach(), grad, params[0].detach(), None if params[1] is None else params[1].detach(),
                     params[2].detach(), indices, *sizes, True, True)
    torch.library.opcheck(torch.ops.dreidel.spectral_linear_backward.default, backward_args)
