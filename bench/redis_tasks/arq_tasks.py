"""The benchmark's tasks on arq: ``arq redis_tasks.arq_tasks.WorkerSettings``."""

from __future__ import annotations

from typing import Any, ClassVar

from arq import func
from arq.connections import RedisSettings
from arq.worker import Function

import redis_tasks as bodies


class WorkerSettings:
    """arq's defaults (poll every 0.5 s, 300 s job timeout, results kept 1 h) but
    ``max_jobs=4``, the concurrency every other system gets (arq's default is 10)."""

    functions: ClassVar[list[Function]] = [
        func(bodies.arq_noop, name="noop"),
        func(bodies.arq_tick, name="tick"),
        func(bodies.arq_record, name="record"),
        func(bodies.arq_block, name="block"),
    ]
    redis_settings = RedisSettings.from_dsn(bodies.redis_url())
    max_jobs = 4


# ``arq --custom-log-dict``: warnings only. arq's default configuration logs two INFO
# lines per job, which the other workers are not asked to do either.
LOGGING: dict[str, Any] = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"stderr": {"level": "WARNING", "class": "logging.StreamHandler"}},
    "loggers": {"arq": {"handlers": ["stderr"], "level": "WARNING"}},
}
