"""TaskManager: the task queue, the worker threads, the lifecycle, every transition.

Threads. `workers` threads (``marionette-worker-N``) block on a bounded task queue
and leave on a ``None`` sentinel; the scheduler thread (``marionette-scheduler``)
puts due tasks, retries and periodic runs back into that queue; a listener thread
(``marionette-listener``) exists only while listeners do. Nothing polls. A failed
attempt with retries left goes to the scheduler with its backoff: no worker sleeps.

The queue. External producers get back pressure: `queue()` blocks while the queue
is full (or raises `QueueFull` with ``block=False``). The manager's own threads
(workers, so tasks submitting tasks, the listener thread, and the scheduler) never
block on it: their puts pass the bound, which is what makes a task that submits
into a full queue unable to deadlock the manager. Each run (`start()` to `stop()`)
has its own queue; `stop()` closes it, so a put that was blocked on it can never
land in a dead queue.

Gates. A task with a key, a group, or a periodic behind it is checked when a worker
is about to start it (`_begin_locked`): if its key's other instance still runs, or
its group is at its limit, it is parked (holding no worker) and put back at the
front of the queue when the gate opens.

Locking. One lock per manager, `TaskManager._lock`, guards everything shared: the
lifecycle state, the current queue (it is the queue's own mutex, so a submission,
or a worker's settle-take-and-start, is one critical section), the threads, the
kept tasks, the counters, the running set, the keys and groups, the periodics,
the event buffer, and the state of every handler this manager made (handlers have
no lock of their own). `_changed`, a Condition on it, signals lifecycle changes and
idleness. `_lifecycle` serializes `start()` with the first phase of `stop()`. Lock
order: `_lifecycle` -> `_lock` -> context lock; nothing is ever taken the other
way. The manager's scheduler runs on `_lock` too (one lock per submission, not
two): under it, only the scheduler's ``*_locked`` methods may be called. No user
code (tasks, callbacks, loggers, listeners, context callbacks) runs under `_lock`,
and contexts are cancelled only outside it, because a cancellation may run
callbacks that take it.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import sys
import threading
import time
import types
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from typing import Any

from . import _threads
from ._gates import Group, Slot
from ._log import DEBUG, Log
from ._queue import TaskQueue
from ._threads import owners
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
from .events import Dispatcher, TaskEvent, TaskEventKind
from .handler import (
    DEFAULT_OPTIONS,
    Options,
    Submittable,
    T,
    TaskHandler,
    TaskState,
    _Extras,
    default_name,
    parse_options,
    retry_delay,
)
from .periodic import Periodic, parse_cron, parse_zone
from .periodic import _State as _PeriodicState
from .scheduler import Scheduler
from .stats import GroupStats, Stats

__all__ = ["TaskManager"]

_PENDING = TaskState.PENDING
_SCHEDULED = TaskState.SCHEDULED
_RUNNING = TaskState.RUNNING
_Kind = TaskEventKind
_SETTLED = {
    TaskState.SUCCEEDED: _Kind.SUCCEEDED,
    TaskState.FAILED: _Kind.FAILED,
    TaskState.CANCELLED: _Kind.CANCELLED,
}

_FUNCTION = types.FunctionType
#: The largest finite float: numbers strictly inside +-_FINITE convert to finite floats.
_FINITE = sys.float_info.max
#: The shortest `every` interval: below it the monotonic clock's float resolution
#: makes "the next point of the grid" meaningless.
MIN_INTERVAL = 1e-6
_CONFIG_FIELDS = frozenset(f.name for f in dataclasses.fields(Config))
_get_ident = threading.get_ident

# Returned by _begin_locked for a task whose ``context=`` ended before it started.
_PARENT_DONE = Context()

# An attempt that returned a value: (handler, its attempt's context, the value).
_Success = tuple[TaskHandler[Any], Context, Any]


class _Lifecycle(enum.Enum):
    STOPPED = "stopped"
    RUNNING = "running"
    STOPPING = "stopping"


# Module constants for enum members read on hot paths: an enum class attribute
# lookup costs about 100 ns in CPython 3.11, a global a tenth of that.
_LIVE = _Lifecycle.RUNNING
_SUCCEEDED = TaskState.SUCCEEDED


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

    `start()` it, submit with `queue` / `delay` / `schedule` (or `every` / `cron`),
    and `stop()` it (or use ``with TaskManager(...) as tm:``). Every method may be
    called from any thread, including from inside a task or a listener; which ones
    block is said on each.
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
        self._started_at = 0.0
        self._queue: TaskQueue | None = None
        self._threads: list[threading.Thread] = []
        # The thread finishing a stop called from inside (see stop()), if any.
        self._stopper: threading.Thread | None = None
        # Pending tasks between runs (queued when a stop timed out, or due while
        # stopped); start() queues them first.
        self._kept: collections.deque[TaskHandler[Any]] = collections.deque()
        self._running: set[TaskHandler[Any]] = set()
        self._keys: dict[str, Slot] = {}
        # Tasks a gate holds (their key's other instance runs, or their group is
        # full), in the order they were held; released to the front of the queue.
        self._parked: dict[TaskHandler[Any], None] = {}
        self._groups = {name: Group(name, n) for name, n in config.limits.items()}
        self._active = 0  # submitted and not finished: what join() waits for
        self._scheduled = 0  # of those, waiting in the scheduler
        self._foreign = 0  # attempts run by exec() rather than by a worker
        self._joiners = 0
        self._submitted = self._succeeded = self._failed = 0
        self._retried = self._cancelled = self._coalesced = 0
        self._events = Dispatcher(self, self._lock, self._log, "marionette")
        # The scheduler shares the manager's lock (see scheduler.py): with it held,
        # call only its *_locked methods.
        self._scheduler: Scheduler[TaskHandler[Any] | Context | Periodic] = Scheduler(
            self._on_due, self._log, _lock=self._lock
        )
        _threads.forkable(self)

    # -- properties --------------------------------------------------------------

    @property
    def config(self) -> Config:
        return self._config

    @property
    def scheduler(self) -> Scheduler[Any]:
        """The manager's scheduler (delayed tasks, retries, periodics, deadline watches)."""
        return self._scheduler

    def is_running(self) -> bool:
        return self._state is _Lifecycle.RUNNING

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        """Start the workers and the scheduler; a no-op when running.

        A stopped manager starts again with the tasks its last stop kept, queued
        ones first. While another thread is stopping it, waits for that stop. From
        inside a task (or a listener) while a stop runs, it cannot wait (the stop
        waits for that task): a new run starts at once, and the workers of the
        stopping run finish its queue beside it.
        """
        inside = _threads.current_owner() is self
        while True:
            # Wait for a stop under way before taking _lifecycle: that stop may wait for
            # a task that itself calls stop() (which takes _lifecycle).
            if not inside:
                self._wait_for_stop()
            with self._lifecycle:
                with self._lock:
                    if self._state is _Lifecycle.RUNNING:
                        return
                    if self._state is _Lifecycle.STOPPING and not inside:
                        continue  # a start and a stop slipped in: wait again
                    threads, listener = self._new_run_locked()
                for thread in threads:
                    thread.start()
                if listener is not None:
                    listener.start()
                self._scheduler.start()
            break
        _threads.track(self)
        self._log.info(
            "task manager started",
            workers=self._config.workers,
            queue_size=self._config.queue_size,
        )

    def _wait_for_stop(self) -> None:
        """Wait while another thread stops the manager."""
        with self._lock:
            while self._state is _Lifecycle.STOPPING:
                self._changed.wait()

    def _new_run_locked(self) -> tuple[list[threading.Thread], threading.Thread | None]:
        """Make the queue and threads of a new run (the caller starts the threads)."""
        q = TaskQueue(self._config.queue_size, self._lock)
        while self._kept:
            handler = self._kept.popleft()
            if handler._state is _PENDING:
                q.force_locked(handler)
        threads = [
            threading.Thread(target=self._work, args=(q,), name=f"marionette-worker-{n}")
            for n in range(1, self._config.workers + 1)
        ]
        listener = self._events.start_locked()
        self._queue, self._threads = q, threads
        self._state = _Lifecycle.RUNNING
        self._started_at = time.monotonic()
        self._changed.notify_all()
        return threads, listener

    def stop(self, timeout: float | None = None) -> None:
        """Stop gracefully; from its first instant, new submissions raise.

        Stops the scheduler, lets the workers finish every queued and running task,
        delivers every event to the listeners, and returns when all that is done.
        Delayed and scheduled tasks not yet due, retries waiting for their backoff,
        and periodics are kept for the next `start()`. With a `timeout` (seconds or
        `timedelta`) that expires, the contexts of running tasks are cancelled, the
        tasks still queued are kept for the next `start()`, and it returns; a task
        that ignores its context runs on in its thread. A no-op when not running;
        while another thread stops it, waits for that.

        From inside a task, a done callback or a listener it cannot wait (the stop
        waits for the calling task), so it returns at once and a thread named
        ``marionette-stopper`` finishes the stop: every queued task still runs, the
        calling worker's share included once its task returns, and the manager is
        stopped once the last worker has left and the listeners have had every event
        (a `timeout` bounds that as above).
        """
        limit = None if timeout is None else seconds(timeout, "timeout", allow_negative=False)
        deadline = None if limit is None else time.monotonic() + limit
        inside = _threads.current_owner() is self
        interrupted: BaseException | None = None  # e.g. Ctrl-C: stop as on a timeout
        stopper: threading.Thread | None = None
        with self._lifecycle:
            with self._lock:
                state = self._state
                if state is _Lifecycle.RUNNING:
                    self._state = _Lifecycle.STOPPING
                    q, threads, previous = self._queue, self._threads, self._stopper
                    self._events.unbound_locked()
            if state is _Lifecycle.RUNNING:
                assert q is not None
                try:
                    self._scheduler.stop()
                except BaseException as exc:
                    interrupted = exc
                with self._lock:
                    for _ in threads:
                        q.force_locked(None)
                    if inside:
                        stopper = self._stopper = threading.Thread(
                            target=self._finish_stop,
                            args=(q, threads, previous, deadline),
                            name="marionette-stopper",
                        )
        if state is _Lifecycle.STOPPED:
            return
        if state is _Lifecycle.STOPPING:
            if not inside:
                self._wait_for_stopped(deadline)
            return
        assert q is not None
        if stopper is None:
            self._finish_stop(q, threads, previous, deadline, interrupted)
            return
        stopper.start()
        if interrupted is not None:
            raise interrupted

    def _wait_for_stopped(self, deadline: float | None) -> None:
        """Wait (until `deadline`) for the stop another thread began to finish."""
        with self._lock:
            self._changed.wait_for(
                lambda: self._state is not _Lifecycle.STOPPING, _remaining(deadline)
            )
            stopper = self._stopper
        if stopper is not None and stopper is not threading.current_thread():
            stopper.join(_remaining(deadline))

    def _finish_stop(
        self,
        q: TaskQueue,
        threads: list[threading.Thread],
        previous: threading.Thread | None,
        deadline: float | None,
        interrupted: BaseException | None = None,
    ) -> None:
        """The waiting half of `stop()`: in the stopping thread, or in the stopper
        thread for a stop from inside.

        Waits for the run's workers (and for an earlier stopper), keeps what is still
        queued, delivers the events, and marks the manager stopped, unless a task
        started a new run meanwhile: then what is left of this run goes to that one.
        """
        try:
            if previous is not None and interrupted is None:
                previous.join(_remaining(deadline))
            for thread in threads:
                if interrupted is None:
                    thread.join(_remaining(deadline))
        except BaseException as exc:
            interrupted = exc
        abandoned = any(t.is_alive() for t in threads)
        with self._lock:
            current = self._queue is q  # no task started a new run meanwhile
            leftover = [h for h in q.close_locked(sentinels=len(threads)) if h._state is _PENDING]
            if current:
                self._kept.extend(leftover)
            else:
                for handler in leftover:
                    self._enqueue_locked(handler)
            running = (
                [h._ctx for h in self._running if h._ctx is not None]
                if abandoned and current
                else []
            )
            kept = len(self._kept) + self._scheduled
        if not current:
            if interrupted is not None:
                raise interrupted
            return
        try:
            for ctx in running:
                ctx.cancel()
            if interrupted is None:
                self._events.drain(deadline)
        finally:  # whatever happens, the manager ends stopped: a later stop() returns
            with self._lock:
                self._queue, self._threads = None, []
                self._state = _Lifecycle.STOPPED
                self._changed.notify_all()
            _threads.untrack(self)
        self._log.info("task manager stopped", kept=kept, abandoned=len(running))
        if interrupted is not None:
            raise interrupted

    # -- fork (see _threads) ------------------------------------------------------

    _fork_rank = 0

    def _fork_prepare(self) -> None:
        self._lifecycle.acquire()
        self._lock.acquire()

    def _fork_parent(self) -> None:
        self._lock.release()
        self._lifecycle.release()

    def _fork_child(self) -> None:
        """In a child made by fork: a stopped manager that keeps its pending work.

        None of the parent's threads exist here. Queued tasks are kept for this
        process's `start()`; tasks whose attempt was under way run in the parent,
        so here they end cancelled (their callbacks do not run in the child).
        Delayed, scheduled and periodic work stays in the scheduler.
        """
        try:
            self._changed = threading.Condition(self._lock)
            self._joiners = 0
            self._events.fork_child_locked()
            q = self._queue
            if q is not None:
                # Queued tasks, then those whose submitters were blocked on the full
                # queue (those threads do not exist here).
                waiting = [*q.queue, *(waiter.item for waiter in q.blocked)]
                leftover = [h for h in waiting if h is not None and h._state is _PENDING]
                q.closed = True  # a worker that forked leaves this queue on a stop signal
                q.queue.clear()
                q.queue.extend([None] * len(self._threads))
                q.blocked.clear()
                self._kept.extendleft(reversed(leftover))
            for handler in list(self._running):
                ctx = handler._ctx
                if ctx is not None:
                    self._end_attempt_locked(handler, ctx)
                self._running.discard(handler)
                self._cancelled += 1
                self._settle_locked(handler, TaskState.CANCELLED, None)
            self._foreign = 0
            self._stopper = None
            self._queue, self._threads = None, []
            self._state = _Lifecycle.STOPPED
        finally:
            self._lock.release()
            self._lifecycle.release()

    def __enter__(self) -> TaskManager:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def join(self, timeout: float | None = None) -> bool:
        """Block until no task is queued, running, delayed or waiting for a retry.

        Future runs of a periodic are not waited for, only runs already due.
        Returns False if `timeout` seconds pass first. From inside a task or a
        listener it raises `RuntimeError`: it would wait for itself. On a stopped
        manager that kept tasks, it waits for a `start()` to run them.
        """
        if _threads.current_owner() is self:
            raise RuntimeError("join() from inside a task would wait for that task itself")
        limit = None if timeout is None else min(seconds(timeout, "timeout"), threading.TIMEOUT_MAX)
        with self._lock:
            self._joiners += 1
            try:
                return self._changed.wait_for(lambda: self._active == 0, limit)
            finally:
                self._joiners -= 1

    # -- submission --------------------------------------------------------------

    def wrap_task(self, task: Submittable[T], **opts: Any) -> TaskHandler[T]:
        """Wrap `task` in a pending handler without submitting it.

        `wrap_task(handler)` returns the same handler; options cannot be given with
        one (`TypeError`). A task is a callable ``fn(ctx)`` or an object with a
        ``do(ctx)`` method; anything else raises `TypeError`. An unknown ``group=``
        raises `ValueError`.
        """
        if isinstance(task, TaskHandler):
            if opts:
                raise TypeError(f"options cannot be changed on an existing TaskHandler: {task!r}")
            if task._owner is not self:
                raise ValueError(f"{task!r} belongs to another TaskManager")
            return task
        fn, options, name = self._prepare(task, opts)
        return TaskHandler(self, fn, options, name)

    def _prepare(self, task: Any, opts: dict[str, Any]) -> tuple[Any, Options, str | None]:
        fn = _callable_of(task)
        options, name = parse_options(opts)
        if options.group is not None and options.group not in self._groups:
            raise ValueError(
                f"unknown group {options.group!r}: configure it in Config.limits or set_limit()"
            )
        if name is None and fn is not task:  # a Task object: named after the object
            name = default_name(task)
        return fn, options, name

    def queue(self, task: Submittable[T], *, block: bool = True, **opts: Any) -> TaskHandler[T]:
        """Run `task` as soon as a worker is free; returns its handler.

        Blocks while the queue is full (back pressure), or while other producers
        wait for room before it (first come, first served, whatever the manager's
        own threads put meanwhile); with ``block=False`` raises `QueueFull`
        instead. An exception that interrupts the wait (Ctrl-C) propagates, and
        the task, already submitted, still runs. From inside a task or a
        listener it never blocks: the manager's own threads pass the bound
        (``block=False`` still raises there). Raises `TaskManagerStopped` unless
        running. With ``key=``, returns the key's pending instance if there is one.
        """
        if block is not True and block is not False:
            raise TypeError(f"block must be a bool, not {block!r}")
        fresh = not opts and type(task) is _FUNCTION
        handler: TaskHandler[T] = (
            TaskHandler(self, task, DEFAULT_OPTIONS, None)  # type: ignore[arg-type]  # a function
            if fresh
            else self.wrap_task(task, **opts)
        )
        waiting = False
        with self._lock:
            # A fresh handler on a running manager needs no admission: the hot path.
            if (not fresh or self._state is not _LIVE) and (
                early := self._claim_locked(handler)
            ) is not None:
                return early
            q = self._queue
            assert q is not None
            if (len(q.queue) < q.maxsize and not q.blocked) or (block and _get_ident() in owners):
                # has_room_locked() and force_locked(), inlined: the hot path
                q.queue.append(handler)
                if q._takers > q._waking == 0:
                    q._waking = 1
                    q.not_empty.notify()
            elif not block:
                self._unclaim_key_locked(handler)
                raise QueueFull(f"the task queue is full ({q.maxsize} tasks)")
            else:
                waiting = True
            # _count_locked, inlined: this is the hot path
            handler._due = handler._submitted_at = time.monotonic()
            self._active += 1
            self._submitted += 1
            if handler._opts.context is not None:
                handler._opts.context._on_done(handler, handler._parent_done)
            if self._events.wanted:
                self._emit_locked(_Kind.SUBMITTED, handler)
        if waiting and not q.put_blocking(handler):
            with self._lock:  # the run ended while we waited: keep it for the next one
                self._enqueue_locked(handler)
        if handler._opts.context is not None or self._events.wanted:
            self._after_submit(handler)
        return handler

    def delay(self, delay: float | timedelta, task: Submittable[T], **opts: Any) -> TaskHandler[T]:
        """Run `task` on or after `delay` seconds (or a `timedelta`) from now.

        A negative delay means now; NaN or infinity raise `Unschedulable`, None or a
        non-number `TypeError`. Any finite delay is accepted. Never blocks. With
        ``key=``, returns the key's pending instance if there is one.
        """
        kind = type(delay)
        if (kind is float or kind is int) and -_FINITE < delay < _FINITE:  # type: ignore[operator]
            wait = float(delay)  # type: ignore[arg-type]  # the hot path: as seconds() would
        else:
            wait = seconds(delay, "delay", error=Unschedulable)
        return self._submit_later(task, opts, wait, None)

    def schedule(self, at: datetime, task: Submittable[T], **opts: Any) -> TaskHandler[T]:
        """Run `task` on or after the aware `datetime` `at`; a past time means now.

        The time is kept on the wall clock. None, `datetime.min` or a naive datetime
        raise `Unschedulable`; a non-datetime raises `TypeError`. Never blocks. With
        ``key=``, returns the key's pending instance if there is one.
        """
        return self._submit_later(task, opts, 0.0, aware(at).timestamp())

    def _submit_later(
        self, task: Any, opts: dict[str, Any], wait: float, timestamp: float | None
    ) -> TaskHandler[Any]:
        """Submit to the scheduler: `wait` seconds from now, or at the wall-clock
        `timestamp` when one is given. The hot path of `delay` and `schedule`."""
        fresh = not opts and type(task) is _FUNCTION
        handler = (
            TaskHandler(self, task, DEFAULT_OPTIONS, None)
            if fresh
            else self.wrap_task(task, **opts)
        )
        with self._lock:
            # A fresh handler on a running manager needs no admission: the hot path.
            if (not fresh or self._state is not _LIVE) and (
                early := self._claim_locked(handler)
            ) is not None:
                return early
            # _count_locked, inlined: this is the hot path of delay and schedule.
            now = handler._submitted_at = time.monotonic()
            handler._state = _SCHEDULED
            self._active += 1
            self._submitted += 1
            self._scheduled += 1
            if handler._opts.context is not None:
                handler._opts.context._on_done(handler, handler._parent_done)
            if self._events.wanted:
                self._emit_locked(_Kind.SUBMITTED, handler)
            # The handler's due time and the scheduler's entry share one float, and
            # the entry's tie-breaker is the handler's id: no extra objects per task.
            # A handler is submitted once: it cannot be pending in the scheduler yet.
            if timestamp is None:
                handler._due = deadline = now + wait
                self._scheduler._add_locked(handler, deadline, False, handler.id)
            else:
                handler._due = now + (timestamp - time.time())
                self._scheduler._add_locked(handler, timestamp, True, handler.id)
        if handler._opts.context is not None or self._events.wanted:
            self._after_submit(handler)
        return handler

    def _claim_locked(self, handler: TaskHandler[Any]) -> TaskHandler[Any] | None:
        """Admit a submission: raise if it may not be made; return the handler the
        caller must return at once (its key's pending instance, or a handler
        cancelled before its submission), or None to go on and count it."""
        if self._state is not _LIVE or handler._submitted_at is not None:
            self._admit_locked(handler)
        if handler._opts.key is not None:
            return self._claim_key_locked(handler)
        if handler._state is not _PENDING:
            return handler
        return None

    def _admit_locked(self, handler: TaskHandler[Any]) -> None:
        """Raise unless `handler` may be submitted now."""
        if self._state is not _Lifecycle.RUNNING:
            raise TaskManagerStopped()
        if handler._submitted_at is not None or handler._state not in (
            _PENDING,
            TaskState.CANCELLED,
        ):
            # Submitted before, or being run by exec() without a submission.
            raise ValueError(f"{handler!r} was already submitted: a handler runs once")

    def _claim_key_locked(self, handler: TaskHandler[Any]) -> TaskHandler[Any] | None:
        """Make `handler` its key's pending instance, or return the one there is."""
        key = handler._opts.key
        assert key is not None
        slot = self._keys.get(key)
        if slot is not None and slot.pending is not None:
            return slot.pending
        if handler._state is not _PENDING:
            return handler  # wrapped and cancelled before its submission
        if slot is None:
            slot = self._keys[key] = Slot(key)
        slot.pending = handler
        return None

    def _unclaim_key_locked(self, handler: TaskHandler[Any]) -> None:
        """Undo `_claim_key_locked` for a submission that did not happen."""
        key = handler._opts.key
        if key is not None:
            slot = self._keys[key]
            slot.ended(handler)
            self._forget_slot_locked(slot)

    def _count_locked(self, handler: TaskHandler[Any], state: TaskState) -> None:
        handler._due = handler._submitted_at = time.monotonic()
        handler._state = state
        self._active += 1
        self._submitted += 1
        parent = handler._opts.context
        if parent is not None:
            parent._on_done(handler, handler._parent_done)
        if self._events.wanted:
            self._emit_locked(_Kind.SUBMITTED, handler)

    def _after_submit(self, handler: TaskHandler[Any]) -> None:
        """After a submission, with no lock held: a task whose ``context=`` is
        already done is cancelled; a submitter waits while listeners lag far behind."""
        parent = handler._opts.context
        if parent is not None and parent.done():
            handler.cancel()
        if self._events.wanted and self._events.over():
            self._events.wait_for_room()

    def _enqueue_locked(self, handler: TaskHandler[Any]) -> None:
        """Queue a due task from inside the manager: never blocks, never lost."""
        q = self._queue
        if q is None or q.closed:
            self._kept.append(handler)
        else:
            q.force_locked(handler)

    def _release_locked(self, handlers: list[TaskHandler[Any]]) -> None:
        """Tasks a gate let through: they go first, ahead of the stop signals."""
        if not handlers:
            return
        for handler in handlers:
            self._parked.pop(handler, None)
        q = self._queue
        if q is None or q.closed:
            self._kept.extendleft(reversed(handlers))
        else:
            q.push_front_locked(handlers)

    # -- keys, rescheduling, inspection ------------------------------------------

    def get(self, key: str) -> TaskHandler[Any] | None:
        """The key's pending instance, else its running one, else None."""
        if not isinstance(key, str):
            raise TypeError(f"key must be a str, not {key!r}")
        with self._lock:
            slot = self._keys.get(key)
            if slot is None:
                return None
            return slot.pending or slot.running

    def reschedule(
        self, task: str | TaskHandler[Any], when: float | datetime, *, only_sooner: bool = False
    ) -> bool:
        """Move a scheduled task (delayed, scheduled, or waiting for a retry) to `when`.

        `task` is a key or a handler; for a key, its pending instance if that is
        scheduled, else its running one if that waits for a retry, else the next
        planned run of the key's periodic. `when` is a delay (seconds or
        `timedelta`) or an aware `datetime`. With `only_sooner`, it moves only to
        an earlier time. Returns whether it moved: False when nothing is scheduled
        (a queued task is already due) or `only_sooner` declined.
        """
        if not isinstance(task, (str, TaskHandler)):
            raise TypeError(f"task must be a key or a TaskHandler, not {task!r}")
        if isinstance(when, datetime):
            wall, at = True, aware(when, "when").timestamp()
        else:
            wall, wait = False, seconds(when, "when", error=Unschedulable)
        with self._lock:
            target: TaskHandler[Any] | Periodic | None = None
            if isinstance(task, TaskHandler):
                if task._owner is not self:
                    raise ValueError(f"{task!r} belongs to another TaskManager")
                target = task if task._state is _SCHEDULED else None
            elif (slot := self._keys.get(task)) is not None:
                for candidate in (slot.pending, slot.running):
                    if candidate is not None and candidate._state is _SCHEDULED:
                        target = candidate
                        break
                else:
                    target = slot.periodic
            if target is None:
                return False
            now = time.monotonic()
            deadline = at if wall else now + wait
            moved = self._scheduler._reschedule_locked(target, deadline, wall, only_sooner)
            if moved and isinstance(target, TaskHandler):
                target._due = now + (at - time.time()) if wall else deadline
            return moved

    def pending(self) -> list[TaskHandler[Any]]:
        """A snapshot of every task waiting to run: queued ones in queue order (then
        those held by a group limit or a key, and those kept while stopped), then
        scheduled ones in due order."""
        with self._lock:
            seen: set[TaskHandler[Any]] = set()
            out: list[TaskHandler[Any]] = []
            queued: list[TaskHandler[Any]] = (
                [] if self._queue is None else self._queue.snapshot_locked()
            )
            queued.extend(self._parked)
            queued.extend(self._kept)
            for handler in queued:
                if handler._state is _PENDING and handler not in seen:
                    seen.add(handler)
                    out.append(handler)
            for item in self._scheduler._items_locked():
                if isinstance(item, TaskHandler) and item._state is _SCHEDULED:
                    out.append(item)
            return out

    # -- groups and stats --------------------------------------------------------

    def set_limit(self, group: str, limit: int) -> None:
        """Set or add a group's limit while running (or not).

        `limit` must be an int >= 1 (else `ValueError`). Raising it starts waiting
        tasks at once; lowering it lets running tasks finish and holds new starts
        until the group is under the new limit.
        """
        if not isinstance(group, str) or not group:
            raise TypeError(f"group must be a non-empty str, not {group!r}")
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise ValueError(f"limit must be an int >= 1, not {limit!r}")
        with self._lock:
            existing = self._groups.get(group)
            if existing is None:
                self._groups[group] = Group(group, limit)
            else:
                self._release_locked(existing.set_limit(limit))

    def stats(self) -> Stats:
        """A frozen snapshot of the manager, every field read at the same instant."""
        with self._lock:
            running = len(self._running)
            return Stats(
                workers=self._config.workers,
                busy=running - self._foreign,
                queued=self._active - running - self._scheduled,
                scheduled=self._scheduled,
                running=running,
                submitted=self._submitted,
                succeeded=self._succeeded,
                failed=self._failed,
                retried=self._retried,
                cancelled=self._cancelled,
                coalesced=self._coalesced,
                groups=types.MappingProxyType(
                    {
                        name: GroupStats(g.limit, g.running - len(g.reserved), len(g.waiting))
                        for name, g in self._groups.items()
                    }
                ),
                uptime=(
                    time.monotonic() - self._started_at
                    if self._state is not _Lifecycle.STOPPED
                    else 0.0
                ),
            )

    # -- listeners ---------------------------------------------------------------

    def add_listener(
        self, fn: Callable[[TaskEvent], object], *, events: Iterable[TaskEventKind] | None = None
    ) -> Callable[[], None]:
        """Call ``fn(event)`` for each `TaskEvent` of the given kinds (default: all).

        Listeners run one at a time, in the order events happened, on the
        manager's listener thread; one that raises is logged and kept. A listener
        may submit tasks (they never block on a full queue); it must not wait for a
        task to finish (the workers may be waiting for it). Returns a function that
        removes the listener (calling it twice is harmless). `stop()` delivers every
        event before it returns; submissions made meanwhile raise
        `TaskManagerStopped`, as they do from anywhere once a stop has begun. A
        `stop()` called by a listener cannot wait for its own thread: that thread
        delivers the rest of the stopped run's events once the listener returns,
        before any listener sees an event of a later run.
        """
        if not callable(fn):
            raise TypeError(f"a listener must be callable, not {fn!r}")
        kinds = None
        if events is not None:
            try:
                kinds = list(events)
            except TypeError:
                raise TypeError(
                    f"events must be an iterable of TaskEventKind, not {events!r}"
                ) from None
            bad = [k for k in kinds if not isinstance(k, TaskEventKind)]
            if bad:
                raise TypeError(f"events must be TaskEventKind members, not {bad!r}")
        with self._lock:
            remove = self._events.add_locked(fn, kinds)
            thread = self._events.start_locked() if self._state is _Lifecycle.RUNNING else None
        if thread is not None:
            thread.start()
        return remove

    def _emit_locked(
        self,
        kind: TaskEventKind,
        handler: TaskHandler[Any],
        error: BaseException | None = None,
        result: Any = None,
    ) -> None:
        if kind in self._events.wanted:
            self._events.emit_locked(kind, handler, error, result)

    # -- periodic tasks ----------------------------------------------------------

    def every(
        self,
        interval: float,
        task: Any,
        *,
        start: float | datetime | None = None,
        jitter: float = 0,
        fixed_delay: bool = False,
        key: str | None = None,
        **opts: Any,
    ) -> Periodic:
        """Run `task` every `interval` seconds (or `timedelta`); returns its `Periodic`.

        The first run is at `start` (a delay or an aware `datetime`; default: one
        interval from now; a past time means now). Later runs stay on the grid
        ``start + k * interval`` (fixed rate), or, with `fixed_delay`, follow the
        end of the previous run by `interval`. `jitter` adds a random 0..jitter
        seconds to each run, planned from the un-jittered grid. Runs never overlap,
        never pile up, and are never skipped for busy workers (see `Periodic`).
        `interval` below a microsecond (zero and negative included) or `jitter` < 0
        raise `ValueError`; a naive `start` raises
        `Unschedulable`. Each run is an ordinary task with `opts`.
        """
        period = seconds(interval, "interval")
        if period < MIN_INTERVAL:
            raise ValueError(f"interval must be at least {MIN_INTERVAL} s, not {interval!r}")
        spread = seconds(jitter, "jitter", allow_negative=False)
        if fixed_delay is not True and fixed_delay is not False:
            raise TypeError(f"fixed_delay must be a bool, not {fixed_delay!r}")
        if start is None:
            first = time.monotonic() + period
        elif isinstance(start, datetime):
            first = time.monotonic() + (aware(start, "start").timestamp() - time.time())
        else:
            first = time.monotonic() + seconds(start, "start", error=Unschedulable)
        return self._add_periodic(
            task, key, opts, first, interval=period, jitter=spread, fixed_delay=fixed_delay
        )

    def cron(
        self,
        expression: str,
        task: Any,
        *,
        tz: Any = None,
        key: str | None = None,
        **opts: Any,
    ) -> Periodic:
        """Run `task` at the times a cron expression names; returns its `Periodic`.

        Five fields (minute hour day month weekday), or six with seconds first, or
        an alias (``@hourly``, ``@daily``, ``@weekly``, ``@monthly``, ``@yearly``),
        evaluated in `tz` (a `zoneinfo.ZoneInfo` or a zone name; default UTC).
        Across daylight saving changes, a wall time that does not exist is skipped,
        and one that occurs twice runs once, at its first occurrence. An invalid
        expression or an unknown zone raises `ValueError`. Runs never overlap,
        never pile up, and are never skipped for busy workers (see `Periodic`).
        """
        text = parse_cron(expression)
        zone = parse_zone(tz)
        return self._add_periodic(task, key, opts, time.monotonic(), cron=text, tz=zone)

    def _add_periodic(
        self, task: Any, key: str | None, opts: dict[str, Any], first: float, **plan: Any
    ) -> Periodic:
        if key is not None and (not isinstance(key, str) or not key):
            raise TypeError(f"key must be a non-empty str, not {key!r}")
        if "key" in opts:
            raise TypeError("key is given once, as every(..., key=...) / cron(..., key=...)")
        fn, options, name = self._prepare(task, opts)
        with self._lock:
            if self._state is not _Lifecycle.RUNNING:
                raise TaskManagerStopped()
            slot = None if key is None else self._keys.get(key)
            if slot is not None and slot.periodic is not None:
                return slot.periodic
            if slot is None:
                slot = Slot(key)
                if key is not None:
                    self._keys[key] = slot
            periodic = Periodic(self, fn, name or default_name(task), key=key, **plan)
            periodic._slot = slot
            periodic._opts = dataclasses.replace(options, key=key, periodic=periodic, gated=True)
            slot.periodic = periodic
            self._plan_locked(periodic, periodic._first(first))
        return periodic

    def _plan_locked(self, periodic: Periodic, plan: tuple[float, bool] | None) -> None:
        """Put a periodic's next occurrence in the scheduler (None: there is none)."""
        if plan is None:
            return
        due, wall = plan
        self._scheduler._push_locked(periodic, due, wall)

    def _periodic_due(self, periodic: Periodic) -> None:
        """An occurrence came due (scheduler thread): a new run, or merge into one."""
        with self._lock:
            if periodic._state is not _PeriodicState.ACTIVE:
                return
            slot = periodic._slot
            if slot.pending is not None:  # the previous run has not started: merge
                periodic._coalesced += 1
                self._coalesced += 1
                if self._events.wanted:
                    self._emit_locked(_Kind.COALESCED, slot.pending)
            else:
                run: TaskHandler[Any] = TaskHandler(
                    self, periodic._fn, periodic._opts, periodic._name
                )
                slot.pending = run
                periodic._last = run
                self._count_locked(run, _PENDING)
                self._enqueue_locked(run)
            if not periodic._fixed_delay:
                self._plan_locked(periodic, periodic._following(time.monotonic(), time.time()))

    def _periodic_stop(self, periodic: Periodic, state: _PeriodicState) -> None:
        """`Periodic.cancel` and `Periodic.pause`."""
        with self._lock:
            if periodic._state is _PeriodicState.CANCELLED:
                return
            if state is _PeriodicState.PAUSED and periodic._state is not _PeriodicState.ACTIVE:
                return
            periodic._state = state
            self._scheduler._cancel_locked(periodic)
            slot = periodic._slot
            waiting = slot.pending
            if state is _PeriodicState.CANCELLED:
                slot.periodic = None
                self._forget_slot_locked(slot)
        if waiting is not None:
            waiting.cancel()

    def _periodic_resume(self, periodic: Periodic) -> None:
        """`Periodic.resume`."""
        with self._lock:
            if periodic._state is not _PeriodicState.PAUSED:
                return
            periodic._state = _PeriodicState.ACTIVE
            self._plan_locked(periodic, periodic._resumed(time.monotonic(), time.time()))

    def _forget_slot_locked(self, slot: Slot) -> None:
        if slot.key is not None and slot.idle() and self._keys.get(slot.key) is slot:
            del self._keys[slot.key]

    # -- the scheduler's side ----------------------------------------------------

    def _on_due(self, item: TaskHandler[Any] | Context | Periodic) -> None:
        """Called by the scheduler thread for each due item."""
        if isinstance(item, TaskHandler):
            with self._lock:
                if item._state is _SCHEDULED:
                    item._state = _PENDING
                    self._scheduled -= 1
                    self._enqueue_locked(item)
        elif isinstance(item, Periodic):
            self._periodic_due(item)
        else:
            self._overrun(item)

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

    def _work(self, q: TaskQueue) -> None:
        with _threads.owned(self):
            while True:
                try:
                    self._serve(q)
                    return
                except BaseException as exc:  # a worker outlives anything, even our bugs
                    self._log.error("worker error", error=describe(exc))

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
            handler: TaskHandler[Any] | None = None
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
            if ctx is _PARENT_DONE:
                handler.cancel()
            elif ctx is not None:
                done = run(handler, ctx)

    def _execute(self, handler: TaskHandler[Any]) -> None:
        """`TaskHandler.exec`: run one attempt in the calling thread."""
        with self._lock:
            ctx = self._begin_locked(handler)
            if ctx is not None and ctx is not _PARENT_DONE:
                self._foreign += 1
        if ctx is _PARENT_DONE:
            handler.cancel()
        elif ctx is not None:
            with _threads.owned(self):  # inside a task now: join() must refuse, etc.
                done = self._run(handler, ctx)
            with self._lock:
                self._foreign -= 1
                extras = self._succeed_locked(*done) if done is not None else None
            if done is not None:
                self._announce(handler, ctx, extras)

    def _begin_locked(self, handler: TaskHandler[Any]) -> Context | None:
        """Start an attempt of a pending `handler`: its context, or None to skip it.

        None too when a gate parks it. Returns `_PARENT_DONE`, leaving the handler
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
            return _PARENT_DONE
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

    def _pass_gates_locked(self, handler: TaskHandler[Any], opts: Options) -> bool:
        """Check the task's key (or periodic) slot, then its group; park it if shut."""
        slot = self._slot_of(opts)
        if slot is not None and slot.running is not None and slot.running is not handler:
            slot.parked = True  # its namesake still runs: wait for it to end
            self._parked[handler] = None
            return False
        if opts.group is not None and not self._groups[opts.group].admit(handler):
            self._parked[handler] = None
            return False
        if slot is not None:
            slot.admit(handler)
            if opts.periodic is not None and handler._attempts == 0:
                opts.periodic._runs += 1
        return True

    def _slot_of(self, opts: Options) -> Slot | None:
        if opts.periodic is not None:
            return opts.periodic._slot
        return None if opts.key is None else self._keys.get(opts.key)

    def _ungate_locked(self, handler: TaskHandler[Any], *, final: bool) -> None:
        """An attempt of a gated task ended: free its group slot, and if the task
        ended for good, its key (or periodic) slot too."""
        opts = handler._opts
        released: list[TaskHandler[Any]] = []
        if opts.group is not None:
            released.extend(self._groups[opts.group].finished())
        if final:
            self._slot_ended_locked(handler, released)
        self._release_locked(released)

    def _slot_ended_locked(
        self, handler: TaskHandler[Any], released: list[TaskHandler[Any]]
    ) -> None:
        """`handler` will never run again (it ended, or was cancelled while it waited):
        let its key's parked instance go, and plan a fixed-delay periodic's next run
        (fixed-delay runs are planned from the end of the previous one, whether it
        ran or not)."""
        opts = handler._opts
        slot = self._slot_of(opts)
        if slot is None:
            return
        parked = slot.ended(handler)
        if parked is not None:
            released.append(parked)
        periodic = opts.periodic
        if (
            periodic is not None
            and periodic._fixed_delay
            and periodic._state is _PeriodicState.ACTIVE
            and slot.pending is None
            and slot.running is None
        ):
            self._plan_locked(periodic, periodic._following(time.monotonic(), time.time()))
        self._forget_slot_locked(slot)

    def _run(self, handler: TaskHandler[Any], ctx: Context) -> _Success | None:
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
        self, handler: TaskHandler[Any], ctx: Context, value: Any
    ) -> _Extras | None:
        """Settle a success (the attempt ended); returns what `_announce` needs once
        the lock is released."""
        self._running.discard(handler)
        handler._ctx = None
        self._succeeded += 1
        self._settle_locked(handler, _SUCCEEDED, value)
        return handler._extras

    def _announce(self, handler: TaskHandler[Any], ctx: Context, extras: _Extras | None) -> None:
        """After a success is settled and the lock released: log, wake, call back."""
        if ctx._parent is not None:
            ctx._detach()
        log = self._log
        if log.enabled(DEBUG):
            log.debug("task completed", task_id=handler.id, task=handler.name, attempt=ctx.attempt)
        if extras is not None:
            handler._fire(extras)

    def _attempt_failed(self, handler: TaskHandler[Any], ctx: Context, exc: BaseException) -> None:
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

    def _task_error(self, handler: TaskHandler[Any], last: Exception) -> TaskError:
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

    def _end_attempt_locked(self, handler: TaskHandler[Any], ctx: Context) -> None:
        self._running.discard(handler)
        handler._ctx = None
        if ctx._deadline is not None:
            self._scheduler._cancel_locked(ctx)

    def _settle_locked(self, handler: TaskHandler[Any], state: TaskState, value: Any) -> None:
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

    def _forget_waiting_locked(self, handler: TaskHandler[Any]) -> None:
        """A gated task that was waiting to run (not running) was cancelled."""
        opts = handler._opts
        self._parked.pop(handler, None)
        released: list[TaskHandler[Any]] = []
        if opts.group is not None:
            released.extend(self._groups[opts.group].forget(handler))
        self._slot_ended_locked(handler, released)
        self._release_locked(released)

    def _cancel(self, handler: TaskHandler[Any]) -> bool:
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

    def __repr__(self) -> str:
        return f"<TaskManager {self._config.server_name} {self._state.value}>"


def _remaining(deadline: float | None) -> float | None:
    """Seconds left until `deadline`, in the range every blocking call accepts."""
    if deadline is None:
        return None
    return min(max(0.0, deadline - time.monotonic()), threading.TIMEOUT_MAX)
