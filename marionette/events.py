"""Task events and the listeners that receive them, one at a time, in order.

Events are recorded in the critical section where they happen (under the manager's
lock), so the buffer holds them in the order they happened. One thread,
``marionette-listener``, started only once a listener exists, takes them out and
calls the listeners with no lock held: a listener can fold results into plain
state without locks of its own, and can submit tasks (its thread is one of the
manager's own, so it never blocks on a full queue).

Back pressure: the buffer is bounded. A worker or submitter that finds it over the
bound waits until the listener thread catches up, so a slow listener stalls the
workers only once the buffer is full. The manager's own scheduler thread and the
listener thread never wait for room (they would wait for themselves), nor does
anyone while the manager stops.
"""

from __future__ import annotations

import collections
import enum
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from . import _threads
from .errors import describe, safe_repr

if TYPE_CHECKING:
    from ._log import Log
    from .handler import TaskHandler

__all__ = ["TaskEvent", "TaskEventKind"]


class TaskEventKind(enum.Enum):
    """What happened to a task."""

    SUBMITTED = "submitted"
    #: Once per attempt.
    STARTED = "started"
    SUCCEEDED = "succeeded"
    #: An attempt failed and the task will be tried again; `error` is the attempt's.
    RETRYING = "retrying"
    #: Failed for good; `error` is the `TaskError` (or the `BaseException` raised).
    FAILED = "failed"
    CANCELLED = "cancelled"
    #: A periodic occurrence was merged into `task`, a run that had not started.
    COALESCED = "coalesced"


@dataclass(frozen=True, slots=True)
class TaskEvent:
    """One event: its `kind`, the `task` handler, when (`at`, aware UTC), and the
    `error` (RETRYING, FAILED) or `result` (SUCCEEDED) it carries."""

    kind: TaskEventKind
    task: TaskHandler[Any]
    at: datetime
    error: BaseException | None = None
    result: Any = None


Listener = Callable[[TaskEvent], object]

#: Events buffered before workers wait for the listener thread.
BUFFER = 1024


class Dispatcher:
    """A manager's listeners, its event buffer and the thread that delivers it.

    Guarded by the manager's lock (passed in): `emit_locked`, `add_locked`,
    `start_locked` expect it held; the other methods take it.
    """

    def __init__(self, owner: object, lock: threading.Lock, log: Log, name: str) -> None:
        self._owner = owner
        self._lock = lock
        self._log = log
        self._name = name
        self._ready = threading.Condition(lock)  # events arrived, or stop
        self._room = threading.Condition(lock)  # the buffer drained below the bound
        self._events: collections.deque[TaskEvent] = collections.deque()
        self._listeners: tuple[tuple[Listener, frozenset[TaskEventKind]], ...] = ()
        #: The kinds some listener wants: read by emitters before building an event.
        self.wanted: frozenset[TaskEventKind] = frozenset()
        self._thread: threading.Thread | None = None
        # The delivery thread of the last stop, which may still be finishing its batch:
        # its successor waits for it, so that listeners are never called twice at once.
        self._previous: threading.Thread | None = None
        # Every delivery thread not yet ended, the current one and those finishing
        # after a stop: none of them may wait for another (they wait for each other).
        self._alive: set[threading.Thread] = set()
        # Each delivery thread serves one generation; stopping starts the next, so
        # a thread that outlived a stop can never deliver beside its successor.
        self._generation = 0
        self._delivering = False  # the thread is calling listeners outside the lock
        self._unbounded = False  # while the manager stops, nobody waits for room

    # -- listeners -------------------------------------------------------------

    def add_locked(self, fn: Listener, kinds: Iterable[TaskEventKind] | None) -> Callable[[], None]:
        wanted = frozenset(TaskEventKind) if kinds is None else frozenset(kinds)
        entry = (fn, wanted)
        self._listeners = (*self._listeners, entry)
        self.wanted = self.wanted | wanted

        def remove() -> None:
            with self._lock:
                self._listeners = tuple(e for e in self._listeners if e is not entry)
                self.wanted = frozenset().union(*(kinds for _, kinds in self._listeners))

        return remove

    # -- emitting --------------------------------------------------------------

    def emit_locked(
        self,
        kind: TaskEventKind,
        task: TaskHandler[Any],
        error: BaseException | None = None,
        result: Any = None,
    ) -> None:
        """Record an event (the caller checked `kind in wanted`)."""
        self._events.append(TaskEvent(kind, task, datetime.now(UTC), error, result))
        if len(self._events) == 1:
            self._ready.notify()

    def over(self) -> bool:
        """Is the buffer over its bound? (A cheap, unlocked hint for emitters.)"""
        return len(self._events) > BUFFER

    def wait_for_room(self) -> None:
        """Block until the buffer is back under its bound (or nobody can drain it)."""
        with self._lock:
            while (
                len(self._events) > BUFFER
                and not self._unbounded
                and self._thread is not None
                and threading.current_thread() not in self._alive
            ):
                self._room.wait()

    # -- the thread ------------------------------------------------------------

    def start_locked(self) -> threading.Thread | None:
        """Make the delivery thread if listeners exist and none runs; the caller
        starts the returned thread once the lock is released."""
        self._unbounded = False  # a new run (or one a task started while its stop ran)
        if self._thread is not None or not self._listeners:
            return None
        self._thread = threading.Thread(
            target=self._run, args=(self._generation, self._previous), name=f"{self._name}-listener"
        )
        self._alive.add(self._thread)
        return self._thread

    def fork_child_locked(self) -> None:
        """In a child made by fork: no delivery thread exists; events stay buffered."""
        self._ready = threading.Condition(self._lock)
        self._room = threading.Condition(self._lock)
        self._thread = self._previous = None
        self._alive.clear()
        self._delivering = False
        self._generation += 1

    def unbound_locked(self) -> None:
        """Stop back pressure (the manager is stopping): release every waiter."""
        self._unbounded = True
        self._room.notify_all()

    def drain(self, deadline: float | None) -> None:
        """Wait until every buffered event was delivered, then stop the thread.

        `deadline` is a `time.monotonic()` value or None; events left when it passes
        stay buffered for the next start. Never called from a delivery thread: a
        stop() from a listener is finished by the manager's stopper thread.
        """
        with self._lock:
            thread = self._thread
            if thread is None:
                return
            while self._events or self._delivering:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                self._room.wait(
                    None if remaining is None else min(remaining, threading.TIMEOUT_MAX)
                )
            self._generation += 1
            self._thread = None
            self._previous = thread
            self._ready.notify_all()
            self._room.notify_all()
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        thread.join(None if remaining is None else min(remaining, threading.TIMEOUT_MAX))

    def _run(self, generation: int, previous: threading.Thread | None) -> None:
        try:
            if previous is not None:
                previous.join()  # it delivers the rest of its batch first, in order
            with _threads.owned(self._owner):
                self._deliver(generation)
        finally:
            with self._lock:
                self._alive.discard(threading.current_thread())

    def _deliver(self, generation: int) -> None:
        lock = self._lock
        while True:
            with lock:
                self._delivering = False
                self._room.notify_all()
                while not self._events and self._generation == generation:
                    self._ready.wait()
                if self._generation != generation:
                    return  # stopped: a successor waits for this thread to end
                batch = list(self._events)
                self._events.clear()
                listeners = self._listeners
                self._delivering = True
                self._room.notify_all()
            self._call(batch, listeners)
            del batch  # let the delivered events go while this thread waits

    def _call(
        self,
        events: Iterable[TaskEvent],
        listeners: tuple[tuple[Listener, frozenset[TaskEventKind]], ...],
    ) -> None:
        for event in events:
            for fn, kinds in listeners:
                if event.kind in kinds:
                    try:
                        fn(event)
                    except BaseException as exc:  # a listener that raises is kept
                        self._log.error(
                            "listener raised",
                            listener=safe_repr(fn),
                            kind=event.kind.value,
                            task_id=event.task.id,
                            error=describe(exc),
                        )
