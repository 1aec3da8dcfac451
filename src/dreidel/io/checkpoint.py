"""Model checkpoints: a directory holding ``config.json`` (architecture, plain JSON) and ``model.safetensors``.

Nothing here unpickles or executes code from a file: the config is parsed as JSON and the tensors are read by
``safetensors``. Loading checks every tensor key in both directions and every shape against the module it
is loaded into, and fails with a ``ValueError`` naming the key (the ``from_pretrained`` habit of nanoGPT).

Writes are atomic: the directory is assembled beside the target under a temporary name and renamed into
place, so a reader never sees a half-written checkpoint and a crash leaves any previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from dreidel._files import give_usual_file_mode, staging_dir

__all__ = [
    "CONFIG_FILE",
    "TENSORS_FILE",
    "TensorHeader",
    "load_state_strict",
    "read_checkpoint",
    "read_config",
    "read_json_object",
    "read_tensor_header",
    "read_tensors",
    "require_config_keys",
    "write_checkpoint",
]

CONFIG_FILE = "config.json"
TENSORS_FILE = "model.safetensors"


def write_checkpoint(path: str | os.PathLike, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> Path:
    """Write ``config`` (JSON-serialisable) and ``tensors`` as a checkpoint directory at ``path``, atomically.

    An existing checkpoint directory at ``path`` is replaced; any other existing file or directory there is
    left alone and a ``ValueError`` is raised (so a typo cannot delete unrelated data).

    Returns:
        the checkpoint directory as a ``Path``.
    """
    target = Path(path)
    if target.exists() and not _is_checkpoint_dir(target):
        raise ValueError(
            f"path {str(target)!r} exists and is not a dreidel checkpoint directory "
            f"(holding only {CONFIG_FILE} and {TENSORS_FILE}); refusing to replace it"
        )
    config_text = json.dumps(config, indent=2, sort_keys=True)  # fails early on non-JSON values
    # safetensors refuses views that share storage; give it one contiguous copy of each tensor
    plain = {name: tensor.detach().to("cpu").contiguous().clone() for name, tensor in tensors.items()}
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_dir(target)
    try:
        _write_text(staging / CONFIG_FILE, config_text + "\n")
        save_file(plain, str(staging / TENSORS_FILE))
        give_usual_file_mode(staging / TENSORS_FILE)
        _fsync_file(staging / TENSORS_FILE)
        _swap_into_place(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


@dataclass(frozen=True)
class TensorHeader:
    """What the safetensors header says about one tensor (read without reading its data)."""

    shape: tuple[int, ...]
    dtype: str  # the safetensors name: "F32", "BF16", "I64", ...

    @property
    def is_floating_point(self) -> bool:
        return self.dtype.startswith(("F", "BF"))


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read a checkpoint directory written by ``write_checkpoint``.

    Returns:
        ``(config, tensors)``: the parsed JSON object and a dict of CPU tensors.

    Raises:
        FileNotFoundError: ``path`` or one of its two files is missing.
        ValueError: the config is not a JSON object, or the tensor file is corrupted or truncated.
    """
    return read_config(path), read_tensors(path)


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``config.json`` of the checkpoint directory ``path`` (whose tensor file must exist too)."""
    config_path, _ = _checkpoint_files(path)
    return read_json_object(config_path)


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in the file ``path``; a ``ValueError`` naming the file for anything else (not UTF-8, not
    JSON, nested too deeply or with integers too long to parse, not an object). ``OSError`` passes through."""
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as error:  # ValueError: UnicodeDecodeError, JSONDecodeError, long integers
        raise ValueError(f"cannot read {path}: not valid JSON: {type(error).__name__}: {error}") from None
    if not isinstance(content, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(content).__name__}")
    return content


def read_tensor_header(path: str | os.PathLike) -> dict[str, TensorHeader]:
    """Names, shapes and dtypes of the checkpoint's tensors, from the safetensors header alone (no data read)."""
    _, tensors_path = _checkpoint_files(path)
    try:
        with safe_open(str(tensors_path), framework="pt") as handle:
            slices = {name: handle.get_slice(name) for name in handle.keys()}
            return {name: TensorHeader(tuple(part.get_shape()), part.get_dtype()) for name, part in slices.items()}
    except SafetensorError as error:
        raise ValueError(f"{tensors_path} is corrupted or truncated: {error}") from error


def read_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors, as CPU tensors of the dtypes they were saved in."""
    _, tensors_path = _checkpoint_files(path)
    try:
        return load_file(str(tensors_path), device="cpu")
    except SafetensorError as error:
        raise ValueError(f"{tensors_path} is corrupted or truncated: {error}") from error


def _checkpoint_files(path: str | os.PathLike) -> tuple[Path, Path]:
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"no checkpoint directory at {str(directory)!r}")
    config_path, tensors_path = directory / CONFIG_FILE, directory / TENSORS_FILE
    for required in (config_path, tensors_path):
        if not required.is_file():
            raise FileNotFoundError(f"checkpoint {str(directory)!r} has no {required.name}")
    return config_path, tensors_path


def require_config_keys(config: Mapping[str, Any], keys: tuple[str, ...], where: str) -> None:
    """Raise ``ValueError`` naming the first of ``keys`` that ``config`` lacks (``where`` names the object)."""
    for key in keys:
        if key not in config:
            raise ValueError(f"{where} is missing the key {key!r} (expected keys: {list(keys)})")


def load_state_strict(module: nn.Module, tensors: Mapping[str, torch.Tensor], source: str = "checkpoint",
                      keep_dtypes: bool = False) -> None:
    """Copy ``tensors`` into ``module``'s parameters and buffers after checking them against it.

    Every key of ``module.state_dict()`` must be present, no other key may be, and every shape must match;
    a mismatch raises ``ValueError`` naming the key and the shapes. Floating-point tensors are cast to the
    module's dtypes, or with ``keep_dtypes`` become the module's tensors as they are (their own dtypes and
    device: a mixed-precision checkpoint stays mixed, and a module built on the meta device gets real tensors).
    Other tensors always take the module's dtype.
    """
    expected = module.state_dict()
    missing = [key for key in expected if key not in tensors]
    unexpected = [key for key in tensors if key not in expected]
    if missing:
        raise ValueError(f"{source} lacks tensor {missing[0]!r} that the model needs (missing: {missing})")
    if unexpected:
        raise ValueError(f"{source} has tensor {unexpected[0]!r} that the model does not have (unexpected: {unexpected})")
    for key, reference in expected.items():
        if tuple(tensors[key].shape) != tuple(reference.shape):
            raise ValueError(
                f"{source} tensor {key!r} has shape {tuple(tensors[key].shape)}, the model expects {tuple(reference.shape)}"
            )
    if keep_dtypes:
        state = {key: tensors[key] if tensors[key].is_floating_point() and reference.is_floating_point()
                 else tensors[key].to(reference.dtype) for key, reference in expected.items()}
    else:
        state = {key: tensors[key].to(reference.dtype) for key, reference in expected.items()}
    try:
        with torch.no_grad():
            module.load_state_dict(state, strict=True, assign=keep_dtypes)
    except (ValueError, RuntimeError) as error:  # a module's own check of the values (e.g. a permutation)
        raise ValueError(f"{source}: {error}") from error


def _is_checkpoint_dir(path: Path) -> bool:
    if not path.is_dir() or path.is_symlink():
        return False
    return {entry.name for entry in path.iterdir()} <= {CONFIG_FILE, TENSORS_FILE}


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _swap_into_place(staging: Path, target: Path) -> None:
    """Rename ``staging`` to ``target``; an existing ``target`` is moved aside first and removed after."""
    if not target.exists():
        os.replace(staging, target)
        return
    # rename() cannot replace a non-empty directory, so the old one steps aside under a temporary name
    retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.rmdir(retired)
    os.replace(target, retired)
    try:
        os.replace(staging, target)
    except BaseException:
        os.replace(retired, target)
        raise
    shutil.rmtree(retired, ignore_errors=True)
