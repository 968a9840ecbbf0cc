"""A producer process of the reactive benchmark:
``python -m redis_reactive_tasks.producer SYSTEM ACTION``.

Reads the action's keyword arguments as one JSON object on stdin and prints one JSON
line: the action's result, or ``{"error": "..."}`` with exit status 1; leaves with
`os._exit`, as ``bench/redis_child.py`` does. Systems and actions:

- ``marionette probe {n, interval}``: `n` ticks, one every `interval` s (readiness);
- ``marionette define {n, interval, base, spread}``: `n` periodics ``p{i}`` running
  ``beat(i)`` every `interval` s, the first run of ``p{i}`` at ``base + i * interval
  / n`` (``spread``) or at `base` (epoch seconds), defined with ``tm.every(...,
  key=f"p{i}")``; then the manager stops (the periodics live in Redis, fired by the
  worker processes). Timed.
- ``marionette spans {grouped, ungrouped, hold, group}`` and ``dramatiq spans {...}``:
  `grouped` tasks ``span("g", hold)`` in the group (marionette: ``group=``; Dramatiq:
  the ``limited`` actor) interleaved with `ungrouped` tasks ``span("u", hold)``;
- ``dramatiq probe {n, interval}``.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

Result = dict[str, Any]


def _interleaved(grouped: int, ungrouped: int) -> list[bool]:
    """Which submissions are grouped: the two kinds alternating as long as both last."""
    order: list[bool] = []
    g = u = 0
    while g < grouped or u < ungrouped:
        if g < grouped:
            order.append(True)
            g += 1
        if u < ungrouped:
            order.append(False)
            u += 1
    return order


def marionette(action: str, kwargs: dict[str, Any]) -> Result:
    from redis_reactive_tasks import marionette_tasks as m

    m.tm.start()
    try:
        if action == "probe":
            for k in range(kwargs["n"]):
                if k:
                    time.sleep(kwargs["interval"])
                m.tick.queue()
            return {"ok": True}
        if action == "define":
            n, interval, base = kwargs["n"], kwargs["interval"], kwargs["base"]
            began = time.perf_counter()
            for i in range(n):
                offset = i * interval / n if kwargs["spread"] else 0.0
                start = datetime.fromtimestamp(base + offset, UTC)
                m.tm.every(interval, m.beat.bind(i), start=start, key=f"p{i}")
            return {"seconds": time.perf_counter() - began, "finished": time.time()}
        if action == "spans":
            grouped = m.span.options(group=kwargs["group"])
            hold = kwargs["hold"]
            began = time.perf_counter()
            for in_group in _interleaved(kwargs["grouped"], kwargs["ungrouped"]):
                if in_group:
                    grouped.queue("g", hold)
                else:
                    m.span.queue("u", hold)
            return {"seconds": time.perf_counter() - began}
        raise ValueError(f"unknown action {action!r}")
    finally:
        m.tm.stop()


def dramatiq(action: str, kwargs: dict[str, Any]) -> Result:
    from redis_reactive_tasks import dramatiq_tasks as d

    try:
        if action == "probe":
            for k in range(kwargs["n"]):
                if k:
                    time.sleep(kwargs["interval"])
                d.tick.send()
            return {"ok": True}
        if action == "spans":
            hold = kwargs["hold"]
            began = time.perf_counter()
            for in_group in _interleaved(kwargs["grouped"], kwargs["ungrouped"]):
                (d.limited if in_group else d.span).send("g" if in_group else "u", hold)
            return {"seconds": time.perf_counter() - began}
        raise ValueError(f"unknown action {action!r}")
    finally:
        d.broker.close()


SYSTEMS: dict[str, Callable[[str, dict[str, Any]], Result]] = {
    "marionette": marionette,
    "dramatiq": dramatiq,
}


def main(argv: list[str]) -> None:
    system, action = argv[1], argv[2]
    kwargs = json.loads(sys.stdin.read() or "{}")
    try:
        result = SYSTEMS[system](action, kwargs)
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
