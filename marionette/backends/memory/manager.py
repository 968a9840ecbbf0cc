"""MemoryManager: the in-memory backend, as the user sees it.

Submission (`queue`, `delay`, `schedule`, `wrap_task`), keys, rescheduling,
inspection, limits, stats and `join`, over the layers below it (`_core`,
`_reactive`, `_workers`: one class read in four modules). Everything lives in this
process; a process that exits loses its pending tasks.

The queue. External producers get back pressure: `queue()` blocks while the queue
is full (or raises `QueueFull` with ``block=False``). The manager's own threads
(workers, so tasks submitting tasks, the listener thread, and the scheduler) never
block on it: their puts pass the bound, which is what makes a task that submits
into a full queue unable to deadlock the manager. Each run (`start()` to `stop()`)
has its own queue; `stop()` closes it, so a put that was blocked on it can never
land in a dead queue.
"""

from __future__ import annotations

import sys
import threading
import time
import types
from datetime import datetime, timedelta
from typing import Any

from marionette import _threads
from marionette._threads import owners
from marionette._time import aware, seconds
from marionette.backends.memory.handler import MemoryHandler
from marionette.backends.memory.periodic import MemoryPeriodic
from marionette.backends.memory.periodic import _State as _PeriodicState
from marionette.config import check_limit
from marionette.context import Context
from marionette.errors import QueueFull, TaskManagerStopped, Unschedulable
from marionette.events import TaskEventKind
from marionette.handler import (
    DEFAULT_OPTIONS,
    Submittable,
    T,
    TaskHandler,
    TaskState,
)
from marionette.manager import Lifecycle
from marionette.stats import GroupStats, Stats

from ._gates import Group
from ._workers import Workers

__all__ = ["MemoryManager"]

_PENDING = TaskState.PENDING
_SCHEDULED = TaskState.SCHEDULED
_Kind = TaskEventKind
_FUNCTION = types.FunctionType
#: The largest finite float: numbers strictly inside +-_FINITE convert to finite floats.
_FINITE = sys.float_info.max
_get_ident = threading.get_ident
# An enum class attribute lookup costs about 100 ns in CPython 3.11, a global a tenth.
_LIVE = Lifecycle.RUNNING


class MemoryManager(Workers):
    """A `TaskManager` whose tasks, schedule and results live in this process."""

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

    def wrap_task(self, task: Submittable[T], **opts: Any) -> MemoryHandler[T]:
        """Wrap `task` in a pending handler without submitting it.

        `wrap_task(handler)` returns the same handler; options cannot be given with
        one (`TypeError`). A task is a callable ``fn(ctx)`` or an object with a
        ``do(ctx)`` method; anything else raises `TypeError`. An unknown ``group=``
        raises `ValueError`.
        """
        if isinstance(task, TaskHandler):
            if opts:
                raise TypeError(f"options cannot be changed on an existing TaskHandler: {task!r}")
            if not isinstance(task, MemoryHandler) or task._owner is not self:
                raise ValueError(f"{task!r} belongs to another TaskManager")
            return task
        fn, options, name = self._prepare(task, opts)
        return MemoryHandler(self, fn, options, name)

    def queue(self, task: Submittable[T], *, block: bool = True, **opts: Any) -> MemoryHandler[T]:
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
        handler: MemoryHandler[T] = (
            MemoryHandler(self, task, DEFAULT_OPTIONS, None)  # type: ignore[arg-type]  # a function
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

    def delay(
        self, delay: float | timedelta, task: Submittable[T], **opts: Any
    ) -> MemoryHandler[T]:
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

    def schedule(self, at: datetime, task: Submittable[T], **opts: Any) -> MemoryHandler[T]:
        """Run `task` on or after the aware `datetime` `at`; a past time means now.

        The time is kept on the wall clock. None, `datetime.min` or a naive datetime
        raise `Unschedulable`; a non-datetime raises `TypeError`. Never blocks. With
        ``key=``, returns the key's pending instance if there is one.
        """
        return self._submit_later(task, opts, 0.0, aware(at).timestamp())

    def _submit_later(
        self, task: Any, opts: dict[str, Any], wait: float, timestamp: float | None
    ) -> MemoryHandler[Any]:
        """Submit to the scheduler: `wait` seconds from now, or at the wall-clock
        `timestamp` when one is given. The hot path of `delay` and `schedule`."""
        fresh = not opts and type(task) is _FUNCTION
        handler = (
            MemoryHandler(self, task, DEFAULT_OPTIONS, None)
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

    def _claim_locked(self, handler: MemoryHandler[Any]) -> MemoryHandler[Any] | None:
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

    def _admit_locked(self, handler: MemoryHandler[Any]) -> None:
        """Raise unless `handler` may be submitted now."""
        if self._state is not Lifecycle.RUNNING:
            raise TaskManagerStopped()
        if handler._submitted_at is not None or handler._state not in (
            _PENDING,
            TaskState.CANCELLED,
        ):
            # Submitted before, or being run by exec() without a submission.
            raise ValueError(f"{handler!r} was already submitted: a handler runs once")

    # -- keys, rescheduling, inspection ------------------------------------------

    def get(self, key: str) -> MemoryHandler[Any] | None:
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
            target: MemoryHandler[Any] | MemoryPeriodic | None = None
            if isinstance(task, TaskHandler):
                if not isinstance(task, MemoryHandler) or task._owner is not self:
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

    def pending(self, limit: int | None = None) -> list[TaskHandler[Any]]:
        """A snapshot of every task waiting to run: queued ones in queue order (then
        those held by a group limit or a key, and those kept while stopped), then
        scheduled ones in due order; the first `limit` of them (None: all)."""
        if limit is not None and (
            not isinstance(limit, int) or isinstance(limit, bool) or limit < 0
        ):
            raise ValueError(f"limit must be an int >= 0 or None, not {limit!r}")
        with self._lock:
            seen: set[MemoryHandler[Any]] = set()
            out: list[TaskHandler[Any]] = []
            queued: list[MemoryHandler[Any]] = (
                [] if self._queue is None else self._queue.snapshot_locked()
            )
            queued.extend(self._parked)
            queued.extend(self._kept)
            for handler in queued:
                if handler._state is _PENDING and handler not in seen:
                    seen.add(handler)
                    out.append(handler)
            for item in self._scheduler._items_locked():
                if isinstance(item, MemoryHandler) and item._state is _SCHEDULED:
                    out.append(item)
            return out if limit is None else out[:limit]

    def handler(self, task_id: int) -> TaskHandler[Any] | None:
        """The handler of a task of this manager that waits or runs now, by id (O(n):
        for inspection); None for a task that ended (its handler is the caller's)."""
        if not isinstance(task_id, int) or isinstance(task_id, bool):
            raise TypeError(f"task_id must be an int, not {task_id!r}")
        with self._lock:
            for handler in self._running:
                if handler.id == task_id:
                    return handler
        for waiting in self.pending():
            if waiting.id == task_id:
                return waiting
        return None

    # -- groups and stats --------------------------------------------------------

    def set_limit(self, group: str, limit: int) -> None:
        """Set or add a group's limit while running (or not).

        `limit` must be an int >= 1 (else `ValueError`). Raising it starts waiting
        tasks at once; lowering it lets running tasks finish and holds new starts
        until the group is under the new limit.
        """
        check_limit(group, limit)
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
                    if self._state is not Lifecycle.STOPPED
                    else 0.0
                ),
            )

    # -- the scheduler's side ----------------------------------------------------

    def _periodic_due(self, periodic: MemoryPeriodic) -> None:
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
                run: MemoryHandler[Any] = MemoryHandler(
                    self, periodic._fn, periodic._opts, periodic._name
                )
                slot.pending = run
                periodic._last = run
                self._count_locked(run, _PENDING)
                self._enqueue_locked(run)
            if not periodic._fixed_delay:
                self._plan_locked(periodic, periodic._following(time.monotonic(), time.time()))

    def _on_due(self, item: MemoryHandler[Any] | Context | MemoryPeriodic) -> None:
        """Called by the scheduler thread for each due item."""
        if isinstance(item, MemoryHandler):
            with self._lock:
                if item._state is _SCHEDULED:
                    item._state = _PENDING
                    self._scheduled -= 1
                    self._enqueue_locked(item)
        elif isinstance(item, MemoryPeriodic):
            self._periodic_due(item)
        else:
            self._overrun(item)

    def _overrun(self, ctx: Context) -> None:
        """An attempt's deadline passed: report it once if that attempt still runs."""
        handler = ctx._task
        if isinstance(handler, MemoryHandler) and handler._ctx is ctx:
            self._log.warning(
                "task still running past its deadline",
                task_id=handler.id,
                task=handler.name,
                attempt=ctx.attempt,
            )

    # -- fork --------------------------------------------------------------------

    def _fork_child_locked(self) -> None:
        """In a child made by fork: queued tasks are kept for this process's `start()`;
        tasks whose attempt was under way run in the parent, so here they end
        cancelled (their callbacks do not run in the child). Delayed, scheduled and
        periodic work stays in the scheduler."""
        self._joiners = 0
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
