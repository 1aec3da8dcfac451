"""Temporary names for atomic writes, with the permissions a plain ``open()`` or ``mkdir()`` would give.

Every file dreidel writes is written under a temporary name beside its target and renamed into place.
``tempfile.mkstemp`` / ``mkdtemp`` create those names owner-only (0600 / 0700), which the rename would
carry over to checkpoints, models and logs; these helpers give them the process's usual mode instead.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["give_usual_file_mode", "staging_dir", "staging_file"]


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; restored at once
    os.umask(mask)
    return mask


def staging_file(target: Path, suffix: str = ".tmp") -> tuple[int, str]:
    """``(fd, name)`` of a new temporary file beside ``target``, mode ``0666 & ~umask`` (open()'s)."""
    handle, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix, dir=target.parent)
    os.chmod(name, 0o666 & ~_umask())
    return handle, name


def give_usual_file_mode(path: Path) -> None:
    """Set ``path`` to ``0666 & ~umask`` (safetensors' ``save_file`` creates its file owner-only)."""
    os.chmod(path, 0o666 & ~_umask())


def staging_dir(target: Path, infix: str = "tmp") -> Path:
    """A new temporary directory beside ``target``, mode ``0777 & ~umask`` (mkdir()'s)."""
    path = Path(tempfile.mkdtemp(prefix=f".{target.name}.{infix}-", dir=target.parent))
    os.chmod(path, 0o777 & ~_umask())
    return path
