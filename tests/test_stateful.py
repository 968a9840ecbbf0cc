"""Stateful properties: the timeline, the scheduler thread and the manager against models.

Three `hypothesis.stateful` machines drive random interleavings of submissions, moves,
cancellations, clock changes and wakes, and compare what the library does with a
dict-sized model: nothing due is withheld, nothing comes out early, due order holds,
what was cancelled never comes out, and every handler settles exactly once.

The two threaded machines freeze the clock themselves (one freeze per example, with
freezegun's stack inspection switched off so the library's threads see it too) and
keep every rule's times on a half-second grid, so all the clock arithmetic is exact.
"""

from __future__ import annotations

import collections
import concurrent.futures
import sys
import threading
import time
from datetime import UTC, datetime, timedelta, timezone

import freezegun
import freezegun.api
import pytest
from conftest import WAIT
from hypothesis import Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    invariant,
    rule,
    run_state_machine_as_test,
)

import marionette.scheduler
from marionette import Scheduler, TaskError, TaskHandler, TaskManager, TaskState
from marionette.context import Context
from marionette.scheduler import _Timeline

#: The instant the threaded machines freeze the clock at.
T0 = datetime(2026, 1, 5, 12, 0, 0, tzinfo=UTC)

#: Deadlines relative to a clock, in whole seconds: some past, some now, most ahead.
OFFSETS = st.integers(-5, 20)
#: Delays and clock moves of the threaded machines: half seconds, so sums stay exact.
DELAYS = st.integers(-6, 24).map(lambda n: n / 2)
TICKS = st.integers(0, 12).map(lambda n: n / 2)
ZONES = st.sampled_from(
    [UTC, timezone(timedelta(hours=5, minutes=30)), timezone(-timedelta(hours=5))]
)


def _failing() -> bool:
    """Whether the current test step is unwinding an exception (teardown checks skip then)."""
    return sys.exc_info()[1] is not None


# == _Timeline: pure, two clocks, no thread ===============================================


class TimelineMachine(RuleBasedStateMachine):
    """`_Timeline` against a dict item -> (deadline, wall, seq) and two free-running clocks."""

    #: The compaction floor to run with; None keeps the library's own.
    compact_floor: int | None = None
    #: Whether to check the dead-entry bookkeeping (heaps hold live + `_dead` entries).
    check_dead_count = True

    items = Bundle("items")

    def __init__(self) -> None:
        super().__init__()
        self.saved_floor = marionette.scheduler._MIN_DEAD_TO_COMPACT
        if self.compact_floor is not None:
            marionette.scheduler._MIN_DEAD_TO_COMPACT = self.compact_floor
        self.timeline = _Timeline()
        self.model: dict[int, tuple[float, bool, int]] = {}
        self.now = 0.0  # the monotonic clock
        self.wall_now = 1000.0  # the wall clock: moves on its own, back as well as forward
        self.seq = 0
        self.created = 0

    def teardown(self) -> None:
        marionette.scheduler._MIN_DEAD_TO_COMPACT = self.saved_floor

    # -- the model ------------------------------------------------------------------

    def _order_key(self, item: int) -> tuple[float, int]:
        """Due order: the deadline on the monotonic clock, then insertion order."""
        deadline, wall, seq = self.model[item]
        return (deadline - self.wall_now + self.now if wall else deadline), seq

    def _is_due(self, item: int) -> bool:
        deadline, wall, _ = self.model[item]
        return deadline <= (self.wall_now if wall else self.now)

    def _push(self, item: int, offset: int, wall: bool) -> None:
        deadline = (self.wall_now if wall else self.now) + offset
        first = self.timeline.push(item, deadline, wall)
        self.seq += 1
        self.model[item] = (deadline, wall, self.seq)
        if first:  # the new entry tops its heap: it is the earliest live one of its clock
            rivals = [(d, s) for i, (d, w, s) in self.model.items() if w is wall and i != item]
            assert all(deadline < d for d, _ in rivals), f"push({item}) claimed first: {rivals}"

    # -- rules ----------------------------------------------------------------------

    @rule(target=items, offset=OFFSETS, wall=st.booleans())
    def push_new(self, offset: int, wall: bool) -> int:
        """Push a new item `offset` seconds from now on one of the two clocks."""
        item = self.created
        self.created += 1
        self._push(item, offset, wall)
        return item

    @rule(item=items, offset=OFFSETS, wall=st.booleans())
    def push_again(self, item: int, offset: int, wall: bool) -> None:
        """Push a known item: moves it if pending, brings it back if popped or removed."""
        self._push(item, offset, wall)

    @rule(item=items)
    def remove(self, item: int) -> None:
        """Remove an item: True exactly when the model has it pending."""
        expected = self.model.pop(item, None) is not None
        assert self.timeline.remove(item) is expected

    @rule(seconds=st.integers(0, 10))
    def advance_monotonic(self, seconds: int) -> None:
        """Move the monotonic clock forward alone."""
        self.now += seconds

    @rule(seconds=st.integers(-10, 10))
    def move_wall_clock(self, seconds: int) -> None:
        """Set the wall clock forward or back alone (a system clock change)."""
        self.wall_now += seconds

    @rule(seconds=st.integers(0, 10))
    def advance_both(self, seconds: int) -> None:
        """Let time pass on both clocks together."""
        self.now += seconds
        self.wall_now += seconds

    @rule()
    def pop_due(self) -> None:
        """pop_due returns exactly the due items, in due order, and forgets them."""
        due = sorted((i for i in self.model if self._is_due(i)), key=self._order_key)
        got = self.timeline.pop_due(self.now, self.wall_now)
        assert got == due, f"pop_due({self.now}, {self.wall_now}): {got} != model {due}"
        for item in due:
            del self.model[item]

    @rule()
    def wait_time(self) -> None:
        """wait_time is the earliest deadline minus now, 0 when due, None when empty."""
        # A rule, not an invariant: it drops dead entries from the tops of the heaps,
        # and pop_due must also meet some that were left there.
        first = min((self._order_key(i)[0] for i in self.model), default=None)
        expected = None if first is None else max(0.0, first - self.now)
        got = self.timeline.wait_time(self.now, self.wall_now)
        assert got == expected, f"wait_time({self.now}, {self.wall_now}): {got} != {expected}"

    # -- invariants ------------------------------------------------------------------

    @invariant()
    def agrees_with_model(self) -> None:
        """len, membership, get and ordered() all agree with the model."""
        timeline = self.timeline
        assert len(timeline) == len(self.model)
        for item in range(self.created):
            entry = self.model.get(item)
            assert (item in timeline) is (entry is not None)
            assert timeline.get(item) == (None if entry is None else (entry[0], entry[1]))
        expected = [(self._order_key(i)[0], i) for i in sorted(self.model, key=self._order_key)]
        assert list(timeline.ordered(self.now, self.wall_now)) == expected

    @invariant()
    def dead_entries_are_counted(self) -> None:
        """The heaps hold the live entries plus exactly `_dead` dead ones."""
        if self.check_dead_count:
            timeline = self.timeline
            held = len(timeline._mono) + len(timeline._wall)
            assert timeline._dead >= 0, f"dead count went negative: {timeline._dead}"
            assert held == len(timeline) + timeline._dead, (
                f"{held} heap entries, {len(timeline)} live, {timeline._dead} counted dead"
            )


class TimelineCompactingMachine(TimelineMachine):
    """The same model with compaction at every chance: the content survives rebuilds."""

    compact_floor = 0
    check_dead_count = False


class TimelineDeadCountMachine(TimelineMachine):
    """Compaction at every chance, checking the dead-entry bookkeeping too."""

    compact_floor = 0


TIMELINE_SETTINGS = settings(max_examples=60, stateful_step_count=40, deadline=None)


def test_timeline_matches_model() -> None:
    """Random push/move/remove/clock moves/pop_due agree with a dict model on two clocks."""
    run_state_machine_as_test(TimelineMachine, settings=TIMELINE_SETTINGS)


def test_timeline_matches_model_while_compacting() -> None:
    """The timeline still agrees with the model when it compacts at every chance."""
    run_state_machine_as_test(TimelineCompactingMachine, settings=TIMELINE_SETTINGS)


def test_timeline_counts_dead_entries_while_compacting() -> None:
    """The heaps always hold exactly the live entries plus the counted dead ones."""
    # Regression: a move while the dead outnumber the live used to leave one dead
    # entry uncounted (found here). 300 examples always reached that case; no shrinking.
    unshrunk = settings(
        TIMELINE_SETTINGS,
        max_examples=300,
        phases=[Phase.explicit, Phase.reuse, Phase.generate],
    )
    run_state_machine_as_test(TimelineDeadCountMachine, settings=unshrunk)


def test_timeline_counts_dead_entries_after_moves_past_the_floor() -> None:
    """Moving one item past the library's own compaction floor keeps `_dead` exact."""
    timeline = _Timeline()
    floor = marionette.scheduler._MIN_DEAD_TO_COMPACT
    for n in range(floor + 3):  # the move after floor + 1 dead entries compacts
        timeline.push("watchdog", float(10_000 - n), False)
        held = len(timeline._mono) + len(timeline._wall)
        assert held == len(timeline) + timeline._dead, f"after {n + 1} pushes"
    assert timeline.pop_due(1e9, 1e9) == ["watchdog"]
    assert timeline._dead >= 0


# == threaded machines: a frozen clock the library's threads see ===========================


class FrozenClockMachine(RuleBasedStateMachine):
    """Freezes the clock at T0 for one example; `now` is the model's seconds since T0."""

    def __init__(self) -> None:
        super().__init__()
        self.saved_limit = freezegun.api.call_stack_inspection_limit
        freezegun.api.call_stack_inspection_limit = 0  # threads get the frozen clock too
        self.freezer = freezegun.freeze_time(T0, tick=False)
        self.clock = self.freezer.start()
        self.now = 0.0
        self.t0 = T0.timestamp()
        try:
            assert time.monotonic() == time.time() == self.t0
            self.start()
        except BaseException:
            self._thaw()
            raise

    def start(self) -> None:
        """Start what the machine drives (the clock is frozen already)."""

    def stop(self) -> None:
        """Stop what `start` started."""

    def _thaw(self) -> None:
        self.freezer.stop()
        freezegun.api.call_stack_inspection_limit = self.saved_limit

    def teardown(self) -> None:
        try:
            self.stop()
        finally:
            self._thaw()

    def tick(self, seconds: float) -> None:
        """Move the frozen clock (and the model's) forward."""
        self.clock.tick(seconds)
        self.now += seconds

    def at(self, seconds: float, tz: timezone = UTC) -> datetime:
        """The aware datetime `seconds` after T0, in `tz`."""
        return (T0 + timedelta(seconds=seconds)).astimezone(tz)

    def elapsed(self) -> float:
        """Seconds since T0 on the frozen clock, as the library's threads read it."""
        return time.monotonic() - self.t0


# == Scheduler: the real thread ===========================================================


class SchedulerMachine(FrozenClockMachine):
    """A running `Scheduler` against a model of pending items and their due times.

    Items due when they are added (or moved into the past) may be handed out at once,
    racing the rules; a `wake()` is the point where everything due must have come out.
    """

    items = Bundle("items")

    def start(self) -> None:
        self.lock = threading.Lock()  # guards `out`, appended to by the scheduler thread
        self.out: list[tuple[int, float]] = []  # (item, frozen seconds since T0 at hand-out)
        self.seen = 0  # how much of `out` was checked
        self.pending: dict[int, tuple[float, int]] = {}  # item -> (due, seq), per the model
        self.handed: set[int] = set()
        self.cancelled: set[int] = set()
        self.seq = 0
        self.created = 0
        self.settled_now = 0.0  # the clock at the last check
        self.scheduler: Scheduler[int] = Scheduler(self._record)
        self.scheduler.start()

    def stop(self) -> None:
        try:
            if not _failing():  # everything still pending comes out, exactly once
                self.tick(1000.0)
                self.scheduler.wake()
                self._settle()
                assert not self.pending
                assert len(self.scheduler) == 0
        finally:
            self.scheduler.stop()

    def _record(self, item: int) -> None:
        at = self.elapsed()
        with self.lock:
            self.out.append((item, at))

    def _enter(self, item: int, due: float) -> None:
        self.seq += 1
        self.pending[item] = (due, self.seq)

    def _new(self) -> int:
        self.created += 1
        return self.created

    def _settle(self) -> None:
        """After a wake: what came out since the last check is exactly what came due."""
        with self.lock:
            new = self.out[self.seen :]
            self.seen = len(self.out)
        got = [item for item, _ in new]
        for item, at in new:
            assert item not in self.cancelled, f"item {item} came out after cancel() said True"
            assert item not in self.handed, f"item {item} came out twice"
            assert item in self.pending, f"item {item} came out but was never added"
            due = self.pending[item][0]
            assert at >= due, f"item {item} came out at {at}, before it was due at {due}"
        assert len(set(got)) == len(got), f"an item came out twice in {got}"
        expected = {item for item, (due, _) in self.pending.items() if due <= self.now}
        assert set(got) == expected, f"handed out {got}, but due at {self.now}: {expected}"
        # What came due with the last clock move came out in one batch, in due order,
        # after anything that was due before it (which may have come out earlier).
        fresh = [item for item in got if self.pending[item][0] > self.settled_now]
        assert got[len(got) - len(fresh) :] == fresh, f"out of order: {new}"
        assert fresh == sorted(fresh, key=self.pending.__getitem__), f"out of order: {new}"
        for item in got:
            del self.pending[item]
            self.handed.add(item)
        self.settled_now = self.now
        # Nothing is due now, so the thread has nothing to take: the rest is stable.
        scheduler = self.scheduler
        assert len(scheduler) == len(self.pending)
        for item, (due, _) in self.pending.items():
            assert scheduler.due(item) == self.at(due), f"item {item}"
        first = min((due for due, _ in self.pending.values()), default=None)
        assert scheduler.next_due() == (None if first is None else self.at(first))

    # -- rules ------------------------------------------------------------------------

    @rule(target=items, seconds=DELAYS)
    def delay(self, seconds: float) -> int:
        """delay(seconds, item) of a new item; a negative delay means now."""
        item = self._new()
        self._enter(item, self.now + seconds)
        self.scheduler.delay(seconds, item)
        return item

    @rule(target=items, seconds=DELAYS, tz=ZONES)
    def schedule(self, seconds: float, tz: timezone) -> int:
        """schedule(at, item) of a new item at an aware datetime; a past one means now."""
        item = self._new()
        self._enter(item, self.now + seconds)
        self.scheduler.schedule(self.at(self.now + seconds, tz), item)
        return item

    @rule(item=items, seconds=DELAYS, wall=st.booleans())
    def move(self, item: int, seconds: float, wall: bool) -> None:
        """delay/schedule of an item that is pending and not due moves it."""
        # Only such items: a due one may have come out already, and would come out
        # again. The choice of item never depends on the race, so replays draw alike.
        entry = self.pending.get(item)
        if entry is None or entry[0] <= self.now:
            return
        self._enter(item, self.now + seconds)
        if wall:
            self.scheduler.schedule(self.at(self.now + seconds), item)
        else:
            self.scheduler.delay(seconds, item)

    @rule(item=items)
    def cancel(self, item: int) -> None:
        """cancel() is True for a pending item that is not due; a True means never out."""
        cancelled = self.scheduler.cancel(item)
        entry = self.pending.get(item)
        if entry is None:  # handed out or cancelled already
            assert cancelled is False, f"cancel({item}) of an item no longer pending"
            return
        if entry[0] > self.now:
            assert cancelled is True, f"cancel({item}) before its time {entry[0]} said False"
        if cancelled:
            del self.pending[item]
            self.cancelled.add(item)
        # False for a due item: the thread took it already; the next check expects it.

    @rule(item=items, seconds=DELAYS, as_datetime=st.booleans(), only_sooner=st.booleans())
    def reschedule(self, item: int, seconds: float, as_datetime: bool, only_sooner: bool) -> None:
        """reschedule() moves a pending item (with only_sooner, only to an earlier time)."""
        new_due = self.now + seconds
        when: float | datetime = self.at(new_due) if as_datetime else seconds
        moved = self.scheduler.reschedule(item, when, only_sooner=only_sooner)
        entry = self.pending.get(item)
        if entry is None:
            assert moved is False, f"reschedule({item}) of an item no longer pending"
            return
        allowed = not only_sooner or new_due < entry[0]
        if entry[0] > self.now:
            assert moved is allowed, f"reschedule({item}, {when}) of a waiting item: {moved}"
        else:  # due: the thread may have taken it already, then nothing moves
            assert allowed or not moved, f"only_sooner moved {item} from {entry[0]} to {new_due}"
        if moved:
            self._enter(item, new_due)

    @rule(seconds=TICKS)
    def tick_and_wake(self, seconds: float) -> None:
        """Move the frozen clock, wake the scheduler, and check what came out."""
        self.tick(seconds)
        self.scheduler.wake()
        self._settle()

    @rule()
    def wake(self) -> None:
        """wake() without a clock move hands out what was already due, and nothing else."""
        self.scheduler.wake()
        self._settle()

    @rule()
    def restart(self) -> None:
        """stop() then start() keeps every pending item."""
        self.scheduler.stop()
        self.scheduler.start()


def test_scheduler_matches_model() -> None:
    """A real scheduler thread on a frozen clock hands out what is due, when due, in order."""
    run_state_machine_as_test(
        SchedulerMachine,
        settings=settings(max_examples=40, stateful_step_count=30, deadline=None),
    )


# == TaskManager: workers, scheduler and handlers =========================================


class ManagerMachine(FrozenClockMachine):
    """A running `TaskManager` (2 workers) against a model of every handler's fate.

    Tasks record the frozen time they ran at and return their own id (or raise, when
    planned to fail). A handler is `waiting` (queued or scheduled), `cancelled`
    (cancel() said True: it never runs) or `finished` (it ran once, and ended in the
    state recorded there). cancel() says False once a task has started; a task that
    then raises ends CANCELLED (the API says so), one that returns ends SUCCEEDED.
    """

    handlers = Bundle("handlers")

    def start(self) -> None:
        self.lock = threading.Lock()  # guards `runs` and `callbacks`, written by workers
        self.runs: list[tuple[int, float]] = []  # (task id, frozen seconds since T0)
        self.callbacks: collections.Counter[int] = collections.Counter()
        self.called_back: dict[int, threading.Event] = {}
        self.by_id: dict[int, TaskHandler] = {}
        self.fails: dict[int, bool] = {}
        self.due: dict[int, float] = {}  # every handler's latest due time
        self.waiting: set[int] = set()
        self.cancelled: set[int] = set()
        self.finished: dict[int, TaskState] = {}
        self.cancelled_late: set[int] = set()  # cancel() said False: it had started
        self.tm = TaskManager(workers=2)
        self.tm.start()

    def stop(self) -> None:
        try:
            if not _failing():
                self._drain()
        finally:
            self.tm.stop(timeout=WAIT)
        if not _failing():
            for hid, handler in self.by_id.items():
                assert handler.done(), f"{handler!r} not done after the drain and stop()"
                assert self.callbacks[hid] == 1, f"{handler!r}: {self.callbacks[hid]} callbacks"

    # -- tasks and callbacks (worker threads) ----------------------------------------

    def _run(self, ctx: Context) -> int:
        with self.lock:
            self.runs.append((ctx.task_id or 0, self.elapsed()))
        return ctx.task_id or 0

    def _run_and_fail(self, ctx: Context) -> int:
        self._run(ctx)
        raise RuntimeError("planned failure")

    def _done(self, handler: TaskHandler) -> None:
        with self.lock:
            self.callbacks[handler.id] += 1
        self.called_back[handler.id].set()

    # -- the model --------------------------------------------------------------------

    def _submit(
        self, fail: bool, how: str, seconds: float = 0.0, tz: timezone = UTC
    ) -> TaskHandler:
        """Wrap the task, count its callbacks, then submit the handler itself."""
        handler = self.tm.wrap_task(self._run_and_fail if fail else self._run)
        hid = handler.id
        self.by_id[hid] = handler
        self.fails[hid] = fail
        self.called_back[hid] = threading.Event()
        handler.add_done_callback(self._done)
        self.due[hid] = self.now + (seconds if how != "queue" else 0.0)
        self.waiting.add(hid)
        if how == "queue":
            submitted = self.tm.queue(handler)
        elif how == "delay":
            submitted = self.tm.delay(seconds, handler)
        else:
            submitted = self.tm.schedule(self.at(self.now + seconds, tz), handler)
        assert submitted is handler, "submitting a TaskHandler must not wrap it again"
        return handler

    def _settle(self) -> None:
        """After a wake: wait for every due task, then check every handler and the stats."""
        for hid in sorted(self.waiting):
            if self.due[hid] <= self.now:
                handler = self.by_id[hid]
                # The callback runs last, after the waiters are woken: wait for it.
                assert self.called_back[hid].wait(WAIT), f"{handler!r} did not finish"
                assert handler.done()
                state = handler.state
                if state is TaskState.CANCELLED:
                    assert self.fails[hid], f"{handler!r} returned, yet ended CANCELLED"
                    assert hid in self.cancelled_late, f"{handler!r}: nobody cancelled it"
                    with pytest.raises(concurrent.futures.CancelledError):
                        handler.result()
                elif self.fails[hid]:
                    assert state is TaskState.FAILED, f"{handler!r}"
                    error = handler.exception()
                    assert isinstance(error, TaskError), f"{handler!r}: {error!r}"
                else:
                    assert state is TaskState.SUCCEEDED, f"{handler!r}"
                    assert handler.result() == hid
                self.waiting.discard(hid)
                self.finished[hid] = state
        with self.lock:
            runs = list(self.runs)
            callbacks = dict(self.callbacks)
        ran = collections.Counter(hid for hid, _ in runs)
        for hid, at in runs:
            assert hid in self.finished, f"task {hid} ran but is not due or was cancelled"
            assert at >= self.due[hid], f"task {hid} ran at {at}, before its due {self.due[hid]}"
        for hid, state in self.finished.items():
            handler = self.by_id[hid]
            assert ran[hid] == 1, f"{handler!r} ran {ran[hid]} times"
            assert handler.state is state, f"{handler!r} was {state.name}"
            assert callbacks.get(hid) == 1, f"{handler!r}: {callbacks.get(hid)} callbacks"
        for hid in self.cancelled:
            handler = self.by_id[hid]
            assert handler.state is TaskState.CANCELLED
            assert handler.cancelled()
            assert callbacks.get(hid) == 1, f"{handler!r}: {callbacks.get(hid)} callbacks"
        for hid in self.waiting:  # none is due now: all wait in the scheduler
            handler = self.by_id[hid]
            assert handler.state is TaskState.SCHEDULED, f"{handler!r} due at {self.due[hid]}"
            assert not handler.done()
            assert hid not in callbacks
            assert handler.due == self.at(self.due[hid]), f"{handler!r}"
        stats = self.tm.stats()
        ended = collections.Counter(self.finished.values())
        assert stats.submitted == len(self.by_id)
        assert stats.succeeded == ended[TaskState.SUCCEEDED], stats
        assert stats.failed == ended[TaskState.FAILED], stats
        assert stats.cancelled == len(self.cancelled) + ended[TaskState.CANCELLED], stats
        assert stats.scheduled == len(self.waiting)
        assert (stats.queued, stats.running, stats.retried) == (0, 0, 0), stats
        assert stats.submitted == (
            stats.succeeded + stats.failed + stats.cancelled + stats.scheduled
        ), stats

    def _drain(self) -> None:
        """Everything comes due; once it ran, the manager is idle and every count adds up."""
        self.tick(1000.0)
        self.tm.scheduler.wake()
        self._settle()
        assert not self.waiting
        assert self.tm.join(timeout=WAIT), "join() after everything settled"
        stats = self.tm.stats()
        assert stats.submitted == stats.succeeded + stats.failed + stats.cancelled, stats

    # -- rules ------------------------------------------------------------------------

    @rule(target=handlers, fail=st.booleans())
    def queue(self, fail: bool) -> TaskHandler:
        """queue() a task: due now."""
        return self._submit(fail, "queue")

    @rule(target=handlers, fail=st.booleans(), seconds=DELAYS)
    def delay(self, fail: bool, seconds: float) -> TaskHandler:
        """delay() a task; a negative delay means now."""
        return self._submit(fail, "delay", seconds)

    @rule(target=handlers, fail=st.booleans(), seconds=DELAYS, tz=ZONES)
    def schedule(self, fail: bool, seconds: float, tz: timezone) -> TaskHandler:
        """schedule() a task at an aware datetime; a past one means now."""
        return self._submit(fail, "schedule", seconds, tz)

    @rule(handler=handlers)
    def cancel(self, handler: TaskHandler) -> None:
        """cancel() is True before the task starts (and then it never runs), else False."""
        hid = handler.id
        cancelled = handler.cancel()
        if hid in self.cancelled:
            assert cancelled is True, f"cancel() again of {handler!r}"
        elif hid in self.finished:
            expected = self.finished[hid] is TaskState.CANCELLED
            assert cancelled is expected, f"cancel() of finished {handler!r}"
        elif cancelled:
            assert handler.state is TaskState.CANCELLED
            with self.lock:
                assert self.callbacks[hid] == 1, "the callback runs in cancel()"
            self.waiting.discard(hid)
            self.cancelled.add(hid)
        else:  # it started already (so it was due) and runs to its end
            assert self.due[hid] <= self.now, f"cancel() of {handler!r} before it was due"
            self.cancelled_late.add(hid)

    @rule(handler=handlers, seconds=DELAYS, as_datetime=st.booleans(), only_sooner=st.booleans())
    def reschedule(
        self, handler: TaskHandler, seconds: float, as_datetime: bool, only_sooner: bool
    ) -> None:
        """reschedule() moves a scheduled task (with only_sooner, only to an earlier time)."""
        hid = handler.id
        new_due = self.now + seconds
        when: float | datetime = self.at(new_due) if as_datetime else seconds
        moved = self.tm.reschedule(handler, when, only_sooner=only_sooner)
        if hid not in self.waiting:
            assert moved is False, f"reschedule() of {handler.state.name} {handler!r}"
            return
        allowed = not only_sooner or new_due < self.due[hid]
        if self.due[hid] > self.now:
            assert moved is allowed, f"reschedule({handler!r}, {when}): {moved}"
        else:  # due: queued already, or about to be; then nothing moves
            assert allowed or not moved, f"only_sooner moved {handler!r} later"
        if moved:
            self.due[hid] = new_due

    @rule(seconds=TICKS)
    def tick_and_wake(self, seconds: float) -> None:
        """Move the frozen clock, wake the scheduler, wait for what is due, and check."""
        self.tick(seconds)
        self.tm.scheduler.wake()
        self._settle()

    @rule()
    def wake(self) -> None:
        """wake() without a clock move: what was due runs, nothing else does."""
        self.tm.scheduler.wake()
        self._settle()

    @rule()
    def restart(self) -> None:
        """stop() then start(): queued tasks finish, scheduled ones are kept."""
        self.tm.stop(timeout=WAIT)
        self.tm.start()


def test_manager_matches_model() -> None:
    """Random submit/cancel/reschedule/clock/wake on a manager agree with a handler model."""
    run_state_machine_as_test(
        ManagerMachine,
        settings=settings(max_examples=30, stateful_step_count=30, deadline=None),
    )
