import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dreidel._native import available_isas, best_isa
from dreidel.cli.main import main


def test_info_reports_dispatch_and_threads(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["isa"] == best_isa() and info["isa"] in available_isas()
    assert info["torch"] == torch.__version__
    assert info["torch_threads"] == torch.get_num_threads()
    assert info["openmp_max_threads"] >= 1
    assert info["available_isas"] == list(available_isas())  # a list in JSON (was one comma-joined string)
    assert main(["info"]) == 0
    assert re.search(rf"^available_isas +{re.escape(', '.join(available_isas()))}$", capsys.readouterr().out, re.M)


def _cache_from_sysfs(level: str, kinds: tuple[str, ...], field: str) -> str | None:
    """A field of cpu0's cache of that level and type from Linux's sysfs: the kernel's own reading of the
    CPU's cache description, independent of the C library's sysconf that the native core asks."""
    root = Path("/sys/devices/system/cpu/cpu0/cache")
    for index in sorted(root.glob("index*")):
        try:
            if (index / "level").read_text().strip() == level and (index / "type").read_text().strip() in kinds:
                return (index / field).read_text().strip()
        except OSError:
            continue
    return None


def test_info_reports_the_caches_the_fwht_passes_are_chosen_by(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    size = _cache_from_sysfs("2", ("Data", "Unified"), "size")
    ways = _cache_from_sysfs("1", ("Data",), "ways_of_associativity")
    if size is None or ways is None or info["l2_cache_bytes"] == 0 or info["l1d_ways"] == 0:
        pytest.skip("the kernel or the C library reports no cache geometry here")
    units = {"K": 1 << 10, "M": 1 << 20}
    assert info["l2_cache_bytes"] == (int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size))
    assert info["l1d_ways"] == int(ways)


def _cpuinfo_flags() -> set[str] | None:
    """The first CPU's flags in Linux's /proc/cpuinfo: the kernel lists a vector extension only where the
    CPU has it and the kernel saves its registers, independent of the CPUID and XGETBV reads of the core."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    match = re.search(r"^flags\s*:(.*)$", text, re.M)
    return set(match.group(1).split()) if match else None


def test_the_kernels_dispatch_to_every_vector_extension_the_os_reports():
    # A Clang build whose compiler runtime left __builtin_cpu_supports unset ran the portable kernels on an
    # AVX-512 Xeon, silently; every test still passed, only slower.
    flags = _cpuinfo_flags()
    if flags is None or platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("needs Linux's /proc/cpuinfo on x86-64")
    expected = ["portable"]
    if {"avx2", "fma"} <= flags:
        expected.append("avx2")
        if {"avx512f", "avx512dq"} <= flags:
            expected.append("avx512")
    assert available_isas() == expected
    assert best_isa() == expected[-1]


@pytest.mark.skipif(shutil.which("taskset") is None, reason="needs taskset (util-linux)")
def test_info_counts_the_cores_this_process_may_use():
    # `taskset -c 0 dreidel info` used to report every core of the machine
    first_cpu = str(min(os.sched_getaffinity(0)))
    out = subprocess.run(["taskset", "-c", first_cpu, sys.executable, "-m", "dreidel.cli.main", "info", "--json"],
                         capture_output=True, text=True, check=True).stdout
    assert json.loads(out)["cores"] == 1


def test_console_script_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "dreidel.cli.main", "info"], capture_output=True, text=True,
                         check=True).stdout
    assert "isa" in out and "torch" in out


def test_unknown_command_is_a_usage_error(capsys):
    try:
        main(["no-such-command"])
    except SystemExit as exc:
        assert exc.code == 2
    assert "invalid choice" in capsys.readouterr().err


def _cgroup_tree(root: Path, files: dict[str, str]) -> None:
    for relative, text in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(text + "\n")


def test_usable_memory_is_the_lowest_cgroup_limit_on_the_way_to_the_process(tmp_path):
    from dreidel._system import usable_memory_bytes

    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    proc, root = tmp_path / "cgroup", tmp_path / "fs"
    # cgroup v2: a 3 GiB limit on the parent binds the child, whose own limit is "max"
    proc.write_text("0::/jobs/train\n")
    _cgroup_tree(root, {"jobs/memory.max": str(3 << 30), "jobs/train/memory.max": "max"})
    assert usable_memory_bytes(proc, root) == min(3 << 30, physical)
    # cgroup v1 (the memory controller's own hierarchy), with the v1 "no limit" value above the child's 1 GiB
    proc.write_text("12:pids:/docker/abc\n4:cpu,memory:/docker/abc\n1:name=systemd:/docker/abc\n")
    _cgroup_tree(root, {"memory/docker/memory.limit_in_bytes": "9223372036854771712",
                        "memory/docker/abc/memory.limit_in_bytes": str(1 << 30)})
    assert usable_memory_bytes(proc, root) == min(1 << 30, physical)
    # a container that sees its own cgroup as the root of the mount: the host's path is not there
    proc.write_text("0::/system.slice/docker-abc.scope\n")
    _cgroup_tree(root, {"memory.max": str(512 << 20)})
    assert usable_memory_bytes(proc, root) == 512 << 20
    # no limit anywhere, or no cgroup file at all: the machine's memory
    (root / "memory.max").write_text("max\n")
    assert usable_memory_bytes(proc, root) == physical
    assert usable_memory_bytes(tmp_path / "missing", root) == physical
    assert usable_memory_bytes() <= physical  # this machine, whatever its cgroups say


def test_usable_memory_survives_odd_cgroup_files(tmp_path):
    from dreidel._system import usable_memory_bytes

    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    proc, root = tmp_path / "cgroup", tmp_path / "fs" / "cgroup"
    # v1 inside a container that does not see its ancestors: their limit is in memory.stat's hierarchical sum
    proc.write_text("4:memory:/\n")
    _cgroup_tree(root, {"memory/memory.limit_in_bytes": "9223372036854771712",
                        "memory/memory.stat": f"cache 0\nhierarchical_memory_limit {2 << 30}\nrss 0"})
    assert usable_memory_bytes(proc, root) == min(2 << 30, physical)
    # an empty line, a line that is not "id:controllers:path", a path that is not UTF-8: skipped or read as bytes
    proc.write_bytes(b"\nnonsense\n0::/caf\xe9\n")
    _cgroup_tree(root, {"memory/memory.stat": "", f"caf{chr(0xdce9)}/memory.max": str(3 << 30)})
    assert usable_memory_bytes(proc, root) == min(3 << 30, physical)
    # a limit file that is not a plain number ("²" is a digit to str.isdigit), and a path above the namespace's root
    proc.write_text("0::/../elsewhere\n")
    _cgroup_tree(root, {"memory.max": "\u00b2", "../memory.max": str(1 << 20)})
    assert usable_memory_bytes(proc, root) == physical


def test_info_reports_the_memory_this_process_may_use(capsys):
    from dreidel._system import usable_memory_bytes

    assert main(["info", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["memory_bytes"] == usable_memory_bytes() > 0


def test_python_dash_m_dreidel_runs_the_cli():
    """Where the console script is not on PATH: `python -m dreidel` (it said there was no dreidel.__main__)."""
    child = subprocess.run([sys.executable, "-m", "dreidel", "info", "--json"], capture_output=True, text=True,
                           timeout=120)
    assert child.returncode == 0, child.stderr
    assert json.loads(child.stdout)["isa"] == best_isa()
    bad = subprocess.run([sys.executable, "-m", "dreidel", "--bogus"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "usage: dreidel" in bad.stderr
