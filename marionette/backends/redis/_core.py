"""The Redis backend's local state, and its part of the lifecycle.

The Redis manager is one class (`RedisManager`) read in four layers, each a module,
each building on the one before: this one (the connection, the process's identity,
the tasks it holds, the lifecycle hooks), `_services` (its claimer, heartbeat,
message and callback threads), `_workers` (the worker loop and each attempt's
outcome) and `manager` (submission and inspection). What must outlive the process
lives in Redis (see `store`); this process keeps only what it is doing now.

Identity. A process joins the cluster under an id, ``host:pid:random:epoch``, with a
lease it renews (`_services`). If it ever loses the lease (frozen, or cut off for
longer than `lease`), others have reaped it and taken its claims over: it joins again
under the next epoch, and whatever it still held under the old id can no longer
settle anything (the scripts fence each change by the claim set of the id).

Locking. The manager's one lock, `_lock`, guards `_jobs`, `_watches`, `_shut` (no
more claims: a stop began), the generation counters `_ready` and `_idle`, `_busy`
and the events held for order (`_tickets`, `_in_flight`, `_held`); `_claimable`
(the claimer's Condition) and `_changed` are on it. `_rejoining` serializes joining
anew (heartbeat and claimer may both find the lease lost). `_handlers` (a weak map)
and `_free_lanes` (a deque) rely on their operations being atomic: no lock on the
submission path.
"""

from __future__ import annotations

import collections
import itertools
import os
import queue
import socket
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

from marionette._queue import TaskQueue
from marionette.backends.redis.handler import RedisHandler
from marionette.backends.redis.outages import Outages
from marionette.backends.redis.store import Store, TaskFields
from marionette.config import Config
from marionette.context import Context
from marionette.errors import BackendUnavailable, ConfigError, describe, mask_url
from marionette.events import TaskEventKind
from marionette.handler import Options, TaskHandler
from marionette.manager import Lifecycle, TaskManager

__all__ = ["Job", "RedisCore"]

X = TypeVar("X")


class Job:
    """A task this process claimed: queued for its workers, then run by one.

    It is also what its attempts' contexts name (`id`, `name`: a `TaskRef`), so that
    no handler is made for a task nobody asks about. Made by the claimer; `ctx`,
    `attempt` and `cancelling` are written under the manager's lock by the worker
    that runs it (and `cancelling` by a cancel).
    """

    __slots__ = (
        "args",
        "attempt",
        "cancelling",
        "ctx",
        "discarded",
        "errors",
        "failures",
        "id",
        "kwargs",
        "name",
        "options",
        "proc",
        "submitted",
        "task",
    )

    def __init__(
        self,
        task_id: int,
        task: str,
        args: list[Any],
        kwargs: dict[str, Any],
        *,
        options: str,
        failures: int,
        submitted: float,
        proc: str,
        name: str,
    ) -> None:
        self.id = task_id
        #: The registered name (what runs it).
        self.task = task
        #: Its label: the ``name=`` option, else the registered name.
        self.name = name
        self.args = args
        self.kwargs = kwargs
        #: The submission's own options, as stored (JSON, or '').
        self.options = options
        #: Failed attempts so far (lost ones excluded): what the retry budget counts.
        self.failures = failures
        #: The submission time, on this process's monotonic clock.
        self.submitted = submitted
        #: The process id (epoch) it was claimed under: the fence of its changes.
        self.proc = proc
        self.errors: list[BaseException] | None = None
        self.ctx: Context | None = None
        self.attempt = 0
        self.cancelling = False
        #: Handed back by a stop that gave up on it: its late outcome is dropped.
        self.discarded = False


class _Watch:
    """Who waits for one task's end: events of waiting threads, done callbacks."""

    __slots__ = ("callbacks", "events")

    def __init__(self) -> None:
        self.events: list[threading.Event] = []
        self.callbacks: list[Callable[[TaskHandler[Any]], object]] = []


def _redis() -> Any:
    try:
        import redis
    except ImportError:
        raise ConfigError(
            "backend: Redis needs redis-py: pip install 'marionette[redis]'",
            field="backend",
            value=None,
        ) from None
    return redis


def _client(redis: Any, backend: Any, lease: float) -> tuple[Any, str | None]:
    """A redis-py client for the backend (and its masked URL, if it is one).

    marionette's own client never retries by itself (marionette decides what a lost
    reply means) and times a call out after a third of the lease, so that a cut
    connection is noticed well within it.
    """
    if not isinstance(backend, str):
        return backend, None
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    try:
        client = redis.Redis.from_url(
            backend,
            retry=Retry(NoBackoff(), 0),
            socket_timeout=lease / 3,
            socket_connect_timeout=lease / 3,
            decode_responses=True,  # text, decoded by hiredis (C) rather than by us
        )
    except (ValueError, TypeError) as exc:
        raise ConfigError(
            f"backend is not a Redis URL redis-py can read ({mask_url(backend)}): {exc}",
            field="backend",
            value=mask_url(backend),
        ) from None
    return client, mask_url(backend)


class RedisCore(TaskManager):
    """The state of a Redis manager, and its part of the lifecycle."""

    def __init__(self, config: Config | None = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        config = self._config
        redis = _redis()
        client, self._url = _client(redis, config.backend, config.lease)
        self._own_client = isinstance(config.backend, str)
        self._store = Store(client, config.namespace, config.result_ttl)
        self._outages = Outages(self._log, self._url, (redis.ConnectionError, redis.TimeoutError))
        self._lease_ms = int(config.lease * 1000)
        self._base_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._epoch = 0
        #: This process's id in the cluster (see the module docstring).
        self._proc = ""
        self._rejoining = threading.Lock()
        # Tasks this process claimed, queued here or running, by id.
        self._jobs: dict[int, Job] = {}
        # One handler object per task id while someone holds it.
        self._handlers: weakref.WeakValueDictionary[int, RedisHandler[Any]] = (
            weakref.WeakValueDictionary()
        )
        self._watches: dict[int, _Watch] = {}
        self._shut = False
        self._claimable = threading.Condition(self._lock)
        self._ready = 0  # bumped when a queue of ours may have work: the claimer looks
        self._idle = 0  # bumped when the cluster may have gone idle: join() looks
        self._busy = 0
        # Submission lanes: a lane is held by one submitting thread at a time, so that a
        # call retried after a lost reply is recognized (see scripts/submit.lua).
        # (A deque's append and pop are atomic: no lock on the submission path.)
        self._free_lanes: collections.deque[int] = collections.deque()
        self._lane_numbers = itertools.count()
        self._tokens = itertools.count(1)
        # Set when a stop begins: background retries give up, timers end.
        self._halting = threading.Event()
        # Set at the end of a stop: the services and the workers' retries end.
        self._stopping = threading.Event()
        self._services: list[threading.Thread] = []
        # Set by the heartbeat after an outage: the message thread reconnects (a plain
        # flag: one writer, one reader, a stale read costs one more lease of waiting).
        self._relisten = False
        # Listeners hear a task's SUBMITTED before its other events. A submission of
        # this process takes a ticket (`_tickets`: the last one handed out) and holds
        # it in `_in_flight` until it has announced its task; an event of a run waits
        # in `_held` for the submissions in flight when it came (see `_emit_run_locked`).
        self._tickets = 0
        self._in_flight: set[int] = set()
        self._held: list[tuple[int, TaskEventKind, RedisHandler[Any], Any, Any]] = []
        self._callbacks: queue.SimpleQueue[tuple[Any, Any] | None] = queue.SimpleQueue()
        #: The server's clock minus this one's, in seconds (from each promote).
        self._skew = 0.0
        # The parsed options of each registered task submitted without options of its
        # own (the registry never changes an entry, so neither does this).
        self._options_cache: dict[str, Options] = {}
        #: Groups known to exist in the cluster (from Config.limits, set_limit, Redis).
        self._known_groups: set[str] = set(config.limits)
        self._started_wall = 0.0

    # -- calling Redis -------------------------------------------------------------

    def _call(self, fn: Callable[[], X]) -> X:
        """A user's call: retried through an outage for up to `lease` seconds, then
        `BackendUnavailable`."""
        return self._outages.call(fn, limit=self._config.lease)

    def _background(self, fn: Callable[[], X], event: threading.Event) -> X:
        """A background call: retried until Redis answers or `event` is set (then the
        connection error propagates)."""
        return self._outages.call(fn, stopping=event)

    # -- the lifecycle's hooks (see TaskManager) ----------------------------------

    def _opening(self) -> None:
        """Join the cluster (retrying for `lease` seconds: `BackendUnavailable`)."""
        with self._lock:
            self._shut = False
            self._jobs.clear()
        self._halting.clear()
        self._stopping.clear()
        self._epoch += 1
        self._proc = f"{self._base_id}:{self._epoch}"
        self._started_wall = time.time()
        self._call(lambda: self._store.heartbeat(self._proc, self._lease_ms, self._info(), True))
        for group, limit in self._config.limits.items():  # only where the cluster has none
            self._call(lambda g=group, n=limit: self._store.limit(g, n, True))  # type: ignore[misc]

    def _info(self) -> dict[str, Any]:
        """What `inspect` shows of this process."""
        host, pid, _ = self._base_id.split(":")
        return {
            "host": host,
            "pid": int(pid),
            "server": self._config.server_name,
            "workers": self._config.workers,
            "busy": self._busy,
            "started": self._started_wall,
            "names": sorted(self._registry),
        }

    def _stop_requested(self) -> None:
        self._halting.set()
        with self._lock:
            self._shut = True
            self._claimable.notify_all()

    def _closing(self, q: TaskQueue, workers: int) -> None:
        """Hand back at once what this process claimed and did not start, then let
        the workers finish their running tasks and leave."""
        with self._lock:
            jobs = [item for item in q.queue if item is not None]
            q.queue.clear()
            for job in jobs:
                self._jobs.pop(job.id, None)
            for _ in range(workers):
                q.force_locked(None)
        self._hand_back(jobs)

    def _hand_back(self, jobs: list[Job]) -> None:
        """Give `jobs` back to the cluster now (if Redis is away, the reaper will)."""
        by_proc: dict[str, list[int]] = {}
        for job in jobs:
            by_proc.setdefault(job.proc, []).append(job.id)
        for proc, ids in by_proc.items():
            try:
                self._call(lambda p=proc, i=ids: self._store.handback(p, i))  # type: ignore[misc]
            except BackendUnavailable as exc:
                self._log.warning(
                    "could not hand tasks back; others take them after the lease",
                    tasks=len(ids),
                    error=describe(exc),
                )

    def _keep_locked(self, leftover: list[Any], current: bool) -> None:
        """Tasks still queued when a stop timed out: handed back with the running ones."""
        for job in leftover:
            self._jobs[job.id] = job

    def _running_contexts_locked(self) -> list[Context]:
        return [job.ctx for job in self._jobs.values() if job.ctx is not None]

    def _fork_child_locked(self) -> None:
        """In a child made by fork: what the parent claimed stays the parent's (its
        id holds the claims); this manager joins anew, under its own id, at start()."""
        self._jobs.clear()
        self._watches.clear()
        self._services = []
        self._busy = 0
        self._shut = True
        self._base_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

    def _kept_count_locked(self) -> int:
        return 0

    def _can_wait(self) -> bool:
        """Whether the message thread runs (so a waiter will hear the news): from
        start() until the end of a stop."""
        return self._state is not Lifecycle.STOPPED and not self._stopping.is_set()

    # -- events in order ------------------------------------------------------------

    def _emit_run_locked(
        self, kind: TaskEventKind, handler: RedisHandler[Any], error: Any = None, result: Any = None
    ) -> None:
        """An event of a run here. Any submission of this process in flight now may be
        the one that made the task and has not announced it yet: the event waits for
        those (each made its task before this event came, so later ones never made it)."""
        if self._in_flight:
            self._held.append((self._tickets, kind, handler, error, result))
        else:
            self._emit_locked(kind, handler, error, result)

    def _submitting_locked(self) -> int:
        """A submission begins: its ticket, for `_announced_locked`."""
        self._tickets += 1
        self._in_flight.add(self._tickets)
        return self._tickets

    def _announced_locked(self, ticket: int, handler: RedisHandler[Any] | None) -> None:
        """The submission of `ticket` ended (announcing `handler`, if new): the held
        events that no submission still in flight may precede go out, in order."""
        self._in_flight.discard(ticket)
        if handler is not None:
            self._emit_locked(TaskEventKind.SUBMITTED, handler)
        if self._held:
            first = min(self._in_flight, default=self._tickets + 1)
            ready = 0  # the tickets recorded grow along the list
            while ready < len(self._held) and self._held[ready][0] < first:
                ready += 1
            released, self._held = self._held[:ready], self._held[ready:]
            for _, kind, task, error, result in released:
                self._emit_locked(kind, task, error, result)

    # -- lanes -------------------------------------------------------------------

    def _take_lane(self) -> int:
        try:
            return self._free_lanes.pop()
        except IndexError:
            return next(self._lane_numbers)

    def _give_lane(self, lane: int) -> None:
        self._free_lanes.append(lane)

    # -- handlers ----------------------------------------------------------------

    def _handler(self, task_id: int, label: str | None) -> RedisHandler[Any]:
        """The handler object of this process for a task (made if need be). Without a
        lock: two threads racing for a new id may each make one, which is harmless
        (waiting and callbacks go by id)."""
        handler = self._handlers.get(task_id)
        if handler is None:
            handler = RedisHandler(self, task_id, label)  # type: ignore[arg-type]
            self._handlers[task_id] = handler
        return handler

    def _read(self, task_id: int) -> TaskFields | None:
        return self._call(lambda: self._store.read(task_id))

    def _watch(self, task_id: int) -> TaskFields | None:
        return self._call(lambda: self._store.watch(task_id))

    def _watch_event(self, task_id: int) -> threading.Event:
        """A new event set when the task may have finished (register before looking)."""
        event = threading.Event()
        with self._lock:
            watch = self._watches.get(task_id)
            if watch is None:
                watch = self._watches[task_id] = _Watch()
            watch.events.append(event)
        return event

    def _unwatch_event(self, task_id: int, event: threading.Event) -> None:
        with self._lock:
            watch = self._watches.get(task_id)
            if watch is not None and event in watch.events:
                watch.events.remove(event)
                if not watch.events and not watch.callbacks:
                    del self._watches[task_id]

    def _on_done(
        self, handler: RedisHandler[Any], fn: Callable[[TaskHandler[Any]], object]
    ) -> bool:
        """Call `fn(handler)` when the task finishes; False if it already has (the
        caller runs it now)."""
        with self._lock:
            watch = self._watches.get(handler.id)
            if watch is None:
                watch = self._watches[handler.id] = _Watch()
            watch.callbacks.append(fn)
        fields = self._watch(handler.id)
        if fields is not None:
            handler._keep(fields)
        if fields is not None and not handler._finished(fields):
            return True
        with self._lock:  # finished (or unknown): run it now, unless a message took it
            watch = self._watches.get(handler.id)
            if watch is None or fn not in watch.callbacks:
                return True
            watch.callbacks.remove(fn)
            if not watch.events and not watch.callbacks:
                del self._watches[handler.id]
        return False

    def _run_callback(
        self, handler: TaskHandler[Any], fn: Callable[[TaskHandler[Any]], object]
    ) -> None:
        try:
            fn(handler)
        except BaseException as exc:  # as concurrent.futures: log, never raise
            self._log.error(
                "done callback raised", task_id=handler.id, task=handler.name, error=describe(exc)
            )

    def _finished(self, task_id: int) -> None:
        """A watched task finished (its message arrived): wake its waiters, and queue
        its callbacks for the callback thread."""
        with self._lock:
            watch = self._watches.pop(task_id, None)
        if watch is None:
            return
        for event in watch.events:
            event.set()
        if watch.callbacks:
            self._callbacks.put((task_id, watch.callbacks))
