"""``python -m marionette``: the command line. Its one command, ``demo``, runs the demo."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from . import demo

__all__ = ["main"]


def _seconds(text: str) -> float:
    """A positive, finite number of seconds (argparse turns the ValueError into usage)."""
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(text)
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Parse `argv` (default: ``sys.argv[1:]``) and run the command; return the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m marionette",
        description="marionette: an in-process task manager.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo_parser = commands.add_parser(
        "demo",
        help="run an uptime monitor of a local HTTP service for a few seconds",
        description=(demo.__doc__ or "").split("\n\n")[0],
    )
    demo_parser.add_argument(
        "--duration",
        type=_seconds,
        default=demo.DEFAULT_DURATION,
        metavar="SECONDS",
        help=f"how long the demo runs (default: {demo.DEFAULT_DURATION:g})",
    )
    demo_parser.add_argument(
        "--db",
        type=Path,
        default=None,
        metavar="PATH",
        help="the SQLite file polls are written to (default: a temporary file)",
    )
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    return demo.run(args.duration, args.db)


if __name__ == "__main__":
    sys.exit(main())
