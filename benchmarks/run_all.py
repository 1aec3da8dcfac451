"""`make bench`: run every benchmark script, then rewrite BENCHMARKS.md from their sections."""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def header(rerun: list[str]) -> str:
    from _report import cache_text
    from dreidel._system import system_info

    info = system_info()
    cpu = info.cpu
    try:
        fields = {}
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            key, sep, value = line.partition(":")
            if sep:
                fields.setdefault(key.strip(), value)
        cpu += f" (family {fields['cpu family'].strip()}, model {fields['model'].strip()})"
    except (OSError, KeyError):
        pass
    return (
        "# Benchmarks\n\n"
        "Assembled by benchmarks/run_all.py from the sections the benchmark scripts write to benchmarks/results/ "
        "(`make bench` reruns every script first; `benchmarks/run_all.py NAME ...` reruns only those). Every "
        "figure was measured by the script that wrote its section, on the machine that section names; this "
        f"assembly reran {', '.join(rerun) if rerun else 'no script'}, on the machine below.\n\n"
        f"- date: {datetime.date.today().isoformat()}\n"
        f"- CPU: {cpu}, {info.cores} cores, {cache_text(info.l2_cache_bytes, info.l1d_ways)}, native core dispatched to {info.isa}\n"
        f"- dreidel {info.dreidel}, torch {info.torch}, Python {info.python}\n"
    )


def main() -> int:
    scripts = sorted(p for p in HERE.glob("*.py") if not p.name.startswith("_") and p.name != "run_all.py")
    parser = argparse.ArgumentParser(
        description="Run benchmark scripts, then rewrite BENCHMARKS.md from every section in benchmarks/results/."
    )
    names = [script.stem for script in scripts]
    parser.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help=f"rerun only these scripts ({', '.join(names)}); default: all of them",
    )
    only = set(parser.parse_args().names)
    if only - set(names):
        parser.error(f"no benchmark script named {', '.join(sorted(only - set(names)))}; choose from {', '.join(names)}")
    failed = []
    for script in scripts:
        if only and script.stem not in only:
            continue
        print(f"== {script.name}", flush=True)
        if subprocess.run([sys.executable, str(script)], cwd=ROOT, env=os.environ.copy()).returncode:
            failed.append(script.name)
    sections = [p.read_text(encoding="utf-8") for p in sorted((HERE / "results").glob("*.md"))]
    out = ROOT / "BENCHMARKS.md"
    tmp = out.with_suffix(".md.tmp")
    rerun = [script.name for script in scripts if not only or script.stem in only]
    tmp.write_text(header(rerun) + "\n" + "\n".join(sections), encoding="utf-8")
    os.replace(tmp, out)
    print(f"wrote {out}")
    if failed:
        print("failed: " + ", ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
