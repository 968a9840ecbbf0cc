"""MemoryHandler: the in-memory backend's handler, a small state machine.

A handler holds no lock of its own: all handlers of a manager share that manager's
lock (`TaskManager._lock`), so one acquisition per transition keeps a handler's
state and the manager's counters in agreement, and a submission pays for no lock,
condition or `Future`. A waiter (`threading.Event`) or a callback list is made only
when someone asks for one. The transitions themselves (submit, dispatch, run,
retry, cancel, settle) live in the manager, which owns the queue, the scheduler and
the counters; this module owns the handler's fields, the waiting and the callbacks.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

from marionette._time import monotonic_to_utc, seconds
from marionette.context import Context
from marionette.errors import describe
from marionette.handler import FINISHED, Options, T, TaskHandler, TaskState, default_name
from marionette.scheduler import next_sequence

if TYPE_CHECKING:
    from marionette._log import Log
    from marionette.scheduler import Scheduler

__all__ = ["MemoryHandler"]

_PENDING = TaskState.PENDING  # a global: an enum attribute lookup costs ~100 ns
_FINISHED = FINISHED


class _Owner(Protocol):
    """What a handler needs from the manager that made it."""

    _lock: threading.Lock
    _log: Log
    _scheduler: Scheduler[Any]

    def _cancel(self, handler: MemoryHandler[Any]) -> bool: ...
    def _execute(self, handler: MemoryHandler[Any]) -> None: ...


class _Extras:
    """The part of a handler that most never need, made on first need.

    Made and changed under the owner's lock only; once the handler is finished,
    `waiter` never changes again, and `callbacks` only once more: the thread that
    fires them drops the list (the callbacks and what they hold, a future say,
    would otherwise live as long as the handler).
    """

    __slots__ = ("callbacks", "cancelling", "errors", "futures", "waiter")

    def __init__(self) -> None:
        self.waiter: threading.Event | None = None
        self.callbacks: list[Callable[[TaskHandler[Any]], object]] | None = None
        self.errors: list[BaseException] | None = None
        #: Futures from `as_future` still to be marked running by the first attempt.
        self.futures: list[concurrent.futures.Future[Any]] | None = None
        #: cancel() was called while an attempt ran: do not retry it.
        self.cancelling = False


class MemoryHandler(TaskHandler[T]):
    """One submission of a task: its state, result, attempts, and the Future API.

    Returned by every submission; any thread may use it. `result()` and
    `exception()` block (with an optional timeout); everything else returns at once.
    Generic in the task's result: a task ``fn(ctx) -> T`` gives a ``TaskHandler[T]``.
    ``await handler`` waits without blocking the event loop (see `__await__`).
    """

    __slots__ = (
        "_attempts",
        "_ctx",
        "_due",
        "_extras",
        "_fn",
        "_name",
        "_opts",
        "_owner",
        "_state",
        "_submitted_at",
        "_value",
        "id",
    )

    def __init__(
        self, owner: _Owner, fn: Callable[[Context], Any], opts: Options, name: str | None
    ) -> None:
        #: Unique in the process, increasing with creation time.
        self.id: int = next_sequence()
        self._owner = owner
        self._fn = fn
        self._opts = opts
        self._name = name
        self._state = _PENDING
        self._attempts = 0
        self._value: Any = None
        self._ctx: Context | None = None
        self._extras: _Extras | None = None
        self._submitted_at: float | None = None
        # While it waits: the time.monotonic() at which it is or was due.
        self._due = 0.0

    # -- reading ---------------------------------------------------------------

    @property
    def name(self) -> str:
        """The task's label in logs: the ``name=`` option, else `default_name`."""
        name = self._name
        if name is None:  # a plain callable: named on first use, off the hot path
            name = self._name = default_name(self._fn)
        return name

    @property
    def state(self) -> TaskState:
        return self._state

    @property
    def due(self) -> datetime | None:
        """When it is (or was) due while it waits (aware UTC); None once it runs or ends.

        None too for a handler that was wrapped and never submitted.
        """
        state = self._state
        if state is TaskState.SCHEDULED:
            at = self._owner._scheduler.due(self)
            if at is not None:
                return at
        elif state is not TaskState.PENDING or self._submitted_at is None:
            return None
        return monotonic_to_utc(self._due)

    @property
    def attempts(self) -> int:
        """Attempts started so far."""
        return self._attempts

    @property
    def errors(self) -> tuple[BaseException, ...]:
        """One error per failed attempt, oldest first."""
        extras = self._extras
        return () if extras is None or extras.errors is None else tuple(extras.errors)

    def done(self) -> bool:
        """True once the task succeeded, failed for good, or was cancelled."""
        return self._state in _FINISHED

    def running(self) -> bool:
        """True while an attempt runs (not while waiting for a retry)."""
        return self._state is TaskState.RUNNING

    def cancelled(self) -> bool:
        return self._state is TaskState.CANCELLED

    def _extras_locked(self) -> _Extras:
        """`_extras`, made if need be. Call with the owner's lock held."""
        extras = self._extras
        if extras is None:
            extras = self._extras = _Extras()
        return extras

    # -- waiting ---------------------------------------------------------------

    def _wait(self, timeout: float | None) -> None:
        if self._state in _FINISHED:
            return
        limit = None if timeout is None else min(seconds(timeout, "timeout"), threading.TIMEOUT_MAX)
        with self._owner._lock:
            if self._state in _FINISHED:
                return
            extras = self._extras_locked()
            waiter = extras.waiter
            if waiter is None:
                waiter = extras.waiter = threading.Event()
        if not waiter.wait(limit) and self._state not in _FINISHED:
            raise TimeoutError(f"{self!r} did not finish within {timeout} seconds")

    def result(self, timeout: float | None = None) -> T:
        """The task's return value, waiting up to `timeout` seconds for it.

        Raises `TimeoutError` if it is not done in time, the `TaskError` of a task
        that failed for good (or the `BaseException` that ended it), and
        `concurrent.futures.CancelledError` if it was cancelled.
        """
        self._wait(timeout)
        state = self._state
        if state is TaskState.SUCCEEDED:
            return self._value  # type: ignore[no-any-return]
        if state is TaskState.CANCELLED:
            raise concurrent.futures.CancelledError()
        raise self._value

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The final error (None on success), waiting up to `timeout` seconds.

        Raises `TimeoutError` and `concurrent.futures.CancelledError` as `result` does.
        """
        self._wait(timeout)
        state = self._state
        if state is TaskState.CANCELLED:
            raise concurrent.futures.CancelledError()
        return self._value if state is TaskState.FAILED else None

    def add_done_callback(self, fn: Callable[[TaskHandler[T]], object]) -> None:
        """Call `fn(handler)` once the task is done; at once if it already is.

        Callbacks run in the thread that finishes the task (or the calling thread),
        with no lock held, in the order they were added. One that raises is logged
        and does not stop the others.
        """
        if not callable(fn):
            raise TypeError(f"a done callback must be callable, not {fn!r}")
        with self._owner._lock:
            if self._state not in _FINISHED:
                extras = self._extras_locked()
                if extras.callbacks is None:
                    extras.callbacks = []
                extras.callbacks.append(fn)
                return
        self._run_callback(fn)

    def _fire(self, extras: _Extras | None) -> None:
        """Wake the waiters and run the callbacks of a handler that just finished.

        Called once, by the thread that settled the handler, after the lock is
        released, with the `_extras` it read while settling.
        """
        if extras is None:
            return
        if extras.waiter is not None:
            extras.waiter.set()
        callbacks, extras.callbacks = extras.callbacks, None  # they hold the handler
        if callbacks:
            for fn in callbacks:
                self._run_callback(fn)

    def _run_callback(self, fn: Callable[[TaskHandler[T]], object]) -> None:
        try:
            fn(self)
        except BaseException as exc:  # as concurrent.futures: log, never raise
            self._owner._log.error(
                "done callback raised", task_id=self.id, task=self.name, error=describe(exc)
            )

    def as_future(self) -> concurrent.futures.Future[T]:
        """A new `concurrent.futures.Future` that settles when this handler does.

        For `concurrent.futures.wait`, `as_completed` and `asyncio.wrap_future`. It
        is RUNNING from the start of the task's first attempt, so, as with an
        executor's future, `cancel()` succeeds (and cancels the task) only before
        that; cancelling it afterwards returns False. A future cancelled by its
        holder is reported done by `wait` and `as_completed` at once.
        """
        return self._future(linked=True)

    def _future(self, *, linked: bool) -> concurrent.futures.Future[T]:
        """`as_future`; with `linked` false, cancelling the future leaves the task alone
        (for `await`, whose awaiter may give up without cancelling the task)."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._owner._lock:
            state = self._state
            if state not in _FINISHED:
                if self._attempts == 0 and state in (TaskState.PENDING, TaskState.SCHEDULED):
                    # Pending: whoever takes it out of `futures` under the lock (the first
                    # attempt, or its holder's cancel) calls set_running_or_notify_cancel.
                    extras = self._extras_locked()
                    if extras.futures is None:
                        extras.futures = []
                    extras.futures.append(future)
                else:
                    future.set_running_or_notify_cancel()
        if state is TaskState.CANCELLED:
            future.cancel()
            future.set_running_or_notify_cancel()
            return future
        if state in _FINISHED:
            _settle_future(future, self)
            return future

        def propagate(f: concurrent.futures.Future[T]) -> None:
            if not f.cancelled():
                return
            with self._owner._lock:
                extras = self._extras
                mine = extras is not None and extras.futures is not None and f in extras.futures
                if mine:
                    extras.futures.remove(f)  # type: ignore[union-attr]
            if mine:
                f.set_running_or_notify_cancel()  # CANCELLED_AND_NOTIFIED: wait() sees it
            if linked:
                self.cancel()

        future.add_done_callback(propagate)
        self.add_done_callback(lambda handler: _settle_future(future, self))
        return future

    def _start_futures_locked(self) -> bool:
        """Mark the futures of `as_future` running as the first attempt starts;
        False if one was cancelled meanwhile (its callback cancels the task)."""
        extras = self._extras
        if extras is None or extras.futures is None:
            return True
        futures, extras.futures = extras.futures, None
        started = [f.set_running_or_notify_cancel() for f in futures]
        return all(started)

    # -- acting ----------------------------------------------------------------

    def cancel(self) -> bool:
        """Cancel the task; True if it will never run (again), False otherwise.

        A queued, delayed, scheduled or retry-waiting task is removed and never runs:
        True (also when it was already cancelled). A running task has its context
        cancelled and is not retried: False; it ends CANCELLED if that attempt
        raises, SUCCEEDED if it returns anyway. A finished task: False.
        """
        return self._owner._cancel(self)

    def exec(self) -> None:
        """Run one attempt now, in the calling thread: what a worker does.

        Does nothing unless the task is pending (a cancelled, running or finished
        task is left alone). A failure with retries left goes to the scheduler.
        """
        self._owner._execute(self)

    def _parent_done(self, ctx: Context) -> None:
        """The ``context=`` option's context ended: the task is cancelled with it."""
        self.cancel()


def _settle_future(future: concurrent.futures.Future[T], handler: MemoryHandler[T]) -> None:
    """Give `future` the outcome of the finished `handler` (unless it has one)."""
    if future.done():
        return
    state = handler._state
    if state is TaskState.CANCELLED:
        if not future.cancel():  # already running: report the cancellation as its outcome
            future.set_exception(concurrent.futures.CancelledError())
        return  # a pending future: its propagate callback notified its waiters
    if not future.running() and not future.set_running_or_notify_cancel():
        return
    if state is TaskState.SUCCEEDED:
        future.set_result(handler._value)
    else:
        future.set_exception(handler._value)
