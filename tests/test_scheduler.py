"""Scheduler: the pure `_Timeline` and the scheduler thread (marionette/scheduler.py)."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

import freezegun.api
import pytest
from conftest import WAIT
from hypothesis import given
from hypothesis import strategies as st

from marionette import Scheduler, Unschedulable
from marionette.scheduler import _MIN_DEAD_TO_COMPACT, _Timeline

Frozen = freezegun.api.FrozenDateTimeFactory

#: The instant the `frozen` fixture freezes the clock at.
T0 = datetime(2026, 1, 5, 12, 0, 0, tzinfo=UTC)
INDIA = timezone(timedelta(hours=5, minutes=30))
NEW_YORK_WINTER = timezone(timedelta(hours=-5))


class Unorderable:
    """A hashable item that refuses every ordering comparison."""

    def __init__(self, label: str) -> None:
        self.label = label

    def _refuse(self, other: object) -> bool:
        raise AssertionError(f"items must never be compared ({self.label})")

    __lt__ = __le__ = __gt__ = __ge__ = _refuse

    def __repr__(self) -> str:
        return f"Unorderable({self.label})"


class Recorder:
    """An `out` that records the items handed to it and lets tests wait for them."""

    def __init__(self) -> None:
        self.items: list[Any] = []
        self.threads: list[threading.Thread] = []
        self._cond = threading.Condition()

    def __call__(self, item: Any) -> None:
        with self._cond:
            self.items.append(item)
            self.threads.append(threading.current_thread())
            self._cond.notify_all()

    def wait_for(self, count: int) -> bool:
        """True once at least `count` items were handed out (False after WAIT seconds)."""
        with self._cond:
            return self._cond.wait_for(lambda: len(self.items) >= count, WAIT)


class CountingCondition(threading.Condition):
    """A Condition that records the timeout of every wait the scheduler thread enters."""

    def __init__(self, lock: Any) -> None:
        super().__init__(lock)
        self.timeouts: list[float | None] = []
        self.waiting = threading.Event()

    def wait(self, timeout: float | None = None) -> bool:
        self.timeouts.append(timeout)
        self.waiting.set()
        return super().wait(timeout)


def stop_within(scheduler: Scheduler[Any], timeout: float = WAIT) -> None:
    """Stop `scheduler`, failing (instead of hanging) if that takes longer than `timeout`."""
    stopper = threading.Thread(target=scheduler.stop, name="test-stopper", daemon=True)
    stopper.start()
    stopper.join(timeout)
    assert not stopper.is_alive(), "Scheduler.stop() hung"


@pytest.fixture
def make_scheduler() -> Iterator[Callable[..., Scheduler[Any]]]:
    """Make schedulers (not started) that are all stopped after the test."""
    made: list[Scheduler[Any]] = []

    def make(out: Callable[[Any], object], logger: Any = None) -> Scheduler[Any]:
        scheduler: Scheduler[Any] = Scheduler(out, logger)
        made.append(scheduler)
        return scheduler

    try:
        yield make
    finally:
        for scheduler in made:
            stop_within(scheduler)


@pytest.fixture
def rec() -> Recorder:
    """A recording `out`."""
    return Recorder()


@pytest.fixture
def sched(make_scheduler: Callable[..., Scheduler[Any]], rec: Recorder) -> Scheduler[Any]:
    """A scheduler (not started) handing items to `rec`, stopped after the test."""
    return make_scheduler(rec)


def counting(scheduler: Scheduler[Any]) -> CountingCondition:
    """Swap in a Condition that records the scheduler thread's waits (white box)."""
    cond = CountingCondition(scheduler._lock)
    scheduler._wakeup = cond
    return cond


# == _Timeline: pure, no thread, no clock ===================================================


def test_timeline_push_says_whether_the_item_is_first() -> None:
    """`push` returns True when the item became the earliest of its clock's entries."""
    t = _Timeline()
    assert t.push("a", 10.0, False) is True
    assert t.push("b", 20.0, False) is False
    assert t.push("c", 5.0, False) is True
    assert t.push("w", 100.0, True) is True  # the first wall-clock entry
    assert t.push("x", 200.0, True) is False
    assert len(t) == 5


def test_timeline_pop_due_returns_due_items_in_order() -> None:
    """`pop_due` removes and returns exactly the due items, earliest first."""
    t = _Timeline()
    for item, deadline in (("c", 3.0), ("a", 1.0), ("e", 5.0), ("b", 2.0), ("d", 4.0)):
        t.push(item, deadline, False)
    assert t.pop_due(0.5, 0.5) == []
    assert t.pop_due(3.0, 3.0) == ["a", "b", "c"]
    assert len(t) == 2
    assert t.pop_due(3.0, 3.0) == []
    assert t.pop_due(10.0, 10.0) == ["d", "e"]
    assert len(t) == 0


def test_timeline_ties_keep_insertion_order_and_never_compare_items() -> None:
    """Items due at the same time come out in insertion order; items are never compared."""
    t = _Timeline()
    items = [Unorderable(str(n)) for n in range(50)]
    for item in items:
        t.push(item, 7.0, False)
    assert [item for _, item in t.ordered(0.0, 0.0)] == items
    assert t.wait_time(0.0, 0.0) == 7.0
    assert t.pop_due(7.0, 7.0) == items


def test_timeline_mixed_deadlines_with_unorderable_items() -> None:
    """Unorderable items with mixed deadlines on both clocks are handled without comparison."""
    t = _Timeline()
    a, b, c, d = (Unorderable(x) for x in "abcd")
    t.push(a, 2.0, False)
    t.push(b, 1.0, True)
    t.push(c, 2.0, True)
    t.push(d, 1.0, False)
    assert t.remove(d)
    assert t.pop_due(5.0, 5.0) == [b, a, c]


def test_timeline_remove() -> None:
    """`remove` forgets a pending item (True) and says False for an unknown one."""
    t = _Timeline()
    t.push("a", 1.0, False)
    t.push("b", 2.0, True)
    assert t.remove("a") is True
    assert t.remove("a") is False
    assert t.remove("never") is False
    assert "a" not in t
    assert len(t) == 1
    assert t.wait_time(0.0, 0.0) == 2.0
    assert t.pop_due(10.0, 10.0) == ["b"]
    assert t.remove("b") is False


def test_timeline_get() -> None:
    """`get` gives `(deadline, wall)` of a pending item, None otherwise."""
    t = _Timeline()
    t.push("m", 3.5, False)
    t.push("w", 1e9, True)
    assert t.get("m") == (3.5, False)
    assert t.get("w") == (1e9, True)
    assert t.get("x") is None
    t.pop_due(4.0, 0.0)
    assert t.get("m") is None


def test_timeline_wait_time() -> None:
    """`wait_time` is None when empty, the seconds to the earliest entry, or 0 once due."""
    t = _Timeline()
    assert t.wait_time(0.0, 0.0) is None
    t.push("m", 10.0, False)
    assert t.wait_time(4.0, 1000.0) == 6.0
    t.push("w", 1003.0, True)  # wall clock: due in 3 s when wall_now is 1000
    assert t.wait_time(4.0, 1000.0) == 3.0
    assert t.wait_time(20.0, 2000.0) == 0.0
    t.remove("w")
    t.remove("m")
    assert t.wait_time(4.0, 1000.0) is None


def test_timeline_pushing_again_moves_the_item() -> None:
    """Pushing a pending item again moves it (earlier or later); it comes out once."""
    t = _Timeline()
    t.push("a", 10.0, False)
    t.push("a", 5.0, False)
    assert len(t) == 1
    assert t.get("a") == (5.0, False)
    assert t.pop_due(7.0, 7.0) == ["a"]
    assert t.pop_due(20.0, 20.0) == []

    t.push("b", 5.0, False)
    t.push("b", 10.0, False)
    assert t.wait_time(0.0, 0.0) == 10.0
    assert t.pop_due(7.0, 7.0) == []
    assert t.pop_due(10.0, 10.0) == ["b"]
    assert len(t) == 0


def test_timeline_moving_between_clocks() -> None:
    """A pending item can move from the monotonic to the wall clock and back."""
    t = _Timeline()
    t.push("a", 5.0, False)
    t.push("a", 500.0, True)
    assert t.get("a") == (500.0, True)
    assert t.pop_due(100.0, 499.0) == []  # its old monotonic entry is dead
    assert t.pop_due(0.0, 500.0) == ["a"]


def test_timeline_wall_entries_follow_the_wall_clock() -> None:
    """A wall-clock entry is due by `wall_now` only, however far the monotonic clock moved."""
    t = _Timeline()
    t.push("w", 1000.0, True)
    assert t.pop_due(1e12, 999.0) == []
    assert t.pop_due(0.0, 1000.0) == ["w"]


def test_timeline_pop_due_orders_both_clocks_together() -> None:
    """A batch from both clocks is in due order, ties broken by insertion order."""
    t = _Timeline()
    # With now=20 and wall_now=120, wall deadline W corresponds to monotonic W - 100.
    t.push("w-at-10", 110.0, True)
    t.push("m-at-10", 10.0, False)
    t.push("m-at-5", 5.0, False)
    t.push("w-at-15", 115.0, True)
    t.push("m-at-30", 30.0, False)
    assert t.pop_due(20.0, 120.0) == ["m-at-5", "w-at-10", "m-at-10", "w-at-15"]


def test_timeline_ordered_lists_both_clocks_on_the_monotonic_clock() -> None:
    """`ordered` yields every live `(monotonic deadline, item)` in due order."""
    t = _Timeline()
    t.push("m", 30.0, False)
    t.push("w", 110.0, True)
    t.push("gone", 1.0, False)
    t.remove("gone")
    assert list(t.ordered(20.0, 120.0)) == [(10.0, "w"), (30.0, "m")]


def heap_size(t: _Timeline) -> int:
    """Entries held in both heaps, live or dead (white box)."""
    return len(t._mono) + len(t._wall)


def test_timeline_compacts_after_many_removals() -> None:
    """Dead entries never outnumber max(live, the compaction floor), and content survives."""
    t = _Timeline()
    for n in range(5000):
        t.push(n, float(n), n % 2 == 0)
    for n in range(4500):
        assert t.remove(n)
        assert heap_size(t) - len(t) <= max(len(t), _MIN_DEAD_TO_COMPACT)
    assert len(t) == 500
    assert heap_size(t) < 5000  # compaction happened
    assert t.wait_time(0.0, 0.0) == 4500.0
    assert t.pop_due(1e9, 1e9) == list(range(4500, 5000))
    assert len(t) == 0


def test_timeline_compacts_after_many_moves() -> None:
    """Moving one item many times keeps memory bounded, as many removals do."""
    t = _Timeline()
    for n in range(5000):
        t.push("watchdog", 10_000.0 - n, False)
    assert len(t) == 1
    assert heap_size(t) - len(t) <= max(len(t), _MIN_DEAD_TO_COMPACT)


OPS = st.lists(
    st.one_of(
        st.tuples(
            st.just("push"),
            st.integers(0, 7),
            st.integers(0, 50),
            st.booleans(),
        ),
        st.tuples(st.just("remove"), st.integers(0, 7)),
        st.tuples(st.just("pop"), st.integers(0, 60)),
    ),
    max_size=60,
)


@given(OPS)
def test_timeline_matches_a_simple_model(ops: list[tuple[Any, ...]]) -> None:
    """Any sequence of push/remove/pop_due behaves like a sorted (deadline, seq) model."""
    offset = 1000  # wall_now = now + offset; wall deadlines are given on that clock
    t = _Timeline()
    model: dict[int, tuple[int, int]] = {}  # item -> (monotonic deadline, seq)
    seq = 0
    for op in ops:
        if op[0] == "push":
            _, item, deadline, wall = op
            seq += 1
            model[item] = (deadline, seq)
            t.push(item, float(deadline + offset if wall else deadline), wall)
        elif op[0] == "remove":
            assert t.remove(op[1]) is (model.pop(op[1], None) is not None)
        else:
            now = op[1]
            due = sorted((v, k) for k, v in model.items() if v[0] <= now)
            assert t.pop_due(float(now), float(now + offset)) == [k for _, k in due]
            for _, k in due:
                del model[k]
        assert len(t) == len(model)
        expected_wait = min((v[0] for v in model.values()), default=None)
        got = t.wait_time(0.0, float(offset))
        assert got == (None if expected_wait is None else float(expected_wait))
        ordered = [item for _, item in t.ordered(0.0, float(offset))]
        assert ordered == [k for _, k in sorted((v, k) for k, v in model.items())]


# == Scheduler: the thread =================================================================


def test_scheduler_requires_a_callable_out() -> None:
    """`Scheduler(out)` with a non-callable `out` raises `TypeError`."""
    with pytest.raises(TypeError):
        Scheduler("not callable")  # type: ignore[arg-type]


def test_never_hands_out_before_due(frozen: Frozen, sched: Scheduler[Any], rec: Recorder) -> None:
    """`out` is not called before the delay has passed, and is called once it has."""
    sched.delay(10, "job")
    sched.start()
    sched.wake()
    assert rec.items == []
    frozen.tick(9)
    sched.wake()
    assert rec.items == []
    frozen.tick(0.999)
    sched.wake()
    assert rec.items == []
    frozen.tick(0.001)
    sched.wake()
    assert rec.items == ["job"]
    assert len(sched) == 0
    frozen.tick(100)
    sched.wake()
    assert rec.items == ["job"]


def test_out_runs_on_the_scheduler_thread(sched: Scheduler[Any], rec: Recorder) -> None:
    """`out` is called from the thread named "marionette-scheduler", never the caller's."""
    sched.start()
    sched.delay(0, "x")
    assert rec.wait_for(1)
    assert rec.threads[0].name == "marionette-scheduler"
    assert rec.threads[0] is not threading.current_thread()


def test_never_early_on_the_real_clock(make_scheduler: Callable[..., Scheduler[Any]]) -> None:
    """On the real clock, `out` runs no earlier than the delay after `delay()` was called."""
    called_at: list[float] = []
    called = threading.Event()

    def out(item: Any) -> None:
        called_at.append(time.monotonic())
        called.set()

    scheduler = make_scheduler(out)
    scheduler.start()
    before = time.monotonic()
    scheduler.delay(0.05, "soon")
    assert called.wait(WAIT)
    assert called_at[0] >= before + 0.05


def test_items_due_together_come_out_in_due_order(
    frozen: Frozen, sched: Scheduler[Any], rec: Recorder
) -> None:
    """Items that become due in one batch are handed out earliest first, across both clocks."""
    sched.delay(5, "at-5")
    sched.delay(1, "at-1")
    sched.schedule(T0.astimezone(INDIA) + timedelta(seconds=2), "at-2 (wall)")
    sched.delay(timedelta(seconds=3), "at-3")
    sched.start()
    frozen.tick(10)
    sched.wake()
    assert rec.items == ["at-1", "at-2 (wall)", "at-3", "at-5"]


def test_ties_come_out_in_insertion_order_without_comparing(
    frozen: Frozen, sched: Scheduler[Any], rec: Recorder
) -> None:
    """Unorderable items due at the same moment are handed out in insertion order."""
    items = [Unorderable(str(n)) for n in range(20)]
    for item in items:
        sched.delay(5, item)
    sched.start()
    frozen.tick(5)
    sched.wake()
    assert rec.items == items


@pytest.mark.parametrize("tz", [INDIA, NEW_YORK_WINTER, UTC])
def test_schedule_with_aware_datetimes_in_other_zones(
    frozen: Frozen, sched: Scheduler[Any], rec: Recorder, tz: timezone
) -> None:
    """`schedule(at)` honours the instant of an aware datetime in any time zone."""
    at = (T0 + timedelta(seconds=30)).astimezone(tz)
    sched.schedule(at, "wall")
    assert sched.next_due() == T0 + timedelta(seconds=30)
    sched.start()
    frozen.tick(29)
    sched.wake()
    assert rec.items == []
    frozen.tick(1)
    sched.wake()
    assert rec.items == ["wall"]


def test_schedule_with_a_zoneinfo_zone(
    frozen: Frozen, sched: Scheduler[Any], rec: Recorder
) -> None:
    """A `zoneinfo` zone is honoured like a fixed offset."""
    at = datetime(2026, 1, 5, 13, 0, 10, tzinfo=ZoneInfo("Europe/Paris"))  # 12:00:10Z
    sched.schedule(at, "paris")
    sched.start()
    frozen.tick(9)
    sched.wake()
    assert rec.items == []
    frozen.tick(1)
    sched.wake()
    assert rec.items == ["paris"]


def test_past_times_and_negative_delays_mean_now(
    frozen: Frozen, sched: Scheduler[Any], rec: Recorder
) -> None:
    """A time in the past, a zero delay or a negative delay are handed out at once."""
    sched.schedule(T0 - timedelta(days=365), "last year")
    sched.delay(-5, "negative")
    sched.delay(0, "zero")
    sched.delay(timedelta(seconds=-1), "negative timedelta")
    sched.start()
    sched.wake()
    assert sorted(rec.items) == ["last year", "negative", "negative timedelta", "zero"]


@pytest.mark.parametrize(
    ("at", "why"),
    [
        (None, "None"),
        (datetime(2026, 1, 5, 12, 0), "naive"),
        (datetime.min, "zero|min"),
        (datetime.min.replace(tzinfo=UTC), "zero|min"),
    ],
)
def test_schedule_rejects_unschedulable_times(
    sched: Scheduler[Any], at: datetime | None, why: str
) -> None:
    """None, a naive datetime or `datetime.min` raise `Unschedulable` saying why."""
    with pytest.raises(Unschedulable, match=why):
        sched.schedule(at, "x")  # type: ignore[arg-type]
    assert len(sched) == 0


@pytest.mark.parametrize("at", ["2026-01-05T12:00:00Z", 1767614400, date(2026, 1, 5)])
def test_schedule_rejects_non_datetimes(sched: Scheduler[Any], at: object) -> None:
    """Something that is not a datetime raises `TypeError`."""
    with pytest.raises(TypeError):
        sched.schedule(at, "x")  # type: ignore[arg-type]
    assert len(sched) == 0


@pytest.mark.parametrize("delay", [math.nan, math.inf, -math.inf])
def test_delay_rejects_nan_and_infinity(sched: Scheduler[Any], delay: float) -> None:
    """NaN and infinite delays raise `Unschedulable` (a `ValueError`)."""
    with pytest.raises(Unschedulable):
        sched.delay(delay, "x")
    with pytest.raises(ValueError):
        sched.delay(delay, "x")
    assert len(sched) == 0


@pytest.mark.parametrize("delay", ["1", None, True, [1]])
def test_delay_rejects_non_numbers(sched: Scheduler[Any], delay: object) -> None:
    """A delay that is not a number or timedelta raises `TypeError`."""
    with pytest.raises(TypeError):
        sched.delay(delay, "x")  # type: ignore[arg-type]
    assert len(sched) == 0


def test_delays_longer_than_timeout_max_are_accepted(sched: Scheduler[Any], rec: Recorder) -> None:
    """Delays beyond `threading.TIMEOUT_MAX` are accepted and do not break the thread."""
    sched.delay(threading.TIMEOUT_MAX * 4, "far")
    sched.delay(1e300, "farther")
    sched.start()
    sched.wake()
    assert sched.is_running()
    assert rec.items == []
    assert len(sched) == 2
    next_due = sched.next_due()
    assert next_due is not None
    assert next_due > datetime.now(UTC) + timedelta(days=365 * 200)
    sched.delay(-1, "now")
    assert rec.wait_for(1)
    assert rec.items == ["now"]


def test_delaying_a_pending_item_moves_it(
    frozen: Frozen, sched: Scheduler[Any], rec: Recorder
) -> None:
    """Delaying an item that is already pending moves it; it is handed out once."""
    sched.delay(10, "item")
    sched.delay(100, "item")
    assert len(sched) == 1
    sched.start()
    frozen.tick(10)
    sched.wake()
    assert rec.items == []
    frozen.tick(90)
    sched.wake()
    assert rec.items == ["item"]


def test_cancel(frozen: Frozen, sched: Scheduler[Any], rec: Recorder) -> None:
    """`cancel` removes a pending item (True) and returns False when it is not pending."""
    sched.delay(10, "keep")
    sched.delay(10, "drop")
    sched.start()
    assert sched.cancel("drop") is True
    assert sched.cancel("drop") is False
    assert sched.cancel("unknown") is False
    frozen.tick(10)
    sched.wake()
    assert rec.items == ["keep"]
    assert sched.cancel("keep") is False  # already handed out


def test_len_counts_pending_items(frozen: Frozen, sched: Scheduler[Any], rec: Recorder) -> None:
    """`len(scheduler)` counts pending items only."""
    assert len(sched) == 0
    sched.delay(1, "a")
    sched.delay(2, "b")
    sched.schedule(T0 + timedelta(seconds=3), "c")
    assert len(sched) == 3
    sched.cancel("b")
    assert len(sched) == 2
    sched.start()
    frozen.tick(1)
    sched.wake()
    assert len(sched) == 1
    frozen.tick(2)
    sched.wake()
    assert len(sched) == 0
    assert rec.items == ["a", "c"]


def test_next_due(frozen: Frozen, sched: Scheduler[Any]) -> None:
    """`next_due()` is None when empty, else the earliest due time as an aware UTC datetime."""
    assert sched.next_due() is None
    sched.delay(30, "mono")
    due = sched.next_due()
    assert due == T0 + timedelta(seconds=30)
    assert due is not None
    assert due.utcoffset() == timedelta(0)
    sched.schedule((T0 + timedelta(seconds=10)).astimezone(INDIA), "wall")
    wall_due = sched.next_due()
    assert wall_due == T0 + timedelta(seconds=10)
    assert wall_due is not None
    assert wall_due.utcoffset() == timedelta(0)
    sched.cancel("wall")
    assert sched.next_due() == T0 + timedelta(seconds=30)
    frozen.tick(5)
    assert sched.next_due() == T0 + timedelta(seconds=30)
    sched.cancel("mono")
    assert sched.next_due() is None


def test_stop_keeps_pending_items_for_a_restart(
    frozen: Frozen, sched: Scheduler[Any], rec: Recorder
) -> None:
    """Items pending at `stop()`, or added while stopped, are handed out after `start()`."""
    sched.delay(10, "before stop")
    sched.start()
    sched.wake()
    sched.stop()
    assert not sched.is_running()
    sched.delay(5, "while stopped")
    frozen.tick(10)
    sched.wake()  # returns at once on a stopped scheduler
    assert rec.items == []
    assert len(sched) == 2
    sched.start()
    sched.wake()
    assert rec.items == ["while stopped", "before stop"]


def scheduler_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "marionette-scheduler"]


def test_start_and_stop_are_idempotent(sched: Scheduler[Any], rec: Recorder) -> None:
    """`start()` twice runs one thread; `stop()` twice, or before `start()`, is harmless."""
    before = len(scheduler_threads())
    sched.stop()
    assert not sched.is_running()
    sched.start()
    sched.start()
    assert sched.is_running()
    assert len(scheduler_threads()) == before + 1
    sched.stop()
    sched.stop()
    assert not sched.is_running()
    assert len(scheduler_threads()) == before
    sched.start()
    sched.delay(0, "after restart")
    assert rec.wait_for(1)
    assert len(scheduler_threads()) == before + 1


def test_wake_on_a_stopped_scheduler_returns_at_once(sched: Scheduler[Any]) -> None:
    """`wake()` on a scheduler that never started (or stopped) does not block."""
    sched.delay(0, "x")
    sched.wake()
    assert len(sched) == 1  # nothing hands it out before start()
    sched.start()
    sched.wake()
    assert len(sched) == 0
    sched.stop()
    sched.delay(0, "y")
    sched.wake()
    assert len(sched) == 1


def test_out_raising_is_logged_and_the_scheduler_goes_on(
    frozen: Frozen,
    make_scheduler: Callable[..., Scheduler[Any]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An `out` that raises is logged through the default logger; later items still come."""
    caplog.set_level(logging.DEBUG, logger="marionette")
    got: list[str] = []

    def out(item: str) -> None:
        if item.startswith("bad"):
            raise RuntimeError(f"out failed on {item}")
        got.append(item)

    scheduler = make_scheduler(out)
    scheduler.delay(1, "bad-1")
    scheduler.delay(2, "good-1")
    scheduler.delay(3, "bad-2")
    scheduler.start()
    frozen.tick(2)
    scheduler.wake()
    frozen.tick(2)
    scheduler.delay(0, "good-2")
    scheduler.wake()
    assert got == ["good-1", "good-2"]
    assert scheduler.is_running()
    messages = [r.getMessage() for r in caplog.records if r.name == "marionette"]
    assert any("out failed on bad-1" in m for m in messages), messages
    assert any("out failed on bad-2" in m for m in messages), messages


def test_out_raising_a_base_exception_does_not_kill_the_thread(
    make_scheduler: Callable[..., Scheduler[Any]], caplog: pytest.LogCaptureFixture
) -> None:
    """Even a BaseException from `out` is logged; the thread keeps handing out items."""
    caplog.set_level(logging.DEBUG, logger="tests.scheduler")
    got = Recorder()

    def out(item: str) -> None:
        if item == "exit":
            raise SystemExit("out wants out")
        got(item)

    scheduler = make_scheduler(out, logging.getLogger("tests.scheduler"))
    scheduler.start()
    scheduler.delay(0, "exit")
    scheduler.wake()
    scheduler.delay(0, "after")
    assert got.wait_for(1)
    assert got.items == ["after"]
    assert any(
        r.name == "tests.scheduler" and "out wants out" in r.getMessage() for r in caplog.records
    ), caplog.text


def test_out_may_delay_cancel_and_wake_on_its_own_scheduler(
    make_scheduler: Callable[..., Scheduler[Any]],
) -> None:
    """`out` can call `delay`, `cancel`, `len`, `next_due` and `wake` on its scheduler."""
    rec = Recorder()
    results: dict[str, Any] = {}
    scheduler: Scheduler[Any]

    def out(item: str) -> None:
        if item == "first":
            scheduler.delay(0, "second")
            results["cancel"] = scheduler.cancel("victim")
            results["len"] = len(scheduler)
            results["next_due"] = scheduler.next_due()
            scheduler.wake()  # from inside out: returns at once
        rec(item)

    scheduler = make_scheduler(out)
    scheduler.delay(3600, "victim")
    scheduler.delay(0, "first")
    scheduler.start()
    assert rec.wait_for(2)
    assert rec.items == ["first", "second"]
    assert results["cancel"] is True
    assert results["len"] == 1  # "second"
    assert results["next_due"] is not None
    assert len(scheduler) == 0


def test_out_may_stop_its_own_scheduler(make_scheduler: Callable[..., Scheduler[Any]]) -> None:
    """`stop()` from inside `out` returns at once; the thread ends; `start()` works again."""
    rec = Recorder()
    returned = threading.Event()
    scheduler: Scheduler[Any]

    def out(item: str) -> None:
        rec(item)
        if item == "stop":
            scheduler.stop()
            returned.set()

    scheduler = make_scheduler(out)
    scheduler.delay(0, "stop")
    scheduler.start()
    assert returned.wait(WAIT)
    thread = rec.threads[0]
    thread.join(WAIT)
    assert not thread.is_alive()
    assert not scheduler.is_running()
    scheduler.delay(0, "again")
    scheduler.start()
    assert rec.wait_for(2)
    assert rec.items == ["stop", "again"]


def test_many_threads_adding_and_cancelling(sched: Scheduler[Any], rec: Recorder) -> None:
    """Concurrent delays and cancels: each item is handed out at most once, never if cancelled."""
    sched.start()
    threads_count, per_thread = 4, 300
    barrier = threading.Barrier(threads_count)
    cancels: dict[tuple[int, int], bool] = {}
    lock = threading.Lock()

    def work(n: int) -> None:
        barrier.wait(WAIT)
        local: dict[tuple[int, int], bool] = {}
        for i in range(per_thread):
            item = (n, i)
            sched.delay(0 if i % 2 else 3600, item)  # odd: due now, even: in an hour
            if i % 3 == 0:
                local[item] = sched.cancel(item)
        with lock:
            cancels.update(local)

    workers = [
        threading.Thread(target=work, args=(n,), name=f"test-adder-{n}")
        for n in range(threads_count)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(WAIT)
        assert not worker.is_alive()
    sched.wake()

    delivered = list(rec.items)
    assert len(delivered) == len(set(delivered)), "an item was handed out twice"
    everything = {(n, i) for n in range(threads_count) for i in range(per_thread)}
    due_now = {item for item in everything if item[1] % 2}
    cancelled = {item for item, ok in cancels.items() if ok}
    assert set(delivered) == due_now - cancelled
    assert all(cancels[item] for item in cancels if item[1] % 2 == 0)
    later = everything - due_now - cancelled
    assert len(sched) == len(later)
    for item in later:
        assert sched.cancel(item)


def test_an_earlier_item_wakes_the_sleeping_thread(sched: Scheduler[Any], rec: Recorder) -> None:
    """An item due sooner than the current earliest wakes the thread without `wake()`."""
    cond = counting(sched)
    sched.delay(3600, "later")
    sched.start()
    assert cond.waiting.wait(WAIT)
    sched.delay(0, "now")
    assert rec.wait_for(1)
    assert rec.items == ["now"]


def test_it_never_ticks_with_nothing_pending(sched: Scheduler[Any]) -> None:
    """With nothing pending, the thread waits once, without a timeout."""
    cond = counting(sched)
    sched.start()
    assert cond.waiting.wait(WAIT)
    assert cond.timeouts == [None]
    sched.wake()
    assert cond.timeouts == [None, None]


def test_it_sleeps_until_the_next_deadline(
    frozen: Frozen, sched: Scheduler[Any], rec: Recorder
) -> None:
    """With an item an hour out, the thread waits once, for exactly that hour: no tick."""
    cond = counting(sched)
    sched.delay(3600, "in an hour")
    sched.start()
    assert cond.waiting.wait(WAIT)
    assert cond.timeouts == [3600.0]
    sched.wake()
    sched.wake()
    # One pass, and one wait, per wake(): nothing else wakes it.
    assert cond.timeouts == [3600.0, 3600.0, 3600.0]
    frozen.tick(600)
    sched.wake()
    assert cond.timeouts[-1] == 3000.0
    assert len(cond.timeouts) == 4
    assert rec.items == []
    assert sched.is_running()


def test_it_sleeps_an_hour_on_the_real_clock(sched: Scheduler[Any], rec: Recorder) -> None:
    """On the real clock too, the thread's single wait lasts until the item is due."""
    cond = counting(sched)
    sched.delay(3600, "in an hour")
    sched.start()
    assert cond.waiting.wait(WAIT)
    assert len(cond.timeouts) == 1
    timeout = cond.timeouts[0]
    assert timeout is not None
    assert 3600 - WAIT < timeout <= 3600
    assert rec.items == []
    assert sched.is_running()


# == Scheduler: reschedule, items, due ======================================================


def test_reschedule_moves_a_pending_item(
    frozen: Frozen, sched: Scheduler[Any], rec: Recorder
) -> None:
    """`reschedule(item, delay)` moves a pending item to the new time and returns True."""
    sched.delay(100, "a")
    assert sched.reschedule("a", 10) is True
    assert sched.due("a") == T0 + timedelta(seconds=10)
    assert len(sched) == 1
    sched.start()
    frozen.tick(10)
    sched.wake()
    assert rec.items == ["a"]


def test_reschedule_to_an_aware_datetime(
    frozen: Frozen, sched: Scheduler[Any], rec: Recorder
) -> None:
    """`reschedule(item, datetime)` moves it to that instant, in any time zone."""
    sched.delay(5, "a")
    assert sched.reschedule("a", (T0 + timedelta(seconds=20)).astimezone(INDIA)) is True
    assert sched.due("a") == T0 + timedelta(seconds=20)
    sched.start()
    frozen.tick(19)
    sched.wake()
    assert rec.items == []
    frozen.tick(1)
    sched.wake()
    assert rec.items == ["a"]


def test_reschedule_of_an_item_not_pending_returns_false(
    frozen: Frozen, sched: Scheduler[Any], rec: Recorder
) -> None:
    """`reschedule` of an unknown or handed-out item returns False and adds nothing."""
    assert sched.reschedule("unknown", 1) is False
    assert len(sched) == 0
    sched.delay(0, "gone")
    sched.start()
    sched.wake()
    assert rec.items == ["gone"]
    assert sched.reschedule("gone", 10) is False
    assert len(sched) == 0


def test_reschedule_only_sooner(frozen: Frozen, sched: Scheduler[Any]) -> None:
    """With `only_sooner`, a later or equal time is declined and an earlier one accepted."""
    sched.delay(50, "a")
    assert sched.reschedule("a", 60, only_sooner=True) is False
    assert sched.reschedule("a", 50, only_sooner=True) is False
    assert sched.reschedule("a", T0 + timedelta(seconds=70), only_sooner=True) is False
    assert sched.due("a") == T0 + timedelta(seconds=50)
    assert sched.reschedule("a", timedelta(seconds=40), only_sooner=True) is True
    assert sched.due("a") == T0 + timedelta(seconds=40)
    assert sched.reschedule("a", T0 + timedelta(seconds=30), only_sooner=True) is True
    assert sched.due("a") == T0 + timedelta(seconds=30)
    assert sched.reschedule("a", 35, only_sooner=True) is False  # across clocks too
    assert sched.reschedule("a", 35) is True  # without only_sooner, later is fine
    assert sched.due("a") == T0 + timedelta(seconds=35)


def test_reschedule_rejects_bad_times(frozen: Frozen, sched: Scheduler[Any]) -> None:
    """`reschedule` rejects what `delay`/`schedule` reject and leaves the item in place."""
    sched.delay(10, "a")
    before = sched.due("a")
    assert before == T0 + timedelta(seconds=10)
    with pytest.raises(Unschedulable):
        sched.reschedule("a", datetime(2026, 1, 5, 12, 0))
    with pytest.raises(Unschedulable):
        sched.reschedule("a", math.nan)
    with pytest.raises(TypeError):
        sched.reschedule("a", "soon")  # type: ignore[arg-type]
    assert sched.due("a") == before
    assert len(sched) == 1


def test_reschedule_sooner_wakes_the_thread(sched: Scheduler[Any], rec: Recorder) -> None:
    """Rescheduling an item an hour out to now hands it out without `wake()`."""
    cond = counting(sched)
    sched.delay(3600, "a")
    sched.start()
    assert cond.waiting.wait(WAIT)
    assert sched.reschedule("a", 0)
    assert rec.wait_for(1)
    assert rec.items == ["a"]


def test_items_is_a_snapshot_in_due_order(frozen: Frozen, sched: Scheduler[Any]) -> None:
    """`items()` lists the pending items in due order across both clocks, as a copy."""
    sched.delay(30, "c")
    sched.schedule((T0 + timedelta(seconds=10)).astimezone(NEW_YORK_WINTER), "a")
    sched.delay(20, "b")
    snapshot = sched.items()
    assert snapshot == ["a", "b", "c"]
    snapshot.clear()
    sched.cancel("b")
    assert sched.items() == ["a", "c"]


def test_due_of_an_item(frozen: Frozen, sched: Scheduler[Any], rec: Recorder) -> None:
    """`due(item)` is the aware UTC time a pending item is due at, or None."""
    assert sched.due("x") is None
    sched.delay(30, "x")
    sched.schedule((T0 + timedelta(seconds=10)).astimezone(INDIA), "w")
    due_x, due_w = sched.due("x"), sched.due("w")
    assert due_x == T0 + timedelta(seconds=30)
    assert due_w == T0 + timedelta(seconds=10)
    assert due_x is not None
    assert due_w is not None
    assert due_x.utcoffset() == due_w.utcoffset() == timedelta(0)
    sched.start()
    frozen.tick(10)
    sched.wake()
    assert rec.items == ["w"]
    assert sched.due("w") is None
