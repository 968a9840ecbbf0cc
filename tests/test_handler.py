"""TaskHandler, its Future API, and the pure option and retry decisions (marionette/handler.py)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import gc
import logging
import math
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import freezegun.api
import pytest
import tenacity
from conftest import WAIT
from hypothesis import given
from hypothesis import strategies as st

from marionette import (
    Context,
    TaskError,
    TaskHandler,
    TaskManager,
    TaskState,
)
from marionette._queue import TaskQueue
from marionette.handler import parse_options, retry_delay

Frozen = freezegun.api.FrozenDateTimeFactory

#: The instant the `frozen` fixture freezes the clock at.
T0 = datetime(2026, 1, 5, 12, 0, 0, tzinfo=UTC)


def ok(ctx: Context) -> str:
    """A task that succeeds."""
    return "ok"


def fail(ctx: Context) -> None:
    """A task that always fails."""
    raise ConnectionError(f"reset on attempt {ctx.attempt}")


class Gate:
    """A task that signals when it starts and returns `value` once released."""

    def __init__(self, value: object = "released") -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.value = value

    def __call__(self, ctx: Context) -> object:
        self.started.set()
        assert self.release.wait(WAIT), "the test never released the gate"
        return self.value


@pytest.fixture
def single() -> Iterator[TaskManager]:
    """A running manager with one worker, stopped after the test."""
    manager = TaskManager(workers=1)
    manager.start()
    try:
        yield manager
    finally:
        manager.stop(timeout=WAIT)


# -- TaskState ---------------------------------------------------------------------------


def test_task_state_members() -> None:
    """`TaskState` has exactly the six documented states."""
    assert [s.name for s in TaskState] == [
        "PENDING",
        "SCHEDULED",
        "RUNNING",
        "SUCCEEDED",
        "FAILED",
        "CANCELLED",
    ]


# -- result, exception, done, running, cancelled ---------------------------------------------


def test_result_of_a_successful_task(tm: TaskManager) -> None:
    """`result()` returns the task's value; the handler is done and SUCCEEDED."""
    handler = tm.queue(lambda ctx: 42)
    assert handler.result(timeout=WAIT) == 42
    assert handler.exception(timeout=WAIT) is None
    assert handler.state is TaskState.SUCCEEDED
    assert handler.done()
    assert not handler.running()
    assert not handler.cancelled()
    assert handler.attempts == 1
    assert handler.errors == ()


def test_wrapped_handler_is_pending(tm: TaskManager) -> None:
    """A wrapped, unsubmitted handler is PENDING, not done, with no attempts."""
    handler = tm.wrap_task(ok)
    assert handler.state is TaskState.PENDING
    assert not handler.done()
    assert not handler.running()
    assert not handler.cancelled()
    assert handler.attempts == 0


def test_result_and_exception_time_out(tm: TaskManager) -> None:
    """`result(timeout)` / `exception(timeout)` raise `TimeoutError` for an unfinished task."""
    handler = tm.delay(3600, ok)
    with pytest.raises(TimeoutError):
        handler.result(timeout=0.01)
    with pytest.raises(TimeoutError):
        handler.exception(timeout=timedelta(milliseconds=10))
    assert handler.state is TaskState.SCHEDULED
    assert not handler.done()
    assert handler.cancel()


def test_running_while_an_attempt_runs(tm: TaskManager) -> None:
    """While its attempt runs, a handler is RUNNING, `running()` and not done."""
    gate = Gate(7)
    handler = tm.queue(gate)
    try:
        assert gate.started.wait(WAIT)
        assert handler.state is TaskState.RUNNING
        assert handler.running()
        assert not handler.done()
        assert not handler.cancelled()
        with pytest.raises(TimeoutError):
            handler.result(timeout=0)
    finally:
        gate.release.set()
    assert handler.result(timeout=WAIT) == 7
    assert not handler.running()


def test_result_of_a_failed_task_raises_its_task_error(tm: TaskManager) -> None:
    """`result()` of a task that failed for good raises its `TaskError`."""
    handler = tm.queue(fail, retries=2, backoff=0)
    with pytest.raises(TaskError) as info:
        handler.result(timeout=WAIT)
    err = info.value
    assert handler.exception(timeout=0) is err
    assert handler.state is TaskState.FAILED
    assert handler.done()
    assert err.attempts == 3
    assert err.task_id == handler.id
    assert err.task_name == handler.name
    assert list(err.exceptions) == list(handler.errors)
    assert str(err).startswith(f"{handler.name} #{handler.id} failed after 3 attempts in ")
    assert str(err).endswith("ConnectionError: reset on attempt 3")


def test_errors_has_one_error_per_failed_attempt_in_order(tm: TaskManager) -> None:
    """`errors` holds one error per failed attempt, oldest first; `attempts` counts all."""

    def flaky(ctx: Context) -> str:
        if ctx.attempt < 3:
            raise ValueError(f"attempt {ctx.attempt}")
        return "third time lucky"

    handler = tm.queue(flaky, retries=5, backoff=0)
    assert handler.result(timeout=WAIT) == "third time lucky"
    assert handler.attempts == 3
    assert [str(e) for e in handler.errors] == ["attempt 1", "attempt 2"]
    assert all(type(e) is ValueError for e in handler.errors)


def test_error_option_heads_the_task_error(tm: TaskManager) -> None:
    """The ``error=`` option is the `TaskError`'s `.error` and heads its message."""
    handler = tm.queue(fail, error="card not charged")
    err = handler.exception(timeout=WAIT)
    assert isinstance(err, TaskError)
    assert err.error == "card not charged"
    assert str(err).startswith("card not charged")


def test_unprintable_error_option_still_settles(tm: TaskManager) -> None:
    """A task whose ``error=`` exception cannot be printed still fails with a `TaskError`."""

    class Unprintable(Exception):
        def __str__(self) -> str:
            raise RuntimeError("__str__ is broken")

    headline = Unprintable()
    handler = tm.queue(fail, error=headline)
    settled = threading.Event()
    handler.add_done_callback(lambda h: settled.set())
    assert settled.wait(WAIT), f"never settled: {handler.state}"
    err = handler.exception(timeout=0)
    assert isinstance(err, TaskError)
    assert err.error is headline


def test_cancelled_task_result_raises_cancelled_error(tm: TaskManager) -> None:
    """`result()` and `exception()` of a cancelled task raise `CancelledError`."""
    handler = tm.delay(3600, ok)
    assert handler.cancel() is True
    assert handler.cancelled()
    assert handler.done()
    assert handler.state is TaskState.CANCELLED
    with pytest.raises(concurrent.futures.CancelledError):
        handler.result(timeout=WAIT)
    with pytest.raises(concurrent.futures.CancelledError):
        handler.exception(timeout=WAIT)
    assert handler.attempts == 0


def test_cancel_of_a_running_task_returns_false_and_cancels_its_context(
    tm: TaskManager,
) -> None:
    """Cancelling a running task returns False, cancels its context, and it ends CANCELLED."""
    started = threading.Event()

    def waits(ctx: Context) -> None:
        started.set()
        assert ctx.wait(WAIT), "the context was never cancelled"
        ctx.check()

    handler = tm.queue(waits, retries=3, backoff=0)
    assert started.wait(WAIT)
    future = handler.as_future()
    assert handler.cancel() is False
    with pytest.raises(concurrent.futures.CancelledError):
        handler.result(timeout=WAIT)
    with pytest.raises(concurrent.futures.CancelledError):
        future.result(timeout=WAIT)
    assert handler.state is TaskState.CANCELLED
    assert handler.attempts == 1


# -- BaseException -------------------------------------------------------------------------


class Abort(BaseException):
    """A custom BaseException that is not an Exception."""


@pytest.mark.parametrize("exc_type", [SystemExit, KeyboardInterrupt, Abort])
def test_base_exception_fails_the_task_for_good_at_once(
    single: TaskManager, exc_type: type[BaseException]
) -> None:
    """A BaseException fails the task at once (no retry), and `result()` raises it itself."""
    raised = exc_type("stop now")

    def dies(ctx: Context) -> None:
        raise raised

    handler = single.queue(dies, retries=5, backoff=0)
    with pytest.raises(exc_type) as info:
        handler.result(timeout=WAIT)
    assert info.value is raised
    assert handler.state is TaskState.FAILED
    assert handler.attempts == 1
    assert handler.exception(timeout=0) is raised
    assert handler.errors == (raised,)
    # The only worker survived it.
    assert single.queue(ok).result(timeout=WAIT) == "ok"


# -- add_done_callback -----------------------------------------------------------------------


def test_done_callback_gets_the_finished_handler(tm: TaskManager) -> None:
    """A callback added before completion is called once, with the handler, once it is done."""
    gate = Gate(5)
    handler = tm.queue(gate)
    seen: list[tuple[TaskHandler, bool, object]] = []
    called = threading.Event()

    def callback(h: TaskHandler) -> None:
        seen.append((h, h.done(), h.result(timeout=0)))
        called.set()

    handler.add_done_callback(callback)
    assert not called.is_set()
    gate.release.set()
    assert called.wait(WAIT)
    assert handler.result(timeout=WAIT) == 5
    assert seen == [(handler, True, 5)]


def test_done_callback_runs_at_once_when_already_done(tm: TaskManager) -> None:
    """A callback added to a finished handler runs at once, in the calling thread."""
    handler = tm.queue(ok)
    handler.result(timeout=WAIT)
    calls: list[tuple[TaskHandler, threading.Thread]] = []
    handler.add_done_callback(lambda h: calls.append((h, threading.current_thread())))
    assert calls == [(handler, threading.current_thread())]


@pytest.mark.parametrize("ending", [TaskState.FAILED, TaskState.CANCELLED])
def test_done_callbacks_run_in_order_when_a_task_fails_or_is_cancelled(
    tm: TaskManager, ending: TaskState
) -> None:
    """Callbacks run once, in the order added, for failed and cancelled tasks too."""
    release = threading.Event()

    def fails_when_released(ctx: Context) -> None:
        assert release.wait(WAIT)
        raise ValueError("late failure")

    failing = ending is TaskState.FAILED
    handler = tm.queue(fails_when_released) if failing else tm.delay(3600, ok)
    calls: list[tuple[int, TaskState]] = []
    done = threading.Event()
    handler.add_done_callback(lambda h: calls.append((1, h.state)))
    handler.add_done_callback(lambda h: calls.append((2, h.state)))
    handler.add_done_callback(lambda h: done.set())
    assert calls == []
    if failing:
        release.set()
    else:
        handler.cancel()
    assert done.wait(WAIT)
    assert calls == [(1, ending), (2, ending)]


def test_raising_done_callback_is_logged_and_others_still_run(
    tm: TaskManager, caplog: pytest.LogCaptureFixture
) -> None:
    """A callback that raises is logged and does not stop the callbacks after it."""
    caplog.set_level(logging.DEBUG, logger="marionette")
    gate = Gate()
    handler = tm.queue(gate)
    after = threading.Event()

    def bad(h: TaskHandler) -> None:
        raise RuntimeError("callback boom")

    handler.add_done_callback(bad)
    handler.add_done_callback(lambda h: after.set())
    gate.release.set()
    assert after.wait(WAIT)
    assert any("callback boom" in r.getMessage() for r in caplog.records), caplog.text

    # Also when the callback runs at once on a finished handler: logged, not raised.
    handler.add_done_callback(lambda h: 1 / 0)
    assert any("ZeroDivisionError" in r.getMessage() for r in caplog.records), caplog.text


def test_add_done_callback_rejects_non_callables(tm: TaskManager) -> None:
    """`add_done_callback` with something not callable raises `TypeError`."""
    with pytest.raises(TypeError):
        tm.wrap_task(ok).add_done_callback("not callable")  # type: ignore[arg-type]


# -- as_future -------------------------------------------------------------------------------


def test_as_future_works_with_wait(tm: TaskManager) -> None:
    """`concurrent.futures.wait` on `as_future()`s returns when the tasks are done."""
    handlers = [tm.queue(lambda ctx, n=n: n * 10) for n in range(3)]
    futures = [h.as_future() for h in handlers]
    done, not_done = concurrent.futures.wait(futures, timeout=WAIT)
    assert not not_done
    assert sorted(f.result() for f in done) == [0, 10, 20]


def test_as_future_works_with_as_completed(tm: TaskManager) -> None:
    """`as_completed` yields each task's future as it finishes, failures included."""
    futures = [tm.queue(lambda ctx: "a").as_future(), tm.queue(fail).as_future()]
    results: list[object] = []
    for future in concurrent.futures.as_completed(futures, timeout=WAIT):
        exc = future.exception()
        results.append(type(exc) if exc is not None else future.result())
    assert sorted(results, key=str) == sorted(["a", TaskError], key=str)


def test_as_future_works_with_asyncio(tm: TaskManager) -> None:
    """`asyncio.wrap_future(handler.as_future())` can be awaited for the result."""
    handler = tm.queue(lambda ctx: "from a worker")

    async def main() -> object:
        return await asyncio.wait_for(asyncio.wrap_future(handler.as_future()), WAIT)

    assert asyncio.run(main()) == "from a worker"


# -- await ------------------------------------------------------------------------------


def test_await_handler_gives_the_result(tm: TaskManager) -> None:
    """`await handler` gives the task's result, finished or not when awaited."""

    async def main() -> tuple[str, str]:
        first = await tm.queue(ok)
        handler = tm.queue(ok)
        handler.result(WAIT)
        return first, await handler

    assert asyncio.run(main()) == ("ok", "ok")


def test_await_handler_raises_what_result_raises(tm: TaskManager) -> None:
    """A failed task raises its TaskError when awaited; a cancelled one the
    concurrent.futures CancelledError (not the awaiter's own asyncio cancellation)."""
    failed = tm.queue(fail)
    cancelled = tm.delay(3600, ok)

    async def main() -> None:
        with pytest.raises(TaskError):
            await failed
        loop_task = asyncio.ensure_future(asyncio.wait_for(cancelled, WAIT))
        await asyncio.sleep(0)  # the awaiter is waiting now
        assert cancelled.cancel()
        with pytest.raises(concurrent.futures.CancelledError):
            await loop_task
        assert not loop_task.cancelled()

    asyncio.run(main())


def test_many_coroutines_await_many_handlers(tm: TaskManager) -> None:
    """Hundreds of concurrent awaits, several on one handler, each get their result."""
    shared = tm.queue(lambda ctx: "shared")
    handlers = [tm.queue(lambda ctx, i=i: i) for i in range(200)]

    async def main() -> tuple[list[int], list[str]]:
        own = await asyncio.gather(*(asyncio.wait_for(h, WAIT) for h in handlers))
        same = await asyncio.gather(*(asyncio.wait_for(shared, WAIT) for _ in range(50)))
        return own, same

    own, same = asyncio.run(main())
    assert own == list(range(200))
    assert same == ["shared"] * 50


def test_an_awaiter_that_gives_up_leaves_the_task_alone(single: TaskManager) -> None:
    """`asyncio.wait_for(handler, short)` times out, and a cancelled awaiter goes away,
    but the task runs on and succeeds: only `cancel()` cancels a task."""
    gate = Gate("done")
    handler = single.queue(gate)
    assert gate.started.wait(WAIT)
    queued = single.queue(ok)

    async def main() -> None:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(handler, 0.01)
        awaiting = asyncio.ensure_future(asyncio.wait_for(queued, WAIT))
        await asyncio.sleep(0)
        awaiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await awaiting

    try:
        asyncio.run(main())
    finally:
        gate.release.set()
    assert handler.result(WAIT) == "done"
    assert queued.result(WAIT) == "ok"


def test_as_future_of_a_failed_task_carries_its_error(tm: TaskManager) -> None:
    """The future of a failed task holds the same `TaskError` as the handler."""
    handler = tm.queue(fail)
    future = handler.as_future()
    err = future.exception(timeout=WAIT)
    assert isinstance(err, TaskError)
    assert err is handler.exception(timeout=0)


def test_as_future_of_a_finished_handler_is_settled_at_once(tm: TaskManager) -> None:
    """`as_future()` of a finished handler returns an already-settled future."""
    handler = tm.queue(ok)
    handler.result(timeout=WAIT)
    future = handler.as_future()
    assert future.done()
    assert future.result(timeout=0) == "ok"


def test_cancelling_the_future_cancels_a_task_not_yet_started(tm: TaskManager) -> None:
    """Cancelling `as_future()` of a delayed task cancels the task: it never runs."""
    handler = tm.delay(3600, ok)
    future = handler.as_future()
    assert future.cancel()
    assert future.cancelled()
    assert handler.cancelled()
    assert handler.state is TaskState.CANCELLED
    assert handler.attempts == 0


def test_cancelling_the_future_cancels_a_queued_task(single: TaskManager) -> None:
    """Cancelling `as_future()` of a task waiting in the queue cancels it: it never runs."""
    gate = Gate()
    blocker = single.queue(gate)
    ran: list[int] = []
    try:
        assert gate.started.wait(WAIT)
        queued = single.queue(lambda ctx: ran.append(1))
        assert queued.state is TaskState.PENDING
        future = queued.as_future()
        assert future.cancel()
        assert queued.state is TaskState.CANCELLED
    finally:
        gate.release.set()
    assert blocker.result(timeout=WAIT) == "released"
    assert single.join(timeout=WAIT)
    assert ran == []


def test_future_made_before_the_start_runs_with_the_task(single: TaskManager) -> None:
    """A future made while the task waits becomes running when its first attempt starts."""
    blocker, gate = Gate(), Gate("second")
    single.queue(blocker)
    try:
        assert blocker.started.wait(WAIT)
        handler = single.queue(gate)
        future = handler.as_future()
        assert not future.running()
        blocker.release.set()
        assert gate.started.wait(WAIT)
        assert future.running()
        assert future.cancel() is False
    finally:
        blocker.release.set()
        gate.release.set()
    assert future.result(timeout=WAIT) == "second"
    assert handler.state is TaskState.SUCCEEDED


def test_cancelling_the_handler_cancels_its_future(tm: TaskManager) -> None:
    """Cancelling the handler settles its future as cancelled."""
    handler = tm.delay(3600, ok)
    future = handler.as_future()
    assert handler.cancel()
    assert future.cancelled()
    with pytest.raises(concurrent.futures.CancelledError):
        future.result(timeout=0)


def test_wait_reports_a_future_cancelled_by_its_holder_at_once(tm: TaskManager) -> None:
    """`wait` and `as_completed` see a future cancelled by its holder as done at once,
    as they see an executor's (its state is CANCELLED_AND_NOTIFIED)."""
    ran: list[int] = []
    handler = tm.delay(3600, lambda ctx: ran.append(1))
    future = handler.as_future()
    assert future.cancel()
    done, not_done = concurrent.futures.wait([future], timeout=WAIT)
    assert (done, not_done) == ({future}, set())
    assert list(concurrent.futures.as_completed([future], timeout=WAIT)) == [future]
    assert handler.cancelled()
    assert ran == []


def test_wait_and_as_completed_over_every_outcome(single: TaskManager) -> None:
    """Over cancelled (by holder or by handler), failed and succeeded futures, `wait`
    returns all of them done and `as_completed` yields each once, as for an executor."""
    gate = Gate()
    single.queue(gate)
    try:
        assert gate.started.wait(WAIT)
        by_holder = single.queue(ok).as_future()
        by_handler_task = single.queue(ok)
        by_handler = by_handler_task.as_future()
        failed = single.queue(fail).as_future()
        succeeded = single.queue(ok).as_future()
        waiting = [by_holder, by_handler, failed, succeeded]
        assert by_holder.cancel()
        assert by_handler_task.cancel()
        first, _ = concurrent.futures.wait(waiting, timeout=WAIT, return_when="FIRST_COMPLETED")
        assert first == {by_holder, by_handler}
    finally:
        gate.release.set()
    done, not_done = concurrent.futures.wait(waiting, timeout=WAIT)
    assert (done, not_done) == (set(waiting), set())
    seen = list(concurrent.futures.as_completed(waiting, timeout=WAIT))
    assert sorted(map(id, seen)) == sorted(map(id, waiting))
    assert isinstance(failed.exception(0), TaskError)
    assert succeeded.result(0) == "ok"


def test_asyncio_sees_a_cancelled_future_at_once(tm: TaskManager) -> None:
    """`asyncio.wrap_future` of a future cancelled by its holder raises CancelledError
    without waiting for anything."""
    handler = tm.delay(3600, ok)
    future = handler.as_future()

    async def main() -> None:
        wrapped = asyncio.wrap_future(future)
        future.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(wrapped, WAIT)

    asyncio.run(main())
    assert handler.cancelled()


class Result:
    """A result that can be weakly referenced."""


@pytest.mark.parametrize("how", ["queue", "delay", "listener"])
def test_a_finished_task_is_not_kept_alive_by_an_idle_manager(
    make: Callable[..., TaskManager], how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once a task finished and its callbacks ran, nothing of it (the handler, so its
    callable and its result, its callbacks, its future) stays reachable from the idle
    worker, scheduler and listener threads."""
    idle = threading.Condition()
    fired: list[bool] = []
    waiting: list[bool] = []  # a worker went to wait for work after the callback ran
    take = TaskQueue.take_locked

    def watched_take(q: TaskQueue) -> Any:
        if not q.queue:
            with idle:
                if fired:
                    waiting.append(True)
                    idle.notify_all()
        return take(q)

    monkeypatch.setattr(TaskQueue, "take_locked", watched_take)
    manager = make(workers=1)
    if how == "listener":
        manager.add_listener(lambda event: None)
    result = Result()
    task = lambda ctx, r=result: r  # noqa: E731

    def callback(handler: Any) -> None:
        with idle:
            fired.append(True)

    submit = manager.queue if how != "delay" else functools.partial(manager.delay, 0)
    handler = manager.wrap_task(task)  # the callback is in place before the task can end
    future = handler.as_future()
    handler.add_done_callback(callback)
    submit(handler)
    # A handler has no __weakref__ slot (8 bytes per pending task): what it holds, its
    # callable and its result, can only be collected once it is.
    refs = [weakref.ref(x) for x in (task, result, callback, future)]
    assert future.result(WAIT) is result
    with idle:
        assert idle.wait_for(lambda: waiting, WAIT)  # the worker waits for its next task
    manager.scheduler.wake()  # the scheduler thread went back to sleep
    events = manager._events
    with manager._lock:  # the listener thread delivered everything and waits again
        assert events._room.wait_for(lambda: not events._events and not events._delivering, WAIT)
    del task, handler, result, callback, future, submit
    gc.collect()
    assert [ref() for ref in refs] == [None] * 4


def test_future_of_a_running_task_settles_with_it(tm: TaskManager) -> None:
    """Cancelling the future of a running task returns False; the future gets its result."""
    gate = Gate(42)
    handler = tm.queue(gate)
    try:
        assert gate.started.wait(WAIT)
        future = handler.as_future()
        assert future.running()
        cancelled = future.cancel()
    finally:
        gate.release.set()
    assert handler.result(timeout=WAIT) == 42
    assert cancelled is False
    assert future.result(timeout=WAIT) == 42
    assert not future.cancelled()


# -- due -------------------------------------------------------------------------------------


def test_due_of_a_delayed_handler(frozen: Frozen, tm: TaskManager) -> None:
    """A delayed handler's `due` is the aware UTC time it is due at; None once cancelled."""
    handler = tm.delay(30, ok)
    assert handler.due == T0 + timedelta(seconds=30)
    assert handler.due is not None
    assert handler.due.utcoffset() == timedelta(0)
    handler.cancel()
    assert handler.due is None


def test_due_of_wrapped_and_finished_handlers_is_none(tm: TaskManager) -> None:
    """`due` is None for a wrapped handler never submitted, and once a task ended."""
    assert tm.wrap_task(ok).due is None
    handler = tm.queue(ok)
    handler.result(timeout=WAIT)
    assert handler.due is None


# -- id and name ----------------------------------------------------------------------------


def test_ids_are_unique_and_increase_with_creation(tm: TaskManager) -> None:
    """Handler ids are unique and increase in creation order, across threads too."""
    first = tm.wrap_task(ok)
    second = tm.wrap_task(ok)
    assert second.id > first.id
    ids: list[int] = []

    def make() -> None:
        local = [tm.wrap_task(ok).id for _ in range(500)]
        assert local == sorted(local)
        ids.extend(local)

    threads = [threading.Thread(target=make, name=f"test-ids-{n}") for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    assert len(ids) == 2000
    assert len(set(ids)) == 2000
    assert min(ids) > second.id


def named_function(ctx: Context) -> None:
    """A module-level task."""


class Job:
    """An object task with a `__str__`."""

    def __init__(self, number: int) -> None:
        self.number = number

    def do(self, ctx: Context) -> int:
        return self.number

    def __str__(self) -> str:
        return f"job-{self.number}"


class PlainJob:
    """An object task without a `__str__`."""

    def do(self, ctx: Context) -> str:
        return "plain"


class CallableWithStr:
    """A callable task with a `__str__`."""

    def __call__(self, ctx: Context) -> str:
        return "called"

    def __str__(self) -> str:
        return "callable-task"


class BrokenStrJob:
    """An object task whose `__str__` raises."""

    def do(self, ctx: Context) -> str:
        return "still runs"

    def __str__(self) -> str:
        raise RuntimeError("no name for you")


@pytest.mark.parametrize(
    ("task", "expected"),
    [
        (named_function, "named_function"),
        (Job(7), "job-7"),
        (PlainJob(), "PlainJob"),
        (CallableWithStr(), "callable-task"),
        (Job(1).do, "Job.do"),
    ],
)
def test_default_names(tm: TaskManager, task: Callable[[Context], Any], expected: str) -> None:
    """The name is `str(task)` when it defines `__str__`, else its qualified name."""
    handler = tm.wrap_task(task)
    assert handler.name == expected
    assert str(handler) == expected


def test_name_of_a_local_function_is_its_qualified_name(tm: TaskManager) -> None:
    """A nested function is named by its `__qualname__`."""

    def inner(ctx: Context) -> None: ...

    assert tm.wrap_task(inner).name == inner.__qualname__
    assert "<lambda>" in tm.wrap_task(lambda ctx: None).name


def test_name_of_a_partial_mentions_the_function(tm: TaskManager) -> None:
    """A `functools.partial` task is named after the function it wraps."""
    task = functools.partial(lambda ctx, n: n, n=3)
    assert "<lambda>" in tm.wrap_task(task).name


def test_name_option_wins(tm: TaskManager) -> None:
    """``name=`` overrides the default name, for functions and objects alike."""
    assert tm.wrap_task(named_function, name="custom").name == "custom"
    assert tm.wrap_task(Job(3), name="other").name == "other"


def test_task_whose_str_raises_still_gets_a_name_and_runs(tm: TaskManager) -> None:
    """A task whose `__str__` raises is named (by its type) and runs normally."""
    handler = tm.queue(BrokenStrJob())
    assert isinstance(handler.name, str)
    assert "BrokenStrJob" in handler.name
    assert handler.result(timeout=WAIT) == "still runs"


def test_context_inside_a_task_knows_the_task(tm: TaskManager) -> None:
    """Inside a task, the context's `task_id`, `task_name` and `attempt` describe it."""
    seen: list[tuple[int | None, str | None, int]] = []

    def task(ctx: Context) -> None:
        seen.append((ctx.task_id, ctx.task_name, ctx.attempt))
        if ctx.attempt == 1:
            raise ValueError("again")

    handler = tm.queue(task, name="introspect", retries=1, backoff=0)
    handler.result(timeout=WAIT)
    assert seen == [(handler.id, "introspect", 1), (handler.id, "introspect", 2)]


# -- do, exec, wrap_task, double submission -------------------------------------------------------


def test_do_raises_type_error(tm: TaskManager) -> None:
    """`handler.do(ctx)` raises `TypeError`: a handler is never wrapped again."""
    handler = tm.wrap_task(ok)
    with pytest.raises(TypeError):
        handler.do(Context())
    assert handler.state is TaskState.PENDING


def test_exec_runs_one_attempt_in_the_calling_thread(tm: TaskManager) -> None:
    """`exec()` runs the task now, in the calling thread, and settles the handler."""
    threads: list[threading.Thread] = []

    def task(ctx: Context) -> int:
        threads.append(threading.current_thread())
        return ctx.attempt

    handler = tm.wrap_task(task)
    handler.exec()
    assert threads == [threading.current_thread()]
    assert handler.done()
    assert handler.result(timeout=0) == 1
    assert handler.attempts == 1


def test_exec_of_a_finished_handler_does_nothing(tm: TaskManager) -> None:
    """`exec()` of a handler that already ran does not run it again."""
    calls: list[int] = []
    handler = tm.wrap_task(lambda ctx: calls.append(1))
    handler.exec()
    handler.exec()
    assert calls == [1]
    assert handler.attempts == 1


def test_exec_failure_with_retries_left_goes_to_the_scheduler(tm: TaskManager) -> None:
    """`exec()` runs one attempt only: a failure with retries left waits for its retry."""
    handler = tm.wrap_task(fail, retries=1, backoff=3600)
    handler.exec()
    assert handler.attempts == 1
    assert len(handler.errors) == 1
    assert handler.state is TaskState.SCHEDULED
    assert not handler.done()
    assert handler.cancel()


def test_wrap_task_of_a_handler_returns_it(tm: TaskManager) -> None:
    """`wrap_task(handler)` returns the very same handler."""
    handler = tm.wrap_task(ok)
    assert tm.wrap_task(handler) is handler
    submitted = tm.queue(handler)
    assert submitted is handler
    assert submitted.result(timeout=WAIT) == "ok"


def test_wrap_task_of_a_handler_with_options_raises(tm: TaskManager) -> None:
    """A handler's options cannot be changed by wrapping it again: `TypeError`."""
    with pytest.raises(TypeError):
        tm.wrap_task(tm.wrap_task(ok), retries=2)


def test_handler_of_another_manager_is_refused(tm: TaskManager) -> None:
    """A handler made by another manager cannot be wrapped or submitted: `ValueError`."""
    other = TaskManager(workers=1)
    foreign = other.wrap_task(ok)
    with pytest.raises(ValueError):
        tm.wrap_task(foreign)
    with pytest.raises(ValueError):
        tm.queue(foreign)


SUBMIT: dict[str, Callable[[TaskManager, TaskHandler], TaskHandler]] = {
    "queue": lambda tm, h: tm.queue(h),
    "delay": lambda tm, h: tm.delay(1, h),
    "schedule": lambda tm, h: tm.schedule(datetime.now(UTC), h),
}


@pytest.mark.parametrize("second", sorted(SUBMIT))
def test_submitting_a_handler_twice_raises_value_error(tm: TaskManager, second: str) -> None:
    """A handler runs once: submitting it a second time raises `ValueError`."""
    handler = tm.delay(3600, ok)
    submit = SUBMIT[second]
    with pytest.raises(ValueError):
        submit(tm, handler)
    assert handler.state is TaskState.SCHEDULED
    assert handler.cancel()


def test_submitting_a_finished_handler_raises_value_error(tm: TaskManager) -> None:
    """A handler that already ran (submitted or exec'd) cannot be submitted again."""
    ran = tm.queue(ok)
    ran.result(timeout=WAIT)
    executed = tm.wrap_task(ok)
    executed.exec()
    for handler in (ran, executed):
        with pytest.raises(ValueError):
            tm.queue(handler)


# -- parse_options ---------------------------------------------------------------------------


def test_parse_options_defaults() -> None:
    """No options give no retries, the default strategies, and no name."""
    opts, name = parse_options({})
    assert name is None
    assert opts.retries == 0
    assert opts.timeout is None
    assert opts.context is None
    assert opts.error is None
    assert opts.stop is None


def test_parse_options_keeps_valid_values() -> None:
    """Valid options are kept; `timeout` may be a timedelta; the name is returned apart."""
    ctx = Context()
    opts, name = parse_options(
        {
            "retries": 3,
            "timeout": timedelta(seconds=2.5),
            "context": ctx,
            "error": "headline",
            "name": "job",
        }
    )
    assert name == "job"
    assert opts.retries == 3
    assert opts.timeout == 2.5
    assert opts.context is ctx
    assert opts.error == "headline"


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("retries", "3"),
        ("retries", 1.0),
        ("retries", True),
        ("retries", None),
        ("backoff", "1"),
        ("backoff", True),
        ("timeout", "1"),
        ("timeout", True),
        ("context", "ctx"),
        ("context", object()),
        ("error", 42),
        ("name", 42),
        ("retry", 3),
        ("stop", "never"),
        ("key", 5),
        ("key", ""),
        ("group", 5),
        ("group", ""),
    ],
)
def test_parse_options_wrong_types_raise_type_error(option: str, value: object) -> None:
    """An option of the wrong type raises `TypeError` naming the option."""
    with pytest.raises(TypeError, match=option):
        parse_options({option: value})


def test_parse_options_unknown_option_raises_type_error() -> None:
    """An unknown option raises `TypeError` naming it."""
    with pytest.raises(TypeError, match="retires"):
        parse_options({"retires": 3})


def test_parse_options_negative_retries_raise_value_error() -> None:
    """`retries` < 0 raises `ValueError`."""
    with pytest.raises(ValueError, match="retries"):
        parse_options({"retries": -1})


@pytest.mark.parametrize("timeout", [0, -1, 0.0, timedelta(0), math.nan, math.inf])
def test_parse_options_non_positive_timeout_raises_value_error(timeout: object) -> None:
    """A `timeout` that is not a positive finite number raises `ValueError`."""
    with pytest.raises(ValueError, match="timeout"):
        parse_options({"timeout": timeout})


@pytest.mark.parametrize("backoff", [-1, -0.5, math.nan, math.inf, timedelta(seconds=-1)])
def test_parse_options_bad_backoff_raises_value_error(backoff: object) -> None:
    """A negative, NaN or infinite backoff raises `ValueError`."""
    with pytest.raises(ValueError, match="backoff"):
        parse_options({"backoff": backoff})


# -- retry_delay: a pure function -----------------------------------------------------------------


def delay_for(attempt: int = 1, error: BaseException | None = None, **options: Any) -> float | None:
    """`retry_delay` for failed attempt `attempt` of a task submitted just now."""
    opts, _ = parse_options(options)
    return retry_delay(opts, attempt, ValueError("x") if error is None else error, time.monotonic())


def test_no_retries_means_no_retry() -> None:
    """With the default `retries=0` the first failure is final: None."""
    assert delay_for(1) is None


def test_retries_exhausted_returns_none() -> None:
    """With `retries=n`, attempts 1..n get a delay and attempt n+1 gets None."""
    assert delay_for(1, retries=2, backoff=1) == 1.0
    assert delay_for(2, retries=2, backoff=1) == 1.0
    assert delay_for(3, retries=2, backoff=1) is None


@pytest.mark.parametrize(
    ("backoff", "expected"),
    [(2, 2.0), (0.25, 0.25), (0, 0.0), (timedelta(milliseconds=1500), 1.5)],
)
def test_backoff_as_a_number_or_timedelta(backoff: object, expected: float) -> None:
    """A number or `timedelta` backoff is a fixed wait of that many seconds."""
    assert delay_for(1, retries=1, backoff=backoff) == expected


def test_wait_fixed() -> None:
    """`tenacity.wait_fixed(n)` waits n seconds before every retry."""
    for attempt in (1, 2, 5):
        assert delay_for(attempt, retries=5, backoff=tenacity.wait_fixed(3)) == 3.0


def test_wait_exponential() -> None:
    """`wait_exponential` grows with the attempt number and respects its cap."""
    backoff = tenacity.wait_exponential(multiplier=1, exp_base=2, max=5)
    delays = [delay_for(n, retries=10, backoff=backoff) for n in range(1, 6)]
    assert delays == [1.0, 2.0, 4.0, 5.0, 5.0]


def test_composed_waits_add_up() -> None:
    """Waits composed with ``+`` add up."""
    backoff = tenacity.wait_fixed(1) + tenacity.wait_fixed(2)
    assert delay_for(1, retries=1, backoff=backoff) == 3.0
    jittered = tenacity.wait_fixed(2) + tenacity.wait_random(0, 1)
    delay = delay_for(1, retries=1, backoff=jittered)
    assert delay is not None
    assert 2.0 <= delay <= 3.0


def test_retry_predicate_decides_which_failures_are_retried() -> None:
    """`retry_if_exception_type(OSError)` retries OSErrors only."""
    retry = tenacity.retry_if_exception_type(OSError)
    assert delay_for(1, ConnectionError("reset"), retries=3, backoff=1, retry=retry) == 1.0
    assert delay_for(1, ValueError("bad"), retries=3, backoff=1, retry=retry) is None


def test_retry_predicates_compose_with_or_and_and() -> None:
    """Retry strategies composed with ``|`` and ``&`` are honoured."""
    either = tenacity.retry_if_exception_type(OSError) | tenacity.retry_if_exception_type(KeyError)
    assert delay_for(1, OSError(), retries=1, backoff=1, retry=either) == 1.0
    assert delay_for(1, KeyError(), retries=1, backoff=1, retry=either) == 1.0
    assert delay_for(1, ValueError(), retries=1, backoff=1, retry=either) is None
    both = tenacity.retry_if_exception_type(OSError) & tenacity.retry_if_exception_message(
        match="temporary"
    )
    assert delay_for(1, OSError("temporary"), retries=1, backoff=1, retry=both) == 1.0
    assert delay_for(1, OSError("permanent"), retries=1, backoff=1, retry=both) is None


def test_stop_after_delay_ends_retries() -> None:
    """`stop_after_delay` ends retries once that long has passed since submission."""
    opts, _ = parse_options({"retries": 5, "backoff": 1, "stop": tenacity.stop_after_delay(10)})
    now = time.monotonic()
    assert retry_delay(opts, 1, ValueError(), now - 1) == 1.0
    assert retry_delay(opts, 1, ValueError(), now - 11) is None


def test_stop_before_delay_sees_the_upcoming_sleep() -> None:
    """`stop_before_delay` stops when the upcoming backoff would cross its limit."""
    opts, _ = parse_options(
        {
            "retries": 5,
            "backoff": tenacity.wait_fixed(5),
            "stop": tenacity.stop_before_delay(10),
        }
    )
    now = time.monotonic()
    assert retry_delay(opts, 1, ValueError(), now - 2) == 5.0  # 2 + 5 < 10
    assert retry_delay(opts, 1, ValueError(), now - 6) is None  # 6 + 5 >= 10


def test_stop_strategies_compose_with_or() -> None:
    """``stop_after_attempt(2) | stop_after_delay(...)`` stops at whichever comes first."""
    stop = tenacity.stop_after_attempt(2) | tenacity.stop_after_delay(3600)
    assert delay_for(1, retries=10, backoff=1, stop=stop) == 1.0
    assert delay_for(2, retries=10, backoff=1, stop=stop) is None


def test_retries_end_retrying_even_if_stop_allows_more() -> None:
    """Retries end when `retries` says so even if the stop strategy would go on."""
    stop = tenacity.stop_after_attempt(100)
    assert delay_for(2, retries=1, backoff=1, stop=stop) is None


def test_negative_wait_means_retry_now() -> None:
    """A strategy returning a negative wait retries at once (0.0)."""
    assert delay_for(1, retries=1, backoff=lambda state: -5) == 0.0


def test_non_finite_wait_raises_value_error() -> None:
    """A strategy returning NaN or infinity raises `ValueError`."""
    for value in (math.nan, math.inf):
        with pytest.raises(ValueError):
            delay_for(1, retries=1, backoff=lambda state, value=value: value)


def test_strategy_errors_propagate() -> None:
    """Whatever a strategy raises propagates out of `retry_delay`."""

    def broken(state: tenacity.RetryCallState) -> float:
        raise LookupError("strategy bug")

    with pytest.raises(LookupError, match="strategy bug"):
        delay_for(1, retries=1, backoff=broken)


def test_strategies_see_the_attempt_and_error() -> None:
    """The strategies get a call state with the attempt number and the failure."""
    seen: list[tuple[int, BaseException | None]] = []
    error = OSError("seen")

    def backoff(state: tenacity.RetryCallState) -> float:
        assert state.outcome is not None
        seen.append((state.attempt_number, state.outcome.exception()))
        return 0.5

    assert delay_for(3, error, retries=5, backoff=backoff) == 0.5
    assert seen == [(3, error)]


def test_default_backoff_first_retry() -> None:
    """The default backoff waits 0.5 s before the first retry, plus up to 0.25 s of jitter."""
    for _ in range(50):
        delay = delay_for(1, retries=1)
        assert delay is not None
        assert 0.5 <= delay <= 0.75


@given(st.integers(min_value=1, max_value=2000))
def test_default_backoff_bounds(attempt: int) -> None:
    """The default backoff is 0.5 x 1.5^(n-1) s, capped at 60 s, plus 0..0.25 s of jitter."""
    base = min(0.5 * 1.5 ** min(attempt - 1, 100), 60.0)
    delay = delay_for(attempt, retries=attempt)
    assert delay is not None
    assert base <= delay <= base + 0.25


def test_default_backoff_jitters() -> None:
    """The default backoff is not the same every time (it carries random jitter)."""
    delays = {delay_for(1, retries=1) for _ in range(50)}
    assert len(delays) > 1
