"""Model checkpoints: a directory holding ``config.json`` (architecture, plain JSON) and ``model.safetensors``.

Nothing here unpickles or executes code from a file: the config is parsed as JSON and the tensors are read by
``safetensors``. Loading checks every tensor key in both directions and every shape against the module it
is loaded into, and fails with a ``ValueError`` naming the key (the ``from_pretrained`` habit of nanoGPT).

Writes are atomic: the directory is assembled beside the target under a temporary name and renamed into
place, so a reader never sees a half-written checkpoint and a crash leaves any previous checkpoint intact. On
Linux a checkpoint that already exists is exchanged with the new one in one step (``renameat2`` with
``RENAME_EXCHANGE``), and a reader opens both files of one directory before reading either
(``open_checkpoint``): a process loading while another saves gets the old checkpoint or the new one, whole,
never the config of one with the tensors of the other.
"""

from __future__ import annotations

import ctypes
import errno
import json
import math
import os
import re
import shutil
import stat
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from safetensors import SafetensorError, safe_open
import safetensors.torch
from safetensors.torch import load_file, save_file
from torch import nn

from dreidel._checks import check_flag
from dreidel._warnings import warn
from dreidel._files import (check_parents, give_usual_file_mode, keep_mode_of, staging_dir, staging_prefix,
                            written_path)

__all__ = [
    "CONFIG_FILE",
    "FORMAT_PREFIX",
    "TENSORS_FILE",
    "CheckpointFiles",
    "TensorHeader",
    "load_state_strict",
    "open_checkpoint",
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
FORMAT_PREFIX = "dreidel."  # how every dreidel config.json's "format" begins: what marks a directory as ours


def write_checkpoint(path: str | os.PathLike, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> Path:
    """Write ``config`` (JSON-serialisable) and ``tensors`` as a checkpoint directory at ``path``, atomically.

    An existing dreidel checkpoint directory at ``path`` is replaced, and so is an empty directory; any other
    existing file or directory there is left alone and a ``ValueError`` is raised (so a typo cannot delete
    unrelated data). A checkpoint is recognised by its ``config.json``, whose ``"format"`` must be a string
    starting with ``"dreidel."`` (``Sequential.save`` writes ``"dreidel.Sequential"``): write such a config to be
    able to replace the checkpoint later.

    Returns:
        the checkpoint directory as a ``Path``.

    Raises:
        ValueError: nothing may be replaced at ``path`` (see above); the config's JSON takes more than the
            ``MAX_JSON_BYTES`` a reader reads; a tensor is on the meta device (no data) or not dense (sparse).
        TypeError: ``config`` or ``tensors`` is not a dict; the config holds a value JSON cannot write; a name
            is not a string or an entry not a tensor.
        Each before anything is written.
    """
    target = Path(path)
    if target.is_symlink() and target.exists():  # through a link, the checkpoint it names is replaced (one to
        target = written_path(target)  # nothing is refused below, as mkdir() refuses it)
    check_checkpoint_target(target)
    for name, value in (("config", config), ("tensors", tensors)):
        if not isinstance(value, Mapping):
            raise TypeError(f"{name} must be a dict, got {type(value).__name__}")
    _refuse_nan(config, "config")  # read_config refuses it
    config_text = json.dumps(config, indent=2, sort_keys=True) + "\n"  # fails early on non-JSON values
    if len(config_text) > MAX_JSON_BYTES:  # read_config would refuse it (ASCII JSON: a byte per character)
        raise ValueError(f"config takes {len(config_text)} bytes as JSON, more than the {MAX_JSON_BYTES} a "
                         f"checkpoint's {CONFIG_FILE} may take")
    for name, tensor in tensors.items():
        _check_saved_tensor(name, tensor)
    # safetensors refuses views that share storage; give it one contiguous copy of each tensor
    plain = {name: tensor.detach().to("cpu").contiguous().clone() for name, tensor in tensors.items()}
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_dir(target)
    try:
        _write_text(staging / CONFIG_FILE, config_text)
        save_file(plain, str(staging / TENSORS_FILE))
        give_usual_file_mode(staging / TENSORS_FILE)
        _fsync_file(staging / TENSORS_FILE)
        keep_mode_of(target, staging)  # a replaced checkpoint's folder keeps its mode
        _swap_into_place(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


# What the installed safetensors stores (its table of dtypes; complex128 and complex32 are not among them), or
# where it keeps no such table, the dtypes every version since 0.4 stores.
_SAVED_DTYPES = frozenset(getattr(safetensors.torch, "_TYPES", {}).values()) or frozenset(
    {torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16, torch.int8,
     torch.uint8, torch.bool})


def _check_saved_tensor(name: object, tensor: object) -> None:
    """``TypeError`` / ``ValueError`` naming the entry unless ``tensor`` is a dense tensor with data, ``name`` a
    string: what safetensors can write."""
    if not isinstance(name, str):
        raise TypeError(f"tensors: names must be strings, got {type(name).__name__} {name!r}")
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"tensors[{name!r}] must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.is_meta:
        raise ValueError(f"tensors[{name!r}] is on the meta device: it has no data to save")
    if tensor.is_nested:
        raise ValueError(f"tensors[{name!r}] is a nested tensor; a checkpoint holds dense tensors (save its "
                         "tensors apart, or tensor.to_padded_tensor(0.0))")
    if tensor.layout != torch.strided:
        raise ValueError(f"tensors[{name!r}] has layout {tensor.layout}; a checkpoint holds dense tensors "
                         f"(save tensor.to_dense())")
    if tensor.dtype not in _SAVED_DTYPES:
        raise ValueError(f"tensors[{name!r}] is {tensor.dtype}, which safetensors cannot store (it stores "
                         f"{', '.join(sorted(str(d).removeprefix('torch.') for d in _SAVED_DTYPES))}); convert it")


@dataclass(frozen=True)
class TensorHeader:
    """What the safetensors header says about one tensor (read without reading its data)."""

    shape: tuple[int, ...]
    dtype: str  # the safetensors name: "F32", "BF16", "I64", ...

    @property
    def is_floating_point(self) -> bool:
        return self.dtype.startswith(("F", "BF"))

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor's data: its elements times the bits its dtype name states ("F32": 4 bytes,
        "F8_E4M3": 1; "BOOL": 1)."""
        bits = re.search(r"\d+", self.dtype)
        return math.prod(self.shape) * (1 if bits is None else max(1, int(bits.group()) // 8))


class CheckpointFiles:
    """The two files of one checkpoint, open (from ``open_checkpoint``, usable inside its ``with`` block): what
    they hold cannot change under the reader, even if another process replaces the checkpoint at the path.

    Messages name the files by their paths in the checkpoint directory.
    """

    def __init__(self, directory: Path, config_fd: int, tensors_fd: int) -> None:
        self.config_path, self.tensors_path = directory / CONFIG_FILE, directory / TENSORS_FILE
        self._fds: tuple[int, int] | None = (config_fd, tensors_fd)

    def _fd(self, index: int) -> int:
        if self._fds is None:
            raise ValueError(f"the files of checkpoint {str(self.config_path.parent)!r} are closed: use them inside "
                             f"the with block of open_checkpoint")
        return self._fds[index]

    def config(self) -> dict[str, Any]:
        """The parsed ``config.json`` (see ``read_json_object``: the same errors, the same size limit)."""
        return _parse_json_object(_read_at_most(self._fd(0), MAX_JSON_BYTES + 1), self.config_path)

    def tensor_header(self) -> dict[str, TensorHeader]:
        """Names, shapes and dtypes of the tensors, from the safetensors header alone (no data read)."""
        try:
            with safe_open(_reopenable(self._fd(1), self.tensors_path), framework="pt") as handle:
                slices = {name: handle.get_slice(name) for name in handle.keys()}
                return {name: TensorHeader(tuple(part.get_shape()), part.get_dtype())
                        for name, part in slices.items()}
        except SafetensorError as error:
            raise ValueError(f"{self.tensors_path} is corrupted or truncated: {error}") from error

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors, as CPU tensors of the dtypes they were saved in."""
        try:
            return load_file(_reopenable(self._fd(1), self.tensors_path), device="cpu")
        except SafetensorError as error:
            raise ValueError(f"{self.tensors_path} is corrupted or truncated: {error}") from error

    def _close(self) -> None:
        if self._fds is not None:
            for fd in self._fds:
                os.close(fd)
            self._fds = None


# A writer may exchange the directory and delete the old one between a reader's opening of the directory and
# of its files; the reader then opens the new one (each try takes microseconds; a writer swaps once per save).
_OPEN_TRIES = 8


@contextmanager
def open_checkpoint(path: str | os.PathLike) -> Iterator[CheckpointFiles]:
    """Open both files of the checkpoint directory ``path`` together; they are closed on leaving the block.

    Raises:
        FileNotFoundError: ``path`` is not a directory, or lacks ``config.json`` or ``model.safetensors`` as
            regular files.
    """
    directory = Path(path)
    for _ in range(_OPEN_TRIES):
        opened = _open_files(directory)
        if opened is None:
            continue  # a writer put another checkpoint there meanwhile
        files = CheckpointFiles(directory, *opened)
        try:
            yield files
        finally:
            files._close()
        return
    raise FileNotFoundError(f"checkpoint {str(directory)!r} kept being replaced while it was opened")


def _open_files(directory: Path) -> tuple[int, int] | None:
    """The two files' descriptors, or None when the directory was replaced between its opening and theirs."""
    try:
        directory_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except (FileNotFoundError, NotADirectoryError):
        raise FileNotFoundError(f"no checkpoint directory at {str(directory)!r}") from None
    except OSError as error:
        if error.errno != errno.ELOOP:
            raise
        raise FileNotFoundError(f"no checkpoint directory at {str(directory)!r} (a loop of symbolic links)") from None
    opened: list[int] = []
    try:
        for name in (CONFIG_FILE, TENSORS_FILE):
            try:
                # O_NONBLOCK: a FIFO put there must not block the open (it is refused just below)
                fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK, dir_fd=directory_fd)
            except FileNotFoundError:
                if _renamed_since(directory, directory_fd):
                    for fd in opened:
                        os.close(fd)
                    return None
                raise FileNotFoundError(f"checkpoint {str(directory)!r} has no {name}") from None
            except OSError as error:
                if error.errno != errno.ELOOP:
                    raise
                raise FileNotFoundError(f"checkpoint {str(directory)!r} has no {name} (a loop of symbolic "
                                        "links)") from None
            opened.append(fd)
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise FileNotFoundError(f"checkpoint {str(directory)!r} has no {name} (not a regular file)")
    except BaseException:
        for fd in opened:
            os.close(fd)
        raise
    finally:
        os.close(directory_fd)
    return opened[0], opened[1]


def _renamed_since(directory: Path, directory_fd: int) -> bool:
    """Whether the directory now at ``directory`` is another one than the open ``directory_fd``."""
    try:
        now, then = os.stat(directory), os.fstat(directory_fd)
    except OSError:
        return True
    return (now.st_dev, now.st_ino) != (then.st_dev, then.st_ino)


def _read_at_most(fd: int, limit: int) -> bytes:
    """Up to ``limit`` bytes of the open file ``fd``, from its start whatever its offset (pread: the offset is
    left alone)."""
    chunks, offset = [], 0
    while offset < limit and (chunk := os.pread(fd, min(1 << 20, limit - offset), offset)):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def _reopenable(fd: int, shown: Path) -> str:
    """A path that opens the file behind ``fd`` (``/proc/self/fd``: the same file even once it is renamed or
    deleted), for readers that take a path (safetensors); where there is no ``/proc``, the shown path."""
    proc = f"/proc/self/fd/{fd}"
    return proc if os.path.exists(proc) else str(shown)


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read a checkpoint directory written by ``write_checkpoint``.

    Returns:
        ``(config, tensors)``: the parsed JSON object and a dict of CPU tensors, from one checkpoint.

    Raises:
        FileNotFoundError: ``path`` or one of its two files is missing.
        ValueError: the config is not a JSON object, or the tensor file is corrupted or truncated.
    """
    with open_checkpoint(path) as files:
        return files.config(), files.tensors()


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``config.json`` of the checkpoint directory ``path`` (whose tensor file must exist too)."""
    with open_checkpoint(path) as files:
        return files.config()


# The largest JSON file read_json_object reads: configs, whose largest (a Sequential of MAX_LAYERS layers) take
# a few MB. Parsed, JSON takes up to about 25 times its size ({},{},...: a 60 MB file took 1.5 GB).
MAX_JSON_BYTES = 8 << 20


def read_json_object(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON object in the file ``path``; a ``ValueError`` naming the file for anything else (a special
    file, larger than ``MAX_JSON_BYTES``, not UTF-8, not JSON, nested too deeply or with integers too long to
    parse, not an object). A FIFO would block the read and a link to ``/dev/zero`` fill memory: neither is
    opened. ``OSError`` passes through (a missing file, a directory); ``TypeError`` where ``path`` is not a
    ``str`` or ``os.PathLike``."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    path = Path(path)
    if path.exists() and not path.is_file() and not path.is_dir():
        raise ValueError(f"{path}: expected a regular file holding a JSON object")
    with open(path, "rb") as handle:
        return _parse_json_object(handle.read(MAX_JSON_BYTES + 1), path)


def _parse_json_object(content: bytes, path: Path) -> dict[str, Any]:
    """The JSON object in ``content`` (read from ``path``, up to ``MAX_JSON_BYTES + 1`` bytes: more is refused)."""
    if len(content) > MAX_JSON_BYTES:
        raise ValueError(f"{path}: larger than the {MAX_JSON_BYTES} bytes a JSON config may take")
    try:
        parsed = json.loads(content.decode("utf-8"), parse_constant=_json_constant)
    except (ValueError, RecursionError) as error:  # ValueError: UnicodeDecodeError, JSONDecodeError, long integers
        raise ValueError(f"cannot read {path}: not valid JSON: {type(error).__name__}: {error}") from None
    except MemoryError:
        raise ValueError(f"cannot read {path}: its JSON does not fit in memory") from None
    if not isinstance(parsed, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(parsed).__name__}")
    return parsed


def _json_constant(name: str) -> float:
    """``json.loads``' hook for the constants Python writes beyond JSON: ``Infinity`` and ``-Infinity`` are
    read (an ``nn.Embedding``'s ``norm_type`` may be one), ``NaN`` is refused (a config's NaN ``eps`` loaded
    without a word and made every output NaN)."""
    if name == "NaN":
        raise ValueError("NaN is not a JSON value")
    return float(name.replace("Infinity", "inf"))


def _refuse_nan(value: Any, where: str) -> None:
    """``ValueError`` naming where in ``value`` (a JSON-like tree) a float NaN sits."""
    if isinstance(value, float) and math.isnan(value):
        raise ValueError(f"{where} is NaN, which JSON cannot hold (nor is it any layer's setting)")
    if isinstance(value, Mapping):
        for key, item in value.items():
            _refuse_nan(item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _refuse_nan(item, f"{where}[{index}]")


def read_tensor_header(path: str | os.PathLike) -> dict[str, TensorHeader]:
    """Names, shapes and dtypes of the checkpoint's tensors, from the safetensors header alone (no data read)."""
    with open_checkpoint(path) as files:
        return files.tensor_header()


def read_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors, as CPU tensors of the dtypes they were saved in."""
    with open_checkpoint(path) as files:
        return files.tensors()


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
    keep_dtypes = check_flag("keep_dtypes", keep_dtypes)
    expected = module.state_dict()
    missing = [key for key in expected if key not in tensors]
    unexpected = [key for key in tensors if key not in expected]
    if missing:
        raise ValueError(f"{source} lacks tensor {missing[0]!r} that the model needs (missing: {missing})")
    if unexpected:
        raise ValueError(f"{source} has tensor {unexpected[0]!r} that the model does not have (unexpected: {unexpected})")
    for key, reference in expected.items():
        if not isinstance(tensors[key], torch.Tensor):
            raise TypeError(f"{source} entry {key!r} must be a torch.Tensor, got {type(tensors[key]).__name__}")
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


def check_checkpoint_target(target: Path) -> None:
    """``ValueError`` unless a checkpoint can be written at ``target``: nothing there, an empty directory or a
    dreidel checkpoint (see ``write_checkpoint``), under parents that are directories or can be made (and a
    ``PermissionError`` where the nearest of them may not be written in: ``check_parents``)."""
    if target.name in ("", ".", ".."):  # the directory would be swapped with a staging folder inside it or above
        raise ValueError(f"path {str(target)!r} ends in '.' or '..'; give the checkpoint directory's own name")
    if target.is_symlink() and not target.exists():  # dangling, or a loop: renaming onto it would fail late
        raise ValueError(f"path {str(target)!r} is a symbolic link to nothing; refusing to replace it")
    if target.exists() and not _is_checkpoint_dir(target):
        raise ValueError(
            f"path {str(target)!r} exists and is not a dreidel checkpoint directory (holding only {CONFIG_FILE}, "
            f"with a 'format' starting with {FORMAT_PREFIX!r}, and {TENSORS_FILE}); refusing to replace it"
        )
    check_parents(target)


def _is_checkpoint_dir(path: Path) -> bool:
    """Whether ``path`` may be replaced: an empty directory, or one holding nothing but the two files whose
    ``config.json`` is a dreidel config (another tool's directory of a ``config.json`` must stay)."""
    if not path.is_dir() or path.is_symlink():
        return False
    names = {entry.name for entry in path.iterdir()}
    if not names:
        return True
    if not names <= {CONFIG_FILE, TENSORS_FILE} or CONFIG_FILE not in names:
        return False
    config_path = path / CONFIG_FILE
    if not config_path.is_file() or config_path.stat().st_size > MAX_JSON_BYTES:
        return False
    try:
        config = read_json_object(config_path)
    except (OSError, ValueError):
        return False
    return isinstance(config.get("format"), str) and config["format"].startswith(FORMAT_PREFIX)



def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


try:
    _LIBC: ctypes.CDLL | None = ctypes.CDLL(None, use_errno=True)
except OSError:  # no C library to load by that name: the two-step rename
    _LIBC = None


def _exchange(a: Path, b: Path) -> bool:
    """Swap the directories ``a`` and ``b`` in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    C library or the file system cannot."""
    renameat2 = getattr(_LIBC, "renameat2", None)  # None too where there is no C library
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EPERM):  # not supported here: rename in two steps
        return False
    raise OSError(code, f"cannot exchange {a} and {b}: {os.strerror(code)}")


def _swap_into_place(staging: Path, target: Path) -> None:
    """Rename ``staging`` to ``target``; an existing ``target`` is exchanged with it in one step where Linux
    can (then removed), or else moved aside first and removed after."""
    if not target.exists():
        os.replace(staging, target)
        return
    if _exchange(staging, target):
        _remove_old_checkpoint(staging)  # now the old checkpoint
        return
    # rename() cannot replace a non-empty directory, so the old one steps aside under a temporary name
    retired = Path(tempfile.mkdtemp(prefix=staging_prefix(target, ".old-"), dir=target.parent))
    os.rmdir(retired)
    os.replace(target, retired)
    try:
        os.replace(staging, target)
    except BaseException:
        os.replace(retired, target)
        raise
    _remove_old_checkpoint(retired)


def _remove_old_checkpoint(path: Path) -> None:
    """Remove the replaced checkpoint at ``path``. Its directories become writable first (one made read-only
    kept its files: rmtree failed silently and left it behind under its hidden temporary name); whatever still
    cannot be removed is named in a warning."""
    for root, _, _ in os.walk(path):
        try:
            os.chmod(root, stat.S_IRWXU)
        except OSError:
            pass  # not ours to change: rmtree reports what stays
    shutil.rmtree(path, ignore_errors=True)
    if os.path.lexists(path):
        warn(f"saved the new checkpoint, but could not remove the one it replaced: it is left at {path}",
             RuntimeWarning)
