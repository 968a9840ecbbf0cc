"""The reactive benchmark's tasks on marionette's Redis backend.

Workers: ``python -m marionette worker redis_reactive_tasks.marionette_tasks:tm
--workers 4``, configured as the README shows, by ``MARIONETTE_BACKEND``,
``MARIONETTE_NAMESPACE`` and (for the groups benchmark) ``MARIONETTE_LIMITS``. A
producer process (``BENCH_ROLE=producer``) gets a submit-only manager (``workers=0``).
"""

from __future__ import annotations

import redis_reactive_tasks as bodies
from marionette import Config, Context, TaskManager

tm = TaskManager(Config.from_env(), **({"workers": 0} if bodies.is_producer() else {}))


@tm.task(name="beat")
def beat(ctx: Context, i: int) -> None:
    bodies.beat(i, str(ctx.task_id))


@tm.task(name="span")
def span(ctx: Context, kind: str, hold: float) -> None:
    bodies.span(kind, hold)


@tm.task(name="tick")
def tick(ctx: Context) -> None:
    bodies.tick()
