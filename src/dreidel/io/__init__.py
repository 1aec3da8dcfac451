"""dreidel.io"""
from dreidel.io.ctranslate2 import (  # CTranslate2 model.bin reader/writer
    CTranslate2Model,
    ShippedModelFiles,
    read_ctranslate2,
    shipped_whisper_files,
    write_ctranslate2,
)

__all__ = [
    "CTranslate2Model",
    "ShippedModelFiles",
    "read_ctranslate2",
    "shipped_whisper_files",
    "write_ctranslate2",
]
