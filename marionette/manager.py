"""TaskManager: the public face, the lifecycle, and what every backend shares.

`TaskManager(config)` makes the manager its `Config.backend` asks for: with no backend,
the in-memory one (`backends.memory`); with a Redis URL or client, the Redis one
(`backends.redis`, imported only then). Both are subclasses of this class, so
``isinstance(tm, TaskManager)`` holds, and both share what this module owns: the
lifecycle (start, stop, fork), the worker threads and their bounded local queue, the
scheduler thread, the listeners, and the registered tasks.

Threads. `workers` threads (``marionette-worker-N``) block on the run's bounded task
queue and leave on a ``None`` sentinel; the scheduler thread (``marionette-scheduler``)
hands out what comes due; a listener thread (``marionette-listener``) exists only
while listeners do; ``marionette-stopper`` finishes a stop called from inside. A
backend may run services of its own (the Redis one: its claimer, heartbeat and
message threads). Nothing polls.

Locking. One lock per manager, `TaskManager._lock`, guards everything shared: the
lifecycle state, the current queue (it is the queue's own mutex), the threads, the
running set, the event buffer, and whatever state the backend keeps under it (the
in-memory backend: every handler, counter, key and group). `_changed`, a Condition
on it, signals lifecycle changes and idleness. `_lifecycle` serializes `start()`
with the first phase of `stop()`. Lock order: `_lifecycle` -> `_lock` -> context
lock; nothing is ever taken the other way. The scheduler runs on `_lock` too: under
it, only the scheduler's ``*_locked`` methods may be called. No user code (tasks,
callbacks, loggers, listeners, context callbacks) runs under `_lock`, and contexts
are cancelled only outside it, because a cancellation may run callbacks that take it.
"""

from __future__ import annotations

import dataclasses
import enum
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any, Concatenate, ParamSpec, TypeVar, overload

from . import _threads
from ._log import Log
from ._queue import TaskQueue
from ._time import seconds
from .config import Config
from .context import Context
from .errors import describe
from .events import Dispatcher, TaskEvent, TaskEventKind
from .handler import Submittable, T, TaskHandler, parse_options
from .periodic import Periodic
from .registry import RegisteredTask, register
from .scheduler import Scheduler
from .stats import Stats

__all__ = ["TaskManager"]

_CONFIG_FIELDS = frozenset(f.name for f in dataclasses.fields(Config))

P = ParamSpec("P")
R = TypeVar("R")


class Lifecycle(enum.Enum):
    STOPPED = "stopped"
    RUNNING = "running"
    STOPPING = "stopping"


def resolve_config(config: Config | None, overrides: Mapping[str, Any]) -> Config:
    """`config` (default: `Config()`) with the `overrides` fields replaced."""
    if config is None:
        config = Config()
    elif not isinstance(config, Config):
        raise TypeError(f"config must be a marionette.Config, not {config!r}")
    if overrides:
        unknown = overrides.keys() - _CONFIG_FIELDS
        if unknown:
            raise TypeError(f"unknown Config field(s): {', '.join(sorted(unknown))}")
        config = dataclasses.replace(config, **overrides)
    return config


class TaskManager:
    """Runs tasks on a fixed pool of worker threads, now, later, or again on failure.

    `start()` it, submit with `queue` / `delay` / `schedule` (or `every` / `cron`),
    and `stop()` it (or use ``with TaskManager(...) as tm:``). Every method may be
    called from any thread, including from inside a task or a listener; which ones
    block is said on each. ``TaskManager(config, **overrides)`` returns the manager
    of the backend `Config.backend` names (in memory by default).
    """

    def __new__(cls, config: Config | None = None, **overrides: Any) -> TaskManager:
        if cls is TaskManager:
            cls = _backend_class(resolve_config(config, overrides))
        return object.__new__(cls)

    def __init__(self, config: Config | None = None, **overrides: Any) -> None:
        config = resolve_config(config, overrides)
        self._config = config
        self._log = Log(config.logger).bind(server=config.server_name)
        self._lifecycle = threading.Lock()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._state = Lifecycle.STOPPED
        self._started_at = 0.0
        self._queue: TaskQueue | None = None
        self._threads: list[threading.Thread] = []
        # The thread finishing a stop called from inside (see stop()), if any.
        self._stopper: threading.Thread | None = None
        self._events = Dispatcher(self, self._lock, self._log, "marionette")
        # The registered tasks by name (see registry.py): written under _lock, read
        # freely (a dict lookup is atomic, and an entry never changes once made).
        self._registry: dict[str, RegisteredTask[..., Any]] = {}
        # The scheduler shares the manager's lock (see scheduler.py): with it held,
        # call only its *_locked methods.
        self._scheduler: Scheduler[Any] = Scheduler(self._on_due, self._log, _lock=self._lock)
        _threads.forkable(self)

    # -- properties --------------------------------------------------------------

    @property
    def config(self) -> Config:
        return self._config

    @property
    def scheduler(self) -> Scheduler[Any]:
        """The manager's scheduler thread and its timeline (delays, retries, periodics,
        deadline watches; on Redis, the wake-ups of the shared schedule)."""
        return self._scheduler

    def is_running(self) -> bool:
        return self._state is Lifecycle.RUNNING

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        """Start the workers and the scheduler; a no-op when running.

        A stopped manager starts again with the tasks its last stop kept, queued
        ones first. While another thread is stopping it, waits for that stop. From
        inside a task (or a listener) while a stop runs, it cannot wait (the stop
        waits for that task): a new run starts at once, and the workers of the
        stopping run finish its queue beside it.
        """
        inside = _threads.current_owner() is self
        while True:
            # Wait for a stop under way before taking _lifecycle: that stop may wait for
            # a task that itself calls stop() (which takes _lifecycle).
            if not inside:
                self._wait_for_stop()
            with self._lifecycle:
                with self._lock:
                    if self._state is Lifecycle.RUNNING:
                        return
                    if self._state is Lifecycle.STOPPING and not inside:
                        continue  # a start and a stop slipped in: wait again
                self._opening()
                with self._lock:
                    threads, listener = self._new_run_locked()
                for thread in threads:
                    thread.start()
                if listener is not None:
                    listener.start()
                self._scheduler.start()
                self._opened()
            break
        _threads.track(self)
        self._log.info(
            "task manager started",
            workers=self._config.workers,
            queue_size=self._config.queue_size,
        )

    def _wait_for_stop(self) -> None:
        """Wait while another thread stops the manager."""
        with self._lock:
            while self._state is Lifecycle.STOPPING:
                self._changed.wait()

    def _new_run_locked(self) -> tuple[list[threading.Thread], threading.Thread | None]:
        """Make the queue and threads of a new run (the caller starts the threads)."""
        q = TaskQueue(self._config.queue_size, self._lock)
        self._fill_locked(q)
        threads = [
            threading.Thread(target=self._work, args=(q,), name=f"marionette-worker-{n}")
            for n in range(1, self._config.workers + 1)
        ]
        listener = self._events.start_locked()
        self._queue, self._threads = q, threads
        self._state = Lifecycle.RUNNING
        self._started_at = time.monotonic()
        self._changed.notify_all()
        return threads, listener

    def stop(self, timeout: float | None = None) -> None:
        """Stop gracefully; from its first instant, new submissions raise.

        Stops the scheduler, lets the workers finish every queued and running task,
        delivers every event to the listeners, and returns when all that is done.
        Delayed and scheduled tasks not yet due, retries waiting for their backoff,
        and periodics are kept for the next `start()`. With a `timeout` (seconds or
        `timedelta`) that expires, the contexts of running tasks are cancelled, the
        tasks still queued are kept for the next `start()`, and it returns; a task
        that ignores its context runs on in its thread. A no-op when not running;
        while another thread stops it, waits for that.

        From inside a task, a done callback or a listener it cannot wait (the stop
        waits for the calling task), so it returns at once and a thread named
        ``marionette-stopper`` finishes the stop: every queued task still runs, the
        calling worker's share included once its task returns, and the manager is
        stopped once the last worker has left and the listeners have had every event
        (a `timeout` bounds that as above).
        """
        limit = None if timeout is None else seconds(timeout, "timeout", allow_negative=False)
        deadline = None if limit is None else time.monotonic() + limit
        inside = _threads.current_owner() is self
        interrupted: BaseException | None = None  # e.g. Ctrl-C: stop as on a timeout
        stopper: threading.Thread | None = None
        with self._lifecycle:
            with self._lock:
                state = self._state
                if state is Lifecycle.RUNNING:
                    self._state = Lifecycle.STOPPING
                    q, threads, previous = self._queue, self._threads, self._stopper
                    self._events.unbound_locked()
            if state is Lifecycle.RUNNING:
                assert q is not None
                self._stop_requested()
                try:
                    self._scheduler.stop()
                except BaseException as exc:
                    interrupted = exc
                self._closing(q, len(threads))
                if inside:
                    with self._lock:
                        stopper = self._stopper = threading.Thread(
                            target=self._finish_stop,
                            args=(q, threads, previous, deadline),
                            name="marionette-stopper",
                        )
        if state is Lifecycle.STOPPED:
            return
        if state is Lifecycle.STOPPING:
            if not inside:
                self._wait_for_stopped(deadline)
            return
        assert q is not None
        if stopper is None:
            self._finish_stop(q, threads, previous, deadline, interrupted)
            return
        stopper.start()
        if interrupted is not None:
            raise interrupted

    def _wait_for_stopped(self, deadline: float | None) -> None:
        """Wait (until `deadline`) for the stop another thread began to finish."""
        with self._lock:
            self._changed.wait_for(
                lambda: self._state is not Lifecycle.STOPPING, remaining(deadline)
            )
            stopper = self._stopper
        if stopper is not None and stopper is not threading.current_thread():
            stopper.join(remaining(deadline))

    def _finish_stop(
        self,
        q: TaskQueue,
        threads: list[threading.Thread],
        previous: threading.Thread | None,
        deadline: float | None,
        interrupted: BaseException | None = None,
    ) -> None:
        """The waiting half of `stop()`: in the stopping thread, or in the stopper
        thread for a stop from inside.

        Waits for the run's workers (and for an earlier stopper), keeps what is still
        queued, delivers the events, and marks the manager stopped, unless a task
        started a new run meanwhile: then what is left of this run goes to that one.
        """
        try:
            if previous is not None and interrupted is None:
                previous.join(remaining(deadline))
            for thread in threads:
                if interrupted is None:
                    thread.join(remaining(deadline))
        except BaseException as exc:
            interrupted = exc
        abandoned = any(t.is_alive() for t in threads)
        with self._lock:
            current = self._queue is q  # no task started a new run meanwhile
            self._keep_locked(q.close_locked(sentinels=len(threads)), current)
            running = self._running_contexts_locked() if abandoned and current else []
            kept = self._kept_count_locked()
        if not current:
            if interrupted is not None:
                raise interrupted
            return
        try:
            for ctx in running:
                ctx.cancel()
            if interrupted is None:
                self._events.drain(deadline)
        finally:  # whatever happens, the manager ends stopped: a later stop() returns
            # Under _lifecycle: a start() from inside (a listener, while the events
            # were delivered) either came first, and this run was superseded, or waits.
            with self._lifecycle:
                with self._lock:
                    current = self._queue is q
                    listener = None
                    if not current and self._state is Lifecycle.RUNNING:
                        listener = self._events.start_locked()  # the drain ended the old one
                if listener is not None:
                    listener.start()
                if current:
                    try:
                        self._closed(abandoned)
                    finally:
                        with self._lock:
                            self._queue, self._threads = None, []
                            self._state = Lifecycle.STOPPED
                            self._changed.notify_all()
                        _threads.untrack(self)
        if current:
            self._log.info("task manager stopped", kept=kept, abandoned=len(running))
        if interrupted is not None:
            raise interrupted

    # -- what a backend adds to the lifecycle --------------------------------------

    def _opening(self) -> None:
        """Before a run's threads start (no lock held): connect, or raise to stay stopped."""

    def _fill_locked(self, q: TaskQueue) -> None:
        """Put the tasks kept from the last run into the new run's queue `q`."""

    def _opened(self) -> None:
        """After a run's workers, listener and scheduler started (no lock held)."""

    def _stop_requested(self) -> None:
        """A stop began (no lock held; submissions already refused), before the
        scheduler thread is stopped: nothing the scheduler waits for may block now."""

    def _closing(self, q: TaskQueue, workers: int) -> None:
        """First phase of a stop (no lock held; the scheduler is stopped): tell the
        run's `workers` to leave once the queue is done, with one sentinel each."""
        with self._lock:
            for _ in range(workers):
                q.force_locked(None)

    def _keep_locked(self, leftover: list[Any], current: bool) -> None:
        """Tasks still queued when a stop ended (it timed out); `current` is False
        when a task started a new run meanwhile."""

    def _running_contexts_locked(self) -> list[Context]:
        """The contexts of the attempts running now (cancelled by a stop that timed out)."""
        return []

    def _kept_count_locked(self) -> int:
        """How many tasks wait for the next run (for the log line of a stop)."""
        return 0

    def _closed(self, abandoned: bool) -> None:
        """Last phase of a stop (no lock held): the workers left, or `abandoned` ones
        outlived the timeout; the events were delivered."""

    def _registered(self, name: str) -> None:
        """A task was registered under `name` (no lock held): the Redis backend's
        claimer starts serving its queue."""

    def _reconfigure(self, **changes: Any) -> None:
        """Replace Config fields of a stopped manager (the `worker` command's
        ``--workers``); only fields read at `start()` take effect."""
        with self._lifecycle, self._lock:
            if self._state is not Lifecycle.STOPPED:
                raise RuntimeError("a running manager cannot be reconfigured")
            self._config = resolve_config(self._config, changes)

    # -- fork (see _threads) ------------------------------------------------------

    _fork_rank = 0

    def _fork_prepare(self) -> None:
        self._lifecycle.acquire()
        self._lock.acquire()

    def _fork_parent(self) -> None:
        self._lock.release()
        self._lifecycle.release()

    def _fork_child(self) -> None:
        """In a child made by fork: a stopped manager that keeps its pending work.

        None of the parent's threads exist here; what the backend keeps of the
        parent's run is said by its `_fork_child_locked`.
        """
        try:
            self._changed = threading.Condition(self._lock)
            self._events.fork_child_locked()
            self._fork_child_locked()
            self._stopper = None
            self._queue, self._threads = None, []
            self._state = Lifecycle.STOPPED
        finally:
            self._lock.release()
            self._lifecycle.release()

    def _fork_child_locked(self) -> None:
        """The backend's part of `_fork_child`, with every lock held."""

    def __enter__(self) -> TaskManager:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- listeners ---------------------------------------------------------------

    def add_listener(
        self, fn: Callable[[TaskEvent], object], *, events: Iterable[TaskEventKind] | None = None
    ) -> Callable[[], None]:
        """Call ``fn(event)`` for each `TaskEvent` of the given kinds (default: all).

        Listeners run one at a time, in the order events happened, on the
        manager's listener thread; one that raises is logged and kept. A listener
        may submit tasks (they never block on a full queue); it must not wait for a
        task to finish (the workers may be waiting for it). Returns a function that
        removes the listener (calling it twice is harmless). `stop()` delivers every
        event before it returns; submissions made meanwhile raise
        `TaskManagerStopped`, as they do from anywhere once a stop has begun. A
        `stop()` called by a listener returns at once, and its stopper thread
        delivers the rest of the run's events once the listener returns.
        """
        if not callable(fn):
            raise TypeError(f"a listener must be callable, not {fn!r}")
        kinds = None
        if events is not None:
            try:
                kinds = list(events)
            except TypeError:
                raise TypeError(
                    f"events must be an iterable of TaskEventKind, not {events!r}"
                ) from None
            bad = [k for k in kinds if not isinstance(k, TaskEventKind)]
            if bad:
                raise TypeError(f"events must be TaskEventKind members, not {bad!r}")
        with self._lock:
            remove = self._events.add_locked(fn, kinds)
            thread = self._events.start_locked() if self._state is Lifecycle.RUNNING else None
        if thread is not None:
            thread.start()
        return remove

    def _emit_locked(
        self,
        kind: TaskEventKind,
        handler: TaskHandler[Any],
        error: BaseException | None = None,
        result: Any = None,
    ) -> None:
        if kind in self._events.wanted:
            self._events.emit_locked(kind, handler, error, result)

    # -- registered tasks --------------------------------------------------------

    @overload
    def task(
        self, fn: Callable[Concatenate[Context, P], R], /, *, name: str | None = None, **opts: Any
    ) -> RegisteredTask[P, R]: ...

    @overload
    def task(
        self, /, *, name: str | None = None, **opts: Any
    ) -> Callable[[Callable[Concatenate[Context, P], R]], RegisteredTask[P, R]]: ...

    def task(
        self, fn: Callable[..., Any] | None = None, /, *, name: str | None = None, **opts: Any
    ) -> RegisteredTask[..., Any] | Callable[[Callable[..., Any]], RegisteredTask[..., Any]]:
        """Register ``fn(ctx, *args, **kwargs)`` by name; ``@tm.task`` or
        ``@tm.task(name=None, **opts)`` (or ``tm.task(fn, name=None, **opts)``).
        Returns its `RegisteredTask`.

        `name` is the registry name, by which every process finds the task (default:
        ``f"{fn.__module__}.{fn.__qualname__}"``); it is also the default label in
        logs of what it submits (the ``name=`` option of a submission, or of
        ``rt.options(...)``, sets another label). `opts` are the default options
        of its submissions, validated now: a typo raises `TypeError` at decoration
        time. Registering another function under a taken name raises `ValueError`;
        the same function again (or its copy, from a module imported twice) with
        the same options returns the registered task (other options raise
        `ValueError`: an entry never changes). Calling the result calls `fn`
        itself. Any thread may register; register before submitting, in every
        process that runs the task.
        """
        if fn is not None:
            return register(self, fn, name, opts)

        def decorate(fn: Callable[..., Any]) -> RegisteredTask[..., Any]:
            return register(self, fn, name, opts)

        parse_options(opts)  # a typo fails at the decorator line, even before a function
        return decorate

    # -- the backend's side: submission, inspection ------------------------------
    # Each backend implements these (as asyncio's AbstractEventLoop does, the face
    # raises NotImplementedError); the docstrings here are the contract.

    def join(self, timeout: float | None = None) -> bool:
        """Block until no task is queued, running, delayed or waiting for a retry.

        Future runs of a periodic are not waited for, only runs already due.
        Returns False if `timeout` seconds pass first. From inside a task or a
        listener it raises `RuntimeError`: it would wait for itself.
        """
        raise NotImplementedError

    def wrap_task(self, task: Submittable[T], **opts: Any) -> TaskHandler[T]:
        """Wrap `task` in a pending handler without submitting it."""
        raise NotImplementedError

    def queue(self, task: Submittable[T], *, block: bool = True, **opts: Any) -> TaskHandler[T]:
        """Run `task` as soon as a worker is free; returns its handler."""
        raise NotImplementedError

    def delay(self, delay: float | timedelta, task: Submittable[T], **opts: Any) -> TaskHandler[T]:
        """Run `task` on or after `delay` seconds (or a `timedelta`) from now."""
        raise NotImplementedError

    def schedule(self, at: datetime, task: Submittable[T], **opts: Any) -> TaskHandler[T]:
        """Run `task` on or after the aware `datetime` `at`; a past time means now."""
        raise NotImplementedError

    def get(self, key: str) -> TaskHandler[Any] | None:
        """The key's pending instance, else its running one, else None."""
        raise NotImplementedError

    def reschedule(
        self, task: str | TaskHandler[Any], when: float | datetime, *, only_sooner: bool = False
    ) -> bool:
        """Move a scheduled task (delayed, scheduled, or waiting for a retry) to `when`."""
        raise NotImplementedError

    def pending(self, limit: int | None = None) -> list[TaskHandler[Any]]:
        """A snapshot of the tasks waiting to run: queued ones, then scheduled ones;
        at most `limit` (None: all in memory, 1,000 on Redis)."""
        raise NotImplementedError

    def handler(self, task_id: int) -> TaskHandler[Any] | None:
        """The handler of a task by id: in memory, while the task waits or runs; on
        Redis, any task of the cluster until its result expires. None otherwise."""
        raise NotImplementedError

    def set_limit(self, group: str, limit: int) -> None:
        """Set or add a group's concurrency limit."""
        raise NotImplementedError

    def stats(self) -> Stats:
        """A frozen snapshot of the manager, every field read at the same instant."""
        raise NotImplementedError

    def every(
        self,
        interval: float | timedelta,
        task: Any,
        *,
        start: float | timedelta | datetime | None = None,
        jitter: float | timedelta = 0,
        fixed_delay: bool = False,
        key: str | None = None,
        **opts: Any,
    ) -> Periodic:
        """Run `task` every `interval` seconds (or `timedelta`); returns its `Periodic`."""
        raise NotImplementedError

    def cron(
        self, expression: str, task: Any, *, tz: Any = None, key: str | None = None, **opts: Any
    ) -> Periodic:
        """Run `task` at the times a cron expression names; returns its `Periodic`."""
        raise NotImplementedError

    def periodics(self) -> list[Periodic]:
        """The periodics of this manager (in memory) or of the cluster (on Redis)."""
        raise NotImplementedError

    def _on_due(self, item: Any) -> None:
        """Called by the scheduler thread for each due item."""
        raise NotImplementedError

    def _work(self, q: TaskQueue) -> None:
        """A worker thread: `_serve` `q` until a stop signal, surviving anything."""
        with _threads.owned(self):
            while True:
                try:
                    self._serve(q)
                    return
                except BaseException as exc:  # a worker outlives anything, even our bugs
                    self._log.error("worker error", error=describe(exc))

    def _serve(self, q: TaskQueue) -> None:
        """The backend's worker loop over `q`, until it takes a stop signal (None)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<TaskManager {self._config.server_name} {self._state.value}>"


def _backend_class(config: Config) -> type[TaskManager]:
    """The manager class of the backend `config` names (imported only when named)."""
    if config.backend is None:
        from .backends.memory.manager import MemoryManager

        return MemoryManager
    from .backends.redis.manager import RedisManager

    return RedisManager


def remaining(deadline: float | None) -> float | None:
    """Seconds left until `deadline`, in the range every blocking call accepts."""
    if deadline is None:
        return None
    return min(max(0.0, deadline - time.monotonic()), threading.TIMEOUT_MAX)
