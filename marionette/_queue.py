"""The bounded task queue of one run: a `queue.Queue` on the manager's lock."""

from __future__ import annotations

import queue
import threading

from .handler import TaskHandler

__all__ = ["TaskQueue"]


class TaskQueue(queue.Queue[TaskHandler | None]):
    """The bounded task queue of one run: a `queue.Queue` on the manager's lock.

    Sharing the lock makes a submission, or a worker's take-and-start, a single
    critical section. The ``*_locked`` methods expect that lock held. Unlike
    `queue.Queue`, they count the threads waiting on each Condition and notify only
    when one waits: `Condition.notify()` probes its lock even when nobody waits,
    which costs about as much as the rest of a put. Idle workers are woken one at a
    time: a put wakes a worker only if no wake-up is already on its way, and a woken
    worker that leaves items behind wakes the next. Waking all of them at once on
    a burst makes them fight the producer for the GIL and costs throughput. For
    the same reason a producer blocked on a full queue is woken once it has drained
    to half, so that it refills in a batch.
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
        #: The tasks those producers are waiting to put.
        self.blocked: list[TaskHandler] = []

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
        if self._putters and len(items) <= self.maxsize // 2:
            # Wake a blocked producer once half the room is free, not at every take:
            # it then refills in a batch instead of one hand-off per task.
            self.not_full.notify()
        return item

    def push_front_locked(self, items: list[TaskHandler]) -> None:
        """Put `items`, in order, ahead of everything: tasks a gate just released
        (they waited already, and must run before the stop signals)."""
        self.queue.extendleft(reversed(items))
        if self._takers > self._waking == 0:
            self._waking = 1
            self.not_empty.notify()

    def snapshot_locked(self) -> list[TaskHandler]:
        return [item for item in self.queue if item is not None]

    def put_blocking(self, item: TaskHandler) -> bool:
        """Wait for room and put; False (nothing put) once the queue is closed.

        Takes the lock itself: called by a producer that holds nothing.
        """
        with self.mutex:
            if not self.closed and len(self.queue) >= self.maxsize:
                self.blocked.append(item)  # for the fork hook: counted, in no queue yet
                try:
                    while not self.closed and len(self.queue) >= self.maxsize:
                        self._putters += 1
                        try:
                            self.not_full.wait()
                        finally:
                            self._putters -= 1
                finally:
                    self.blocked.remove(item)
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
