"""The tasks of tests/test_redis_processes.py, for worker subprocesses.

A worker runs ``python -m marionette worker redis_tasks:tm`` with its configuration
in the environment (`Config.from_env`); the test talks to the tasks through Redis
directly (``MARIONETTE_TEST_REDIS``, not through a proxy a test may cut): a task
says it started by pushing to a list, and waits for its release on another.
"""

from __future__ import annotations

import logging
import os
import signal
import time

import redis

from marionette import Config, Context, TaskManager

# The `worker` command's manager logs "task manager started" at INFO: tests wait for it.
logging.basicConfig(level=logging.INFO, format="%(message)s")

tm = TaskManager(Config.from_env())
_client = redis.Redis.from_url(os.environ["MARIONETTE_TEST_REDIS"])


@tm.task(name="pid")
def pid(ctx: Context) -> int:
    """The id of the process that runs it."""
    return os.getpid()


@tm.task(name="hold")
def hold(ctx: Context, key: str) -> int:
    """Say it started (push this process's pid to ``key:started``), wait for a push to
    ``key:release:PID``, then return the pid."""
    _client.rpush(f"{key}:started", os.getpid())
    _client.blpop([f"{key}:release:{os.getpid()}"], timeout=60)
    return os.getpid()


@tm.task(name="suicide")
def suicide(ctx: Context, key: str) -> None:
    """Say it started, then kill its own process (SIGKILL): every attempt is lost."""
    _client.rpush(f"{key}:started", os.getpid())
    os.kill(os.getpid(), signal.SIGKILL)


@tm.task(name="stamp", retries=20, backoff=0.2)
def stamp(ctx: Context, key: str) -> float:
    """Push the wall time it ran at to ``key`` and return it (retried while the test
    keeps Redis down: the task's own client fails then too)."""
    now = time.time()
    _client.rpush(key, now)
    return now


@tm.task(name="span")
def span(ctx: Context, key: str, seconds: float) -> int:
    """Push "task_id start end" (wall times) to ``key`` around a wait of `seconds`."""
    start = time.time()
    ctx.wait(seconds)
    _client.rpush(key, f"{ctx.task_id} {start} {time.time()}")
    return os.getpid()
