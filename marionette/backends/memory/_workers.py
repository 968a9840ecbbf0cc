"""The in-memory backend's workers: the worker loop, and each attempt's outcome.

`workers` threads block on the run's bounded queue (`take_locked`) and leave on a
``None`` sentinel. An attempt starts (`_begin_locked`: gates, context, RUNNING) and
its success is settled in the same critical section that takes the next task; a
failure is decided with the task's tenacity strategies (`retry_delay`) and goes to
the scheduler with its backoff, or settles the task for good. No worker sleeps.
Cancellation (`_cancel`) and settling (`_settle_locked`, the one place a handler
settles) live here too. All of it under the manager's lock (see `_core`).
"""

from __future__ import annotations

import time
from typing import Any

from marionette import _threads
from marionette._log import DEBUG
from marionette._queue import TaskQueue
from marionette.backends.memory.handler import MemoryHandler, _Extras
from marionette.context import Context, attempt_context
from marionette.errors import Cancelled, DeadlineExceeded, TaskError, describe
from marionette.events import TaskEventKind
from marionette.handler import TaskState, retry_delay

from ._reactive import Reactive

__all__ = ["Workers"]

_PENDING = TaskState.PENDING
_SCHEDULED = TaskState.SCHEDULED
_RUNNING = TaskState.RUNNING
_SUCCEEDED = TaskState.SUCCEEDED
_Kind = TaskEventKind
_SETTLED = {
    TaskState.SUCCEEDED: _Kind.SUCCEEDED,
    TaskState.FAILED: _Kind.FAILED,
    TaskState.CANCELLED: _Kind.CANCELLED,
}

# Returned by _begin_locked for a task whose ``context=`` ended before it started.
PARENT_DONE = Context()

# An attempt that returned a value: (handler, its attempt's context, the value).
_Success = tuple[MemoryHandler[Any], Context, Any]


class Workers(Reactive):
    """The worker loop and attempt outcomes of an in-memory manager."""

    def _serve(self, q: TaskQueue) -> None:
        """The worker loop, until it takes a stop signal.

        A success is settled in the same critical section that takes the next task
        (one lock round trip per task instead of two) unless the queue is empty:
        then it is settled, and its waiters woken, before this worker waits.
        """
        acquire, release = self._lock.acquire, self._lock.release
        begin, run, events = self._begin_locked, self._run, self._events
        items, debug = q.queue, self._log.enabled
        done: _Success | None = None
        extras: _Extras | None = None
        while True:
            # Reset before this worker may wait: an idle worker must not keep its last
            # task (its callbacks, future or result) alive, as CPython's executor does
            # not (bpo-16284).
            handler: MemoryHandler[Any] | None = None
            ctx: Context | None = None
            # Not `with`: acquire() and release() cost 40% less, and no KeyboardInterrupt
            # can land between acquire() and `try` here: signals go to the main thread.
            acquire()
            try:
                if done is not None:
                    extras = self._succeed_locked(*done)
                take = done is None or bool(items)
                if take:
                    handler = q.take_locked()
                    if handler is not None:
                        ctx = begin(handler)
            finally:
                release()
            if done is not None:
                # Skip the call when there is nothing to announce: the common case.
                if extras is not None or done[1]._parent is not None or debug(DEBUG):
                    self._announce(done[0], done[1], extras)
                done = extras = None
                if events.wanted and events.over():
                    events.wait_for_room()
            if not take:
                continue
            if handler is None:
                return
            if ctx is PARENT_DONE:
                handler.cancel()
            elif ctx is not None:
                done = run(handler, ctx)

    def _execute(self, handler: MemoryHandler[Any]) -> None:
        """`TaskHandler.exec`: run one attempt in the calling thread."""
        with self._lock:
            ctx = self._begin_locked(handler)
            if ctx is not None and ctx is not PARENT_DONE:
                self._foreign += 1
        if ctx is PARENT_DONE:
            handler.cancel()
        elif ctx is not None:
            with _threads.owned(self):  # inside a task now: join() must refuse, etc.
                done = self._run(handler, ctx)
            with self._lock:
                self._foreign -= 1
                extras = self._succeed_locked(*done) if done is not None else None
            if done is not None:
                self._announce(handler, ctx, extras)

    def _begin_locked(self, handler: MemoryHandler[Any]) -> Context | None:
        """Start an attempt of a pending `handler`: its context, or None to skip it.

        None too when a gate parks it. Returns `PARENT_DONE`, leaving the handler
        pending, when the ``context=`` it runs under has ended: the caller cancels
        it once the lock is released.
        """
        if handler._state is not _PENDING:
            return None  # cancelled while queued, or run by exec() meanwhile
        opts = handler._opts
        parent = opts.context
        if parent is not None and (
            parent._err is not None
            or (parent._deadline is not None and parent._deadline <= time.monotonic())
        ):
            return PARENT_DONE
        if opts.gated and (handler in self._parked or not self._pass_gates_locked(handler, opts)):
            return None
        if handler._extras is not None and not handler._start_futures_locked():
            # Its future was cancelled this instant; that cancels the task. Give
            # back what the gates granted, as an attempt that ended would.
            if opts.gated:
                self._ungate_locked(handler, final=True)
            return None
        if handler._submitted_at is None:  # exec() of a handler never submitted
            self._count_locked(handler, _PENDING)
        deadline = None if opts.timeout is None else time.monotonic() + opts.timeout
        attempt = handler._attempts = handler._attempts + 1
        ctx = handler._ctx = attempt_context(parent, deadline, handler, attempt)
        handler._state = _RUNNING
        self._running.add(handler)
        if ctx._deadline is not None:
            self._scheduler._push_locked(ctx, ctx._deadline, False)
        if self._events.wanted:
            self._emit_locked(_Kind.STARTED, handler)
        return ctx

    def _run(self, handler: MemoryHandler[Any], ctx: Context) -> _Success | None:
        """Run the attempt `_begin_locked` started.

        A failure is handled here (retry or settle). A success is returned for the
        caller to settle with `_succeed_locked` and then `_announce`.
        """
        try:
            value = handler._fn(ctx)
        except BaseException as exc:
            self._attempt_failed(handler, ctx, exc)
            return None
        if ctx._deadline is not None:
            if time.monotonic() >= ctx._deadline:
                late = DeadlineExceeded(f"attempt {ctx.attempt} returned after its deadline")
                self._attempt_failed(handler, ctx, late)
                return None
            self._scheduler.cancel(ctx)
        return handler, ctx, value

    def _succeed_locked(
        self, handler: MemoryHandler[Any], ctx: Context, value: Any
    ) -> _Extras | None:
        """Settle a success (the attempt ended); returns what `_announce` needs once
        the lock is released."""
        self._running.discard(handler)
        handler._ctx = None
        self._succeeded += 1
        self._settle_locked(handler, _SUCCEEDED, value)
        return handler._extras

    def _announce(self, handler: MemoryHandler[Any], ctx: Context, extras: _Extras | None) -> None:
        """After a success is settled and the lock released: log, wake, call back."""
        if ctx._parent is not None:
            ctx._detach()
        log = self._log
        if log.enabled(DEBUG):
            log.debug("task completed", task_id=handler.id, task=handler.name, attempt=ctx.attempt)
        if extras is not None:
            handler._fire(extras)

    def _attempt_failed(
        self, handler: MemoryHandler[Any], ctx: Context, exc: BaseException
    ) -> None:
        opts = handler._opts
        parent = opts.context
        attempt = handler._attempts
        delay: float | None = None
        cause: Exception | None = None
        stopper: BaseException | None = None  # a strategy raised a BaseException
        if (
            isinstance(exc, Exception)
            and not (handler._extras is not None and handler._extras.cancelling)
            and not (parent is not None and parent.done())
        ):
            assert handler._submitted_at is not None
            try:
                delay = retry_delay(opts, attempt, exc, handler._submitted_at)
            except Exception as strategy_error:  # a broken strategy ends the task, loudly
                cause = strategy_error
            except BaseException as strategy_exit:  # as if the task had raised it itself
                stopper = strategy_exit
        # Built before taking the lock: it formats user exceptions.
        final: BaseException | None = None
        if delay is None:
            if stopper is not None:
                final = stopper
            elif not isinstance(exc, Exception):
                final = exc
            else:
                final = self._task_error(handler, exc)
            if cause is not None:
                final.__cause__ = cause
        with self._lock:
            self._end_attempt_locked(handler, ctx)
            extras = handler._extras_locked()
            if extras.errors is None:
                extras.errors = []
            extras.errors.append(exc)
            cancelled = extras.cancelling or (
                parent is not None and isinstance(parent._err, Cancelled)
            )
            if cancelled:
                self._cancelled += 1
                self._settle_locked(handler, TaskState.CANCELLED, None)
            elif delay is not None:
                handler._state = _SCHEDULED
                handler._due = due = time.monotonic() + delay
                self._retried += 1
                self._scheduled += 1
                self._scheduler._push_locked(handler, due, False)
                if opts.gated:
                    self._ungate_locked(handler, final=False)
                if self._events.wanted:
                    self._emit_locked(_Kind.RETRYING, handler, error=exc)
            else:
                self._failed += 1
                self._settle_locked(handler, TaskState.FAILED, final)
        ctx._detach()
        log = self._log
        if not cancelled and delay is not None:
            log.warning(
                "task failed, retrying",
                task_id=handler.id,
                task=handler.name,
                attempt=attempt,
                retry_in=round(delay, 3),
                error=describe(exc),
            )
            return
        if cancelled:
            if log.enabled(DEBUG):
                log.debug("task cancelled", task_id=handler.id, task=handler.name, attempt=attempt)
        elif isinstance(final, TaskError):
            if cause is not None:
                log.error("retry strategy raised", task_id=handler.id, error=describe(cause))
            log.error("task failed for good", attempt=attempt, **final.dict())
        elif final is not None:
            log.error(
                "task failed for good",
                task_id=handler.id,
                task=handler.name,
                attempt=attempt,
                error=describe(final),
            )
        handler._fire(extras)

    def _task_error(self, handler: MemoryHandler[Any], last: Exception) -> TaskError:
        """The final error of a task whose attempt just failed with `last`."""
        assert handler._submitted_at is not None
        return TaskError.build(
            [*(e for e in handler.errors if isinstance(e, Exception)), last],
            attempts=handler._attempts,
            duration=time.monotonic() - handler._submitted_at,
            error=handler._opts.error,
            task_id=handler.id,
            task_name=handler.name,
        )

    def _end_attempt_locked(self, handler: MemoryHandler[Any], ctx: Context) -> None:
        self._running.discard(handler)
        handler._ctx = None
        if ctx._deadline is not None:
            self._scheduler._cancel_locked(ctx)

    def _settle_locked(self, handler: MemoryHandler[Any], state: TaskState, value: Any) -> None:
        """Finish `handler` (succeeded, failed or cancelled): the one place a handler
        settles. The caller then fires `handler._extras` once unlocked."""
        was = handler._state
        handler._state = state
        handler._value = value
        if handler._submitted_at is None:
            return  # wrapped and cancelled before any submission: nothing counted
        self._active -= 1
        if self._active == 0 and self._joiners:
            self._changed.notify_all()
        opts = handler._opts
        if opts.context is not None:
            opts.context._forget(handler)
        if opts.gated:
            if was is _RUNNING:
                self._ungate_locked(handler, final=True)
            else:
                self._forget_waiting_locked(handler)
        if self._events.wanted:
            failed = state is TaskState.FAILED
            self._emit_locked(
                _SETTLED[state],
                handler,
                error=value if failed else None,
                result=value if state is TaskState.SUCCEEDED else None,
            )

    def _cancel(self, handler: MemoryHandler[Any]) -> bool:
        """`TaskHandler.cancel`: see there."""
        with self._lock:
            state = handler._state
            if state is TaskState.CANCELLED:
                return True
            if state is _RUNNING:
                handler._extras_locked().cancelling = True
                ctx = handler._ctx
            elif state is _PENDING or state is _SCHEDULED:
                if state is _SCHEDULED:
                    self._scheduler._cancel_locked(handler)
                    if handler._submitted_at is not None:
                        self._scheduled -= 1
                if handler._submitted_at is not None:
                    self._cancelled += 1
                self._settle_locked(handler, TaskState.CANCELLED, None)
                extras = handler._extras
                ctx = None
            else:
                return False
        if state is _RUNNING:
            if ctx is not None:
                ctx.cancel()
            return False
        log = self._log
        if log.enabled(DEBUG):
            log.debug("task cancelled", task_id=handler.id, task=handler.name)
        handler._fire(extras)
        return True
