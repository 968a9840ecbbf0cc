"""TaskManager: the task queue, the worker threads, the lifecycle, every transition.

Threads. `workers` threads (``marionette-worker-N``) block on a bounded task queue
and leave on a ``None`` sentinel; the scheduler thread (``marionette-scheduler``)
puts due tasks and retries back into that queue. Nothing polls. A failed attempt
with retries left goes to the scheduler with its backoff: no worker ever sleeps.

The queue. External producers get back pressure: `queue()` blocks while the queue
is full (or raises `QueueFull` with ``block=False``). The manager's own threads
(workers, so tasks submitting tasks, and the scheduler) never block on it: their
puts pass the bound, which is what makes a task that submits into a full queue
unable to deadlock the manager. Each run (`start()` to `stop()`) has its own queue;
`stop()` closes it, so a put that was blocked on it can never land in a dead queue.

Locking. `TaskManager._lock` guards the lifecycle state, the current queue and
threads, the kept tasks, the counters, the running set, and the state of every
handler this manager made (handlers have no lock of their own). `_changed`, a
Condition on it, signals lifecycle changes and idleness. `_lifecycle` serializes
`start()` with the first phase of `stop()`. Lock order: `_lifecycle` -> `_lock` ->
(scheduler lock | queue mutex | context lock); nothing is ever taken the other way.
No user code (tasks, callbacks, loggers, context callbacks) runs under `_lock`, and
contexts are cancelled only outside it, because a cancellation may run callbacks
that take it.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import queue
import threading
import time
import types
from collections.abc import Callable
from datetime import datetime
from typing import Any

from . import _exit
from ._log import DEBUG, Log
from ._time import aware, seconds
from .config import Config
from .context import Context
from .errors import (
    Cancelled,
    DeadlineExceeded,
    QueueFull,
    TaskError,
    TaskManagerStopped,
    Unschedulable,
    describe,
)
from .handler import TaskHandler, TaskState, default_name, parse_options, retry_delay
from .scheduler import Scheduler

__all__ = ["TaskManager"]

_PENDING = TaskState.PENDING
_SCHEDULED = TaskState.SCHEDULED
_RUNNING = TaskState.RUNNING

_CONFIG_FIELDS = frozenset(f.name for f in dataclasses.fields(Config))

# `owner` is set on the threads a manager runs: such a thread must never block on a
# full queue, and must not wait for the work it is part of (join, stop).
_local = threading.local()


def _current_owner() -> object:
    return getattr(_local, "owner", None)


class _Lifecycle(enum.Enum):
    STOPPED = "stopped"
    RUNNING = "running"
    STOPPING = "stopping"


class _TaskQueue(queue.Queue[TaskHandler | None]):
    """The bounded task queue of one run, with what `queue.Queue` lacks for it.

    `offer` never blocks, `force` passes the bound (for the manager's own threads),
    `put_blocking` gives up when the queue is closed, and `close` takes every task
    out for safekeeping. All of it under the queue's own mutex, as `queue.Queue` does.
    """

    def __init__(self, maxsize: int) -> None:
        super().__init__(maxsize)
        self.closed = False

    def offer(self, item: TaskHandler) -> bool:
        with self.mutex:
            if self._qsize() >= self.maxsize:
                return False
            self._put(item)
            self.not_empty.notify()
            return True

    def force(self, item: TaskHandler | None) -> None:
        with self.mutex:
            self._put(item)
            self.not_empty.notify()

    def put_blocking(self, item: TaskHandler) -> bool:
        """Wait for room and put; False (nothing put) once the queue is closed."""
        with self.not_full:
            while not self.closed and self._qsize() >= self.maxsize:
                self.not_full.wait()
            if self.closed:
                return False
            self._put(item)
            self.not_empty.notify()
            return True

    def close(self, sentinels: int) -> list[TaskHandler]:
        """Take every task out, leave `sentinels` stop signals, refuse further puts."""
        with self.mutex:
            self.closed = True
            tasks = [item for item in self.queue if item is not None]
            self.queue.clear()
            self.queue.extend([None] * sentinels)
            self.not_empty.notify_all()
            self.not_full.notify_all()
        return tasks

    def snapshot(self) -> list[TaskHandler]:
        with self.mutex:
            return [item for item in self.queue if item is not None]


def _callable_of(task: object) -> Callable[[Context], Any]:
    """What a worker calls: `task.do` for a `Task` object, else the callable itself."""
    if type(task) is types.FunctionType or type(task) is types.MethodType:
        return task
    do = getattr(task, "do", None)
    if callable(do):
        return do  # type: ignore[no-any-return]
    if callable(task):
        return task
    raise TypeError(f"a task must be callable as fn(ctx) or have a do(ctx) method, not {task!r}")


class TaskManager:
    """Runs tasks on a fixed pool of worker threads, now, later, or again on failure.

    `start()` it, submit with `queue` / `delay` / `schedule`, and `stop()` it (or use
    ``with TaskManager(...) as tm:``). Every method may be called from any thread,
    including from inside a task; which ones block is said on each.
    """

    def __init__(self, config: Config | None = None, **overrides: Any) -> None:
        if config is None:
            config = Config()
        elif not isinstance(config, Config):
            raise TypeError(f"config must be a marionette.Config, not {config!r}")
        if overrides:
            unknown = overrides.keys() - _CONFIG_FIELDS
            if unknown:
                raise TypeError(f"unknown Config field(s): {', '.join(sorted(unknown))}")
            config = dataclasses.replace(config, **overrides)
        self._config = config
        self._log = Log(config.logger).bind(server=config.server_name)
        self._lifecycle = threading.Lock()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._state = _Lifecycle.STOPPED
        self._queue: _TaskQueue | None = None
        self._threads: list[threading.Thread] = []
        # Pending tasks between runs: queued when a stop timed out, or put back by a
        # worker of a run that was stopped under it. Requeued first by start().
        self._kept: collections.deque[TaskHandler] = collections.deque()
        self._running: set[TaskHandler] = set()
        self._active = 0  # submitted and not finished: what join() waits for
        self._joiners = 0
        self._submitted = self._succeeded = self._failed = 0
        self._retried = self._cancelled = 0
        self._scheduler: Scheduler[TaskHandler | Context] = Scheduler(self._on_due, self._log)

    # -- properties --------------------------------------------------------------

    @property
    def config(self) -> Config:
        return self._config

    @property
    def scheduler(self) -> Scheduler[Any]:
        """The manager's scheduler (delayed tasks, retries, deadline watches)."""
        return self._scheduler

    def is_running(self) -> bool:
        return self._state is _Lifecycle.RUNNING

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        """Start the workers and the scheduler; a no-op when running.

        A stopped manager starts again with the tasks its last stop kept, queued
        ones first. While another thread is stopping it, waits for that stop.
        """
        with self._lifecycle:
            with self._lock:
                if self._state is _Lifecycle.RUNNING:
                    return
                while self._state is _Lifecycle.STOPPING:
                    if _current_owner() is self:
                        raise RuntimeError("start() from inside a task while stop() runs")
                    self._changed.wait()
                q = _TaskQueue(self._config.queue_size)
                while self._kept:
                    handler = self._kept.popleft()
                    if handler._state is _PENDING:
                        q.force(handler)
                threads = [
                    threading.Thread(target=self._work, args=(q,), name=f"marionette-worker-{n}")
                    for n in range(1, self._config.workers + 1)
                ]
                self._queue, self._threads = q, threads
                self._state = _Lifecycle.RUNNING
                self._changed.notify_all()
            for thread in threads:
                thread.start()
            self._scheduler.start()
        _exit.track(self)
        self._log.info(
            "task manager started",
            workers=self._config.workers,
            queue_size=self._config.queue_size,
        )

    def stop(self, timeout: float | None = None) -> None:
        """Stop gracefully; from its first instant, new submissions raise.

        Stops the scheduler, lets the workers finish every queued and running task,
        and returns when they have. Delayed and scheduled tasks not yet due, and
        retries waiting for their backoff, are kept for the next `start()`. With a
        `timeout` (seconds or `timedelta`) that expires, the contexts of running
        tasks are cancelled, the tasks still queued are kept for the next `start()`,
        and it returns; a task that ignores its context runs on in its thread.
        A no-op when not running; while another thread stops it, waits for that.
        From inside a task it does not wait for the calling task (it cannot): tasks
        that only the calling worker could still have run are kept.
        """
        limit = None if timeout is None else seconds(timeout, "timeout", allow_negative=False)
        deadline = None if limit is None else time.monotonic() + limit
        inside = _current_owner() is self
        with self._lifecycle:
            with self._lock:
                state = self._state
                if state is _Lifecycle.RUNNING:
                    self._state = _Lifecycle.STOPPING
                    q, threads = self._queue, self._threads
            if state is _Lifecycle.RUNNING:
                assert q is not None
                self._scheduler.stop()
                for _ in threads:
                    q.force(None)
        if state is _Lifecycle.STOPPED:
            return
        if state is _Lifecycle.STOPPING:
            if not inside:
                with self._lock:
                    self._changed.wait_for(
                        lambda: self._state is not _Lifecycle.STOPPING, _remaining(deadline)
                    )
            return
        assert q is not None
        me = threading.current_thread()
        for thread in threads:
            if thread is not me:
                thread.join(_remaining(deadline))
        abandoned = any(t.is_alive() for t in threads if t is not me)
        leftover = q.close(sentinels=len(threads))
        with self._lock:
            self._kept.extend(h for h in leftover if h._state is _PENDING)
            running = [h._ctx for h in self._running if h._ctx is not None] if abandoned else []
            self._queue, self._threads = None, []
            self._state = _Lifecycle.STOPPED
            self._changed.notify_all()
        for ctx in running:
            ctx.cancel()
        _exit.untrack(self)
        self._log.info("task manager stopped", kept=len(leftover), abandoned=len(running))

    def __enter__(self) -> TaskManager:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def join(self, timeout: float | None = None) -> bool:
        """Block until no task is queued, running, delayed or waiting for a retry.

        Returns False if `timeout` seconds pass first. From inside a task it raises
        `RuntimeError`: it would wait for itself. On a stopped manager that kept
        tasks, it waits for a `start()` to run them.
        """
        if _current_owner() is self:
            raise RuntimeError("join() from inside a task would wait for that task itself")
        limit = None if timeout is None else min(seconds(timeout, "timeout"), threading.TIMEOUT_MAX)
        with self._lock:
            self._joiners += 1
            try:
                return self._changed.wait_for(lambda: self._active == 0, limit)
            finally:
                self._joiners -= 1

    # -- submission --------------------------------------------------------------

    def wrap_task(self, task: Any, **opts: Any) -> TaskHandler:
        """Wrap `task` in a pending handler without submitting it.

        `wrap_task(handler)` returns the same handler; options cannot be given with
        one (`TypeError`). A task is a callable ``fn(ctx)`` or an object with a
        ``do(ctx)`` method; anything else raises `TypeError`.
        """
        if isinstance(task, TaskHandler):
            if opts:
                raise TypeError(f"options cannot be changed on an existing TaskHandler: {task!r}")
            if task._owner is not self:
                raise ValueError(f"{task!r} belongs to another TaskManager")
            return task
        fn = _callable_of(task)
        options, name = parse_options(opts)
        return TaskHandler(self, fn, options, name or default_name(task))

    def queue(self, task: Any, *, block: bool = True, **opts: Any) -> TaskHandler:
        """Run `task` as soon as a worker is free; returns its handler.

        Blocks while the queue is full (back pressure); with ``block=False`` raises
        `QueueFull` instead. From inside a task it never blocks. Raises
        `TaskManagerStopped` unless running.
        """
        if block is not True and block is not False:
            raise TypeError(f"block must be a bool, not {block!r}")
        handler = self.wrap_task(task, **opts)
        waiting = False
        with self._lock:
            if not self._admit_locked(handler):
                return handler
            q = self._queue
            assert q is not None
            if not q.offer(handler):
                if _current_owner() is not None:
                    q.force(handler)
                elif not block:
                    raise QueueFull(f"the task queue is full ({q.maxsize} tasks)")
                else:
                    waiting = True
            self._count_locked(handler, _PENDING)
        if waiting and not q.put_blocking(handler):
            with self._lock:  # the run ended while we waited: keep it for the next one
                self._enqueue_locked(handler)
        self._check_parent(handler)
        return handler

    def delay(self, delay: float, task: Any, **opts: Any) -> TaskHandler:
        """Run `task` on or after `delay` seconds (or a `timedelta`) from now.

        A negative delay means now; NaN or infinity raise `Unschedulable`, None or a
        non-number `TypeError`. Any finite delay is accepted. Never blocks.
        """
        seconds(delay, "delay", error=Unschedulable)
        handler = self.wrap_task(task, **opts)
        with self._lock:
            if self._admit_locked(handler):
                self._count_locked(handler, _SCHEDULED)
                self._scheduler.delay(delay, handler)
        self._check_parent(handler)
        return handler

    def schedule(self, at: datetime, task: Any, **opts: Any) -> TaskHandler:
        """Run `task` on or after the aware `datetime` `at`; a past time means now.

        None, `datetime.min` or a naive datetime raise `Unschedulable`; a
        non-datetime raises `TypeError`. Never blocks.
        """
        aware(at)
        handler = self.wrap_task(task, **opts)
        with self._lock:
            if self._admit_locked(handler):
                self._count_locked(handler, _SCHEDULED)
                self._scheduler.schedule(at, handler)
        self._check_parent(handler)
        return handler

    def _admit_locked(self, handler: TaskHandler) -> bool:
        """May `handler` be submitted now? False for a wrapped handler cancelled
        before its submission (it is returned as it is)."""
        if self._state is not _Lifecycle.RUNNING:
            raise TaskManagerStopped()
        if handler._submitted_at is None:
            if handler._state is _PENDING:
                return True
            if handler._state is TaskState.CANCELLED:
                return False
        raise ValueError(f"{handler!r} was already submitted: a handler runs once")

    def _count_locked(self, handler: TaskHandler, state: TaskState) -> None:
        handler._submitted_at = time.monotonic()
        handler._state = state
        self._active += 1
        self._submitted += 1
        parent = handler._opts.context
        if parent is not None:
            parent._on_done(handler, handler._parent_done)

    def _check_parent(self, handler: TaskHandler) -> None:
        """A task submitted under a context that is already done is cancelled."""
        parent = handler._opts.context
        if parent is not None and parent.done():
            handler.cancel()

    def _enqueue_locked(self, handler: TaskHandler) -> None:
        """Queue a due task from inside the manager: never blocks, never lost."""
        q = self._queue
        if q is None or q.closed:
            self._kept.append(handler)
        else:
            q.force(handler)

    # -- the scheduler's side ----------------------------------------------------

    def _on_due(self, item: TaskHandler | Context) -> None:
        """Called by the scheduler thread for each due item."""
        if isinstance(item, Context):
            self._overrun(item)
            return
        with self._lock:
            if item._state is _SCHEDULED:
                item._state = _PENDING
                self._enqueue_locked(item)

    def _overrun(self, ctx: Context) -> None:
        """An attempt's deadline passed: report it once if that attempt still runs."""
        handler = ctx._task
        if handler is not None and handler._ctx is ctx:
            self._log.warning(
                "task still running past its deadline",
                task_id=handler.id,
                task=handler.name,
                attempt=ctx.attempt,
            )

    # -- the workers' side -------------------------------------------------------

    def _work(self, q: _TaskQueue) -> None:
        _local.owner = self
        get, execute = q.get, self._execute
        while (handler := get()) is not None:
            try:
                execute(handler, q)
            except BaseException as exc:  # a worker outlives anything, even our bugs
                self._log.error("worker error", task_id=handler.id, error=repr(exc))

    def _execute(self, handler: TaskHandler, q: object) -> None:
        """Run one attempt of `handler` in this thread, then settle or retry it."""
        opts = handler._opts
        parent = opts.context
        if parent is not None and parent.done():
            handler.cancel()
            return
        deadline = None if opts.timeout is None else time.monotonic() + opts.timeout
        with self._lock:
            if handler._state is not _PENDING or (q is not None and q is not self._queue):
                if handler._state is _PENDING:  # its run was stopped under it: keep it
                    self._kept.appendleft(handler)
                return
            if handler._submitted_at is None:  # exec() of a handler never submitted
                self._count_locked(handler, _PENDING)
            attempt = handler._attempts = handler._attempts + 1
            ctx = handler._ctx = (parent or Context._background)._child(deadline, handler, attempt)
            handler._state = _RUNNING
            self._running.add(handler)
            if ctx._deadline is not None:
                self._scheduler.delay(ctx._deadline - time.monotonic(), ctx)
        try:
            value = handler._fn(ctx)
        except BaseException as exc:
            self._attempt_failed(handler, ctx, exc)
            return
        if ctx._deadline is not None and time.monotonic() >= ctx._deadline:
            late = DeadlineExceeded(f"attempt {attempt} returned after its deadline")
            self._attempt_failed(handler, ctx, late)
            return
        with self._lock:
            self._end_attempt_locked(handler, ctx)
            self._succeeded += 1
            waiter, callbacks = self._settle_locked(handler, TaskState.SUCCEEDED, value)
        ctx._detach()
        handler._fire(waiter, callbacks)
        log = self._log
        if log.enabled(DEBUG):
            log.debug("task completed", task_id=handler.id, task=handler.name, attempt=attempt)

    def _attempt_failed(self, handler: TaskHandler, ctx: Context, exc: BaseException) -> None:
        opts = handler._opts
        parent = opts.context
        if handler._errors is None:
            handler._errors = []
        handler._errors.append(exc)
        attempt = handler._attempts
        delay: float | None = None
        cause: Exception | None = None
        if (
            isinstance(exc, Exception)
            and not handler._cancelling
            and not (parent is not None and parent.done())
        ):
            assert handler._submitted_at is not None
            try:
                delay = retry_delay(opts, attempt, exc, handler._submitted_at)
            except Exception as strategy_error:  # a broken strategy ends the task, loudly
                cause = strategy_error
        # Built before taking the lock: it formats user exceptions.
        final: BaseException | None = None
        if delay is None:
            final = exc if not isinstance(exc, Exception) else self._task_error(handler)
            if cause is not None:
                final.__cause__ = cause
        with self._lock:
            self._end_attempt_locked(handler, ctx)
            cancelled = handler._cancelling or (
                parent is not None and isinstance(parent._err, Cancelled)
            )
            if cancelled:
                self._cancelled += 1
                waiter, callbacks = self._settle_locked(handler, TaskState.CANCELLED, None)
            elif delay is not None:
                handler._state = _SCHEDULED
                self._retried += 1
                self._scheduler.delay(delay, handler)
            else:
                self._failed += 1
                waiter, callbacks = self._settle_locked(handler, TaskState.FAILED, final)
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
        handler._fire(waiter, callbacks)
        if cancelled:
            if log.enabled(DEBUG):
                log.debug("task cancelled", task_id=handler.id, task=handler.name, attempt=attempt)
        elif isinstance(final, TaskError):
            if cause is not None:
                log.error("retry strategy raised", task_id=handler.id, error=describe(cause))
            log.error("task failed for good", attempt=attempt, **final.dict())
        else:
            log.error(
                "task failed for good",
                task_id=handler.id,
                task=handler.name,
                attempt=attempt,
                error=describe(exc),
            )

    def _task_error(self, handler: TaskHandler) -> TaskError:
        assert handler._submitted_at is not None
        return TaskError.build(
            [e for e in handler.errors if isinstance(e, Exception)],
            attempts=handler._attempts,
            duration=time.monotonic() - handler._submitted_at,
            error=handler._opts.error,
            task_id=handler.id,
            task_name=handler.name,
        )

    def _end_attempt_locked(self, handler: TaskHandler, ctx: Context) -> None:
        self._running.discard(handler)
        handler._ctx = None
        if ctx._deadline is not None:
            self._scheduler.cancel(ctx)

    def _settle_locked(
        self, handler: TaskHandler, state: TaskState, value: Any
    ) -> tuple[threading.Event | None, list[Callable[[TaskHandler], object]] | None]:
        """Finish `handler`; the caller fires what this returns once unlocked."""
        handler._state = state
        handler._value = value
        if handler._submitted_at is not None:
            self._active -= 1
            if self._active == 0 and self._joiners:
                self._changed.notify_all()
            parent = handler._opts.context
            if parent is not None:
                parent._forget(handler)
        return handler._waiter, handler._callbacks

    def _cancel(self, handler: TaskHandler) -> bool:
        """`TaskHandler.cancel`: see there."""
        with self._lock:
            state = handler._state
            if state is TaskState.CANCELLED:
                return True
            if state is _RUNNING:
                handler._cancelling = True
                ctx = handler._ctx
            elif state is _PENDING or state is _SCHEDULED:
                if state is _SCHEDULED:
                    self._scheduler.cancel(handler)
                if handler._submitted_at is not None:
                    self._cancelled += 1
                waiter, callbacks = self._settle_locked(handler, TaskState.CANCELLED, None)
                ctx = None
            else:
                return False
        if state is _RUNNING:
            if ctx is not None:
                ctx.cancel()
            return False
        handler._fire(waiter, callbacks)
        log = self._log
        if log.enabled(DEBUG):
            log.debug("task cancelled", task_id=handler.id, task=handler.name)
        return True

    def __repr__(self) -> str:
        return f"<TaskManager {self._config.server_name} {self._state.value}>"


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())
