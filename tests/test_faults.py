"""Fault injection: whatever a task, strategy, callback, logger or listener does, the
manager keeps working, settles every handler once, and loses nothing.

After each fault the manager must still run a fresh task, `join()` must return True,
`stats()` must add up (``submitted == succeeded + failed + cancelled`` when idle), and
no handler may be left unsettled. Tests marked ``xfail(strict=True)`` show bugs.
"""

from __future__ import annotations

import collections
import functools
import math
import random
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import WAIT
from helpers import Recorder, Threads

from marionette import (
    Cancelled,
    Config,
    Context,
    GroupStats,
    QueueFull,
    TaskError,
    TaskEvent,
    TaskEventKind,
    TaskHandler,
    TaskManager,
    TaskManagerStopped,
    TaskState,
)
from marionette.events import BUFFER

#: Log events that only a bug in marionette itself produces.
INTERNAL_ERRORS = ("worker error", "scheduler out raised")


# -- helpers -----------------------------------------------------------------------


class Counter:
    """A thread-safe count that a test can wait on."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.value = 0

    def add(self, n: int = 1) -> None:
        with self.cond:
            self.value += n
            self.cond.notify_all()

    def wait_for(self, n: int, timeout: float = WAIT) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: self.value >= n, timeout)


class CustomBaseError(BaseException):
    """A BaseException that is not an Exception, as an application might define."""


BASE_EXCEPTIONS: list[type[BaseException]] = [
    SystemExit,
    KeyboardInterrupt,
    GeneratorExit,
    CustomBaseError,
]


def fresh(ctx: Context) -> str:
    return "fresh"


def always_fail(ctx: Context) -> None:
    raise OSError(f"attempt {ctx.attempt} failed")


def interrupt(ctx: Context) -> None:
    raise KeyboardInterrupt()


def assert_healthy(
    manager: TaskManager, rec: Recorder | None = None, handlers: Iterable[TaskHandler] = ()
) -> None:
    """The manager runs a fresh task, joins, every handler settled, its stats add up."""
    assert manager.is_running()
    assert manager.queue(fresh).result(WAIT) == "fresh"
    assert manager.join(WAIT)
    unsettled = [h for h in handlers if not h.done()]
    assert unsettled == []
    stats = manager.stats()
    assert stats.submitted == stats.succeeded + stats.failed + stats.cancelled, stats
    assert stats.running == 0, stats
    assert stats.queued == 0, stats
    assert stats.scheduled == 0, stats
    for name, group in stats.groups.items():
        assert (group.running, group.waiting) == (0, 0), (name, group)
    if rec is not None:
        for event in INTERNAL_ERRORS:
            assert rec.named(event) == [], event


@pytest.fixture
def rec() -> Recorder:
    """A recording logger."""
    return Recorder()


@pytest.fixture
def make(make: Callable[..., TaskManager], rec: Recorder) -> Callable[..., TaskManager]:
    """conftest's `make`, logging to `rec` unless told otherwise."""

    def factory(**overrides: Any) -> TaskManager:
        overrides.setdefault("logger", rec)
        return make(**overrides)

    return factory


@pytest.fixture
def release() -> Iterator[threading.Event]:
    """An event blocked tasks wait on; set at teardown so that no task stays blocked."""
    event = threading.Event()
    yield event
    event.set()


# -- tasks raising BaseException -------------------------------------------------------


@pytest.mark.parametrize("kind", BASE_EXCEPTIONS, ids=lambda k: k.__name__)
@pytest.mark.parametrize("how", ["queue", "delay", "exec"])
def test_base_exception_fails_the_task_at_once_and_the_worker_survives(
    make: Callable[..., TaskManager], rec: Recorder, kind: type[BaseException], how: str
) -> None:
    """A task raising a BaseException fails for good at once; its one worker lives on."""
    manager = make(workers=1)  # one worker: the fresh task proves that it survived
    exc = kind("boom")
    failed: list[TaskEvent] = []
    manager.add_listener(failed.append, events={TaskEventKind.FAILED})

    def task(ctx: Context) -> None:
        raise exc

    if how == "queue":
        handler = manager.queue(task, retries=3, backoff=0)
    elif how == "delay":
        handler = manager.delay(0, task, retries=3, backoff=0)
    else:
        handler = manager.wrap_task(task, retries=3, backoff=0)
        handler.exec()  # runs in this thread, which must not see the exception
    with pytest.raises(kind) as info:
        handler.result(WAIT)
    assert info.value is exc
    assert handler.state is TaskState.FAILED
    assert handler.attempts == 1
    assert handler.errors == (exc,)
    assert handler.exception(0) is exc
    assert_healthy(manager, rec, [handler])
    stats = manager.stats()
    assert stats.failed == 1
    assert stats.retried == 0
    manager.stop(timeout=WAIT)  # delivers every event
    assert [e.error for e in failed] == [exc]
    assert len(rec.named("task failed for good")) == 1


@pytest.mark.parametrize("kind", BASE_EXCEPTIONS, ids=lambda k: k.__name__)
def test_base_exceptions_from_many_tasks_never_exhaust_the_pool(
    make: Callable[..., TaskManager], rec: Recorder, kind: type[BaseException]
) -> None:
    """Ten times more BaseException tasks than workers: each fails, the pool is intact."""
    manager = make(workers=2, queue_size=4)

    def task(ctx: Context) -> None:
        raise kind(ctx.task_id)

    handlers = [manager.queue(task) for _ in range(20)]
    for handler in handlers:
        with pytest.raises(kind):
            handler.result(WAIT)
    assert {h.state for h in handlers} == {TaskState.FAILED}
    assert_healthy(manager, rec, handlers)


# -- tasks whose __str__ raises -----------------------------------------------------


class Unprintable:
    """A task whose __str__ and __repr__ raise; it fails when told to."""

    def __init__(self, fail: bool) -> None:
        self.fail = fail

    def __call__(self, ctx: Context) -> str:
        if self.fail:
            raise OSError("down")
        return "value"

    def __str__(self) -> str:
        raise RuntimeError("__str__ is broken")

    def __repr__(self) -> str:
        raise RuntimeError("__repr__ is broken")


class UnprintableError(Exception):
    """An exception whose __str__ and __repr__ raise."""

    def __str__(self) -> str:
        raise RuntimeError("__str__ is broken")

    def __repr__(self) -> str:
        raise RuntimeError("__repr__ is broken")


def test_task_whose_str_raises_runs_and_is_named_after_its_class(
    make: Callable[..., TaskManager], rec: Recorder
) -> None:
    """A task whose __str__ (and __repr__) raise runs; its name falls back to its class."""
    manager = make(workers=2)
    handler = manager.queue(Unprintable(fail=False))
    assert handler.result(WAIT) == "value"
    assert handler.name == "Unprintable"
    assert "Unprintable" in repr(handler)
    assert_healthy(manager, rec, [handler])


def test_failing_task_whose_str_raises_fails_with_a_readable_error(
    make: Callable[..., TaskManager], rec: Recorder
) -> None:
    """A failing task whose __str__ raises is retried and fails with a readable TaskError."""
    manager = make(workers=2)
    handler = manager.queue(Unprintable(fail=True), retries=1, backoff=0)
    error = handler.exception(WAIT)
    assert isinstance(error, TaskError)
    assert error.attempts == 2
    assert str(error).startswith("Unprintable #")
    [line] = rec.named("task failed for good")
    assert line["task"] == "Unprintable"
    assert_healthy(manager, rec, [handler])


def test_exception_whose_str_raises_is_reported_as_unprintable(
    make: Callable[..., TaskManager], rec: Recorder
) -> None:
    """An attempt error whose __str__ and __repr__ raise still gives a TaskError and logs."""
    manager = make(workers=2)

    def task(ctx: Context) -> None:
        raise UnprintableError()

    handler = manager.queue(task, retries=1, backoff=0)
    error = handler.exception(WAIT)
    assert isinstance(error, TaskError)
    assert "unprintable UnprintableError" in str(error)
    assert len(rec.named("task failed, retrying")) == 1
    assert len(rec.named("task failed for good")) == 1
    assert_healthy(manager, rec, [handler])


# -- strategies that raise ---------------------------------------------------------


def broken_strategy(state: object) -> Any:
    raise RuntimeError("the strategy is broken")


class Unbooleable:
    """A value whose truth cannot be told."""

    def __bool__(self) -> bool:
        raise RuntimeError("no truth value")


@pytest.mark.parametrize(
    ("option", "strategy", "cause"),
    [
        ("backoff", broken_strategy, RuntimeError),
        ("retry", broken_strategy, RuntimeError),
        ("stop", broken_strategy, RuntimeError),
        ("backoff", lambda state: "soon", ValueError),
        ("backoff", lambda state: None, TypeError),
        ("backoff", lambda state: math.nan, ValueError),
        ("backoff", lambda state: math.inf, ValueError),
        ("retry", lambda state: Unbooleable(), RuntimeError),
        ("stop", lambda state: Unbooleable(), RuntimeError),
    ],
    ids=[
        "backoff-raises",
        "retry-raises",
        "stop-raises",
        "backoff-returns-str",
        "backoff-returns-None",
        "backoff-returns-nan",
        "backoff-returns-inf",
        "retry-returns-unbooleable",
        "stop-returns-unbooleable",
    ],
)
def test_broken_retry_strategy_fails_the_task_loudly(
    make: Callable[..., TaskManager],
    rec: Recorder,
    option: str,
    strategy: Callable[[object], Any],
    cause: type[Exception],
) -> None:
    """A strategy that raises (or returns garbage) ends the task FAILED, with the cause."""
    manager = make(workers=2)
    opts: dict[str, Any] = {option: strategy}
    handler = manager.queue(always_fail, retries=3, **opts)
    error = handler.exception(WAIT)
    assert isinstance(error, TaskError)
    assert error.attempts == 1
    assert isinstance(error.__cause__, cause)
    assert handler.state is TaskState.FAILED
    assert len(rec.named("retry strategy raised")) == 1
    assert len(rec.named("task failed for good")) == 1
    assert_healthy(manager, rec, [handler])


def interrupting_strategy(state: object) -> Any:
    raise KeyboardInterrupt("inside a retry strategy")


@pytest.mark.parametrize("option", ["backoff", "retry", "stop"])
def test_strategy_raising_base_exception_still_settles_the_task(
    make: Callable[..., TaskManager], rec: Recorder, option: str
) -> None:
    """A strategy raising KeyboardInterrupt fails the task for good, as a task raising it would."""
    manager = make(workers=1)
    opts: dict[str, Any] = {option: interrupting_strategy}
    handler = manager.queue(always_fail, retries=3, **opts)
    # One worker: once the probe ran, the failing attempt was fully handled.
    assert manager.queue(fresh).result(WAIT) == "fresh"
    assert handler.done(), handler
    assert_healthy(manager, rec, [handler])


# -- done callbacks that raise -------------------------------------------------------


@pytest.mark.parametrize("ending", ["succeeded", "failed", "cancelled"])
def test_raising_done_callbacks_are_logged_and_the_others_still_run(
    make: Callable[..., TaskManager], rec: Recorder, release: threading.Event, ending: str
) -> None:
    """Callbacks raising Exception or SystemExit are logged; later callbacks still run."""
    manager = make(workers=2)
    if ending == "succeeded":
        handler = manager.wrap_task(fresh)
    elif ending == "failed":
        handler = manager.wrap_task(always_fail)
    else:
        handler = manager.wrap_task(lambda ctx: release.wait(WAIT))
    called: list[str] = []
    last = threading.Event()

    def raise_value_error(h: TaskHandler) -> None:
        called.append("value-error")
        raise ValueError("callback is broken")

    def raise_system_exit(h: TaskHandler) -> None:
        called.append("system-exit")
        raise SystemExit(1)

    def record(h: TaskHandler) -> None:
        called.append("record")
        last.set()

    for fn in (raise_value_error, raise_system_exit, record):
        handler.add_done_callback(fn)
    if ending == "cancelled":
        assert handler.cancel()  # cancelled before its submission: callbacks run here
    else:
        manager.queue(handler)
    assert last.wait(WAIT)
    assert called == ["value-error", "system-exit", "record"]
    # One added after the end runs at once, in this thread, and is logged too.
    handler.add_done_callback(raise_value_error)
    assert called[-1] == "value-error"
    assert len(rec.named("done callback raised")) == 3
    assert handler.done()
    assert_healthy(manager, rec, [handler])


def test_callback_raising_an_unprintable_error_does_not_stop_the_others(
    make: Callable[..., TaskManager], rec: Recorder
) -> None:
    """A callback raising an exception whose __repr__ raises does not skip later callbacks."""
    manager = make(workers=1)
    called: list[str] = []
    handler = manager.wrap_task(fresh)

    def unprintable(h: TaskHandler) -> None:
        raise UnprintableError()

    handler.add_done_callback(unprintable)
    handler.add_done_callback(lambda h: rec.note(called, "later"))
    manager.queue(handler)
    rec.wait_until(lambda: bool(called) or bool(rec.named("worker error")))
    assert rec.named("worker error") == []
    assert called == ["later"]
    assert_healthy(manager, rec, [handler])


# -- loggers that raise --------------------------------------------------------------


class BrokenLogger:
    """A structlog-style logger broken in the ways `how` names."""

    def __init__(self, how: str) -> None:
        self.how = how
        self.calls = 0

    def bind(self, **values: Any) -> Any:
        if self.how == "bind-raises":
            raise RuntimeError("bind is broken")
        if self.how == "bind-returns-junk":
            return 42  # not a logger at all
        return self

    def is_enabled_for(self, level: int) -> bool:
        if self.how == "level-check-raises":
            raise RuntimeError("level check is broken")
        return True

    def _broken(self, event: str, **values: Any) -> None:
        self.calls += 1
        raise RuntimeError("logging is broken")

    debug = info = warning = error = _broken


@pytest.mark.parametrize(
    "how", ["methods-raise", "bind-raises", "bind-returns-junk", "level-check-raises"]
)
def test_a_logger_that_raises_breaks_nothing(capsys: pytest.CaptureFixture[str], how: str) -> None:
    """With Config(logger=...) broken, tasks still succeed, retry, fail, cancel and stop."""
    manager = TaskManager(Config(logger=BrokenLogger(how), workers=2))
    manager.start()
    try:
        handlers = [
            manager.queue(fresh),
            manager.queue(lambda ctx: 1 if ctx.attempt > 1 else 1 / 0, retries=1, backoff=0),
            manager.queue(always_fail, retries=1, backoff=0),
            manager.queue(interrupt),
            manager.delay(3600, fresh),
        ]
        callback_ran = threading.Event()
        handlers[0].add_done_callback(lambda h: 1 / 0)
        handlers[0].add_done_callback(lambda h: callback_ran.set())
        assert handlers[0].result(WAIT) == "fresh"
        assert handlers[1].result(WAIT) == 1
        error = handlers[2].exception(WAIT)
        assert isinstance(error, TaskError)
        assert error.attempts == 2
        assert isinstance(handlers[3].exception(WAIT), KeyboardInterrupt)
        assert handlers[4].cancel()
        assert callback_ran.wait(WAIT)
        assert_healthy(manager, None, handlers)
        manager.stop(timeout=WAIT)
        assert not manager.is_running()
        manager.start()
        assert_healthy(manager)
    finally:
        manager.stop(timeout=WAIT)
    assert "the logger raised" in capsys.readouterr().err


class InterruptingLogger(Recorder):
    """A logger whose debug() raises KeyboardInterrupt (say, from a broken handler)."""

    def bind(self, **values: Any) -> InterruptingLogger:
        return self

    def debug(self, event: str, **values: Any) -> None:
        raise KeyboardInterrupt("from the logger")


def test_logger_raising_base_exception_still_wakes_waiters() -> None:
    """A logger raising KeyboardInterrupt still lets the task's callbacks run."""
    logger = InterruptingLogger()
    manager = TaskManager(workers=1, logger=logger)
    manager.start()
    try:
        called: list[str] = []
        handler = manager.wrap_task(fresh)
        handler.add_done_callback(lambda h: logger.note(called, "called"))
        manager.queue(handler)
        logger.wait_until(lambda: bool(called) or bool(logger.named("worker error")))
        assert logger.named("worker error") == []
        assert called == ["called"]
    finally:
        manager.stop(timeout=1.0)  # bounded: the bug leaves a task RUNNING for ever


# -- listeners that raise ---------------------------------------------------------------


def test_raising_listeners_are_logged_kept_and_do_not_starve_the_others(
    make: Callable[..., TaskManager], rec: Recorder
) -> None:
    """Listeners raising Exception or SystemExit are logged and kept; others see everything."""
    manager = make(workers=2)
    seen: list[TaskEvent] = []
    raised = collections.Counter[str]()

    def value_error(event: TaskEvent) -> None:
        raised["value-error"] += 1
        raise ValueError("listener is broken")

    def system_exit(event: TaskEvent) -> None:
        raised["system-exit"] += 1
        raise SystemExit(2)

    manager.add_listener(value_error)
    manager.add_listener(system_exit)
    manager.add_listener(seen.append)
    ok = manager.queue(fresh)
    bad = manager.queue(always_fail)
    later = manager.delay(3600, fresh)
    assert ok.result(WAIT) == "fresh"
    assert isinstance(bad.exception(WAIT), TaskError)
    assert later.cancel()
    manager.stop()  # delivers every event before it returns
    kinds = [(e.task, e.kind) for e in seen]
    assert (ok, TaskEventKind.SUCCEEDED) in kinds
    assert (bad, TaskEventKind.FAILED) in kinds
    assert (later, TaskEventKind.CANCELLED) in kinds
    assert raised == {"value-error": len(seen), "system-exit": len(seen)}
    assert len(rec.named("listener raised")) == 2 * len(seen)
    manager.start()  # the listeners are still there after a restart
    assert_healthy(manager, rec, [ok, bad, later])
    manager.stop()
    assert raised["value-error"] == len(seen)
    assert seen[-1].kind is TaskEventKind.SUCCEEDED


class UnprintableListener:
    """A listener that raises, and whose __repr__ raises too."""

    def __call__(self, event: TaskEvent) -> None:
        raise ValueError("listener is broken")

    def __repr__(self) -> str:
        raise RuntimeError("__repr__ is broken")


def test_listener_with_a_broken_repr_does_not_kill_event_delivery(
    monkeypatch: pytest.MonkeyPatch, rec: Recorder
) -> None:
    """A raising listener whose __repr__ raises is logged; other listeners get every event."""
    crashed: list[BaseException | None] = []
    state = threading.Condition()

    def excepthook(args: threading.ExceptHookArgs) -> None:
        with state:
            crashed.append(args.exc_value)
            state.notify_all()

    monkeypatch.setattr(threading, "excepthook", excepthook)
    manager = TaskManager(workers=2, logger=rec)
    manager.start()
    seen: list[TaskEvent] = []

    def record(event: TaskEvent) -> None:
        with state:
            seen.append(event)
            state.notify_all()

    try:
        manager.add_listener(UnprintableListener())
        manager.add_listener(record)
        handler = manager.queue(fresh)
        assert handler.result(WAIT) == "fresh"
        with state:  # whichever comes first: the event, or the death of the thread
            state.wait_for(
                lambda: (
                    bool(crashed)
                    or any(e.task is handler and e.kind is TaskEventKind.SUCCEEDED for e in seen)
                ),
                WAIT,
            )
        assert crashed == []
        assert [e.kind for e in seen if e.task is handler] == [
            TaskEventKind.SUBMITTED,
            TaskEventKind.STARTED,
            TaskEventKind.SUCCEEDED,
        ]
    finally:
        manager.stop(timeout=1.0)  # bounded: the bug makes an unbounded stop() hang


# -- a task that ignores its context and outlives stop(timeout) --------------------------


@pytest.mark.parametrize("ending", ["returns", "raises-ctx-err"])
def test_task_outliving_stop_timeout_has_its_context_cancelled_and_settles(
    make: Callable[..., TaskManager], rec: Recorder, release: threading.Event, ending: str
) -> None:
    """stop(timeout) returns past a stubborn task, cancels its context; nothing is lost."""
    manager = make(workers=1)
    started = threading.Event()
    seen: dict[str, Any] = {}

    def stubborn(ctx: Context) -> str:
        started.set()
        release.wait(WAIT)  # ignores its context until the test lets it go
        seen["err"] = ctx.err
        if ending == "raises-ctx-err":
            ctx.check()
        return "late"

    handler = manager.queue(stubborn)
    assert started.wait(WAIT)
    queued = manager.queue(fresh)
    before = time.monotonic()
    manager.stop(timeout=0.05)
    assert time.monotonic() - before < WAIT  # it returned: it did not wait for the task
    assert not manager.is_running()
    assert handler.state is TaskState.RUNNING
    assert queued.state is TaskState.PENDING  # kept for the next start, not dropped
    manager.start()
    assert queued.result(WAIT) == "fresh"
    assert not manager.join(0)  # the stubborn task still counts
    release.set()
    assert manager.join(WAIT)
    assert isinstance(seen["err"], Cancelled)
    if ending == "returns":
        assert handler.result(0) == "late"
    else:
        assert handler.state in (TaskState.FAILED, TaskState.CANCELLED)
    assert_healthy(manager, rec, [handler, queued])


# -- periodic tasks and group limits under faults -----------------------------------------


@pytest.mark.parametrize("kind", [OSError, KeyboardInterrupt], ids=lambda k: k.__name__)
def test_periodic_whose_task_always_raises_keeps_running(
    make: Callable[..., TaskManager], rec: Recorder, kind: type[BaseException]
) -> None:
    """A periodic whose every run raises (Exception or BaseException) keeps being run."""
    manager = make(workers=2)
    failures = Counter()
    manager.add_listener(lambda e: failures.add(), events={TaskEventKind.FAILED})

    def task(ctx: Context) -> None:
        raise kind("every run fails")

    periodic = manager.every(0.01, task, start=0)
    assert failures.wait_for(3)
    assert not periodic.cancelled()
    assert periodic.runs >= 3
    last = periodic.last
    assert last is not None
    periodic.cancel()
    assert manager.join(WAIT)
    assert_healthy(manager, rec)


@pytest.mark.parametrize(
    "fault",
    ["SystemExit", "KeyboardInterrupt", "CustomBaseError", "strategy-raises", "cancelled"],
)
def test_grouped_task_ending_badly_frees_its_group_slot(
    make: Callable[..., TaskManager], rec: Recorder, release: threading.Event, fault: str
) -> None:
    """A grouped task that raises a BaseException (or whose strategy breaks) frees its slot."""
    manager = make(workers=3, limits={"g": 1})
    started = threading.Event()

    def task(ctx: Context) -> None:
        started.set()
        if fault == "cancelled":
            ctx.wait(WAIT)
            ctx.check()
        release.wait(WAIT)
        if fault == "SystemExit":
            raise SystemExit(1)
        if fault == "KeyboardInterrupt":
            raise KeyboardInterrupt()
        if fault == "CustomBaseError":
            raise CustomBaseError()
        raise OSError("fails; the retry strategy then breaks")

    bad = manager.queue(task, group="g", key="k", retries=2, backoff=broken_strategy)
    assert started.wait(WAIT)
    waiting = manager.queue(fresh, group="g")
    same_key = manager.queue(fresh, key="k")
    assert manager.stats().groups["g"].running == 1
    if fault == "cancelled":
        assert not bad.cancel()  # running: its context is cancelled
    release.set()
    assert waiting.result(WAIT) == "fresh"
    assert same_key.result(WAIT) == "fresh"
    assert bad.state is (TaskState.CANCELLED if fault == "cancelled" else TaskState.FAILED)
    assert manager.stats().groups["g"] == GroupStats(limit=1, running=0, waiting=0)
    assert manager.queue(fresh, group="g").result(WAIT) == "fresh"
    assert_healthy(manager, rec, [bad, waiting, same_key])


# -- deadlock freedom ----------------------------------------------------------------------


def test_tasks_submitting_into_a_full_queue_never_deadlock(
    make: Callable[..., TaskManager], rec: Recorder
) -> None:
    """A tree of tasks each submitting 3 more into a queue of size 1 runs to the end."""
    manager = make(workers=2, queue_size=1)
    handlers: list[TaskHandler] = []
    lock = threading.Lock()

    def node(depth: int) -> Callable[[Context], int]:
        def run(ctx: Context) -> int:
            if depth:
                children = [manager.queue(node(depth - 1)) for _ in range(3)]
                with lock:
                    handlers.extend(children)
            return depth

        return run

    root = manager.queue(node(5))
    assert root.result(WAIT) == 5
    assert manager.join(6 * WAIT)
    assert len(handlers) == 3 + 9 + 27 + 81 + 243
    assert {h.state for h in handlers} == {TaskState.SUCCEEDED}
    assert_healthy(manager, rec, [root, *handlers])


def test_done_callbacks_submitting_into_a_full_queue_never_deadlock(
    make: Callable[..., TaskManager], rec: Recorder
) -> None:
    """Done callbacks (run by workers) submit into a full queue without blocking it."""
    manager = make(workers=1, queue_size=1)
    follow_ups: list[TaskHandler] = []
    done = Counter()

    def chain(h: TaskHandler) -> None:
        if len(follow_ups) < 50:
            nxt = manager.wrap_task(fresh)
            nxt.add_done_callback(chain)
            nxt.add_done_callback(lambda h: done.add())
            follow_ups.append(nxt)
            manager.queue(nxt)
            manager.queue(fresh)  # the queue is full now: this must not block a worker

    first = manager.wrap_task(fresh)
    first.add_done_callback(chain)
    manager.queue(first)
    assert done.wait_for(50, 6 * WAIT)
    assert manager.join(WAIT)
    assert_healthy(manager, rec, [first, *follow_ups])


def test_listeners_submitting_into_a_full_queue_never_deadlock(
    make: Callable[..., TaskManager], rec: Recorder
) -> None:
    """A listener submitting follow-up tasks into a queue of size 1 never stalls anything."""
    manager = make(workers=2, queue_size=1)
    follow_ups: list[TaskHandler] = []
    finished = Counter()

    def on_success(event: TaskEvent) -> None:
        depth = event.result
        if isinstance(depth, int) and depth > 0:
            for _ in range(2):
                follow_ups.append(manager.queue(lambda ctx, d=depth - 1: d))
        finished.add()

    manager.add_listener(on_success, events={TaskEventKind.SUCCEEDED})
    seeds = [manager.queue(lambda ctx: 4) for _ in range(3)]
    expected = 3 * (1 + 2 + 4 + 8 + 16)  # each seed: a binary tree of depth 4
    assert finished.wait_for(expected, 6 * WAIT)
    assert manager.join(WAIT)
    assert len(follow_ups) == expected - 3
    assert_healthy(manager, rec, [*seeds, *follow_ups])


@pytest.mark.parametrize("timeout", [None, WAIT], ids=["stop()", "stop(timeout)"])
def test_stop_from_inside_a_task_returns_and_the_manager_starts_again(
    make: Callable[..., TaskManager], rec: Recorder, timeout: float | None
) -> None:
    """A task calling stop() gets it back, the manager stops, and can be started again."""
    manager = make(workers=2)

    def stopper(ctx: Context) -> bool:
        manager.stop(timeout=timeout)
        return manager.is_running()

    handler = manager.queue(stopper)
    assert handler.result(WAIT) is False
    assert not manager.is_running()
    with pytest.raises(TaskManagerStopped):
        manager.queue(fresh)
    manager.start()
    assert_healthy(manager, rec, [handler])


def test_task_calling_stop_then_start_leaves_a_running_manager(
    make: Callable[..., TaskManager], rec: Recorder
) -> None:
    """A task that stops and restarts its own manager leaves it running and usable."""
    manager = make(workers=2)

    def restarter(ctx: Context) -> bool:
        manager.stop()
        manager.start()
        return manager.is_running()

    handler = manager.queue(restarter)
    assert handler.result(WAIT) is True
    assert_healthy(manager, rec, [handler])


@pytest.mark.parametrize("where", ["callback", "listener"])
def test_stop_from_a_callback_or_listener_returns(
    make: Callable[..., TaskManager], rec: Recorder, where: str
) -> None:
    """stop() called from a done callback or a listener returns; the manager restarts."""
    manager = make(workers=2)
    stopped = threading.Event()

    def stop(_: object) -> None:
        if not stopped.is_set():  # once: the fresh task of the health check comes later
            manager.stop()
            stopped.set()

    if where == "callback":
        handler = manager.wrap_task(fresh)
        handler.add_done_callback(stop)
        manager.queue(handler)
    else:
        manager.add_listener(stop, events={TaskEventKind.SUCCEEDED})
        handler = manager.queue(fresh)
    assert stopped.wait(WAIT)
    assert not manager.is_running()
    manager.start()
    assert_healthy(manager, rec, [handler])


@pytest.mark.parametrize("where", ["task", "callback", "listener"])
def test_join_from_inside_raises_runtime_error_instead_of_hanging(
    make: Callable[..., TaskManager], rec: Recorder, where: str
) -> None:
    """join() from a task, a done callback or a listener raises RuntimeError at once."""
    manager = make(workers=2)
    outcome: list[BaseException | bool] = []
    done = threading.Event()

    def try_join(_: object) -> None:
        try:
            outcome.append(manager.join())
        except BaseException as exc:
            outcome.append(exc)
        done.set()

    if where == "task":
        handler = manager.queue(try_join)
    elif where == "callback":
        handler = manager.wrap_task(fresh)
        handler.add_done_callback(try_join)
        manager.queue(handler)
    else:
        manager.add_listener(try_join, events={TaskEventKind.SUCCEEDED})
        handler = manager.queue(fresh)
    assert done.wait(WAIT)
    [error] = outcome
    assert isinstance(error, RuntimeError)
    assert "itself" in str(error)
    assert_healthy(manager, rec, [handler])


def test_join_inside_a_task_run_by_exec_does_not_wait_for_itself(
    make: Callable[..., TaskManager],
) -> None:
    """join() from a task that exec() runs in the calling thread raises or returns True."""
    manager = make(workers=2)
    outcome: list[BaseException | bool] = []

    def try_join(ctx: Context) -> None:
        try:
            outcome.append(manager.join(timeout=0.5))  # without a timeout: forever
        except RuntimeError as exc:
            outcome.append(exc)

    manager.wrap_task(try_join).exec()
    [result] = outcome
    assert result is True or isinstance(result, RuntimeError)


DEADLOCK_SCRIPT = textwrap.dedent(
    """
    import os, sys, threading
    from marionette import TaskManager

    manager = TaskManager(workers=2)
    manager.start()
    in_task, go = threading.Event(), threading.Event()

    def task(ctx):
        in_task.set()
        go.wait(30)
        manager.stop()  # stop() from inside a task, while another stop() waits for it
        return "ok"

    handler = manager.queue(task)
    in_task.wait(30)
    stopper = threading.Thread(target=manager.stop)
    stopper.start()
    while manager.is_running():
        threading.Event().wait(0.001)
    starter = threading.Thread(target=manager.start)
    starter.start()

    def starter_waits():
        frame, names = sys._current_frames().get(starter.ident), []
        while frame is not None:
            names.append(frame.f_code.co_name)
            frame = frame.f_back
        return "start" in names and "wait" in names

    # Poll (bounded) until start() waits for the stop: no event marks that moment.
    for _ in range(30_000):
        if starter_waits():
            break
        threading.Event().wait(0.001)
    else:
        print("start() never waited")
        os._exit(2)
    go.set()
    stopper.join(5)  # a hang guard: without the deadlock, this takes milliseconds
    starter.join(1)
    if stopper.is_alive() or starter.is_alive():
        print("deadlock")
        os._exit(3)
    print("ok", handler.result(5))
    manager.stop()
    """
)


def test_stop_from_a_task_while_start_waits_for_another_stop_does_not_deadlock() -> None:
    """Outside stop() + outside start() + a task calling stop(): all three return."""
    done = subprocess.run(
        [sys.executable, "-c", DEADLOCK_SCRIPT],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=6 * WAIT,
        check=False,
    )
    assert done.stdout.strip() == "ok ok", (done.returncode, done.stdout, done.stderr)


def test_listeners_are_never_called_by_two_threads_after_a_stop_from_a_listener(
    make: Callable[..., TaskManager],
) -> None:
    """A listener that stops the manager mid-batch: after a restart, still one at a time."""
    manager = make(workers=2)
    lock = threading.Lock()
    inside = [0]
    overlapped = threading.Event()
    hold_first, blocked, go = threading.Event(), threading.Event(), threading.Event()
    new_delivered = threading.Event()
    first = [True]

    def listener(event: TaskEvent) -> None:
        with lock:
            inside[0] += 1
            if inside[0] > 1:
                overlapped.set()
        try:
            if first[0]:  # hold the first event so the rest arrive as one batch
                first[0] = False
                hold_first.wait(WAIT)
            name, kind = event.task.name, event.kind
            if kind is TaskEventKind.SUCCEEDED and name == "stopper":
                manager.stop()
            elif kind is TaskEventKind.SUCCEEDED and name == "after":
                blocked.set()
                go.wait(WAIT)
            elif name == "new":
                new_delivered.set()
        finally:
            with lock:
                inside[0] -= 1

    manager.add_listener(listener)
    for name in ("first", "stopper", "after"):
        assert manager.queue(fresh, name=name).result(WAIT) == "fresh"
    hold_first.set()
    assert blocked.wait(WAIT)  # the stop() ran; the old thread delivers the rest of its run

    def restart_and_submit() -> None:
        manager.start()
        manager.queue(fresh, name="new").result(WAIT)

    threads = Threads()
    threads.start(restart_and_submit)
    # In order, "new" is delivered only after the old batch ends: give it a short
    # window to show up early (it does at once when the bug is there).
    new_delivered.wait(2.0)
    go.set()
    threads.join()
    assert new_delivered.wait(WAIT)
    assert not overlapped.is_set()


def test_a_stop_from_a_listener_still_delivers_every_event_of_the_run(
    make: Callable[..., TaskManager],
) -> None:
    """Events buffered behind the listener that stops the manager are delivered (no
    restart needed), in order, by the same thread."""
    manager = make(workers=2)
    entered, hold, seen_all = threading.Event(), threading.Event(), threading.Event()
    seen: list[tuple[str, TaskEventKind]] = []
    threads: set[threading.Thread] = set()

    def listener(event: TaskEvent) -> None:
        threads.add(threading.current_thread())
        if not seen:
            entered.set()
            hold.wait(WAIT)  # the events of b and c pile up behind this batch
            manager.stop()
        seen.append((event.task.name, event.kind))
        if len(seen) == 9:
            seen_all.set()

    manager.add_listener(listener)
    handlers = [manager.queue(fresh, name="a")]
    assert entered.wait(WAIT)
    handlers += [manager.queue(fresh, name=name) for name in "bc"]
    for handler in handlers:
        assert handler.result(WAIT) == "fresh"
    hold.set()
    assert seen_all.wait(WAIT)
    assert not manager.is_running()
    assert len(threads) == 1
    for name in "abc":
        kinds = [kind for n, kind in seen if n == name]
        assert kinds == [TaskEventKind.SUBMITTED, TaskEventKind.STARTED, TaskEventKind.SUCCEEDED]


def test_a_listener_that_stops_restarts_and_stops_again_never_deadlocks(
    make: Callable[..., TaskManager], rec: Recorder
) -> None:
    """The second stop() comes from the old delivery thread, which the new one waits for:
    it must not wait for the new one in turn."""
    manager = make(workers=2)
    done, b_succeeded = threading.Event(), threading.Event()
    b: list[TaskHandler] = []

    def listener(event: TaskEvent) -> None:
        if event.task.name == "a" and event.kind is TaskEventKind.SUCCEEDED:
            manager.stop()
            manager.start()
            b.append(manager.queue(fresh, name="b"))
            manager.stop()  # hung here: waited for the new thread, which joins this one
            done.set()
        elif event.task.name == "b" and event.kind is TaskEventKind.SUCCEEDED:
            b_succeeded.set()

    manager.add_listener(listener)
    manager.queue(fresh, name="a")
    assert done.wait(WAIT)
    assert b_succeeded.wait(WAIT)  # b ran in the run between; its events arrive
    assert b[0].result(WAIT) == "fresh"
    manager.start()
    assert_healthy(manager, rec, b)


def test_an_old_delivery_thread_never_waits_for_room_in_the_buffer(
    make: Callable[..., TaskManager], rec: Recorder
) -> None:
    """After a stop and start from a listener, the old thread submits more than the
    buffer holds: it must not wait for the new thread to drain it (that one waits for
    the old thread to end)."""
    manager = make(workers=2)
    done = threading.Event()
    handlers: list[TaskHandler] = []

    def listener(event: TaskEvent) -> None:
        if event.task.name == "a" and event.kind is TaskEventKind.SUCCEEDED:
            manager.stop()
            manager.start()
            handlers.extend(manager.queue(fresh) for _ in range(BUFFER + 100))
            done.set()

    manager.add_listener(listener)
    manager.queue(fresh, name="a")
    assert done.wait(WAIT)
    assert all(h.result(WAIT) == "fresh" for h in handlers)
    assert_healthy(manager, rec, handlers)


# -- races -----------------------------------------------------------------------------


def test_cancel_racing_dispatch_of_plain_keyed_and_grouped_tasks(rec: Recorder) -> None:
    """cancel() from 3 threads while workers dispatch: True means it never ran; none twice."""
    n, cancellers = 1_500, 3
    runs = collections.Counter[int]()
    runs_lock = threading.Lock()
    gate = threading.Event()
    manager = TaskManager(workers=4, queue_size=n + 8, logger=rec, limits={"g": 2})
    manager.start()

    def task(i: int) -> Callable[[Context], int]:
        def run(ctx: Context) -> int:
            with runs_lock:
                runs[i] += 1
            return i

        return run

    try:
        for _ in range(4):  # hold every worker until the race starts
            manager.queue(lambda ctx: gate.wait(WAIT))
        handlers: list[TaskHandler] = []
        for i in range(n):
            opts: dict[str, Any] = {}
            if i % 4 == 1:
                opts["key"] = f"k{i}"
            elif i % 4 == 2:
                opts["group"] = "g"
            if i % 3 == 0:
                handlers.append(manager.delay(0, task(i), **opts))
            else:
                handlers.append(manager.queue(task(i), **opts))
        said_true: list[set[int]] = [set() for _ in range(cancellers)]
        go = threading.Barrier(cancellers + 1)

        def cancel_all(c: int) -> None:
            order = list(enumerate(handlers))
            random.Random(c).shuffle(order)
            go.wait(WAIT)
            for i, handler in order:
                if handler.cancel():
                    said_true[c].add(i)

        threads = Threads()
        for c in range(cancellers):
            threads.start(functools.partial(cancel_all, c))
        go.wait(WAIT)
        gate.set()
        threads.join()
        assert manager.join(6 * WAIT)
        cancelled = set().union(*said_true)
        for i, handler in enumerate(handlers):
            assert runs[i] <= 1, (i, handler)
            if i in cancelled:
                assert runs[i] == 0, (i, handler)
                assert handler.state is TaskState.CANCELLED
            else:
                assert handler.state is TaskState.SUCCEEDED, (i, handler)
                assert runs[i] == 1
        assert_healthy(manager, rec, handlers)
    finally:
        gate.set()
        manager.stop(timeout=WAIT)


def test_stop_racing_submissions_from_eight_threads_loses_nothing(rec: Recorder) -> None:
    """8 threads submit while stop()/start() cycle: each refused or run exactly once."""
    producers, cycles = 8, 4
    manager = TaskManager(workers=2, queue_size=4, logger=rec)
    runs = collections.Counter[tuple[int, int]]()
    runs_lock = threading.Lock()
    accepted: dict[tuple[int, int], TaskHandler] = {}
    refused: set[tuple[int, int]] = set()
    progress = Counter()
    running = threading.Event()  # cleared before each stop(), set after each start()
    finished = threading.Event()

    def task(key: tuple[int, int]) -> Callable[[Context], None]:
        def run(ctx: Context) -> None:
            with runs_lock:
                runs[key] += 1

        return run

    def produce(p: int) -> None:
        i = 0
        while not finished.is_set():
            if not running.wait(WAIT):
                continue
            key = (p, i)
            i += 1
            try:
                if i % 4 == 0:
                    handler = manager.queue(task(key))
                elif i % 4 == 1:
                    handler = manager.queue(task(key), block=False)
                elif i % 4 == 2:
                    handler = manager.delay(0, task(key))
                else:
                    handler = manager.schedule(datetime.now(UTC) - timedelta(1), task(key))
            except (TaskManagerStopped, QueueFull):
                with runs_lock:
                    refused.add(key)
                continue
            with runs_lock:
                accepted[key] = handler
            progress.add()

    threads = Threads()
    try:
        manager.start()
        running.set()
        for p in range(producers):
            threads.start(functools.partial(produce, p))
        for cycle in range(1, cycles + 1):
            assert progress.wait_for(cycle * 300, 6 * WAIT)
            running.clear()
            manager.stop(timeout=None if cycle % 2 else 0.0)
            manager.start()
            running.set()
        finished.set()
        threads.join()
        assert manager.join(6 * WAIT)
        assert {h.state for h in accepted.values()} == {TaskState.SUCCEEDED}
        assert set(runs) == set(accepted)
        assert set(runs.values()) == {1}
        assert not (refused & set(runs))
        stats = manager.stats()
        assert stats.submitted == len(accepted)
        assert_healthy(manager, rec, list(accepted.values()))
    finally:
        finished.set()
        running.set()
        threads.join()
        manager.stop(timeout=WAIT)


def test_start_and_stop_from_several_threads_at_once_leave_a_usable_manager(
    rec: Recorder,
) -> None:
    """start()/stop() hammered from 4 threads while 2 submit: no hang, nothing lost."""
    manager = TaskManager(workers=2, logger=rec)
    before = set(threading.enumerate())
    accepted: list[TaskHandler] = []
    lock = threading.Lock()
    finished = threading.Event()

    def toggle(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(40):
            if rng.random() < 0.5:
                manager.start()
            else:
                manager.stop(timeout=rng.choice([None, 0.0, WAIT]))

    def produce() -> None:
        while not finished.is_set():
            try:
                handler = manager.queue(fresh)
            except TaskManagerStopped:
                continue
            with lock:
                accepted.append(handler)

    producers, togglers = Threads(), Threads()
    try:
        for _ in range(2):
            producers.start(produce)
        for seed in range(4):
            togglers.start(functools.partial(toggle, seed))
        togglers.join()
        finished.set()
        producers.join()
        manager.stop()
        left = [t for t in threading.enumerate() if t not in before]
        for thread in left:  # workers a stop(timeout=0) left behind are on their way out
            thread.join(WAIT)
        assert [t.name for t in left if t.is_alive()] == []
        manager.start()
        assert manager.join(6 * WAIT)
        ours = sorted(t.name for t in threading.enumerate() if t not in before)
        assert ours == ["marionette-scheduler", "marionette-worker-1", "marionette-worker-2"]
        assert {h.state for h in accepted} <= {TaskState.SUCCEEDED}
        assert_healthy(manager, rec, accepted)
    finally:
        finished.set()
        producers.join()
        manager.stop(timeout=WAIT)
