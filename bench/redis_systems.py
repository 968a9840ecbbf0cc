"""The systems of the Redis benchmark (``bench/redis_peers.py``): one class each.

A system is described by the `System` protocol: its names, how its worker is started
(`worker_command`), and the producer side (`open`, `enqueue`, `enqueue_delayed`,
`pending_count`, `failed_count`, `close`), which only ever runs inside a producer
process (``bench/redis_child.py``). The harness imports this module but none of the
systems: every import of a task library happens in a method, in a child.

The tasks themselves live in the ``redis_tasks`` package: the bodies once, and one
small module per system registering them. Adding a system is one class here and,
unless it runs plain functions by import path as RQ does, one module there.

Every worker runs 4 tasks at once in one process, except RQ, which has no threads:
an RQ worker runs one job at a time (the forking `Worker` in a fresh child per job,
`SimpleWorker` in the worker process itself), and is measured with one process, as
the other systems are. Worker logging is set to warnings wherever the command line
allows it, so that no system formats a log line per task.
"""

from __future__ import annotations

import asyncio
import math
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

__all__ = ["SYSTEMS", "TASKS", "System"]

# The tasks every system registers (see redis_tasks); `record` is the delayed one.
TASKS = ("noop", "tick", "block")


class System(Protocol):
    """One task queue on Redis, as the benchmark drives it.

    The class attributes document the system in the report. The methods from
    `open` on run in a producer process only, in this order: `open`, any of the
    others, `close`.
    """

    name: str  # the name on the command line and in the JSON
    label: str  # the row of the tables
    peer: bool  # False for marionette: ratios are taken to the best peer
    # None: the system must run. Otherwise the line reported, with the reason, when
    # it cannot (the run goes on without it and does not fail).
    unavailable: str | None
    acknowledged: str  # when the system considers a task done with
    on_worker_death: str  # what its defaults do with a task whose worker died

    def worker_command(self, url: str) -> list[str]:
        """The command that starts one worker process (4 tasks at once, except RQ)
        on the Redis at `url` (also in the worker's ``BENCH_REDIS_URL``)."""
        ...

    def open(self) -> None:
        """Connects the producer (imports the system and its tasks)."""
        ...

    def enqueue(self, task: str, n: int) -> None:
        """Submits `n` runs of the task named `task` (one of `TASKS`), to run now."""
        ...

    def enqueue_delayed(self, dues: Sequence[float]) -> None:
        """Submits ``record(due)`` for each `due` (epoch seconds), to run at `due`,
        with the system's own delay feature."""
        ...

    def pending_count(self) -> int:
        """Tasks the system still holds and may run: waiting, delayed or claimed."""
        ...

    def failed_count(self) -> int:
        """Tasks it keeps as failed or dead, which it will not run by itself."""
        ...

    def close(self) -> None:
        """Disconnects the producer."""
        ...


def _python(*args: str) -> list[str]:
    return [sys.executable, *args]


def _url() -> str:
    """The Redis URL, in a producer process."""
    import redis_tasks

    return redis_tasks.redis_url()


def _seconds_until(due: float) -> float:
    return max(0.0, due - time.time())


def _ms_until(due: float) -> int:
    """Milliseconds until `due`, rounded up: a millisecond API is never asked for
    a time before `due`."""
    return math.ceil(_seconds_until(due) * 1000)


class RQ:
    """RQ 2, one worker process running one job at a time, with its scheduler."""

    peer = True
    unavailable = None
    acknowledged = (
        "the job's status and result are written and it leaves the StartedJobRegistry"
        " when the function returns (results kept 500 s by default)"
    )
    on_worker_death = (
        "the job stays in the StartedJobRegistry until its heartbeat expires (90 s);"
        " the next registry cleanup (every 10 minutes) moves it to the"
        " FailedJobRegistry (AbandonedJobError); it is re-run only if it has a Retry"
    )

    def __init__(self, name: str, label: str, worker_class: str) -> None:
        self.name = name
        self.label = label
        self.worker_class = worker_class
        self._queue: Any = None

    def worker_command(self, url: str) -> list[str]:
        return _python(
            "-m",
            "rq.cli",
            "worker",
            "--url",
            url,
            "--with-scheduler",
            "--worker-class",
            self.worker_class,
            "--logging_level",
            "WARNING",
        )

    def open(self) -> None:
        from redis import Redis
        from rq import Queue

        self._queue = Queue("default", connection=Redis.from_url(_url()))

    def enqueue(self, task: str, n: int) -> None:
        import redis_tasks

        fn = getattr(redis_tasks, task)
        enqueue = self._queue.enqueue
        for _ in range(n):
            enqueue(fn)

    def enqueue_delayed(self, dues: Sequence[float]) -> None:
        import redis_tasks

        enqueue_in = self._queue.enqueue_in
        for due in dues:
            enqueue_in(timedelta(seconds=_seconds_until(due)), redis_tasks.record, due)

    def pending_count(self) -> int:
        q = self._queue
        # cleanup=False: counting must not move abandoned jobs to the failed registry.
        scheduled = q.scheduled_job_registry.get_job_count(cleanup=False)
        started = q.started_job_registry.get_job_count(cleanup=False)
        return int(q.count + scheduled + started)

    def failed_count(self) -> int:
        return int(self._queue.failed_job_registry.get_job_count(cleanup=False))

    def close(self) -> None:
        self._queue.connection.close()


class Dramatiq:
    """Dramatiq 2, its RedisBroker, one worker process with 4 threads."""

    name = "dramatiq"
    label = "Dramatiq (1 process, 4 threads)"
    peer = True
    unavailable = None
    acknowledged = (
        "the message is removed from the queue's .msgs hash and the worker's ack set"
        " after the actor returns (late ack)"
    )
    on_worker_death = (
        "the message stays in the dead worker's ack set; it is requeued by queue"
        " maintenance once that worker's heartbeat is 60 s old, and maintenance runs"
        " on 0.1 % of broker commands (an idle worker fetches about once a second)"
    )

    def __init__(self) -> None:
        self._tasks: Any = None

    def worker_command(self, url: str) -> list[str]:
        # The dramatiq command forks the worker process(es) and supervises them.
        return _python(
            "-m", "dramatiq", "redis_tasks.dramatiq_tasks", "--processes", "1", "--threads", "4"
        )

    def open(self) -> None:
        from redis_tasks import dramatiq_tasks

        self._tasks = dramatiq_tasks

    def enqueue(self, task: str, n: int) -> None:
        send = getattr(self._tasks, task).send
        for _ in range(n):
            send()

    def enqueue_delayed(self, dues: Sequence[float]) -> None:
        send = self._tasks.record.send_with_options
        for due in dues:
            send(args=(due,), delay=_ms_until(due))

    def _hlen(self, key: str) -> int:
        return int(self._tasks.broker.client.hlen(f"dramatiq:{key}"))

    def pending_count(self) -> int:
        # A message stays in its queue's .msgs hash from enqueue to ack.
        return self._hlen("default.msgs") + self._hlen("default.DQ.msgs")

    def failed_count(self) -> int:
        return self._hlen("default.XQ.msgs")

    def close(self) -> None:
        self._tasks.broker.close()


class Huey:
    """Huey 3, RedisHuey, one consumer process with 4 worker threads."""

    name = "huey"
    label = "Huey (1 consumer, 4 threads)"
    peer = True
    unavailable = None
    acknowledged = "nothing to acknowledge: a worker BRPOPs the message off the queue and runs it"
    on_worker_death = "the message was removed when it was dequeued: the task is lost"

    def __init__(self) -> None:
        self._tasks: Any = None

    def worker_command(self, url: str) -> list[str]:
        return _python(
            "-m",
            "huey.bin.huey_consumer",
            "redis_tasks.huey_tasks.huey",
            "--workers",
            "4",
            "--worker-type",
            "thread",
            "--quiet",
        )

    def open(self) -> None:
        from redis_tasks import huey_tasks

        self._tasks = huey_tasks

    def enqueue(self, task: str, n: int) -> None:
        call = getattr(self._tasks, task)
        for _ in range(n):
            call()

    def enqueue_delayed(self, dues: Sequence[float]) -> None:
        schedule = self._tasks.record.schedule
        for due in dues:
            schedule(args=(due,), delay=_seconds_until(due))

    def pending_count(self) -> int:
        huey = self._tasks.huey
        return int(huey.pending_count() + huey.scheduled_count())

    def failed_count(self) -> int:
        return 0  # Huey keeps no record of a task that did not finish

    def close(self) -> None:
        self._tasks.huey.storage.pool.disconnect()


class Celery:
    """Celery 5, the Redis transport, one worker process with the threads pool."""

    name = "celery"
    label = "Celery (threads pool, concurrency 4)"
    peer = True
    unavailable = None
    acknowledged = (
        "task_acks_late=False (the default): the message is acknowledged (deleted from"
        " the transport's unacked hash) when the worker starts the task; the ack goes out"
        " from the worker's event loop, up to a few hundred ms after the start, and the last"
        " one of a burst may wait for the loop's next wake-up"
    )
    on_worker_death = (
        "a task already started was acknowledged: it is lost; with acks_late=True it"
        " would be redelivered after the 1 h visibility timeout"
    )

    def __init__(self) -> None:
        self._tasks: Any = None
        self._redis: Any = None

    def worker_command(self, url: str) -> list[str]:
        return _python(
            "-m",
            "celery",
            "--app",
            "redis_tasks.celery_tasks",
            "worker",
            "--pool",
            "threads",
            "--concurrency",
            "4",
            "--loglevel",
            "WARNING",
        )

    def open(self) -> None:
        import redis
        from redis_tasks import celery_tasks

        self._tasks = celery_tasks
        self._redis = redis.Redis.from_url(_url())

    def enqueue(self, task: str, n: int) -> None:
        delay = getattr(self._tasks, task).delay
        for _ in range(n):
            delay()

    def enqueue_delayed(self, dues: Sequence[float]) -> None:
        apply_async = self._tasks.record.apply_async
        for due in dues:
            apply_async(args=(due,), eta=datetime.fromtimestamp(due, UTC))

    def pending_count(self) -> int:
        # kombu's Redis transport: the queue is the list "celery"; a message a worker
        # has received (ETA tasks it holds included) waits in the hash "unacked".
        return int(self._redis.llen("celery") + self._redis.hlen("unacked"))

    def failed_count(self) -> int:
        return 0  # no result backend: nothing records a failure

    def close(self) -> None:
        self._tasks.app.close()
        self._redis.close()


class Arq:
    """arq 0.28, one asyncio worker process with ``max_jobs=4``."""

    name = "arq"
    label = "arq (1 process, max_jobs=4)"
    peer = True
    unavailable = None
    acknowledged = (
        "the job leaves the queue's sorted set and its in-progress key is deleted when"
        " the coroutine returns; the result is kept 1 h"
    )
    on_worker_death = (
        "the job stays in the queue; its in-progress key expires after the job timeout"
        " (300 s) plus 10 s, and a worker then runs it again"
    )

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pool: Any = None

    def worker_command(self, url: str) -> list[str]:
        return _python(
            "-m",
            "arq",
            "redis_tasks.arq_tasks.WorkerSettings",
            "--custom-log-dict",
            "redis_tasks.arq_tasks.LOGGING",
        )

    def _run(self, coroutine: Any) -> Any:
        assert self._loop is not None
        return self._loop.run_until_complete(coroutine)

    def open(self) -> None:
        from arq import create_pool
        from arq.connections import RedisSettings

        self._loop = asyncio.new_event_loop()
        self._pool = self._run(create_pool(RedisSettings.from_dsn(_url())))

    def enqueue(self, task: str, n: int) -> None:
        async def submit() -> None:
            enqueue_job = self._pool.enqueue_job
            for _ in range(n):
                await enqueue_job(task)

        self._run(submit())

    def enqueue_delayed(self, dues: Sequence[float]) -> None:
        async def submit() -> None:
            enqueue_job = self._pool.enqueue_job
            for due in dues:
                await enqueue_job("record", due, _defer_by=timedelta(milliseconds=_ms_until(due)))

        self._run(submit())

    def pending_count(self) -> int:
        from arq.constants import default_queue_name

        return int(self._run(self._pool.zcard(default_queue_name)))

    def failed_count(self) -> int:
        return 0  # a job whose worker died is still in the queue

    def close(self) -> None:
        self._run(self._pool.aclose())
        assert self._loop is not None
        self._loop.close()


class Marionette:
    """marionette's Redis backend, as API.md part three specifies it.

    If the harness's check of it fails (an installation without redis-py, say), it
    reports "marionette Redis backend not available" with the reason, and goes on
    with the peers.
    """

    name = "marionette"
    label = "marionette (1 process, 4 workers)"
    peer = False
    unavailable = "marionette Redis backend not available"
    acknowledged = "the task is settled in Redis (state, result, claim released) after it returns"
    on_worker_death = (
        "the dead process's claims pass to a live process once its heartbeat is older"
        " than the lease (10 s by default); the lost attempt counts as WorkerLost"
    )

    def __init__(self) -> None:
        self._tasks: Any = None

    def worker_command(self, url: str) -> list[str]:
        return _python(
            "-m", "marionette", "worker", "redis_tasks.marionette_tasks:tm", "--workers", "4"
        )

    def open(self) -> None:
        from redis_tasks import marionette_tasks

        marionette_tasks.tm.start()
        self._tasks = marionette_tasks

    def enqueue(self, task: str, n: int) -> None:
        queue: Callable[[], object] = getattr(self._tasks, task).queue
        for _ in range(n):
            queue()

    def enqueue_delayed(self, dues: Sequence[float]) -> None:
        delay = self._tasks.record.delay
        for due in dues:
            delay(_seconds_until(due), due)

    def pending_count(self) -> int:
        stats = self._tasks.tm.stats()
        return int(stats.queued + stats.scheduled + stats.running)

    def failed_count(self) -> int:
        return int(self._tasks.tm.stats().failed)

    def close(self) -> None:
        self._tasks.tm.stop()


SYSTEMS: dict[str, System] = {
    s.name: s
    for s in (
        RQ("rq-fork", "RQ, forking Worker (1 job at a time)", "rq.worker.Worker"),
        RQ("rq-simple", "RQ, SimpleWorker (1 job at a time)", "rq.worker.SimpleWorker"),
        Dramatiq(),
        Huey(),
        Celery(),
        Arq(),
        Marionette(),
    )
}
