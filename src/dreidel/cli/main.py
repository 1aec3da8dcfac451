"""Entry point of the `dreidel` console script. Each sub-command lives in its own module."""

from __future__ import annotations

import argparse
import codecs
import io
import logging
import os
import sys
import warnings
from typing import Callable

from dreidel import __version__
from dreidel.cli import demo, info, transcribe

# Each module exposes `register(subparsers)`, which adds its parser and sets `func`.
COMMANDS = (info, demo, transcribe)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dreidel",
        description="Fast deep learning on CPUs: spectral (Walsh-Hadamard) layers and structure-aware optimizers.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log diagnostics to stderr")
    parser.add_argument("--version", action="version", version=f"dreidel {__version__}")
    # Not required here: main reports an unknown option before a missing command (see main).
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # `dreidel --bogus` used to answer that COMMAND is required: the unknown option is named first.
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # with the command's usage where it has a parser of its own
        getattr(args, "parser", parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command is None:
        parser.error("the following arguments are required: COMMAND")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    restore = _tolerate_undecodable_names()
    try:
        with warnings.catch_warnings():  # a warning is one line naming the command, not a library source line
            warnings.showwarning = _one_line_warning(args.command)
            status = int(args.func(args) or 0)
        sys.stdout.flush()
    except BrokenPipeError:  # the reader left (`dreidel info | head -1`): stop quietly, as cat and grep do
        _discard_stdout()
        return 128 + 13  # killed by SIGPIPE, in the shell's convention
    except OSError as error:  # an output that cannot be written (`dreidel info > /dev/full`): one line, no traceback
        _discard_stdout()
        print(f"dreidel {args.command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: one line, and the shell's status for SIGINT
        print(f"\ndreidel {args.command}: interrupted", file=sys.stderr)
        return 128 + 2
    finally:
        restore()
    return status


def _one_line_warning(command: str):
    """A ``warnings.showwarning`` that prints ``dreidel COMMAND: warning: message`` to stderr."""
    def show(message, category, filename, lineno, file=None, line=None) -> None:
        print(f"dreidel {command}: warning: {message}", file=sys.stderr if file is None else file)
    return show


def _tolerate_undecodable_names() -> Callable[[], None]:
    """File names need not be valid in the locale's encoding: Python holds their odd bytes as lone surrogates,
    which printing refused (`dreidel transcribe` decoded every file, then failed at the first such name before
    writing its outputs). A UTF-8 stream writes them back as the bytes they were; another escapes them. Returns
    what puts the streams back (``main`` may run in a process that goes on)."""
    before = []
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            before.append((stream, stream.errors))
            utf8 = codecs.lookup(stream.encoding).name == "utf-8"
            stream.reconfigure(errors="surrogateescape" if utf8 else "backslashreplace")

    def restore() -> None:
        for stream, errors in before:
            if not stream.closed:
                stream.reconfigure(errors=errors)
    return restore


def _discard_stdout() -> None:
    """Point stdout at the null device, so that the flush at exit cannot fail again."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


if __name__ == "__main__":
    sys.exit(main())
