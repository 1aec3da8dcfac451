"""Inputs at the edges of the spectral layers (a user audit): infinite values beside padding, tensors that are
not dense, permutations that repeat an index where only the torch path would see them, lazy layers built in
inference mode."""

from __future__ import annotations

import pytest
import torch
from torch.func import vmap

from dreidel.layers import Conv2dSpectral, DeepSpectralLinear, LinearWHT, MultiHeadAttentionSpectral


@pytest.mark.parametrize("out_features", [12, 40])  # one block, and several
@pytest.mark.parametrize("feature", [0, 3, 9])
def test_an_infinite_input_gives_what_the_dense_map_gives_beside_padding(out_features, feature):
    """10 features padded to 16: the padded entries read x[:, 0] and were zeroed by a zero scale, so an infinite
    first feature made every output NaN (0 * inf), where the dense product gives +-inf (native and torch paths)."""
    torch.manual_seed(0)
    layer = LinearWHT(10, out_features, dtype=torch.float64)
    x = torch.zeros(2, 10, dtype=torch.float64)
    x[0, feature], x[1, 5] = float("inf"), 1.0
    dense = x @ layer.dense_matrix().T + layer.bias.detach()
    with torch.no_grad():
        for path, y in (("native", layer(x)), ("torch (vmap)", vmap(layer)(x))):
            assert torch.equal(torch.isnan(y), torch.isnan(dense)), path
            assert not torch.isnan(y[0]).any(), path
            assert torch.equal(y[0], dense[0]), path  # the same infinities, signs included
            torch.testing.assert_close(y[1], dense[1])


def _nested(width: int) -> torch.Tensor:
    return torch.nested.nested_tensor([torch.randn(2, width), torch.randn(3, width)], layout=torch.jagged)


@pytest.mark.parametrize("make_input, message", [
    (lambda x: x.to_sparse(), "dense \\(strided\\) tensor, got layout torch.sparse_coo; convert it with x.to_dense"),
    (lambda x: x.to_mkldnn(), "dense \\(strided\\) tensor, got layout torch._mkldnn"),
    (lambda x: _nested(x.shape[-1]), "is a nested tensor"),
])
def test_tensors_that_are_not_dense_are_refused_by_name(make_input, message):
    x = torch.randn(3, 16)
    for layer in (LinearWHT(16, 30), DeepSpectralLinear(16, 30, depth=2)):
        with pytest.raises(TypeError, match=f"{type(layer).__name__}: input .*{message}"):
            layer(make_input(x))
    with pytest.raises(TypeError, match=f"Conv2dSpectral: input .*{message}"):
        Conv2dSpectral(16, 16, 3)(make_input(torch.randn(3, 16)))
    with pytest.raises(TypeError, match=f"MultiHeadAttentionSpectral: x .*{message}"):
        MultiHeadAttentionSpectral(16, 2)(make_input(x))


def test_a_permutation_that_repeats_an_index_is_refused_under_vmap_too():
    """The native kernels refused it in eager mode; under vmap (the torch path) it was used, giving garbage."""
    layer = LinearWHT(16, 16)
    x = torch.randn(2, 16)
    with torch.no_grad():
        layer.permutation.zero_()
    for call in (lambda: layer(x), lambda: vmap(layer)(x), lambda: layer.half()(x.half())):
        with pytest.raises(ValueError, match="some row repeats an index"):
            call()


def test_an_ema_of_buffers_that_breaks_the_permutation_is_named_and_the_working_recipe_keeps_it():
    """torch's EMA (AveragedModel(use_buffers=True, multi_avg_fn=get_ema_multi_avg_fn(d))) averages the integer
    permutation in float32 and truncates it: the error used to say only that a row repeats an index. With
    use_buffers=False the average keeps the permutation and follows the scales."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    torch.manual_seed(0)
    model = torch.nn.Sequential(LinearWHT(20, 40), torch.nn.Linear(40, 3))
    x = torch.randn(4, 20)
    broken = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    kept = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=False)
    for _ in range(2):
        with torch.no_grad():
            model[0].in_scale.add_(0.01)
        broken.update_parameters(model)
        kept.update_parameters(model)
    assert not torch.equal(broken.module[0].permutation, model[0].permutation)  # torch's truncation, as found
    with pytest.raises(ValueError, match="repeats an index .*AveragedModel\\(use_buffers=True\\).*use_buffers=False"):
        broken(x)
    assert torch.equal(kept.module[0].permutation, model[0].permutation)
    torch.testing.assert_close(kept.module[0].in_scale, model[0].in_scale - 0.01 * 0.9)
    torch.testing.assert_close(kept(x), torch.func.functional_call(model, dict(kept.module.named_parameters()), (x,)))


def test_a_lazy_layer_built_in_inference_mode_trains_afterwards():
    """Its parameters and permutation were inference tensors, which autograd cannot save for backward."""
    layer = LinearWHT(8)
    with torch.inference_mode():
        layer(torch.randn(2, 16))
    assert not any(t.is_inference() for t in (*layer.parameters(), *layer.buffers()))
    layer(torch.randn(2, 16)).sum().backward()
    assert layer.in_scale.grad is not None


def test_an_ensemble_over_stacked_permutations_runs_under_compiled_vmap_with_batching_rules():
    """torch.func's model-ensembling recipe (stack_module_state, functional_call, vmap), compiled: each member
    keeps its own permutation. The inverse permutation was built with scatter_, which has no batching rule, so
    functorch warned of a slow per-member loop (a user audit)."""
    import copy
    import warnings

    from torch.func import functional_call, stack_module_state

    torch.manual_seed(0)
    members = [LinearWHT(20, 40) for _ in range(3)]
    params, buffers = stack_module_state(members)
    base = copy.deepcopy(members[0]).to("meta")
    x = torch.randn(5, 20)

    def member(p, b, x):
        return functional_call(base, (p, b), (x,))

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*batching rule")
        y = torch.compile(vmap(member, in_dims=(0, 0, None)), backend="aot_eager")(params, buffers, x)
    with torch.no_grad():
        torch.testing.assert_close(y, torch.stack([m(x) for m in members]))


def test_a_strided_permutation_replaced_through_data_is_noticed():
    """The values the indices were built from were cloned with the permutation's own strides, then compared byte
    for byte with a contiguous replacement: another permutation with the same bytes in another order passed as
    unchanged, and the layer kept stale indices (a fuzzing helper found)."""
    torch.manual_seed(0)
    layer = DeepSpectralLinear(16, 16, depth=2)
    evens, odds = list(range(0, 16, 2)), list(range(1, 16, 2))
    strided = torch.tensor([evens + odds, odds + evens]).view(2, 1, 16).permute(2, 1, 0).contiguous().permute(2, 1, 0)
    layer.permutation.data = strided
    with torch.no_grad():
        layer.permutation[0, 0, 0] = layer.permutation[0, 0, 0].item()  # a version bump: rebuilt from it
    x = torch.randn(3, 16)
    layer(x)
    same_bytes = torch.empty(0, dtype=torch.long).set_(strided.untyped_storage(), 0, (2, 1, 16)).clone()
    assert not torch.equal(same_bytes, strided)
    layer.permutation.data = same_bytes
    fresh = DeepSpectralLinear(16, 16, depth=2)
    fresh.load_state_dict(layer.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(layer(x), fresh(x), rtol=0, atol=0)
