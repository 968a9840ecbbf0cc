"""The reactive benchmark's tasks on Dramatiq: ``dramatiq redis_reactive_tasks.dramatiq_tasks``.

Dramatiq has no concurrency limit across processes that queues tasks. Its closest
tool is a `ConcurrentRateLimiter` on a shared backend, taken inside the actor: at
most ``limit`` holders at once across the cluster; a task that finds it full raises
`RateLimitExceeded`, and the Retries middleware (its defaults: up to 20 retries,
backoff from 15 s, exponential) puts it back with a delay. ``limited`` does that
with the limit of ``BENCH_GROUP_LIMIT`` (4) under the key ``http``.
"""

from __future__ import annotations

import os
import time

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.rate_limits import ConcurrentRateLimiter, RateLimitExceeded
from dramatiq.rate_limits.backends import RedisBackend

import redis_reactive_tasks as bodies

broker = RedisBroker(url=bodies.redis_url())
dramatiq.set_broker(broker)
limiter = ConcurrentRateLimiter(
    RedisBackend(url=bodies.redis_url()),
    "http",
    limit=int(os.environ.get("BENCH_GROUP_LIMIT") or 4),
)


def _limited(kind: str, hold: float) -> None:
    try:
        with limiter.acquire():
            bodies.span(kind, hold)
    except RateLimitExceeded:
        bodies.client().rpush(bodies.REFUSED, f"{os.getpid()} {time.time()!r}")
        raise


limited = dramatiq.actor(_limited, actor_name="limited", broker=broker)
span = dramatiq.actor(bodies.span, actor_name="span", broker=broker)
tick = dramatiq.actor(bodies.tick, actor_name="tick", broker=broker)
