"""stats(): a frozen snapshot whose fields agree, counters that never go back,
uptime, and every configured group."""

from __future__ import annotations

import dataclasses
import itertools
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import freezegun.api
import pytest
from conftest import WAIT

from marionette import (
    Context,
    GroupStats,
    Stats,
    TaskEventKind,
    TaskHandler,
    TaskManager,
)

Clock = freezegun.api.FrozenDateTimeFactory

COUNTERS = ("submitted", "succeeded", "failed", "retried", "cancelled", "coalesced")


# -- helpers -----------------------------------------------------------------------


class Blocker:
    """A task that says when it started and returns once released."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()

    def __call__(self, ctx: Context) -> str:
        self.started.set()
        self.release.wait(WAIT)
        return "blocker"


def fail_once(ctx: Context) -> str:
    if ctx.attempt == 1:
        raise OSError("first attempt fails")
    return "ok"


def always_fail(ctx: Context) -> None:
    raise ValueError(f"attempt {ctx.attempt} fails")


def check_agrees(stats: Stats) -> None:
    """The relations every snapshot must satisfy (no exec() in these tests)."""
    assert stats.queued >= 0
    assert stats.scheduled >= 0
    assert stats.running >= 0
    assert stats.busy == stats.running
    assert stats.busy <= stats.workers
    settled = stats.succeeded + stats.failed + stats.cancelled
    assert stats.submitted - settled == stats.queued + stats.scheduled + stats.running
    for group in stats.groups.values():  # no limit is lowered in these tests
        assert 0 <= group.running <= group.limit
        assert group.waiting >= 0


def check_idle(stats: Stats) -> None:
    assert (stats.queued, stats.scheduled, stats.running, stats.busy) == (0, 0, 0, 0)
    assert stats.submitted == stats.succeeded + stats.failed + stats.cancelled


@pytest.fixture
def grouped() -> Iterator[TaskManager]:
    """A running manager with 4 workers and two groups, stopped afterwards."""
    manager = TaskManager(workers=4, limits={"http": 2, "db": 1})
    manager.start()
    try:
        yield manager
    finally:
        manager.stop(timeout=WAIT)


# -- the snapshot ------------------------------------------------------------------------


def test_stats_is_a_frozen_dataclass(tm: TaskManager) -> None:
    """A Stats cannot be changed, nor can its groups mapping."""
    stats = tm.stats()
    assert isinstance(stats, Stats)
    assert dataclasses.is_dataclass(stats)
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.submitted = 5  # type: ignore[misc]
    with pytest.raises(TypeError):
        stats.groups["x"] = GroupStats(1, 0, 0)  # type: ignore[index]


def test_a_snapshot_does_not_change_afterwards(tm: TaskManager) -> None:
    """A snapshot keeps its values while the manager moves on."""
    before = tm.stats()
    tm.queue(lambda ctx: None).result(WAIT)
    assert tm.join(WAIT)
    assert before.submitted == 0
    assert tm.stats().submitted == 1


def test_a_fresh_manager_is_all_zero(tm: TaskManager) -> None:
    """Nothing submitted: every counter is zero, workers is the pool size."""
    stats = tm.stats()
    assert stats.workers == 4
    assert [getattr(stats, name) for name in COUNTERS] == [0] * len(COUNTERS)
    check_idle(stats)
    assert dict(stats.groups) == {}


def test_groups_has_every_configured_group(grouped: TaskManager) -> None:
    """Every group of Config.limits, and every group set_limit added, is listed."""
    assert dict(grouped.stats().groups) == {
        "http": GroupStats(limit=2, running=0, waiting=0),
        "db": GroupStats(limit=1, running=0, waiting=0),
    }
    grouped.set_limit("mail", 5)
    assert set(grouped.stats().groups) == {"http", "db", "mail"}
    assert grouped.stats().groups["mail"] == GroupStats(limit=5, running=0, waiting=0)


def test_uptime_is_zero_when_stopped_and_counts_while_running(frozen: Clock) -> None:
    """uptime is 0.0 when stopped and counts seconds since the last start() when running."""
    manager = TaskManager(workers=1)
    assert manager.stats().uptime == 0.0
    manager.start()
    try:
        frozen.tick(5)
        assert manager.stats().uptime == 5.0
        manager.stop()
        assert manager.stats().uptime == 0.0
        frozen.tick(100)
        manager.start()
        frozen.tick(2)
        assert manager.stats().uptime == 2.0
    finally:
        manager.stop(timeout=WAIT)


def test_uptime_grows_on_the_real_clock(tm: TaskManager) -> None:
    """On the real clock, a running manager's uptime is positive and grows."""
    first = tm.stats().uptime
    tm.queue(lambda ctx: None).result(WAIT)
    second = tm.stats().uptime
    assert first > 0.0
    assert second >= first


def test_running_queued_and_scheduled_are_counted(frozen: Clock) -> None:
    """running, busy, queued and scheduled (delays and retries) are counted exactly."""
    manager = TaskManager(workers=2)
    manager.start()
    blockers = [Blocker(), Blocker()]
    try:
        retrying = threading.Event()
        manager.add_listener(lambda event: retrying.set(), events=[TaskEventKind.RETRYING])
        retry = manager.queue(fail_once, retries=1, backoff=60)
        assert retrying.wait(WAIT)
        for blocker in blockers:
            manager.queue(blocker)
            assert blocker.started.wait(WAIT)
        manager.queue(lambda ctx: None)
        manager.queue(lambda ctx: None)
        manager.delay(30, lambda ctx: None)
        stats = manager.stats()
        check_agrees(stats)
        assert (stats.running, stats.busy, stats.queued, stats.scheduled) == (2, 2, 2, 2)
        assert stats.submitted == 6
        assert stats.retried == 1
        for blocker in blockers:
            blocker.release.set()
        frozen.tick(60)
        manager.scheduler.wake()
        assert retry.result(WAIT) == "ok"
        assert manager.join(WAIT)
        stats = manager.stats()
        check_idle(stats)
        assert stats.succeeded == 6
    finally:
        for blocker in blockers:
            blocker.release.set()
        manager.stop(timeout=WAIT)


def test_group_running_and_waiting_are_counted(grouped: TaskManager) -> None:
    """A full group shows its running and waiting tasks; waiting ones count as queued."""
    blockers = [Blocker(), Blocker()]
    for blocker in blockers:
        grouped.queue(blocker, group="http")
        assert blocker.started.wait(WAIT)
    waiting = [grouped.queue(lambda ctx: None, group="http") for _ in range(3)]
    for probe in [grouped.queue(lambda ctx: None) for _ in range(4)]:
        probe.result(WAIT)
    stats = grouped.stats()
    check_agrees(stats)
    assert stats.groups["http"] == GroupStats(limit=2, running=2, waiting=3)
    assert stats.groups["db"] == GroupStats(limit=1, running=0, waiting=0)
    assert stats.queued == 3
    assert stats.running == 2
    for blocker in blockers:
        blocker.release.set()
    for handler in waiting:
        handler.result(WAIT)
    assert grouped.join(WAIT)
    stats = grouped.stats()
    check_idle(stats)
    assert stats.groups["http"] == GroupStats(limit=2, running=0, waiting=0)


# -- counters ------------------------------------------------------------------------------


def test_a_mixed_run_leaves_consistent_counters_at_idle(grouped: TaskManager) -> None:
    """A mixed run leaves exact counters; at idle submitted == succeeded + failed + cancelled."""
    handlers: list[TaskHandler] = []
    handlers += [grouped.queue(lambda ctx: "ok") for _ in range(5)]
    handlers += [grouped.queue(fail_once, retries=1, backoff=0, group="http") for _ in range(3)]
    handlers += [grouped.queue(always_fail, retries=2, backoff=0, group="db") for _ in range(2)]
    cancelled = [grouped.delay(60, lambda ctx: None) for _ in range(4)]
    keyed = grouped.delay(60, lambda ctx: None, key="k")
    assert grouped.delay(60, lambda ctx: None, key="k") is keyed
    assert grouped.queue(lambda ctx: None, key="k") is keyed
    for handler in [*cancelled, keyed]:
        assert handler.cancel()
    for handler in handlers:
        handler.exception(WAIT)
    assert grouped.join(WAIT)
    stats = grouped.stats()
    check_idle(stats)
    check_agrees(stats)
    assert stats.submitted == 5 + 3 + 2 + 4 + 1
    assert stats.succeeded == 8
    assert stats.failed == 2
    assert stats.cancelled == 5
    assert stats.retried == 3 + 2 * 2
    assert stats.coalesced == 0


def test_counters_never_go_backwards_and_snapshots_always_agree(tm: TaskManager) -> None:
    """Snapshots taken during a busy run agree with themselves; counters never go back."""
    snapshots: list[Stats] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set() and len(snapshots) < 20_000:
            snapshots.append(tm.stats())

    sampler = threading.Thread(target=sample, name="stats-sampler")
    sampler.start()
    try:
        handlers: list[TaskHandler] = []
        for i in range(200):
            if i % 4 == 0:
                handlers.append(tm.queue(fail_once, retries=1, backoff=0))
            elif i % 4 == 1:
                handlers.append(tm.queue(always_fail, retries=1, backoff=0))
            elif i % 4 == 2:
                delayed = tm.delay(60, lambda ctx: None)
                delayed.cancel()
                handlers.append(delayed)
            else:
                handlers.append(tm.queue(lambda ctx: None))
        assert tm.join(WAIT)
    finally:
        done.set()
        sampler.join(WAIT)
    snapshots.append(tm.stats())
    assert len(snapshots) > 1
    for stats in snapshots:
        check_agrees(stats)
    for earlier, later in itertools.pairwise(snapshots):
        for name in COUNTERS:
            assert getattr(later, name) >= getattr(earlier, name), name
    final = snapshots[-1]
    check_idle(final)
    assert (final.submitted, final.succeeded, final.failed, final.cancelled) == (200, 100, 50, 50)
    assert final.retried == 100


def test_counters_survive_stop_and_start(tm: TaskManager) -> None:
    """A restart does not reset the counters."""
    tm.queue(lambda ctx: None).result(WAIT)
    assert tm.join(WAIT)
    tm.stop()
    assert tm.stats().submitted == 1
    tm.start()
    tm.queue(lambda ctx: None).result(WAIT)
    assert tm.join(WAIT)
    stats = tm.stats()
    assert (stats.submitted, stats.succeeded) == (2, 2)


def test_kept_tasks_are_counted_while_stopped(frozen: Clock, tm: TaskManager) -> None:
    """A delayed task kept by stop() is still counted as scheduled while stopped."""
    handler = tm.schedule(datetime.now(UTC) + timedelta(seconds=10), lambda ctx: "kept")
    tm.stop()
    stats = tm.stats()
    check_agrees(stats)
    assert (stats.scheduled, stats.submitted, stats.uptime) == (1, 1, 0.0)
    tm.start()
    frozen.tick(10)
    tm.scheduler.wake()
    assert handler.result(WAIT) == "kept"
    assert tm.join(WAIT)
    check_idle(tm.stats())


def test_periodic_runs_and_coalesced_occurrences_are_counted(frozen: Clock) -> None:
    """A periodic run counts as submitted when due; merged occurrences count as coalesced."""
    manager = TaskManager(workers=1)
    manager.start()
    blocker = Blocker()
    try:
        manager.queue(blocker)
        assert blocker.started.wait(WAIT)
        p = manager.every(10, lambda ctx: "run")
        for _ in range(3):
            frozen.tick(10)
            manager.scheduler.wake()
        stats = manager.stats()
        check_agrees(stats)
        assert (stats.submitted, stats.coalesced, stats.queued) == (2, 2, 1)
        blocker.release.set()
        assert p.last is not None
        assert p.last.result(WAIT) == "run"
        assert manager.join(WAIT)
        stats = manager.stats()
        check_idle(stats)
        assert (stats.submitted, stats.succeeded, stats.coalesced) == (2, 2, 2)
        p.cancel()
    finally:
        blocker.release.set()
        manager.stop(timeout=WAIT)
