"""Gates a task passes before it starts: its key's slot and its group's limit.

Both are plain data owned by a `TaskManager` and changed only under its lock; they
never run user code. A task that cannot pass a gate is parked here, holding no
worker, and handed back (to the front of the queue) when the gate opens.
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING, Any

from marionette.backends.memory.handler import MemoryHandler
from marionette.handler import TaskState

if TYPE_CHECKING:
    from marionette.backends.memory.periodic import MemoryPeriodic

__all__ = ["Group", "Slot"]


class Slot:
    """One name's instances: at most one pending and one running at a time.

    `pending` was submitted and has not started (queued, scheduled, or parked here
    because `running` still runs); `running` has started and not ended for good (a
    retry waiting for its backoff still counts as running). A keyed task and the
    runs of a periodic use a slot; a periodic with a key shares that key's slot.
    """

    __slots__ = ("key", "parked", "pending", "periodic", "running")

    def __init__(self, key: str | None) -> None:
        self.key = key
        self.pending: MemoryHandler[Any] | None = None
        self.running: MemoryHandler[Any] | None = None
        self.parked = False  # `pending` waits here for `running` to end
        self.periodic: MemoryPeriodic | None = None

    def admit(self, handler: MemoryHandler[Any]) -> bool:
        """May `handler` start now? If not, it is parked until `running` ends."""
        if self.running is not None and self.running is not handler:
            self.parked = True
            return False
        if self.pending is handler:
            self.pending = None
        self.running = handler
        return True

    def ended(self, handler: MemoryHandler[Any]) -> MemoryHandler[Any] | None:
        """`handler` ended for good (or was cancelled): the parked task to release."""
        if self.pending is handler:
            self.pending = None
            self.parked = False
        if self.running is not handler:
            return None
        self.running = None
        if self.parked and self.pending is not None:
            self.parked = False
            return self.pending
        return None

    def idle(self) -> bool:
        """Nothing uses the slot any more: its owner may forget it."""
        return self.pending is None and self.running is None and self.periodic is None


class Group:
    """A concurrency limit: at most `limit` of the group's tasks run at once.

    `running` counts tasks running plus tasks released to the queue with a slot
    reserved for them (`reserved`), so a release never overshoots the limit.
    Waiting tasks are kept in submission order (the order workers met them).
    """

    __slots__ = ("limit", "name", "reserved", "running", "waiting")

    def __init__(self, name: str, limit: int) -> None:
        self.name = name
        self.limit = limit
        self.running = 0
        self.waiting: collections.deque[MemoryHandler[Any]] = collections.deque()
        self.reserved: set[MemoryHandler[Any]] = set()

    def admit(self, handler: MemoryHandler[Any]) -> bool:
        """Take a slot for `handler`, or park it (False) until one frees."""
        if handler in self.reserved:
            self.reserved.discard(handler)
            if self.running <= self.limit:
                return True
            # The limit was lowered after it was released: back to the head of the line.
            self.running -= 1
            self.waiting.appendleft(handler)
            return False
        if self.running < self.limit and not self.waiting:
            self.running += 1
            return True
        self.waiting.append(handler)
        return False

    def finished(self) -> list[MemoryHandler[Any]]:
        """A running task gave its slot back: the waiting tasks to release."""
        self.running -= 1
        return self._release()

    def forget(self, handler: MemoryHandler[Any]) -> list[MemoryHandler[Any]]:
        """A pending task of the group was cancelled: drop it, free its reservation."""
        if handler in self.reserved:
            self.reserved.discard(handler)
            self.running -= 1
            return self._release()
        try:
            self.waiting.remove(handler)
        except ValueError:  # it was still in the queue, not waiting here
            pass
        return []

    def set_limit(self, limit: int) -> list[MemoryHandler[Any]]:
        """Change the limit: the waiting tasks a higher limit lets start now."""
        self.limit = limit
        return self._release()

    def _release(self) -> list[MemoryHandler[Any]]:
        released = []
        while self.waiting and self.running < self.limit:
            handler = self.waiting.popleft()
            if handler._state is not TaskState.PENDING:
                continue
            self.running += 1
            self.reserved.add(handler)
            released.append(handler)
        return released
