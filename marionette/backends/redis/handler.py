"""RedisHandler: a handler whose task lives in Redis.

Any process of the cluster may hold a handler for any task: it names the task by its
id and reads its state from Redis when asked (one round trip), except once the task
has finished: then the final fields are kept in the handler, so `result()` and
`state` cost nothing more. Waiting (`result`, `exception`, `add_done_callback`,
`await`, `as_future`) never polls: the handler asks Redis to announce the task's end
(the ``watch`` script) and sleeps on an event that the manager's message thread sets
when the announcement arrives (or when it reconnects after an outage, after which it
looks again). Results and errors are decoded from JSON in every process, the one that
ran the task included, so a handler reads the same wherever it is.

A handler's own fields are written under its manager's lock.
"""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from marionette._time import seconds
from marionette.backends.redis.codec import CorruptPayload, decode_error, decode_result
from marionette.backends.redis.store import TaskFields
from marionette.errors import TaskError, TaskManagerStopped
from marionette.handler import T, TaskHandler, TaskState

if TYPE_CHECKING:
    from marionette.backends.redis.manager import RedisManager

__all__ = ["RedisHandler", "decode_errors", "label", "state_of"]

_STATES = {
    "q": TaskState.PENDING,
    "c": TaskState.PENDING,
    "k": TaskState.PENDING,
    "g": TaskState.PENDING,
    "s": TaskState.SCHEDULED,
    "r": TaskState.RUNNING,
    "S": TaskState.SUCCEEDED,
    "F": TaskState.FAILED,
    "D": TaskState.FAILED,
    "C": TaskState.CANCELLED,
}
_FINAL = frozenset("SFDC")
_KEPT = frozenset("SFC")


def state_of(code: str) -> TaskState:
    """The `TaskState` of a task's state code in Redis."""
    return _STATES[code]


def label(name: str, options: str | None) -> str:
    """A task's label: its ``name=`` option (in its stored `options`), else its
    registered `name`."""
    if options:
        try:
            given = json.loads(options).get("name")
        except (ValueError, AttributeError):
            given = None
        if isinstance(given, str):
            return given
    return name


class RedisHandler(TaskHandler[T]):
    """A task of the cluster, by id. Any thread may use it; see the module docstring.

    `result()` and `exception()` block (without polling); `state`, `attempts`,
    `errors`, `due`, `done()`, `running()` and `cancelled()` read Redis (once the task
    has finished, they read the kept final fields instead). Waiting needs the
    manager running (its message thread carries the news): on a stopped manager a
    wait for an unfinished task raises `TaskManagerStopped`.
    """

    # __weakref__: a manager maps task ids to its live handlers weakly.
    __slots__ = ("__weakref__", "_final", "_label", "_manager", "id")

    def __init__(self, manager: RedisManager, task_id: int, label: str | None) -> None:
        self.id = task_id
        self._manager = manager
        self._label = label
        self._final: TaskFields | None = None

    # -- reading -----------------------------------------------------------------

    def _fields(self) -> TaskFields | None:
        """The task's fields: the kept final ones, else read now (None: unknown)."""
        final = self._final
        if final is not None:
            return final
        fields = self._manager._read(self.id)
        if fields is not None:
            self._keep(fields)
        return fields

    def _keep(self, fields: TaskFields) -> None:
        if self._label is None:
            self._label = label(fields.name, fields.options)
        # Kept for good once settled; not a dead task's (`dead requeue` revives it).
        self._final = fields if fields.state in _KEPT else None

    @staticmethod
    def _finished(fields: TaskFields) -> bool:
        return fields.state in _FINAL

    @property
    def name(self) -> str:
        if self._label is None:
            self._fields()
        return self._label or f"task {self.id}"

    @property
    def state(self) -> TaskState:
        """The task's state now; CANCELLED for a task Redis no longer knows (expired)."""
        fields = self._fields()
        return TaskState.CANCELLED if fields is None else _STATES[fields.state]

    @property
    def due(self) -> datetime | None:
        fields = self._fields()
        if fields is None or fields.state not in "qckgs":
            return None
        at = fields.due if fields.due is not None else fields.submitted
        return datetime.fromtimestamp(at / 1000, UTC)

    @property
    def attempts(self) -> int:
        fields = self._fields()
        return 0 if fields is None else fields.attempts

    @property
    def errors(self) -> tuple[BaseException, ...]:
        fields = self._fields()
        return () if fields is None else tuple(_errors(fields))

    def done(self) -> bool:
        fields = self._fields()
        return fields is None or fields.state in _FINAL

    def running(self) -> bool:
        fields = self._fields()
        return fields is not None and fields.state == "r"

    def cancelled(self) -> bool:
        fields = self._fields()
        return fields is not None and fields.state == "C"

    # -- waiting -----------------------------------------------------------------

    def _wait(self, timeout: float | None) -> TaskFields:
        """The final fields, waiting up to `timeout` seconds for them."""
        final = self._final
        if final is not None:
            return final
        limit = None if timeout is None else min(seconds(timeout, "timeout"), threading.TIMEOUT_MAX)
        deadline = None if limit is None else time.monotonic() + limit
        manager = self._manager
        while True:
            event = manager._watch_event(self.id)  # before looking: no message is missed
            try:
                fields = manager._watch(self.id)
                if fields is None:
                    raise concurrent.futures.CancelledError(f"task {self.id} is unknown (expired?)")
                self._keep(fields)
                if fields.state in _FINAL:
                    return fields
                if not manager._can_wait():
                    raise TaskManagerStopped(
                        "waiting for a task on Redis needs a running manager (it carries the news)"
                    )
                left = None if deadline is None else deadline - time.monotonic()
                if (left is not None and left <= 0) or not event.wait(left):
                    raise TimeoutError(f"{self!r} did not finish within {timeout} seconds")
            finally:
                manager._unwatch_event(self.id, event)

    def result(self, timeout: float | None = None) -> T:
        fields = self._wait(timeout)
        if fields.state == "S":
            try:
                return decode_result(fields.value or "null")  # type: ignore[no-any-return]
            except CorruptPayload as exc:
                raise ValueError(f"the stored result of task {self.id} is corrupt") from exc
        if fields.state == "C":
            raise concurrent.futures.CancelledError()
        raise self._final_error(fields)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        fields = self._wait(timeout)
        if fields.state == "C":
            raise concurrent.futures.CancelledError()
        return None if fields.state == "S" else self._final_error(fields)

    def _final_error(self, fields: TaskFields) -> BaseException:
        errors = _errors(fields)
        if fields.base and errors:
            return errors[-1]
        error = None
        if fields.options:
            error = json.loads(fields.options).get("error")
        return TaskError.build(
            [e for e in errors if isinstance(e, Exception)],
            attempts=fields.attempts,
            duration=max(0.0, ((fields.ended or fields.submitted) - fields.submitted) / 1000),
            error=error,
            task_id=self.id,
            task_name=self.name,
        )

    def add_done_callback(self, fn: Callable[[TaskHandler[T]], object]) -> None:
        if not callable(fn):
            raise TypeError(f"a done callback must be callable, not {fn!r}")
        if self._final is None and self._manager._on_done(self, fn):
            return
        self._manager._run_callback(self, fn)

    def as_future(self) -> concurrent.futures.Future[T]:
        """A new `concurrent.futures.Future` that settles when this handler does.

        It stays PENDING until then (the attempts run in another process, maybe):
        cancelling it cancels the task, as `cancel()` does (a running task gets its
        context cancelled), and `wait` and `as_completed` see it done at once.
        """
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def settle(handler: TaskHandler[T]) -> None:
            if future.done():
                return
            if handler.cancelled():
                if future.cancel():
                    future.set_running_or_notify_cancel()
                return
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(handler.result(0))
            except BaseException as exc:
                future.set_exception(exc)

        def propagate(f: concurrent.futures.Future[T]) -> None:
            if f.cancelled():
                f.set_running_or_notify_cancel()
                self.cancel()

        future.add_done_callback(propagate)
        self.add_done_callback(settle)
        return future

    # -- acting ------------------------------------------------------------------

    def cancel(self) -> bool:
        return self._manager._cancel(self)

    def exec(self) -> None:
        """Not on Redis: a worker process of the cluster runs the attempts."""
        raise TypeError("exec() runs a task in the calling thread: in-memory only, not on Redis")


def _errors(fields: TaskFields) -> list[BaseException]:
    return decode_errors(fields.errors)


def decode_errors(text: str | None) -> list[BaseException]:
    """A task's stored attempt errors, rebuilt (builtins and marionette's own as
    themselves, others as `RemoteError`)."""
    if not text:
        return []
    try:
        data = json.loads(text)
    except ValueError:
        return []
    if not isinstance(data, list):
        return []
    return [decode_error(item) for item in data if isinstance(item, dict)]
