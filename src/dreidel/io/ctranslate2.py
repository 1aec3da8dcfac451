"""Reader and writer for the CTranslate2 binary model format (``model.bin``).

The layout, learned from CTranslate2's serializer (``python/ctranslate2/specs/model_spec.py``) and loader
(``src/models/model.cc``); all integers little-endian::

    u32 binary_version                      (1 ... 6; this module writes 6)
    str spec_name       (version >= 2)      str = u16 length incl. trailing NUL, bytes, NUL
    u32 spec_revision   (version >= 2)
    u32 n_variables
    n_variables x:
        str name
        u8  rank
        u32 dims[rank]
        version >= 4:  u8 dtype_id, u32 n_bytes
        version <  4:  u8 item_size, u32 n_elements   (dtype inferred from the item size)
        n_bytes raw bytes (row-major)
    u32 n_aliases       (version >= 3)
    n_aliases x: str alias, str target

dtype ids: 0 float32, 1 int8, 2 int16, 3 int32, 4 float16, 5 bfloat16.

Quantised weights carry a companion ``<name>_scale`` (int8: one float per output row, int16: a scalar) with
``q = round(w * scale)``, so ``w = q / scale``. An alias also aliases the target's ``_scale``.
"""

from __future__ import annotations

import math
import numbers
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from dreidel._files import replaced_atomically

__all__ = [
    "CTranslate2Model",
    "read_ctranslate2",
    "write_ctranslate2",
    "CT2_DTYPE_NAMES",
]

SUPPORTED_BINARY_VERSIONS = range(1, 7)
WRITTEN_BINARY_VERSION = 6

#: dtype id -> name, in the order of CTranslate2's ``DataType`` enum.
CT2_DTYPE_NAMES: dict[int, str] = {0: "float32", 1: "int8", 2: "int16", 3: "int32", 4: "float16", 5: "bfloat16"}
_DTYPE_IDS = {name: i for i, name in CT2_DTYPE_NAMES.items()}
# numpy dtype used to view the raw bytes; bfloat16 is viewed as uint16 and reinterpreted in torch.
_NUMPY_VIEW = {"float32": "<f4", "int8": "i1", "int16": "<i2", "int32": "<i4", "float16": "<f2", "bfloat16": "<u2"}
_ITEM_SIZE_TO_DTYPE = {4: "float32", 2: "int16", 1: "int8"}  # pre-version-4 files stored only the item size
_TORCH_TO_CT2 = {
    torch.float32: "float32", torch.int8: "int8", torch.int16: "int16",
    torch.int32: "int32", torch.float16: "float16", torch.bfloat16: "bfloat16",
}
_MAX_RANK = 8


@dataclass
class CTranslate2Model:
    """The contents of a CTranslate2 ``model.bin``.

    Attributes:
        spec: specification name, e.g. ``"WhisperSpec"`` (empty for version-1 files).
        revision: specification revision.
        binary_version: format version of the file that was read.
        variables: name -> tensor. Floating variables are converted to the requested dtype; quantised integer
            weights are dequantised with their ``<name>_scale`` companion (the consumed scales are removed);
            integer variables without a scale (config flags, ids) keep their integer dtype.
        aliases: alias name -> target variable name (not materialised in ``variables``).
        raw_dtypes: name -> dtype name as stored in the file, for every variable read (scales included).
        source: the path(s) read.
    """

    spec: str
    revision: int
    binary_version: int
    variables: dict[str, torch.Tensor]
    aliases: dict[str, str] = field(default_factory=dict)
    raw_dtypes: dict[str, str] = field(default_factory=dict)
    source: str = ""

    def tensor(self, name: str) -> torch.Tensor:
        """The variable ``name``, following aliases. Raises ``KeyError`` naming it when absent."""
        seen = set()
        while name in self.aliases and name not in self.variables:
            if name in seen:
                raise KeyError(f"alias cycle at {name!r} in {self.source}")
            seen.add(name)
            name = self.aliases[name]
        if name not in self.variables:
            raise KeyError(f"no variable {name!r} in {self.source}")
        return self.variables[name]

    def names(self) -> list[str]:
        """All variable and alias names, sorted."""
        return sorted(set(self.variables) | set(self.aliases))


class _Cursor:
    """Bounds-checked little-endian reader over a byte buffer; every read checks the remaining length."""

    def __init__(self, buffer, source: str):
        self.buffer = buffer
        self.size = len(buffer)
        self.offset = 0
        self.source = source

    def fail(self, what: str) -> ValueError:
        return ValueError(f"{self.source}: {what} at byte offset {self.offset} (file size {self.size})")

    def _check(self, n_bytes: int, what: str) -> None:
        if n_bytes < 0 or n_bytes > self.size - self.offset:
            raise self.fail(f"truncated: {what} needs {n_bytes} bytes, {self.size - self.offset} left")

    def take(self, n_bytes: int, what: str) -> bytes:
        self._check(n_bytes, what)
        data = bytes(self.buffer[self.offset:self.offset + n_bytes])
        self.offset += n_bytes
        return data

    def take_array(self, numpy_dtype: str, shape: tuple[int, ...], n_bytes: int, what: str) -> np.ndarray:
        """A copy of the next ``n_bytes`` as an array (no view into the buffer outlives this call)."""
        self._check(n_bytes, what)
        count = n_bytes // np.dtype(numpy_dtype).itemsize
        array = np.frombuffer(self.buffer, dtype=numpy_dtype, count=count, offset=self.offset).copy()
        self.offset += n_bytes
        return array.reshape(shape)

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def u16(self, what: str) -> int:
        return struct.unpack("<H", self.take(2, what))[0]

    def u32(self, what: str) -> int:
        return struct.unpack("<I", self.take(4, what))[0]

    def string(self, what: str) -> str:
        length = self.u16(f"{what} length")
        if length == 0:
            raise self.fail(f"{what} has length 0 (expected a NUL-terminated string)")
        raw = self.take(length, what)
        if raw[-1] != 0:
            raise self.fail(f"{what} is not NUL-terminated")
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError as error:
            raise self.fail(f"{what} is not valid UTF-8 ({error})") from None


def _open_buffer(paths: Sequence[Path]) -> bytearray:
    """The bytes of the parts concatenated in order, read into memory (every variable is copied out of them
    anyway). Not a memory map: a file truncated by another process while mapped would kill this one with
    SIGBUS where a read gives a clear error."""
    for path in paths:
        if not path.is_file():
            raise ValueError(f"CTranslate2 model file not found: {path}")
    sizes = [path.stat().st_size for path in paths]
    buffer = bytearray(sum(sizes))
    view, offset = memoryview(buffer), 0
    for path, size in zip(paths, sizes):
        with open(path, "rb") as handle:
            got = handle.readinto(view[offset:offset + size])
            if got != size or handle.read(1):
                raise ValueError(f"{path} changed size while it was being read ({size} bytes, then {got})")
        offset += size
    return buffer


def _resolve_paths(path) -> list[Path]:
    if isinstance(path, (str, os.PathLike)):
        path = Path(path)
        if path.is_dir():
            if (path / "model.bin").is_file():
                return [path / "model.bin"]
            numbered = {int(match.group(1)): p for p in path.iterdir()
                        if (match := re.fullmatch(r"model\.bin\.part([1-9]\d*)", p.name))}
            if not numbered:
                raise ValueError(f"directory {path} holds no model.bin (nor model.bin.part1, part2, ...)")
            missing = [number for number in range(1, max(numbered) + 1) if number not in numbered]
            if missing:  # concatenated anyway, the parts would fail later as a corrupt file
                raise ValueError(f"directory {path} holds model.bin parts {sorted(numbered)} but no "
                                 f"model.bin.part{missing[0]}: the parts must be numbered 1 to n")
            return [numbered[number] for number in sorted(numbered)]
        return [path]
    if isinstance(path, Sequence) and path and all(isinstance(p, (str, os.PathLike)) for p in path):
        return [Path(p) for p in path]
    raise TypeError(f"path must be a file, a directory or a non-empty sequence of part files, got {path!r}")


def _read_variable(cursor: _Cursor, binary_version: int, index: int):
    name = cursor.string(f"name of variable #{index}")
    rank = cursor.u8(f"rank of {name!r}")
    if rank > _MAX_RANK:
        raise cursor.fail(f"variable {name!r} has rank {rank} (expected <= {_MAX_RANK})")
    shape = tuple(cursor.u32(f"dimension {d} of {name!r}") for d in range(rank))
    if binary_version >= 4:
        dtype_id = cursor.u8(f"dtype of {name!r}")
        if dtype_id not in CT2_DTYPE_NAMES:
            raise cursor.fail(f"variable {name!r} has unknown dtype id {dtype_id} (known: {sorted(CT2_DTYPE_NAMES)})")
        dtype = CT2_DTYPE_NAMES[dtype_id]
        n_bytes = cursor.u32(f"byte count of {name!r}")
    else:
        item_size = cursor.u8(f"item size of {name!r}")
        if item_size not in _ITEM_SIZE_TO_DTYPE:
            raise cursor.fail(f"variable {name!r} has item size {item_size} (expected 1, 2 or 4)")
        dtype = _ITEM_SIZE_TO_DTYPE[item_size]
        n_bytes = cursor.u32(f"element count of {name!r}") * item_size
    n_elements = math.prod(shape)  # Python ints: no overflow whatever the declared dims
    expected = n_elements * np.dtype(_NUMPY_VIEW[dtype]).itemsize
    if n_bytes != expected:
        raise cursor.fail(f"variable {name!r} of shape {shape} and dtype {dtype} declares {n_bytes} bytes, "
                          f"expected {expected}")
    tensor = torch.from_numpy(cursor.take_array(_NUMPY_VIEW[dtype], shape, n_bytes, f"data of {name!r}"))
    if dtype == "bfloat16":
        tensor = tensor.view(torch.bfloat16)
    return name, dtype, tensor


def _dequantise(raw: dict[str, torch.Tensor], raw_dtypes: dict[str, str], dtype: torch.dtype | None, source: str):
    """Apply the int8/int16 scales and cast floating tensors; ``dtype=None`` returns the stored tensors."""
    if dtype is None:
        return dict(raw)
    out: dict[str, torch.Tensor] = {}
    consumed_scales = set()
    for name, tensor in raw.items():
        scale_name = f"{name}_scale"
        if raw_dtypes[name] in ("int8", "int16") and scale_name in raw:
            if not raw[scale_name].is_floating_point():
                raise ValueError(f"{source}: {scale_name!r} is {raw_dtypes[scale_name]}; the scale of the quantised "
                                 f"{name!r} must be floating-point")
            scale = raw[scale_name].to(torch.float32)
            if scale.numel() != 1 and not (tensor.dim() >= 1 and scale.shape == tensor.shape[:1]):
                raise ValueError(f"{source}: {scale_name!r} has shape {tuple(scale.shape)}, but {name!r} of shape "
                                 f"{tuple(tensor.shape)} takes one scale, or one per row")
            if scale.numel() == 1:
                scale = scale.reshape(())  # one scale for the whole tensor: it must not reshape the weight
            elif scale.dim() == 1:
                scale = scale.reshape(-1, *([1] * (tensor.dim() - 1)))  # one scale per output row
            out[name] = (tensor.to(torch.float32) / scale).to(dtype)
            consumed_scales.add(scale_name)
        elif tensor.is_floating_point():
            out[name] = tensor.to(dtype)
        else:
            out[name] = tensor
    for name in consumed_scales:
        out.pop(name, None)
    return out


def _check_binary_version(path: Path, source: str) -> None:
    """``ValueError`` unless ``path`` starts with a supported binary version, from its first 4 bytes (a shorter
    file is left to the reader)."""
    if not path.is_file():
        raise ValueError(f"CTranslate2 model file not found: {path}")
    with open(path, "rb") as handle:
        head = handle.read(4)
    version = struct.unpack("<I", head)[0] if len(head) == 4 else None
    if version is not None and version not in SUPPORTED_BINARY_VERSIONS:
        raise _unsupported_version(source, version)


def _unsupported_version(source: str, version: int) -> ValueError:
    return ValueError(f"{source}: not a CTranslate2 model.bin or an unsupported binary version {version} "
                      f"(supported: 1 to {SUPPORTED_BINARY_VERSIONS[-1]})")


def read_ctranslate2(path, *, dtype: torch.dtype | None = torch.float32) -> CTranslate2Model:
    """Read a CTranslate2 ``model.bin``.

    Args:
        path: the ``model.bin`` file, a directory holding it (or ``model.bin.part1``, ``.part2``, ... to
            ``.partN``, none missing), or a sequence of part files whose bytes concatenated in order form the
            file.
        dtype: floating dtype of the returned weights (``torch.float32`` default, ``torch.float16`` to keep
            half precision); int8/int16 weights are dequantised with their scales. ``None`` returns every
            variable exactly as stored (no dequantisation, scales kept).

    Raises:
        ValueError: missing file or part; unsupported binary version; truncated data; unknown dtype id; sizes that do
            not match the shape; trailing bytes; a quantised weight's ``_scale`` that is not floating-point. The
            message names the path and the byte offset or variable.
    """
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
    paths = _resolve_paths(path)
    source = str(paths[0]) if len(paths) == 1 else " + ".join(str(p) for p in paths)
    _check_binary_version(paths[0], source)  # before the whole file is read: any large file may be named model.bin
    buffer = _open_buffer(paths)
    cursor = _Cursor(buffer, source)
    binary_version = cursor.u32("binary version")
    if binary_version not in SUPPORTED_BINARY_VERSIONS:  # a first part of under 4 bytes was not checked above
        raise _unsupported_version(source, binary_version)
    spec, revision = "", 1
    if binary_version >= 2:
        spec = cursor.string("spec name")
        revision = cursor.u32("spec revision")
    n_variables = cursor.u32("variable count")
    raw: dict[str, torch.Tensor] = {}
    raw_dtypes: dict[str, str] = {}
    for index in range(n_variables):
        name, stored_dtype, tensor = _read_variable(cursor, binary_version, index)
        if name in raw:
            raise cursor.fail(f"variable {name!r} appears twice")
        raw[name], raw_dtypes[name] = tensor, stored_dtype
    aliases: dict[str, str] = {}
    if binary_version >= 3:
        n_aliases = cursor.u32("alias count")
        for index in range(n_aliases):
            alias = cursor.string(f"alias #{index}")
            aliases[alias] = cursor.string(f"target of alias {alias!r}")
    if cursor.offset != cursor.size:
        raise cursor.fail(f"{cursor.size - cursor.offset} unexpected trailing bytes")
    for alias, target in aliases.items():
        if target not in raw and target not in aliases:
            raise ValueError(f"{source}: alias {alias!r} points to unknown variable {target!r}")
    return CTranslate2Model(spec=spec, revision=revision, binary_version=binary_version,
                            variables=_dequantise(raw, raw_dtypes, dtype, source), aliases=aliases,
                            raw_dtypes=raw_dtypes, source=source)


def _pack_string(text: str) -> bytes:
    encoded = text.encode("utf-8") + b"\0"
    if len(encoded) > 0xFFFF:
        raise ValueError(f"string too long for the CTranslate2 format ({len(encoded)} bytes): {text[:40]!r}...")
    return struct.pack("<H", len(encoded)) + encoded


def write_ctranslate2(path, spec: str, revision: int, variables: Mapping[str, torch.Tensor | np.ndarray],
                      aliases: Mapping[str, str] | None = None) -> Path:
    """Write a binary-version-6 ``model.bin`` atomically (temp file + ``os.replace``).

    Args:
        path: output file, or an existing directory (``model.bin`` is written inside).
        spec: specification name (e.g. ``"WhisperSpec"``); revision: its revision, an int in [0, 2**32).
        variables: name -> tensor/array of dtype float32, float16, bfloat16, int8, int16 or int32. Quantised
            weights are written as given: pass the int8 tensor and its float32 ``<name>_scale`` yourself.
            Variables are written in sorted name order, as CTranslate2 does.
        aliases: alias name -> existing variable name.
    Returns the path written. Raises ``TypeError`` / ``ValueError`` naming the argument or variable that does
    not fit these, and ``ValueError`` where ``path``'s folder does not exist.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "model.bin"
    if not isinstance(spec, str):
        raise TypeError(f"spec must be the specification name, a str such as 'WhisperSpec', got "
                        f"{type(spec).__name__} {spec!r}")
    if isinstance(revision, bool) or not isinstance(revision, numbers.Integral) or not 0 <= revision < 2**32:
        raise ValueError(f"revision must be an int in [0, 2**32), got {revision!r}")
    if not all(isinstance(name, str) and name for name in variables):
        raise TypeError("variable names must be non-empty strings")
    aliases = dict(aliases or {})
    if not all(isinstance(alias, str) and alias for alias in aliases):
        raise TypeError("alias names must be non-empty strings")
    for alias, target in aliases.items():
        if target not in variables:
            raise ValueError(f"alias {alias!r} points to {target!r}, which is not among the variables")
    chunks = [struct.pack("<I", WRITTEN_BINARY_VERSION), _pack_string(spec), struct.pack("<I", int(revision)),
              struct.pack("<I", len(variables))]
    for name in sorted(variables):
        value = variables[name]
        if isinstance(value, np.ndarray):  # in the machine's byte order first: torch takes no other
            value = np.ascontiguousarray(value, dtype=value.dtype.newbyteorder("="))
        tensor = torch.from_numpy(value) if isinstance(value, np.ndarray) else value
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"variable {name!r} must be a torch.Tensor or numpy array, got {type(value).__name__}")
        if tensor.is_meta or tensor.layout != torch.strided or tensor.is_nested:
            raise ValueError(f"variable {name!r} must be a dense tensor with data, got "
                             f"{'a meta tensor' if tensor.is_meta else 'a nested tensor' if tensor.is_nested else tensor.layout}")
        if tensor.dtype not in _TORCH_TO_CT2:
            raise ValueError(f"variable {name!r} has dtype {tensor.dtype}; supported: "
                             f"{', '.join(str(d) for d in _TORCH_TO_CT2)}")
        if tensor.dim() > _MAX_RANK:
            raise ValueError(f"variable {name!r} has rank {tensor.dim()} (at most {_MAX_RANK})")
        if any(size >= 2**32 for size in tensor.shape) or tensor.nbytes >= 2**32:  # the format's 32-bit fields
            raise ValueError(f"variable {name!r} of shape {tuple(tensor.shape)} ({tensor.nbytes} bytes) does not fit "
                             "the CTranslate2 format: each dimension and the byte count must be below 2**32")
        tensor = tensor.detach().cpu().resolve_neg().resolve_conj().contiguous()
        dtype_id = _DTYPE_IDS[_TORCH_TO_CT2[tensor.dtype]]
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.view(torch.int16)  # numpy has no bfloat16; the bytes are what matter
        array = tensor.numpy()
        data = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
        chunks += [_pack_string(name), struct.pack("<B", tensor.dim()),
                   struct.pack(f"<{tensor.dim()}I", *tensor.shape), struct.pack("<BI", dtype_id, len(data)), data]
    chunks.append(struct.pack("<I", len(aliases)))
    for alias in sorted(aliases):
        chunks += [_pack_string(alias), _pack_string(aliases[alias])]
    with replaced_atomically(path) as (handle, _), os.fdopen(handle, "wb") as out:
        for chunk in chunks:
            out.write(chunk)
    return path
