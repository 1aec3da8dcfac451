"""torch.compile smoke tests: compiled layers agree with eager ones, forward and backward."""

from __future__ import annotations

import pytest
import torch

from dreidel.layers import Conv2dSpectral, DeepSpectralLinear, MultiHeadAttentionSpectral


def check_compiled_matches_eager(layer, x):
    torch._dynamo.reset()
    compiled = torch.compile(layer)
    eager_x, compiled_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    eager_y, compiled_y = layer(eager_x), compiled(compiled_x)
    torch.testing.assert_close(compiled_y, eager_y, rtol=1e-5, atol=1e-5)
    eager_y.square().sum().backward()
    eager_grads = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    compiled_y.square().sum().backward()
    torch.testing.assert_close(compiled_x.grad, eager_x.grad, rtol=1e-4, atol=1e-4)
    for p, expected in zip(layer.parameters(), eager_grads):
        torch.testing.assert_close(p.grad, expected, rtol=1e-4, atol=1e-4)


def test_compile_deep_spectral_linear():
    layer = DeepSpectralLinear(300, 500, depth=2, activation="relu", generator=torch.Generator().manual_seed(0))
    check_compiled_matches_eager(layer, torch.randn(4, 300))


def test_a_spectral_layer_compiles_to_one_graph():
    """No graph break: the eager-only routing tests (batched tensors, permutation checks) stay out of the trace."""
    torch._dynamo.reset()
    layer = DeepSpectralLinear(20, 30, depth=2, generator=torch.Generator().manual_seed(0))
    x = torch.randn(3, 20)
    torch.testing.assert_close(torch.compile(layer, fullgraph=True)(x), layer(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("depth", [1, 2])
def test_a_compiled_layer_follows_its_permutation_changed_in_place(depth):
    """The eager layer rebuilds its indices after an in-place change of its permutation; a compiled one used to
    keep the indices it was traced with."""
    torch._dynamo.reset()
    layer = DeepSpectralLinear(12, 20, depth=depth, generator=torch.Generator().manual_seed(0))
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(3, 12)
    before = compiled(x)
    with torch.no_grad():
        layer.permutation.copy_(layer.permutation.flip(-1))
    after = compiled(x)
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, layer(x), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_compile_conv2d_spectral():
    layer = Conv2dSpectral(12, 24, padding=1, activation="gelu", generator=torch.Generator().manual_seed(0))
    check_compiled_matches_eager(layer, torch.randn(2, 6, 6, 12))


@pytest.mark.slow
def test_compile_attention():
    layer = MultiHeadAttentionSpectral(48, 4, causal=True, generator=torch.Generator().manual_seed(0))
    check_compiled_matches_eager(layer, torch.randn(2, 5, 48))
