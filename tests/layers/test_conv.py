"""Channels-last spectral convolutions against torch's channels-first depthwise conv + the mix's dense matrix."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.nn import functional as F

import dreidel.api as api
from dreidel.layers import Conv2dSpectral, Conv3dSpectral, to_dense

CASES = [
    # (spatial dims, in, out, kernel, stride, padding, dilation, linear)
    (2, 12, 20, 3, 1, 1, 1, "wht"),
    (2, 24, 10, (3, 1), (2, 1), (0, 1), (1, 2), "deep_wht"),
    (2, 7, 7, 5, 2, 2, 1, "dense"),
    (3, 8, 16, 3, 1, 1, 1, "wht"),
    (3, 20, 12, (1, 3, 3), (1, 2, 2), (0, 1, 1), (1, 1, 2), "deep_wht"),
]


def make(dims, cin, cout, kernel, stride, padding, dilation, linear, **kwargs):
    cls = Conv2dSpectral if dims == 2 else Conv3dSpectral
    return cls(cin, cout, kernel_size=kernel, stride=stride, padding=padding, dilation=dilation, linear=linear,
               generator=torch.Generator().manual_seed(0), **kwargs)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}d-{c[1]}to{c[2]}-{c[7]}")
def test_matches_depthwise_conv_then_dense_matrix(case):
    dims, cin, cout, kernel, stride, padding, dilation, linear = case
    layer = make(*case, activation="relu").double()
    with torch.no_grad():
        layer.channel_mix.bias.normal_()
    spatial = (9, 8) if dims == 2 else (5, 6, 7)
    x = torch.randn(2, *spatial, cin, dtype=torch.float64)
    conv = F.conv2d if dims == 2 else F.conv3d
    depthwise = conv(x.movedim(-1, 1).contiguous(), layer.depthwise_weight, None, layer.stride, layer.padding,
                     layer.dilation, groups=cin)
    mixed = depthwise.movedim(1, -1) @ to_dense(layer.channel_mix).T + layer.channel_mix.bias
    y = layer(x)
    assert y.shape == mixed.shape and y.shape[-1] == cout
    torch.testing.assert_close(y, F.relu(mixed), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dims", [2, 3])
def test_gradcheck(dims):
    layer = make(dims, 3, 5, 2, 1, 0, 1, "wht", activation="tanh").double()
    x = torch.randn(1, *([3] * dims), 3, dtype=torch.float64, requires_grad=True)
    names = [name for name, _ in layer.named_parameters()]

    def f(x, *params):
        return torch.func.functional_call(layer, dict(zip(names, params)), (x,))

    assert torch.autograd.gradcheck(f, (x, *layer.parameters()), fast_mode=True)


@pytest.mark.parametrize("dims", [2, 3])
def test_safetensors_round_trip_is_bit_identical(tmp_path, dims):
    source = make(dims, 12, 24, 3, 1, 1, 1, "deep_wht")
    save_file(source.state_dict(), str(tmp_path / "conv.safetensors"))
    target = Conv2dSpectral(12, 24, padding=1, linear="deep_wht") if dims == 2 else \
        Conv3dSpectral(12, 24, padding=1, linear="deep_wht")
    target.load_state_dict(load_file(str(tmp_path / "conv.safetensors")))
    x = torch.randn(2, *([5] * dims), 12)
    assert torch.equal(source(x), target(x))


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}d-{c[1]}to{c[2]}-{c[7]}")
def test_sequential_checkpoint_round_trip_is_bit_identical(tmp_path, case):
    dims = case[0]
    source = make(*case, activation="relu", bias=False,
                  linear_kwargs={"depth": 3} if case[7] == "deep_wht" else None)
    model = api.Sequential(source).double()
    x = torch.randn(2, *([9] * dims), case[1], dtype=torch.float64)
    model.build(tuple(x.shape[1:]))
    loaded = api.load(model.save(tmp_path / "conv"))
    assert loaded[0].config() == source.config()
    assert torch.equal(loaded.predict(x), model.predict(x))
    for key, value in model.state_dict().items():
        assert loaded.state_dict()[key].dtype == value.dtype and torch.equal(loaded.state_dict()[key], value), key


@pytest.mark.parametrize("dims", [2, 3])
def test_an_empty_batch_of_low_precision_images_gives_an_empty_output(dims):
    layer = (Conv2dSpectral if dims == 2 else Conv3dSpectral)(4, 6, padding=1).bfloat16()
    y = layer(torch.zeros(0, *(5,) * dims, 4, dtype=torch.bfloat16))
    assert y.shape == (0, *(5,) * dims, 6) and y.dtype == torch.bfloat16


@pytest.mark.parametrize("linear", ["wht", "dense"])
@pytest.mark.parametrize("dims", [2, 3])
def test_device_and_dtype_in_linear_kwargs_place_the_whole_layer(dims, linear):
    """They used to reach the channel mix only, leaving a float32 depthwise weight that no input could pass."""
    cls = Conv2dSpectral if dims == 2 else Conv3dSpectral
    layer = cls(4, 6, linear=linear, linear_kwargs={"dtype": torch.float64}, generator=torch.Generator().manual_seed(0))
    assert {p.dtype for p in layer.parameters()} == {torch.float64}
    default = cls(4, 6, linear=linear, generator=torch.Generator().manual_seed(0))
    assert torch.equal(layer.depthwise_weight, default.depthwise_weight.double())  # the same draws
    assert layer(torch.randn(1, *(5,) * dims, 4, dtype=torch.float64)).dtype == torch.float64
    meta = cls(4, 6, linear=linear, linear_kwargs={"device": "meta"})
    assert {p.device.type for p in meta.parameters()} == {"meta"}
    assert meta(torch.empty(1, *(5,) * dims, 4, device="meta")).shape == (1, *(3,) * dims, 6)


def test_config_rebuilds_the_layer_and_leaves_out_init_only_arguments():
    layer = Conv2dSpectral(8, 16, kernel_size=(3, 1), padding=(1, 0), linear="deep_wht",
                           linear_kwargs={"depth": 3, "dtype": torch.float64}, generator=torch.Generator())
    config = layer.config()
    assert config["kernel_size"] == [3, 1] and config["linear_kwargs"] == {"depth": 3}
    rebuilt = Conv2dSpectral(**config)
    assert rebuilt.config() == config
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in layer.state_dict().items()}


def test_rejects_channels_first_and_bad_arguments():
    layer = Conv2dSpectral(8, 16)
    with pytest.raises(ValueError, match=r"channels-last.*C=8.*\(2, 8, 5, 5\)"):
        layer(torch.randn(2, 8, 5, 5))
    with pytest.raises(ValueError, match="kernel_size"):
        Conv2dSpectral(8, 16, kernel_size=(3, 3, 3))
    with pytest.raises(ValueError, match="in_channels"):
        Conv3dSpectral(0, 4)
    with pytest.raises(ValueError, match="stride"):
        Conv2dSpectral(8, 8, stride=0)
    with pytest.raises(ValueError, match="activation"):
        Conv2dSpectral(8, 8, activation="bogus")
    with pytest.raises(TypeError, match=r"Conv2dSpectral: input dtype torch.float64 .* torch.float32"):
        layer(torch.randn(2, 5, 5, 8, dtype=torch.float64))


@pytest.mark.parametrize("cls", [Conv2dSpectral, Conv3dSpectral])
@pytest.mark.parametrize("kwargs, message", [
    ({"linear_kwargs": [1]}, r"linear_kwargs must be a dict of keyword arguments or None, got \[1\]"),
    ({"linear_kwargs": {1: 2}}, r"linear_kwargs must be a dict of keyword arguments or None, got \{1: 2\}"),
    ({"generator": 5}, r"generator must be a torch.Generator or None .*, got int"),
    ({"linear_kwargs": {"generator": 5}}, r"linear_kwargs\['generator'\] must be a torch.Generator or None"),
])
def test_bad_linear_kwargs_and_generators_are_type_errors_naming_them(cls, kwargs, message):
    """linear_kwargs=[1] raised AttributeError, generator=5 torch.randn's overload list (audit)."""
    with pytest.raises(TypeError, match=message):
        cls(3, 8, **kwargs)


def test_a_generator_given_only_in_linear_kwargs_seeds_the_depthwise_weights_too():
    def make():
        return Conv2dSpectral(4, 8, 3, linear_kwargs={"generator": torch.Generator().manual_seed(3)})

    torch.manual_seed(0)
    first = make()
    torch.manual_seed(1)
    second = make()
    assert torch.equal(first.depthwise_weight, second.depthwise_weight)


def test_numpy_integer_sizes_are_taken_as_nn_conv2d_takes_them():
    """np.int64 channels and kernel sizes (a config read through NumPy, say) were refused as 'not a positive
    int'; they are kept as Python ints (a checkpoint's JSON config cannot hold NumPy's)."""
    import numpy as np

    layer = Conv2dSpectral(np.int64(8), np.int64(12), kernel_size=np.int64(3), padding=(np.int64(1), 1))
    assert type(layer.in_channels) is int and type(layer.out_channels) is int
    assert all(type(k) is int for k in layer.kernel_size + layer.padding)
    assert layer(torch.randn(2, 5, 5, 8)).shape == (2, 5, 5, 12)


@pytest.mark.parametrize("cls, dims", [(Conv2dSpectral, 2), (Conv3dSpectral, 3)])
@pytest.mark.parametrize("linear", ["dense", "wht", "deep_wht"])
def test_reset_parameters_initialises_a_layer_built_on_the_meta_device(cls, dims, linear):
    with torch.device("meta"):
        layer = cls(8, 8, linear=linear)
    layer.to_empty(device="cpu")  # uninitialised memory
    torch.manual_seed(5)
    layer.reset_parameters()
    drawn = {name: value.clone() for name, value in layer.state_dict().items()}
    with torch.no_grad():  # whatever reset_parameters leaves alone would stay NaN (or -1)
        for value in layer.state_dict().values():
            value.fill_(float("nan") if value.is_floating_point() else -1)
    torch.manual_seed(5)
    layer.reset_parameters()  # every tensor drawn again, from torch's generator: the same draws
    for name, value in layer.state_dict().items():
        assert torch.equal(value, drawn[name]), name
    layer.reset_parameters()
    assert not torch.equal(layer.depthwise_weight, drawn["depthwise_weight"])
    assert 0.5 < float(drawn["depthwise_weight"].std() * math.sqrt(3 ** dims)) < 1.5  # variance 1 / prod(kernel)
