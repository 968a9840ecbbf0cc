"""The reactive benchmark's tasks on Celery: ``celery -A redis_reactive_tasks.celery_tasks
worker -B``.

``BENCH_PERIODICS`` beat entries ``p{i}`` run ``beat(i)`` every second with
``schedule(1.0, relative=True)``: Celery's documented way to put an interval on a
grid (the due time is rounded down to whole seconds; with the default
``relative=False`` each due time is the previous send + 1 s and drifts).
"""

from __future__ import annotations

from celery import Celery
from celery.schedules import schedule

import redis_reactive_tasks as bodies

# As in redis_tasks.celery_tasks: Celery's defaults, no result backend.
app = Celery("bench-reactive", broker=bodies.redis_url())
app.conf.broker_connection_retry_on_startup = True

beat = app.task(name="beat")(bodies.beat)
span = app.task(name="span")(bodies.span)
tick = app.task(name="tick")(bodies.tick)

app.conf.beat_schedule = {
    f"p{i}": {"task": "beat", "schedule": schedule(1.0, relative=True), "args": (i,)}
    for i in range(bodies.periodic_count())
}
