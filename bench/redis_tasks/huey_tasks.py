"""The benchmark's tasks on Huey: ``huey_consumer redis_tasks.huey_tasks.huey``."""

from __future__ import annotations

from huey import RedisHuey

import redis_tasks as bodies

# Huey's defaults: results kept for tasks that return something (these return None),
# a blocking BRPOP with a 1 s read timeout, a scheduler pass every second.
huey = RedisHuey("bench", url=bodies.redis_url())

noop = huey.task(name="noop")(bodies.noop)
tick = huey.task(name="tick")(bodies.tick)
record = huey.task(name="record")(bodies.record)
block = huey.task(name="block")(bodies.block)
