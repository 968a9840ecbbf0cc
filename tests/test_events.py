"""Listeners: every event kind, in order, one call at a time, isolated from failures,
free to submit tasks, never stalling workers early, all delivered by stop()."""

from __future__ import annotations

import threading
from collections import defaultdict
from datetime import timedelta
from typing import Any

import pytest
from conftest import WAIT
from helpers import Recorder

from marionette import (
    Context,
    TaskError,
    TaskEvent,
    TaskEventKind,
    TaskHandler,
    TaskManager,
)
from marionette.events import BUFFER

K = TaskEventKind


# -- helpers -----------------------------------------------------------------------


class Collect:
    """A listener that keeps every event it gets (read it after stop())."""

    def __init__(self) -> None:
        self.events: list[TaskEvent] = []

    def __call__(self, event: TaskEvent) -> None:
        self.events.append(event)

    def kinds_of(self, handler: TaskHandler) -> list[TaskEventKind]:
        return [e.kind for e in self.events if e.task is handler]

    def of(self, handler: TaskHandler, kind: TaskEventKind) -> list[TaskEvent]:
        return [e for e in self.events if e.task is handler and e.kind is kind]


class Blocker:
    """A task that says when it started and returns once released."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()

    def __call__(self, ctx: Context) -> str:
        self.started.set()
        self.release.wait(WAIT)
        return "blocker"


class Fatal(BaseException):
    """A BaseException that is not an Exception: ends a task for good."""


def busy_work(n: int = 3000) -> int:
    """A little CPU work: makes a listener slow without sleeping."""
    total = 0
    for i in range(n):
        total += i
    return total


# -- what is delivered -------------------------------------------------------------------


def test_each_task_gets_its_events_in_order(tm: TaskManager) -> None:
    """Per task: SUBMITTED, STARTED, then RETRYING/STARTED per retry, then the outcome."""
    seen = Collect()
    tm.add_listener(seen)
    errors = {"flaky": 0}

    def flaky(ctx: Context) -> str:
        if ctx.attempt == 1:
            errors["flaky"] += 1
            raise OSError("once")
        return "flaky ok"

    def doomed(ctx: Context) -> None:
        raise ValueError(f"attempt {ctx.attempt}")

    def fatal(ctx: Context) -> None:
        raise Fatal("stop right there")

    ok = tm.queue(lambda ctx: "ok")
    retried = tm.queue(flaky, retries=1, backoff=0)
    failed = tm.queue(doomed, retries=1, backoff=0)
    died = tm.queue(fatal, retries=3, backoff=0)
    cancelled = tm.delay(60, lambda ctx: None)
    assert cancelled.cancel()
    assert tm.join(WAIT)
    tm.stop()
    assert seen.kinds_of(ok) == [K.SUBMITTED, K.STARTED, K.SUCCEEDED]
    assert seen.kinds_of(retried) == [K.SUBMITTED, K.STARTED, K.RETRYING, K.STARTED, K.SUCCEEDED]
    assert seen.kinds_of(failed) == [K.SUBMITTED, K.STARTED, K.RETRYING, K.STARTED, K.FAILED]
    assert seen.kinds_of(died) == [K.SUBMITTED, K.STARTED, K.FAILED]
    assert seen.kinds_of(cancelled) == [K.SUBMITTED, K.CANCELLED]


def test_events_carry_the_result_or_the_error(tm: TaskManager) -> None:
    """Events carry the result, the attempt's error, or the TaskError/BaseException."""
    seen = Collect()
    tm.add_listener(seen)
    raised: list[ValueError] = []
    fatal_raised: list[Fatal] = []

    def doomed(ctx: Context) -> None:
        exc = ValueError(f"attempt {ctx.attempt}")
        raised.append(exc)
        raise exc

    def fatal(ctx: Context) -> None:
        exc = Fatal("fatal")
        fatal_raised.append(exc)
        raise exc

    ok = tm.queue(lambda ctx: {"answer": 42})
    failed = tm.queue(doomed, retries=1, backoff=0)
    died = tm.queue(fatal)
    assert tm.join(WAIT)
    tm.stop()
    (success,) = seen.of(ok, K.SUCCEEDED)
    assert success.result == {"answer": 42}
    assert success.error is None
    (retrying,) = seen.of(failed, K.RETRYING)
    assert retrying.error is raised[0]
    (failure,) = seen.of(failed, K.FAILED)
    assert isinstance(failure.error, TaskError)
    assert failure.error is failed.exception()
    assert failure.error.attempts == 2
    assert list(failure.error.exceptions) == raised
    assert failure.result is None
    (death,) = seen.of(died, K.FAILED)
    assert death.error is fatal_raised[0]
    (submitted,) = seen.of(ok, K.SUBMITTED)
    assert submitted.error is None
    assert submitted.result is None
    for event in seen.events:
        assert event.at.utcoffset() == timedelta(0)
        assert event.at.tzinfo is not None
    assert all(isinstance(e.task, TaskHandler) for e in seen.events)


def test_started_is_sent_once_per_attempt(tm: TaskManager) -> None:
    """Three attempts: three STARTED events, two RETRYING, one FAILED."""
    seen = Collect()
    tm.add_listener(seen)

    def doomed(ctx: Context) -> None:
        raise OSError(ctx.attempt)

    handler = tm.queue(doomed, retries=2, backoff=0)
    assert isinstance(handler.exception(WAIT), TaskError)
    tm.stop()
    kinds = seen.kinds_of(handler)
    assert kinds.count(K.STARTED) == 3
    assert kinds.count(K.RETRYING) == 2
    assert kinds.count(K.FAILED) == 1


def test_a_keyed_duplicate_sends_no_event(tm: TaskManager) -> None:
    """A submission that returns the key's pending instance is not SUBMITTED again."""
    seen = Collect()
    tm.add_listener(seen, events=[K.SUBMITTED])
    first = tm.delay(60, lambda ctx: None, key="k")
    assert tm.delay(60, lambda ctx: None, key="k") is first
    assert tm.queue(lambda ctx: None, key="k") is first
    assert first.cancel()
    tm.stop()
    assert [e.task for e in seen.events] == [first]


def test_events_filters_the_kinds_received(tm: TaskManager) -> None:
    """events=[FAILED, CANCELLED] receives those kinds only."""
    seen = Collect()
    tm.add_listener(seen, events=(k for k in (K.FAILED, K.CANCELLED)))

    def doomed(ctx: Context) -> None:
        raise ValueError("no")

    ok = tm.queue(lambda ctx: "ok")
    failed = tm.queue(doomed)
    cancelled = tm.delay(60, lambda ctx: None)
    assert cancelled.cancel()
    assert tm.join(WAIT)
    tm.stop()
    assert sorted((e.kind.value, e.task.id) for e in seen.events) == sorted(
        [(K.FAILED.value, failed.id), (K.CANCELLED.value, cancelled.id)]
    )
    assert ok.result() == "ok"


# -- how it is delivered -----------------------------------------------------------------


def test_listeners_are_called_one_at_a_time_in_the_order_events_happened(
    tm: TaskManager,
) -> None:
    """Listener calls never overlap and all listeners see events in the order they happened."""
    lock = threading.Lock()
    inside = [0, 0]  # now, peak
    sequences: list[list[TaskEvent]] = [[], []]

    def listener(index: int) -> Any:
        def call(event: TaskEvent) -> None:
            with lock:
                inside[0] += 1
                inside[1] = max(inside[1], inside[0])
            busy_work(500)
            sequences[index].append(event)
            with lock:
                inside[0] -= 1

        return call

    tm.add_listener(listener(0))
    tm.add_listener(listener(1))

    def flaky(ctx: Context) -> int:
        if ctx.attempt == 1 and (ctx.task_id or 0) % 2:
            raise OSError("odd ones fail once")
        return ctx.attempt

    handlers = [tm.queue(flaky, retries=1, backoff=0) for _ in range(100)]
    for handler in handlers:
        handler.result(WAIT)
    tm.stop()
    assert inside[1] == 1
    assert sequences[0] == sequences[1]
    times = [e.at for e in sequences[0]]
    assert times == sorted(times)
    per_task: dict[int, list[TaskEventKind]] = defaultdict(list)
    for event in sequences[0]:
        per_task[event.task.id].append(event.kind)
    for kinds in per_task.values():
        assert kinds[0] is K.SUBMITTED
        assert kinds[-1] is K.SUCCEEDED
        assert kinds[1] is K.STARTED


def test_a_listener_that_raises_is_logged_and_kept() -> None:
    """A listener that raises is logged and kept; the other listeners get every event."""
    log = Recorder()
    manager = TaskManager(workers=2, logger=log)
    manager.start()
    try:
        calls: list[TaskEventKind] = []

        def broken(event: TaskEvent) -> None:
            calls.append(event.kind)
            if event.kind is K.STARTED:
                raise Fatal("a BaseException too")
            raise RuntimeError("listener bug")

        good = Collect()
        manager.add_listener(broken)
        manager.add_listener(good)
        handlers = [manager.queue(lambda ctx, i=i: i) for i in range(5)]
        assert [h.result(WAIT) for h in handlers] == list(range(5))
        manager.stop()
        assert len(good.events) == 15
        assert calls == [e.kind for e in good.events]
        assert len(log.named("listener raised")) == 15
    finally:
        manager.stop(timeout=WAIT)


def test_a_listener_may_submit_into_a_full_queue() -> None:
    """A listener submitting into a full queue (workers=1, queue_size=1) never blocks."""
    manager = TaskManager(workers=1, queue_size=1)
    manager.start()
    blocker = Blocker()
    try:
        running = manager.queue(blocker)
        assert blocker.started.wait(WAIT)
        children: list[TaskHandler] = []
        submitted = threading.Event()

        def listener(event: TaskEvent) -> None:
            if event.kind is K.SUBMITTED and event.task.name == "filler":
                children.extend(manager.queue(lambda ctx, i=i: i) for i in range(3))
                submitted.set()

        manager.add_listener(listener)
        filler = manager.queue(lambda ctx: "filler", name="filler")  # the queue is full
        assert submitted.wait(WAIT)
        assert running.running()  # nothing moved: the listener did not wait for room
        blocker.release.set()
        assert filler.result(WAIT) == "filler"
        assert [c.result(WAIT) for c in children] == [0, 1, 2]
    finally:
        blocker.release.set()
        manager.stop(timeout=WAIT)


def test_tasks_submitted_by_a_listener_send_events_too(tm: TaskManager) -> None:
    """Tasks a listener submits run, and their events reach the listener in order."""
    seen = Collect()
    followed: list[TaskHandler] = []
    chain_done = threading.Event()

    def listener(event: TaskEvent) -> None:
        seen(event)
        if event.kind is K.SUCCEEDED and event.result < 3:
            followed.append(tm.queue(lambda ctx, n=event.result + 1: n))
        elif event.kind is K.SUCCEEDED:
            chain_done.set()

    tm.add_listener(listener)
    first = tm.queue(lambda ctx: 0)
    assert chain_done.wait(WAIT)
    tm.stop()
    assert [h.result() for h in followed] == [1, 2, 3]
    for handler in [first, *followed]:
        assert seen.kinds_of(handler) == [K.SUBMITTED, K.STARTED, K.SUCCEEDED]


def test_a_slow_listener_does_not_stall_the_workers_before_the_buffer_fills(
    tm: TaskManager,
) -> None:
    """A stuck listener does not stop tasks completing while their events fit the buffer."""
    gate = threading.Event()
    seen = Collect()

    def stuck(event: TaskEvent) -> None:
        gate.wait(WAIT)
        seen(event)

    tm.add_listener(stuck)
    count = min(100, BUFFER // 4)
    handlers = [tm.queue(lambda ctx, i=i: i) for i in range(count)]
    assert [h.result(WAIT) for h in handlers] == list(range(count))
    assert seen.events == []
    gate.set()
    tm.stop()
    assert len(seen.events) == 3 * count


def test_a_stuck_listener_holds_back_producers_once_the_buffer_is_full(
    tm: TaskManager,
) -> None:
    """A stuck listener holds back producers once the buffer is full; nothing is lost."""
    gate = threading.Event()
    seen = Collect()

    def stuck(event: TaskEvent) -> None:
        gate.wait(WAIT)
        seen(event)

    tm.add_listener(stuck)
    count = 2 * BUFFER
    handlers: list[TaskHandler] = []

    def produce() -> None:
        for i in range(count):
            handlers.append(tm.queue(lambda ctx, i=i: i))

    producer = threading.Thread(target=produce, name="producer")
    producer.start()
    try:
        producer.join(0.5)  # a bound, not a synchronization: it must still be held
        assert producer.is_alive()
        assert len(handlers) < count
    finally:
        gate.set()
        producer.join(WAIT)
    assert not producer.is_alive()
    assert [h.result(WAIT) for h in handlers] == list(range(count))
    tm.stop()
    assert len(seen.events) == 3 * count


def test_stop_delivers_every_event_before_returning(tm: TaskManager) -> None:
    """stop() returns only after a lagging listener has received every event."""
    gate = threading.Event()
    seen = Collect()

    def slow(event: TaskEvent) -> None:
        gate.wait(WAIT)
        busy_work(10000)
        seen(event)

    tm.add_listener(slow)
    handlers = [tm.queue(lambda ctx, i=i: i) for i in range(60)]
    for handler in handlers:
        handler.result(WAIT)
    gate.set()
    tm.stop()
    assert len(seen.events) == 3 * 60
    assert {e.task.id for e in seen.events} == {h.id for h in handlers}


def test_a_listener_added_while_stopped_gets_events_after_start() -> None:
    """add_listener before start(): the listener receives the run's events."""
    manager = TaskManager(workers=1)
    seen = Collect()
    manager.add_listener(seen)
    manager.start()
    try:
        handler = manager.queue(lambda ctx: "ok")
        handler.result(WAIT)
        manager.stop()
        assert seen.kinds_of(handler) == [K.SUBMITTED, K.STARTED, K.SUCCEEDED]
    finally:
        manager.stop(timeout=WAIT)


def test_a_listener_survives_stop_and_start() -> None:
    """A listener keeps receiving events after the manager is restarted."""
    manager = TaskManager(workers=1)
    seen = Collect()
    manager.start()
    try:
        manager.add_listener(seen)
        before = manager.queue(lambda ctx: 1)
        before.result(WAIT)
        manager.stop()
        manager.start()
        after = manager.queue(lambda ctx: 2)
        after.result(WAIT)
        manager.stop()
        assert seen.kinds_of(before) == [K.SUBMITTED, K.STARTED, K.SUCCEEDED]
        assert seen.kinds_of(after) == [K.SUBMITTED, K.STARTED, K.SUCCEEDED]
    finally:
        manager.stop(timeout=WAIT)


# -- removing and validation -------------------------------------------------------------


def test_remove_stops_delivery_and_is_harmless_twice(tm: TaskManager) -> None:
    """After remove(), a listener gets nothing more; calling remove() again is fine."""
    removed = Collect()
    kept = Collect()
    got_first = threading.Event()

    def watching(event: TaskEvent) -> None:
        removed(event)
        if event.kind is K.SUCCEEDED:
            got_first.set()

    remove = tm.add_listener(watching)
    tm.add_listener(kept)
    first = tm.queue(lambda ctx: "first")
    assert got_first.wait(WAIT)
    remove()
    remove()
    second = tm.queue(lambda ctx: "second")
    second.result(WAIT)
    tm.stop()
    assert removed.kinds_of(first) == [K.SUBMITTED, K.STARTED, K.SUCCEEDED]
    assert removed.kinds_of(second) == []
    assert kept.kinds_of(second) == [K.SUBMITTED, K.STARTED, K.SUCCEEDED]


def test_removing_one_listener_keeps_the_kinds_of_the_others(tm: TaskManager) -> None:
    """Removing a listener of all kinds does not stop a FAILED-only listener."""
    failures = Collect()
    remove = tm.add_listener(lambda event: None)
    tm.add_listener(failures, events=[K.FAILED])
    remove()

    def doomed(ctx: Context) -> None:
        raise ValueError("no")

    handler = tm.queue(doomed)
    handler.exception(WAIT)
    tm.stop()
    assert [e.task for e in failures.events] == [handler]


@pytest.mark.parametrize("fn", [None, 42, "listener"])
def test_add_listener_rejects_a_non_callable(tm: TaskManager, fn: Any) -> None:
    """fn must be callable: TypeError."""
    with pytest.raises(TypeError):
        tm.add_listener(fn)


@pytest.mark.parametrize("events", [42, ["succeeded"], [K.FAILED, "failed"], [None]])
def test_add_listener_rejects_bad_events(tm: TaskManager, events: Any) -> None:
    """events must be an iterable of TaskEventKind: TypeError."""
    with pytest.raises(TypeError):
        tm.add_listener(lambda event: None, events=events)
