"""The in-memory backend's state: what its other modules read and change.

The in-memory manager is one class (`MemoryManager`) read in four layers, each a
module, each building on the one before: this one (the state and the few helpers
every layer uses), `_reactive` (keys, gates and periodics), `_workers` (the worker
loop and each attempt's outcome), and `manager` (submission and inspection). They
are one class because the hot path (submit, take, start, settle) needs their state
in one critical section: splitting it behind method calls would cost the speed the
benchmarks hold it to.

Locking. Everything here is guarded by the manager's one lock, `_lock` (see
`marionette.manager`): the kept tasks, the running set, the keys, the parked tasks,
the groups, the counters, and the state of every handler the manager made (handlers
have no lock of their own). The ``*_locked`` methods expect it held.
"""

from __future__ import annotations

import collections
import time
import types
from collections.abc import Callable
from typing import Any

from marionette._queue import TaskQueue
from marionette.backends.memory.handler import MemoryHandler
from marionette.backends.memory.periodic import MemoryPeriodic
from marionette.config import Config
from marionette.context import Context
from marionette.events import TaskEventKind
from marionette.handler import Options, TaskState, default_name, parse_options
from marionette.manager import TaskManager
from marionette.registry import Call

from ._gates import Group, Slot

__all__ = ["MemoryCore"]

_PENDING = TaskState.PENDING
_Kind = TaskEventKind
_FUNCTION = types.FunctionType


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


class MemoryCore(TaskManager):
    """The state of an in-memory manager, and the helpers every layer uses."""

    def __init__(self, config: Config | None = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        config = self._config
        # Pending tasks between runs (queued when a stop timed out, or due while
        # stopped); start() queues them first.
        self._kept: collections.deque[MemoryHandler[Any]] = collections.deque()
        self._running: set[MemoryHandler[Any]] = set()
        self._keys: dict[str, Slot] = {}
        # Tasks a gate holds (their key's other instance runs, or their group is
        # full), in the order they were held; released to the front of the queue.
        self._parked: dict[MemoryHandler[Any], None] = {}
        self._groups = {name: Group(name, n) for name, n in config.limits.items()}
        # The periodics not cancelled, in the order they were made.
        self._periodics: dict[MemoryPeriodic, None] = {}
        self._active = 0  # submitted and not finished: what join() waits for
        self._scheduled = 0  # of those, waiting in the scheduler
        self._foreign = 0  # attempts run by exec() rather than by a worker
        self._joiners = 0
        self._submitted = self._succeeded = self._failed = 0
        self._retried = self._cancelled = self._coalesced = 0

    # -- the lifecycle's hooks (see TaskManager) ---------------------------------

    def _fill_locked(self, q: TaskQueue) -> None:
        while self._kept:
            handler = self._kept.popleft()
            if handler._state is _PENDING:
                q.force_locked(handler)

    def _keep_locked(self, leftover: list[Any], current: bool) -> None:
        for handler in leftover:
            if handler._state is not _PENDING:
                continue
            if current:
                self._kept.append(handler)
            else:
                self._enqueue_locked(handler)

    def _running_contexts_locked(self) -> list[Context]:
        return [h._ctx for h in self._running if h._ctx is not None]

    def _kept_count_locked(self) -> int:
        return len(self._kept) + self._scheduled

    # -- helpers -----------------------------------------------------------------

    def _prepare(self, task: Any, opts: dict[str, Any]) -> tuple[Any, Options, str | None]:
        fn = _callable_of(task)
        if fn is not task and type(task) is Call:  # never reached by a plain function
            # A registered task's options are the defaults; the submission's win.
            opts = {**task.task.defaults, **opts}
        options, name = parse_options(opts)
        if options.group is not None and options.group not in self._groups:
            raise ValueError(
                f"unknown group {options.group!r}: configure it in Config.limits or set_limit()"
            )
        if name is None and fn is not task:  # a Task object: named after the object
            name = default_name(task)
        return fn, options, name

    def _count_locked(self, handler: MemoryHandler[Any], state: TaskState) -> None:
        handler._due = handler._submitted_at = time.monotonic()
        handler._state = state
        self._active += 1
        self._submitted += 1
        parent = handler._opts.context
        if parent is not None:
            parent._on_done(handler, handler._parent_done)
        if self._events.wanted:
            self._emit_locked(_Kind.SUBMITTED, handler)

    def _after_submit(self, handler: MemoryHandler[Any]) -> None:
        """After a submission, with no lock held: a task whose ``context=`` is
        already done is cancelled; a submitter waits while listeners lag far behind."""
        parent = handler._opts.context
        if parent is not None and parent.done():
            handler.cancel()
        if self._events.wanted and self._events.over():
            self._events.wait_for_room()

    def _enqueue_locked(self, handler: MemoryHandler[Any]) -> None:
        """Queue a due task from inside the manager: never blocks, never lost."""
        q = self._queue
        if q is None or q.closed:
            self._kept.append(handler)
        else:
            q.force_locked(handler)

    def _release_locked(self, handlers: list[MemoryHandler[Any]]) -> None:
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

    def _forget_slot_locked(self, slot: Slot) -> None:
        if slot.key is not None and slot.idle() and self._keys.get(slot.key) is slot:
            del self._keys[slot.key]
