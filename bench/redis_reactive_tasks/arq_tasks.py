"""The reactive benchmark's tasks on arq: ``arq redis_reactive_tasks.arq_tasks.WorkerSettings``.

``BENCH_PERIODICS`` cron jobs ``p{i}`` run ``beat(i)`` every second:
``cron(..., second=set(range(60)))``, arq's other defaults (``microsecond=123_456``:
at 0.123456 s past each second; ``unique=True``: the job id names the time, so
workers enqueueing the same occurrence make one job).
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar

from arq import cron
from arq.connections import RedisSettings
from arq.cron import CronJob

import redis_reactive_tasks as bodies

EVERY_SECOND = set(range(60))


class WorkerSettings:
    """As ``redis_tasks.arq_tasks.WorkerSettings``: arq's defaults, ``max_jobs=4``."""

    functions: ClassVar[list[Any]] = []
    cron_jobs: ClassVar[list[CronJob]] = [
        cron(functools.partial(bodies.arq_beat, i=i), name=f"p{i}", second=EVERY_SECOND)
        for i in range(bodies.periodic_count())
    ]
    redis_settings = RedisSettings.from_dsn(bodies.redis_url())
    max_jobs = 4


LOGGING: dict[str, Any] = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"stderr": {"level": "WARNING", "class": "logging.StreamHandler"}},
    "loggers": {"arq": {"handlers": ["stderr"], "level": "WARNING"}},
}
