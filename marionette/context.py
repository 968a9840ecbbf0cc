"""Context: cooperative cancellation and deadlines, as Go's `context.Context`.

Python cannot kill a thread, so a task learns that it should stop by looking at its
context: `done()`, `check()`, or `wait(timeout)` instead of `time.sleep`. Cancellation
flows from a parent to its children, never upwards. A context is cheap to make: it
holds no lock or event of its own until a thread waits on it, which is what lets the
manager give every attempt a fresh one on its hot path.

Deadlines are `time.monotonic()` values checked when someone looks (`done`, `err`,
`wait`): no timer thread exists. A child's deadline is never later than its parent's.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable
from typing import Protocol

from ._time import seconds
from .errors import Cancelled, DeadlineExceeded


class TaskRef(Protocol):
    """What a context says of the task it serves: a handler, or a backend's record."""

    @property
    def id(self) -> int: ...
    @property
    def name(self) -> str: ...


__all__ = ["Context"]

# Guards the cancellation tree: every context's `_err` and `_watch` (its children,
# callbacks and event). Cancellation is rare, so one lock for all contexts costs
# nothing on the hot path; it is never held while user code runs.
_lock = threading.Lock()


class _Watch:
    """What a context needs only once someone derives from, hooks or waits on it."""

    __slots__ = ("callbacks", "children", "event")

    def __init__(self) -> None:
        self.children: weakref.WeakSet[Context] | None = None
        self.callbacks: dict[object, Callable[[Context], None]] | None = None
        self.event: threading.Event | None = None


class Context:
    """Cancellation and a deadline shared by a task's attempt and its children.

    Thread-safe: any thread may cancel, wait on, or derive from any context.
    `Context()` makes a new cancellable root; `Context.background()` is the shared
    root that is never cancelled and has no deadline.
    """

    __slots__ = ("__weakref__", "_deadline", "_err", "_parent", "_task", "_watch", "attempt")

    def __init__(self) -> None:
        self._parent: Context | None = None
        self._deadline: float | None = None
        self._err: Cancelled | DeadlineExceeded | None = None
        self._watch: _Watch | None = None
        self._task: TaskRef | None = None
        #: The attempt number (1-based) inside a task; 0 outside any task.
        self.attempt = 0

    @staticmethod
    def background() -> Context:
        """The root context: never cancelled, no deadline. Its `cancel()` raises."""
        return BACKGROUND

    def _child(
        self, deadline: float | None, task: TaskRef | None = None, attempt: int = 0
    ) -> Context:
        """A cancellable child, registered with this context when it can be cancelled.

        With `task`, the child is that task's context for attempt number `attempt`;
        otherwise it inherits this context's task and attempt.
        """
        child = _new(Context)
        child._parent = self
        parent_deadline = self._deadline
        if deadline is None or (parent_deadline is not None and parent_deadline < deadline):
            deadline = parent_deadline
        child._deadline = deadline
        child._err = None
        child._watch = None
        if task is None:
            child._task = self._task
            child.attempt = self.attempt
        else:
            child._task = task
            child.attempt = attempt
        if self is not BACKGROUND:
            with _lock:
                if self._err is not None:
                    child._err = type(self._err)()
                else:
                    watch = self._watch or self._watched()
                    if watch.children is None:
                        watch.children = weakref.WeakSet()
                    watch.children.add(child)
        return child

    def _watched(self) -> _Watch:
        """This context's `_Watch`, made on first use. Call with `_lock` held."""
        watch = self._watch
        if watch is None:
            watch = self._watch = _Watch()
        return watch

    def with_cancel(self) -> Context:
        """A child that can be cancelled on its own; cancelling this one cancels it."""
        return self._child(None)

    def with_timeout(self, timeout: float) -> Context:
        """A child whose deadline is `timeout` seconds (or a `timedelta`) from now.

        A zero or negative timeout gives a child that is already past its deadline.
        NaN or infinity raise `ValueError`; a non-number raises `TypeError`.
        """
        return self._child(time.monotonic() + seconds(timeout, "timeout"))

    @property
    def deadline(self) -> float | None:
        """The `time.monotonic()` value at which this context expires, or None."""
        return self._deadline

    def remaining(self) -> float | None:
        """Seconds until the deadline (0.0 once passed), or None without a deadline."""
        if self._deadline is None:
            return None
        return max(0.0, self._deadline - time.monotonic())

    @property
    def err(self) -> Cancelled | DeadlineExceeded | None:
        """None while live; then the `Cancelled` or `DeadlineExceeded` that ended it."""
        err = self._err
        if err is None and self._deadline is not None and time.monotonic() >= self._deadline:
            self._finish(DeadlineExceeded)
            err = self._err
        return err

    def done(self) -> bool:
        """True once cancelled or past the deadline. Never blocks."""
        return self.err is not None

    def check(self) -> None:
        """Raise `err` if the context is done; a task's cheap cancellation point."""
        err = self.err
        if err is not None:
            raise err

    def cancel(self) -> None:
        """Cancel this context and its children. Idempotent; never blocks.

        The background context cannot be cancelled: its `cancel()` raises `TypeError`.
        """
        if self is BACKGROUND:
            raise TypeError("the background context cannot be cancelled; use with_cancel()")
        self._finish(Cancelled)

    def wait(self, timeout: float | None = None) -> bool:
        """Sleep until the context is done or `timeout` seconds pass; True when done.

        Tasks use this instead of `time.sleep`, so that cancellation and deadlines
        wake them. A wait on a context that can never end and without a timeout
        blocks forever, as `threading.Event().wait()` does.
        """
        limit = None if timeout is None else seconds(timeout, "timeout")
        if self.done():
            return True
        with _lock:
            if self._err is not None:
                return True
            watch = self._watched()
            event = watch.event
            if event is None:
                event = watch.event = threading.Event()
        remaining = self.remaining()
        if remaining is not None:
            limit = remaining if limit is None else min(limit, remaining)
        if limit is None:
            event.wait()
        else:
            event.wait(min(max(limit, 0.0), threading.TIMEOUT_MAX))
        return self.done()

    @property
    def task_id(self) -> int | None:
        """The id of the task this context belongs to, or None outside a task."""
        return None if self._task is None else self._task.id

    @property
    def task_name(self) -> str | None:
        """The name of the task this context belongs to, or None outside a task."""
        return None if self._task is None else self._task.name

    def _finish(self, kind: type[Cancelled] | type[DeadlineExceeded]) -> None:
        """End this context and its subtree with `kind`; the first ending wins."""
        with _lock:
            if self._err is not None:
                return
            self._err = kind()
            watch, self._watch = self._watch, None
            parent = self._parent
            if parent is not None and parent._watch is not None and parent._watch.children:
                parent._watch.children.discard(self)
        if watch is None:
            return
        if watch.event is not None:
            watch.event.set()
        for child in list(watch.children or ()):
            child._finish(kind)
        for callback in (watch.callbacks or {}).values():
            callback(self)

    def _on_done(self, key: object, callback: Callable[[Context], None]) -> bool:
        """Call `callback(self)` when this context is cancelled (or found expired).

        Internal: callbacks must be quick and must not raise; they run with no lock
        held. Returns False, and registers nothing, when the context is already
        done or can never be. `key` identifies the callback for `_forget`.
        """
        if self is BACKGROUND:
            return False
        with _lock:
            if self._err is not None:
                return False
            watch = self._watched()
            if watch.callbacks is None:
                watch.callbacks = {}
            watch.callbacks[key] = callback
        return True

    def _forget(self, key: object) -> None:
        """Unregister the callback added under `key`; harmless when it is gone."""
        with _lock:
            watch = self._watch
            if watch is not None and watch.callbacks is not None:
                watch.callbacks.pop(key, None)

    def _detach(self) -> None:
        """Drop this context from its parent's children: the attempt it served ended."""
        parent = self._parent
        if parent is not None and parent is not BACKGROUND:
            with _lock:
                watch = parent._watch
                if watch is not None and watch.children is not None:
                    watch.children.discard(self)

    def __repr__(self) -> str:
        if self is BACKGROUND:
            state = "background"
        elif self._err is not None:
            state = type(self._err).__name__
        elif self._deadline is not None:
            state = f"deadline in {self._deadline - time.monotonic():.3f}s"
        else:
            state = "live"
        return f"<Context {state}>"


def attempt_context(
    parent: Context | None, deadline: float | None, task: TaskRef, attempt: int
) -> Context:
    """The context of attempt number `attempt` of `task`.

    A child of `parent` (the task's ``context=`` option), or without one a new root:
    nothing above it can cancel it. Straight-line for that common case: every
    attempt of every task makes one.
    """
    if parent is not None:
        return parent._child(deadline, task, attempt)
    ctx = _new(Context)
    ctx._parent = None
    ctx._deadline = deadline
    ctx._err = None
    ctx._watch = None
    ctx._task = task
    ctx.attempt = attempt
    return ctx


_new = object.__new__
BACKGROUND = Context()
