"""Shared by the benchmark scripts: each writes its own section, `run_all.py` assembles BENCHMARKS.md."""

from __future__ import annotations

import os
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def write_section(name: str, markdown: str) -> Path:
    """Atomically write benchmarks/results/<name>.md (one section of BENCHMARKS.md) and echo it."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(markdown.rstrip() + "\n", encoding="utf-8")
    os.replace(tmp, path)
    sys.stdout.write(markdown.rstrip() + "\n")
    return path


def markdown_table(headers: list[str], rows: list[list[object]]) -> str:
    def cell(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def cache_text(l2_bytes: int, l1d_ways: int) -> str:
    """'2 MB L2, 12-way L1d per core' (binary units, as cache sizes are reported), saying what is unknown."""
    l2 = "L2 size not reported"
    if l2_bytes > 0:
        l2 = f"{l2_bytes} B L2"
        for unit, scale in (("MB", 1 << 20), ("KB", 1 << 10)):
            if l2_bytes >= scale:
                l2 = f"{l2_bytes / scale:g} {unit} L2"
                break
    l1 = f"{l1d_ways}-way L1d" if l1d_ways > 0 else "L1d ways not reported"
    return f"{l2}, {l1} per core"
