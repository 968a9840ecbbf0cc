"""The benchmark's tasks on marionette's Redis backend (API.md, part three).

Workers: ``python -m marionette worker redis_tasks.marionette_tasks:tm --workers 4``.
Producers import this module with ``BENCH_ROLE=producer`` and get a submit-only
manager (``workers=0``), the one manager of their process. The backend and namespace
are passed explicitly: the worker command is not promised to read the environment.
"""

from __future__ import annotations

import redis_tasks as bodies
from marionette import Context, TaskManager

NAMESPACE = "mbench"

tm = TaskManager(
    backend=bodies.redis_url(),
    namespace=NAMESPACE,
    workers=0 if bodies.is_producer() else 4,
)


@tm.task(name="noop")
def noop(ctx: Context) -> None:
    bodies.noop()


@tm.task(name="tick")
def tick(ctx: Context) -> None:
    bodies.tick()


@tm.task(name="record")
def record(ctx: Context, due: float) -> None:
    bodies.record(due)


@tm.task(name="block")
def block(ctx: Context) -> None:
    bodies.block()
