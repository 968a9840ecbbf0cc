"""Stats: a frozen, self-consistent snapshot of a manager, taken under its lock."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["GroupStats", "Stats"]


@dataclass(frozen=True, slots=True)
class GroupStats:
    """One concurrency group: its `limit`, tasks `running`, tasks `waiting` for a slot."""

    limit: int
    running: int
    waiting: int


@dataclass(frozen=True, slots=True)
class Stats:
    """What `TaskManager.stats()` returns; all fields were read at the same instant.

    `workers` is the pool size and `busy` how many of them run an attempt now.
    `queued` counts tasks due and waiting to start (in the queue, or held by a group
    limit or a key), `scheduled` tasks delayed, scheduled or waiting for a retry,
    `running` tasks in an attempt. The counters only grow: `submitted` (keyed
    duplicates excluded; a periodic's run counts once it is due), `succeeded`,
    `failed`, `cancelled`, `retried` (attempts that failed and were scheduled
    again), `coalesced` (periodic occurrences merged into a waiting run). When the
    manager is idle, ``submitted == succeeded + failed + cancelled``. `groups` has
    every configured group; `uptime` is seconds since the last `start()` (0.0 when
    stopped). On Redis, the counters, `queued`, `scheduled`, `running` and `groups`
    describe the cluster, `workers`, `busy` and `uptime` this process, and
    `processes` counts the cluster's live processes (1 in memory).
    """

    workers: int
    busy: int
    queued: int
    scheduled: int
    running: int
    submitted: int
    succeeded: int
    failed: int
    retried: int
    cancelled: int
    coalesced: int
    groups: Mapping[str, GroupStats]
    uptime: float
    #: The live processes of the cluster (1 in memory).
    processes: int = 1
