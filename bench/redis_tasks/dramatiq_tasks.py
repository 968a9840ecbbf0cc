"""The benchmark's tasks on Dramatiq: ``dramatiq redis_tasks.dramatiq_tasks``."""

from __future__ import annotations

import dramatiq
from dramatiq.brokers.redis import RedisBroker

import redis_tasks as bodies

# Dramatiq's defaults: the default middleware (retries, a 10-minute time limit, ...),
# a 60 s heartbeat timeout, queue maintenance on 0.1 % of broker commands.
broker = RedisBroker(url=bodies.redis_url())
dramatiq.set_broker(broker)

noop = dramatiq.actor(bodies.noop, actor_name="noop", broker=broker)
tick = dramatiq.actor(bodies.tick, actor_name="tick", broker=broker)
record = dramatiq.actor(bodies.record, actor_name="record", broker=broker)
block = dramatiq.actor(bodies.block, actor_name="block", broker=broker)
