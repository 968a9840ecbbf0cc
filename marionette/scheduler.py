"""Scheduler: one thread that hands each item to `out` once it is due, never before.

The thread sleeps on a `threading.Condition` until the earliest deadline or until
something interrupts it (an earlier entry, `wake()`, `stop()`); it never ticks.

Data structure. Entries are ``(deadline, seq, item, wall)`` tuples in two binary
heaps (`heapq`, in C): one for monotonic deadlines (`delay`) and one for wall-clock
times (`schedule`), so that a time given as a `datetime` is honoured against the wall
clock even if the system clock is set back (it is never handed out early). `seq`
breaks ties, so items are never compared. A dict maps each item to its live entry;
`cancel` deletes from the dict in O(1) and leaves the heap entry behind as dead
(lazy deletion); dead entries are skipped when they reach the top, and both heaps are
rebuilt in O(n) once the dead outnumber the live, which keeps the amortized cost of
a cancel O(1) and memory bounded.

Why not the alternatives (bench/, 1,000,000 entries, four runs on this machine):
`bisect.insort` on a list pays an O(n) memmove per insert (177-263 us per insert,
160-197 us per cancel); `sortedcontainers.SortedList` keeps both O(log n) but runs
them in Python (7.3-9.6 us per insert, 6.3-8.4 us per cancel); the heap pushes in C
(0.65-1.01 us per insert, tuple and dict insert included) and the dict makes a
cancel O(1) (1.2-1.7 us). The heap pays in memory (161 B per entry against 106 B
for SortedList). See ``bench/README.md``.

Locking. `Scheduler._lock` guards the timeline (both heaps and the dict), the
lifecycle state, the thread and the pass counter; the two Conditions share it.
`out` is always called with no lock held, from the scheduler thread only. Callers
may hold their own lock while calling into the scheduler, never the other way
round. A `TaskManager` instead gives its scheduler its own lock (``_lock=``): a
submission then takes one lock, not two (a tenth of a `delay()`), the manager calls
the ``*_locked`` methods with it held, and the manager's fork hooks hold it.
"""

from __future__ import annotations

import enum
import heapq
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any, Generic, TypeVar

from . import _threads
from ._log import Log
from ._time import aware, monotonic_to_utc, seconds, timestamp_to_utc
from .errors import Unschedulable, describe, safe_repr

__all__ = ["Scheduler"]

T = TypeVar("T")

# (deadline, seq, item, wall): `deadline` is a time.monotonic() value, or a
# time.time() value when `wall` is true.
_Entry = tuple[float, int, Any, bool]

# Compaction only pays off past this many dead entries.
_MIN_DEAD_TO_COMPACT = 1024

#: The process-wide sequence: entry tie-breakers and task ids are drawn from it, so
#: an item's own id can serve as its entry's `seq` (one int less per pending task)
#: and seqs stay unique whatever the mix of items. Atomic under the GIL.
next_sequence = iter(range(1, 1 << 62)).__next__


class _Timeline:
    """The pending entries: pure data, no lock, no thread, no clock of its own.

    Callers pass the current time in, which keeps "what is due at `now`, and how long
    until the next" a function that tests can drive without threads.
    """

    __slots__ = ("_dead", "_entries", "_mono", "_wall")

    def __init__(self) -> None:
        self._mono: list[_Entry] = []
        self._wall: list[_Entry] = []
        self._entries: dict[Any, _Entry] = {}
        self._dead = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, item: object) -> bool:
        return item in self._entries

    def push(self, item: Any, deadline: float, wall: bool, seq: int | None = None) -> bool:
        """Add `item` (moving it if it is pending); True if it is now the first of its heap.

        `seq` breaks ties between equal deadlines: a fresh `next_sequence()` unless the
        caller passes one drawn from it earlier (an item's id).
        """
        moved = item in self._entries
        first = self.add(item, deadline, wall, next_sequence() if seq is None else seq)
        if moved:  # its old entry stays in a heap, dead (a compaction now drops it)
            self._bury()
        return first

    def add(self, item: Any, deadline: float, wall: bool, seq: int) -> bool:
        """`push` for an item known not to be pending: no check for a move."""
        entry = (deadline, seq, item, wall)
        self._entries[item] = entry
        heap = self._wall if wall else self._mono
        heapq.heappush(heap, entry)
        return heap[0] is entry

    def remove(self, item: Any) -> bool:
        """Forget `item`; False if it was not pending."""
        if self._entries.pop(item, None) is None:
            return False
        self._bury()
        return True

    def _bury(self) -> None:
        """Count one more dead heap entry; rebuild once the dead outnumber the live."""
        self._dead += 1
        if self._dead > _MIN_DEAD_TO_COMPACT and self._dead > len(self._entries):
            self._compact()

    def get(self, item: Any) -> tuple[float, bool] | None:
        """`(deadline, wall)` of a pending item, or None."""
        entry = self._entries.get(item)
        return None if entry is None else (entry[0], entry[3])

    def pop_due(self, now: float, wall_now: float) -> list[Any]:
        """Remove and return every item due at `now` / `wall_now`, in due order."""
        due: list[_Entry] = []
        self._pop_heap(self._mono, now, due)
        crossed = bool(due)
        self._pop_heap(self._wall, wall_now, due)
        if crossed and len(due) > 1 and due[-1][3]:
            # Both clocks contributed: order the batch on one clock.
            due.sort(key=lambda e: (e[0] - wall_now + now if e[3] else e[0], e[1]))
        return [entry[2] for entry in due]

    def _pop_heap(self, heap: list[_Entry], now: float, due: list[_Entry]) -> None:
        entries = self._entries
        while heap and heap[0][0] <= now:
            entry = heapq.heappop(heap)
            if entries.get(entry[2]) is entry:
                del entries[entry[2]]
                due.append(entry)
            else:
                self._dead -= 1

    def wait_time(self, now: float, wall_now: float) -> float | None:
        """Seconds until the next entry is due (0 if one is), None when empty."""
        first = self._first_deadline(now, wall_now)
        return None if first is None else max(0.0, first - now)

    def _first_deadline(self, now: float, wall_now: float) -> float | None:
        """The earliest live deadline, on the monotonic clock."""
        best: float | None = None
        for heap, offset in ((self._mono, 0.0), (self._wall, now - wall_now)):
            self._drop_dead_top(heap)
            if heap:
                deadline = heap[0][0] + offset
                if best is None or deadline < best:
                    best = deadline
        return best

    def _drop_dead_top(self, heap: list[_Entry]) -> None:
        entries = self._entries
        while heap and entries.get(heap[0][2]) is not heap[0]:
            heapq.heappop(heap)
            self._dead -= 1

    def ordered(self, now: float, wall_now: float) -> Iterator[tuple[float, Any]]:
        """Every live `(monotonic deadline, item)`, in due order. O(n log n)."""
        offset = now - wall_now
        keyed = sorted(
            (e[0] + offset if e[3] else e[0], e[1], e[2]) for e in self._entries.values()
        )
        return ((deadline, item) for deadline, _, item in keyed)

    def _compact(self) -> None:
        entries = self._entries
        self._mono = [e for e in self._mono if entries.get(e[2]) is e]
        self._wall = [e for e in self._wall if entries.get(e[2]) is e]
        heapq.heapify(self._mono)
        heapq.heapify(self._wall)
        self._dead = 0


class _State(enum.Enum):
    STOPPED = "stopped"
    RUNNING = "running"


class Scheduler(Generic[T]):
    """Hands each item to ``out(item)`` on the scheduler thread once it is due.

    Items are the keys of a dict (hashable, compared with ``==``): an item is pending
    at most once, and delaying or scheduling an item that is already pending moves it
    to the new time. `out` is called with no lock held; if it raises, the error is
    logged and the scheduler carries on. Items may be added, moved or cancelled from
    any thread, whether the scheduler is running or not: a stopped scheduler keeps
    its items and hands them out after the next `start()`. In a child made by
    `os.fork()` the scheduler is stopped and keeps its items, including the rest of
    a batch the parent's thread was handing out (from the item whose `out` call was
    under way, since that call never completes in the child).
    """

    def __init__(
        self,
        out: Callable[[T], object],
        logger: Any = None,
        *,
        name: str = "marionette-scheduler",
        _lock: threading.Lock | None = None,
    ) -> None:
        if not callable(out):
            raise TypeError(f"out must be callable, not {out!r}")
        self._out = out
        self._log = logger if isinstance(logger, Log) else Log(logger)
        self._name = name
        # Guards _timeline, _state, _thread and _passes. _wakeup wakes the thread;
        # _passed wakes callers of wake() waiting for the thread to finish a pass.
        # An owner's lock (see the module docstring) is held around fork by its owner.
        self._shared = _lock is not None
        self._lock = threading.Lock() if _lock is None else _lock
        self._wakeup = threading.Condition(self._lock)
        self._passed = threading.Condition(self._lock)
        self._timeline = _Timeline()
        self._state = _State.STOPPED
        self._thread: threading.Thread | None = None
        self._passes = 0
        # The batch the thread is handing out, and how many of it it has handed out:
        # written only by the thread, read by the fork hook (see _fork_child).
        self._batch: list[T] = []
        self._handed = 0
        _threads.forkable(self)

    # -- fork (see _threads): a child gets a stopped scheduler with its items ----

    _fork_rank = 1

    def _fork_prepare(self) -> None:
        if not self._shared:
            self._lock.acquire()

    def _fork_parent(self) -> None:
        if not self._shared:
            self._lock.release()

    def _fork_child(self) -> None:
        # Items the thread had taken out but not yet handed over are due here too,
        # the one whose out() was under way included: that call never ends here.
        now = time.monotonic()
        for item in self._batch[self._handed :]:
            if item not in self._timeline:
                self._timeline.push(item, now, False)
        self._batch, self._handed = [], 0
        self._state = _State.STOPPED
        self._thread = None
        # Waiters of the parent's threads would swallow notifications here.
        self._wakeup = threading.Condition(self._lock)
        self._passed = threading.Condition(self._lock)
        if not self._shared:
            self._lock.release()

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        """Start the scheduler thread; a no-op when running. Any thread may call it."""
        with self._lock:
            if self._state is _State.RUNNING:
                return
            previous = self._thread
        if previous is not None and previous is not threading.current_thread():
            previous.join()  # a stop() from inside `out` left it finishing its batch
        with self._lock:
            if self.is_running():  # another start() won the race
                return
            self._state = _State.RUNNING
            thread = self._thread = threading.Thread(target=self._run, name=self._name)
            thread.start()
        _threads.track(self)

    def stop(self) -> None:
        """Stop the thread and wait for it to finish handing out the current batch.

        Pending items are kept for a restart. A no-op when stopped. Called from
        inside `out`, it returns at once and the thread ends after that batch.
        """
        with self._lock:
            if self._state is _State.STOPPED:
                return
            self._state = _State.STOPPED
            thread = self._thread
            self._wakeup.notify()
            self._passed.notify_all()
        _threads.untrack(self)
        if thread is not None and thread is not threading.current_thread():
            thread.join()
            with self._lock:
                if self._thread is thread:
                    self._thread = None

    def is_running(self) -> bool:
        return self._state is _State.RUNNING

    # -- entries ---------------------------------------------------------------

    def delay(self, delay: float, item: T) -> None:
        """Hand `item` out `delay` seconds (or a `timedelta`) from now; negative means now.

        NaN or infinity raise `Unschedulable`; a non-number raises `TypeError`. Any
        finite delay is accepted, however long. Never blocks on the thread.
        """
        deadline = time.monotonic() + seconds(delay, "delay", error=Unschedulable)
        self._push(item, deadline, wall=False)

    def schedule(self, at: datetime, item: T) -> None:
        """Hand `item` out on or after the aware `datetime` `at`; a past time means now.

        The time is kept on the wall clock. None, the zero timestamp or a naive
        datetime raise `Unschedulable`; a non-datetime raises `TypeError`.
        """
        self._push(item, aware(at).timestamp(), wall=True)

    def reschedule(self, item: T, when: float | datetime, *, only_sooner: bool = False) -> bool:
        """Move a pending `item` to `when`: a delay in seconds (or `timedelta`) or an
        aware `datetime`. Returns whether it moved: False when the item is not
        pending, or with `only_sooner` when `when` is not earlier than its time.
        """
        if isinstance(when, datetime):
            deadline, wall = aware(when, "when").timestamp(), True
        else:
            deadline, wall = time.monotonic() + seconds(when, "when", error=Unschedulable), False
        with self._lock:
            return self._reschedule_locked(item, deadline, wall, only_sooner)

    def _reschedule_locked(self, item: T, deadline: float, wall: bool, only_sooner: bool) -> bool:
        current = self._timeline.get(item)
        if current is None:
            return False
        if only_sooner:
            offset = time.monotonic() - time.time()
            new = deadline + offset if wall else deadline
            old = current[0] + offset if current[1] else current[0]
            if new >= old:
                return False
        self._push_locked(item, deadline, wall)
        return True

    def items(self) -> list[T]:
        """A snapshot of the pending items, in due order. O(n log n)."""
        with self._lock:
            return self._items_locked()

    def _items_locked(self) -> list[T]:
        return [item for _, item in self._timeline.ordered(time.monotonic(), time.time())]

    def _push(self, item: T, deadline: float, wall: bool) -> None:
        with self._lock:
            self._push_locked(item, deadline, wall)

    def _push_locked(self, item: T, deadline: float, wall: bool) -> None:
        """Add or move `item`: `deadline` is monotonic, or a timestamp if `wall`."""
        if self._timeline.push(item, deadline, wall):
            self._wakeup.notify()

    def _arm_locked(self, item: T, deadline: float) -> None:
        """Hand `item` out at the monotonic `deadline`, unless it is pending earlier."""
        current = self._timeline.get(item)
        if current is not None and not current[1] and current[0] <= deadline:
            return
        self._push_locked(item, deadline, False)

    def _add_locked(self, item: T, deadline: float, wall: bool, seq: int) -> None:
        """`_push_locked` for an item known not to be pending (a task's first
        submission), with its own `seq` (the task's id)."""
        if self._timeline.add(item, deadline, wall, seq):
            self._wakeup.notify()

    def cancel(self, item: T) -> bool:
        """Remove a pending `item`; False if it was not pending (or already handed out)."""
        with self._lock:
            return self._cancel_locked(item)

    def _cancel_locked(self, item: T) -> bool:
        return self._timeline.remove(item)

    def wake(self) -> None:
        """Re-read the clock now, and return once every item due now was handed out.

        For tests that move a frozen clock, and after the system clock jumps. On a
        stopped scheduler, or from inside `out`, it returns at once.
        """
        with self._lock:
            self._wakeup.notify()
            thread = self._thread
            if self._state is not _State.RUNNING or thread is threading.current_thread():
                return
            target = self._passes + 1
            while self._passes < target and self._state is _State.RUNNING:
                self._passed.wait()

    def __len__(self) -> int:
        """Pending items (items being handed out right now are no longer counted)."""
        with self._lock:
            return len(self._timeline)

    def next_due(self) -> datetime | None:
        """The aware UTC time at which the earliest pending item is due, or None."""
        with self._lock:
            now, wall_now = time.monotonic(), time.time()
            first = self._timeline._first_deadline(now, wall_now)
        return None if first is None else timestamp_to_utc(wall_now + (first - now))

    def due(self, item: T) -> datetime | None:
        """The aware UTC time at which `item` is due, or None if it is not pending."""
        with self._lock:
            return self._peek(item)

    def _peek(self, item: T) -> datetime | None:
        """`due` without the lock, for a repr (which may be made with the lock held):
        one dict read, atomic in CPython."""
        found = self._timeline.get(item)
        if found is None:
            return None
        deadline, wall = found
        return timestamp_to_utc(deadline) if wall else monotonic_to_utc(deadline)

    # -- the thread ------------------------------------------------------------

    def _run(self) -> None:
        lock, timeline, out = self._lock, self._timeline, self._out
        while True:
            with lock:
                while True:
                    if self._state is not _State.RUNNING:
                        return
                    due = timeline.pop_due(time.monotonic(), time.time())
                    if due:
                        break
                    self._passes += 1
                    self._passed.notify_all()
                    timeout = timeline.wait_time(time.monotonic(), time.time())
                    if timeout is None:
                        self._wakeup.wait()
                    else:
                        self._wakeup.wait(min(timeout, threading.TIMEOUT_MAX))
            self._batch, self._handed = due, 0
            for item in due:
                try:
                    out(item)
                except BaseException as exc:  # the thread must outlive any item
                    self._log.error(
                        "scheduler out raised", item=safe_repr(item), error=describe(exc)
                    )
                self._handed += 1  # for the fork hook: a plain store, read only there
            self._batch = []
            del due, item  # what was handed out must not live on while this thread sleeps
