"""What machine and software dreidel is running on: used by `dreidel info` and the benchmarks."""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass

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


@dataclass(frozen=True)
class SystemInfo:
    dreidel: str
    torch: str
    python: str
    cpu: str
    cores: int
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
        isa=best_isa(),
        l2_cache_bytes=l2_cache_bytes,
        l1d_ways=l1d_ways,
        torch_threads=torch.get_num_threads(),
        openmp_max_threads=native.openmp_max_threads(),
    )
