"""Our Whisper against transformers' WhisperForConditionalGeneration holding the same weights."""

from __future__ import annotations

import pytest
import torch
from _whisper_helpers import hf_model_from_ours, mel_of, speech_clips


@pytest.fixture(scope="module")
def random_pair(random_whisper):
    return random_whisper, hf_model_from_ours(random_whisper)


@torch.inference_mode()
def test_random_model_encoder_and_logits_match_transformers(random_pair):
    ours, hf = random_pair
    generator = torch.Generator().manual_seed(1)
    mel = torch.randn(2, 80, 3000, generator=generator)
    tokens = torch.randint(0, 50256, (2, 9), generator=generator)
    features = ours.embed_audio(mel)
    hf_features = hf.model.encoder(mel).last_hidden_state
    torch.testing.assert_close(features, hf_features, rtol=1e-4, atol=1e-4)
    logits = ours.logits(tokens, features)
    hf_logits = hf(encoder_outputs=(hf_features,), decoder_input_ids=tokens).logits
    torch.testing.assert_close(logits, hf_logits, rtol=1e-4, atol=1e-4)


@torch.inference_mode()
def test_cached_steps_equal_full_sequence(random_whisper):
    """Feeding tokens one at a time through the static cache gives the teacher-forced logits."""
    generator = torch.Generator().manual_seed(2)
    features = torch.randn(3, 1500, random_whisper.dims.n_audio_state, generator=generator)
    tokens = torch.randint(0, 50256, (3, 7), generator=generator)
    full = random_whisper.logits(tokens, features)
    decoder = random_whisper.decoder
    cache = decoder.new_cache(features)
    steps = [decoder(tokens[:, :3], 0, cache)] + [decoder(tokens[:, i:i + 1], i, cache) for i in range(3, 7)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


@torch.inference_mode()
def test_tiny_en_encoder_and_first_step_logits_match_transformers(tiny_en, tiny_en_hf):
    (_, audio), = speech_clips(1, seed=3)
    mel = mel_of(audio)[None]
    prompt = torch.tensor([tiny_en.tokenizer.prompt()])
    features = tiny_en.model.embed_audio(mel)
    hf_features = tiny_en_hf.model.encoder(mel).last_hidden_state
    torch.testing.assert_close(features, hf_features, rtol=1e-4, atol=2e-4)
    logits = tiny_en.model.logits(prompt, features)[:, -1]
    hf_logits = tiny_en_hf(encoder_outputs=(hf_features,), decoder_input_ids=prompt).logits[:, -1]
    torch.testing.assert_close(logits, hf_logits, rtol=1e-4, atol=2e-4)


def test_dimensions_are_validated():
    from dreidel.models.whisper import Whisper, WhisperDimensions

    with pytest.raises(ValueError, match="n_audio_head"):
        WhisperDimensions(n_audio_head=0)
    with pytest.raises(ValueError, match="divisible"):
        WhisperDimensions(n_audio_state=10, n_audio_head=3)
    with pytest.raises(TypeError, match="dims"):
        Whisper({"n_mels": 80})
    with pytest.raises(ValueError, match="linear"):
        Whisper(WhisperDimensions(), linear="no-such-kind")


@pytest.mark.slow
@torch.inference_mode()
def test_multilingual_base_matches_transformers():
    from dreidel.models.whisper import load

    base = load("base")
    assert base.model.dims.is_multilingual and len(base.tokenizer.prompt()) == 4
    hf = hf_model_from_ours(base.model)
    (_, audio), = speech_clips(1, seed=3)
    mel = mel_of(audio)[None]
    assert base.tokenizer.prompt("DE") == base.tokenizer.prompt("de") != base.tokenizer.prompt("en")
    prompt = torch.tensor([base.tokenizer.prompt("en")])
    features = base.model.embed_audio(mel)
    torch.testing.assert_close(features, hf.model.encoder(mel).last_hidden_state, rtol=1e-4, atol=2e-4)
    logits = base.model.logits(prompt, features)
    hf_logits = hf(encoder_outputs=(features,), decoder_input_ids=prompt).logits
    torch.testing.assert_close(logits, hf_logits, rtol=1e-4, atol=2e-4)


@pytest.mark.parametrize("linear", ["wht", "deep_wht"])
@torch.inference_mode()
def test_spectral_whisper_is_the_same_classes_with_another_linear_kind(linear):
    """A spectral Whisper decodes through the per-window key/value path (no dense weights to fold)."""
    from _whisper_helpers import TINY_DIMS

    from dreidel.models.whisper import DecodingOptions, Whisper, decode

    model = Whisper(TINY_DIMS, linear=linear).eval()
    assert not model.decoder.dense_cross_attention()
    options = DecodingOptions(prompt=(50257, 50362), eot=50256, max_new_tokens=3, beam_size=2)
    tokens = decode(model, torch.randn(1, 80, 3000, generator=torch.Generator().manual_seed(5)), options)
    assert len(tokens) == 1 and len(tokens[0]) <= 3


def test_load_refuses_non_dense_kinds_before_reading_weights(tmp_path):
    from dreidel.models.whisper import load

    with pytest.raises(ValueError, match=r"linear='wht'.*Whisper\(recognizer\.model\.dims, linear='wht'\)"):
        load(tmp_path / "does-not-exist", linear="wht")


@pytest.mark.parametrize("misuse, message", [
    ("batch-mismatch", "batch 1 but the cache holds 2 rows"),
    ("past-context", "do not fit"),
    ("straddles-context", "do not fit"),
    ("negative-offset", "do not fit"),
    ("one-dimensional", "tokens must be"),
    ("float-tokens", "tokens must be"),
])
@torch.inference_mode()
def test_decoder_cache_misuse_is_a_value_error(random_whisper, misuse, message):
    """A batch that does not match the cache used to broadcast silently into wrong-shaped logits."""
    decoder = random_whisper.decoder
    n_ctx = random_whisper.dims.n_text_ctx
    features = torch.zeros(2, 1500, random_whisper.dims.n_audio_state)
    cache = decoder.new_cache(features)
    tokens, offset = {
        "batch-mismatch": (torch.zeros(1, 1, dtype=torch.long), 0),
        "past-context": (torch.zeros(2, 1, dtype=torch.long), n_ctx),
        "straddles-context": (torch.zeros(2, 2, dtype=torch.long), n_ctx - 1),
        "negative-offset": (torch.zeros(2, 1, dtype=torch.long), -1),
        "one-dimensional": (torch.zeros(2, dtype=torch.long), 0),
        "float-tokens": (torch.zeros(2, 1), 0),
    }[misuse]
    with pytest.raises(ValueError, match=message):
        decoder(tokens, offset, cache)
    assert decoder(torch.zeros(2, 1, dtype=torch.long), n_ctx - 1, cache).shape == (2, 1, random_whisper.dims.n_vocab)


@pytest.mark.parametrize("shape", [(80, 3000), (1, 128, 3000), (1, 1, 80, 3000)])
def test_encoder_rejects_mel_of_the_wrong_shape(random_whisper, shape):
    with pytest.raises(ValueError, match=r"mel must be \(batch, 80, frames\)"):
        random_whisper.embed_audio(torch.zeros(shape))


@pytest.mark.parametrize("tokens, error, message", [
    (torch.tensor([[10**6]]), ValueError, r"tokens must be ids in \[0, 51864\) \(the vocabulary size is 51864\), "
                                          r"got 1000000"),  # was IndexError: index out of range in self
    (torch.tensor([[50257, -1]]), ValueError, r"tokens must be ids in \[0, 51864\) .*got -1"),
    ([[50257]], TypeError, "tokens must be a .* torch.Tensor, got list"),
])
@torch.inference_mode()
def test_tokens_outside_the_vocabulary_are_named(random_whisper, tokens, error, message):
    with pytest.raises(error, match=message):
        random_whisper.logits(tokens, torch.zeros(1, 1500, random_whisper.dims.n_audio_state))


@pytest.mark.parametrize("features, error, message", [
    (torch.zeros(1, 1500, 32), ValueError, r"audio_features must be \(windows, frames, 64\) \(the encoder's output\), "
                                           r"got shape \(1, 1500, 32\)"),  # was a raw reshape error
    (torch.zeros(1500, 64), ValueError, r"got shape \(1500, 64\)"),
    (torch.zeros(1, 1500, 64, dtype=torch.float64), TypeError, "audio_features must have the decoder's dtype "
                                                               "torch.float32, got torch.float64"),
])
@torch.inference_mode()
def test_audio_features_of_another_width_or_dtype_are_refused(random_whisper, features, error, message):
    with pytest.raises(error, match=message):
        random_whisper.logits(torch.tensor([[50257]]), features)


def test_a_mel_of_another_dtype_is_a_type_error_naming_it(random_whisper):
    """A float64 mel failed inside the convolution; decode casts it, the module itself does not."""
    with pytest.raises(TypeError, match=r"mel must have the model's dtype torch.float32, got torch.float64"):
        random_whisper.embed_audio(torch.zeros(1, 80, 3000, dtype=torch.float64))
    with pytest.raises(TypeError, match="mel must be a torch.Tensor, got list"):
        random_whisper.embed_audio([[0.0] * 3000] * 80)


def test_the_tokenizer_refuses_negative_and_non_integer_ids():
    from dreidel.io import shipped_whisper_files
    from dreidel.models.whisper import WhisperTokenizer

    tokenizer = WhisperTokenizer(shipped_whisper_files("tiny.en").directory / "tokenizer.json", multilingual=False)
    ids = tokenizer.encode(" hello world")
    assert tokenizer.decode(ids) == tokenizer.decode(torch.tensor(ids + [tokenizer.eot])) == " hello world"
    with pytest.raises(ValueError, match="tokens must be token ids >= 0, got -5"):
        tokenizer.decode([-5])  # was OverflowError
    with pytest.raises(TypeError, match=r"tokens must be a sequence of integer token ids, got \[1.5\]"):
        tokenizer.decode([1.5])
