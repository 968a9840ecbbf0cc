"""The error tree: every error marionette raises derives from `MarionetteError`.

Builtins are mixed in where the meaning matches, so callers can catch what they
already know: `Unschedulable` and `ConfigError` are `ValueError`s, `DeadlineExceeded`
is a `TimeoutError`, and `TaskError` is an `ExceptionGroup` of the attempt errors, so
``except* OSError`` matches a task whose attempts failed with `OSError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Self

__all__ = [
    "Cancelled",
    "ConfigError",
    "DeadlineExceeded",
    "MarionetteError",
    "NoServerName",
    "NoWorkers",
    "QueueFull",
    "TaskError",
    "TaskManagerStopped",
    "Unschedulable",
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
