"""The systems of the Redis reactive benchmark (``bench/redis_reactive.py``).

A system here is a cluster of three *nodes*, each node the process(es) one machine
of that system would run: a marionette worker; an RQ worker and RQ's cron process; a
Celery worker with its embedded beat (``-B``, a child process); an arq worker; a Huey
consumer (its scheduler thread included); a Dramatiq worker. Each says which of the
three benchmarks it can take part in, and if not, why (the tables print that reason
in the system's row). The harness imports this module but none of the systems: the
task libraries are imported by the nodes and producers only
(``redis_reactive_tasks``).

Every node runs 4 tasks at once (threads, or ``max_jobs`` for arq) except RQ's
worker, which has no threads and runs one job at a time (``SimpleWorker``: in its own
process, without a fork per job).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["SYSTEMS", "ReactiveSystem"]

Commands = list[list[str]]


def _python(*args: str) -> list[str]:
    return [sys.executable, *args]


@dataclasses.dataclass(frozen=True)
class ReactiveSystem:
    """One system, as the reactive benchmark drives it (see the module docstring)."""

    name: str  # on the command line and in the JSON
    label: str  # the row of the tables
    peer: bool  # False for marionette
    #: The processes of node `index` (0, 1, 2), given the Redis URL and the run's
    #: directory (for files a node keeps, such as Celery beat's schedule).
    node: Callable[[str, int, Path], Commands]
    #: How it was run, for the report.
    how: str
    #: Its name in ``redis_reactive_tasks.producer``, if a producer process submits
    #: to it or defines its periodics.
    producer: str = ""
    #: None: it takes part; otherwise why it cannot (printed in its row).
    once: str | None = None
    many: str | None = None
    groups: str | None = None
    #: The period of its one periodic in `periodic-once` (seconds).
    once_interval: float = 1.0
    #: Where its occurrences fall: the grid of periodic `i` of `n` at 1 s is
    #: ``phase(i, n) + k``; None when the system keeps no fixed grid (then ticks are
    #: counted from the first run and no lateness is reported).
    phase: Callable[[int, int], float] | None = None
    #: The system's own work waiting in Redis (its queue's length), read by the
    #: harness with `keys`: a growing backlog means it falls behind.
    backlog: Callable[[Any], int] | None = None


def _marionette_node(url: str, index: int, directory: Path) -> Commands:
    return [
        _python(
            "-m",
            "marionette",
            "worker",
            "redis_reactive_tasks.marionette_tasks:tm",
            "--workers",
            "4",
        )
    ]


def _marionette_backlog(r: Any) -> int:
    # The cluster's gauges, as `tm.stats()` reads them (queued counts claimed and
    # group-waiting tasks too), read directly so that no fourth process joins.
    queued, scheduled = r.hmget("{mbench}:stats", "queued", "scheduled")
    return int(queued or 0) + int(scheduled or 0)


def _rq_node(url: str, index: int, directory: Path) -> Commands:
    return [
        _python(
            "-m",
            "rq.cli",
            "worker",
            "--url",
            url,
            "--with-scheduler",
            "--worker-class",
            "rq.worker.SimpleWorker",
            "--logging_level",
            "WARNING",
        ),
        _python(
            "-m",
            "rq.cli",
            "cron",
            "--url",
            url,
            "--logging-level",
            "WARNING",
            "redis_reactive_tasks.rq_cron",
        ),
    ]


def _celery_node(url: str, index: int, directory: Path) -> Commands:
    return [
        _python(
            "-m",
            "celery",
            "--app",
            "redis_reactive_tasks.celery_tasks",
            "worker",
            "--pool",
            "threads",
            "--concurrency",
            "4",
            "--loglevel",
            "WARNING",
            "--beat",
            "--schedule",
            str(directory / f"celerybeat-{index}"),
            "--hostname",
            f"node{index}@%h",
        )
    ]


def _celery_backlog(r: Any) -> int:
    return int(r.llen("celery")) + int(r.hlen("unacked"))


def _arq_node(url: str, index: int, directory: Path) -> Commands:
    return [
        _python(
            "-m",
            "arq",
            "redis_reactive_tasks.arq_tasks.WorkerSettings",
            "--custom-log-dict",
            "redis_reactive_tasks.arq_tasks.LOGGING",
        )
    ]


def _huey_node(url: str, index: int, directory: Path) -> Commands:
    return [
        _python(
            "-m",
            "huey.bin.huey_consumer",
            "redis_reactive_tasks.huey_tasks.huey",
            "--workers",
            "4",
            "--worker-type",
            "thread",
            "--quiet",
        )
    ]


def _dramatiq_node(url: str, index: int, directory: Path) -> Commands:
    return [
        _python(
            "-m",
            "dramatiq",
            "redis_reactive_tasks.dramatiq_tasks",
            "--processes",
            "1",
            "--threads",
            "4",
        )
    ]


NO_GROUPS = "no limit across processes that queues"
HUEY_MINUTE = (
    "cannot: its periodic tasks are crontabs, checked by each consumer once every 60 s"
    " (shortest period: 1 minute)"
)
NO_PERIODICS = (
    "no periodic tasks (a scheduler such as APScheduler or dramatiq-crontab, in a"
    " process of its own, would have to send them)"
)

MARIONETTE = ReactiveSystem(
    name="marionette",
    label="marionette (3 workers)",
    peer=False,
    node=_marionette_node,
    how=(
        "three `python -m marionette worker redis_reactive_tasks.marionette_tasks:tm"
        " --workers 4` (MARIONETTE_BACKEND, MARIONETTE_NAMESPACE, MARIONETTE_LIMITS); the"
        " periodics are defined once, with `tm.every(1, beat.bind(i), start=...,"
        " key=f'p{i}')`, by a fourth, submit-only process (`workers=0`) that exits once"
        " they are defined: only the three workers fire occurrences"
    ),
    producer="marionette",
    phase=lambda i, n: 0.0,
    backlog=_marionette_backlog,
)

SYSTEMS: dict[str, ReactiveSystem] = {
    s.name: s
    for s in (
        MARIONETTE,
        dataclasses.replace(
            MARIONETTE,
            name="marionette-spread",
            label="marionette (3 workers), first runs spread over 1 s",
            phase=lambda i, n: i / n,
        ),
        ReactiveSystem(
            name="rq",
            label="RQ (3 SimpleWorkers + 3 rq cron)",
            peer=True,
            node=_rq_node,
            how=(
                "each node: `rq worker --with-scheduler --worker-class rq.worker.SimpleWorker`"
                " (one job at a time) and `rq cron redis_reactive_tasks.rq_cron`, RQ's cron"
                " scheduler (a process of its own; nothing stops three of them from each"
                " enqueueing); jobs on `cron='* * * * * *'` (every whole second)"
            ),
            groups=f"{NO_GROUPS}: each worker runs one job at a time",
            phase=lambda i, n: 0.0,
            backlog=lambda r: int(r.llen("rq:queue:default")),
        ),
        ReactiveSystem(
            name="celery",
            label="Celery (3 workers -B)",
            peer=True,
            node=_celery_node,
            how=(
                "each node: `celery worker --pool threads --concurrency 4 --beat --schedule"
                " FILE --hostname nodeN@%h`, the beat embedded in each worker (a child"
                " process); entries on `schedule(1.0, relative=True)` (whole seconds)"
            ),
            groups=(
                f"{NO_GROUPS}: `--concurrency` is per worker, and `rate_limit` is per"
                " worker and per task type, in tasks per unit of time, not at once"
            ),
            phase=lambda i, n: 0.0,
            backlog=_celery_backlog,
        ),
        ReactiveSystem(
            name="arq",
            label="arq (3 workers, max_jobs=4)",
            peer=True,
            node=_arq_node,
            how=(
                "each node: `arq WorkerSettings`, `max_jobs=4`, the cron jobs"
                " `cron(beat, second=set(range(60)))` (every second at .123456, arq's"
                " default microsecond; `unique=True`: one job id per occurrence)"
            ),
            groups=f"{NO_GROUPS}: `max_jobs` is per worker",
            phase=lambda i, n: 0.123456,
            backlog=lambda r: int(r.zcard("arq:queue")),
        ),
        ReactiveSystem(
            name="huey",
            label="Huey (3 consumers, 4 threads)",
            peer=True,
            node=_huey_node,
            how=(
                "each node: `huey_consumer --workers 4 --worker-type thread`, its periodic"
                " scheduler on (the default); one `@periodic_task(crontab())`, every minute"
            ),
            once_interval=60.0,
            many=HUEY_MINUTE,
            groups=(
                f"{NO_GROUPS}: `lock_task` is a mutex (a limit of 1) whose task fails"
                " with TaskLockedException when it is held"
            ),
            phase=None,
            backlog=lambda r: int(r.llen("huey.redis.benchreactive")),
        ),
        ReactiveSystem(
            name="dramatiq",
            label="Dramatiq (3 workers, 4 threads)",
            peer=True,
            node=_dramatiq_node,
            how=(
                "each node: `dramatiq redis_reactive_tasks.dramatiq_tasks --processes 1"
                " --threads 4`; the group emulated with a `ConcurrentRateLimiter` (limit 4,"
                " RedisBackend) taken inside the actor: a task over the limit raises"
                " RateLimitExceeded and is retried by the Retries middleware (defaults:"
                " 20 retries, backoff from 15 s, exponential)"
            ),
            producer="dramatiq",
            once=NO_PERIODICS,
            many=NO_PERIODICS,
            backlog=lambda r: (
                int(r.hlen("dramatiq:default.msgs")) + int(r.hlen("dramatiq:default.DQ.msgs"))
            ),
        ),
    )
}
