"""The reactive benchmark's periodic jobs on RQ: ``rq cron redis_reactive_tasks.rq_cron``.

RQ's cron scheduler (``rq cron``, RQ >= 2.5) runs as its own process beside the
workers. ``BENCH_PERIODICS`` jobs ``p{i}`` run ``beat(i)`` on the cron expression
``* * * * * *``: croniter's six-field form, every second on whole seconds (RQ's
``interval=1`` would instead plan each run 1 s after the previous enqueue and drift).
"""

from __future__ import annotations

from rq import cron

import redis_reactive_tasks as bodies

for i in range(bodies.periodic_count()):
    cron.register(bodies.beat, "default", args=(i,), cron="* * * * * *", name=f"p{i}")
