"""Entry point of the `dreidel` console script. Each sub-command lives in its own module."""

from __future__ import annotations

import argparse
import logging
import sys
import warnings

from dreidel import __version__
from dreidel.cli import demo, info, transcribe
from dreidel.cli._streams import discard_stdout, tolerate_undecodable_names

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
    restore = tolerate_undecodable_names()
    try:
        with warnings.catch_warnings():  # a warning is one line naming the command, not a library source line
            warnings.showwarning = _one_line_warning(args.command)
            status = int(args.func(args) or 0)
        sys.stdout.flush()
    except BrokenPipeError:  # the reader left (`dreidel info | head -1`): stop quietly, as cat and grep do
        discard_stdout()
        return 128 + 13  # killed by SIGPIPE, in the shell's convention
    except OSError as error:  # an output that cannot be written (`dreidel info > /dev/full`): one line, no traceback
        discard_stdout()
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


if __name__ == "__main__":
    sys.exit(main())
