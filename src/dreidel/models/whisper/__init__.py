"""dreidel.models.whisper: one Whisper implementation, checkpoint mappings, decoding and transcription."""

from dreidel.models.whisper.convert import (
    checkpoint_to_ours,
    ct2_rules,
    dims_from_ct2,
    dims_from_hf_config,
    dims_to_hf_config,
    hf_rules,
    ours_to_checkpoint,
)
from dreidel.models.whisper.decoding import DecodingOptions, decode
from dreidel.models.whisper.model import DecoderCache, ResidualAttentionBlock, Whisper, WhisperDimensions
from dreidel.models.whisper.tokenizer import WhisperTokenizer
from dreidel.models.whisper.transcribe import (
    Segment,
    Transcription,
    WhisperRecognizer,
    load,
    load_state_dict_strict,
    quantize_int8,
    transcribe,
)

__all__ = [
    "DecoderCache",
    "DecodingOptions",
    "ResidualAttentionBlock",
    "Segment",
    "Transcription",
    "Whisper",
    "WhisperDimensions",
    "WhisperRecognizer",
    "WhisperTokenizer",
    "checkpoint_to_ours",
    "ct2_rules",
    "decode",
    "dims_from_ct2",
    "dims_from_hf_config",
    "dims_to_hf_config",
    "hf_rules",
    "load",
    "load_state_dict_strict",
    "ours_to_checkpoint",
    "quantize_int8",
    "transcribe",
]
