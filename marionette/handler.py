"""TaskHandler: one submission's state, its attempts, the Future API, retry decisions.

A handler is a small state machine (`TaskState`). It holds no lock of its own: all
handlers of a manager share that manager's lock (`TaskManager._lock`), so one
acquisition per transition keeps a handler's state and the manager's counters in
agreement, and a submission pays for no lock, condition or `Future`. A waiter
(`threading.Event`) or a callback list is made only when someone asks for one.

The transitions themselves (submit, dispatch, run, retry, cancel, settle) live in the
manager, which owns the queue, the scheduler and the counters; this module owns the
handler's fields, the waiting, the callbacks, and the pure retry decision.
"""

from __future__ import annotations

import concurrent.futures
import enum
import functools
import math
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import (
    TYPE_CHECKING,
    Any,
    Generic,
    Never,
    NoReturn,
    Protocol,
    TypeAlias,
    TypeVar,
    runtime_checkable,
)

import tenacity

from ._time import seconds
from .context import Context

if TYPE_CHECKING:
    import asyncio

    from .backends.memory.periodic import MemoryPeriodic

__all__ = ["Task", "TaskHandler", "TaskState"]

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


class TaskState(enum.Enum):
    """Where a submission is in its life."""

    #: Wrapped, or queued waiting for a worker.
    PENDING = "pending"
    #: Delayed, scheduled, or waiting for a retry.
    SCHEDULED = "scheduled"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


_PENDING = TaskState.PENDING  # a global: an enum attribute lookup costs ~100 ns
FINISHED = frozenset({TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED})


@runtime_checkable
class Task(Protocol[T_co]):
    """An object task: `do(ctx)` runs one attempt; its return value is the result."""

    def do(self, ctx: Context) -> T_co: ...


# -- options ---------------------------------------------------------------------

#: The default backoff: 0.5 s before the first retry, x1.5 per retry, capped at 60 s,
#: plus up to 0.25 s of random jitter so that retries of many tasks spread out.
DEFAULT_BACKOFF = tenacity.wait_exponential(
    multiplier=0.5, exp_base=1.5, max=60
) + tenacity.wait_random(0, 0.25)
#: The default retry predicate: any `Exception`.
DEFAULT_RETRY = tenacity.retry_if_exception_type(Exception)

Strategy = Callable[[tenacity.RetryCallState], Any]


@dataclass(slots=True)
class Options:
    """A submission's validated options (shared by every submission without any).

    Shared, so never changed once made (`dataclasses.replace` makes a variant); not
    frozen, because a frozen dataclass's ``__init__`` costs four times as much, on
    the path of every submission with options.
    """

    retries: int = 0
    backoff: Strategy = DEFAULT_BACKOFF
    retry: Strategy = DEFAULT_RETRY
    stop: Strategy | None = None
    timeout: float | None = None
    context: Context | None = None
    error: BaseException | str | None = None
    #: One pending instance per key (see `TaskManager.get`).
    key: str | None = None
    #: The concurrency group (see `Config.limits`).
    group: str | None = None
    #: The periodic this submission is a run of.
    periodic: MemoryPeriodic | None = None
    #: Whether a gate (key, group, periodic) must be passed: one check on the hot path.
    gated: bool = False


DEFAULT_OPTIONS = Options()


def _retries(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"retries must be an int, not {value!r}")
    if value < 0:
        raise ValueError(f"retries must not be negative, not {value!r}")
    return value


def _backoff(value: Any) -> Strategy:
    if value is None:
        return DEFAULT_BACKOFF
    if callable(value):
        return value  # type: ignore[no-any-return]
    return tenacity.wait_fixed(seconds(value, "backoff", allow_negative=False))


def _strategy(option: str) -> Callable[[Any], Strategy | None]:
    def check(value: Any) -> Strategy | None:
        if value is not None and not callable(value):
            raise TypeError(f"{option} must be a tenacity {option} strategy, not {value!r}")
        return value  # type: ignore[no-any-return]

    return check


def _timeout(value: Any) -> float | None:
    if value is None:
        return None
    timeout = seconds(value, "timeout")
    if timeout <= 0:
        raise ValueError(f"timeout must be positive, not {value!r}")
    return timeout


def _context(value: Any) -> Context | None:
    if value is not None and not isinstance(value, Context):
        raise TypeError(f"context must be a marionette.Context, not {value!r}")
    return value


def _error(value: Any) -> BaseException | str | None:
    if value is not None and not isinstance(value, (BaseException, str)):
        raise TypeError(f"error must be an exception or a message, not {value!r}")
    return value


def _label(option: str) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if value is not None and (not isinstance(value, str) or not value):
            raise TypeError(f"{option} must be a non-empty str, not {value!r}")
        return value

    return check


# One validator per option: each takes the value given and returns the one to keep.
_VALIDATORS: dict[str, Callable[[Any], Any]] = {
    "retries": _retries,
    "backoff": _backoff,
    "retry": _strategy("retry"),
    "stop": _strategy("stop"),
    "timeout": _timeout,
    "context": _context,
    "error": _error,
    "name": _label("name"),
    "key": _label("key"),
    "group": _label("group"),
}


def parse_options(opts: Mapping[str, Any]) -> tuple[Options, str | None]:
    """Validate the keyword options of a submission; return them and the `name`.

    Unknown names and values of the wrong type raise `TypeError`; out-of-range
    values raise `ValueError`. Each message names the option and the bad value.
    None means the default for every option but `retries`.
    """
    if not opts:
        return DEFAULT_OPTIONS, None
    fields: dict[str, Any] = {}
    for option, value in opts.items():
        check = _VALIDATORS.get(option)
        if check is None:
            unknown = sorted(set(opts) - _VALIDATORS.keys())
            raise TypeError(f"unknown task option(s): {', '.join(unknown)}")
        fields[option] = check(value)
    name = fields.pop("name", None)
    if fields.get("retry", DEFAULT_RETRY) is None:
        fields["retry"] = DEFAULT_RETRY
    fields["gated"] = fields.get("key") is not None or fields.get("group") is not None
    return Options(**fields), name


# A stand-in for the Retrying object a RetryCallState normally belongs to; the
# strategies read only the call state.
_RETRYING = tenacity.Retrying()


def retry_delay(opts: Options, attempt: int, error: BaseException, started: float) -> float | None:
    """Seconds to wait before retrying after failed attempt number `attempt`, or None.

    The decision, apart from its side effect: tenacity's order is kept (the retry
    predicate, then the wait, then the stop strategy, which can see the upcoming
    sleep). `started` is the `time.monotonic()` of the submission. Whatever a
    strategy raises propagates; a wait that is not a finite number raises
    `ValueError`. A negative wait means "retry now".
    """
    if attempt > opts.retries:
        return None
    state = tenacity.RetryCallState(_RETRYING, None, (), {})
    state.start_time = started
    state.attempt_number = attempt
    state.set_exception((type(error), error, error.__traceback__))
    if not opts.retry(state):
        return None
    wait = float(opts.backoff(state))
    if not math.isfinite(wait):
        raise ValueError(f"the backoff strategy returned {wait!r}")
    state.upcoming_sleep = max(wait, 0.0)
    if opts.stop is not None and opts.stop(state):
        return None
    return state.upcoming_sleep


def default_name(task: object) -> str:
    """`str(task)` when the task defines `__str__`, else its qualified name."""
    if isinstance(task, functools.partial):
        return f"partial({default_name(task.func)})"
    if type(task).__str__ is not object.__str__:
        try:
            return str(task)
        except Exception:  # a broken __str__ must not break a submission
            pass
    qualname = getattr(task, "__qualname__", None)
    return qualname if isinstance(qualname, str) else type(task).__qualname__


# -- the handler -----------------------------------------------------------------


class TaskHandler(Generic[T]):
    """One submission of a task: its state, result, attempts, and the Future API.

    Returned by every submission; any thread may use it. `result()` and
    `exception()` block (with an optional timeout); everything else returns at once.
    Generic in the task's result: a task ``fn(ctx) -> T`` gives a ``TaskHandler[T]``.
    ``await handler`` waits without blocking the event loop (see `__await__`).

    Each backend has its own kind (the in-memory one keeps the state in the object,
    the Redis one in Redis); this class is their common face (as asyncio's
    AbstractEventLoop, it raises NotImplementedError where a backend implements).
    """

    __slots__ = ()

    #: Unique (in the process, or on Redis in the cluster), increasing with submission.
    id: int

    @property
    def name(self) -> str:
        """The task's label in logs: the ``name=`` option, else `default_name`."""
        raise NotImplementedError

    @property
    def state(self) -> TaskState:
        raise NotImplementedError

    @property
    def due(self) -> datetime | None:
        """When it is (or was) due while it waits (aware UTC); None once it runs or ends.

        None too for a handler that was wrapped and never submitted.
        """
        raise NotImplementedError

    @property
    def attempts(self) -> int:
        """Attempts started so far."""
        raise NotImplementedError

    @property
    def errors(self) -> tuple[BaseException, ...]:
        """One error per failed attempt, oldest first."""
        raise NotImplementedError

    def done(self) -> bool:
        """True once the task succeeded, failed for good, or was cancelled."""
        return self.state in FINISHED

    def running(self) -> bool:
        """True while an attempt runs (not while waiting for a retry)."""
        return self.state is TaskState.RUNNING

    def cancelled(self) -> bool:
        return self.state is TaskState.CANCELLED

    def result(self, timeout: float | None = None) -> T:
        """The task's return value, waiting up to `timeout` seconds for it.

        Raises `TimeoutError` if it is not done in time, the `TaskError` of a task
        that failed for good (or the `BaseException` that ended it), and
        `concurrent.futures.CancelledError` if it was cancelled.
        """
        raise NotImplementedError

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The final error (None on success), waiting up to `timeout` seconds.

        Raises `TimeoutError` and `concurrent.futures.CancelledError` as `result` does.
        """
        raise NotImplementedError

    def add_done_callback(self, fn: Callable[[TaskHandler[T]], object]) -> None:
        """Call `fn(handler)` once the task is done; at once if it already is.

        Callbacks run in the thread that finishes the task (or the calling thread),
        with no lock held, in the order they were added. One that raises is logged
        and does not stop the others.
        """
        raise NotImplementedError

    def as_future(self) -> concurrent.futures.Future[T]:
        """A new `concurrent.futures.Future` that settles when this handler does.

        For `concurrent.futures.wait`, `as_completed` and `asyncio.wrap_future`.
        Cancelling it before the task starts cancels the task; a future cancelled by
        its holder is reported done by `wait` and `as_completed` at once.
        """
        raise NotImplementedError

    def cancel(self) -> bool:
        """Cancel the task; True if it will never run (again), False otherwise.

        A queued, delayed, scheduled or retry-waiting task is removed and never runs:
        True (also when it was already cancelled). A running task has its context
        cancelled and is not retried: False; it ends CANCELLED if that attempt
        raises, SUCCEEDED if it returns anyway. A finished task: False.
        """
        raise NotImplementedError

    def exec(self) -> None:
        """Run one attempt now, in the calling thread: what a worker does."""
        raise NotImplementedError

    def __await__(self) -> Generator[Any, None, T]:
        """``await handler``: the result, or what `result()` raises, without blocking
        the event loop.

        Several coroutines may await one handler. An awaiter that is cancelled or
        gives up (``asyncio.wait_for(handler, 5)``) leaves the task alone:
        `cancel()` is how a task is cancelled. A handler nobody awaits pays nothing.
        Built on a plain asyncio future woken from the finishing thread, rather than
        `asyncio.wrap_future`, which would cancel the task with its awaiter and turn
        a cancelled task into the awaiter's own `asyncio.CancelledError`.
        """
        if not self.done():
            import asyncio  # only for those who await: it costs a service's start 50 ms

            loop = asyncio.get_running_loop()
            waiter: asyncio.Future[None] = loop.create_future()

            def wake(handler: TaskHandler[T]) -> None:
                try:
                    loop.call_soon_threadsafe(_resolve, waiter)
                except RuntimeError:  # the loop was closed: nobody waits any more
                    pass

            self.add_done_callback(wake)
            yield from waiter.__await__()
        return self.result(0)

    def do(self, ctx: Never) -> NoReturn:
        """Always raises `TypeError`: a handler is submitted, never wrapped again.

        Typed to accept nothing, so that a type checker flags the call, and so that
        a handler is not taken for a `Task` (whose result type it would blur).
        """
        raise TypeError(f"{self!r} is a TaskHandler: submit it or call exec(), never do()")

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"<TaskHandler #{self.id} {self.name} {self.state.name}>"


#: What a submission takes: a callable ``fn(ctx)``, a `Task` object, or a handler
#: from `wrap_task` (submitted as it is, never wrapped again).
Submittable: TypeAlias = TaskHandler[T] | Task[T] | Callable[[Context], T]


def _resolve(waiter: asyncio.Future[None]) -> None:  # (annotations are not evaluated)
    """Wake an awaiter (in its loop's thread), unless it gave up meanwhile."""
    if not waiter.done():
        waiter.set_result(None)
