"""The bounded task queue of one run: a `queue.Queue` on the manager's lock.

Its items are whatever the backend queues for its workers (the in-memory backend:
its handlers; the Redis backend: the tasks this process claimed), and ``None``, the
stop signal.
"""

from __future__ import annotations

import collections
import queue
import threading
from typing import Any

__all__ = ["TaskQueue"]


class _Blocked:
    """A producer waiting for room: its task, and the Condition it alone waits on."""

    __slots__ = ("item", "placed", "ready")

    def __init__(self, item: Any, lock: threading.Lock) -> None:
        self.item = item
        self.placed = False  # put in the queue (or taken out by a close) for it
        self.ready = threading.Condition(lock)


class TaskQueue(queue.Queue[Any]):
    """The bounded task queue of one run: a `queue.Queue` on the manager's lock.

    Sharing the lock makes a submission, or a worker's take-and-start, a single
    critical section. The ``*_locked`` methods expect that lock held. Unlike
    `queue.Queue`, they count the threads waiting on each Condition and notify only
    when one waits: `Condition.notify()` probes its lock even when nobody waits,
    which costs about as much as the rest of a put. Idle workers are woken one at a
    time: a put wakes a worker only if no wake-up is already on its way, and a woken
    worker that leaves items behind wakes the next. Waking all of them at once on
    a burst makes them fight the producer for the GIL and costs throughput.

    Producers blocked on a full queue are served first come, first served, by
    hand-off: a worker that makes room puts the first one's task in for it and wakes
    it, so that the manager's own puts (which pass the bound) can never take the
    room a blocked producer waits for. That happens in batches, not at every take:
    once the queue is empty, or half empty while every worker is busy, or, whatever
    the queue holds (the manager's own puts can keep it full for ever), after a
    queue's worth of takes. The woken producer then refills in a batch instead of
    one hand-off per task, and does not fight for the GIL with a worker that drains
    the queue while others idle (waking it at empty rather than at half gave 10%
    more no-op throughput at the default bound here).
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
        self._taken = 0  # takes while producers waited, since the last hand-off
        #: Producers waiting for room, first come first.
        self.blocked: collections.deque[_Blocked] = collections.deque()

    def force_locked(self, item: Any) -> None:
        """Put, even past the bound: for the manager's own threads and stop signals.

        `TaskManager.queue` inlines this (and `has_room_locked`): keep them in step.
        """
        self.queue.append(item)
        if self._takers > self._waking == 0:
            self._waking = 1
            self.not_empty.notify()

    def take_locked(self) -> Any:
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
        item: Any = items.popleft()
        if items and self._takers > self._waking == 0:
            self._waking = 1  # more to do: pass the wake-up on
            self.not_empty.notify()
        if self.blocked:
            self._taken += 1
            if (
                not items
                or self._taken >= self.maxsize
                or (self._takers == 0 and len(items) <= self.maxsize // 2)
            ):
                self._taken = 0
                waiter = self.blocked.popleft()
                waiter.placed = True
                self.force_locked(waiter.item)
                waiter.ready.notify()
        return item

    def push_front_locked(self, items: list[Any]) -> None:
        """Put `items`, in order, ahead of everything: tasks a gate just released
        (they waited already, and must run before the stop signals)."""
        self.queue.extendleft(reversed(items))
        if self._takers > self._waking == 0:
            self._waking = 1
            self.not_empty.notify()

    def snapshot_locked(self) -> list[Any]:
        return [item for item in self.queue if item is not None]

    def has_room_locked(self) -> bool:
        """Room for a producer: under the bound, and nobody waiting before it."""
        return len(self.queue) < self.maxsize and not self.blocked

    def put_blocking(self, item: Any) -> bool:
        """Wait for room and put `item`. True once it is in the queue or among the
        tasks `close_locked` returned; False, with nothing done, if the queue was
        closed already.

        Takes the lock itself: called by a producer that holds nothing. An
        exception while it waits (a KeyboardInterrupt) puts the item anyway, past
        the bound, before it propagates: the submission was already counted.
        """
        with self.mutex:
            if self.closed:
                return False
            if self.has_room_locked():
                self.force_locked(item)
                return True
            waiter = _Blocked(item, self.mutex)
            self.blocked.append(waiter)
            try:
                while not waiter.placed:
                    waiter.ready.wait()
            finally:
                if not waiter.placed:  # interrupted: never lose a counted task
                    self.blocked.remove(waiter)
                    self.force_locked(item)
            return True

    def close_locked(self, sentinels: int) -> list[Any]:
        """Take every task out (the blocked producers' too), leave `sentinels` stop
        signals, and refuse further puts."""
        self.closed = True
        tasks = [item for item in self.queue if item is not None]
        self.queue.clear()
        self.queue.extend([None] * sentinels)
        while self.blocked:
            waiter = self.blocked.popleft()
            tasks.append(waiter.item)
            waiter.placed = True
            waiter.ready.notify()
        self._waking = self._takers
        self.not_empty.notify_all()
        return tasks
