"""The `pgm` command line: prepare, train, consolidate, distill, sample, eval, fid-classifier,
report, convert, push, serve, harness, bench. Each command's module registers its flags beside its
handler; this module only parses and dispatches.

Mistakes in what the user asked for (an unknown preset or setting, a wrong value, missing data,
a directory that is not a run, a damaged checkpoint: a `pgm.PGMError`) end with one sentence on
stderr and exit code 2 (PGM_DEBUG=1 shows their traceback too). Any other exception is a bug and
ends as Python ends it, with its traceback and exit code 1.
"""

from __future__ import annotations

import argparse
import os
import sys

from .. import __version__
from ..allocator import keep_freed_memory
from ..errors import PGMError
from . import bench, convert, evaluate, harness, push, report, sample, serve, train

COMMANDS = (train, sample, evaluate, report, convert, push, serve, harness, bench)  # in the order of `pgm --help`


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pgm", description="Partition Generative Models and their baselines.")
    parser.add_argument("--version", action="version", version=f"partition-gm {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.register(commands)
    return parser


def parse_arguments(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """`parser.parse_args`, except that a key=value after an option (pgm distill TEACHER --out RUN
    key=value), which argparse leaves over once the positionals are taken, is a setting too."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(item.startswith("-") or "=" not in item for item in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_arguments(parser, argv)
    if args.command is None:
        parser.print_help()
        return 0
    keep_freed_memory()
    try:
        return args.handler(args)
    except PGMError as error:
        if os.environ.get("PGM_DEBUG"):
            raise
        message = str(error).strip() or type(error).__name__
        print(f"pgm {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pgm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
