import json
import os
import shutil
import subprocess
import sys

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


def _l2_from_getconf() -> int | None:
    """One core's L2 size from glibc's `getconf`, an independent reader of what the native core reads."""
    if shutil.which("getconf") is None:
        return None
    out = subprocess.run(["getconf", "LEVEL2_CACHE_SIZE"], capture_output=True, text=True).stdout.strip()
    return int(out) if out.isdigit() and int(out) > 0 else None


def test_info_reports_the_l2_cache_the_fwht_blocks_for(capsys):
    assert main(["info", "--json"]) == 0
    reported = json.loads(capsys.readouterr().out)["l2_cache_bytes"]
    expected = _l2_from_getconf()
    if expected is None:
        pytest.skip("getconf does not report the L2 size here")
    assert reported == expected


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
