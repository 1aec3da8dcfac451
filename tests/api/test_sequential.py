"""``dreidel.Sequential``: training against a hand-written torch loop, save/load, summary, and bad input."""

from __future__ import annotations

import json
import sys
import warnings
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.utils.prune
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import dreidel.api as api
from dreidel.data import as_dataloader, load_digits
from dreidel.layers import Conv2dSpectral, DeepSpectralLinear, LinearWHT
from dreidel.optim import CurvatureOptimizer


@pytest.fixture(scope="module")
def digits():
    x_train, y_train = load_digits("train", seed=0)
    x_test, y_test = load_digits("test", seed=0)
    return x_train, y_train, x_test, y_test


@pytest.fixture(scope="module")
def trained_spectral(digits):
    """A lazy spectral MLP trained on the 8x8 digits through the high-level API."""
    x_train, y_train, x_test, y_test = digits
    torch.manual_seed(0)
    model = api.Sequential()
    model.add(LinearWHT(128, activation="relu"))  # in_features inferred from the first batch
    model.add(nn.Linear(128, 10))
    model.compile("adam", "cross_entropy", ["accuracy", "top_3"], lr=1e-2)
    history = model.fit(x_train, y_train, epochs=8, batch_size=32, seed=0, verbose=0, validation_data=(x_test, y_test))
    return model, history


def _small_model(kind: str) -> api.Sequential:
    first = nn.Linear(64, 32) if kind == "dense" else LinearWHT(64, 32)
    return api.Sequential(first, nn.ReLU(), nn.Linear(32, 10))


def test_spectral_model_learns_digits(trained_spectral, digits):
    model, history = trained_spectral
    *_, x_test, y_test = digits
    scores = model.evaluate(x_test, y_test)
    assert scores["accuracy"] > 0.9  # chance is 0.1
    assert scores["top_3_accuracy"] >= scores["accuracy"]
    assert history.history["val_accuracy"][-1] == pytest.approx(scores["accuracy"])
    assert history.history["loss"][-1] < history.history["loss"][0]
    predicted = model.predict(x_test).argmax(1)
    assert (predicted == y_test).float().mean().item() == pytest.approx(scores["accuracy"])


@pytest.mark.parametrize("kind", ["dense", "wht"])
def test_fit_equals_a_hand_written_torch_loop(digits, kind):
    """Same initial weights, same seed: ``fit`` must produce exactly the weights of the plain loop."""
    x_train, y_train, *_ = digits
    torch.manual_seed(1)
    model = _small_model(kind)
    reference = _small_model(kind)
    reference.load_state_dict(model.state_dict())

    model.compile("adam", "cross_entropy", lr=1e-2)
    model.fit(x_train, y_train, epochs=2, batch_size=50, seed=7, verbose=0)

    optimizer = torch.optim.Adam(reference.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(7)
    for _ in range(2):
        order = torch.randperm(len(x_train), generator=generator)
        for start in range(0, len(x_train), 50):
            index = order[start : start + 50]
            optimizer.zero_grad()
            F.cross_entropy(reference(x_train[index]), y_train[index]).backward()
            optimizer.step()
    for (name, ours), theirs in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(ours, theirs), name


def test_dataloader_input_and_validation_split(digits):
    x_train, y_train, *_ = digits
    torch.manual_seed(0)
    model = api.Sequential(LinearWHT(32, activation="relu"), nn.Linear(32, 10))
    model.compile("sgd", "cross_entropy", ["accuracy"], lr=0.1)
    loader = as_dataloader(x_train, y_train, 64, generator=torch.Generator().manual_seed(0))
    history = model.fit(loader, epochs=2, verbose=0, validation_data=as_dataloader(x_train[:100], y_train[:100], 64))
    assert model.input_shape == (64,) and len(history.history["val_loss"]) == 2
    history = model.fit(x_train, y_train, epochs=1, validation_split=0.25, verbose=0)
    held_out = model.evaluate(x_train[-360:], y_train[-360:])  # the last quarter (1438 * 0.25 -> 360)
    assert history.history["val_loss"][0] == pytest.approx(held_out["loss"], rel=1e-5)


def test_validation_split_batches_go_to_the_models_device_like_the_others():
    # CI has no GPU: a model on the meta device stands in for one on cuda:0 fed CPU tensors
    x, y = torch.randn(10, 8), torch.randint(0, 3, (10,))
    model = api.Sequential(LinearWHT(8, 3, device="meta")).compile("sgd", lr=0.1)
    whole, _ = model._split_sources(x, y, 4, None, 0.0)
    train, validation = model._split_sources(x, y, 4, None, 0.2)
    for source in (whole, train, validation):
        batch_x, _ = next(source.batches(False, None))
        assert batch_x.device.type == "meta"
    assert (train.num_samples, validation.num_samples) == (8, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_save_load_round_trip_is_exact(tmp_path, digits, dtype):
    x_train, y_train, x_test, _ = digits
    torch.manual_seed(2)
    model = api.Sequential(LinearWHT(100, activation="relu"), DeepSpectralLinear(48, depth=2, activation="gelu"),
                           nn.Dropout(0.1), nn.LayerNorm(48), nn.Linear(48, 10)).to(dtype)
    model.compile("adam", lr=1e-2)
    model.fit(x_train.to(dtype), y_train, epochs=1, verbose=0, seed=0)
    path = model.save(tmp_path / "digits.dreidel")
    config = json.loads((path / "config.json").read_text())
    assert [spec["type"] for spec in config["layers"]] == ["LinearWHT", "DeepSpectralLinear", "Dropout", "LayerNorm", "Linear"]
    assert config["input_shape"] == [64]
    loaded = api.load(path)
    assert isinstance(loaded, api.Sequential) and loaded.input_shape == (64,)
    assert torch.equal(loaded.predict(x_test.to(dtype)), model.predict(x_test.to(dtype)))
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_named_layers_round_trip(tmp_path):
    torch.manual_seed(4)
    model = api.Sequential(OrderedDict(fc1=LinearWHT(16, 8, activation="relu"), fc2=nn.Linear(8, 2))).build((16,))
    path = model.save(tmp_path / "named")
    config = json.loads((path / "config.json").read_text())
    assert [spec["name"] for spec in config["layers"]] == ["fc1", "fc2"]
    loaded = api.load(path)
    assert [name for name, _ in loaded.named_children()] == ["fc1", "fc2"]
    x = torch.randn(5, 16)
    assert torch.equal(loaded.predict(x), model.predict(x))


def test_checkpoint_without_layer_names_loads_positionally(tmp_path):
    """Files written before names were stored have specs without ``name``: children are numbered."""
    path = _small_model("wht").build((64,)).save(tmp_path / "m")
    _edit_config(path, lambda c: [spec.pop("name") for spec in c["layers"]])
    assert [name for name, _ in api.load(path).named_children()] == ["0", "1", "2"]


@pytest.mark.parametrize("names, message", [(["a", "a", "b"], "repeats the name 'a'"),
                                            (["a", "b.c", "d"], "invalid 'name' 'b.c'"),
                                            (["a", 3, "d"], "invalid 'name' 3"),
                                            (["a", "training", "d"], "'training' is taken by an attribute"),
                                            (["history", "b", "d"], "'history' is taken by an attribute"),
                                            (["a", "b", "fit"], "'fit' is taken by an attribute")])
def test_load_rejects_bad_layer_names(tmp_path, names, message):
    path = _small_model("wht").build((64,)).save(tmp_path / "m")
    _edit_config(path, lambda c: [spec.__setitem__("name", name) for spec, name in zip(c["layers"], names)])
    with pytest.raises(ValueError, match=message):
        api.load(path)


@pytest.mark.parametrize("name", ["input_shape", "history", "stop_training", "forward", "training", "_modules"])
def test_layer_names_taken_by_the_models_attributes_are_refused(name):
    # input_shape and history used to replace the child with None, so save() silently left the layer out
    with pytest.raises(ValueError, match=f"'{name}' is taken by an attribute of Sequential"):
        api.Sequential(OrderedDict([(name, LinearWHT(16, 8)), ("out", nn.Linear(8, 2))]))


def test_an_empty_model_is_not_saved(tmp_path):
    with pytest.raises(ValueError, match="no layers"):
        api.Sequential().save(tmp_path / "m")
    assert not (tmp_path / "m").exists()


def _edit_config(path, edit):
    config = json.loads((path / "config.json").read_text())
    edit(config)
    (path / "config.json").write_text(json.dumps(config))


def _set_arg(index, key, value):
    return lambda c: c["layers"][index]["args"].__setitem__(key, value)


CONFIG, TENSORS = "config.json", "model.safetensors"


@pytest.mark.parametrize(
    "edit, message, file",
    [
        (lambda c: c["layers"][0].__setitem__("type", "Conv9d"), "unknown layer type 'Conv9d'", CONFIG),
        (lambda c: c.pop("layers"), "missing the key 'layers'", CONFIG),
        (lambda c: c["layers"][0].pop("args"), r"layers\[0\] named '0' is missing the key 'args'", CONFIG),
        (_set_arg(2, "out_features", 11),
         r"tensor '2.weight' has shape \(10, 32\), but .*layers\[2\] named '2' \(Linear\) declares \(11, 32\)", TENSORS),
        (lambda c: c["layers"].append({"type": "Linear", "args": {"in_features": 10, "out_features": 2}}),
         "lacks tensor '3.weight'", TENSORS),
        (lambda c: c["layers"].pop(), "has tensor '2.bias' that no layer of the config declares", TENSORS),
        (_set_arg(0, "colour", "red"), "cannot build LinearWHT: unknown argument 'colour'", CONFIG),
        (lambda c: c.__setitem__("format", "keras"), "'format' is 'keras'", CONFIG),
        (lambda c: c.__setitem__("format_version", True), "'format_version' True is not supported", CONFIG),
        (lambda c: c.__setitem__("format_version", 1.0), "'format_version' 1.0 is not supported", CONFIG),
        (lambda c: c.__setitem__("optimizer", "adam"), "unknown key 'optimizer'", CONFIG),
        (lambda c: c["layers"][0].__setitem__("kind", "x"), r"layers\[0\] named '0' has unknown key 'kind'", CONFIG),
        (_set_arg(0, "activation", "bogus"),
         r"layers\[0\] named '0' \(LinearWHT\): cannot build LinearWHT .*unknown activation 'bogus'", CONFIG),
        (_set_arg(0, "device", "meta"), r"layers\[0\] named '0': LinearWHT argument 'device' is not allowed", CONFIG),
        (_set_arg(2, "dtype", "float16"), r"layers\[2\] named '2': Linear argument 'dtype' is not allowed", CONFIG),
        (_set_arg(0, "generator", 0), "argument 'generator' is not allowed", CONFIG),
        (_set_arg(0, "in_features", None), r"layers\[0\] named '0' \(LinearWHT\).*lazy layer", CONFIG),
        (_set_arg(2, "in_features", None), r"layers\[2\] named '2': Linear argument 'in_features' must be int, got None",
         CONFIG),
        (_set_arg(2, "bias", "yes"), r"Linear argument 'bias' must be bool, got 'yes'", CONFIG),
        (_set_arg(2, "in_features", 32.5), r"layers\[2\] named '2': Linear argument 'in_features' must be int, got 32.5",
         CONFIG),
        (_set_arg(0, "out_features", [10, 2]), r"LinearWHT argument 'out_features' must be int or null, got \[10, 2\]",
         CONFIG),
        (_set_arg(0, "_generator", 1), r"cannot build LinearWHT: unknown argument '_generator'", CONFIG),
        (lambda c: c.__setitem__("input_shape", [1] * 40), "'input_shape' has 40 dimensions; at most 32", CONFIG),
        (lambda c: c.__setitem__("input_shape", [65]), r"the layers do not run on 'input_shape' \[65\]", CONFIG),
        (lambda c: c.__setitem__("input_shape", "64"), "'input_shape' must be null or a list of positive ints", CONFIG),
        (lambda c: c.__setitem__("input_shape", [0]), "'input_shape' must be null or a list of positive ints", CONFIG),
        (lambda c: c["layers"].__setitem__(1, 0), r"layers\[1\] must be a JSON object \(a layer spec\), got int", CONFIG),
        (lambda c: c.__setitem__("layers", [0] * 10_001), "'layers' holds 10001 specs; at most 10000 are read", CONFIG),
        (_set_arg(2, "bias", float("nan")), r"NaN is not a JSON value", CONFIG),
    ],
    ids=["unknown-type", "no-layers", "no-args", "mis-shaped", "missing-tensor", "unexpected-tensor", "unknown-arg",
         "format", "version-bool", "version-float", "unknown-config-key", "unknown-spec-key", "bad-activation", "device", "dtype", "generator",
         "lazy", "null-width", "bool-type", "float-width", "list-width", "private-arg", "input-shape-rank",
         "input-shape-misfit", "input-shape-type", "input-shape-zero", "spec-not-object", "too-many-layers", "nan"],
)
def test_load_rejects_mismatched_checkpoints(tmp_path, edit, message, file):
    model = _small_model("wht").build((64,))
    path = model.save(tmp_path / "m")
    _edit_config(path, edit)
    with pytest.raises(ValueError, match=message) as error:
        api.load(path)
    assert str(path / file) in str(error.value)  # the message names the file at fault


def test_mixed_precision_checkpoint_keeps_each_tensors_dtype(tmp_path):
    torch.manual_seed(8)
    model = api.Sequential(LinearWHT(16, 8), nn.LayerNorm(8), DeepSpectralLinear(8, 8)).build((16,))
    model[0].bfloat16()
    model[2].double()
    path = model.save(tmp_path / "mixed")
    rng = torch.get_rng_state()
    loaded = api.load(path)
    assert torch.equal(torch.get_rng_state(), rng)  # the layers take the file's values: nothing is drawn
    for key, value in model.state_dict().items():
        assert loaded.state_dict()[key].dtype == value.dtype and torch.equal(loaded.state_dict()[key], value), key
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    assert torch.equal(loaded[0](x), model[0](x))
    assert all(isinstance(p, nn.Parameter) and p.requires_grad and p.device.type == "cpu" for p in loaded.parameters())
    assert loaded.num_parameters() == model.num_parameters()


@pytest.mark.parametrize("layer, key", [(nn.Linear(4, 3), "0.weight"), (LinearWHT(4, 3), "0.out_scale")])
def test_a_layer_whose_tensors_differ_in_dtype_is_refused_at_load(tmp_path, layer, key):
    """One layer's floating tensors in different dtypes (a hand-edited file) used to load and then fail at
    predict with torch's dtype error, or, in LinearWHT, silently promote its output."""
    path = api.Sequential(layer).build((4,)).save(tmp_path / "m")
    tensors = load_file(str(path / "model.safetensors"))
    tensors[key] = tensors[key].double()
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match=rf"model.safetensors: the floating-point tensors of .* must share one dtype, "
                                         rf"got .*{key} F64"):
        api.load(path)


def test_values_that_a_layer_refuses_name_the_tensor_file(tmp_path):
    path = _small_model("wht").build((64,)).save(tmp_path / "m")
    tensors = load_file(str(path / "model.safetensors"))
    tensors["0.permutation"][0, 0, :2] = 0  # no longer a permutation
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"(?s)model.safetensors: .*'0\.permutation' is not a permutation"):
        api.load(path)


class _NeedsRealTensors(nn.Module):
    """A user layer whose constructor reads a value (``.item()``), which the meta device cannot give."""

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.norm = float(self.weight.norm().item())

    def forward(self, x):
        return x * self.weight / self.norm


class _WithDerivedBuffer(nn.Module):
    """A user layer with state outside its state dict (a non-persistent buffer computed at construction)."""

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((width,), 3.0))
        self.register_buffer("ramp", torch.arange(width, dtype=torch.float32), persistent=False)

    def forward(self, x):
        return x * self.weight + self.ramp


def test_state_outside_the_tensor_file_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setitem(api.LAYER_TYPES, "_WithDerivedBuffer", (_WithDerivedBuffer, lambda m: {"width": len(m.weight)}))
    model = api.Sequential(nn.Linear(3, 4), _WithDerivedBuffer(4)).double().build((3,))
    loaded = api.load(model.save(tmp_path / "m"))
    assert torch.equal(loaded[1].ramp, torch.arange(4.0)) and loaded[1].weight.dtype == torch.float64
    x = torch.randn(2, 3, dtype=torch.float64)
    assert torch.equal(loaded.predict(x), model.predict(x))


def test_layers_that_cannot_be_built_on_meta_are_checked_after_building(tmp_path, monkeypatch):
    monkeypatch.setitem(api.LAYER_TYPES, "_NeedsRealTensors", (_NeedsRealTensors, lambda m: {"width": len(m.weight)}))
    model = api.Sequential(nn.Linear(3, 4), _NeedsRealTensors(4)).build((3,))
    path = model.save(tmp_path / "m")
    x = torch.randn(2, 3)
    assert torch.equal(api.load(path).predict(x), model.predict(x))
    _edit_config(path, lambda c: c.__setitem__("input_shape", [5]))
    with pytest.raises(ValueError, match=r"config.json: the layers do not run on 'input_shape' \[5\]"):
        api.load(path)
    _edit_config(path, lambda c: c.update(input_shape=[3]) or c["layers"][1]["args"].update(width=6))
    with pytest.raises(ValueError, match=r"model.safetensors tensor '1.weight' has shape \(4,\)"):
        api.load(path)


@pytest.mark.parametrize("linear_kwargs, message", [
    ({"device": "cpu"}, "'linear_kwargs': 'device' is not allowed"),
    ({"dtype": "float16"}, "'linear_kwargs': 'dtype' is not allowed"),
    ({"generator": 0}, "'linear_kwargs': 'generator' is not allowed"),
    ([1], "'linear_kwargs' must be a JSON object \\(or null\\), got list"),
])
def test_nested_layer_arguments_are_checked_like_top_level_ones(tmp_path, linear_kwargs, message):
    """A nested device built the inner layer for real on load: 7.5 GiB for a config declaring 2^26 channels."""
    path = api.Sequential(Conv2dSpectral(4, 12)).build((8, 8, 4)).save(tmp_path / "m")
    _edit_config(path, lambda c: c["layers"][0]["args"].update(in_channels=2**12, out_channels=2**12,
                                                               linear_kwargs=linear_kwargs))
    with pytest.raises(ValueError, match=r"layers\[0\] named '0': Conv2dSpectral argument " + message):
        api.load(path)


def test_a_layer_built_for_real_cannot_take_more_than_its_tensor_file_holds(tmp_path, monkeypatch):
    """A layer that cannot be built on meta is built for real; a huge declared size fails before allocating."""
    monkeypatch.setitem(api.LAYER_TYPES, "_NeedsRealTensors", (_NeedsRealTensors, lambda m: {"width": len(m.weight)}))
    path = api.Sequential(nn.Linear(3, 4), _NeedsRealTensors(4)).build((3,)).save(tmp_path / "m")
    _edit_config(path, lambda c: c["layers"][1]["args"].update(width=2**40))  # 4 TiB of float32
    with pytest.raises(ValueError, match=r"layers\[1\] named '1' \(_NeedsRealTensors\): _NeedsRealTensors cannot be "
                                         r"built on the meta device, and building it for real would create at least "
                                         r"4398046511104 bytes .* beside the 16 bytes the tensor file holds"):
        api.load(path)


class _SeededProjection(nn.Module):
    """State rebuilt from a seed rather than saved (a non-persistent buffer), by a constructor that cannot run
    on meta (a Python number taken from a tensor)."""

    def __init__(self, width: int, seed: int = 0) -> None:
        super().__init__()
        self.width, self.seed = width, seed
        projection = torch.randn(width, width, generator=torch.Generator().manual_seed(seed))
        self.register_buffer("projection", projection / float(projection.std()), persistent=False)
        self.scale = nn.Parameter(torch.ones(width))

    def forward(self, x):
        return x @ self.projection * self.scale


def test_a_layer_that_rebuilds_unsaved_state_loads(tmp_path, monkeypatch):
    """64 MiB rebuilt from a seed beside 16 KB in the file: within the build's allowance, as before the guard."""
    monkeypatch.setitem(api.LAYER_TYPES, "_SeededProjection",
                        (_SeededProjection, lambda m: {"width": m.width, "seed": m.seed}))
    model = api.Sequential(_SeededProjection(4096, seed=1)).build((4096,))
    x = torch.randn(2, 4096)
    torch.testing.assert_close(api.load(model.save(tmp_path / "m"))(x), model(x), rtol=0, atol=0)


def test_layers_built_for_real_share_one_allowance(tmp_path, monkeypatch):
    """The allowance for what layers without meta kernels create beside the tensor file is for the whole load:
    it was per layer, so a config of k such layers could take k times it."""
    from dreidel.api import _loading

    monkeypatch.setitem(api.LAYER_TYPES, "_SeededProjection",
                        (_SeededProjection, lambda m: {"width": m.width, "seed": m.seed}))
    model = api.Sequential(_SeededProjection(4096, seed=1), _SeededProjection(4096, seed=2)).build((4096,))
    path = model.save(tmp_path / "m")
    monkeypatch.setattr(_loading, "BUILD_ALLOWANCE_BYTES", 100 << 20)  # each rebuilds 64 MiB: one fits, not two
    with pytest.raises(ValueError, match=r"layers\[1\].*what is left of 1 GiB for all such layers"):
        api.load(path)


@pytest.mark.parametrize("layer, args, message", [
    (nn.Embedding(10, 4), {"padding_idx": 50}, "cannot build Embedding .* Padding_idx must be within num_embeddings"),
    (nn.Flatten(), {"start_dim": 7}, r"the layers do not run on 'input_shape' \[4\]: Dimension out of range"),
    # softmax's and softmin's meta kernels skip the check (a review: the model loaded, then failed on every call)
    (nn.Softmax(dim=-1), {"dim": 5}, r"the layers do not run on 'input_shape' \[4\]: Softmax: dim 5 is out of range"),
    (nn.Softmax(dim=1), {"dim": -3}, r"the layers do not run on 'input_shape' \[4\]: Softmax: dim -3 is out of range"),
])
def test_arguments_torch_refuses_with_other_errors_are_named_with_the_file(tmp_path, layer, args, message):
    """torch refuses some doctored arguments with an AssertionError or an IndexError; load let them through bare."""
    if isinstance(layer, nn.Embedding):
        model = api.Sequential(layer).build((3,), dtype=torch.int64)
    else:
        model = api.Sequential(nn.Linear(4, 4), layer).build((4,))
    path = model.save(tmp_path / "m")
    _edit_config(path, lambda c: c["layers"][-1]["args"].update(args))
    with pytest.raises(ValueError, match=f"config.json.*{message}"):
        api.load(path)


def test_declared_shapes_are_checked_against_the_tensor_header_before_any_layer_is_built(tmp_path, monkeypatch):
    """A tiny tensor file whose config declares Linear(4096, 4096) fails before 64 MB are allocated."""
    path = _small_model("dense").build((64,)).save(tmp_path / "m")
    _edit_config(path, lambda c: c["layers"][2]["args"].update(in_features=4096, out_features=4096))
    initialised_on = []
    original = nn.Linear.reset_parameters
    monkeypatch.setattr(nn.Linear, "reset_parameters",
                        lambda self: (initialised_on.append(self.weight.device.type), original(self))[-1])
    with pytest.raises(ValueError, match=r"'2.weight' has shape \(10, 32\), but .* declares \(4096, 4096\)"):
        api.load(path)
    assert initialised_on and set(initialised_on) == {"meta"}


@pytest.mark.parametrize("args", [{"out_features": 4096}, {"depth": 64}])
def test_spectral_layers_built_to_check_a_config_draw_nothing(tmp_path, monkeypatch, args):
    """On meta, a spectral layer draws no permutations: they cost a Python call per block and stage, so a
    500-byte config declaring 10^6 outputs took 14 s and 850 MB before its shapes were compared."""
    model = api.Sequential(OrderedDict([("spectral", DeepSpectralLinear(16, 16, depth=2)), ("out", nn.Linear(16, 2))]))
    path = model.build((16,)).save(tmp_path / "m")
    _edit_config(path, lambda c: c["layers"][0]["args"].update(args))
    draws = []
    original = torch.randperm
    monkeypatch.setattr(torch, "randperm", lambda *a, **k: (draws.append(a), original(*a, **k))[-1])
    with pytest.raises(ValueError, match="model.safetensors tensor 'spectral."):
        api.load(path)
    assert not draws


def test_summary_counts(trained_spectral):
    model, _ = trained_spectral
    text = model.summary()
    assert f"parameters: {sum(p.numel() for p in model.parameters()):,}" in text
    spectral, dense = model[0], model[1]
    assert spectral.in_features == 64
    from dreidel.api.summary import fwht_flops, summarize

    rows = summarize(model, model.input_shape, torch.float32)
    assert [r.parameters for r in rows] == [sum(p.numel() for p in layer.parameters()) for layer in model]
    assert [r.output_shape for r in rows] == [(128,), (10,)]
    assert rows[1].flops == 2 * 128 * 10 + 10
    # 64 -> 128: two blocks of a 64-point transform, one scaling each; then s_out, bias, ReLU on 128 outputs
    assert rows[0].flops == 2 * (fwht_flops(64) + 64) + 3 * 128
    assert fwht_flops(64) == 64 * 6 + 64 and fwht_flops(48) == 48 * 2 + 48 * 11 + 48


def test_summary_of_a_padded_spectral_layer_and_a_layer_used_twice():
    """The first scaling covers the real inputs (in_scale (B, n)); a layer at two positions is two rows, each
    with its own shapes (the second call used to overwrite the first's, and the row was missing)."""
    from dreidel.api.summary import fwht_flops, summarize

    relu = nn.ReLU()
    model = api.Sequential(LinearWHT(10, 40, bias=False), relu, nn.Linear(40, 4), relu).build((10,))
    rows = summarize(model, (10,), torch.float32)
    assert [r.output_shape for r in rows] == [(40,), (40,), (4,), (4,)]
    layer = model[0]  # L = 12, 4 blocks
    assert rows[0].flops == layer.num_blocks * (fwht_flops(12) + 10) + 40
    assert model.num_parameters() == sum(p.numel() for p in model.parameters())
    assert api.Sequential(LinearWHT(32)).num_parameters() == 0  # lazy: nothing yet


def test_summary_counts_dreidels_convolution_and_attention_and_an_embedding():
    """They were marked '?' and left out of the total: a Conv3dSpectral model reported 0 FLOPs (a user audit).
    Expected counts derived here from what the layers compute (the module docstring's convention)."""
    from dreidel.api.summary import fwht_flops, summarize
    from dreidel.layers import Conv3dSpectral, MultiHeadAttentionSpectral

    conv = api.Sequential(Conv2dSpectral(3, 8, 3, padding=1, activation="relu")).build((8, 8, 3))
    mix = conv[0].channel_mix  # a LinearWHT(3, 8): 3 inputs padded to 4, two blocks
    assert (mix.transform_length, mix.num_blocks) == (4, 2)
    mix_per_position = 2 * (fwht_flops(4) + 3) + 8 + 8  # transforms and in-scales, s_out, bias
    depthwise = 64 * 3 * 2 * 9  # 64 positions, 3 channels, a 3x3 kernel: a multiply and an add per tap
    assert summarize(conv, (8, 8, 3), torch.float32)[0].flops == depthwise + 64 * mix_per_position + 64 * 8

    conv3 = api.Sequential(Conv3dSpectral(4, 4, 2)).build((3, 3, 3, 4))
    positions = 2 * 2 * 2  # no padding, stride 1
    per_position = fwht_flops(4) + 4 + 4 + 4
    assert summarize(conv3, (3, 3, 3, 4), torch.float32)[0].flops == positions * (4 * 2 * 8 + per_position)

    attention = api.Sequential(nn.Embedding(20, 16), MultiHeadAttentionSpectral(16, 2)).build((5,), torch.int64)
    rows = summarize(attention, (5,), torch.int64)
    projection = fwht_flops(16) + 16 + 16 + 16  # a LinearWHT(16, 16): one block
    scores = 2 * 5 * 5  # heads x T x T
    assert rows[0].flops == 0  # a lookup
    assert rows[1].flops == 5 * 4 * projection + 2 * (2 * 5 * 5 * 16) + scores * 4
    assert "?" not in attention.summary()


def test_summary_of_an_unbuilt_model_needs_an_input_shape():
    model = api.Sequential(LinearWHT(16), nn.ReLU())
    model(torch.randn(2, 20))  # a direct call does not set it (the message said the model had seen no data)
    with pytest.raises(ValueError, match=r"input shape is not set \(fit, evaluate, predict or build set it; calling "
                                         r"the model does not\)"):
        model.summary()
    assert "(16,)" in model.summary(input_shape=(20,))


# ------------------------------------------------------------------------------------------ bad input
def test_fit_before_compile(digits):
    x_train, y_train, *_ = digits
    with pytest.raises(RuntimeError, match=r"compile\(optimizer, loss, metrics\) before fit"):
        _small_model("dense").fit(x_train, y_train)
    with pytest.raises(RuntimeError, match="before evaluate"):
        _small_model("dense").evaluate(x_train, y_train)


def test_wrong_feature_count_after_first_batch(trained_spectral, digits):
    model, _ = trained_spectral
    *_, x_test, y_test = digits
    with pytest.raises(ValueError, match=r"x: expected samples of shape \(64,\).*got \(63,\)"):
        model.predict(x_test[:, :63])
    with pytest.raises(ValueError, match=r"expected samples of shape \(64,\)"):
        model.fit(torch.zeros(8, 65), torch.zeros(8, dtype=torch.long), verbose=0)
    with pytest.raises(ValueError, match=r"do not fit the model's layers"):
        _small_model("dense").predict(torch.zeros(4, 63))


def test_dry_runs_use_the_models_device_and_dtype():
    """build / predict / summary / fit run their first forward pass where the parameters are (here: meta)."""
    meta = api.Sequential(LinearWHT(16, 8), nn.ReLU(), nn.LazyLinear(2, device="meta")).to("meta")
    assert meta.predict(torch.zeros(3, 16, device="meta")).shape == (3, 2)
    assert meta[2].weight.shape == (2, 8) and meta[2].weight.device.type == "meta"
    assert "(2,)" in api.Sequential(nn.Linear(16, 2)).to("meta").summary((16,))
    unfit = api.Sequential(nn.Linear(16, 8), nn.LazyLinear(2, device="meta")).to("meta").compile("sgd", "mse")
    with pytest.raises(RuntimeError, match="item"):  # training on meta stops at loss.item(), after the dry run
        unfit.fit(torch.zeros(4, 16, device="meta"), torch.zeros(4, 2, device="meta"), verbose=0)
    assert unfit.input_shape == (16,) and unfit[1].weight.shape == (2, 8)
    wide = api.Sequential(nn.Linear(16, 4, dtype=torch.float64), nn.LazyLinear(2, dtype=torch.float64))
    assert "(2,)" in wide.summary((16,)) and wide[1].weight.dtype == torch.float64


@pytest.mark.parametrize("model_dtype", [torch.float32, torch.float64])
def test_floating_inputs_are_cast_to_the_models_dtype(digits, model_dtype):
    """A float64 tensor, a float64 array, a float32 array and a DataLoader of float64 batches train alike."""
    x_train, y_train, x_test, _ = digits
    x, y = x_train[:200], y_train[:200]
    inputs = {"reference": (x.to(model_dtype), y), "float64 tensor": (x.double(), y),
              "float64 array": (x.double().numpy(), y.numpy()), "float32 array": (x.float().numpy(), y.numpy()),
              "float64 loader": (as_dataloader(x.double(), y, 50, shuffle=False), None)}
    states = {}
    for name, (data, labels) in inputs.items():
        torch.manual_seed(9)
        model = api.Sequential(LinearWHT(16, activation="relu"), nn.Linear(16, 10)).to(model_dtype)
        model.compile("sgd", lr=0.1)
        model.fit(data, labels, batch_size=50, shuffle=False, verbose=0)
        assert model.predict(x_test.double()).dtype == model_dtype
        states[name] = model.state_dict()
    for name, state in states.items():
        for key, value in states["reference"].items():
            assert state[key].dtype == value.dtype and torch.equal(state[key], value), (name, key)


def test_floating_targets_are_cast_to_the_outputs_dtype(digits):
    x_train, *_ = digits
    x = x_train[:64]
    results = []
    for target in (x[:, :8].float(), x[:, :8].double(), x[:, :8].double().numpy()):
        torch.manual_seed(10)
        model = api.Sequential(nn.Linear(64, 8)).compile("sgd", "mse", lr=0.1)
        results.append(model.fit(x, target, verbose=0, shuffle=False).history["loss"])
    assert results[0] == results[1] == results[2]


def _flatten_pairs(samples):
    """A collate_fn that changes the shape: (4, 4) images become 16 features."""
    return torch.stack([x for x, _ in samples]).flatten(1), torch.stack([y for _, y in samples])


def test_lazy_layers_are_built_from_the_collated_batch(digits):
    """The input shape is what the loader's collate_fn yields, not the dataset's raw samples."""
    torch.manual_seed(6)
    images = torch.rand(32, 4, 4)
    labels = torch.randint(0, 2, (32,))
    loader = DataLoader(TensorDataset(images, labels), batch_size=8, collate_fn=_flatten_pairs)
    model = api.Sequential(LinearWHT(8), nn.Linear(8, 2)).compile("adam")
    model.fit(loader, verbose=0)
    assert model.input_shape == (16,) and model[0].in_features == 16
    with pytest.raises(ValueError, match=r"expected samples of shape \(16,\) \(the shape the model was built for\)"):
        model.predict(images)
    batches = DataLoader(TensorDataset(images, labels), batch_sampler=[[0, 1, 2], [3, 4]], collate_fn=_flatten_pairs)
    custom = api.Sequential(LinearWHT(8), nn.Linear(8, 2)).compile("adam")
    custom.fit(batches, verbose=0)
    assert custom.input_shape == (16,)
    with pytest.raises(ValueError, match="dataset is empty"):
        custom.fit(DataLoader(TensorDataset(images[:0], labels[:0]), batch_size=4), verbose=0)


@pytest.mark.parametrize(
    "batch, message",
    [
        ({"x": torch.zeros(4, 3), "y": torch.zeros(4, dtype=torch.long)}, r"a dict with keys \['x', 'y'\]"),
        ((torch.zeros(4, 3), torch.zeros(4), torch.ones(4)), r"a (tuple|list) of 3 \(Tensor, Tensor, Tensor\)"),
        (([1.0, 2.0], torch.zeros(2)), r"a (tuple|list) of 2 \(list, Tensor\)"),
    ],
    ids=["dict", "triple", "list-inside"],
)
def test_unsupported_batch_structures_name_what_fit_accepts(batch, message):
    loader = DataLoader([batch], batch_size=None)
    for lazy in (True, False):
        model = api.Sequential(nn.LazyLinear(2) if lazy else nn.Linear(3, 2)).compile("sgd")
        with pytest.raises(TypeError, match=message + r".*a tensor x, or a tuple/list \(x, y\) or \(x,\) of tensors"):
            model.fit(loader, verbose=0)
    with pytest.raises(TypeError, match=message):
        api.Sequential(nn.Linear(3, 2)).predict(loader)


@pytest.mark.parametrize("bad_label", [10, -1])
def test_labels_out_of_range(digits, bad_label):
    x_train, y_train, *_ = digits
    labels = y_train.clone()
    labels[70] = bad_label
    model = _small_model("dense").compile("sgd", lr=0.01)
    model.build((64,))
    before = [p.detach().clone() for p in model.parameters()]
    # in-memory labels are checked whole before the first step (a bad one in batch 3 used to fail after two)
    with pytest.raises(ValueError, match=r"y: labels must lie in \[0, 9\].* in y$"):
        model.fit(x_train, labels, batch_size=32, shuffle=False, verbose=0)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


@pytest.mark.parametrize("targets", ["indices", "probabilities"])
def test_cross_entropy_needs_one_row_of_logits_per_sample(targets):
    """A (B, 1, C) output: torch's cross_entropy would take dimension 1 as the classes (an internal error against
    (B,) labels, a silently wrong loss against probabilities shaped like the output); fit refuses it up front."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 1, 5, generator=gen)
    y = torch.randint(0, 3, (16,), generator=gen) if targets == "indices" else torch.rand(16, 1, 3, generator=gen).softmax(-1)
    model = api.Sequential(nn.Linear(5, 3)).compile("sgd")
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"logits \(B, C\).*gives \(1, 3\) per sample"):
        model.fit(x, y, verbose=0)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    # the refused fit did not fix the input shape to its data's (1, 5): the corrected data trains
    assert model.input_shape is None
    model.fit(x[:, 0], y[:, 0] if targets == "probabilities" else y, verbose=0)
    assert model.input_shape == (5,)


def test_wrong_target_kind(digits):
    x_train, y_train, *_ = digits
    with pytest.raises(ValueError, match="int64 class indices"):
        _small_model("dense").compile().fit(x_train, y_train.float(), verbose=0)
    with pytest.raises(ValueError, match=r"mse expects targets shaped like the output \(\d+, 10\), got \(\d+,\) in y"):
        _small_model("dense").compile(loss="mse").fit(x_train, y_train.float(), verbose=0)


def test_nan_loss_names_epoch_and_batch(digits):
    x_train, y_train, *_ = digits
    calls = []

    def loss_nan_on_second_batch(output, target):
        calls.append(None)
        loss = nn.functional.cross_entropy(output, target)
        return loss * float("nan") if len(calls) == 2 else loss

    model = _small_model("dense").compile("sgd", loss=loss_nan_on_second_batch, lr=0.01)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="loss became nan at epoch 1, batch 2"):
        model.fit(x_train, y_train, batch_size=32, shuffle=False, verbose=0)
    after = list(model.parameters())
    assert not any(torch.isnan(p).any() for p in after)
    assert not torch.equal(before[0], after[0])  # batch 1 was applied, batch 2 was not


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"epochs": 0}, ValueError, "epochs must be a positive int"),
        ({"batch_size": 0}, ValueError, "batch_size must be a positive int"),
        ({"validation_split": 1.5}, ValueError, "validation_split must be in"),
        ({"validation_split": 0.2, "validation_data": (None, None)}, ValueError, "not both"),
        ({"seed": 1, "generator": torch.Generator()}, ValueError, "seed or generator"),
        ({"callbacks": [print]}, TypeError, "Callback objects"),
    ],
)
def test_bad_fit_arguments(digits, kwargs, error, message):
    x_train, y_train, *_ = digits
    model = _small_model("dense").compile()
    with pytest.raises(error, match=message):
        model.fit(x_train, y_train, verbose=0, **kwargs)


def test_bad_data_arguments(digits):
    x_train, y_train, *_ = digits
    model = _small_model("dense").compile()
    with pytest.raises(ValueError, match="same number of samples"):
        model.fit(x_train, y_train[:10], verbose=0)
    with pytest.raises(ValueError, match="y is required"):
        model.fit(x_train, verbose=0)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        model.fit([[1.0] * 64], [0], verbose=0)


def test_bad_compile_arguments():
    model = _small_model("dense")
    with pytest.raises(ValueError, match="unknown optimizer 'adamw'"):
        model.compile("adamw")
    with pytest.raises(TypeError, match="optimizer must be"):
        model.compile(3)
    with pytest.raises(TypeError, match="metrics must be a list"):
        model.compile(metrics="accuracy")
    with pytest.raises(ValueError, match="unknown loss"):
        model.compile(loss="hinge")
    with pytest.raises(TypeError, match="layer must be a torch.nn.Module"):
        model.add("relu")


@pytest.mark.parametrize("lazy", [True, False])
def test_a_named_optimizers_name_and_options_are_checked_at_compile(lazy):
    """On a lazy model these used to be reported at fit, and lr=nan was taken (torch's SGD lets NaN through):
    the first step made the weights NaN."""
    model = api.Sequential(LinearWHT(8) if lazy else LinearWHT(4, 8))
    with pytest.raises(ValueError, match="unknown optimizer 'adamw'"):
        model.compile("adamw")
    for options, name in (({"lr": float("nan")}, "lr"), ({"lr": -1.0}, "lr"), ({"momentum": 1.0}, "momentum"),
                          ({"weight_decay": float("inf")}, "weight_decay")):
        with pytest.raises(ValueError, match=f"^{name}: expected a"):
            model.compile("sgd", **options)
    with pytest.raises(ValueError, match="^eps: expected a"):
        model.compile("adam", eps=0.0)
    model.compile("sgd", lr=0.0)  # a frozen model is allowed


# ------------------------------------------------------------------------------ optimizer contract
class _RecordingCurvature(CurvatureOptimizer):
    """Plain SGD that evaluates the closure every step, so the test can see what the closure computes."""

    def __init__(self, params, lr: float = 0.05) -> None:
        super().__init__(params, {"lr": lr})
        self.closure_losses: list[float] = []

    @torch.no_grad()
    def step(self, closure=None):
        closure = self._check_closure(closure, "test")
        with torch.enable_grad():
            loss = closure()
        assert loss.requires_grad  # re-evaluated with a graph, not under no_grad
        self.closure_losses.append(loss.item())
        for group in self.param_groups:
            for p in group["params"]:
                p.add_(p.grad, alpha=-group["lr"])
        return loss


class _RecordingSGD(torch.optim.SGD):
    closures: list = []

    def step(self, closure=None):
        self.closures.append(closure)
        return super().step()


def test_closure_only_for_curvature_optimizers(digits):
    x_train, y_train, *_ = digits
    training_losses: list[float] = []

    def recorded_cross_entropy(output, target):
        loss = F.cross_entropy(output, target)
        training_losses.append(loss.item())
        return loss

    model = _small_model("wht")
    model.compile(lambda m: _RecordingCurvature(m.parameters()), recorded_cross_entropy)
    model.fit(x_train[:200], y_train[:200], batch_size=50, verbose=0, seed=0)
    optimizer = model.optimizer
    # each step's loss, then the closure's re-evaluation on the same batch before the update
    assert training_losses[0::2] == pytest.approx(optimizer.closure_losses, rel=1e-6)
    assert len(optimizer.closure_losses) == 4

    sgd = _RecordingSGD(model.parameters(), lr=0.01)
    model.compile(sgd)
    model.fit(x_train[:200], y_train[:200], batch_size=50, verbose=0)
    assert sgd.closures == [None] * 4


def test_named_curvature_optimizer_trains(digits):
    x_train, y_train, *_ = digits
    torch.manual_seed(0)
    model = api.Sequential(LinearWHT(64, activation="relu"), nn.Linear(64, 10))
    model.compile("diagonal_newton", "cross_entropy", ["accuracy"])
    history = model.fit(x_train, y_train, epochs=2, batch_size=64, seed=0, verbose=0)
    assert isinstance(model.optimizer, CurvatureOptimizer)
    assert history.history["loss"][1] < history.history["loss"][0]


def test_sequential_is_a_plain_module(trained_spectral, digits):
    model, _ = trained_spectral
    *_, x_test, _ = digits
    assert isinstance(model, nn.Sequential)
    manual = x_test
    for layer in model:
        manual = layer(manual)
    assert torch.equal(manual, model.predict(x_test))


# ----------------------------------------------------------------------------------------- progress
def test_progress_bar_only_on_a_terminal(digits, capsys, monkeypatch):
    x_train, y_train, *_ = digits
    model = _small_model("dense").compile("sgd", "cross_entropy", ["accuracy"], lr=0.01)
    model.fit(x_train[:256], y_train[:256], epochs=1, verbose=1)  # pytest's stderr is not a terminal
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    model.fit(x_train[:256], y_train[:256], epochs=1, verbose=0)
    assert capsys.readouterr().err == ""
    model.fit(x_train[:256], y_train[:256], epochs=1, verbose=1)
    shown = capsys.readouterr().err
    assert "epoch 1/1" in shown and "samples/s" in shown and "accuracy" in shown


def test_lazy_model_from_a_shuffling_dataloader_trains_like_a_built_one(digits):
    """Building lazy layers from a DataLoader must not consume its shuffling RNG (or change the result)."""
    x_train, y_train, *_ = digits
    results = []
    for build_first in (True, False):
        torch.manual_seed(3)
        model = api.Sequential(LinearWHT(32, activation="relu"), nn.Linear(32, 10))
        if build_first:
            model.build((64,))
        model.compile("sgd", lr=0.1)
        loader = as_dataloader(x_train, y_train, 100, generator=torch.Generator().manual_seed(5))
        model.fit(loader, epochs=1, verbose=0)
        results.append(model.state_dict())
    for key in results[0]:
        assert torch.equal(results[0][key], results[1][key]), key


def test_a_model_of_index_inputs_builds_trains_summarises_and_round_trips(tmp_path):
    import json

    import dreidel as dr

    torch.manual_seed(0)
    x, y = torch.randint(0, 10, (40, 3)), torch.randint(0, 3, (40,))
    model = dr.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 3)).compile("adam", lr=0.01)
    model.fit(x, y, epochs=2, batch_size=8, verbose=0)
    assert model.input_dtype == torch.int64 and model.predict(x[:2]).shape == (2, 3)
    assert "Embedding" in model.summary()
    model.save(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["input_dtype"] == "int64"
    loaded = api.load(tmp_path / "m")
    assert loaded.input_dtype == torch.int64 and torch.equal(loaded.predict(x), model.predict(x))
    with pytest.raises(TypeError, match="the model takes indices"):
        loaded.predict(x.float())


def test_a_bad_input_dtype_in_a_config_is_refused(tmp_path):
    import json

    import dreidel as dr

    model = dr.Sequential(nn.Linear(4, 3))
    model.build((4,))
    model.save(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["input_dtype"] = "float128"
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="'input_dtype' must be null or one of"):
        dr.load(tmp_path / "m")


@pytest.mark.parametrize("norm", [nn.BatchNorm1d(4, bias=False), nn.BatchNorm1d(4, affine=False),
                                  nn.BatchNorm1d(4, track_running_stats=False), nn.LayerNorm(4, bias=False),
                                  nn.LayerNorm(4, elementwise_affine=False)], ids=repr)
def test_norm_layers_without_bias_or_affine_round_trip(tmp_path, norm):
    model = api.Sequential(nn.Linear(3, 4), norm).build((3,))
    loaded = api.load(model.save(tmp_path / "m"))
    assert loaded.state_dict().keys() == model.state_dict().keys()


# Constructor arguments a layer spec need not record: where it is built, and in-place execution (same values).
_UNRECORDED_ARGS = {"device", "dtype", "inplace", "_weight", "_freeze", "args", "kwargs"}


@pytest.mark.parametrize("name", [name for name, (cls, _) in api.LAYER_TYPES.items() if cls.__module__.startswith("torch")])
def test_torch_layer_specs_record_every_constructor_argument(name):
    """A recorder that leaves an argument out loses it on save (BatchNorm1d's bias, torch 2.13)."""
    import inspect

    cls, args_of = api.LAYER_TYPES[name]
    parameters = set(inspect.signature(cls).parameters) - _UNRECORDED_ARGS
    required = {"in_features": 3, "out_features": 2, "num_features": 3, "normalized_shape": 3,
                "num_embeddings": 5, "embedding_dim": 2, "dim": 1}
    instance = cls(**{key: value for key, value in required.items() if key in parameters})
    recorded = set(args_of(instance))
    if cls is nn.BatchNorm1d:  # bias is recorded where it is False (a default layer loads with torches without it)
        recorded |= set(args_of(nn.BatchNorm1d(3, bias=False)))
    assert parameters <= recorded, f"{name} does not record {sorted(parameters - recorded)}"


def _loss_named_metric(output, target):
    return 0.0


_loss_named_metric.__name__ = "loss"


@pytest.mark.parametrize("metrics, message", [
    ([_loss_named_metric], "logged as 'loss' would collide"),
    ([lambda o, t: 0.1, lambda o, t: 0.9], "two metrics are logged as '<lambda>'"),
    (["accuracy", "top_1"], "two metrics are logged as 'accuracy'"),
], ids=["loss", "two-lambdas", "accuracy-top_1"])
def test_metrics_whose_log_keys_collide_are_refused_at_compile(metrics, message):
    """They used to overwrite one another (or the training loss) in the logs and History, silently."""
    with pytest.raises(ValueError, match=message):
        api.Sequential(nn.Linear(4, 3)).compile("adam", metrics=metrics)


def _tied_weights() -> api.Sequential:
    first, last = nn.Linear(4, 4), nn.Linear(4, 4)
    last.weight = first.weight
    return api.Sequential(first, nn.ReLU(), last)


@pytest.mark.parametrize("make", [
    lambda: api.Sequential(*(lambda shared: (shared, nn.ReLU(), shared))(nn.Linear(4, 4))),
    _tied_weights,
], ids=["shared-linear", "tied-weight"])
def test_layers_that_share_tensors_are_refused_at_save(tmp_path, make):
    """Such a checkpoint used to be written with a spec per distinct child and tensors per position: unloadable."""
    model = make().build((4,))
    with pytest.raises(ValueError, match="layers '0' and '2' share a parameter or buffer"):
        model.save(tmp_path / "m")
    assert not (tmp_path / "m").exists()


def _pruned(model: api.Sequential) -> None:
    torch.nn.utils.prune.l1_unstructured(model[1], "weight", amount=0.5)


def _weight_normed(model: api.Sequential) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the hook-based weight_norm is deprecated, still used
        torch.nn.utils.weight_norm(model[1])


def _extra_buffer(model: api.Sequential) -> None:
    model[0].register_buffer("calibration", torch.zeros(3))


def _resized_weight(model: api.Sequential) -> None:
    model[1].weight = nn.Parameter(torch.zeros(3, 5))


@pytest.mark.parametrize("change, message", [
    (_pruned, r"layer '1' \(Linear\): its state_dict has \['weight_mask', 'weight_orig'\] and lacks \['weight'\]"),
    (_weight_normed, r"layer '1' \(Linear\): its state_dict has \['weight_g', 'weight_v'\] and lacks \['weight'\]"),
    (_extra_buffer, r"layer '0' \(LinearWHT\): its state_dict has \['calibration'\],"),
    (_resized_weight, r"layer '1' \(Linear\): its tensor 'weight' has shape \(3, 5\), but load\(\) rebuilds it "
                      r"with \(3, 8\)"),
], ids=["pruned", "weight-norm-hook", "extra-buffer", "resized"])
def test_a_layer_whose_tensors_differ_from_its_spec_is_refused_at_save(tmp_path, change, message):
    """Such a checkpoint used to be written and then refused by load() ("lacks tensor '1.weight'"), perhaps
    days later; ModelCheckpoint wrote one every epoch. save() now refuses it, without touching torch's random
    state (it rebuilds each layer on the meta device to compare), and the permanent form saves and loads."""
    torch.manual_seed(0)
    model = api.Sequential(LinearWHT(8, 8), nn.Linear(8, 3)).build((8,))
    change(model)
    state = torch.random.get_rng_state()
    with pytest.raises(ValueError, match=message):
        model.save(tmp_path / "m")
    assert torch.equal(torch.random.get_rng_state(), state)
    assert not (tmp_path / "m").exists()


class _DrawsOnTheCpu(nn.Module):
    """Registered by the tests below: its constructor draws from torch's CPU generator on any default device."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.order = nn.Buffer(torch.randperm(width, device="cpu"))
        self.scale = nn.Parameter(torch.ones(width))

    def forward(self, x):
        return x[:, self.order] * self.scale


def test_save_keeps_torchs_random_state_while_it_rebuilds_layers(tmp_path, monkeypatch):
    from dreidel.api import layer_specs

    monkeypatch.setitem(layer_specs.LAYER_TYPES, "_DrawsOnTheCpu",
                        (_DrawsOnTheCpu, lambda m: {"width": m.scale.numel()}))
    model = api.Sequential(_DrawsOnTheCpu(6), nn.Linear(6, 2)).build((6,))
    state = torch.random.get_rng_state()
    model.save(tmp_path / "m")
    assert torch.equal(torch.random.get_rng_state(), state)
    x = torch.randn(3, 6)
    torch.testing.assert_close(api.load(tmp_path / "m")(x), model(x), rtol=0, atol=0)


def test_a_registered_layer_whose_arguments_are_tuples_saves_and_loads(tmp_path, monkeypatch):
    """save's check of a layer against its spec took the spec before JSON had turned its tuples into lists, and
    refused kernel_size=(3, 3) (a review); load has always read lists."""
    from dreidel.api import layer_specs

    monkeypatch.setitem(layer_specs.LAYER_TYPES, "Conv2d", (nn.Conv2d, lambda m: {
        "in_channels": m.in_channels, "out_channels": m.out_channels, "kernel_size": m.kernel_size,
        "padding": m.padding, "bias": m.bias is not None}))
    model = api.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten()).build((3, 8, 8))
    model.save(tmp_path / "m")
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(api.load(tmp_path / "m")(x), model(x), rtol=0, atol=0)


def test_a_registered_layer_whose_spec_leaves_a_size_to_data_is_refused_at_save(tmp_path, monkeypatch):
    from dreidel.api import layer_specs

    # LinearWHT(None, 4) learns in_features from the first batch; an args_of that leaves it out rebuilds it lazy
    monkeypatch.setitem(layer_specs.LAYER_TYPES, "LinearWHT",
                        (LinearWHT, lambda m: {"in_features": None, "out_features": m.out_features}))
    model = api.Sequential(LinearWHT(None, 4)).build((6,))
    with pytest.raises(ValueError, match="layer '0' .* leave a size to be learnt from data .* args_of must give"):
        model.save(tmp_path / "m")


class _NeedsItsSize(nn.Module):
    def __init__(self, size: int, scale: float = 1.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((size,), scale))

    def forward(self, x):
        return x * self.weight


class _ReadsAValue(nn.Module):
    """Its constructor needs a real value (``.item()`` has no meta kernel): load and save's check build it for
    real."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(int(torch.tensor(size).item())))

    def forward(self, x):
        return x * self.weight


def test_a_spec_whose_arguments_its_constructor_refuses_is_refused_at_save(tmp_path, monkeypatch):
    """An args_of that leaves out a required argument saved a checkpoint that load refused (a review)."""
    from dreidel.api import layer_specs

    monkeypatch.setitem(layer_specs.LAYER_TYPES, "_NeedsItsSize", (_NeedsItsSize, lambda m: {"scale": 1.0}))
    model = api.Sequential(_NeedsItsSize(4)).build((4,))
    with pytest.raises(ValueError, match="cannot save layer '0': load\\(\\) could not build _NeedsItsSize from .*size"):
        model.save(tmp_path / "m")
    assert not (tmp_path / "m").exists()
    monkeypatch.setitem(layer_specs.LAYER_TYPES, "_ReadsAValue", (_ReadsAValue, lambda m: {"size": m.weight.numel()}))
    fine = api.Sequential(_ReadsAValue(4)).build((4,))
    fine.save(tmp_path / "n")
    x = torch.randn(2, 4)
    torch.testing.assert_close(api.load(tmp_path / "n")(x), fine(x))


def test_torch_compile_keywords_pass_to_an_optimizer_factory():
    """Only a named optimizer's keywords are known: a factory may take its own `mode` (a review)."""
    def factory(model, mode="adam"):
        return torch.optim.SGD(model.parameters(), lr=0.1) if mode == "sgd" else torch.optim.Adam(model.parameters())

    model = api.Sequential(nn.Linear(4, 2)).build((4,)).compile(factory, mode="sgd")
    assert isinstance(model.optimizer, torch.optim.SGD)


def test_a_parametrized_layer_is_refused_at_save_with_the_way_out(tmp_path):
    model = api.Sequential(nn.Linear(4, 3)).build((4,))
    torch.nn.utils.parametrizations.weight_norm(model[0])
    with pytest.raises(ValueError, match="ParametrizedLinear: a parametrized layer .*remove_parametrizations"):
        model.save(tmp_path / "m")


def test_a_pruned_layer_saves_once_the_pruning_is_made_permanent(tmp_path):
    model = api.Sequential(LinearWHT(8, 8), nn.Linear(8, 3)).build((8,))
    torch.nn.utils.prune.l1_unstructured(model[1], "weight", amount=0.5)
    torch.nn.utils.prune.remove(model[1], "weight")
    state = torch.random.get_rng_state()
    model.save(tmp_path / "m")
    assert torch.equal(torch.random.get_rng_state(), state)
    x = torch.randn(4, 8)
    torch.testing.assert_close(api.load(tmp_path / "m")(x), model(x), rtol=0, atol=0)
    assert (api.load(tmp_path / "m")[1].weight == 0).sum() == 12


def test_a_layer_without_tensors_used_twice_saves_and_loads(tmp_path):
    """One nn.ReLU() at two positions: its spec is saved at both (it used to be saved once, so the loaded
    model lost a layer), and the model loads as the same function."""
    relu = nn.ReLU()
    model = api.Sequential(nn.Linear(4, 4), relu, nn.Linear(4, 4), relu).build((4,))
    model.save(tmp_path / "m")
    loaded = api.load(tmp_path / "m")
    assert [type(layer) for layer in loaded] == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU]
    x = torch.randn(5, 4)
    torch.testing.assert_close(loaded(x), model(x))


class _RecordsHooks(api.Callback):
    def __init__(self) -> None:
        self.calls: list[str] = []

    def on_train_begin(self, model) -> None:
        self.calls.append("train_begin")


@pytest.mark.parametrize("x, y, validation, message", [
    (torch.randn(8, 4), torch.randint(0, 3, (8,)), (torch.randn(4, 4), torch.tensor([0, 1, 9, 2])),
     r"labels must lie in \[0, 2\] .* in validation_data"),
    (torch.randn(8, 4), torch.randint(0, 3, (8,)), (torch.randn(4, 4), torch.rand(4)), "in validation_data"),
    (torch.randn(8, 4), torch.randint(0, 3, (8,)), (torch.randn(4, 5), torch.zeros(4, dtype=torch.long)),
     r"expected samples of shape \(4,\) .* in validation_data"),
    (torch.randn(0, 4), torch.zeros(0, dtype=torch.long), None, "x has no samples"),
    (torch.randn(8, 4), torch.randint(0, 3, (8,)), (torch.randn(0, 4), torch.zeros(0, dtype=torch.long)),
     "validation_data has no samples"),
    (torch.randn(8, 4), torch.randint(0, 3, (8,)), DataLoader(TensorDataset(torch.randn(0, 4), torch.zeros(0))),
     "validation_data: the DataLoader's dataset is empty"),
    (DataLoader(TensorDataset(torch.randn(10, 4), torch.zeros(10, dtype=torch.long)), batch_size=32, drop_last=True),
     None, None, "x: the DataLoader gives no batches: its 10 samples are fewer than batch_size=32 and it has drop_last"),
], ids=["label-range", "float-labels", "sample-shape", "empty-x", "empty-validation", "empty-validation-loader",
        "all-dropped"])
def test_fit_checks_the_data_before_training_starts(x, y, validation, message):
    """Bad validation labels used to fail after a whole epoch had changed the weights; an empty x after the
    callbacks had started; empty validation data with a bare StopIteration (in memory) or after an epoch (a
    DataLoader); a DataLoader whose every sample drop_last drops as 'the data is empty'."""
    model = api.Sequential(nn.Linear(4, 3)).compile("sgd", lr=0.5)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    hooks = _RecordsHooks()
    with pytest.raises(ValueError, match=message):
        model.fit(x, y, validation_data=validation, callbacks=[hooks], verbose=0)
    assert hooks.calls == [] and model.history is None
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())


def test_fit_takes_numpy_integer_epochs_and_batch_size():
    model = api.Sequential(nn.Linear(4, 3)).compile("sgd", lr=0.1)
    history = model.fit(torch.randn(8, 4), torch.randint(0, 3, (8,)), epochs=np.int64(2), batch_size=np.int32(4),
                        verbose=0)
    assert len(history.history["loss"]) == 2
    with pytest.raises(ValueError, match="epochs must be a positive int, got True"):
        model.fit(torch.randn(8, 4), torch.randint(0, 3, (8,)), epochs=True, verbose=0)


def test_add_never_replaces_a_layer_whose_name_it_would_take():
    """nn.Sequential.append names the new layer str(len(self)); in a model built from named layers that name
    may be taken ("2" of two layers), and the layer holding it was silently replaced."""
    first = nn.Linear(4, 8)
    model = api.Sequential(OrderedDict([("2", first), ("act", nn.ReLU())]))
    model.add(nn.Linear(8, 3))
    assert len(model) == 3 and model[0] is first
    assert model(torch.randn(5, 4)).shape == (5, 3)


def test_fit_refuses_a_seed_it_could_not_apply_to_a_dataloader(digits):
    """A DataLoader shuffles with its own sampler: a seed or generator given to fit used to be ignored."""
    x, y, *_ = digits
    model = api.Sequential(nn.Linear(64, 10)).compile("sgd", "cross_entropy")
    loader = as_dataloader(x[:64], y[:64], 16, shuffle=True)
    with pytest.raises(ValueError, match="seed: a DataLoader x is shuffled by its own sampler"):
        model.fit(loader, seed=3, verbose=0)
    with pytest.raises(ValueError, match="generator: a DataLoader"):
        model.fit(loader, generator=torch.Generator(), verbose=0)


def test_batches_go_to_the_models_device():
    """Data on the CPU for a model elsewhere (meta here: the dry-run device of the tests) is moved to the model's
    device; it used to fail inside torch ('Tensor on device meta is not on the expected device cpu')."""
    model = api.Sequential(nn.Linear(16, 2)).to("meta")
    out = model.predict(torch.zeros(3, 16))
    assert out.shape == (3, 2) and out.device.type == "meta"


@pytest.mark.parametrize("built", [False, True])
def test_integer_features_for_a_floating_model_get_a_clear_error(built):
    model = api.Sequential(nn.Linear(4, 2))
    if built:
        model.build((4,))
    with pytest.raises(TypeError, match="x: .*uint8.*x.float"):
        model.predict(torch.randint(0, 255, (5, 4), dtype=torch.uint8))
    with pytest.raises(TypeError, match="x: expected floating-point features or integer indices .* got torch.bool"):
        model.predict(torch.zeros(5, 4, dtype=torch.bool))


def test_a_dataloaders_labels_are_checked_batch_by_batch(digits):
    """A DataLoader is not read ahead: its bad label is named with its epoch and batch when that batch comes."""
    x_train, y_train, *_ = digits
    labels = y_train.clone()
    labels[70] = 10
    model = _small_model("dense").compile("sgd", lr=0.01)
    with pytest.raises(ValueError, match=r"y: labels must lie in \[0, 9\].*epoch 1, batch 3"):
        model.fit(as_dataloader(x_train, labels, 32, shuffle=False), verbose=0)


def test_a_metric_that_cannot_apply_fails_before_the_first_step(digits):
    """top_5 of a 3-class model failed after the first optimizer step had changed the weights."""
    x_train, y_train, *_ = digits
    keep = y_train < 3
    model = api.Sequential(nn.Linear(64, 3)).compile("sgd", "cross_entropy", ["top_5"], lr=0.1)
    model.build((64,))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="k=5 exceeds the number of classes 3"):
        model.fit(x_train[keep], y_train[keep], verbose=0)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_a_refused_fit_leaves_a_lazy_model_unbuilt():
    """The labels were wrong, and so may be the data: the next fit's data sets the widths. The lazy layers used
    to keep the refused data's width (10), so data of 12 features was then refused as not fitting the layers."""
    model = api.Sequential(LinearWHT(16), nn.ReLU(), nn.LazyLinear(3)).compile("sgd")
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\]"):
        model.fit(torch.randn(20, 10, generator=gen), torch.full((20,), 7), verbose=0)
    assert not model.is_built and model.input_shape is None
    model.fit(torch.randn(20, 12, generator=gen), torch.randint(0, 3, (20,), generator=gen), verbose=0)
    assert model.input_shape == (12,) and model[0].in_features == 12


def test_a_failed_build_materialises_no_lazy_layer():
    model = api.Sequential(nn.LazyLinear(4), nn.Linear(5, 3))  # the first layer fits any width, the second never
    with pytest.raises(ValueError, match=r"samples of shape \(10,\) do not fit the model's layers"):
        model.build((10,))
    assert not model.is_built and isinstance(model[0], nn.LazyLinear)


def test_a_lazy_model_starts_alike_built_first_or_by_fit():
    """Checks run on a copy of a lazy model, whose layers draw initial weights too: torch's random state is
    restored after them, so build() then fit() and fit() alone start from the same weights."""

    def weights(build_first: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = api.Sequential(nn.LazyLinear(4), nn.ReLU(), LinearWHT(3)).compile("sgd", lr=0.0)
        if build_first:
            model.build((5,))
        model.fit(torch.ones(8, 5), torch.zeros(8, dtype=torch.long), verbose=0, seed=0)
        return [p.detach().clone() for p in model.parameters()]

    assert all(torch.equal(a, b) for a, b in zip(weights(True), weights(False), strict=True))


@pytest.mark.parametrize("refused", [
    dict(metrics=["acuracy"]), dict(loss="no_such_loss"), dict(optimizer=lambda model: "not an optimizer")],
    ids=["metric", "loss", "factory"])
def test_a_refused_compile_keeps_the_previous_optimizer_working(refused):
    """The K-FAC optimizer's recording hooks used to be removed before the new choice was checked, so after a
    refused compile fit stepped on as plain SGD (and warned that zero_grad() had dropped the records)."""
    torch.manual_seed(0)
    model = api.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).build((4,))
    model.compile("kfac", "cross_entropy", ["accuracy"], factor_every=1, inverse_every=1)
    kfac = model.optimizer
    with pytest.raises((ValueError, TypeError)):
        model.compile(**{"optimizer": "kfac", "loss": "cross_entropy", "metrics": ["accuracy"], **refused})
    assert model.optimizer is kfac
    gen = torch.Generator().manual_seed(1)
    model.fit(torch.randn(32, 4, generator=gen), torch.randint(0, 3, (32,), generator=gen), batch_size=16, verbose=0)
    assert {"A", "G", "inv_A", "inv_G"} <= set(kfac.state[model[0].weight])


def test_a_fit_refused_by_a_callback_keeps_the_last_history(tmp_path):
    model = api.Sequential(nn.Linear(4, 3)).compile("sgd", lr=0.1)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 4, generator=gen), torch.randint(0, 3, (8,), generator=gen)
    history = model.fit(x, y, epochs=2, verbose=0)
    with pytest.raises(ValueError, match="is a directory"):
        model.fit(x, y, callbacks=[api.callbacks.CSVLogger(tmp_path)], verbose=0)
    assert model.history is history and len(history.history["loss"]) == 2


def test_summary_builds_a_model_of_indices_with_their_dtype():
    """summary(input_shape=...) used to dry-run float zeros through the Embedding, even on a model built for
    indices, and had no dtype to give instead."""
    built = api.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 2))
    built.predict(torch.randint(0, 10, (5, 3)))
    assert "input shape: (3,)" in built.summary(input_shape=(3,))
    assert built.input_dtype == torch.int64
    fresh = api.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 2))
    with pytest.raises(ValueError, match=r"the first layer is an nn.Embedding.*build\(input_shape, torch.int64\)"):
        fresh.summary(input_shape=(3,))
    assert "parameters: 66" in fresh.summary(input_shape=(3,), dtype=torch.int64)


def test_adding_a_layer_after_compiling_an_optimizer_instance_warns():
    """A named optimizer is rebuilt over the new parameters; an instance cannot be, and the new layer used to
    stay untrained without a word."""
    model = api.Sequential(nn.Linear(4, 3))
    model.compile(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.warns(UserWarning, match=r"does not update the new layer's parameters \(Linear\)"):
        model.add(nn.Linear(3, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.add(nn.ReLU())  # nothing to train: no warning
    named = api.Sequential(nn.Linear(4, 3)).compile("sgd")
    named.add(nn.Linear(3, 3))
    gen = torch.Generator().manual_seed(0)
    named.fit(torch.randn(8, 4, generator=gen), torch.randint(0, 3, (8,), generator=gen), verbose=0)
    assert sum(len(group["params"]) for group in named.optimizer.param_groups) == 4


def test_frozen_parameters_stay_frozen_through_save_and_load(tmp_path):
    """requires_grad=False used to be lost: a fine-tuning model with a frozen body trained every layer once
    reloaded."""
    model = api.Sequential(nn.Linear(4, 6), nn.ReLU(), LinearWHT(6, 3)).build((4,))
    model[0].weight.requires_grad_(False)
    model[2].in_scale.requires_grad_(False)
    loaded = api.load(model.save(tmp_path / "ckpt"))
    assert [p.requires_grad for p in loaded.parameters()] == [p.requires_grad for p in model.parameters()]
    unfrozen = api.load(api.Sequential(nn.Linear(4, 2)).build((4,)).save(tmp_path / "b"))
    assert [p.requires_grad for p in unfrozen.parameters()] == [True, True]


@pytest.mark.parametrize("frozen, message", [
    (["0.nope"], r"'frozen' names '0.nope', which is not a parameter of the model"),
    ("0.weight", r"'frozen' must be a list of distinct parameter names"),
    (["0.weight", "0.weight"], r"'frozen' must be a list of distinct parameter names")])
def test_a_bad_frozen_list_is_refused_at_load(tmp_path, frozen, message):
    path = api.Sequential(nn.Linear(4, 2)).build((4,)).save(tmp_path / "ckpt")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "frozen": frozen}))
    with pytest.raises(ValueError, match=message):
        api.load(path)


@pytest.mark.parametrize("layer, args, message", [
    (nn.Embedding(10, 4), {"_weight": "abc"}, r"cannot build Embedding: unknown argument '_weight'"),
    (nn.Embedding(10, 4), {"_freeze": True}, r"cannot build Embedding: unknown argument '_freeze'"),
    (nn.Embedding(10, 4), {"max_norm": "abc"}, r"Embedding argument 'max_norm' must be float or null, got 'abc'"),
    (nn.Flatten(), {"start_dim": [1, 2]}, r"Flatten argument 'start_dim' must be int, got \[1, 2\]"),
    (nn.Softmax(dim=-1), {"dim": {"a": 1}}, r"Softmax argument 'dim' must be int or null, got \{'a': 1\}"),
    (Conv2dSpectral(3, 4), {"kernel_size": [3, 3, 3]},
     r"Conv2dSpectral argument 'kernel_size' must be int or a list of 2 int, got \[3, 3, 3\]"),
], ids=["private-weight", "private-freeze", "max-norm", "flatten-list", "softmax-dict", "kernel-rank"])
def test_arguments_are_checked_against_the_constructors_annotations(tmp_path, layer, args, message):
    """Arguments whose default is None went unchecked, and an int accepted any list: such a model loaded and
    failed at its first forward; Embedding's private _weight failed with an AttributeError, and _freeze froze it."""
    path = api.Sequential(layer).save(tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    config["layers"][0]["args"].update(args)
    config["input_shape"] = None
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        api.load(path)


def test_a_list_of_layers_is_named_with_the_torch_form():
    """Keras's Sequential([...]) failed with torch's "list is not a Module subclass"."""
    with pytest.raises(TypeError, match=r"Sequential\(\*layers\), not Sequential\(\[\.\.\.\]\)"):
        api.Sequential([nn.Linear(2, 2), nn.ReLU()])


def test_an_infinity_norm_embedding_saves_and_loads(tmp_path):
    """norm_type=inf is a setting JSON (as Python writes it) holds: save wrote it and load read it, until a
    refusal of every non-finite constant broke both for a while."""
    import math

    model = api.Sequential(nn.Embedding(10, 4, max_norm=1.0, norm_type=math.inf)).build((3,), torch.int64)
    loaded = api.load(model.save(tmp_path / "m"))
    assert loaded[0].norm_type == math.inf
    tokens = torch.tensor([[1, 2, 3]])
    assert torch.equal(loaded(tokens), model(tokens))
