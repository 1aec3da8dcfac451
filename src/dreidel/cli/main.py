"""Entry point of the `dreidel` console script. Each sub-command lives in its own module."""

from __future__ import annotations

import argparse
import logging
import sys

from dreidel.cli import demo, info, transcribe

# Each module exposes `register(subparsers)`, which adds its parser and sets `func`.
COMMANDS = (info, demo, transcribe)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dreidel",
        description="Fast deep learning on CPUs: spectral (Walsh-Hadamard) and hashed layers.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log diagnostics to stderr")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
