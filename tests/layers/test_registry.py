"""The linear-kind registry: every kind builds an nn.Linear-shaped module; unknown kinds are named errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dreidel.layers import build_linear, linear_kinds, num_parameters, register_linear, to_dense


def test_builtin_kinds_are_registered():
    assert {"dense", "wht", "deep_wht"} <= set(linear_kinds())


@pytest.mark.parametrize("kind", linear_kinds())
@pytest.mark.parametrize("widths", [(384, 1536), (1000, 300)], ids=str)
def test_every_kind_maps_like_a_linear(kind, widths):
    n, out = widths
    layer = build_linear(kind, n, out, bias=True, generator=torch.Generator().manual_seed(0))
    x = torch.randn(2, 3, n, dtype=torch.float64)
    layer = layer.double()
    y = layer(x)
    assert y.shape == (2, 3, out)
    expected = x @ to_dense(layer).T + layer.bias
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", linear_kinds())
def test_every_kind_supports_lazy_in_features(kind):
    layer = build_linear(kind, None, 32, bias=False)
    assert num_parameters(layer) == 0
    assert layer(torch.randn(4, 20)).shape == (4, 32)
    assert num_parameters(layer) > 0


def test_a_generator_leaves_the_global_rng_alone():
    for kind in ("dense", "wht", "deep_wht"):
        torch.manual_seed(0)
        expected = torch.rand(3)
        torch.manual_seed(0)
        build_linear(kind, 50, 40, generator=torch.Generator().manual_seed(3))
        assert torch.equal(torch.rand(3), expected), kind


def test_generator_makes_every_kind_reproducible():
    for kind in linear_kinds():
        a, b = (build_linear(kind, 50, 40, generator=torch.Generator().manual_seed(3)) for _ in range(2))
        for ta, tb in zip(a.state_dict().values(), b.state_dict().values()):
            assert torch.equal(ta, tb), kind


def test_deep_wht_depth_defaults_to_two_and_is_configurable():
    assert build_linear("deep_wht", 64, 64).depth == 2
    assert build_linear("deep_wht", 64, 64, depth=4).depth == 4


def test_unknown_kind_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown linear kind 'nope'.*dense.*wht"):
        build_linear("nope", 4, 4)


def test_register_a_new_kind_and_reject_duplicates():
    name = "test_identity_kind"

    @register_linear(name)
    def _identity_kind(in_features, out_features, bias=True, **kwargs):
        return nn.Linear(in_features, out_features, bias=bias)

    assert name in linear_kinds()
    assert isinstance(build_linear(name, 3, 5), nn.Linear)
    with pytest.raises(ValueError, match="already registered"):
        register_linear(name)(_identity_kind)


def test_num_parameters_counts_spectral_as_linear_in_width():
    dense, wht = build_linear("dense", 1024, 1024), build_linear("wht", 1024, 1024)
    assert num_parameters(dense) == 1024 * 1024 + 1024
    assert num_parameters(wht) == 3 * 1024 == wht.num_parameters()


@pytest.mark.parametrize("kind", ["dense", "wht", "deep_wht"])
def test_a_non_bool_bias_is_refused(kind):
    """bias="no" used to add a bias; bias=0 was saved into a config that load then refused."""
    with pytest.raises(TypeError, match="bias must be a bool"):
        build_linear(kind, 8, 8, bias="no")


@pytest.mark.parametrize("kind", linear_kinds())
@pytest.mark.parametrize("widths, error, message", [
    ((-3, 4), ValueError, "in_features must be a positive int, got -3"),
    ((4, 0), ValueError, "out_features must be a positive int, got 0"),
    ((4.0, 4), TypeError, "in_features must be a positive int or None, got 4.0"),
])
def test_a_bad_width_is_refused_for_every_kind(kind, widths, error, message):
    """nn.Linear's own error for -3 was torch's "negative dimension"."""
    with pytest.raises(error, match=message):
        build_linear(kind, *widths)


@pytest.mark.parametrize("kind", [["wht"], None, 3])
def test_a_kind_that_is_not_a_name_lists_the_known_kinds(kind):
    """A list used to fail with 'unhashable type: list'."""
    with pytest.raises(ValueError, match=r"unknown linear kind .*known kinds: .*dense"):
        build_linear(kind, 4, 3)
