"""MultiHeadAttentionSpectral against a float64 softmax attention built from the projections' dense matrices."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file, save_file

import dreidel.api as api
from dreidel.layers import KVCache, MultiHeadAttentionSpectral, to_dense


def make(linear="wht", causal=False, embed_dim=48, heads=4, seed=0):
    layer = MultiHeadAttentionSpectral(embed_dim, heads, linear=linear, causal=causal,
                                       generator=torch.Generator().manual_seed(seed)).double()
    with torch.no_grad():
        for projection in (layer.query, layer.key, layer.value, layer.out):
            projection.bias.normal_(generator=torch.Generator().manual_seed(seed + 1))
    return layer


def manual_attention(layer, x, context=None, causal=False):
    def project(module, t):
        return t @ to_dense(module).T + module.bias

    source = x if context is None else context
    batch, queries, width = x.shape
    heads, head_dim = layer.num_heads, layer.head_dim
    q = project(layer.query, x).view(batch, queries, heads, head_dim).transpose(1, 2)
    k = project(layer.key, source).view(batch, -1, heads, head_dim).transpose(1, 2)
    v = project(layer.value, source).view(batch, -1, heads, head_dim).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim)
    if causal:
        future = torch.ones(queries, k.shape[-2], dtype=torch.bool).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    attended = torch.softmax(scores, dim=-1) @ v
    return project(layer.out, attended.transpose(1, 2).reshape(batch, queries, width))


@pytest.mark.parametrize("linear", ["wht", "deep_wht", "dense"])
@pytest.mark.parametrize("causal", [False, True])
def test_self_attention_matches_manual_softmax(linear, causal):
    layer = make(linear, causal)
    x = torch.randn(2, 7, 48, dtype=torch.float64)
    torch.testing.assert_close(layer(x), manual_attention(layer, x, causal=causal), rtol=1e-10, atol=1e-10)


def test_cross_attention_matches_manual_softmax_and_caches_the_context():
    layer = make("wht", embed_dim=384, heads=6)
    x, context = torch.randn(2, 3, 384, dtype=torch.float64), torch.randn(2, 11, 384, dtype=torch.float64)
    expected = manual_attention(layer, x, context)
    cache = KVCache()
    torch.testing.assert_close(layer(x, context=context, kv_cache=cache), expected, rtol=1e-10, atol=1e-10)
    assert cache.length == 11
    # later decoding steps reuse the projected context
    torch.testing.assert_close(layer(x[:, :1], context=context, kv_cache=cache), expected[:, :1], rtol=1e-10,
                               atol=1e-10)


@pytest.mark.parametrize("chunks", [[1] * 6, [3, 1, 2], [2, 4]])
def test_incremental_decoding_equals_full_causal_pass(chunks):
    layer = make("deep_wht", causal=True)
    x = torch.randn(2, sum(chunks), 48, dtype=torch.float64)
    full = layer(x)
    cache, outputs, start = KVCache(), [], 0
    for size in chunks:
        outputs.append(layer(x[:, start:start + size], kv_cache=cache))
        start += size
    assert cache.length == sum(chunks)
    torch.testing.assert_close(torch.cat(outputs, dim=1), full, rtol=1e-10, atol=1e-10)


def test_boolean_mask_combines_with_causal_mask():
    layer = make("wht", causal=True)
    x = torch.randn(1, 5, 48, dtype=torch.float64)
    keep = torch.tensor([True, False, True, True, True])  # drop key 1 for every query
    masked = layer(x, attn_mask=keep)
    full = layer(x)
    torch.testing.assert_close(masked[:, 0], full[:, 0])  # query 0 only sees key 0 either way
    assert not torch.allclose(masked[:, 2:], full[:, 2:])


def test_gradcheck():
    layer = make("wht", embed_dim=8, heads=2)
    x = torch.randn(1, 3, 8, dtype=torch.float64, requires_grad=True)
    names = [name for name, _ in layer.named_parameters()]

    def f(x, *params):
        return torch.func.functional_call(layer, dict(zip(names, params)), (x,))

    assert torch.autograd.gradcheck(f, (x, *layer.parameters()), fast_mode=True)


def test_safetensors_round_trip_is_bit_identical(tmp_path):
    source = make("deep_wht", causal=True, seed=4)
    save_file(source.state_dict(), str(tmp_path / "attention.safetensors"))
    target = MultiHeadAttentionSpectral(48, 4, linear="deep_wht", causal=True).double()
    target.load_state_dict(load_file(str(tmp_path / "attention.safetensors")))
    x = torch.randn(2, 5, 48, dtype=torch.float64)
    assert torch.equal(source(x), target(x))


@pytest.mark.parametrize("linear, linear_kwargs", [("wht", None), ("deep_wht", {"depth": 3}), ("dense", None)])
def test_sequential_checkpoint_round_trip_is_bit_identical(tmp_path, linear, linear_kwargs):
    source = MultiHeadAttentionSpectral(48, 4, linear=linear, causal=True, dropout=0.25, bias=False,
                                        linear_kwargs=linear_kwargs, generator=torch.Generator().manual_seed(5))
    model = api.Sequential(source).build((5, 48))
    loaded = api.load(model.save(tmp_path / "attention"))
    assert loaded[0].config() == source.config()
    assert loaded.input_shape == (5, 48)
    x = torch.randn(2, 5, 48)
    assert torch.equal(loaded.predict(x), model.predict(x))
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_an_empty_low_precision_batch_gives_an_empty_output():
    layer = MultiHeadAttentionSpectral(8, 2, generator=torch.Generator().manual_seed(0)).bfloat16()
    y = layer(torch.zeros(0, 3, 8, dtype=torch.bfloat16))
    assert y.shape == (0, 3, 8) and y.dtype == torch.bfloat16


@pytest.mark.parametrize("linear", ["wht", "dense"])
def test_device_and_dtype_in_linear_kwargs_place_the_whole_layer(linear):
    layer = MultiHeadAttentionSpectral(8, 2, linear=linear, linear_kwargs={"dtype": torch.float64})
    assert {p.dtype for p in layer.parameters()} == {torch.float64}
    assert layer(torch.randn(2, 3, 8, dtype=torch.float64)).dtype == torch.float64
    meta = MultiHeadAttentionSpectral(8, 2, linear=linear, linear_kwargs={"device": "meta"})
    assert {p.device.type for p in meta.parameters()} == {"meta"}


def test_bad_arguments():
    with pytest.raises(ValueError, match="divisible"):
        MultiHeadAttentionSpectral(50, 4)
    with pytest.raises(ValueError, match="unknown linear kind"):
        MultiHeadAttentionSpectral(48, 4, linear="nope")
    with pytest.raises(TypeError, match="causal must be a bool"):
        MultiHeadAttentionSpectral(48, 4, causal="no")  # truthy: it used to switch masking on
    with pytest.raises(TypeError, match="dropout"):
        MultiHeadAttentionSpectral(48, 4, dropout="0.1")
    with pytest.raises(ValueError, match="dropout"):
        MultiHeadAttentionSpectral(48, 4, dropout=1.0)
    with pytest.raises(TypeError, match=r"linear_kwargs must be a dict of keyword arguments or None, got \[1\]"):
        MultiHeadAttentionSpectral(48, 4, linear_kwargs=[1])  # was AttributeError
    layer = MultiHeadAttentionSpectral(48, 4, causal=True)
    with pytest.raises(ValueError, match=r"\(batch, positions, 48\)"):
        layer(torch.randn(2, 5, 40))
    with pytest.raises(ValueError, match="causal"):
        layer(torch.randn(2, 5, 48), context=torch.randn(2, 3, 48))
    cache = KVCache()
    layer(torch.randn(2, 5, 48), kv_cache=cache)
    with pytest.raises(ValueError, match="kv_cache holds a batch of 2, x has a batch of 3"):
        layer(torch.randn(3, 1, 48), kv_cache=cache)
    assert cache.length == 5  # left as it was


def test_a_cache_serves_one_kind_of_attention():
    """A self-attention cache given to a cross-attention call (or the reverse) used to be used silently."""
    torch.manual_seed(0)
    attention = MultiHeadAttentionSpectral(16, 2)
    x, context = torch.randn(2, 3, 16), torch.randn(2, 5, 16)
    self_cache, cross_cache = KVCache(), KVCache()
    attention(x, kv_cache=self_cache)
    attention(x, context=context, kv_cache=cross_cache)
    with pytest.raises(ValueError, match="holds self-attention keys, but this is a cross-attention call"):
        attention(x, context=context, kv_cache=self_cache)
    with pytest.raises(ValueError, match="holds cross-attention keys, but this is a self-attention call"):
        attention(x[:, :1], kv_cache=cross_cache)


def test_a_call_that_fails_leaves_the_cache_as_it_was():
    """A failed call (here a bad mask) must not leave its new keys in the cache, or a retry attends to that
    position twice."""
    layer = make(causal=True)
    x = torch.randn(2, 6, 48, dtype=torch.float64)
    cache = KVCache()
    layer(x[:, :4], kv_cache=cache)
    with pytest.raises(ValueError, match="attn_mask"):
        layer(x[:, 4:5], kv_cache=cache, attn_mask=torch.ones(1, 1, 1, 3, dtype=torch.bool))  # 3 keys, not 5
    assert cache.length == 4
    step = layer(x[:, 4:5], kv_cache=cache)
    torch.testing.assert_close(step, layer(x[:, :5])[:, 4:5], rtol=1e-10, atol=1e-10)


def test_numpy_integer_sizes_are_taken_as_nn_multihead_attention_takes_them():
    import numpy as np

    layer = MultiHeadAttentionSpectral(np.int64(16), np.int64(2))
    assert type(layer.embed_dim) is int and type(layer.num_heads) is int
    assert layer(torch.randn(2, 3, 16)).shape == (2, 3, 16)


@pytest.mark.parametrize("mask, error, message", [
    (torch.zeros(3, 3), ValueError, r"attn_mask must be broadcastable to \(batch, heads, queries, keys\) = "
                                    r"\(2, 4, 5, 5\), got shape \(3, 3\)"),  # was a raw broadcasting error
    (torch.zeros(2, 1, 1, 4, 5), ValueError, r"= \(2, 4, 5, 5\), got shape \(2, 1, 1, 4, 5\)"),
    (torch.ones(4, dtype=torch.bool), ValueError, r"got shape \(4,\)"),
    (torch.zeros(5, 5, dtype=torch.int64), TypeError, "attn_mask must be bool .* or floating .*, got torch.int64"),
    ([[True] * 5] * 5, TypeError, "attn_mask must be a torch.Tensor or None, got list"),
])
def test_a_bad_attn_mask_is_refused_naming_the_expected_shape(mask, error, message):
    """A mask of the wrong shape gave a raw broadcasting error, an int64 mask or a list failed inside SDPA."""
    layer = MultiHeadAttentionSpectral(16, 4)
    with pytest.raises(error, match=message):
        layer(torch.randn(2, 5, 16), attn_mask=mask)


@pytest.mark.parametrize("causal", [False, True])
def test_a_one_dimensional_mask_applies_to_every_query(causal):
    """SDPA refuses masks of fewer than 2 dimensions: one over the keys alone worked only with causal=True."""
    layer = make(causal=causal)
    x = torch.randn(2, 5, 48, dtype=torch.float64)
    keep = torch.tensor([True, False, True, True, True])
    torch.testing.assert_close(layer(x, attn_mask=keep), layer(x, attn_mask=keep.expand(5, 5)))


def test_the_attn_mask_shape_counts_the_cached_keys_and_a_float64_mask_is_cast():
    torch.manual_seed(0)
    layer = MultiHeadAttentionSpectral(16, 4)
    x = torch.randn(2, 7, 16)
    cache = KVCache()
    layer(x[:, :5], kv_cache=cache)
    with pytest.raises(ValueError, match=r"= \(2, 4, 2, 7\); keys: 5 cached \+ 2 new, got shape \(2, 2\)"):
        layer(x[:, 5:], kv_cache=cache, attn_mask=torch.ones(2, 2, dtype=torch.bool))
    additive = torch.zeros(1, 7, dtype=torch.float64)
    additive[:, 3] = float("-inf")
    step = layer(x[:, 5:], kv_cache=cache, attn_mask=additive)  # float64 failed inside SDPA for a float32 layer
    torch.testing.assert_close(step, layer(x, attn_mask=additive.float())[:, 5:])
