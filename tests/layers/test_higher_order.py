"""Backward passes that build a graph, or carry a forward-mode tangent, through the spectral layers' custom
backward (the native kernel's, and the registered op's): a layer applied twice, hooks, forward-over-reverse."""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as forward_ad
from torch.func import functional_call

from dreidel.layers import DeepSpectralLinear, LinearWHT


def _layers():
    torch.manual_seed(0)
    return [LinearWHT(12, 12, dtype=torch.float64), DeepSpectralLinear(12, 12, depth=2, dtype=torch.float64)]


def _paths(layer):
    """The layer itself (the native kernels' autograd.Function on CPU), and its registered op."""
    layout = layer.layout()

    def op(h, params):
        return torch.ops.dreidel.spectral_linear(h, params["in_scale"], params.get("inner_scale"),
                                                 params["out_scale"], params["bias"], list(layout[:5]), *layout[5:])

    return {"layer": lambda h, params: functional_call(layer, params, (h,)), "op": op}


def _twice(path, params, x):
    return torch.tanh(path(torch.tanh(path(x, params)), params)).sum()


@pytest.mark.parametrize("index", [0, 1])
@pytest.mark.parametrize("path_name", ["layer", "op"])
def test_a_layer_applied_twice_gets_its_gradients_with_create_graph(index, path_name):
    """Differentiated with respect to the saved tensors, the graph-building backward returned total derivatives
    through the first call as well, which the outer backward added again: gradients off by up to 2.4."""
    layer = _layers()[index]
    path = _paths(layer)[path_name]
    x = torch.randn(3, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    params = dict(layer.named_parameters())
    names = list(params)
    plain = torch.autograd.grad(_twice(path, params, x), list(params.values()))
    graphed = torch.autograd.grad(_twice(path, params, x), list(params.values()), create_graph=True)
    detached = {name: p.detach() for name, p in params.items()}
    # torch.func runs the layer on composed torch ops (the raw op has no functorch rule): an independent path
    composed = _paths(layer)["layer"]
    functional = torch.func.grad(lambda p: _twice(composed, p, x))(detached)
    for name, a, b in zip(names, plain, graphed):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12, msg=name)
        torch.testing.assert_close(a, functional[name], rtol=1e-10, atol=1e-12, msg=name)
    # and the second derivative of the reused layer, a Hessian-vector product, matches torch.func's
    vector = {name: torch.randn_like(p) for name, p in params.items()}
    hvp = torch.autograd.grad(sum((g * vector[name]).sum() for name, g in zip(names, graphed)), list(params.values()))
    _, expected = torch.func.jvp(torch.func.grad(lambda p: _twice(composed, p, x)), (detached,), (vector,))
    for name, got in zip(names, hvp):
        torch.testing.assert_close(got, expected[name], rtol=1e-9, atol=1e-10, msg=name)


@pytest.mark.parametrize("path_name", ["layer", "op"])
def test_hooks_fire_once_when_the_backward_builds_a_graph(path_name):
    """The inner gradient fired the saved tensors' hooks, then the outer backward again: a hook that doubles a
    gradient quadrupled it, and retain_grad() kept twice the input's gradient."""
    layer = _layers()[0]
    path = _paths(layer)[path_name]
    params = dict(layer.named_parameters())
    calls = []
    handle = layer.in_scale.register_hook(lambda g: calls.append(1) or 2 * g)
    grads = {}
    for create_graph in (False, True):
        calls.clear()
        x = torch.randn(3, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(2)).requires_grad_()
        h = x * 1.0
        h.retain_grad()
        loss = path(h, params).pow(2).sum()
        loss.backward(create_graph=create_graph)
        grads[create_graph] = (layer.in_scale.grad.detach().clone(), h.grad.detach().clone(), len(calls))
        layer.zero_grad(set_to_none=True)
    handle.remove()
    (scale_plain, input_plain, calls_plain), (scale_graphed, input_graphed, calls_graphed) = grads[False], grads[True]
    assert calls_plain == calls_graphed == 1
    torch.testing.assert_close(scale_graphed, scale_plain, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(input_graphed, input_plain, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("index", [0, 1])
@pytest.mark.parametrize("path_name", ["layer", "op"])
def test_forward_over_reverse_carries_the_tangent(index, path_name):
    """autograd.grad with a dual grad_outputs and no graph: the kernel read the primal only and the tangent was
    dropped (a zero directional derivative). Oracle: the layer's dense matrix, y = x W^T + b."""
    layer = _layers()[index]
    path = _paths(layer)[path_name]
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(3, 12, dtype=torch.float64, generator=generator, requires_grad=True)
    cotangent, tangent = (torch.randn(3, 12, dtype=torch.float64, generator=generator) for _ in range(2))
    weight = layer.dense_matrix().detach()
    y = path(x, dict(layer.named_parameters()))
    with forward_ad.dual_level():
        (grad,) = torch.autograd.grad(y, x, forward_ad.make_dual(cotangent, tangent))
        carried = forward_ad.unpack_dual(grad).tangent
    assert carried is not None
    torch.testing.assert_close(carried, tangent @ weight, rtol=1e-12, atol=1e-12)


def test_the_registered_op_refuses_a_tangent_it_cannot_carry():
    layer = _layers()[0]
    layout = layer.layout()
    with forward_ad.dual_level():
        x = forward_ad.make_dual(torch.randn(2, 12, dtype=torch.float64), torch.randn(2, 12, dtype=torch.float64))
        with torch.no_grad(), pytest.raises(RuntimeError, match="dreidel::spectral_linear: an input carries a "
                                                                 "forward-mode tangent.*use the spectral layer"):
            torch.ops.dreidel.spectral_linear(x, layer.in_scale, None, layer.out_scale, layer.bias,
                                              list(layout[:5]), *layout[5:])
