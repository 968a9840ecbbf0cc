"""Keys (one pending instance per name, never two running), get, reschedule, pending
and handler.due."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import freezegun.api
import pytest
from conftest import WAIT

from marionette import (
    Context,
    QueueFull,
    TaskEventKind,
    TaskHandler,
    TaskManager,
    TaskState,
    Unschedulable,
)

Clock = freezegun.api.FrozenDateTimeFactory


# -- helpers -----------------------------------------------------------------------


def close(actual: datetime | None, expected: datetime) -> bool:
    """Equal within a millisecond (monotonic <-> wall conversions round)."""
    return actual is not None and abs(actual - expected) < timedelta(milliseconds=1)


def advance(clock: Clock, manager: TaskManager, seconds: float) -> None:
    """Move the frozen clock and let the scheduler hand out what is due."""
    clock.tick(seconds)
    manager.scheduler.wake()


class Blocker:
    """A task that says when it started and returns once released."""

    def __init__(self, value: str = "blocker") -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.value = value

    def __call__(self, ctx: Context) -> str:
        self.started.set()
        self.release.wait(WAIT)
        return self.value


class Overlap:
    """A task body that counts how many of its calls run at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.inside = 0
        self.peak = 0
        self.calls = 0

    def __call__(self, ctx: Context) -> int:
        with self._lock:
            self.inside += 1
            self.calls += 1
            self.peak = max(self.peak, self.inside)
        try:
            total = 0
            for n in range(2000):  # a little work, to widen any overlap window
                total += n
            return total
        finally:
            with self._lock:
                self.inside -= 1


def drain_queue(manager: TaskManager, n: int = 4) -> None:
    """Queue `n` ungated probes and wait for them: every task queued before them has
    then been met by a worker (started, or held by its gate)."""
    for probe in [manager.queue(lambda ctx: None) for _ in range(n)]:
        probe.result(WAIT)


def retrying_listener(manager: TaskManager) -> threading.Event:
    """An Event set once a RETRYING event was delivered."""
    seen = threading.Event()
    manager.add_listener(lambda event: seen.set(), events=[TaskEventKind.RETRYING])
    return seen


def fail_once(ctx: Context) -> str:
    if ctx.attempt == 1:
        raise OSError("first attempt fails")
    return f"ok on {ctx.attempt}"


@pytest.fixture
def busy() -> Iterator[tuple[TaskManager, Blocker]]:
    """A running one-worker manager whose worker is held by a blocker until the end."""
    manager = TaskManager(workers=1)
    manager.start()
    blocker = Blocker()
    try:
        manager.queue(blocker)
        assert blocker.started.wait(WAIT)
        yield manager, blocker
    finally:
        blocker.release.set()
        manager.stop(timeout=WAIT)


SUBMIT: dict[str, Callable[..., TaskHandler]] = {
    "queue": lambda m, fn, **o: m.queue(fn, **o),
    "delay": lambda m, fn, **o: m.delay(60, fn, **o),
    "schedule": lambda m, fn, **o: m.schedule(datetime.now(UTC) + timedelta(seconds=60), fn, **o),
}


# -- one pending instance --------------------------------------------------------------


@pytest.mark.parametrize("second", list(SUBMIT))
@pytest.mark.parametrize("first", list(SUBMIT))
def test_a_second_submission_with_a_pending_key_returns_the_same_handler(
    busy: tuple[TaskManager, Blocker], first: str, second: str
) -> None:
    """A duplicate key returns the pending handler; it is not counted and never runs."""
    manager, blocker = busy
    duplicate_calls: list[int] = []
    before = manager.stats().submitted
    original = SUBMIT[first](manager, lambda ctx: "original", key="k")
    due = original.due
    assert due is not None
    again = SUBMIT[second](manager, lambda ctx: duplicate_calls.append(1), key="k")
    assert again is original
    assert close(original.due, due)
    assert manager.stats().submitted == before + 1
    assert manager.get("k") is original
    blocker.release.set()
    manager.reschedule(original, 0)  # a delayed/scheduled original becomes due now
    assert original.result(WAIT) == "original"
    assert manager.join(WAIT)
    assert duplicate_calls == []
    assert manager.stats().submitted == before + 1


def test_a_keyed_submission_while_its_namesake_runs_waits_for_it(tm: TaskManager) -> None:
    """A keyed task submitted while its namesake runs is pending and starts after it."""
    blocker = Blocker("first")
    running = tm.queue(blocker, key="k")
    assert blocker.started.wait(WAIT)
    assert tm.get("k") is running
    pending = tm.queue(lambda ctx: running.done(), key="k")
    assert pending is not running
    assert tm.get("k") is pending
    assert tm.queue(lambda ctx: "third", key="k") is pending
    assert tm.delay(5, lambda ctx: "fourth", key="k") is pending
    drain_queue(tm)
    assert pending.state is TaskState.PENDING
    assert running.state is TaskState.RUNNING
    blocker.release.set()
    assert running.result(WAIT) == "first"
    assert pending.result(WAIT) is True  # it saw its namesake done when it started
    assert tm.stats().submitted == 2 + 4


def test_keyed_submissions_from_eight_threads_never_overlap(tm: TaskManager) -> None:
    """Eight threads submitting one key: never two running; each distinct handler runs once."""
    body = Overlap()
    barrier = threading.Barrier(8)
    returned: list[list[TaskHandler]] = [[] for _ in range(8)]

    def submitter(index: int) -> None:
        barrier.wait(WAIT)
        out = returned[index]
        for n in range(150):
            how = (index + n) % 3
            if how == 0:
                out.append(tm.queue(body, key="shared"))
            elif how == 1:
                out.append(tm.delay(0, body, key="shared"))
            else:
                out.append(tm.schedule(datetime.now(UTC), body, key="shared"))

    threads = [threading.Thread(target=submitter, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    assert not any(t.is_alive() for t in threads)
    assert sum(len(out) for out in returned) == 8 * 150
    assert tm.join(WAIT)
    distinct = {h.id: h for out in returned for h in out}
    assert body.peak == 1
    assert body.calls == len(distinct)
    assert all(h.state is TaskState.SUCCEEDED for h in distinct.values())
    assert tm.stats().submitted == len(distinct)
    assert tm.get("shared") is None


def test_a_task_waiting_for_a_retry_counts_as_running_for_its_key(
    frozen: Clock, tm: TaskManager
) -> None:
    """A retry waiting for its backoff holds its key: the namesake starts after it."""
    retrying = retrying_listener(tm)
    order: list[str] = []

    def flaky(ctx: Context) -> str:
        order.append(f"A{ctx.attempt}")
        return fail_once(ctx)

    first = tm.queue(flaky, key="k", retries=1, backoff=30)
    assert retrying.wait(WAIT)
    assert first.state is TaskState.SCHEDULED
    assert tm.get("k") is first
    second = tm.queue(lambda ctx: order.append("B"), key="k")
    assert second is not first
    assert tm.get("k") is second
    drain_queue(tm)
    assert second.state is TaskState.PENDING
    assert order == ["A1"]
    advance(frozen, tm, 30)
    assert first.result(WAIT) == "ok on 2"
    second.result(WAIT)
    assert order == ["A1", "A2", "B"]


def test_get_returns_pending_else_running_else_none(tm: TaskManager) -> None:
    """get(key): the pending instance, else the running one, else None."""
    assert tm.get("k") is None
    one, two = Blocker("one"), Blocker("two")
    first = tm.queue(one, key="k")
    assert one.started.wait(WAIT)
    assert tm.get("k") is first
    second = tm.queue(two, key="k")
    assert tm.get("k") is second
    one.release.set()
    assert first.result(WAIT) == "one"
    assert two.started.wait(WAIT)
    assert tm.get("k") is second
    two.release.set()
    assert second.result(WAIT) == "two"
    assert tm.join(WAIT)
    assert tm.get("k") is None
    assert tm.get("other") is None


def test_cancelling_the_pending_instance_frees_the_key(tm: TaskManager) -> None:
    """A cancelled pending instance no longer holds the key: the next submission is new."""
    first = tm.delay(60, lambda ctx: "first", key="k")
    assert first.cancel()
    assert tm.get("k") is None
    second = tm.delay(60, lambda ctx: "second", key="k")
    assert second is not first
    assert tm.get("k") is second
    assert second.cancel()
    assert tm.get("k") is None


def test_cancelling_the_instance_waiting_behind_a_running_one_frees_the_key(
    tm: TaskManager,
) -> None:
    """Cancelling the instance held behind a running one frees the key for a new one."""
    blocker = Blocker("running")
    running = tm.queue(blocker, key="k")
    assert blocker.started.wait(WAIT)
    ran: list[str] = []
    cancelled = tm.queue(lambda ctx: ran.append("cancelled"), key="k")
    drain_queue(tm)
    assert cancelled.cancel()
    assert tm.get("k") is running
    replacement = tm.queue(lambda ctx: ran.append("replacement"), key="k")
    assert replacement is not cancelled
    assert tm.get("k") is replacement
    blocker.release.set()
    replacement.result(WAIT)
    assert tm.join(WAIT)
    assert cancelled.state is TaskState.CANCELLED
    assert ran == ["replacement"]


def test_a_failed_keyed_task_frees_its_key(tm: TaskManager) -> None:
    """A keyed task that failed for good holds its key no more."""

    def boom(ctx: Context) -> None:
        raise ValueError("boom")

    failed = tm.queue(boom, key="k")
    assert isinstance(failed.exception(WAIT), Exception)
    assert tm.join(WAIT)
    assert tm.get("k") is None
    assert tm.queue(lambda ctx: "next", key="k").result(WAIT) == "next"


# -- reschedule --------------------------------------------------------------------------


def test_reschedule_moves_a_delayed_task_sooner(frozen: Clock, tm: TaskManager) -> None:
    """A delay moves a delayed task; it runs at its new time."""
    now = datetime.now(UTC)
    handler = tm.delay(60, lambda ctx: "moved")
    assert tm.reschedule(handler, 5)
    assert close(handler.due, now + timedelta(seconds=5))
    advance(frozen, tm, 4)
    assert handler.state is TaskState.SCHEDULED
    advance(frozen, tm, 1)
    assert handler.result(WAIT) == "moved"


def test_reschedule_by_key_to_an_aware_datetime(frozen: Clock, tm: TaskManager) -> None:
    """A key names the task; an aware datetime (any zone) is the new time."""
    now = datetime.now(UTC)
    handler = tm.schedule(now + timedelta(hours=1), lambda ctx: "moved", key="k")
    at = (now + timedelta(seconds=7)).astimezone(ZoneInfo("America/New_York"))
    assert tm.reschedule("k", at)
    assert close(handler.due, now + timedelta(seconds=7))
    advance(frozen, tm, 6)
    assert handler.state is TaskState.SCHEDULED
    advance(frozen, tm, 1)
    assert handler.result(WAIT) == "moved"


def test_reschedule_can_move_a_task_later(frozen: Clock, tm: TaskManager) -> None:
    """Without only_sooner, a task moves later too and does not run at its old time."""
    now = datetime.now(UTC)
    handler = tm.delay(5, lambda ctx: "later")
    assert tm.reschedule(handler, timedelta(seconds=20))
    assert close(handler.due, now + timedelta(seconds=20))
    advance(frozen, tm, 5)
    assert handler.state is TaskState.SCHEDULED
    advance(frozen, tm, 15)
    assert handler.result(WAIT) == "later"


def test_reschedule_only_sooner_declines_a_later_or_equal_time(
    frozen: Clock, tm: TaskManager
) -> None:
    """only_sooner declines a later or equal time (False, unchanged), moves an earlier one."""
    now = datetime.now(UTC)
    handler = tm.delay(10, lambda ctx: "sooner", key="k")
    assert not tm.reschedule(handler, 20, only_sooner=True)
    assert not tm.reschedule("k", now + timedelta(seconds=30), only_sooner=True)
    assert not tm.reschedule(handler, 10, only_sooner=True)
    assert close(handler.due, now + timedelta(seconds=10))
    assert tm.reschedule("k", now + timedelta(seconds=3), only_sooner=True)
    assert close(handler.due, now + timedelta(seconds=3))
    assert tm.reschedule(handler, 1, only_sooner=True)
    advance(frozen, tm, 1)
    assert handler.result(WAIT) == "sooner"


@pytest.mark.parametrize("by_key", [False, True])
def test_reschedule_moves_a_task_waiting_for_a_retry(
    frozen: Clock, tm: TaskManager, by_key: bool
) -> None:
    """A retry waiting for its backoff is scheduled: reschedule moves it."""
    retrying = retrying_listener(tm)
    handler = tm.queue(fail_once, key="k", retries=1, backoff=60)
    assert retrying.wait(WAIT)
    assert handler.state is TaskState.SCHEDULED
    assert tm.reschedule("k" if by_key else handler, 2, only_sooner=True)
    advance(frozen, tm, 2)
    assert handler.result(WAIT) == "ok on 2"


def test_reschedule_returns_false_for_a_queued_task(busy: tuple[TaskManager, Blocker]) -> None:
    """A queued task is already due: nothing to move, by handler or by key."""
    manager, _ = busy
    queued = manager.queue(lambda ctx: "queued", key="q")
    assert queued.state is TaskState.PENDING
    assert not manager.reschedule(queued, 30)
    assert not manager.reschedule("q", 30)
    assert not manager.reschedule(queued, -1, only_sooner=True)
    assert queued.state is TaskState.PENDING


def test_reschedule_returns_false_for_running_finished_and_unknown(tm: TaskManager) -> None:
    """A running or finished task, or a key nobody uses, is not moved."""
    blocker = Blocker()
    running = tm.queue(blocker, key="r")
    assert blocker.started.wait(WAIT)
    assert not tm.reschedule(running, 5)
    assert not tm.reschedule("r", 5)
    assert not tm.reschedule("nobody", 5)
    blocker.release.set()
    running.result(WAIT)
    assert not tm.reschedule(running, 5)
    cancelled = tm.delay(60, lambda ctx: None)
    assert cancelled.cancel()
    assert not tm.reschedule(cancelled, 5)


def test_reschedule_rejects_a_bad_time(tm: TaskManager) -> None:
    """A naive datetime or NaN raise Unschedulable, a non-time TypeError; nothing moves."""
    handler = tm.delay(60, lambda ctx: None)
    due = handler.due
    assert due is not None
    with pytest.raises(Unschedulable):
        tm.reschedule(handler, datetime(2030, 1, 1))
    with pytest.raises(Unschedulable):
        tm.reschedule(handler, float("nan"))
    with pytest.raises(TypeError):
        tm.reschedule(handler, "soon")  # type: ignore[arg-type]
    assert close(handler.due, due)
    assert handler.cancel()


# -- due and pending ---------------------------------------------------------------------


def test_due_is_aware_utc_while_waiting_and_none_once_running_or_done(
    frozen: Clock, tm: TaskManager
) -> None:
    """handler.due: aware UTC while delayed or scheduled; None while it runs and after."""
    now = datetime.now(UTC)
    delayed = tm.delay(30, lambda ctx: "delayed")
    due = delayed.due
    assert due is not None
    assert due.utcoffset() == timedelta(0)
    assert close(due, now + timedelta(seconds=30))
    berlin = (now + timedelta(seconds=45)).astimezone(ZoneInfo("Europe/Berlin"))
    scheduled = tm.schedule(berlin, lambda ctx: "scheduled")
    assert scheduled.due is not None
    assert scheduled.due.utcoffset() == timedelta(0)
    assert close(scheduled.due, now + timedelta(seconds=45))
    blocker = Blocker()
    running = tm.queue(blocker)
    assert blocker.started.wait(WAIT)
    assert running.due is None
    blocker.release.set()
    running.result(WAIT)
    assert running.due is None
    advance(frozen, tm, 30)
    assert delayed.result(WAIT) == "delayed"
    assert delayed.due is None
    assert scheduled.cancel()
    assert scheduled.due is None


def test_due_of_a_queued_task_is_when_it_was_submitted(
    frozen: Clock, busy: tuple[TaskManager, Blocker]
) -> None:
    """A queued task was due when it was queued; a due delayed task keeps its due time."""
    manager, _ = busy
    now = datetime.now(UTC)
    queued = manager.queue(lambda ctx: None)
    assert close(queued.due, now)
    delayed = manager.delay(10, lambda ctx: None)
    advance(frozen, manager, 15)
    assert delayed.state is TaskState.PENDING
    assert close(delayed.due, now + timedelta(seconds=10))


def test_due_of_a_wrapped_task_is_none(tm: TaskManager) -> None:
    """A handler that was never submitted has no due time."""
    assert tm.wrap_task(lambda ctx: None).due is None


def test_pending_lists_queued_tasks_then_scheduled_ones_in_due_order(
    frozen: Clock, busy: tuple[TaskManager, Blocker]
) -> None:
    """pending(): queued tasks in queue order, then scheduled ones in due order."""
    manager, blocker = busy
    now = datetime.now(UTC)
    q1 = manager.queue(lambda ctx: 1)
    q2 = manager.queue(lambda ctx: 2, key="q2")
    d20 = manager.delay(20, lambda ctx: 20)
    d10 = manager.delay(10, lambda ctx: 10)
    s15 = manager.schedule(now + timedelta(seconds=15), lambda ctx: 15)
    q3 = manager.queue(lambda ctx: 3)
    assert manager.pending() == [q1, q2, q3, d10, s15, d20]
    assert q2.cancel()
    assert manager.reschedule(d20, 1)
    assert manager.pending() == [q1, q3, d20, d10, s15]
    blocker.release.set()
    advance(frozen, manager, 20)
    assert manager.join(WAIT)
    assert manager.pending() == []


def test_pending_is_a_snapshot(busy: tuple[TaskManager, Blocker]) -> None:
    """The list is the caller's: changing it changes nothing in the manager."""
    manager, _ = busy
    queued = manager.queue(lambda ctx: None)
    snapshot = manager.pending()
    snapshot.clear()
    assert manager.pending() == [queued]


def test_reschedule_of_a_kept_task_while_stopped(frozen: Clock) -> None:
    """A delayed task kept by stop() can be moved while stopped; it runs then after start()."""
    manager = TaskManager(workers=1)
    manager.start()
    try:
        handler = manager.delay(60, lambda ctx: "kept")
        manager.stop()
        assert manager.reschedule(handler, 5)
        manager.start()
        advance(frozen, manager, 5)
        assert handler.result(WAIT) == "kept"
    finally:
        manager.stop(timeout=WAIT)


def test_a_keyed_submission_refused_by_a_full_queue_does_not_hold_the_key() -> None:
    """queue(block=False) raising QueueFull leaves the key free and counts nothing."""
    manager = TaskManager(workers=1, queue_size=1)
    manager.start()
    blocker = Blocker()
    try:
        manager.queue(blocker)
        assert blocker.started.wait(WAIT)
        manager.queue(lambda ctx: None)  # fills the queue
        before = manager.stats().submitted
        with pytest.raises(QueueFull):
            manager.queue(lambda ctx: None, key="k", block=False)
        assert manager.get("k") is None
        assert manager.stats().submitted == before
        later = manager.delay(60, lambda ctx: None, key="k")
        assert manager.get("k") is later
        assert later.cancel()
    finally:
        blocker.release.set()
        manager.stop(timeout=WAIT)
