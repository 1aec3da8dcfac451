"""`dreidel info`: versions, the ISA the native core dispatched to, the L2 size it plans by, threads."""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("info", help="show versions, SIMD dispatch and threads")
    parser.add_argument("--json", action="store_true", help="print as JSON")
    parser.set_defaults(func=run, parser=parser)


def run(args: argparse.Namespace) -> int:
    from dreidel._native import available_isas
    from dreidel._system import system_info

    info = system_info().as_dict()
    info["available_isas"] = list(available_isas())  # a JSON list; one line of text below
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(len(k) for k in info)
        for key, value in info.items():
            print(f"{key.ljust(width)}  {', '.join(value) if isinstance(value, list) else value}")
    return 0
