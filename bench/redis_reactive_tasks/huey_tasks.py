"""The reactive benchmark's tasks on Huey: ``huey_consumer
redis_reactive_tasks.huey_tasks.huey``.

Huey's periodic tasks are crontabs, checked by each consumer's scheduler once every
60 s: its shortest period is a minute. With ``BENCH_PERIODICS`` >= 1 this module
defines ``p0``, ``beat(0)`` on ``crontab()`` (every minute); more are not defined
(the 1-second benchmarks report that Huey cannot run them).
"""

from __future__ import annotations

from huey import RedisHuey, crontab

import redis_reactive_tasks as bodies

huey = RedisHuey("bench-reactive", url=bodies.redis_url())

tick = huey.task(name="tick")(bodies.tick)
span = huey.task(name="span")(bodies.span)

if bodies.periodic_count() >= 1:

    @huey.periodic_task(crontab(), name="p0")
    def p0() -> None:
        bodies.beat(0)
