"""Helpers shared by the Whisper tests (a uniquely named module: several test folders have a conftest)."""

from __future__ import annotations

import torch

from dreidel.models.whisper import Whisper, WhisperDimensions, dims_to_hf_config, hf_rules, ours_to_checkpoint

TINY_DIMS = WhisperDimensions(n_mels=80, n_audio_ctx=1500, n_audio_state=64, n_audio_head=4, n_audio_layer=2,
                              n_vocab=51864, n_text_ctx=64, n_text_state=64, n_text_head=4, n_text_layer=2)


def hf_model_from_ours(model: Whisper):
    """transformers' WhisperForConditionalGeneration holding ``model``'s weights (via our HF mapping)."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    config = WhisperConfig(**dims_to_hf_config(model.dims), decoder_start_token_id=50257, eos_token_id=50256,
                           pad_token_id=50256, bos_token_id=50256)
    hf = WhisperForConditionalGeneration(config).eval()
    state = ours_to_checkpoint(hf_rules(model.dims), {k: v.float() for k, v in model.state_dict().items()})
    result = hf.load_state_dict(state, strict=False)
    assert list(result.missing_keys) == ["proj_out.weight"] and not result.unexpected_keys, result
    assert torch.equal(hf.proj_out.weight, hf.model.decoder.embed_tokens.weight)  # tied
    return hf


def speech_clips(n: int, seed: int = 0) -> list[tuple[str, torch.Tensor]]:
    """``n`` synthesised sentences (text, 16 kHz audio), cached under .cache/speech."""
    from dreidel.audio import load_audio
    from dreidel.data.speech import cached_speech, speech_test_set

    return [(item.text, load_audio(cached_speech(item.text, item.voice, item.rate)))
            for item in speech_test_set(n, seed=seed)]


def mel_of(audio: torch.Tensor) -> torch.Tensor:
    from dreidel.audio import log_mel_spectrogram, pad_or_trim

    return log_mel_spectrogram(pad_or_trim(audio))  # (80, 3000)


def faint(samples: int) -> torch.Tensor:
    """``samples`` of a constant at -40 dBFS: no speech, but not silence either (transcribe decodes it; see
    ``silence_threshold_dbfs``), for tests whose decoder is replaced."""
    return torch.full((samples,), 0.01)
