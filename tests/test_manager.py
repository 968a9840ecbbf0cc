"""TaskManager: lifecycle, submission, options, cancellation, join, failures, no deadlock."""

from __future__ import annotations

import concurrent.futures
import math
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import freezegun
import freezegun.api
import pytest
import tenacity
from conftest import WAIT
from helpers import Recorder
from hypothesis import given, settings
from hypothesis import strategies as st

from marionette import (
    Cancelled,
    Config,
    Context,
    DeadlineExceeded,
    QueueFull,
    Scheduler,
    TaskError,
    TaskHandler,
    TaskManager,
    TaskManagerStopped,
    TaskState,
    Unschedulable,
    _queue,
)

Clock = freezegun.api.FrozenDateTimeFactory


# -- helpers -----------------------------------------------------------------------


class Blocker:
    """A task that says it started, then waits for `release`, ignoring its context."""

    def __init__(self, release: threading.Event) -> None:
        self.started = threading.Event()
        self.release = release
        self.ctx: Context | None = None

    def __call__(self, ctx: Context) -> str:
        self.ctx = ctx
        self.started.set()
        if not self.release.wait(WAIT):
            raise TimeoutError("the test never released this task")
        return "released"


class Runner(threading.Thread):
    """Call `fn` in a thread of its own; `outcome()` joins it and returns or raises."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        super().__init__(name="test-runner")
        self.fn = fn
        self.value: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.value = self.fn()
        except BaseException as exc:
            self.error = exc

    def outcome(self) -> Any:
        self.join(WAIT)
        assert not self.is_alive(), "the thread did not finish"
        if self.error is not None:
            raise self.error
        return self.value


def fail_times(n: int, exc: Callable[[], BaseException] = lambda: OSError("flaky")) -> Any:
    """A task that fails its first `n` attempts, then returns ``"ok"``."""

    def task(ctx: Context) -> str:
        if ctx.attempt <= n:
            raise exc()
        return "ok"

    return task


def submit(manager: TaskManager, how: str, task: Any, **opts: Any) -> TaskHandler:
    """Submit `task` the way `how` names (due now), or only wrap it for "wrap_task"."""
    if how == "queue":
        return manager.queue(task, **opts)
    if how == "queue-nonblocking":
        return manager.queue(task, block=False, **opts)
    if how == "delay":
        return manager.delay(0, task, **opts)
    if how == "schedule":
        return manager.schedule(datetime.now(UTC), task, **opts)
    if how == "wrap_task":
        return manager.wrap_task(task, **opts)
    raise AssertionError(f"unknown submission {how!r}")


def always_fail(ctx: Context) -> None:
    raise OSError(f"attempt {ctx.attempt}")


def watch_stop(monkeypatch: pytest.MonkeyPatch, manager: TaskManager) -> threading.Event:
    """An event set once `manager.stop()` has begun (it stops the scheduler first)."""
    began = threading.Event()
    original = manager.scheduler.stop

    def stop() -> None:
        began.set()
        original()

    monkeypatch.setattr(manager.scheduler, "stop", stop)
    return began


@pytest.fixture
def release() -> Iterator[threading.Event]:
    """The event blocked tasks wait on; set at teardown so no task stays blocked."""
    event = threading.Event()
    yield event
    event.set()


@pytest.fixture
def rec() -> Recorder:
    """A recording logger."""
    return Recorder()


def marionette_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("marionette-")}


# -- lifecycle -----------------------------------------------------------------------


def test_start_is_a_no_op_when_running() -> None:
    """start() on a running manager starts no new thread and keeps it running."""
    before = marionette_threads()
    manager = TaskManager(workers=2)
    try:
        manager.start()
        threads = marionette_threads() - before
        manager.start()
        assert marionette_threads() - before == threads
        assert len(threads) == 3
        assert manager.is_running()
    finally:
        manager.stop()


def test_stop_is_a_no_op_when_stopped() -> None:
    """stop() on a manager never started, or already stopped, returns and changes nothing."""
    manager = TaskManager()
    manager.stop()
    assert not manager.is_running()
    manager.start()
    manager.stop()
    manager.stop(timeout=1)
    assert not manager.is_running()
    with pytest.raises(TaskManagerStopped):
        manager.queue(lambda ctx: None)


def test_stopped_manager_can_be_started_again() -> None:
    """A manager runs tasks again after stop() then start()."""
    manager = TaskManager(workers=2)
    try:
        for round_ in range(3):
            manager.start()
            assert manager.queue(lambda ctx, r=round_: r).result(WAIT) == round_
            manager.stop()
    finally:
        manager.stop()


def test_is_running_follows_the_lifecycle() -> None:
    """is_running() is False before start, True while running, False after stop."""
    manager = TaskManager()
    assert manager.is_running() is False
    manager.start()
    try:
        assert manager.is_running() is True
    finally:
        manager.stop()
    assert manager.is_running() is False


def test_context_manager_starts_on_entry_and_stops_on_exit() -> None:
    """`with TaskManager(...) as tm` gives the manager running, and stops it on exit."""
    before = marionette_threads()
    manager = TaskManager(workers=2)
    with manager as entered:
        assert entered is manager
        assert manager.is_running()
        assert manager.queue(lambda ctx: 7).result(WAIT) == 7
        threads = marionette_threads() - before
    assert not manager.is_running()
    assert threads
    assert not [t.name for t in threads if t.is_alive()]


def test_context_manager_stops_when_the_body_raises() -> None:
    """An exception leaving the `with` body propagates and the manager is stopped."""
    manager = TaskManager()
    with pytest.raises(ZeroDivisionError), manager:
        raise ZeroDivisionError
    assert not manager.is_running()


SUBMITS = ["queue", "queue-nonblocking", "delay", "schedule"]


@pytest.mark.parametrize("how", SUBMITS)
def test_submission_before_start_raises(how: str) -> None:
    """Submitting to a manager never started raises TaskManagerStopped."""
    manager = TaskManager()
    with pytest.raises(TaskManagerStopped, match="not running"):
        submit(manager, how, lambda ctx: None)
    assert manager.join(0)


@pytest.mark.parametrize("how", SUBMITS)
def test_submission_after_stop_raises(how: str) -> None:
    """Submitting to a stopped manager raises TaskManagerStopped and runs nothing."""
    ran = threading.Event()
    manager = TaskManager()
    manager.start()
    manager.stop()
    with pytest.raises(TaskManagerStopped):
        submit(manager, how, lambda ctx: ran.set())
    assert manager.join(0)
    assert not ran.is_set()


def test_submissions_raise_from_the_first_instant_of_stop(
    monkeypatch: pytest.MonkeyPatch, release: threading.Event
) -> None:
    """Once stop() has begun, while it still waits for a running task, submissions raise."""
    manager = TaskManager(workers=1)
    manager.start()
    try:
        began = watch_stop(monkeypatch, manager)
        blocker = Blocker(release)
        running = manager.queue(blocker)
        assert blocker.started.wait(WAIT)
        stopper = Runner(manager.stop)
        stopper.start()
        assert began.wait(WAIT)
        assert not manager.is_running()
        for how in SUBMITS:
            with pytest.raises(TaskManagerStopped):
                submit(manager, how, lambda ctx: None)
        assert stopper.is_alive()  # still waiting for the running task
        assert running.state is TaskState.RUNNING
        release.set()
        stopper.outcome()
        assert running.result(0) == "released"
    finally:
        release.set()
        manager.stop()


def test_stop_finishes_queued_and_running_tasks(
    monkeypatch: pytest.MonkeyPatch, release: threading.Event
) -> None:
    """stop() lets the workers run every queued and running task, then returns."""
    manager = TaskManager(workers=1, queue_size=8)
    manager.start()
    try:
        began = watch_stop(monkeypatch, manager)
        blocker = Blocker(release)
        first = manager.queue(blocker)
        assert blocker.started.wait(WAIT)
        queued = [manager.queue(lambda ctx, i=i: i) for i in range(5)]
        stopper = Runner(manager.stop)
        stopper.start()
        assert began.wait(WAIT)
        release.set()
        stopper.outcome()
        assert first.state is TaskState.SUCCEEDED
        assert [h.result(0) for h in queued] == [0, 1, 2, 3, 4]
    finally:
        release.set()
        manager.stop()


def test_start_while_another_thread_stops_waits_for_that_stop(
    monkeypatch: pytest.MonkeyPatch, release: threading.Event
) -> None:
    """start() during a stop() waits for it to finish, then starts the manager again."""
    manager = TaskManager(workers=1)
    manager.start()
    try:
        began = watch_stop(monkeypatch, manager)
        blocker = Blocker(release)
        running = manager.queue(blocker)
        assert blocker.started.wait(WAIT)
        stopper = Runner(manager.stop)
        stopper.start()
        assert began.wait(WAIT)

        def start() -> TaskState:
            manager.start()
            return running.state  # the stop it waited for finished the running task

        starter = Runner(start)
        starter.start()
        release.set()
        stopper.outcome()
        assert starter.outcome() is TaskState.SUCCEEDED
        assert manager.is_running()
        assert manager.queue(lambda ctx: "again").result(WAIT) == "again"
    finally:
        release.set()
        manager.stop()


def test_stop_leaves_no_thread_behind() -> None:
    """The named worker and scheduler threads run while started and are gone after stop()."""
    before = marionette_threads()
    manager = TaskManager(workers=3)
    manager.start()
    try:
        threads = marionette_threads() - before
        names = sorted(t.name for t in threads)
        assert names == [
            "marionette-scheduler",
            "marionette-worker-1",
            "marionette-worker-2",
            "marionette-worker-3",
        ]
        assert manager.queue(lambda ctx: 1).result(WAIT) == 1
    finally:
        manager.stop()
    assert not [t.name for t in threads if t.is_alive()]


def test_stop_from_inside_a_task_does_not_deadlock(tm: TaskManager) -> None:
    """A task that calls stop() returns, and the manager ends stopped."""

    def task(ctx: Context) -> bool:
        tm.stop()
        return tm.is_running()

    assert tm.queue(task).result(WAIT) is False
    assert not tm.is_running()
    with pytest.raises(TaskManagerStopped):
        tm.queue(lambda ctx: None)


def test_stop_from_inside_a_task_still_runs_every_queued_task(
    make: Callable[..., TaskManager],
) -> None:
    """With one worker, the tasks queued behind a task calling stop() still run."""
    manager = make(workers=1)
    gate = threading.Event()
    refused: list[BaseException] = []

    def stopper(ctx: Context) -> str:
        assert gate.wait(WAIT)
        manager.stop()
        try:
            manager.queue(lambda ctx: None)  # refused from the stop's first instant
        except TaskManagerStopped as exc:
            refused.append(exc)
        return "stopped"

    first = manager.queue(stopper)
    behind = [manager.queue(lambda ctx, i=i: i) for i in range(3)]
    gate.set()
    assert first.result(WAIT) == "stopped"
    assert [h.result(WAIT) for h in behind] == [0, 1, 2]
    assert len(refused) == 1
    manager.stop()  # from outside: waits for the stop the task began
    assert not manager.is_running()
    assert manager.stats().uptime == 0.0
    assert manager.join(WAIT)


def test_stop_from_inside_returns_before_the_stop_ends(
    make: Callable[..., TaskManager],
) -> None:
    """stop() from a task returns at once; the manager is stopped once that task ends."""
    manager = make(workers=2)
    go, release, stopped = threading.Event(), threading.Event(), threading.Event()
    seen: list[bool] = []

    def stopper(ctx: Context) -> None:
        assert go.wait(WAIT)  # both tasks are submitted before the stop
        manager.stop()
        seen.append(manager.is_running())
        stopped.set()
        assert release.wait(WAIT)

    handler = manager.queue(stopper)
    queued = manager.queue(lambda ctx: stopped.wait(WAIT) and "after")
    go.set()
    assert queued.result(WAIT) == "after"  # the other worker drains the queue
    assert seen == [False]
    assert handler.state is TaskState.RUNNING
    release.set()
    manager.stop()
    assert handler.state is TaskState.SUCCEEDED
    assert not manager.is_running()


def test_stop_with_timeout_from_inside_keeps_what_it_could_not_run(
    make: Callable[..., TaskManager],
) -> None:
    """stop(timeout) from a task: past the timeout its context is cancelled and the
    tasks still queued are kept for the next start()."""
    manager = make(workers=1)
    cancelled: list[bool] = []
    go = threading.Event()

    def stopper(ctx: Context) -> None:
        assert go.wait(WAIT)  # the tasks behind are submitted before the stop
        manager.stop(timeout=0.05)
        cancelled.append(ctx.wait(WAIT))  # the timeout cancels this running task

    handler = manager.queue(stopper)
    behind = [manager.queue(lambda ctx, i=i: i) for i in range(2)]
    go.set()
    handler.result(WAIT)
    assert cancelled == [True]
    manager.stop()
    assert [h.state for h in behind] == [TaskState.PENDING] * 2
    manager.start()
    assert [h.result(WAIT) for h in behind] == [0, 1]


def test_stop_from_inside_while_another_thread_stops(
    make: Callable[..., TaskManager],
) -> None:
    """A task calling stop() while an outside stop() waits for it: both return, and
    every queued task runs."""
    manager = make(workers=1)
    started, stopping = threading.Event(), threading.Event()

    def task(ctx: Context) -> bool:
        started.set()
        assert stopping.wait(WAIT)
        manager.stop()  # the outside stop() began first: returns at once
        return manager.is_running()

    handler = manager.queue(task)
    behind = manager.queue(lambda ctx: "behind")
    assert started.wait(WAIT)
    outside = threading.Thread(target=manager.stop, name="test-outside-stop")
    outside.start()
    with manager._lock:  # the outside stop() has begun once the state says so
        manager._changed.wait_for(lambda: not manager.is_running(), WAIT)
    stopping.set()
    outside.join(WAIT)
    assert not outside.is_alive()
    assert handler.result(0) is False
    assert behind.result(0) == "behind"


def test_stop_then_start_from_inside_runs_everything(
    make: Callable[..., TaskManager],
) -> None:
    """A task that stops and restarts its manager: the queue behind it runs, and the
    manager is running afterwards."""
    manager = make(workers=1)
    gate = threading.Event()

    def restarter(ctx: Context) -> bool:
        assert gate.wait(WAIT)
        manager.stop()
        manager.start()
        return manager.is_running()

    first = manager.queue(restarter)
    behind = [manager.queue(lambda ctx, i=i: i) for i in range(3)]
    gate.set()
    assert first.result(WAIT) is True
    assert [h.result(WAIT) for h in behind] == [0, 1, 2]
    assert manager.is_running()
    assert manager.queue(lambda ctx: "later").result(WAIT) == "later"
    manager.stop()
    assert not manager.is_running()


def test_join_from_inside_a_task_raises_runtime_error(tm: TaskManager) -> None:
    """join() called by a task raises RuntimeError instead of waiting for itself."""

    def task(ctx: Context) -> BaseException | None:
        try:
            tm.join(WAIT)
        except RuntimeError as exc:
            return exc
        return None

    assert isinstance(tm.queue(task).result(WAIT), RuntimeError)


def test_stop_timeout_cancels_running_contexts_and_keeps_queued_tasks(
    make: Callable[..., TaskManager], release: threading.Event
) -> None:
    """stop(timeout) cancels a stubborn task's context and keeps queued tasks for start()."""
    manager = make(workers=1, queue_size=8)
    stubborn = Blocker(release)
    running = manager.queue(stubborn)
    assert stubborn.started.wait(WAIT)
    ran: list[int] = []
    queued = [manager.queue(lambda ctx, i=i: ran.append(i)) for i in range(3)]
    manager.stop(timeout=0.05)
    assert not manager.is_running()
    assert stubborn.ctx is not None
    assert isinstance(stubborn.ctx.err, Cancelled)
    assert running.state is TaskState.RUNNING
    assert [h.state for h in queued] == [TaskState.PENDING] * 3
    assert ran == []
    manager.start()
    for handler in queued:
        handler.result(WAIT)
    assert ran == [0, 1, 2]
    release.set()
    assert running.result(WAIT) == "released"
    assert manager.join(WAIT)


def test_stop_keeps_delayed_tasks_for_the_next_start(
    frozen: Clock, make: Callable[..., TaskManager]
) -> None:
    """A delayed task not yet due at stop() stays SCHEDULED and runs after start()."""
    manager = make()
    handler = manager.delay(10, lambda ctx: "later")
    manager.stop()
    assert handler.state is TaskState.SCHEDULED
    assert manager.join(0.01) is False  # kept, so still to be run
    frozen.tick(10)
    assert handler.state is TaskState.SCHEDULED  # stopped: nothing hands it out
    manager.start()
    manager.scheduler.wake()
    assert handler.result(WAIT) == "later"


def test_stop_keeps_scheduled_tasks_until_due_after_restart(
    frozen: Clock, make: Callable[..., TaskManager]
) -> None:
    """A scheduled task kept across stop/start still waits for its time, then runs."""
    manager = make()
    handler = manager.schedule(datetime.now(UTC) + timedelta(seconds=30), lambda ctx: "at")
    manager.stop()
    manager.start()
    frozen.tick(29)
    manager.scheduler.wake()
    assert handler.state is TaskState.SCHEDULED
    frozen.tick(1)
    manager.scheduler.wake()
    assert handler.result(WAIT) == "at"


def test_stop_keeps_retries_waiting_for_their_backoff(
    frozen: Clock, make: Callable[..., TaskManager], rec: Recorder
) -> None:
    """A retry waiting for its backoff at stop() stays SCHEDULED and runs after start()."""
    manager = make(logger=rec)
    handler = manager.queue(fail_times(1), retries=1, backoff=20)
    rec.wait_for("task failed, retrying")
    manager.stop()
    assert handler.state is TaskState.SCHEDULED
    assert handler.attempts == 1
    frozen.tick(20)
    manager.start()
    manager.scheduler.wake()
    assert handler.result(WAIT) == "ok"
    assert handler.attempts == 2


# -- submission ----------------------------------------------------------------------


def plain_function(ctx: Context) -> str:
    return f"plain {ctx.attempt}"


class CallableObject:
    def __call__(self, ctx: Context) -> str:
        return f"callable {ctx.attempt}"


class DoObject:
    def do(self, ctx: Context) -> str:
        return f"do {ctx.attempt}"


TASKS: dict[str, tuple[Any, str]] = {
    "function": (plain_function, "plain 1"),
    "lambda": (lambda ctx: f"lambda {ctx.attempt}", "lambda 1"),
    "callable object": (CallableObject(), "callable 1"),
    "do object": (DoObject(), "do 1"),
}


@pytest.mark.parametrize("how", ["queue", "delay", "schedule", "wrap_task+queue"])
@pytest.mark.parametrize("kind", TASKS)
def test_every_task_form_runs(tm: TaskManager, kind: str, how: str) -> None:
    """Plain functions, lambdas, callable objects and do(ctx) objects run with a Context."""
    task, expected = TASKS[kind]
    handler = tm.queue(tm.wrap_task(task)) if how == "wrap_task+queue" else submit(tm, how, task)
    assert isinstance(handler, TaskHandler)
    assert handler.result(WAIT) == expected


@pytest.mark.parametrize("task", [42, "not a task", object(), None])
@pytest.mark.parametrize("how", ["queue", "delay", "schedule", "wrap_task"])
def test_non_callable_task_raises_type_error(tm: TaskManager, how: str, task: object) -> None:
    """A task that is neither callable nor has do(ctx) raises TypeError; nothing is counted."""
    with pytest.raises(TypeError):
        submit(tm, how, task)
    assert tm.join(WAIT)


@pytest.mark.parametrize("how", ["queue", "delay", "schedule"])
def test_submitting_a_handler_never_rewraps_it(tm: TaskManager, how: str) -> None:
    """queue/delay/schedule of a wrapped handler return that same handler and run it once."""
    calls: list[int] = []
    handler = tm.wrap_task(lambda ctx: calls.append(ctx.attempt) or "once", name="wrapped")
    assert handler.state is TaskState.PENDING
    returned = submit(tm, how, handler)
    assert returned is handler
    assert handler.result(WAIT) == "once"
    assert tm.join(WAIT)
    assert calls == [1]
    assert handler.name == "wrapped"


@pytest.mark.parametrize("how", ["queue", "delay", "schedule", "wrap_task"])
def test_a_handler_of_another_manager_is_refused(
    tm: TaskManager, make: Callable[..., TaskManager], how: str
) -> None:
    """A handler made by another manager is not accepted (ValueError) and never runs."""
    other = make()
    ran = threading.Event()
    foreign = other.wrap_task(lambda ctx: ran.set())
    with pytest.raises(ValueError, match="another TaskManager"):
        submit(tm, how, foreign)
    assert tm.join(WAIT)
    assert foreign.state is TaskState.PENDING
    assert not ran.is_set()


def test_schedule_far_in_the_future_is_accepted(tm: TaskManager) -> None:
    """schedule() at datetime.max (aware) is accepted and stays pending."""
    handler = tm.schedule(datetime.max.replace(tzinfo=UTC), lambda ctx: None)
    tm.scheduler.wake()
    assert handler.state is TaskState.SCHEDULED
    assert handler.cancel() is True


def test_wrap_task_of_a_handler_is_the_same_object(tm: TaskManager) -> None:
    """wrap_task(handler) returns the handler itself."""
    handler = tm.wrap_task(lambda ctx: None)
    assert tm.wrap_task(handler) is handler


def test_wrap_task_does_not_submit(tm: TaskManager) -> None:
    """A wrapped task stays PENDING and never runs until it is submitted."""
    ran = threading.Event()
    handler = tm.wrap_task(lambda ctx: ran.set())
    assert tm.join(WAIT)
    assert handler.state is TaskState.PENDING
    assert not ran.is_set()


@pytest.mark.parametrize("how", ["wrap_task", "queue", "delay", "schedule"])
def test_options_with_an_existing_handler_raise_type_error(tm: TaskManager, how: str) -> None:
    """Passing options along with a TaskHandler raises TypeError and submits nothing."""
    handler = tm.wrap_task(lambda ctx: None)
    with pytest.raises(TypeError):
        submit(tm, how, handler, retries=2)
    assert handler.state is TaskState.PENDING


@pytest.mark.parametrize("first", ["queue", "delay", "schedule"])
@pytest.mark.parametrize("again", ["queue", "delay", "schedule"])
def test_submitting_a_handler_twice_raises_value_error(
    tm: TaskManager, first: str, again: str
) -> None:
    """A handler already submitted (running or finished) cannot be submitted again."""
    calls: list[int] = []
    handler = submit(tm, first, tm.wrap_task(lambda ctx: calls.append(1)))
    with pytest.raises(ValueError, match="already submitted"):
        submit(tm, again, handler)
    handler.result(WAIT)
    with pytest.raises(ValueError, match="already submitted"):
        submit(tm, again, handler)
    assert tm.join(WAIT)
    assert calls == [1]


@pytest.mark.parametrize("how", ["queue", "delay", "schedule"])
def test_cancelled_wrapped_handler_stays_cancelled_when_submitted(
    tm: TaskManager, how: str
) -> None:
    """A wrapped handler cancelled before submission is returned cancelled and never runs."""
    ran = threading.Event()
    handler = tm.wrap_task(lambda ctx: ran.set())
    assert handler.cancel() is True
    returned = submit(tm, how, handler)
    assert returned is handler
    assert handler.cancelled()
    # a task submitted after it: once it ran, a worker has passed the cancelled one
    assert tm.queue(lambda ctx: "after").result(WAIT) == "after"
    assert handler.state is TaskState.CANCELLED
    assert not ran.is_set()
    with pytest.raises(concurrent.futures.CancelledError):
        handler.result(0)


@pytest.mark.parametrize("how", ["queue", "delay", "schedule"])
def test_cancelled_wrapped_handler_does_not_hold_join(tm: TaskManager, how: str) -> None:
    """Submitting a handler cancelled before submission leaves join() able to return True."""
    handler = tm.wrap_task(lambda ctx: None)
    handler.cancel()
    submit(tm, how, handler)
    assert tm.join(1.0)


def test_queue_full_without_blocking_raises_queue_full(
    make: Callable[..., TaskManager], release: threading.Event
) -> None:
    """block=False on a full queue raises QueueFull; the refused task is never counted."""
    manager = make(workers=1, queue_size=2)
    blocker = Blocker(release)
    manager.queue(blocker)
    assert blocker.started.wait(WAIT)
    queued = [manager.queue(lambda ctx, i=i: i, block=False) for i in range(2)]
    refused = threading.Event()
    with pytest.raises(QueueFull):
        manager.queue(lambda ctx: refused.set(), block=False)
    wrapped = manager.wrap_task(lambda ctx: "later")
    with pytest.raises(QueueFull):
        manager.queue(wrapped, block=False)
    assert not manager.join(0.01)  # the blocker and two queued tasks
    release.set()
    assert manager.join(WAIT)  # the refused tasks are not waited for
    assert [h.result(0) for h in queued] == [0, 1]
    assert not refused.is_set()
    assert wrapped.state is TaskState.PENDING  # refused, not submitted: it can go later
    assert manager.queue(wrapped).result(WAIT) == "later"


def test_blocking_queue_waits_for_room(
    make: Callable[..., TaskManager], release: threading.Event
) -> None:
    """queue() on a full queue returns only once a worker freed a slot, then the task runs."""
    manager = make(workers=1, queue_size=1)
    blocker = Blocker(release)
    manager.queue(blocker)
    assert blocker.started.wait(WAIT)
    waiting = manager.queue(lambda ctx: "first")  # fills the queue
    seen: list[TaskState] = []

    def produce() -> TaskHandler:
        handler = manager.queue(lambda ctx: "pressed")
        seen.append(waiting.state)  # left the queue before there was room for this one
        return handler

    producer = Runner(produce)
    producer.start()
    producer.join(0.2)  # a window in which a queue without back pressure would return
    release.set()
    handler = producer.outcome()
    assert len(seen) == 1
    assert seen[0] is not TaskState.PENDING
    assert handler.result(WAIT) == "pressed"
    assert waiting.result(WAIT) == "first"


def test_queue_from_inside_a_task_never_blocks_on_a_full_queue(
    make: Callable[..., TaskManager],
) -> None:
    """A task queueing into a full queue never blocks; block=False there raises QueueFull."""
    manager = make(workers=1, queue_size=1)

    def parent(ctx: Context) -> tuple[list[TaskHandler], bool]:
        children = [manager.queue(lambda ctx, i=i: i) for i in range(3)]
        try:
            manager.queue(lambda ctx: "shed", block=False)
        except QueueFull:
            return children, True
        return children, False

    children, shed = manager.queue(parent).result(WAIT)
    assert [c.result(WAIT) for c in children] == [0, 1, 2]
    assert shed


@pytest.mark.parametrize("delay", [math.nan, math.inf, -math.inf])
def test_delay_not_finite_raises_unschedulable(tm: TaskManager, delay: float) -> None:
    """delay() of NaN or infinity raises Unschedulable, a ValueError; nothing is counted."""
    with pytest.raises(Unschedulable) as info:
        tm.delay(delay, lambda ctx: None)
    assert isinstance(info.value, ValueError)
    assert tm.join(WAIT)


@pytest.mark.parametrize("delay", [None, "1", [1], object()])
def test_delay_not_a_number_raises_type_error(tm: TaskManager, delay: Any) -> None:
    """delay() of None or a non-number raises TypeError."""
    with pytest.raises(TypeError):
        tm.delay(delay, lambda ctx: None)
    assert tm.join(WAIT)


def test_negative_delay_means_now(frozen: Clock, tm: TaskManager) -> None:
    """A negative delay runs the task without the clock moving."""
    handler = tm.delay(-5, lambda ctx: "now")
    tm.scheduler.wake()
    assert handler.result(WAIT) == "now"


@pytest.mark.parametrize(
    "delay",
    [threading.TIMEOUT_MAX * 4, 1e300, sys.float_info.max, timedelta.max],
    ids=["4xTIMEOUT_MAX", "1e300", "float-max", "timedelta-max"],
)
def test_delay_longer_than_timeout_max_is_accepted(
    tm: TaskManager, delay: float | timedelta
) -> None:
    """A finite delay beyond threading.TIMEOUT_MAX is accepted and simply stays pending."""
    handler = tm.delay(delay, lambda ctx: None)
    tm.scheduler.wake()
    assert handler.state is TaskState.SCHEDULED
    assert not tm.join(0.01)
    assert handler.cancel() is True
    assert tm.join(WAIT)


@pytest.mark.parametrize(
    ("delay", "short"),
    [(5, 4.999), (timedelta(minutes=2), 119.5), (0.25, 0.2)],
)
def test_delay_never_runs_before_its_due_time(
    frozen: Clock, tm: TaskManager, delay: float | timedelta, short: float
) -> None:
    """A delayed task is not handed out short of its delay, and runs once it has passed."""
    ran = threading.Event()
    handler = tm.delay(delay, lambda ctx: ran.set() or "due")
    frozen.tick(short)
    tm.scheduler.wake()
    assert handler.state is TaskState.SCHEDULED
    assert not ran.is_set()
    total = delay.total_seconds() if isinstance(delay, timedelta) else delay
    frozen.tick(total - short)
    tm.scheduler.wake()
    assert handler.result(WAIT) == "due"


@settings(max_examples=25)
@given(
    # half seconds: exact in binary, so "due" never hangs on a rounding error
    delays=st.lists(st.integers(-6, 80).map(lambda n: n / 2), min_size=1, max_size=6),
    ticks=st.lists(st.integers(0, 30).map(lambda n: n / 2), min_size=1, max_size=6),
)
def test_delayed_tasks_are_handed_out_exactly_when_due(
    delays: list[float], ticks: list[float]
) -> None:
    """Property: after each clock move, a delayed task has left the scheduler iff due."""
    limit = freezegun.api.call_stack_inspection_limit
    freezegun.api.call_stack_inspection_limit = 0  # the library's threads see the clock
    try:
        with freezegun.freeze_time("2026-01-05 12:00:00", tick=False) as clock:
            manager = TaskManager(workers=2)
            manager.start()
            try:
                handlers = [manager.delay(d, lambda ctx: None) for d in delays]
                elapsed = 0.0
                manager.scheduler.wake()
                for tick in [0, *ticks]:
                    clock.tick(tick)
                    elapsed += tick
                    manager.scheduler.wake()
                    for delay, handler in zip(delays, handlers, strict=True):
                        due = elapsed >= delay
                        assert (handler.state is not TaskState.SCHEDULED) == due
                for delay, handler in zip(delays, handlers, strict=True):
                    if elapsed >= delay:
                        handler.result(WAIT)
                    else:
                        assert handler.cancel() is True
            finally:
                manager.stop()
    finally:
        freezegun.api.call_stack_inspection_limit = limit


def test_schedule_never_runs_before_its_time(frozen: Clock, tm: TaskManager) -> None:
    """A task scheduled at an aware datetime (any zone) runs on or after it, never before."""
    plus_two = timezone(timedelta(hours=2))
    at = datetime.now(UTC).astimezone(plus_two) + timedelta(seconds=30)
    handler = tm.schedule(at, lambda ctx: "at")
    frozen.tick(29.5)
    tm.scheduler.wake()
    assert handler.state is TaskState.SCHEDULED
    frozen.tick(0.5)
    tm.scheduler.wake()
    assert handler.result(WAIT) == "at"


def test_schedule_in_the_past_means_now(frozen: Clock, tm: TaskManager) -> None:
    """A time in the past runs the task without the clock moving."""
    handler = tm.schedule(datetime.now(UTC) - timedelta(days=3), lambda ctx: "past")
    tm.scheduler.wake()
    assert handler.result(WAIT) == "past"


@pytest.mark.parametrize(
    ("at", "why"),
    [
        (None, "None"),
        (datetime.min, "datetime.min"),
        (datetime.min.replace(tzinfo=UTC), "datetime.min"),
        (datetime(2030, 1, 1, 12, 0), "naive"),
    ],
)
def test_schedule_rejects_unschedulable_times(tm: TaskManager, at: Any, why: str) -> None:
    """schedule() of None, datetime.min or a naive datetime raises Unschedulable saying why."""
    with pytest.raises(Unschedulable, match=why):
        tm.schedule(at, lambda ctx: None)
    assert tm.join(WAIT)


# -- options -------------------------------------------------------------------------


def test_retries_give_retries_plus_one_attempts(tm: TaskManager) -> None:
    """retries=n makes n+1 attempts; the TaskError holds one error per attempt, in order."""
    handler = tm.queue(always_fail, retries=2, backoff=0)
    with pytest.raises(TaskError) as info:
        handler.result(WAIT)
    error = info.value
    assert error.attempts == 3
    assert [str(e) for e in error.exceptions] == ["attempt 1", "attempt 2", "attempt 3"]
    assert handler.attempts == 3
    assert [str(e) for e in handler.errors] == ["attempt 1", "attempt 2", "attempt 3"]
    assert handler.state is TaskState.FAILED
    assert handler.exception(0) is error


def test_retry_that_succeeds_ends_succeeded(tm: TaskManager) -> None:
    """A task failing twice with retries=5 succeeds on its third attempt."""
    handler = tm.queue(fail_times(2), retries=5, backoff=0)
    assert handler.result(WAIT) == "ok"
    assert handler.attempts == 3
    assert len(handler.errors) == 2
    assert handler.exception(0) is None


def test_no_retries_by_default(tm: TaskManager) -> None:
    """Without retries= a failing task makes exactly one attempt."""
    handler = tm.queue(always_fail)
    with pytest.raises(TaskError):
        handler.result(WAIT)
    assert handler.attempts == 1


@pytest.mark.parametrize("how", ["queue", "delay", "schedule", "wrap_task"])
def test_negative_retries_raise_value_error(tm: TaskManager, how: str) -> None:
    """retries=-1 raises ValueError at submission; nothing is counted."""
    with pytest.raises(ValueError, match="retries"):
        submit(tm, how, always_fail, retries=-1)
    assert tm.join(WAIT)


@pytest.mark.parametrize(
    ("backoff", "expected"),
    [
        (7, 7.0),
        (timedelta(seconds=3), 3.0),
        (tenacity.wait_fixed(4), 4.0),
        (tenacity.wait_fixed(2) + tenacity.wait_fixed(3), 5.0),
    ],
)
def test_backoff_sets_the_wait_before_a_retry(
    frozen: Clock, make: Callable[..., TaskManager], rec: Recorder, backoff: Any, expected: float
) -> None:
    """The retry waits exactly the backoff (a number or a tenacity strategy), not less."""
    manager = make(logger=rec)
    handler = manager.queue(fail_times(1), retries=1, backoff=backoff)
    [event] = rec.wait_for("task failed, retrying")
    assert event["retry_in"] == pytest.approx(expected)
    assert manager.scheduler.next_due() == datetime.now(UTC) + timedelta(seconds=expected)
    frozen.tick(expected - 0.01)
    manager.scheduler.wake()
    assert handler.state is TaskState.SCHEDULED
    frozen.tick(0.01)
    manager.scheduler.wake()
    assert handler.result(WAIT) == "ok"


def test_default_backoff_starts_at_half_a_second_grows_and_is_capped(
    frozen: Clock, make: Callable[..., TaskManager], rec: Recorder
) -> None:
    """The default backoff: 0.5 s first, x1.5 per retry, a little jitter, capped at 60 s."""
    manager = make(logger=rec)
    retries = 14
    handler = manager.queue(always_fail, retries=retries)
    waits: list[float] = []
    for n in range(1, retries + 1):
        event = rec.wait_for("task failed, retrying", n)[-1]
        waits.append(event["retry_in"])
        frozen.tick(event["retry_in"] + 0.001)  # retry_in is rounded to the millisecond
        manager.scheduler.wake()
    with pytest.raises(TaskError):
        handler.result(WAIT)
    bases = [min(0.5 * 1.5 ** (n - 1), 60.0) for n in range(1, retries + 1)]
    for n, (wait, base) in enumerate(zip(waits, bases, strict=True), start=1):
        assert base - 0.001 <= wait <= base + 1.0, (n, wait, base)
    assert bases[-1] == 60.0  # the cap was reached
    assert waits != [round(b, 3) for b in bases]  # some jitter


def test_backoff_strategy_sees_the_attempt_number(
    frozen: Clock, make: Callable[..., TaskManager], rec: Recorder
) -> None:
    """An exponential tenacity strategy grows with each failed attempt."""
    manager = make(logger=rec)
    backoff = tenacity.wait_exponential(multiplier=1, exp_base=2, max=100)
    handler = manager.queue(fail_times(3), retries=3, backoff=backoff)
    for n, wait in enumerate([1, 2, 4], start=1):
        events = rec.wait_for("task failed, retrying", n)
        assert events[-1]["retry_in"] == pytest.approx(wait)
        assert events[-1]["attempt"] == n
        frozen.tick(wait)
        manager.scheduler.wake()
    assert handler.result(WAIT) == "ok"


def test_retry_predicate_decides_which_failures_are_retried(tm: TaskManager) -> None:
    """With retry_if_exception_type(OSError), an OSError is retried and a ValueError is not."""
    only_os = tenacity.retry_if_exception_type(OSError)
    retried = tm.queue(fail_times(2, lambda: OSError("io")), retries=3, retry=only_os, backoff=0)
    not_retried = tm.queue(
        fail_times(2, lambda: ValueError("bad")), retries=3, retry=only_os, backoff=0
    )
    assert retried.result(WAIT) == "ok"
    assert retried.attempts == 3
    with pytest.raises(TaskError) as info:
        not_retried.result(WAIT)
    assert not_retried.attempts == 1
    assert info.value.attempts == 1
    assert isinstance(info.value.exceptions[0], ValueError)


def test_stop_after_attempt_ends_retries_early(tm: TaskManager) -> None:
    """stop=stop_after_attempt(2) ends a task with retries=9 after two attempts."""
    handler = tm.queue(always_fail, retries=9, backoff=0, stop=tenacity.stop_after_attempt(2))
    with pytest.raises(TaskError) as info:
        handler.result(WAIT)
    assert info.value.attempts == 2
    assert handler.attempts == 2


def test_retries_end_the_task_before_a_looser_stop_strategy(tm: TaskManager) -> None:
    """retries ends retrying when it says so, even if stop= would allow more."""
    handler = tm.queue(always_fail, retries=1, backoff=0, stop=tenacity.stop_after_attempt(50))
    with pytest.raises(TaskError):
        handler.result(WAIT)
    assert handler.attempts == 2


def test_stop_after_delay_counts_time_since_submission(
    frozen: Clock, make: Callable[..., TaskManager], rec: Recorder
) -> None:
    """stop=stop_after_delay(5) with backoff 2: attempts at 0, 2, 4 retry; the one at 6 ends."""
    manager = make(logger=rec)
    handler = manager.queue(always_fail, retries=10, backoff=2, stop=tenacity.stop_after_delay(5))
    for n in range(1, 4):
        rec.wait_for("task failed, retrying", n)
        assert handler.state is TaskState.SCHEDULED
        frozen.tick(2)
        manager.scheduler.wake()
    with pytest.raises(TaskError) as info:
        handler.result(WAIT)
    assert info.value.attempts == 4
    assert info.value.duration == pytest.approx(6)  # from submission to the final failure
    assert len(rec.named("task failed, retrying")) == 3


def test_timeout_gives_each_attempt_its_own_deadline(
    frozen: Clock, make: Callable[..., TaskManager], rec: Recorder
) -> None:
    """timeout= sets every attempt's context deadline to that attempt's start plus timeout."""
    manager = make(logger=rec)
    seen: list[tuple[float | None, float]] = []

    def task(ctx: Context) -> str:
        seen.append((ctx.deadline, time.monotonic()))
        if ctx.attempt == 1:
            raise OSError("again")
        return "ok"

    handler = manager.queue(task, retries=1, backoff=3, timeout=timedelta(seconds=2.5))
    rec.wait_for("task failed, retrying")
    frozen.tick(3)
    manager.scheduler.wake()
    assert handler.result(WAIT) == "ok"
    assert len(seen) == 2
    for deadline, started in seen:
        assert deadline is not None
        assert deadline - started == pytest.approx(2.5)
    first, second = seen[0][0], seen[1][0]
    assert first is not None
    assert second is not None
    assert second - first == pytest.approx(3)


def test_no_timeout_means_no_deadline(tm: TaskManager) -> None:
    """Without timeout= (or a context) an attempt's context has no deadline."""
    assert tm.queue(lambda ctx: (ctx.deadline, ctx.remaining())).result(WAIT) == (None, None)


def test_attempt_returning_after_its_deadline_fails_and_is_retried(
    frozen: Clock, tm: TaskManager
) -> None:
    """An attempt that returns past its deadline fails with DeadlineExceeded and is retried."""

    def task(ctx: Context) -> str:
        if ctx.attempt == 1:
            frozen.tick(5)  # the attempt "takes" 5 s of a 1 s timeout
            return "too late"
        return "in time"

    handler = tm.queue(task, timeout=1, retries=1, backoff=0)
    tm.scheduler.wake()
    assert handler.result(WAIT) == "in time"
    assert handler.attempts == 2
    [late] = handler.errors
    assert isinstance(late, DeadlineExceeded)
    assert isinstance(late, TimeoutError)


def test_attempt_returning_after_its_deadline_without_retries_fails(
    frozen: Clock, tm: TaskManager
) -> None:
    """Without retries, a late attempt fails the task with DeadlineExceeded in its TaskError."""

    def task(ctx: Context) -> str:
        frozen.tick(2)
        return "too late"

    handler = tm.queue(task, timeout=1)
    with pytest.raises(TaskError) as info:
        handler.result(WAIT)
    matched: list[BaseException] = []
    try:
        raise info.value
    except* TimeoutError as group:
        matched.extend(group.exceptions)
    assert len(matched) == 1
    assert isinstance(matched[0], DeadlineExceeded)
    assert handler.state is TaskState.FAILED


def test_attempt_still_running_past_its_deadline_is_logged_once(
    frozen: Clock, make: Callable[..., TaskManager], rec: Recorder, release: threading.Event
) -> None:
    """A running attempt past its deadline is reported once, with its task and attempt."""
    manager = make(logger=rec, server_name="overrun")
    blocker = Blocker(release)
    handler = manager.queue(blocker, timeout=1, name="slowpoke")
    assert blocker.started.wait(WAIT)
    frozen.tick(0.5)
    manager.scheduler.wake()
    assert rec.named("task still running past its deadline") == []
    frozen.tick(1)
    manager.scheduler.wake()
    frozen.tick(10)
    manager.scheduler.wake()
    [event] = rec.named("task still running past its deadline")
    assert event["level"] == "warning"
    assert event["task_id"] == handler.id
    assert event["task"] == "slowpoke"
    assert event["attempt"] == 1
    assert event["server"] == "overrun"
    assert blocker.ctx is not None
    assert isinstance(blocker.ctx.err, DeadlineExceeded)
    release.set()
    with pytest.raises(TaskError):
        handler.result(WAIT)
    assert len(rec.named("task still running past its deadline")) == 1


def test_context_option_is_the_parent_of_every_attempt(tm: TaskManager) -> None:
    """Each attempt's context is a child of context=: it inherits its deadline."""
    parent = Context().with_timeout(1000)
    deadlines: list[float | None] = []

    def task(ctx: Context) -> str:
        deadlines.append(ctx.deadline)
        if ctx.attempt < 3:
            raise OSError("again")
        return "ok"

    handler = tm.queue(task, context=parent, retries=2, backoff=0)
    assert handler.result(WAIT) == "ok"
    assert deadlines == [parent.deadline] * 3


def test_cancelling_the_context_cancels_a_queued_task(
    make: Callable[..., TaskManager], release: threading.Event
) -> None:
    """Cancelling context= cancels a task still in the queue; it never runs."""
    manager = make(workers=1)
    blocker = Blocker(release)
    manager.queue(blocker)
    assert blocker.started.wait(WAIT)
    parent = Context()
    ran = threading.Event()
    handler = manager.queue(lambda ctx: ran.set(), context=parent)
    assert handler.state is TaskState.PENDING
    parent.cancel()
    assert handler.state is TaskState.CANCELLED
    release.set()
    assert manager.join(WAIT)
    assert not ran.is_set()


def test_cancelling_the_context_cancels_a_delayed_task(tm: TaskManager) -> None:
    """Cancelling context= cancels a delayed task at once."""
    parent = Context()
    handler = tm.delay(3600, lambda ctx: None, context=parent)
    parent.cancel()
    assert handler.cancelled()
    assert tm.join(WAIT)


def test_cancelling_the_context_cancels_a_running_task(tm: TaskManager) -> None:
    """Cancelling context= cancels the running attempt's context; it is not retried."""
    parent = Context()
    started = threading.Event()

    def task(ctx: Context) -> str:
        started.set()
        ctx.wait(WAIT)
        ctx.check()
        return "never cancelled"

    handler = tm.queue(task, context=parent, retries=3, backoff=0)
    assert started.wait(WAIT)
    parent.cancel()
    with pytest.raises(concurrent.futures.CancelledError):
        handler.result(WAIT)
    assert handler.state is TaskState.CANCELLED
    assert handler.attempts == 1
    assert isinstance(handler.errors[0], Cancelled)


@pytest.mark.parametrize("how", ["queue", "delay", "schedule"])
def test_context_already_cancelled_cancels_the_submission(tm: TaskManager, how: str) -> None:
    """A task submitted under a context that is already cancelled is cancelled, never run."""
    parent = Context()
    parent.cancel()
    ran = threading.Event()
    handler = submit(tm, how, lambda ctx: ran.set(), context=parent)
    with pytest.raises(concurrent.futures.CancelledError):
        handler.result(WAIT)
    assert tm.join(WAIT)
    assert not ran.is_set()


@pytest.mark.parametrize("error", ["charge failed", RuntimeError("charge failed")])
def test_error_option_is_the_headline_of_the_task_error(
    tm: TaskManager, error: str | BaseException
) -> None:
    """error= (a message or an exception) heads the final TaskError's message."""
    handler = tm.queue(always_fail, error=error, name="charge")
    with pytest.raises(TaskError) as info:
        handler.result(WAIT)
    assert info.value.error is error
    assert str(info.value).startswith("charge failed")
    assert "charge" in str(info.value)
    assert "OSError: attempt 1" in str(info.value)


def test_name_option_labels_the_task(tm: TaskManager) -> None:
    """name= is the handler's name, the context's task_name and the TaskError's task_name."""
    handler = tm.queue(lambda ctx: ctx.task_name, name="nightly report")
    assert handler.name == "nightly report"
    assert handler.result(WAIT) == "nightly report"
    failing = tm.queue(always_fail, name="doomed")
    with pytest.raises(TaskError) as info:
        failing.result(WAIT)
    assert info.value.task_name == "doomed"
    assert info.value.task_id == failing.id


class Named:
    def __str__(self) -> str:
        return "named thing"

    def __call__(self, ctx: Context) -> None:
        return None


def test_default_names(tm: TaskManager) -> None:
    """Without name=: str(task) when it defines __str__, else its qualified name."""
    assert tm.queue(Named()).name == "named thing"
    assert tm.queue(plain_function).name == plain_function.__qualname__
    assert tm.queue(DoObject()).name == "DoObject"
    assert tm.join(WAIT)


def test_context_knows_its_task_and_attempt(tm: TaskManager) -> None:
    """Inside a task, ctx.attempt counts from 1 and ctx.task_id is the handler's id."""
    seen: list[tuple[int, int | None]] = []

    def task(ctx: Context) -> None:
        seen.append((ctx.attempt, ctx.task_id))
        if ctx.attempt < 3:
            raise OSError("again")

    handler = tm.queue(task, retries=2, backoff=0)
    handler.result(WAIT)
    assert seen == [(1, handler.id), (2, handler.id), (3, handler.id)]


def test_retries_never_sleep_in_a_worker(
    frozen: Clock, make: Callable[..., TaskManager], rec: Recorder
) -> None:
    """With one worker, a task waiting 60 s for its retry leaves the worker free meanwhile."""
    manager = make(workers=1, logger=rec)
    flaky = manager.queue(fail_times(1), retries=1, backoff=60)
    rec.wait_for("task failed, retrying")
    others = [manager.queue(lambda ctx, i=i: i) for i in range(3)]
    assert [h.result(WAIT) for h in others] == [0, 1, 2]
    assert flaky.state is TaskState.SCHEDULED
    frozen.tick(60)
    manager.scheduler.wake()
    assert flaky.result(WAIT) == "ok"


@pytest.mark.parametrize(
    ("option", "value", "error"),
    [
        ("retries", "3", TypeError),
        ("timeout", 0, ValueError),
        ("timeout", -1, ValueError),
        ("context", "ctx", TypeError),
        ("name", "", TypeError),
        ("unknown", 1, TypeError),
    ],
)
def test_invalid_options_raise_at_submission(
    tm: TaskManager, option: str, value: Any, error: type[Exception]
) -> None:
    """A bad option value raises at submission, naming the option, and submits nothing."""
    with pytest.raises(error, match=option):
        tm.queue(lambda ctx: None, **{option: value})
    assert tm.join(WAIT)


# -- cancellation --------------------------------------------------------------------


def test_cancel_a_queued_task(make: Callable[..., TaskManager], release: threading.Event) -> None:
    """A queued task cancelled before a worker takes it returns True and never runs."""
    manager = make(workers=1)
    blocker = Blocker(release)
    manager.queue(blocker)
    assert blocker.started.wait(WAIT)
    ran = threading.Event()
    handler = manager.queue(lambda ctx: ran.set())
    assert handler.cancel() is True
    assert handler.cancelled()
    assert handler.done()
    release.set()
    assert manager.join(WAIT)
    assert not ran.is_set()
    assert handler.attempts == 0
    with pytest.raises(concurrent.futures.CancelledError):
        handler.result(0)
    with pytest.raises(concurrent.futures.CancelledError):
        handler.exception(0)


def test_cancel_a_delayed_task(frozen: Clock, tm: TaskManager) -> None:
    """A delayed task cancelled before it is due returns True and never runs."""
    ran = threading.Event()
    handler = tm.delay(5, lambda ctx: ran.set())
    assert handler.cancel() is True
    assert len(tm.scheduler) == 0
    frozen.tick(5)
    tm.scheduler.wake()
    assert tm.join(WAIT)
    assert not ran.is_set()
    assert handler.state is TaskState.CANCELLED


def test_cancel_a_task_waiting_for_its_retry(
    frozen: Clock, make: Callable[..., TaskManager], rec: Recorder
) -> None:
    """A task waiting for its retry cancels with True and never runs again."""
    manager = make(logger=rec)
    handler = manager.queue(always_fail, retries=3, backoff=10)
    rec.wait_for("task failed, retrying")
    assert handler.state is TaskState.SCHEDULED
    assert handler.cancel() is True
    frozen.tick(10)
    manager.scheduler.wake()
    assert manager.join(WAIT)
    assert handler.attempts == 1
    assert handler.state is TaskState.CANCELLED


def test_cancel_a_running_task_that_raises(tm: TaskManager) -> None:
    """cancel() of a running task returns False; its attempt raises, it ends CANCELLED."""
    started = threading.Event()

    def task(ctx: Context) -> str:
        started.set()
        ctx.wait(WAIT)
        ctx.check()
        return "not cancelled"

    handler = tm.queue(task, retries=5, backoff=0)
    assert started.wait(WAIT)
    assert handler.running()
    assert handler.cancel() is False
    with pytest.raises(concurrent.futures.CancelledError):
        handler.result(WAIT)
    assert handler.state is TaskState.CANCELLED
    assert handler.attempts == 1
    assert isinstance(handler.errors[0], Cancelled)


def test_cancel_a_running_task_that_raises_something_else(tm: TaskManager) -> None:
    """A cancelled running attempt that raises any error ends CANCELLED, not retried."""
    started = threading.Event()

    def task(ctx: Context) -> str:
        started.set()
        ctx.wait(WAIT)
        raise OSError("gave up")

    handler = tm.queue(task, retries=5, backoff=0)
    assert started.wait(WAIT)
    assert handler.cancel() is False
    with pytest.raises(concurrent.futures.CancelledError):
        handler.result(WAIT)
    assert handler.attempts == 1


def test_cancel_a_running_task_that_returns_anyway(tm: TaskManager) -> None:
    """A cancelled running attempt that returns a value ends SUCCEEDED with that value."""
    started = threading.Event()

    def task(ctx: Context) -> bool:
        started.set()
        return ctx.wait(WAIT)

    handler = tm.queue(task)
    assert started.wait(WAIT)
    assert handler.cancel() is False
    assert handler.result(WAIT) is True  # its context was cancelled
    assert handler.state is TaskState.SUCCEEDED


def test_cancel_a_finished_task_returns_false(tm: TaskManager) -> None:
    """cancel() of a succeeded or failed task returns False and changes nothing."""
    succeeded = tm.queue(lambda ctx: 1)
    failed = tm.queue(always_fail)
    succeeded.result(WAIT)
    with pytest.raises(TaskError):
        failed.result(WAIT)
    assert succeeded.cancel() is False
    assert failed.cancel() is False
    assert succeeded.state is TaskState.SUCCEEDED
    assert failed.state is TaskState.FAILED


def test_cancel_is_idempotent(tm: TaskManager) -> None:
    """cancel() of an already cancelled task returns True again, and callbacks run once."""
    calls: list[TaskHandler] = []
    handler = tm.delay(3600, lambda ctx: None)
    handler.add_done_callback(calls.append)
    assert handler.cancel() is True
    assert handler.cancel() is True
    assert calls == [handler]


def test_cancel_a_wrapped_task(tm: TaskManager) -> None:
    """A wrapped, never submitted task cancels with True and is done."""
    handler = tm.wrap_task(lambda ctx: None)
    assert handler.cancel() is True
    assert handler.cancelled()
    assert handler.done()


def test_done_callbacks_behave_as_futures(rec: Recorder) -> None:
    """Callbacks get the handler in order, run at once when done, survive one raising."""
    manager = TaskManager(workers=1, logger=rec)
    manager.start()
    try:
        gate = threading.Event()
        handler = manager.queue(lambda ctx: gate.wait(WAIT) and "done")
        calls: list[tuple[str, TaskHandler]] = []

        def broken(h: TaskHandler) -> None:
            raise RuntimeError("callback bug")

        handler.add_done_callback(lambda h: calls.append(("first", h)))
        handler.add_done_callback(broken)
        handler.add_done_callback(lambda h: calls.append(("second", h)))
        assert calls == []
        gate.set()
        assert handler.result(WAIT) == "done"
        manager.stop()  # every callback ran in the worker before it stopped
        assert calls == [("first", handler), ("second", handler)]
        handler.add_done_callback(lambda h: calls.append(("late", h)))
        assert calls[-1] == ("late", handler)
        [event] = rec.named("done callback raised")
        assert event["level"] == "error"
        assert "callback bug" in event["error"]
    finally:
        manager.stop()


@pytest.mark.parametrize("ending", ["success", "failure", "cancel"])
def test_done_callbacks_may_call_back_into_the_manager(tm: TaskManager, ending: str) -> None:
    """A done callback may submit and cancel tasks: callbacks run with no lock held."""
    other = tm.delay(3600, lambda ctx: None)
    results: list[Any] = []
    called = threading.Event()

    def callback(handler: TaskHandler) -> None:
        results.append(tm.queue(lambda ctx: "from a callback"))
        results.append(other.cancel())
        called.set()

    if ending == "cancel":
        handler = tm.delay(3600, lambda ctx: None)
        handler.add_done_callback(callback)
        assert handler.cancel() is True
    else:
        gate = threading.Event()
        task = (lambda ctx: gate.wait(WAIT)) if ending == "success" else always_fail
        handler = tm.queue(lambda ctx: (gate.wait(WAIT), task(ctx)))
        handler.add_done_callback(callback)
        gate.set()
    assert called.wait(WAIT)
    assert len(results) == 2
    assert results[0].result(WAIT) == "from a callback"
    assert results[1] is True
    assert other.cancelled()
    assert tm.join(WAIT)


def test_tasks_submitted_under_an_attempt_context_are_cancelled_with_it(
    tm: TaskManager,
) -> None:
    """Tasks submitted with context=ctx of a running task are cancelled with it."""
    started = threading.Event()
    children: list[TaskHandler] = []

    def parent(ctx: Context) -> None:
        children.append(tm.delay(3600, lambda c: None, context=ctx))
        started.set()
        ctx.wait(WAIT)
        ctx.check()

    handler = tm.queue(parent)
    assert started.wait(WAIT)
    assert children[0].state is TaskState.SCHEDULED
    assert handler.cancel() is False
    assert children[0].cancelled()
    with pytest.raises(concurrent.futures.CancelledError):
        handler.result(WAIT)
    assert tm.join(WAIT)


def test_result_and_exception_time_out(tm: TaskManager) -> None:
    """result(timeout) and exception(timeout) raise TimeoutError on a task not done yet."""
    handler = tm.delay(3600, lambda ctx: None)
    with pytest.raises(TimeoutError):
        handler.result(0.01)
    with pytest.raises(TimeoutError):
        handler.exception(0.01)
    assert handler.cancel()


def test_as_future_settles_with_the_handler(tm: TaskManager) -> None:
    """as_future() gives a concurrent.futures.Future usable with wait()."""
    ok = tm.queue(lambda ctx: 3).as_future()
    bad = tm.queue(always_fail).as_future()
    _, pending = concurrent.futures.wait([ok, bad], timeout=WAIT)
    assert not pending
    assert ok.result() == 3
    assert isinstance(bad.exception(), TaskError)


# -- join ----------------------------------------------------------------------------


def test_join_is_true_when_idle() -> None:
    """join() returns True at once on an idle manager, running or not."""
    manager = TaskManager()
    assert manager.join(0) is True
    with manager:
        assert manager.join(0) is True
        manager.queue(lambda ctx: None)
        assert manager.join(WAIT) is True


def test_join_times_out_while_a_delayed_task_is_pending(tm: TaskManager) -> None:
    """join(timeout) returns False while a delayed task is pending, True once it is gone."""
    handler = tm.delay(3600, lambda ctx: None)
    assert tm.join(0.05) is False
    handler.cancel()
    assert tm.join(WAIT) is True


def test_join_counts_queued_and_running_tasks(
    make: Callable[..., TaskManager], release: threading.Event
) -> None:
    """join() waits for a running task and for one still in the queue."""
    manager = make(workers=1)
    blocker = Blocker(release)
    manager.queue(blocker)
    assert blocker.started.wait(WAIT)
    assert manager.join(0.02) is False  # running
    gate = threading.Event()
    queued = manager.queue(lambda ctx: gate.wait(WAIT))
    release.set()
    assert manager.join(0.02) is False  # queued, then running
    gate.set()
    assert manager.join(WAIT) is True
    assert queued.result(0) is True


def test_join_counts_tasks_waiting_for_a_retry(
    frozen: Clock, make: Callable[..., TaskManager], rec: Recorder
) -> None:
    """join() waits for a task whose retry is waiting for its backoff."""
    manager = make(logger=rec)
    handler = manager.queue(fail_times(1), retries=1, backoff=30)
    rec.wait_for("task failed, retrying")
    assert manager.join(0.05) is False
    frozen.tick(30)
    manager.scheduler.wake()
    assert manager.join(WAIT) is True
    assert handler.result(0) == "ok"


def test_join_returns_true_once_everything_finished(tm: TaskManager) -> None:
    """join() returns True once every submitted task has finished, failures included."""
    handlers = [tm.queue(lambda ctx, i=i: i) for i in range(20)]
    handlers += [tm.queue(always_fail, retries=1, backoff=0) for _ in range(5)]
    handlers += [tm.delay(0.01, lambda ctx: None) for _ in range(5)]
    assert tm.join(WAIT) is True
    assert all(h.done() for h in handlers)


# -- failures ------------------------------------------------------------------------


class CustomBaseError(BaseException):
    """A BaseException that is not an Exception."""


@pytest.mark.parametrize("retry", [None, tenacity.retry_always], ids=["default", "retry_always"])
@pytest.mark.parametrize("kind", [SystemExit, KeyboardInterrupt, CustomBaseError])
def test_base_exception_fails_the_task_at_once(
    make: Callable[..., TaskManager], kind: type[BaseException], retry: Any
) -> None:
    """A BaseException fails the task at once, result() raises it, the worker survives."""
    manager = make(workers=1)
    error = kind("out")

    def task(ctx: Context) -> None:
        raise error

    handler = manager.queue(task, retries=5, backoff=0, retry=retry)
    with pytest.raises(kind) as info:
        handler.result(WAIT)
    assert info.value is error
    assert handler.state is TaskState.FAILED
    assert handler.attempts == 1
    assert handler.exception(0) is error
    assert manager.queue(lambda ctx: "survived").result(WAIT) == "survived"
    assert manager.join(WAIT)


def test_task_error_groups_attempt_errors_for_except_star(tm: TaskManager) -> None:
    """The final TaskError matches `except* OSError` for a task whose attempts raised OSError."""
    handler = tm.queue(always_fail, retries=1, backoff=0)
    caught: list[BaseException] = []
    try:
        handler.result(WAIT)
    except* OSError as group:
        caught.extend(group.exceptions)
    assert [str(e) for e in caught] == ["attempt 1", "attempt 2"]


# -- no deadlock ---------------------------------------------------------------------


def test_tree_of_submissions_into_a_full_queue_completes(
    make: Callable[..., TaskManager],
) -> None:
    """Tasks that each submit three more into a tiny queue, from inside workers, all run."""
    manager = make(workers=2, queue_size=1)
    lock = threading.Lock()
    ran: list[str] = []

    def node(path: str, depth: int) -> Callable[[Context], None]:
        def task(ctx: Context) -> None:
            with lock:
                ran.append(path)
            if depth:
                manager.queue(node(path + "a", depth - 1))
                manager.queue(node(path + "b", depth - 1))
                manager.delay(0, node(path + "c", depth - 1))

        return task

    manager.queue(node("", 5))
    assert manager.join(WAIT)
    assert len(ran) == sum(3**d for d in range(6))
    assert len(set(ran)) == len(ran)


def test_external_producers_and_inner_submissions_share_a_full_queue(
    make: Callable[..., TaskManager],
) -> None:
    """Blocked external producers and tasks submitting into the same full queue all finish."""
    manager = make(workers=2, queue_size=1)
    count = [0]
    lock = threading.Lock()

    def leaf(ctx: Context) -> None:
        with lock:
            count[0] += 1

    def spawner(ctx: Context) -> None:
        leaf(ctx)
        for _ in range(5):
            manager.queue(leaf)

    producers = [Runner(lambda: [manager.queue(spawner) for _ in range(50)]) for _ in range(3)]
    for producer in producers:
        producer.start()
    for producer in producers:
        producer.outcome()
    assert manager.join(WAIT)
    assert count[0] == 3 * 50 * 6


def test_a_blocked_producer_gets_room_while_inner_submissions_keep_the_queue_busy(
    make: Callable[..., TaskManager],
) -> None:
    """Tasks that resubmit themselves keep the queue between 3 and 5 of 4 forever; an
    external producer blocked on it must still be woken (it waited for an empty or
    half-empty queue, which never came)."""
    manager = make(workers=2, queue_size=4)
    stop = threading.Event()
    cycles = [0]

    def chain(ctx: Context) -> None:
        cycles[0] += 1  # a lost update now and then is harmless: a progress hint only
        if not stop.is_set():
            manager.queue(chain)  # from inside a task: passes the bound

    def one(ctx: Context) -> int:
        return 1

    for _ in range(6):  # 2 running, 4 queued: the queue is full
        manager.queue(chain)
    producer = Runner(lambda: [manager.queue(one).result(WAIT) for _ in range(100)])
    producer.start()
    try:
        assert producer.outcome() == [1] * 100  # 100 puts into a queue that never empties
        assert cycles[0] > 0
    finally:
        stop.set()
    assert manager.join(WAIT)


class _Noticed(_queue._Blocked):
    """A blocked producer's record that tells the test it was made (the producer
    then waits, under the lock the test takes next)."""

    made = threading.Semaphore(0)

    def __init__(self, item: TaskHandler, lock: threading.Lock) -> None:
        super().__init__(item, lock)
        _Noticed.made.release()


@pytest.fixture
def noticed(monkeypatch: pytest.MonkeyPatch) -> type[_Noticed]:
    monkeypatch.setattr(_Noticed, "made", threading.Semaphore(0))
    monkeypatch.setattr(_queue, "_Blocked", _Noticed)
    return _Noticed


def test_blocked_producers_are_served_first_come_first_served(
    make: Callable[..., TaskManager], noticed: type[_Noticed]
) -> None:
    manager = make(workers=1, queue_size=1)
    release, started = threading.Event(), threading.Event()
    order: list[str] = []

    def hold(ctx: Context) -> None:
        started.set()
        release.wait(WAIT)

    def record(name: str) -> Callable[[Context], None]:
        return lambda ctx: order.append(name)

    manager.queue(hold)
    assert started.wait(WAIT)
    manager.queue(record("queued"))  # the queue is full now
    producers = []
    for name in ("p1", "p2", "p3"):
        producers.append(Runner(lambda name=name: manager.queue(record(name))))
        producers[-1].start()
        assert noticed.made.acquire(timeout=WAIT)  # it is about to wait
        with manager._lock:  # and now it waits
            pass
    release.set()
    for producer in producers:
        producer.outcome()
    assert manager.join(WAIT)
    assert order == ["queued", "p1", "p2", "p3"]


def test_a_producer_interrupted_while_blocked_still_submits_its_task(
    make: Callable[..., TaskManager], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C while queue() waits for room: the task was counted, so it must still run
    (join() would wait for it for ever otherwise)."""

    class Interrupted(threading.Condition):
        def wait(self, timeout: float | None = None) -> bool:
            raise KeyboardInterrupt

    class Blocked(_queue._Blocked):
        def __init__(self, item: TaskHandler, lock: threading.Lock) -> None:
            super().__init__(item, lock)
            self.ready = Interrupted(lock)

    monkeypatch.setattr(_queue, "_Blocked", Blocked)
    manager = make(workers=1, queue_size=1)
    release, started = threading.Event(), threading.Event()
    ran: list[str] = []

    def hold(ctx: Context) -> None:
        started.set()
        release.wait(WAIT)

    manager.queue(hold)
    assert started.wait(WAIT)
    manager.queue(lambda ctx: ran.append("queued"))
    with pytest.raises(KeyboardInterrupt):
        manager.queue(lambda ctx: ran.append("interrupted"))
    release.set()
    assert manager.join(WAIT)
    assert ran == ["queued", "interrupted"]


def test_scheduler_and_config_properties() -> None:
    """`scheduler` is the manager's Scheduler and `config` its Config, overrides applied."""
    manager = TaskManager(Config(workers=3, server_name="a"), server_name="b")
    assert isinstance(manager.scheduler, Scheduler)
    assert manager.scheduler is manager.scheduler
    assert manager.config == Config(workers=3, server_name="b")
