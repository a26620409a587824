"""The ``repghost`` command line: the only place that parses arguments or prints.

Each module here adds its subcommands with ``add_parsers(sub)`` and sets ``run`` on them.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

from ..checkpoint import CheckpointError
from ..deploy.export import MissingRuntimeError
from . import ablation, core, demo, deploy, detection, training

COMMAND_GROUPS = [core, training, deploy, demo, ablation, detection]
# Errors a user can fix: printed as one line, exit status 2.
USER_ERRORS = (
    CheckpointError,
    ValueError,
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    MissingRuntimeError,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="repghost",
        description="RepGhostNet: models, re-parameterization, checkpoints, training, export, benchmarks.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in COMMAND_GROUPS:
        group.add_parsers(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(list(argv) if argv is not None else None)
    # Our own messages at INFO (DEBUG with -v); other libraries' only from WARNING up.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("repghost").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        return int(args.run(args) or 0)
    except USER_ERRORS as exc:
        command = " ".join(filter(None, [args.command, getattr(args, "detect_command", None)]))
        print(f"repghost {command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"repghost {args.command}: interrupted", file=sys.stderr)
        return 130
