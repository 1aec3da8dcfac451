"""Temporary names for atomic writes, with the permissions a plain ``open()`` or ``mkdir()`` would give.

Every file dreidel writes is written under a temporary name beside its target and renamed into place.
``tempfile.mkstemp`` / ``mkdtemp`` create those names owner-only (0600 / 0700), which the rename would
carry over to checkpoints, models and logs; these helpers give them the process's usual mode instead, or the
mode of the file they replace. A symbolic link is written through (the file it names is replaced; the link
stays), and a target that is not a regular file (a FIFO, a device) is refused: the rename would have put a
regular file in its place (``/dev/null`` itself, for root).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["check_parents", "check_file_target", "give_usual_file_mode", "keep_mode_of", "replaced_atomically",
           "staging_dir", "staging_file", "staging_prefix", "written_path"]

NAME_MAX = 255  # bytes in one path component on Linux, macOS and Windows file systems
_RANDOM_PART = 8  # the characters tempfile adds between prefix and suffix


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (``/proc/self/status``); elsewhere
    by setting it and restoring it at once (a window in which another thread's new files get 0o022)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def staging_prefix(target: Path, after_name: str, suffix: str = "") -> str:
    """``"." + target.name + after_name``, the target's name cut (at a character boundary) so that the
    temporary name, with tempfile's random part and ``suffix``, fits in ``NAME_MAX`` bytes: any name the file
    system takes can be written to. The random part keeps cut names unique; the leading dot keeps them hidden."""
    room = NAME_MAX - len(os.fsencode(f".{after_name}{suffix}")) - _RANDOM_PART
    name = os.fsencode(target.name)[:room].decode("utf-8", errors="ignore")  # errors: a cut multi-byte character
    return f".{name}{after_name}"


def staging_file(target: Path, suffix: str = ".tmp") -> tuple[int, str]:
    """``(fd, name)`` of a new temporary file beside ``target``, mode ``0666 & ~umask`` (open()'s)."""
    handle, name = tempfile.mkstemp(prefix=staging_prefix(target, ".", suffix), suffix=suffix, dir=target.parent)
    os.chmod(name, 0o666 & ~_umask())
    return handle, name


def keep_mode_of(target: Path, staged: str | os.PathLike) -> None:
    """Give ``staged``, written and about to be renamed onto ``target``, the permission bits of what is at
    ``target`` (a 0600 file stays 0600), where something is; set only now, so that a read-only target's mode
    does not stop the staging copy being written. Setuid, setgid and sticky bits are not carried over."""
    try:
        os.chmod(staged, stat.S_IMODE(os.lstat(target).st_mode) & 0o777)
    except FileNotFoundError:
        pass


def written_path(target: Path) -> Path:
    """Where a write to ``target`` lands: the file a symbolic link at ``target`` names (links followed to the
    end; a dangling one names where its file would be), else ``target`` itself."""
    return Path(os.path.realpath(target)) if os.path.islink(target) else target


def check_parents(target: Path) -> None:
    """Whether something could be written at ``target``, as the nearest existing parent decides: a
    ``ValueError`` where something other than a directory stands where a parent directory should be (a file,
    say), a ``PermissionError`` where that directory may not be written in (the write would stage a hidden
    temporary name there, which the error would name, after an epoch of training for a callback)."""
    for parent in target.parents:
        if parent.is_dir():
            if not os.access(parent, os.W_OK | os.X_OK, effective_ids=os.access in os.supports_effective_ids):
                raise PermissionError(errno.EACCES, f"no permission to write in folder {str(parent)!r}, so "
                                                    f"nothing can be written at {str(target)!r}")
            return
        if os.path.lexists(parent):
            raise ValueError(f"{str(parent)!r} is not a directory, so nothing can be written at {str(target)!r}")


def check_file_target(target: Path) -> None:
    """``ValueError`` where a file cannot be written at ``target``: a directory is there, or something that is
    not a regular file (a FIFO, a device, a socket: the atomic rename would replace it by a file), or see
    ``check_parents`` (otherwise the error would come late, from the rename of a hidden temporary name). A
    symbolic link is judged by what it names."""
    target = written_path(target)
    if target.is_dir():
        raise ValueError(f"{str(target)!r} is a directory; expected the path of a file")
    if os.path.lexists(target) and not target.is_file():
        raise ValueError(f"{str(target)!r} is not a regular file (a FIFO, a device or a socket); expected the path of "
                         "a file, which is written under a temporary name and renamed into place")
    check_parents(target)


@contextlib.contextmanager
def replaced_atomically(target: Path, suffix: str = ".tmp") -> Iterator[tuple[int, str]]:
    """``(fd, name)`` of a staging file beside ``target`` (``staging_file``) for the block to write; when the
    block ends without an error the file is synced to disk (``os.fsync``) and renamed onto ``target``, and on
    an error it is removed, so ``target`` is always the old file or the whole new one, after a crash too. The
    block owns ``fd`` (wraps it with ``os.fdopen`` or closes it, flushing what it wrote; it may also write the
    file by ``name``). A target no file can be written to (``check_file_target``) or whose folder does not exist
    is refused first, with a ``ValueError`` (a ``PermissionError`` for a folder that may not be written in)
    naming it rather than the staging name. Through a symbolic link, the file it names is replaced."""
    check_file_target(target)
    target = written_path(Path(target))
    if not target.parent.is_dir():
        raise ValueError(f"folder {str(target.parent)!r} does not exist, so {str(target)!r} cannot be written")
    handle, name = staging_file(target, suffix)
    sync_handle = os.dup(handle)  # the block closes its fd; this one stays open to sync what it wrote
    try:
        yield handle, name
        os.fsync(sync_handle)  # else a crash soon after the rename can leave an empty or partial target
        keep_mode_of(target, name)
        os.replace(name, target)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    finally:
        os.close(sync_handle)


def give_usual_file_mode(path: Path) -> None:
    """Set ``path`` to ``0666 & ~umask`` (safetensors' ``save_file`` creates its file owner-only)."""
    os.chmod(path, 0o666 & ~_umask())


def staging_dir(target: Path, infix: str = "tmp") -> Path:
    """A new temporary directory beside ``target``, mode ``0777 & ~umask`` (mkdir()'s)."""
    path = Path(tempfile.mkdtemp(prefix=staging_prefix(target, f".{infix}-"), dir=target.parent))
    os.chmod(path, 0o777 & ~_umask())
    return path
