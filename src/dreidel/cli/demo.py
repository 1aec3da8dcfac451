"""`dreidel demo`: a short tour of what dreidel does, on data and weights that ship with the packages.

Each step is a function that prints one small table; the tour grows with the library.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from dreidel._extras import require_extras
from dreidel.cli._args import seed
from dreidel.cli._table import counted, format_table
from dreidel.cli.demo_mnist import mnist_step
from dreidel.cli.demo_whisper import whisper_step


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo",
                                   help="run the tour: FWHT, spectral MNIST MLP, Whisper (about 10 s on 2 cores)")
    parser.add_argument("--seed", type=seed, default=0,
                        help="seed of the random inputs, the MNIST split and training, and the sentences (default: 0)")
    parser.set_defaults(func=run, parser=parser)


def transform_step(seed: int) -> None:
    """The FWHT: exact against the dense Hadamard matrix, and its speed against a plain PyTorch butterfly."""
    import dreidel as dr
    from dreidel._timing import median_seconds

    generator = torch.Generator().manual_seed(seed)
    print(f"The Walsh-Hadamard transform (native core: {dr.best_isa()}, {counted(torch.get_num_threads(), 'thread')})")
    rows = []
    for length in (8, 384, 1024, 1536, 4096):
        x = torch.randn(16, length, dtype=torch.float64, generator=generator)
        dense = x @ dr.hadamard_matrix(length).T / math.sqrt(length)
        err64 = (dr.fwht(x) - dense).abs().max().item()
        err32 = (dr.fwht(x.float()).double() - dense).abs().max().item()
        rows.append((length, err64, err32))
    print(format_table(["length", "max |fwht - H x| fp64", "fp32"], rows))
    print()
    rows = []
    for batch, length in ((4096, 1024), (1024, 4096), (3072, 384)):
        x = torch.randn(batch, length, generator=generator)
        t_native = median_seconds(lambda: dr.fwht(x), repeats=5)
        t_torch = median_seconds(lambda: dr.fwht_reference(x), repeats=3)
        hadamard = dr.hadamard_matrix(length, torch.float32)  # built once: only the product is timed
        t_dense = median_seconds(lambda: x @ hadamard, repeats=3)
        rows.append((f"{batch} x {length}", t_native * 1e3, t_torch / t_native, t_dense / t_native))
    print(format_table(["rows x length", "dreidel ms", "x vs PyTorch butterfly", "x vs dense matmul"], rows))


STEPS = (transform_step, mnist_step, whisper_step)


def run(args: argparse.Namespace) -> int:
    try:
        require_extras("dreidel demo", "data", "whisper")  # MNIST-5k, and Whisper's weights, tokenizer and speech
    except ModuleNotFoundError as error:
        raise SystemExit(f"dreidel demo: error: {error}") from None
    start = time.perf_counter()
    for number, step in enumerate(STEPS, start=1):
        if number > 1:
            print()
        print(f"{number}. ", end="")  # each step prints its own heading on this line
        step(args.seed)
    print(f"\ndemo finished in {time.perf_counter() - start:.1f} s")
    return 0
