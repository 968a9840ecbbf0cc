"""The benchmark's tasks on Celery: ``celery -A redis_tasks.celery_tasks worker``."""

from __future__ import annotations

from celery import Celery

import redis_tasks as bodies

# Celery's defaults but for the retry-on-startup warning: no result backend (results
# are not stored), task_acks_late=False (a message is acknowledged when a worker
# starts it), the Redis transport's 1 h visibility timeout, prefetch multiplier 4.
app = Celery("bench", broker=bodies.redis_url())
app.conf.broker_connection_retry_on_startup = True

noop = app.task(name="noop")(bodies.noop)
tick = app.task(name="tick")(bodies.tick)
record = app.task(name="record")(bodies.record)
block = app.task(name="block")(bodies.block)
