"""The cluster demo's record: one SQLite row per attempt of a poll, and the checks.

Part of ``python -m marionette demo --processes N`` (see `marionette.demo_cluster`).
Every process of the cluster writes the rows of the attempts it runs (`connect`);
the demo process makes the tables, reads its run's rows and keeps the cluster's
counts beside them (`Record`). `tally` and `peak` are pure functions of the rows:
each run polled once, never more requests in flight than the cap.
"""

from __future__ import annotations

import collections
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from marionette.stats import Stats

__all__ = ["Attempt", "Record", "Tally", "connect", "peak", "tally"]


def connect(db: str | Path) -> sqlite3.Connection:
    """A connection in autocommit mode that waits (up to 10 s) for another process's
    write to end instead of failing with "database is locked"."""
    return sqlite3.connect(db, timeout=10.0, isolation_level=None)


@dataclass(frozen=True, slots=True)
class Attempt:
    """One row of ``poll_attempts``: `ended` is None while it runs, or for ever when
    its process died during it."""

    task_id: int
    endpoint: str
    attempt: int
    pid: int
    started: float
    ended: float | None
    ok: bool
    latency_ms: float | None


@dataclass(frozen=True, slots=True)
class Tally:
    """What the attempts of some runs (tasks) show."""

    runs: int  # distinct task ids
    attempts: int
    failed: int  # runs whose last attempt failed: failed for good
    retried: int  # attempts that failed, then tried again
    rerun: int  # attempts cut short (their process died), then tried again
    unended: int  # runs whose last attempt has not ended: lost, once the cluster is idle
    doubled: int  # runs polled twice: one attempt number twice, or one after an answer
    latencies: list[float]  # of the answered attempts, ms


def tally(attempts: Iterable[Attempt]) -> Tally:
    """Count runs and their attempts (a pure function of the rows)."""
    runs: dict[int, list[Attempt]] = collections.defaultdict(list)
    for attempt in attempts:
        runs[attempt.task_id].append(attempt)
    count: collections.Counter[str] = collections.Counter()
    for tries in runs.values():
        tries.sort(key=lambda a: a.attempt)
        *before, last = tries
        answered = [i for i, a in enumerate(tries) if a.ok]
        twice = len({a.attempt for a in tries}) < len(tries)
        count["doubled"] += twice or bool(answered and answered[0] < len(tries) - 1)
        count["unended"] += last.ended is None
        count["failed"] += last.ended is not None and not last.ok
        count["retried"] += sum(a.ended is not None for a in before)
        count["rerun"] += sum(a.ended is None for a in before)
    every = [a for tries in runs.values() for a in tries]
    return Tally(
        runs=len(runs),
        attempts=len(every),
        failed=count["failed"],
        retried=count["retried"],
        rerun=count["rerun"],
        unended=count["unended"],
        doubled=count["doubled"],
        latencies=[a.latency_ms for a in every if a.ok and a.latency_ms is not None],
    )


def peak(attempts: Iterable[Attempt]) -> int:
    """The most attempts in flight at once, from the intervals of those that ended (a
    request is in flight inside its attempt, and its attempt inside its group slot)."""
    edges = []
    for a in attempts:
        if a.ended is not None:
            edges += [(a.started, 1), (a.ended, -1)]
    most = now = 0
    for _, step in sorted(edges):  # at the same instant an end (-1) comes first
        now += step
        most = max(most, now)
    return most


class Record:
    """The demo process's side of the SQLite file: it makes the tables, reads this
    run's attempts, and keeps the cluster's counts beside them. The main thread's
    alone; the polls write through connections of their own."""

    def __init__(self, path: Path, run: str) -> None:
        self.run = run
        self._db = connect(path)
        self._db.execute("PRAGMA journal_mode=WAL")  # kept by the file: readers never block
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS poll_attempts (run TEXT, task_id INTEGER,"
            " endpoint TEXT, attempt INTEGER, pid INTEGER, started REAL, ended REAL,"
            " ok INTEGER, detail TEXT, latency_ms REAL)"
        )
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS cluster_runs (run TEXT, submitted INTEGER,"
            " succeeded INTEGER, failed INTEGER, cancelled INTEGER, coalesced INTEGER)"
        )

    def attempts(self, *, unended: bool = False) -> list[Attempt]:
        """This run's attempts (only those not ended, with `unended`)."""
        query = (
            "SELECT task_id, endpoint, attempt, pid, started, ended, ok, latency_ms"
            " FROM poll_attempts WHERE run = ?" + (" AND ended IS NULL" if unended else "")
        )
        return [
            Attempt(task, endpoint, n, pid, started, ended, bool(ok), ms)
            for task, endpoint, n, pid, started, ended, ok, ms in self._db.execute(
                query, (self.run,)
            )
        ]

    def keep_counts(self, stats: Stats) -> None:
        """Keep the cluster's own counts of this run's tasks next to the rows."""
        counts = (stats.submitted, stats.succeeded, stats.failed, stats.cancelled)
        self._db.execute(
            "INSERT INTO cluster_runs VALUES (?, ?, ?, ?, ?, ?)",
            (self.run, *counts, stats.coalesced),
        )

    def close(self) -> None:
        self._db.close()
