"""``python -m marionette``: the command line. Its one command, ``demo``, runs the demo."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence

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
        help="run a short demo service that queues, delays, schedules and retries tasks",
        description=(demo.__doc__ or "").split("\n\n")[0],
    )
    demo_parser.add_argument(
        "--duration",
        type=_seconds,
        default=demo.DEFAULT_DURATION,
        metavar="SECONDS",
        help=f"how long the demo runs (default: {demo.DEFAULT_DURATION:g})",
    )
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    return demo.run(args.duration)


if __name__ == "__main__":
    sys.exit(main())
