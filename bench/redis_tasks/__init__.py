"""The tasks of the Redis benchmark, once for every system (``bench/redis_peers.py``).

This package holds the bodies, written once; each ``*_tasks`` module beside it
registers them with one system the way that system's own documentation does (a Huey
instance, a Celery app, a Dramatiq broker, an arq ``WorkerSettings``, a marionette
``TaskManager``). RQ needs no module: it runs these plain functions by import path.

Worker and producer processes import these modules, never the harness. They read:

- ``BENCH_REDIS_URL``: the benchmark's private redis-server;
- ``BENCH_ROLE``: ``producer`` in producer processes (marionette's submit-only
  manager), ``worker`` in workers.

Every body that leaves a trace does it with one ``RPUSH`` to a list the harness
reads, so that a task costs every system the same one round trip:

- ``tick()``: ``"pid ppid time"`` to ``TICKS`` (throughput, readiness probes);
- ``record(due)``: ``"due time"`` to ``RUNS`` (lateness);
- ``block()``: ``"pid ppid time"`` to ``BLOCKED``, then waits on ``RELEASE``
  (the SIGKILL benchmark).

The ppid is recorded because RQ's forking worker runs each job in a short-lived
child: the harness finds the worker that ran a task from either id.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any

import redis

__all__ = [
    "BLOCKED",
    "BLOCK_SECONDS",
    "RELEASE",
    "RUNS",
    "TICKS",
    "arq_block",
    "arq_noop",
    "arq_record",
    "arq_tick",
    "block",
    "client",
    "is_producer",
    "noop",
    "record",
    "redis_url",
    "tick",
]

# The harness's own keys; no system's keys start with "harness:".
TICKS = "harness:ticks"
RUNS = "harness:runs"
BLOCKED = "harness:blocked"
RELEASE = "harness:release"

# How long block() waits: longer than any benchmark watches, shorter than the
# time limits some systems apply by default (Dramatiq: 10 minutes).
BLOCK_SECONDS = 500


def redis_url() -> str:
    """The URL of the benchmark's redis-server (``BENCH_REDIS_URL``)."""
    return os.environ["BENCH_REDIS_URL"]


def is_producer() -> bool:
    """Whether this process submits (``BENCH_ROLE=producer``) rather than works."""
    return os.environ.get("BENCH_ROLE") == "producer"


@functools.cache
def client() -> redis.Redis:
    """This process's client for the harness keys (thread-safe; redis-py opens a
    new connection in a forked child by itself)."""
    return redis.Redis.from_url(redis_url())


def _stamp() -> str:
    return f"{os.getpid()} {os.getppid()} {time.time()!r}"


def noop() -> None:
    """Does nothing: the task of the submit, memory and idle benchmarks."""


def tick() -> None:
    """Records that a task ran, where and when."""
    client().rpush(TICKS, _stamp())


def record(due: float) -> None:
    """Records the wall time at which a task due at `due` (epoch seconds) ran."""
    client().rpush(RUNS, f"{due!r} {time.time()!r}")


def block() -> None:
    """Records that it started, then blocks on a Redis key (nobody pushes to it)."""
    r = client()
    r.rpush(BLOCKED, _stamp())
    r.blpop([RELEASE], timeout=BLOCK_SECONDS)


# arq runs coroutines that take its context first; they use arq's own connection.


async def arq_noop(ctx: dict[str, Any]) -> None:
    """`noop` for arq."""


async def arq_tick(ctx: dict[str, Any]) -> None:
    """`tick` for arq."""
    await ctx["redis"].rpush(TICKS, _stamp())


async def arq_record(ctx: dict[str, Any], due: float) -> None:
    """`record` for arq."""
    await ctx["redis"].rpush(RUNS, f"{due!r} {time.time()!r}")


async def arq_block(ctx: dict[str, Any]) -> None:
    """`block` for arq: waits without holding the event loop."""
    await ctx["redis"].rpush(BLOCKED, _stamp())
    await ctx["redis"].blpop([RELEASE], timeout=BLOCK_SECONDS)
