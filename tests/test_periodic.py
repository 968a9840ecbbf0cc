"""Periodic tasks: every (fixed rate, fixed delay, jitter), cron across DST, coalescing,
pause/resume/cancel, stop/start, and the pure planners `next_grid` and `next_cron`."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import freezegun.api
import pytest
from conftest import WAIT

from marionette import (
    Context,
    Periodic,
    TaskEvent,
    TaskEventKind,
    TaskHandler,
    TaskManager,
    TaskManagerStopped,
    TaskState,
    Unschedulable,
)
from marionette.periodic import next_cron, next_grid

Clock = freezegun.api.FrozenDateTimeFactory

BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")


# -- helpers -----------------------------------------------------------------------


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=UTC)


def last_run(periodic: Periodic) -> TaskHandler:
    """The periodic's latest run, which must exist."""
    run = periodic.last
    assert run is not None
    return run


def close(actual: datetime | None, expected: datetime) -> bool:
    """Equal within a millisecond (monotonic <-> wall conversions round)."""
    return actual is not None and abs(actual - expected) < timedelta(milliseconds=1)


def advance(clock: Clock, manager: TaskManager, seconds: float) -> None:
    """Move the frozen clock and let the scheduler hand out what is due."""
    clock.tick(seconds)
    manager.scheduler.wake()


class Runs:
    """A periodic body that records the (frozen) wall time of each run."""

    def __init__(self, body: Callable[[Context], Any] | None = None) -> None:
        self._lock = threading.Lock()
        self.times: list[datetime] = []
        self._body = body

    def __call__(self, ctx: Context) -> int:
        with self._lock:
            self.times.append(datetime.now(UTC))
            count = len(self.times)
        if self._body is not None:
            self._body(ctx)
        return count

    @property
    def count(self) -> int:
        with self._lock:
            return len(self.times)


class Overlap:
    """Counts how many calls are inside at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.inside = 0
        self.peak = 0

    def __enter__(self) -> None:
        with self._lock:
            self.inside += 1
            self.peak = max(self.peak, self.inside)

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self.inside -= 1


class Blocker:
    """A task that says when it started and returns once released."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()

    def __call__(self, ctx: Context) -> str:
        self.started.set()
        self.release.wait(WAIT)
        return "blocker"


# -- next_grid -----------------------------------------------------------------------


def test_next_grid_returns_a_future_grid_point_unchanged() -> None:
    """A grid point still ahead of now is the next run."""
    assert next_grid(100.0, 10.0, 95.0) == 100.0


def test_next_grid_is_strictly_after_now() -> None:
    """A grid point equal to now is not the next run: the one after it is."""
    assert next_grid(100.0, 10.0, 100.0) == 110.0


def test_next_grid_collapses_missed_points_into_one() -> None:
    """After a stall the next run is the first grid point after now, not a backlog."""
    assert next_grid(100.0, 10.0, 173.5) == 180.0


def test_next_grid_counts_elapsed_time_across_a_dst_gap() -> None:
    """An hourly grid spans Berlin's spring gap in 3600 s: 01:30 CET, then 03:30 CEST."""
    grid = utc(2026, 3, 29, 0, 30).timestamp()  # 01:30 CET
    following = next_grid(grid, 3600.0, grid + 1)
    assert following - grid == 3600.0
    wall = datetime.fromtimestamp(following, BERLIN)
    assert (wall.hour, wall.minute) == (3, 30)
    assert wall.utcoffset() == timedelta(hours=2)


def test_next_grid_counts_elapsed_time_across_a_dst_fold() -> None:
    """Across New York's autumn fold an hourly grid visits 01:30 twice (EDT, then EST)."""
    grid = utc(2026, 11, 1, 5, 30).timestamp()  # 01:30 EDT
    following = next_grid(grid, 3600.0, grid)
    wall = datetime.fromtimestamp(following, NEW_YORK)
    assert following - grid == 3600.0
    assert (wall.hour, wall.minute) == (1, 30)
    assert wall.utcoffset() == timedelta(hours=-5)


# -- next_cron -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "zone", "after", "expected"),
    [
        # An ordinary day: 02:30 CET is 01:30 UTC.
        ("30 2 * * *", BERLIN, utc(2026, 3, 28, 0, 0), utc(2026, 3, 28, 1, 30)),
        # Spring gap: 02:30 does not exist on 29 March; the next is 30 March, CEST.
        ("30 2 * * *", BERLIN, utc(2026, 3, 28, 2, 0), utc(2026, 3, 30, 0, 30)),
        # Hourly across the gap: 01:30 CET, then 03:30 CEST (02:30 skipped).
        ("30 * * * *", BERLIN, utc(2026, 3, 29, 0, 30), utc(2026, 3, 29, 1, 30)),
        # A whole hour that does not exist: nothing on 29 March.
        ("* 2 * * *", BERLIN, utc(2026, 3, 28, 23, 0), utc(2026, 3, 30, 0, 0)),
        # New York spring gap (8 March 2026): 02:30 skipped, next is 9 March, EDT.
        ("30 2 * * *", NEW_YORK, utc(2026, 3, 7, 8, 0), utc(2026, 3, 9, 6, 30)),
        ("0 12 * * *", NEW_YORK, utc(2026, 3, 8, 0, 0), utc(2026, 3, 8, 16, 0)),
    ],
)
def test_next_cron_skips_wall_times_in_the_spring_gap(
    expression: str, zone: ZoneInfo, after: datetime, expected: datetime
) -> None:
    """A wall time that does not exist is skipped, not moved to the end of the gap."""
    found = next_cron(expression, zone, after)
    assert found is not None
    assert found.astimezone(UTC) == expected


@pytest.mark.parametrize(
    ("expression", "zone", "after", "expected"),
    [
        # Berlin, 25 October 2026: 02:30 happens at 00:30 UTC (CEST) and 01:30 UTC (CET).
        ("30 2 * * *", BERLIN, utc(2026, 10, 24, 23, 0), utc(2026, 10, 25, 0, 30)),
        # After the first occurrence, the second is not a run: the next is the 26th.
        ("30 2 * * *", BERLIN, utc(2026, 10, 25, 0, 30), utc(2026, 10, 26, 1, 30)),
        # Also when asked from inside the repeated hour.
        ("30 2 * * *", BERLIN, utc(2026, 10, 25, 1, 0), utc(2026, 10, 26, 1, 30)),
        # Hourly: 02:00 CEST runs, 02:00 CET does not, then 03:00 CET.
        ("0 * * * *", BERLIN, utc(2026, 10, 25, 0, 0), utc(2026, 10, 25, 2, 0)),
        # New York, 1 November 2026: 01:30 EDT (05:30 UTC) and 01:30 EST (06:30 UTC).
        ("30 1 * * *", NEW_YORK, utc(2026, 11, 1, 4, 0), utc(2026, 11, 1, 5, 30)),
        ("30 1 * * *", NEW_YORK, utc(2026, 11, 1, 5, 30), utc(2026, 11, 2, 6, 30)),
        ("*/20 1 * * *", NEW_YORK, utc(2026, 11, 1, 5, 40), utc(2026, 11, 2, 6, 0)),
    ],
)
def test_next_cron_runs_a_repeated_wall_time_once_at_its_first_occurrence(
    expression: str, zone: ZoneInfo, after: datetime, expected: datetime
) -> None:
    """In the autumn fold a wall time that occurs twice runs once, the first time."""
    found = next_cron(expression, zone, after)
    assert found is not None
    assert found.astimezone(UTC) == expected


def test_next_cron_is_strictly_after_the_given_time() -> None:
    """An `after` that matches the expression yields the following match."""
    found = next_cron("0 * * * *", UTC, utc(2026, 1, 5, 12, 0))
    assert found == utc(2026, 1, 5, 13, 0)


def test_next_cron_walks_through_berlin_autumn_day_without_repeats() -> None:
    """*/30 through Berlin's autumn change: instants increase and no wall time repeats."""
    after = utc(2026, 10, 24, 22, 0)  # midnight CEST
    seen: list[datetime] = []
    for _ in range(12):
        found = next_cron("*/30 * * * *", BERLIN, after)
        assert found is not None
        seen.append(found)
        after = found
    instants = [s.astimezone(UTC) for s in seen]
    walls = [s.astimezone(BERLIN).replace(tzinfo=None) for s in seen]
    assert instants == sorted(instants)
    assert len(set(walls)) == len(walls)
    assert walls[:6] == [
        datetime(2026, 10, 25, h, m) for h, m in [(0, 30), (1, 0), (1, 30), (2, 0), (2, 30), (3, 0)]
    ]


# -- every: validation ----------------------------------------------------------------


def test_repr_shows_the_next_run_without_taking_the_managers_lock(tm: TaskManager) -> None:
    """The scheduler shares the manager's lock: a repr made under it must not wait."""
    periodic = tm.every(3600, lambda ctx: None, name="hourly")
    acquired = tm._lock.acquire(timeout=WAIT)
    assert acquired
    try:  # as an error message or a log line built under the lock would
        text = repr(periodic)
    finally:
        tm._lock.release()
    next_run = periodic.next_run
    assert next_run is not None
    shown = datetime.fromisoformat(text.split("next=")[1].split()[0])
    assert abs(shown - next_run) < timedelta(seconds=1)
    assert text.startswith("<Periodic hourly active next=")
    periodic.cancel()
    assert "next=- " in repr(periodic)


@pytest.mark.parametrize("interval", [0, -1, 0.0, timedelta(0), timedelta(seconds=-5)])
def test_every_rejects_a_non_positive_interval(tm: TaskManager, interval: Any) -> None:
    """interval <= 0 raises ValueError."""
    with pytest.raises(ValueError, match="interval"):
        tm.every(interval, lambda ctx: None)


@pytest.mark.parametrize("interval", [float("nan"), float("inf")])
def test_every_rejects_a_non_finite_interval(tm: TaskManager, interval: float) -> None:
    """A NaN or infinite interval raises ValueError."""
    with pytest.raises(ValueError, match="interval"):
        tm.every(interval, lambda ctx: None)


def test_every_rejects_negative_jitter(tm: TaskManager) -> None:
    """jitter < 0 raises ValueError."""
    with pytest.raises(ValueError, match="jitter"):
        tm.every(10, lambda ctx: None, jitter=-0.5)


def test_every_rejects_a_naive_start(tm: TaskManager) -> None:
    """A naive start datetime raises Unschedulable."""
    with pytest.raises(Unschedulable):
        tm.every(10, lambda ctx: None, start=datetime(2030, 1, 1))


def test_every_and_cron_raise_on_a_stopped_manager() -> None:
    """every() and cron() on a manager that is not running raise TaskManagerStopped."""
    manager = TaskManager(workers=1)
    with pytest.raises(TaskManagerStopped):
        manager.every(10, lambda ctx: None)
    with pytest.raises(TaskManagerStopped):
        manager.cron("* * * * *", lambda ctx: None)
    manager.start()
    manager.stop()
    with pytest.raises(TaskManagerStopped):
        manager.every(10, lambda ctx: None)


@pytest.mark.parametrize("expression", ["* * *", "61 * * * *", "not cron", "* * * * * * *", ""])
def test_cron_rejects_an_invalid_expression(tm: TaskManager, expression: str) -> None:
    """An invalid cron expression raises ValueError at the call."""
    with pytest.raises(ValueError, match="cron"):
        tm.cron(expression, lambda ctx: None)


def test_cron_rejects_an_unknown_zone(tm: TaskManager) -> None:
    """An unknown zone name raises ValueError at the call."""
    with pytest.raises(ValueError, match="Mars/Olympus_Mons"):
        tm.cron("0 * * * *", lambda ctx: None, tz="Mars/Olympus_Mons")


def test_every_rejects_an_unknown_group(tm: TaskManager) -> None:
    """A periodic's runs are ordinary tasks: an unknown group raises at the call."""
    with pytest.raises(ValueError, match="group"):
        tm.every(10, lambda ctx: None, group="nope")


# -- every: planning -------------------------------------------------------------------


def test_first_run_is_one_interval_from_now_by_default(frozen: Clock, tm: TaskManager) -> None:
    """Without start, the first run is planned one interval ahead and not before."""
    t0 = datetime.now(UTC)
    runs = Runs()
    p = tm.every(10, runs)
    assert close(p.next_run, t0 + timedelta(seconds=10))
    assert p.last is None
    advance(frozen, tm, 9)
    assert p.last is None
    assert runs.count == 0
    advance(frozen, tm, 1)
    assert last_run(p).result(WAIT) == 1
    assert p.runs == 1


@pytest.mark.parametrize("start", [3, 3.0, timedelta(seconds=3)])
def test_start_as_a_delay_sets_the_grid(frozen: Clock, tm: TaskManager, start: Any) -> None:
    """start= a delay: the first run then, later runs start + k * interval."""
    t0 = datetime.now(UTC)
    p = tm.every(10, Runs(), start=start)
    assert close(p.next_run, t0 + timedelta(seconds=3))
    advance(frozen, tm, 3)
    assert p.last is not None
    p.last.result(WAIT)
    assert close(p.next_run, t0 + timedelta(seconds=13))


def test_start_as_an_aware_datetime(frozen: Clock, tm: TaskManager) -> None:
    """start= an aware datetime (any zone) is honoured."""
    t0 = datetime.now(UTC)
    at = (t0 + timedelta(seconds=7)).astimezone(BERLIN)
    p = tm.every(60, Runs(), start=at)
    assert close(p.next_run, t0 + timedelta(seconds=7))
    advance(frozen, tm, 7)
    assert last_run(p).result(WAIT) == 1


def test_a_past_start_means_now(frozen: Clock, tm: TaskManager) -> None:
    """A start in the past runs at once, then stays on its grid."""
    t0 = datetime.now(UTC)
    p = tm.every(10, Runs(), start=t0 - timedelta(seconds=25))
    tm.scheduler.wake()
    assert last_run(p).result(WAIT) == 1
    assert close(p.next_run, t0 + timedelta(seconds=5))


def test_fixed_rate_stays_on_the_grid_however_long_runs_take(
    frozen: Clock, tm: TaskManager
) -> None:
    """Fixed rate: runs that take 3 s still start at t0+10, t0+20, t0+30."""
    t0 = datetime.now(UTC)
    runs = Runs(lambda ctx: frozen.tick(3))  # each run "takes" 3 s of clock time
    p = tm.every(10, runs)
    advance(frozen, tm, 10)
    for k in (1, 2, 3):
        assert p.last is not None
        assert p.last.result(WAIT) == k
        assert close(p.next_run, t0 + timedelta(seconds=10 * (k + 1)))
        advance(frozen, tm, 7)
    assert runs.times[:3] == [t0 + timedelta(seconds=10 * k) for k in (1, 2, 3)]


def test_fixed_delay_plans_from_the_end_of_the_previous_run(frozen: Clock, tm: TaskManager) -> None:
    """Fixed delay: next run one interval after the previous ended; none planned during it."""
    t0 = datetime.now(UTC)
    holder: list[Any] = []
    during: list[datetime | None] = []

    def body(ctx: Context) -> None:
        during.append(holder[0].next_run)
        frozen.tick(3)

    runs = Runs(body)
    p = tm.every(10, runs, fixed_delay=True)
    holder.append(p)
    assert close(p.next_run, t0 + timedelta(seconds=10))
    advance(frozen, tm, 10)
    assert p.last is not None
    p.last.result(WAIT)
    assert close(p.next_run, t0 + timedelta(seconds=23))
    advance(frozen, tm, 10)
    assert last_run(p).result(WAIT) == 2
    assert close(p.next_run, t0 + timedelta(seconds=36))
    assert during == [None, None]
    assert runs.times == [t0 + timedelta(seconds=10), t0 + timedelta(seconds=23)]


def test_jitter_is_added_to_the_grid_and_never_accumulates(
    frozen: Clock, tm: TaskManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the largest jitter every time, run k is at t0 + 10k + 2, not drifting."""
    monkeypatch.setattr(random, "uniform", lambda a, b: b)
    t0 = datetime.now(UTC)
    p = tm.every(10, Runs(), jitter=2)
    assert close(p.next_run, t0 + timedelta(seconds=12))
    advance(frozen, tm, 12)
    for k in range(1, 8):
        assert p.last is not None
        assert p.last.result(WAIT) == k
        assert close(p.next_run, t0 + timedelta(seconds=10 * (k + 1) + 2))
        advance(frozen, tm, 10)


def test_jitter_stays_within_bounds(frozen: Clock, tm: TaskManager) -> None:
    """Each planned run lies in [grid, grid + jitter], and jitter really varies."""
    t0 = datetime.now(UTC)
    p = tm.every(10, Runs(), jitter=2)
    offsets: list[float] = []
    for k in range(1, 21):
        planned = p.next_run
        assert planned is not None
        offset = (planned - (t0 + timedelta(seconds=10 * k))).total_seconds()
        assert -0.001 <= offset <= 2.001
        offsets.append(offset)
        advance(frozen, tm, 10 if k > 1 else 12)
        assert p.last is not None
        assert p.last.result(WAIT) == k
    assert len({round(o, 3) for o in offsets}) > 1


def test_a_stall_turns_missed_runs_into_one(frozen: Clock, tm: TaskManager) -> None:
    """After the clock jumps 9.5 intervals, one run happens and the grid resumes."""
    t0 = datetime.now(UTC)
    runs = Runs()
    p = tm.every(10, runs)
    advance(frozen, tm, 95)
    assert last_run(p).result(WAIT) == 1
    tm.scheduler.wake()
    assert tm.join(WAIT)
    assert runs.count == 1
    assert p.runs == 1
    assert p.coalesced == 0
    assert close(p.next_run, t0 + timedelta(seconds=100))


def test_missed_runs_while_stopped_become_one_run(frozen: Clock, tm: TaskManager) -> None:
    """A periodic survives stop()/start(); the runs missed while stopped become one."""
    t0 = datetime.now(UTC)
    runs = Runs()
    p = tm.every(10, runs)
    tm.stop()
    frozen.tick(55)
    tm.scheduler.wake()  # stopped: returns at once, hands nothing out
    assert p.last is None
    tm.start()
    tm.scheduler.wake()
    assert last_run(p).result(WAIT) == 1
    assert tm.join(WAIT)
    assert runs.count == 1
    assert close(p.next_run, t0 + timedelta(seconds=60))
    advance(frozen, tm, 5)
    assert last_run(p).result(WAIT) == 2
    assert tm.join(WAIT)
    assert runs.count == 2


def test_a_run_counts_as_submitted_when_it_becomes_due(frozen: Clock, tm: TaskManager) -> None:
    """Planning a run is not a submission; the run is counted once it is due."""
    before = tm.stats().submitted
    p = tm.every(10, Runs())
    assert tm.stats().submitted == before
    advance(frozen, tm, 9)
    assert tm.stats().submitted == before
    advance(frozen, tm, 1)
    assert tm.stats().submitted == before + 1
    assert p.last is not None
    p.last.result(WAIT)


def test_join_does_not_wait_for_future_runs(frozen: Clock, tm: TaskManager) -> None:
    """join() returns with a periodic planned; it waits only for runs already due."""
    blocker = Blocker()
    p = tm.every(10, blocker)
    assert tm.join(WAIT)
    advance(frozen, tm, 10)
    assert blocker.started.wait(WAIT)
    assert not tm.join(0.05)  # the due run is still running
    blocker.release.set()
    assert tm.join(WAIT)
    assert p.last is not None
    assert p.last.state is TaskState.SUCCEEDED


# -- never two runs at once, never a backlog ------------------------------------------


def test_a_run_due_before_the_previous_started_is_coalesced(frozen: Clock) -> None:
    """Occurrences due before the waiting run starts merge into it; it still runs later."""
    manager = TaskManager(workers=1)
    manager.start()
    blocker = Blocker()
    try:
        events: list[TaskEvent] = []
        manager.add_listener(events.append, events=[TaskEventKind.COALESCED])
        manager.queue(blocker)
        assert blocker.started.wait(WAIT)
        runs = Runs()
        p = manager.every(10, runs)
        advance(frozen, manager, 10)
        first = p.last
        assert first is not None
        assert first.state is TaskState.PENDING
        advance(frozen, manager, 10)
        advance(frozen, manager, 10)
        assert p.coalesced == 2
        assert manager.stats().coalesced == 2
        assert p.last is first
        assert p.runs == 0
        blocker.release.set()
        assert first.result(WAIT) == 1
        assert manager.join(WAIT)
        assert p.runs == 1
        assert runs.count == 1
        manager.stop()
        assert [e.task for e in events] == [first, first]
    finally:
        blocker.release.set()
        manager.stop(timeout=WAIT)


def test_a_run_due_while_the_previous_runs_waits_and_starts_right_after(
    frozen: Clock, tm: TaskManager
) -> None:
    """One catch-up run waits behind the running one and starts right after it ends."""
    overlap = Overlap()
    blocker = Blocker()
    calls: list[int] = []

    def body(ctx: Context) -> None:
        with overlap:
            calls.append(ctx.attempt)
            if len(calls) == 1:
                blocker(ctx)

    p = tm.every(10, body)
    advance(frozen, tm, 10)
    first = p.last
    assert first is not None
    assert blocker.started.wait(WAIT)
    advance(frozen, tm, 10)
    second = p.last
    assert second is not first
    assert second is not None
    advance(frozen, tm, 10)
    advance(frozen, tm, 10)
    assert p.coalesced == 2
    assert p.last is second
    # Ungated probes queued behind the catch-up run: once they are done, a worker
    # has met the catch-up run and held it back.
    for probe in [tm.queue(lambda ctx: None) for _ in range(4)]:
        probe.result(WAIT)
    assert second.state is TaskState.PENDING
    assert calls == [1]
    blocker.release.set()
    first.result(WAIT)
    second.result(WAIT)
    assert tm.join(WAIT)
    assert overlap.peak == 1
    assert p.runs == 2
    assert len(calls) == 2


def test_get_finds_the_pending_then_the_running_run(frozen: Clock, tm: TaskManager) -> None:
    """A periodic's key finds its pending run, then its running run, else nothing."""
    blocker = Blocker()
    p = tm.every(10, blocker, key="poll")
    assert p.key == "poll"
    assert tm.get("poll") is None
    advance(frozen, tm, 10)
    run = p.last
    assert run is not None
    assert blocker.started.wait(WAIT)
    assert tm.get("poll") is run
    advance(frozen, tm, 10)
    catch_up = p.last
    assert catch_up is not run
    assert tm.get("poll") is catch_up
    blocker.release.set()
    assert tm.join(WAIT)
    assert tm.get("poll") is None


def test_a_second_periodic_with_a_key_in_use_returns_the_existing_one(tm: TaskManager) -> None:
    """every/cron with a key in use return the existing Periodic, unchanged."""
    p = tm.every(10, lambda ctx: "a", key="sync")
    assert tm.every(99, lambda ctx: "b", key="sync") is p
    assert tm.cron("* * * * *", lambda ctx: "c", key="sync") is p
    c = tm.cron("0 * * * *", lambda ctx: "d", key="hourly")
    assert tm.every(5, lambda ctx: "e", key="hourly") is c
    assert c is not p
    p.cancel()
    c.cancel()


def test_a_cancelled_periodic_frees_its_key(tm: TaskManager) -> None:
    """After cancel(), the key can name a new periodic."""
    p = tm.every(10, lambda ctx: "a", key="sync")
    p.cancel()
    q = tm.every(10, lambda ctx: "b", key="sync")
    assert q is not p
    q.cancel()


# -- pause, resume, cancel -------------------------------------------------------------


def test_pause_stops_runs_and_resume_plans_after_now_without_catch_up(
    frozen: Clock, tm: TaskManager
) -> None:
    """Paused: no next_run, no runs; resume plans the next grid point after now, no catch-up."""
    t0 = datetime.now(UTC)
    runs = Runs()
    p = tm.every(10, runs)
    p.pause()
    assert p.paused()
    assert p.next_run is None
    advance(frozen, tm, 35)
    assert p.last is None
    assert tm.stats().submitted == 0
    p.resume()
    assert not p.paused()
    assert close(p.next_run, t0 + timedelta(seconds=40))
    tm.scheduler.wake()
    assert p.last is None
    advance(frozen, tm, 5)
    assert last_run(p).result(WAIT) == 1
    assert runs.count == 1


def test_pause_drops_a_run_not_yet_started(frozen: Clock) -> None:
    """pause() cancels a run that is queued and has not started."""
    manager = TaskManager(workers=1)
    manager.start()
    blocker = Blocker()
    try:
        manager.queue(blocker)
        assert blocker.started.wait(WAIT)
        runs = Runs()
        p = manager.every(10, runs)
        advance(frozen, manager, 10)
        waiting = p.last
        assert waiting is not None
        p.pause()
        assert waiting.state is TaskState.CANCELLED
        blocker.release.set()
        assert manager.join(WAIT)
        assert runs.count == 0
    finally:
        blocker.release.set()
        manager.stop(timeout=WAIT)


def test_cancel_is_idempotent_and_lets_a_running_run_finish(frozen: Clock, tm: TaskManager) -> None:
    """cancel() twice is harmless; the running run finishes; nothing runs afterwards."""
    blocker = Blocker()
    p = tm.every(10, blocker)
    advance(frozen, tm, 10)
    run = p.last
    assert run is not None
    assert blocker.started.wait(WAIT)
    p.cancel()
    p.cancel()
    assert p.cancelled()
    assert p.next_run is None
    assert run.state is TaskState.RUNNING
    blocker.release.set()
    assert run.result(WAIT) == "blocker"
    advance(frozen, tm, 30)
    assert tm.join(WAIT)
    assert p.last is run
    assert p.runs == 1


def test_cancel_drops_a_queued_run(frozen: Clock) -> None:
    """cancel() removes a run that is queued and has not started."""
    manager = TaskManager(workers=1)
    manager.start()
    blocker = Blocker()
    try:
        manager.queue(blocker)
        assert blocker.started.wait(WAIT)
        runs = Runs()
        p = manager.every(10, runs)
        advance(frozen, manager, 10)
        waiting = p.last
        assert waiting is not None
        p.cancel()
        p.cancel()
        assert waiting.state is TaskState.CANCELLED
        blocker.release.set()
        assert manager.join(WAIT)
        assert runs.count == 0
        assert p.runs == 0
    finally:
        blocker.release.set()
        manager.stop(timeout=WAIT)


def test_runs_are_ordinary_tasks_with_the_options(frozen: Clock, tm: TaskManager) -> None:
    """A run gets the options: here retries with an immediate backoff, and a name."""
    attempts: list[int] = []

    def flaky(ctx: Context) -> int:
        attempts.append(ctx.attempt)
        if ctx.attempt == 1:
            raise OSError("first attempt fails")
        return ctx.attempt

    p = tm.every(10, flaky, retries=1, backoff=0, name="flaky-poll")
    advance(frozen, tm, 10)
    run = p.last
    assert run is not None
    assert run.result(WAIT) == 2
    assert run.name == "flaky-poll"
    assert attempts == [1, 2]
    assert p.runs == 1


# -- cron end to end -------------------------------------------------------------------


def test_cron_runs_on_its_schedule_in_utc(frozen: Clock, tm: TaskManager) -> None:
    """A five-field cron in UTC (the default) runs at each matching minute."""
    runs = Runs()
    p = tm.cron("*/5 * * * *", runs)
    assert p.next_run == utc(2026, 1, 5, 12, 5)
    advance(frozen, tm, 299)
    assert p.last is None
    advance(frozen, tm, 1)
    assert last_run(p).result(WAIT) == 1
    assert p.next_run == utc(2026, 1, 5, 12, 10)


def test_cron_across_berlin_spring_gap_end_to_end(frozen: Clock, tm: TaskManager) -> None:
    """Hourly :30 in Berlin on 29 March 2026: 01:30 CET runs, then 03:30 CEST (02:30 skipped)."""
    frozen.move_to("2026-03-29 00:00:00")
    runs = Runs()
    p = tm.cron("30 * * * *", runs, tz="Europe/Berlin")
    assert p.next_run == utc(2026, 3, 29, 0, 30)
    advance(frozen, tm, 1800)
    assert last_run(p).result(WAIT) == 1
    assert p.next_run == utc(2026, 3, 29, 1, 30)
    advance(frozen, tm, 3600)
    assert last_run(p).result(WAIT) == 2
    assert [t.astimezone(BERLIN).hour for t in runs.times] == [1, 3]


def test_cron_across_new_york_autumn_fold_end_to_end(frozen: Clock, tm: TaskManager) -> None:
    """Daily 01:30 in New York on 1 November 2026 runs at 01:30 EDT only, not at 01:30 EST."""
    frozen.move_to("2026-11-01 04:00:00")
    runs = Runs()
    p = tm.cron("30 1 * * *", runs, tz=NEW_YORK)
    assert p.next_run == utc(2026, 11, 1, 5, 30)
    advance(frozen, tm, 5400)
    assert last_run(p).result(WAIT) == 1
    assert p.next_run == utc(2026, 11, 2, 6, 30)
    advance(frozen, tm, 3600)  # 01:30 EST, the repeated wall time
    assert tm.join(WAIT)
    assert runs.count == 1


def test_cron_missed_while_stopped_runs_once(frozen: Clock, tm: TaskManager) -> None:
    """A minutely cron stopped for ten minutes runs once after start(), then on time."""
    runs = Runs()
    p = tm.cron("* * * * *", runs)
    tm.stop()
    frozen.tick(600)
    tm.start()
    tm.scheduler.wake()
    assert last_run(p).result(WAIT) == 1
    assert tm.join(WAIT)
    assert runs.count == 1
    assert p.next_run == utc(2026, 1, 5, 12, 11)


def test_cron_accepts_an_alias(frozen: Clock, tm: TaskManager) -> None:
    """@hourly is accepted and means minute 0 of every hour."""
    p = tm.cron("@hourly", Runs())
    assert p.next_run == utc(2026, 1, 5, 13, 0)
    p.cancel()


def test_fixed_rate_goes_on_after_a_waiting_run_is_cancelled(frozen: Clock) -> None:
    """Cancelling one waiting run of a fixed-rate periodic does not stop the periodic."""
    manager = TaskManager(workers=1)
    manager.start()
    blocker = Blocker()
    try:
        manager.queue(blocker)
        assert blocker.started.wait(WAIT)
        runs = Runs()
        p = manager.every(10, runs)
        advance(frozen, manager, 10)
        assert p.last is not None
        assert p.last.cancel()
        blocker.release.set()
        assert manager.join(WAIT)
        assert p.next_run is not None
        advance(frozen, manager, 10)
        assert p.last.result(WAIT) == 1
    finally:
        blocker.release.set()
        manager.stop(timeout=WAIT)


def test_fixed_delay_goes_on_after_a_waiting_run_is_cancelled(frozen: Clock) -> None:
    """Cancelling one run that has not started keeps a fixed-delay periodic going."""
    manager = TaskManager(workers=1)
    manager.start()
    blocker = Blocker()
    try:
        manager.queue(blocker)
        assert blocker.started.wait(WAIT)
        runs = Runs()
        p = manager.every(10, runs, fixed_delay=True)
        advance(frozen, manager, 10)
        assert p.last is not None
        assert p.last.cancel()
        blocker.release.set()
        assert manager.join(WAIT)
        assert not p.paused()
        assert not p.cancelled()
        assert p.next_run is not None
    finally:
        blocker.release.set()
        manager.stop(timeout=WAIT)


def test_every_resumed_before_its_planned_run_keeps_that_run(
    frozen: Clock, tm: TaskManager
) -> None:
    """every(): resumed before its planned run, the periodic keeps that run."""
    t0 = datetime.now(UTC)
    p = tm.every(300, Runs())
    frozen.tick(60)
    p.pause()
    frozen.tick(120)
    p.resume()
    assert close(p.next_run, t0 + timedelta(minutes=5))


def test_cron_resumed_before_its_planned_run_keeps_that_run(frozen: Clock, tm: TaskManager) -> None:
    """cron(): resumed at 12:03 after a pause at 12:01, */5 runs next at 12:05."""
    runs = Runs()
    p = tm.cron("*/5 * * * *", runs)
    assert p.next_run == utc(2026, 1, 5, 12, 5)
    frozen.tick(60)
    p.pause()
    frozen.tick(120)
    p.resume()
    assert p.next_run == utc(2026, 1, 5, 12, 5)
