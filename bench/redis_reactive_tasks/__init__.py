"""The tasks of the Redis reactive benchmark (``bench/redis_reactive.py``).

As in ``redis_tasks`` (whose helpers this package reuses): the bodies once here, and
one small module per system registering them the way its documentation does. Worker,
scheduler and producer processes import these modules, never the harness. Besides
``BENCH_REDIS_URL`` and ``BENCH_ROLE`` they read:

- ``BENCH_PERIODICS``: how many periodic tasks a peer's module defines at import
  (its workers', beat's or cron process's schedule); 0 or unset: none. marionette's
  periodics are defined by a producer process instead (``producer.py``).

Every body leaves its trace with one ``RPUSH``, the same round trip for every system:

- ``beat(i, tag)``: ``"i pid time tag"`` to ``BEATS``: one run of periodic number `i`;
  ``tag`` names the job where the system gives it (marionette's task id, arq's job
  id), ``-`` elsewhere;
- ``span(kind, hold)``: ``"kind pid start end"`` to ``SPANS`` after holding its
  worker `hold` seconds (``kind`` is ``g`` for the limited group, ``u`` otherwise);
- ``REFUSED`` gets ``"pid time"`` each time Dramatiq's limiter refuses a task.
"""

from __future__ import annotations

import os
import time
from typing import Any

from redis_tasks import client, is_producer, redis_url, tick

__all__ = [
    "BEATS",
    "REFUSED",
    "SPANS",
    "arq_beat",
    "beat",
    "client",
    "is_producer",
    "periodic_count",
    "redis_url",
    "span",
    "tick",
]

BEATS = "harness:beats"
SPANS = "harness:spans"
REFUSED = "harness:refused"


def periodic_count() -> int:
    """``BENCH_PERIODICS``: the periodic tasks a peer's module defines at import."""
    return int(os.environ.get("BENCH_PERIODICS") or 0)


def beat(i: int, tag: str = "-") -> None:
    """One run of periodic `i`: where and when it started, and which job it was."""
    client().rpush(BEATS, f"{i} {os.getpid()} {time.time()!r} {tag}")


def span(kind: str, hold: float) -> None:
    """Holds its worker `hold` seconds (0: a no-op), then records when it started
    and ended."""
    start = time.time()
    if hold > 0:
        time.sleep(hold)
    end = time.time()
    client().rpush(SPANS, f"{kind} {os.getpid()} {start!r} {end!r}")


async def arq_beat(ctx: dict[str, Any], i: int) -> None:
    """`beat` for arq, on arq's own connection (bound to `i` by `functools.partial`),
    tagged with the job id (``p{i}:{due ms}`` for a cron job)."""
    await ctx["redis"].rpush(BEATS, f"{i} {os.getpid()} {time.time()!r} {ctx['job_id']}")
