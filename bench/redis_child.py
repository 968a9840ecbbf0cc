"""A producer process of the Redis benchmark: ``python bench/redis_child.py SYSTEM ACTION``.

Reads the action's keyword arguments as one JSON object on stdin (lists of due
times can be too long for a command line), opens the system's producer, runs the
action, and prints one JSON line: the action's result, or ``{"error": "..."}`` with
exit status 1. Leaves with `os._exit`, as ``bench/child.py`` does.

Actions:
- ``check``: opens the producer and counts the pending tasks (is the system usable?);
- ``enqueue {task, n}``: submits `n` runs of `task` from this one thread, timed;
- ``enqueue_delayed {offsets, lead}``: ``record(due)`` due at ``now + lead + offset``
  for each offset, ``now`` taken once the producer is open, timed;
- ``probe {n, interval}``: `n` runs of ``tick``, one every `interval` seconds;
- ``state``: how many tasks the system holds as pending and as failed.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

from redis_systems import SYSTEMS, TASKS, System

Result = dict[str, Any]


def check(system: System) -> Result:
    return {"pending": system.pending_count()}


def enqueue(system: System, task: str, n: int) -> Result:
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, not {task!r}")
    start = time.perf_counter()
    system.enqueue(task, n)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "pending": system.pending_count()}


def enqueue_delayed(system: System, offsets: list[float], lead: float) -> Result:
    base = time.time() + lead
    start = time.perf_counter()
    system.enqueue_delayed([base + offset for offset in offsets])
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "base": base}


def probe(system: System, n: int, interval: float) -> Result:
    for i in range(n):
        if i:
            time.sleep(interval)
        system.enqueue("tick", 1)
    return {"ok": True}


def state(system: System) -> Result:
    return {"pending": system.pending_count(), "failed": system.failed_count()}


ACTIONS: dict[str, Callable[..., Result]] = {
    "check": check,
    "enqueue": enqueue,
    "enqueue_delayed": enqueue_delayed,
    "probe": probe,
    "state": state,
}


def main(argv: list[str]) -> None:
    system, action = SYSTEMS[argv[1]], ACTIONS[argv[2]]
    kwargs = json.loads(sys.stdin.read() or "{}")
    try:
        system.open()
        try:
            result = action(system, **kwargs)
        finally:
            system.close()
    except Exception as e:
        traceback.print_exc()
        result, status = {"error": f"{type(e).__name__}: {e}"}, 1
    else:
        status = 0
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    main(sys.argv)
