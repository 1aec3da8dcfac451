"""Spectral linear layers vs nn.Linear: forward and forward+backward time, crossover width, memory per layer.

Claim (issue 4): LinearWHT at width 4096, batch 64, forward+backward is at least 20x faster than nn.Linear;
the crossover width (smallest width where LinearWHT is faster) is at most 256; memory per layer is O(N).
Square layers, float32, CPU, median of at least 5 repeats in every case. nn.Linear at width 16384
is skipped: its weight and gradient alone take 2 GiB and one forward+backward at batch 256 is ~400 GFLOP.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import markdown_table, write_section  # noqa: E402

from dreidel._system import system_info  # noqa: E402
from dreidel._timing import median_seconds  # noqa: E402
from dreidel.layers import DeepSpectralLinear, LinearWHT  # noqa: E402

WIDTHS = [256, 512, 1024, 2048, 4096, 8192, 16384]
BATCHES = [1, 32, 256]
THREADS = [1, 2]
DENSE_MAX_WIDTH = 8192
CROSSOVER_WIDTHS = [32, 64, 128, 256, 512, 1024]
BAR_WIDTH, BAR_BATCH = 4096, 64
# (repeats, warm-up calls, least seconds a repeat) per case. Every case is a median of at least 5 repeats, so
# that no ratio rests on one timing (the widest cases had one); cases above BIG_DENSE_FLOPS get fewer, since
# nn.Linear's forward+backward there takes up to 0.7 s a call (width 8192, batch 256; 2.3 s on a busy EPYC).
SMALL_CASE = (7, 2, 0.005)
BIG_CASE = (5, 1, 0.0)
BIG_DENSE_FLOPS = 2e9


def build(kind: str, width: int) -> nn.Module:
    gen = torch.Generator().manual_seed(0)
    if kind == "dense":
        return nn.Linear(width, width)
    if kind == "wht":
        return LinearWHT(width, width, generator=gen)
    return DeepSpectralLinear(width, width, depth=int(kind[-1]), generator=gen)


def make_step(layer: nn.Module, batch: int, width: int, backward: bool) -> Callable[[], None]:
    """One forward (no_grad) or forward+backward call; gradients are reset to None first, as
    ``optimizer.zero_grad()`` does in a training loop (so dense layers pay for a fresh weight gradient)."""
    x = torch.randn(batch, width, requires_grad=backward)
    if not backward:

        def forward() -> None:
            with torch.no_grad():
                layer(x)

        return forward
    grad = torch.randn(batch, width)

    def forward_backward() -> None:
        layer.zero_grad(set_to_none=True)
        x.grad = None
        layer(x).backward(grad)

    return forward_backward


def time_kinds(layers: dict[str, nn.Module], batch: int, width: int, backward: bool,
               dense_flops: float) -> dict[str, tuple[float, float]]:
    """(median, min) seconds per call for each layer. Repeats are interleaved across the layers so that load
    from other processes on a shared machine hits all of them alike; fewer repeats for the big cases."""
    repeats, warmup, min_seconds = SMALL_CASE if dense_flops <= BIG_DENSE_FLOPS else BIG_CASE
    steps = {kind: make_step(layer, batch, width, backward) for kind, layer in layers.items()}
    samples: dict[str, list[float]] = {kind: [] for kind in layers}
    for _ in range(warmup):
        for step in steps.values():
            step()
    for _ in range(repeats):
        for kind, step in steps.items():
            samples[kind].append(median_seconds(step, repeats=1, warmup=0, min_seconds=min_seconds))
    return {kind: (statistics.median(values), min(values)) for kind, values in samples.items()}


def layer_memory(layer: nn.Module) -> tuple[int, int, int]:
    """(parameters, parameter bytes, buffer bytes) of a layer."""
    params = sum(p.numel() for p in layer.parameters())
    param_bytes = sum(p.numel() * p.element_size() for p in layer.parameters())
    buffer_bytes = sum(b.numel() * b.element_size() for b in layer.buffers())
    return params, param_bytes, buffer_bytes


def fmt_ms(seconds: float | None) -> str:
    return "skipped" if seconds is None else f"{seconds * 1e3:.3g}"


def main() -> None:
    start = time.perf_counter()
    kinds = ["dense", "wht", "deep2", "deep4"]
    rows, bar_rows, crossover_rows = [], [], []
    for threads in THREADS:
        torch.set_num_threads(threads)
        for width in WIDTHS:
            layers = {kind: build(kind, width) for kind in kinds if kind != "dense" or width <= DENSE_MAX_WIDTH}
            for batch in BATCHES:
                times: dict[tuple[str, bool], float | None] = {}
                for backward in (False, True):
                    measured = time_kinds(layers, batch, width, backward, 2.0 * batch * width * width)
                    for kind in kinds:
                        times[kind, backward] = measured[kind][0] if kind in layers else None
                dense_fb, wht_fb = times["dense", True], times["wht", True]
                speedup = f"{dense_fb / wht_fb:.1f}x" if dense_fb is not None else "-"
                rows.append([threads, width, batch] + [fmt_ms(times[k, False]) for k in kinds]
                            + [fmt_ms(times[k, True]) for k in kinds] + [speedup])
                print(rows[-1], flush=True)
            del layers
        # the bar: width 4096, batch 64, forward+backward
        bar = time_kinds({kind: build(kind, BAR_WIDTH) for kind in kinds}, BAR_BATCH, BAR_WIDTH, True, 2e9)
        bar_rows.append([threads] + [fmt_ms(bar[k][0]) for k in kinds]
                        + [f"{bar['dense'][0] / bar[k][0]:.1f}x" for k in kinds[1:]]
                        + [f"{bar['dense'][1] / bar['wht'][1]:.1f}x"])
        # crossover at the bar's batch size, forward+backward and forward
        for backward in (True, False):
            crossover = None
            for width in CROSSOVER_WIDTHS:
                pair = time_kinds({"dense": build("dense", width), "wht": build("wht", width)}, BAR_BATCH, width,
                                  backward, 0.0)
                if pair["wht"][0] < pair["dense"][0]:
                    crossover = f"{width} (dense {fmt_ms(pair['dense'][0])} ms, wht {fmt_ms(pair['wht'][0])} ms)"
                    break
            crossover_rows.append([threads, BAR_BATCH, "forward+backward" if backward else "forward",
                                   crossover if crossover is not None else f"> {CROSSOVER_WIDTHS[-1]}"])
    memory_rows = []
    for width in (256, 4096, 16384):
        for kind in kinds:
            if kind == "dense" and width > DENSE_MAX_WIDTH:
                params = width * width + width
                memory_rows.append([width, kind, params, f"{params * 4 / 2**20:.3g}", "0 (not built)"])
                continue
            params, param_bytes, buffer_bytes = layer_memory(build(kind, width))
            memory_rows.append([width, kind, params, f"{param_bytes / 2**20:.3g}", f"{buffer_bytes / 2**20:.3g}"])

    info = system_info()
    elapsed = time.perf_counter() - start
    markdown = "\n\n".join([
        "## Spectral linear layers vs nn.Linear (`benchmarks/spectral_linear.py`)",
        f"CPU: {info.cpu}, {info.cores} cores visible; torch {info.torch}; float32; square layers; "
        f"threads = torch.set_num_threads. Times in ms: median of repeats interleaved across the layers "
        f"({SMALL_CASE[0]} repeats; {BIG_CASE[0]} for every layer of a case where nn.Linear's forward is above "
        f"{BIG_DENSE_FLOPS / 1e9:g} GFLOP); gradients are reset to None before each "
        f"forward+backward, as in a training step. wht = LinearWHT, deepK = DeepSpectralLinear(depth=K). "
        f"nn.Linear at 16384 skipped (2 GiB for weight + gradient, ~400 GFLOP per forward+backward at batch 256). "
        f"The machine ({info.cores} cores) was shared with other jobs while this ran, so absolute times are noisy "
        f"(2-thread runs most of all: OpenMP threads wait on descheduled peers); ratios come from interleaved "
        f"repeats in one process. Run time {elapsed:.0f} s.",
        "### The bar: width 4096, batch 64, forward+backward (target: LinearWHT >= 20x faster than nn.Linear)",
        markdown_table(["threads", "dense ms", "wht ms", "deep2 ms", "deep4 ms", "dense/wht", "dense/deep2",
                        "dense/deep4", "dense/wht (fastest repeats)"], bar_rows),
        "### Crossover: smallest width where LinearWHT is faster than nn.Linear (target: <= 256)",
        markdown_table(["threads", "batch", "pass", "crossover width"], crossover_rows),
        "### Memory per layer (O(N) for the spectral layers; buffers are the int64 permutation (saved) and its "
        "derived int32 gather indices (rebuilt on load))",
        markdown_table(["width", "layer", "parameters", "parameter MiB", "buffer MiB"], memory_rows),
        "### All widths and batches (ms)",
        markdown_table(["threads", "width", "batch"] + [f"{k} fwd" for k in kinds] + [f"{k} f+b" for k in kinds]
                       + ["dense/wht f+b"], rows),
    ])
    write_section("spectral_linear", markdown)


if __name__ == "__main__":
    main()
