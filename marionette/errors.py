"""The error tree: every error marionette raises derives from `MarionetteError`.

Builtins are mixed in where the meaning matches, so callers can catch what they
already know: `Unschedulable` and `ConfigError` are `ValueError`s, `DeadlineExceeded`
is a `TimeoutError`, `BackendUnavailable` is a `ConnectionError`, and `TaskError` is an
`ExceptionGroup` of the attempt errors, so ``except* OSError`` matches a task whose
attempts failed with `OSError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Self
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

__all__ = [
    "BackendUnavailable",
    "Cancelled",
    "ConfigError",
    "DeadlineExceeded",
    "MarionetteError",
    "NoServerName",
    "NoWorkers",
    "QueueFull",
    "RemoteError",
    "TaskError",
    "TaskManagerStopped",
    "Unschedulable",
    "WorkerLost",
]


class MarionetteError(Exception):
    """Base class of every error marionette raises."""


class TaskManagerStopped(MarionetteError):
    """A submission reached a task manager that is not running."""

    def __init__(self, message: str = "the task manager is not running") -> None:
        super().__init__(message)


class Unschedulable(MarionetteError, ValueError):
    """A delay or a time that no task can be scheduled at (NaN, naive, zero, ...)."""


class ConfigError(MarionetteError, ValueError):
    """An invalid configuration value; `field` names the field or variable at fault."""

    def __init__(self, message: str, *, field: str | None = None, value: object = None) -> None:
        super().__init__(message)
        self.field = field
        self.value = value


class NoWorkers(ConfigError):
    """`workers` is below one."""


class NoServerName(ConfigError):
    """`server_name` is empty."""


class QueueFull(MarionetteError):
    """`queue(..., block=False)` found the task queue full."""


class Cancelled(MarionetteError):
    """A context was cancelled (`Context.err` after `cancel()`)."""

    def __init__(self, message: str = "context cancelled") -> None:
        super().__init__(message)


class DeadlineExceeded(MarionetteError, TimeoutError):
    """A context's deadline passed (`Context.err` after its timeout)."""

    def __init__(self, message: str = "context deadline exceeded") -> None:
        super().__init__(message)


class BackendUnavailable(MarionetteError, ConnectionError):
    """Redis could not be reached: at `start()`, or by a submission after retrying
    for `lease` seconds.

    `url` is the backend's URL with any password masked (this class masks it, so a
    raiser cannot leak one), or None when a client object was configured; `waited` is
    how long the raiser retried, in seconds, when it says. The raiser chains the last
    connection error as ``__cause__`` (``raise BackendUnavailable(...) from exc``).
    """

    def __init__(self, url: str | None = None, *, waited: float | None = None) -> None:
        self.url = None if url is None else mask_url(url)
        self.waited = waited
        message = (
            f"Redis at {self.url} could not be reached"
            if self.url
            else "Redis could not be reached"
        )
        if waited is not None:
            message += f" (retried for {waited:.1f}s)"
        super().__init__(message)


class WorkerLost(MarionetteError):
    """An attempt was lost because the process running it died (killed, frozen, or
    partitioned for longer than its lease).

    `process` is the lost process's id, when known. A lost attempt counts in
    `attempts` without using up a retry; a task that loses three attempts in a row
    fails for good with this error.
    """

    def __init__(
        self,
        message: str = "the process running this attempt was lost",
        *,
        process: str | None = None,
    ) -> None:
        super().__init__(message)
        self.process = process


class RemoteError(MarionetteError):
    """An error raised by a task in another process, whose type cannot be rebuilt here.

    Only builtin exceptions and marionette's own errors are rebuilt as themselves; any
    other type arrives as this, never imported by name. `type_name` is the original
    type's qualified name (``"app.billing.PaymentDeclined"``), `message` its text and
    `traceback` the formatted traceback from the process that raised it.
    """

    def __init__(self, type_name: str, message: str, traceback: str = "") -> None:
        super().__init__(type_name, message, traceback)
        self.type_name = type_name
        self.message = message
        self.traceback = traceback

    def __str__(self) -> str:
        return f"{self.type_name}: {self.message}" if self.message else self.type_name


def mask_url(url: str) -> str:
    """`url` with its password, in the user part or a ``password=`` query argument
    (redis-py reads both), replaced by ``***``; idempotent. For messages and logs."""
    try:
        parts = urlsplit(url)
        secret = parts.password is not None
        netloc = parts.netloc
        if secret:
            user, _, host = netloc.rpartition("@")
            netloc = f"{user.partition(':')[0]}:***@{host}"
        query = parts.query
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(name.lower() == "password" for name, _ in pairs):
            secret = True
            query = urlencode(
                [(n, "***" if n.lower() == "password" else v) for n, v in pairs], safe="*"
            )
    except ValueError:
        # urlsplit refuses some malformed URLs (a bad IPv6 host, a bad port); a URL
        # that cannot be parsed cannot be shown safely either.
        return "<unparsable url>"
    return urlunsplit(parts._replace(netloc=netloc, query=query)) if secret else url


def text(value: object) -> str:
    """`str(value)`, or a placeholder when its __str__ raises: a failure must be
    reportable whatever the objects involved."""
    try:
        return str(value)
    except Exception:
        return f"<unprintable {type(value).__name__}>"


def safe_repr(value: object) -> str:
    """`repr(value)`, or a placeholder when its __repr__ raises: for log fields."""
    try:
        return repr(value)
    except Exception:
        return f"<unrepresentable {type(value).__name__}>"


def describe(exc: BaseException) -> str:
    """``"Type: message"``, or just the type name when the message is empty."""
    message = text(exc)
    name = type(exc).__name__
    return f"{name}: {message}" if message else name


class TaskError(MarionetteError, ExceptionGroup[Exception]):
    """A task failed for good: the group of its attempt errors, oldest first.

    `attempts` counts the attempts made, `duration` is seconds from submission to
    the final failure, `error` is the task's ``error=`` option (an exception or a
    message) reported as the headline, `task_id` and `task_name` say which task.
    `dict()` flattens all of it for a structured log line.
    """

    # ExceptionGroup builds instances in __new__; the extra fields are keyword-only
    # so that `derive` (used by ``except*`` to split the group) can carry them over.
    def __new__(
        cls,
        message: str,
        exceptions: Sequence[Exception],
        *,
        attempts: int = 0,
        duration: float = 0.0,
        error: BaseException | str | None = None,
        task_id: int | None = None,
        task_name: str | None = None,
    ) -> Self:
        return super().__new__(cls, message, exceptions)

    def __init__(
        self,
        message: str,
        exceptions: Sequence[Exception],
        *,
        attempts: int = 0,
        duration: float = 0.0,
        error: BaseException | str | None = None,
        task_id: int | None = None,
        task_name: str | None = None,
    ) -> None:
        super().__init__(message, exceptions)
        self.attempts = attempts
        self.duration = duration
        self.error = error
        self.task_id = task_id
        self.task_name = task_name

    @classmethod
    def build(
        cls,
        errors: Sequence[Exception],
        *,
        attempts: int,
        duration: float,
        error: BaseException | str | None,
        task_id: int | None,
        task_name: str,
    ) -> TaskError:
        """Make the final error of a task, with the message in the documented form."""
        noun = "attempt" if attempts == 1 else "attempts"
        message = f"{task_name} #{task_id} failed after {attempts} {noun} in {duration:.1f}s"
        if errors:
            message += f": {describe(errors[-1])}"
        if error is not None:
            message = f"{text(error)} ({message})"
        return cls(
            message,
            errors,
            attempts=attempts,
            duration=duration,
            error=error,
            task_id=task_id,
            task_name=task_name,
        )

    def derive(self, excs: Sequence[Exception]) -> TaskError:  # type: ignore[override]
        return TaskError(
            self.message,
            excs,
            attempts=self.attempts,
            duration=self.duration,
            error=self.error,
            task_id=self.task_id,
            task_name=self.task_name,
        )

    def __str__(self) -> str:
        return self.message

    def dict(self) -> dict[str, Any]:
        """A flat dict for structured logs: one scalar per key, one key per attempt."""
        out: dict[str, Any] = {
            "task_id": self.task_id,
            "task": self.task_name,
            "attempts": self.attempts,
            "duration": round(self.duration, 3),
        }
        if self.error is not None:
            out["error"] = text(self.error)
        for number, exc in enumerate(self.exceptions, start=1):
            out[f"attempt_{number}"] = describe(exc)
        return out
