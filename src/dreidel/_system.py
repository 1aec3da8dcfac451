"""What machine and software dreidel is running on: used by `dreidel info`, the benchmarks, and the spectral
layers' check that their buffers fit in memory."""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from dreidel._native import best_isa, native


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    """CPUs this process may run on: its affinity mask (taskset, cgroup cpusets) where the OS has one.

    ``os.cpu_count()`` counts the whole machine, which overstates what a pinned process can use.
    """
    if hasattr(os, "sched_getaffinity"):  # Linux; elsewhere the machine's count is the best answer
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


# cgroup v1 writes "no limit" as the largest page-aligned signed 64-bit value; anything this large is no limit.
_CGROUP_V1_NO_LIMIT = 1 << 62


def _read_limit(file: Path, key: str | None = None) -> int | None:
    """A limit in bytes from a cgroup file: its one number, or the number after ``key`` on one of its lines
    (``memory.stat``); ``None`` where the file is unreadable, says "max" (v2) or is v1's "no limit" value."""
    try:
        text = file.read_text(errors="replace")
    except OSError:
        return None
    if key is not None:
        text = next((line[len(key):] for line in text.splitlines() if line.startswith(key + " ")), "")
    text = text.strip()
    if not (text.isascii() and text.isdigit()):
        return None
    return int(text) if int(text) < _CGROUP_V1_NO_LIMIT else None


def _cgroup_memory_limits(proc_cgroup: Path, cgroup_root: Path) -> list[int]:
    """The memory limits in bytes of this process's cgroups and their ancestors (a parent's limit binds its
    children too), v2 (``memory.max``) and v1 (``memory/…/memory.limit_in_bytes``, and v1's own minimum over the
    ancestors, ``hierarchical_memory_limit`` in ``memory.stat``, which sees ancestors a container does not), as
    Linux lists them in ``proc_cgroup``. A path that is not under ``cgroup_root`` (a container sees its own
    cgroup as the root) is read from the root up, and never above the root (a path of ``..``). Empty where
    there is no cgroup or no limit."""
    try:
        lines = proc_cgroup.read_text(errors="surrogateescape").splitlines()
    except OSError:
        return []
    limits = []
    for line in lines:
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        _, controllers, path = fields
        if controllers == "":  # the v2 hierarchy
            directory, files = cgroup_root, [("memory.max", None)]
        elif "memory" in controllers.split(","):
            directory = cgroup_root / "memory"
            files = [("memory.limit_in_bytes", None), ("memory.stat", "hierarchical_memory_limit")]
        else:
            continue
        parts = Path(path).parts[1:]  # without the leading "/"
        if ".." in parts:
            parts = parts[: parts.index("..")]
        for depth in range(len(parts) + 1):
            for name, key in files:
                limit = _read_limit(directory.joinpath(*parts[:depth], name), key)
                if limit is not None:
                    limits.append(limit)
    return limits


def usable_memory_bytes(proc_cgroup: Path = Path("/proc/self/cgroup"),
                        cgroup_root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes of memory this process may use: the machine's physical memory, or a cgroup's limit where that is
    lower (a container's ``--memory``, a systemd or Kubernetes limit); ``None`` where the OS says neither.

    The physical memory alone overstates what a process in a container can use: past its cgroup's limit the
    kernel kills it, as it does past the machine's memory.
    """
    known = _cgroup_memory_limits(proc_cgroup, cgroup_root)
    try:
        known.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        pass
    return min(known) if known else None


@dataclass(frozen=True)
class SystemInfo:
    dreidel: str
    torch: str
    python: str
    cpu: str
    cores: int
    memory_bytes: int  # what this process may use (physical memory or a lower cgroup limit); 0: not reported
    isa: str
    l2_cache_bytes: int  # a core's, as the C library reports it; 0: not reported
    l1d_ways: int  # associativity of a core's L1 data cache, likewise
    torch_threads: int
    openmp_max_threads: int

    def as_dict(self) -> dict:
        return asdict(self)


def system_info() -> SystemInfo:
    from dreidel import __version__

    l2_cache_bytes, l1d_ways = native.cache_geometry()
    return SystemInfo(
        dreidel=__version__,
        torch=torch.__version__,
        python=platform.python_version(),
        cpu=cpu_model(),
        cores=usable_cores(),
        memory_bytes=usable_memory_bytes() or 0,
        isa=best_isa(),
        l2_cache_bytes=l2_cache_bytes,
        l1d_ways=l1d_ways,
        torch_threads=torch.get_num_threads(),
        openmp_max_threads=native.openmp_max_threads(),
    )
