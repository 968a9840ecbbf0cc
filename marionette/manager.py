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

Locking. One lock per manager, `TaskManager._lock`, guards everything shared: the
lifecycle state, the current queue (it is the queue's own mutex, so a submission,
or a worker's take-and-start, is one critical section), the threads, the kept
tasks, the counters, the running set, and the state of every handler this manager
made (handlers have no lock of their own). `_changed`, a Condition on it, signals
lifecycle changes and idleness. `_lifecycle` serializes `start()` with the first
phase of `stop()`. Lock order: `_lifecycle` -> `_lock` -> (scheduler lock | context
lock); nothing is ever taken the other way. No user code (tasks, callbacks,
loggers, context callbacks) runs under `_lock`, and contexts are cancelled only
outside it, because a cancellation may run callbacks that take it.
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
from .context import Context, attempt_context
from .errors import (
    Cancelled,
    DeadlineExceeded,
    QueueFull,
    TaskError,
    TaskManagerStopped,
    Unschedulable,
    describe,
)
from .handler import (
    DEFAULT_OPTIONS,
    TaskHandler,
    TaskState,
    _Extras,
    default_name,
    parse_options,
    retry_delay,
)
from .scheduler import Scheduler

__all__ = ["TaskManager"]

_PENDING = TaskState.PENDING
_SCHEDULED = TaskState.SCHEDULED
_RUNNING = TaskState.RUNNING

_FUNCTION = types.FunctionType
_CONFIG_FIELDS = frozenset(f.name for f in dataclasses.fields(Config))

# Returned by _begin_locked for a task whose ``context=`` ended before it started.
_PARENT_DONE = Context()

# An attempt that returned a value: (handler, its attempt's context, the value).
_Success = tuple[TaskHandler, Context, Any]

# The threads managers run, by ident, each mapped to its manager: such a thread must
# never block on a full queue, nor wait for the work it is part of (join, stop).
# Each entry is written only by the thread it names (set on entry, removed on
# exit); single-key dict operations are atomic, so readers need no lock.
_owners: dict[int, TaskManager] = {}
_get_ident = threading.get_ident


def _current_owner() -> TaskManager | None:
    return _owners.get(_get_ident())


class _Lifecycle(enum.Enum):
    STOPPED = "stopped"
    RUNNING = "running"
    STOPPING = "stopping"


class _TaskQueue(queue.Queue[TaskHandler | None]):
    """The bounded task queue of one run: a `queue.Queue` on the manager's lock.

    Sharing the lock makes a submission, or a worker's take-and-start, a single
    critical section. The ``*_locked`` methods expect that lock held. Unlike
    `queue.Queue`, they count the threads waiting on each Condition and notify only
    when one waits: `Condition.notify()` probes its lock even when nobody waits,
    which costs about as much as the rest of a put. Idle workers are woken one at a
    time: a put wakes a worker only if no wake-up is already on its way, and a woken
    worker that leaves items behind wakes the next. Waking all of them at once on
    a burst makes them fight the producer for the GIL and costs throughput.
    """

    def __init__(self, maxsize: int, lock: threading.Lock) -> None:
        super().__init__(maxsize)
        self.mutex = lock
        self.not_empty = threading.Condition(lock)
        self.not_full = threading.Condition(lock)
        self.all_tasks_done = threading.Condition(lock)
        self.closed = False
        self._takers = 0  # workers waiting in take_locked()
        self._waking = 0  # of those, notified and not yet running again
        self._putters = 0  # producers waiting in put_blocking()

    def force_locked(self, item: TaskHandler | None) -> None:
        """Put, even past the bound: for the manager's own threads and stop signals."""
        self.queue.append(item)
        if self._takers > self._waking == 0:
            self._waking = 1
            self.not_empty.notify()

    def take_locked(self) -> TaskHandler | None:
        """Wait for the next item: a task, or None for "leave"."""
        items = self.queue
        while not items:
            self._takers += 1
            try:
                self.not_empty.wait()
            finally:
                self._takers -= 1
                if self._waking:
                    self._waking -= 1
        item: TaskHandler | None = items.popleft()
        if items and self._takers > self._waking == 0:
            self._waking = 1  # more to do: pass the wake-up on
            self.not_empty.notify()
        if self._putters:
            self.not_full.notify()
        return item

    def put_blocking(self, item: TaskHandler) -> bool:
        """Wait for room and put; False (nothing put) once the queue is closed.

        Takes the lock itself: called by a producer that holds nothing.
        """
        with self.mutex:
            while not self.closed and len(self.queue) >= self.maxsize:
                self._putters += 1
                try:
                    self.not_full.wait()
                finally:
                    self._putters -= 1
            if self.closed:
                return False
            self.force_locked(item)
            return True

    def close_locked(self, sentinels: int) -> list[TaskHandler]:
        """Take every task out, leave `sentinels` stop signals, refuse further puts."""
        self.closed = True
        tasks = [item for item in self.queue if item is not None]
        self.queue.clear()
        self.queue.extend([None] * sentinels)
        self._waking = self._takers
        self.not_empty.notify_all()
        self.not_full.notify_all()
        return tasks


def _callable_of(task: object) -> Callable[[Context], Any]:
    """What a worker calls: `task.do` for a `Task` object, else the callable itself."""
    if type(task) is _FUNCTION or type(task) is types.MethodType:
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
        # Pending tasks between runs (queued when a stop timed out, or due while
        # stopped); start() queues them first.
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
                q = _TaskQueue(self._config.queue_size, self._lock)
                while self._kept:
                    handler = self._kept.popleft()
                    if handler._state is _PENDING:
                        q.force_locked(handler)
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
                with self._lock:
                    for _ in threads:
                        q.force_locked(None)
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
        with self._lock:
            leftover = q.close_locked(sentinels=len(threads))
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
        if name is None and fn is not task:  # a Task object: named after the object
            name = default_name(task)
        return TaskHandler(self, fn, options, name)

    def queue(self, task: Any, *, block: bool = True, **opts: Any) -> TaskHandler:
        """Run `task` as soon as a worker is free; returns its handler.

        Blocks while the queue is full (back pressure); with ``block=False`` raises
        `QueueFull` instead. From inside a task it never blocks. Raises
        `TaskManagerStopped` unless running.
        """
        if block is not True and block is not False:
            raise TypeError(f"block must be a bool, not {block!r}")
        if opts or type(task) is not _FUNCTION:
            handler = self.wrap_task(task, **opts)
        else:  # the hot path: a plain function and no options
            handler = TaskHandler(self, task, DEFAULT_OPTIONS, None)
        waiting = False
        with self._lock:
            if (
                self._state is not _Lifecycle.RUNNING or handler._submitted_at is not None
            ) and not self._admit_locked(handler):
                return handler
            q = self._queue
            assert q is not None
            if len(q.queue) < q.maxsize or _get_ident() in _owners:
                q.force_locked(handler)
            elif not block:
                raise QueueFull(f"the task queue is full ({q.maxsize} tasks)")
            else:
                waiting = True
            # _count_locked, inlined: this is the hot path
            handler._submitted_at = time.monotonic()
            self._active += 1
            self._submitted += 1
            if handler._opts.context is not None:
                handler._opts.context._on_done(handler, handler._parent_done)
        if waiting and not q.put_blocking(handler):
            with self._lock:  # the run ended while we waited: keep it for the next one
                self._enqueue_locked(handler)
        if handler._opts.context is not None:
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
        # Submitted before, or being run by exec() without a submission.
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
            q.force_locked(handler)

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
        ident = _get_ident()
        _owners[ident] = self
        try:
            while True:
                try:
                    self._serve(q)
                    return
                except BaseException as exc:  # a worker outlives anything, even our bugs
                    self._log.error("worker error", error=repr(exc))
        finally:
            del _owners[ident]

    def _serve(self, q: _TaskQueue) -> None:
        """The worker loop, until it takes a stop signal.

        A success is settled in the same critical section that takes the next task
        (one lock round trip per task instead of two) unless the queue is empty:
        then it is settled, and its waiters woken, before this worker waits.
        """
        lock, begin, run = self._lock, self._begin_locked, self._run
        items = q.queue
        done: _Success | None = None
        while True:
            handler: TaskHandler | None = None
            ctx: Context | None = None
            with lock:
                if done is not None:
                    extras = self._succeed_locked(*done)
                take = done is None or bool(items)
                if take:
                    handler = q.take_locked()
                    if handler is not None:
                        ctx = begin(handler)
            if done is not None:
                self._announce(done[0], done[1], extras)
                done = None
            if not take:
                continue
            if handler is None:
                return
            if ctx is _PARENT_DONE:
                handler.cancel()
            elif ctx is not None:
                done = run(handler, ctx)

    def _execute(self, handler: TaskHandler) -> None:
        """`TaskHandler.exec`: run one attempt in the calling thread."""
        with self._lock:
            ctx = self._begin_locked(handler)
        if ctx is _PARENT_DONE:
            handler.cancel()
        elif ctx is not None:
            done = self._run(handler, ctx)
            if done is not None:
                with self._lock:
                    extras = self._succeed_locked(*done)
                self._announce(handler, ctx, extras)

    def _begin_locked(self, handler: TaskHandler) -> Context | None:
        """Start an attempt of a pending `handler`: its context, or None to skip it.

        Returns `_PARENT_DONE`, leaving the handler pending, when the ``context=``
        it runs under has ended: the caller cancels it once the lock is released.
        """
        if handler._state is not _PENDING:
            return None  # cancelled while queued, or run by exec() meanwhile
        opts = handler._opts
        parent = opts.context
        if parent is not None and (
            parent._err is not None
            or (parent._deadline is not None and parent._deadline <= time.monotonic())
        ):
            return _PARENT_DONE
        if handler._submitted_at is None:  # exec() of a handler never submitted
            self._count_locked(handler, _PENDING)
        deadline = None if opts.timeout is None else time.monotonic() + opts.timeout
        attempt = handler._attempts = handler._attempts + 1
        ctx = handler._ctx = attempt_context(parent, deadline, handler, attempt)
        handler._state = _RUNNING
        self._running.add(handler)
        if ctx._deadline is not None:
            self._scheduler.delay(ctx._deadline - time.monotonic(), ctx)
        return ctx

    def _run(self, handler: TaskHandler, ctx: Context) -> _Success | None:
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

    def _succeed_locked(self, handler: TaskHandler, ctx: Context, value: Any) -> _Extras | None:
        """Settle a success (`_end_attempt_locked` and `_settle_locked`, inlined:
        this is the hot path); returns what `_announce` needs once unlocked."""
        self._running.discard(handler)
        handler._ctx = None
        handler._state = TaskState.SUCCEEDED
        handler._value = value
        self._succeeded += 1
        self._active -= 1
        if self._active == 0 and self._joiners:
            self._changed.notify_all()
        parent = handler._opts.context
        if parent is not None:
            parent._forget(handler)
        return handler._extras

    def _announce(self, handler: TaskHandler, ctx: Context, extras: _Extras | None) -> None:
        """After a success is settled and the lock released: wake, call back, log."""
        if ctx._parent is not None:
            ctx._detach()
        if extras is not None:
            handler._fire(extras)
        log = self._log
        if log.enabled(DEBUG):
            log.debug("task completed", task_id=handler.id, task=handler.name, attempt=ctx.attempt)

    def _attempt_failed(self, handler: TaskHandler, ctx: Context, exc: BaseException) -> None:
        opts = handler._opts
        parent = opts.context
        attempt = handler._attempts
        delay: float | None = None
        cause: Exception | None = None
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
        # Built before taking the lock: it formats user exceptions.
        final: BaseException | None = None
        if delay is None:
            final = exc if not isinstance(exc, Exception) else self._task_error(handler, exc)
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
                self._retried += 1
                self._scheduler.delay(delay, handler)
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
        handler._fire(extras)
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

    def _task_error(self, handler: TaskHandler, last: Exception) -> TaskError:
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

    def _end_attempt_locked(self, handler: TaskHandler, ctx: Context) -> None:
        self._running.discard(handler)
        handler._ctx = None
        if ctx._deadline is not None:
            self._scheduler.cancel(ctx)

    def _settle_locked(self, handler: TaskHandler, state: TaskState, value: Any) -> None:
        """Finish `handler`; the caller then fires `handler._extras` once unlocked."""
        handler._state = state
        handler._value = value
        if handler._submitted_at is not None:
            self._active -= 1
            if self._active == 0 and self._joiners:
                self._changed.notify_all()
            parent = handler._opts.context
            if parent is not None:
                parent._forget(handler)

    def _cancel(self, handler: TaskHandler) -> bool:
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
                    self._scheduler.cancel(handler)
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
        handler._fire(extras)
        log = self._log
        if log.enabled(DEBUG):
            log.debug("task cancelled", task_id=handler.id, task=handler.name)
        return True

    def __repr__(self) -> str:
        return f"<TaskManager {self._config.server_name} {self._state.value}>"


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())
