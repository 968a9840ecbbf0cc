"""Keys, group limits, periodics and stats across a cluster on Redis.

Several managers in this process form the cluster here (each with its own threads,
lease and scheduler, as separate processes would have); tests/test_redis_processes.py
has the ones that need real processes (SIGKILL). Intervals recorded by the tasks are
checked for overlap; occurrences of a periodic are counted over a window.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable

import pytest
from conftest import WAIT

from marionette import Context, TaskManager, TaskState

Make = Callable[..., TaskManager]


@pytest.fixture
def make(redis_make: Make) -> Make:
    """Managers of the test's cluster (see conftest's `redis_make`)."""
    return redis_make


class Intervals:
    """Records (start, end) of each run, from any thread of this process."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.spans: list[tuple[float, float]] = []
        self.running = 0
        self.peak = 0

    def run(self, ctx: Context, seconds: float) -> float:
        with self.lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
            start = time.monotonic()
        ctx.wait(seconds)
        with self.lock:
            self.running -= 1
            self.spans.append((start, time.monotonic()))
        return start

    def overlapping(self) -> list[tuple[tuple[float, float], tuple[float, float]]]:
        spans = sorted(self.spans)
        return [(a, b) for a, b in itertools.pairwise(spans) if b[0] < a[1]]


class Ticks:
    """Counts runs of `tick` in this process; tests wait for a count (no polling)."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.count = 0

    def tick(self, ctx: Context) -> float:
        with self.cond:
            self.count += 1
            self.cond.notify_all()
        return time.monotonic()

    def wait_for(self, count: int) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: self.count >= count, WAIT), self.count


TICKS = Ticks()


def register(tm: TaskManager, intervals: Intervals, ticks: Ticks = TICKS) -> None:
    tm.task(name="work")(intervals.run)
    tm.task(name="tick")(ticks.tick)


# -- keys ------------------------------------------------------------------------------------


def test_a_second_keyed_submission_anywhere_returns_the_pending_one(make: Make) -> None:
    """A keyed submission from another manager returns (a handler to) the pending task;
    get(key) finds it in every manager."""
    a, b = make(workers=0), make(workers=0)
    spans = Intervals()
    register(a, spans)
    register(b, spans)
    first = a._registry["work"].options(key="user:1").delay(30, 0)
    second = b._registry["work"].options(key="user:1").queue(0)
    assert second.id == first.id
    found = b.get("user:1")
    assert found is not None
    assert found.id == first.id
    assert b.get("nobody") is None
    assert first.cancel()
    assert a.stats().submitted == 1


def test_tasks_of_one_key_never_run_at_once_anywhere(make: Make) -> None:
    """Keyed tasks submitted over and over from three managers with free workers never
    overlap: one submitted while its namesake runs waits and starts right after it."""
    managers = [make(workers=3) for _ in range(3)]
    spans = Intervals()
    for tm in managers:
        register(tm, spans)
    handlers = []
    for i in range(30):
        tm = managers[i % 3]
        handlers.append(tm._registry["work"].options(key="k").queue(0.01))
        if i % 5 == 4:
            handlers[-1].result(WAIT)
    for handler in handlers:
        handler.result(WAIT)
    assert spans.overlapping() == []
    assert spans.peak == 1
    assert len(spans.spans) >= 6


def test_reschedule_by_key_moves_the_cluster_task(make: Make) -> None:
    """reschedule(key, sooner, only_sooner=True) moves a delayed task of the cluster."""
    a, b = make(workers=2), make(workers=0)
    spans = Intervals()
    register(a, spans)
    register(b, spans)
    handler = b._registry["work"].options(key="later").delay(60, 0)
    assert a.reschedule("later", 90, only_sooner=True) is False
    assert a.reschedule("later", 0.05, only_sooner=True) is True
    assert handler.result(WAIT) > 0
    assert a.reschedule("later", 1) is False  # nothing scheduled any more


def test_pending_lists_the_cluster_queue_then_its_schedule(make: Make) -> None:
    """pending(limit) gives queued tasks (oldest first) then scheduled ones."""
    tm = make(workers=0)
    spans = Intervals()
    register(tm, spans)
    queued = [tm._registry["work"].queue(0) for _ in range(3)]
    delayed = [tm._registry["work"].delay(60 + i, 0) for i in range(3)]
    assert [h.id for h in tm.pending()] == [h.id for h in (*queued, *delayed)]
    assert [h.id for h in tm.pending(limit=4)] == [h.id for h in (*queued, delayed[0])]
    for handler in (*queued, *delayed):
        handler.cancel()


# -- groups --------------------------------------------------------------------------------


def test_a_group_limit_holds_for_the_whole_cluster(make: Make) -> None:
    """A limit of 3 is never exceeded across three managers of 4 workers each, while
    ungrouped tasks keep flowing; the waiting ones hold no worker."""
    managers = [make(workers=4, limits={"http": 3}) for _ in range(3)]
    spans = Intervals()
    for tm in managers:
        register(tm, spans)
    grouped = [
        managers[i % 3]._registry["work"].options(group="http").queue(0.05) for i in range(24)
    ]
    others = [managers[0]._registry["tick"].queue() for _ in range(10)]
    assert all(h.result(WAIT) > 0 for h in others)
    assert any(not h.done() for h in grouped)  # free tasks ran while the group was busy
    for handler in grouped:
        handler.result(WAIT)
    assert spans.peak == 3
    groups = managers[1].stats().groups
    assert (groups["http"].limit, groups["http"].running, groups["http"].waiting) == (3, 0, 0)


def test_set_limit_in_one_manager_is_seen_by_all(make: Make) -> None:
    """Raising a group's limit from one manager starts waiting tasks at once everywhere;
    Config.limits sets a limit only where the cluster has none yet."""
    a = make(workers=4, limits={"db": 1})
    b = make(workers=4, limits={"db": 7})  # the cluster has 1 already: kept
    spans = Intervals()
    register(a, spans)
    register(b, spans)
    assert b.stats().groups["db"].limit == 1
    release = threading.Event()
    started = Ticks()

    def gate(ctx: Context) -> None:
        started.tick(ctx)
        release.wait(WAIT)

    a.task(name="gate")(gate)
    b.task(name="gate")(gate)
    blocked = [a._registry["gate"].options(group="db").queue() for _ in range(3)]
    started.wait_for(1)
    assert a.stats().groups["db"].waiting == 2
    b.set_limit("db", 3)
    assert a.stats().groups["db"].limit == 3
    started.wait_for(3)  # the two waiting ones started at once
    release.set()
    for handler in blocked:
        handler.result(WAIT)


def test_an_unknown_group_raises_value_error(make: Make) -> None:
    """A group no process configured raises ValueError at submission (no typo lifts a
    limit)."""
    tm = make(workers=0)
    spans = Intervals()
    register(tm, spans)
    with pytest.raises(ValueError, match="unknown group"):
        tm._registry["work"].options(group="htpp").queue(0)


# -- periodics -------------------------------------------------------------------------------


def test_a_periodic_defined_by_three_managers_runs_each_occurrence_once(make: Make) -> None:
    """Three managers define the same periodic: they join one, and over a window each
    occurrence runs once (about window / interval runs, not three times that)."""
    managers = [make(workers=2) for _ in range(3)]
    spans = Intervals()
    for tm in managers:
        register(tm, spans)
    interval = 0.1
    periodics = [tm.every(interval, tm._registry["tick"].bind(), key="beat") for tm in managers]
    started = time.monotonic()
    threading.Event().wait(1.5)  # the window over which occurrences are counted
    runs = periodics[2].runs
    elapsed = time.monotonic() - started
    assert elapsed / interval - 3 <= runs <= elapsed / interval + 1
    assert len(managers[0].periodics()) == 1
    periodics[1].cancel()
    assert all(p.cancelled() for p in periodics)
    assert managers[0].periodics() == []


def test_a_changed_definition_replaces_the_stored_one(make: Make) -> None:
    """A process defining a periodic differently replaces the cluster's definition (an
    hourly one becomes a 50 ms one: its runs come)."""
    a, b = make(workers=2), make(workers=2)
    spans, ticks = Intervals(), Ticks()
    register(a, spans, ticks)
    register(b, spans, ticks)
    slow = a.every(3600, a._registry["tick"].bind(), key="job")
    first_due = slow.next_run
    assert first_due is not None
    fast = b.every(0.05, b._registry["tick"].bind(), key="job")
    assert slow.next_run is not None
    assert slow.next_run < first_due
    ticks.wait_for(2)
    assert slow.runs >= 2
    fast.cancel()


def test_pause_and_resume_for_the_whole_cluster(make: Make) -> None:
    """pause() from one manager stops the runs everywhere; resume() plans the next one
    from now (no catch-up)."""
    a, b = make(workers=2), make(workers=2)
    spans = Intervals()
    register(a, spans)
    register(b, spans)
    periodic = a.every(0.05, a._registry["tick"].bind(), key="p")
    joined = b.every(0.05, b._registry["tick"].bind(), key="p")
    joined.pause()
    assert periodic.paused()
    assert periodic.next_run is None
    runs = periodic.runs
    threading.Event().wait(0.3)  # a window in which a paused periodic must not run
    assert periodic.runs == runs
    periodic.resume()
    assert periodic.next_run is not None
    assert not joined.paused()
    periodic.cancel()


def test_after_the_whole_cluster_was_down_missed_occurrences_are_one_run(
    redis_url: str, redis_namespace: str
) -> None:
    """With every manager stopped over many occurrences, the next start runs one
    catch-up run, not a burst."""
    spans, ticks = Intervals(), Ticks()
    first = TaskManager(backend=redis_url, namespace=redis_namespace, lease=2.0, workers=1)
    register(first, spans, ticks)
    first.start()
    periodic = first.every(0.05, first._registry["tick"].bind(), key="cron-like")
    ticks.wait_for(1)
    first.stop()
    runs = periodic.runs
    threading.Event().wait(0.6)  # about 12 occurrences pass while the cluster is down
    second = TaskManager(backend=redis_url, namespace=redis_namespace, lease=2.0, workers=1)
    register(second, spans, ticks)
    second.start()
    try:
        before = ticks.count
        ticks.wait_for(before + 1)  # the catch-up run
        caught_up = second.periodics()[0].runs - runs
        # One run for the missed occurrences, and at most one more on the grid since.
        assert 1 <= caught_up <= 2
        second.periodics()[0].cancel()
    finally:
        second.stop()
    assert periodic.cancelled()


def test_every_and_cron_need_a_key_on_redis(make: Make) -> None:
    """On Redis, every() and cron() without a key raise ValueError."""
    tm = make(workers=0)
    spans = Intervals()
    register(tm, spans)
    with pytest.raises(ValueError, match="key"):
        tm.every(1, tm._registry["tick"].bind())
    with pytest.raises(ValueError, match="key"):
        tm.cron("* * * * *", tm._registry["tick"].bind())
    cron = tm.cron("0 3 * * *", tm._registry["tick"].bind(), key="nightly", tz="Europe/Berlin")
    assert cron.next_run is not None
    cron.cancel()


def test_stats_agree_across_managers_at_idle(make: Make) -> None:
    """Every manager's stats describe the same cluster; at idle they add up."""
    managers = [make(workers=2) for _ in range(3)]
    spans = Intervals()
    for tm in managers:
        register(tm, spans)
    handlers = [managers[i % 3]._registry["tick"].queue() for i in range(12)]
    handlers.append(managers[0]._registry["work"].delay(30, 0))
    handlers[-1].cancel()
    for handler in handlers[:-1]:
        handler.result(WAIT)
    assert managers[0].join(WAIT)
    seen = {
        (s.submitted, s.succeeded, s.failed, s.cancelled, s.processes)
        for s in (tm.stats() for tm in managers)
    }
    assert seen == {(13, 12, 0, 1, 3)}
    assert handlers[-1].state is TaskState.CANCELLED
