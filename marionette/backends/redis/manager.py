"""RedisManager: the Redis backend, as the user sees it.

Submission (`queue`, `delay`, `schedule`), cancellation, `join`, `stats`, `pending`
and `handler`, over the layers below it (`_core`, `_services`, `_workers`: one class
read in four modules). Every process with the same Redis and namespace is one
cluster: a task submitted in any of them is in Redis before the call returns, runs in
whichever process registered its name and claims it, at least once, and its handler
can be read and waited on from any of them.

Tasks travel by name and JSON: a task is a registered function (``@tm.task``)
submitted with its arguments (``rt.queue(...)``, ``tm.queue(rt.bind(...))``), and
options per submission are plain data (see `codec.encode_options`); strategy objects
are given at registration, where every process registers the same ones.
"""

from __future__ import annotations

import functools
import json
import math
import time
import types
from datetime import UTC, datetime, timedelta
from typing import Any

from marionette import _threads
from marionette._time import aware, seconds
from marionette.backends.redis._workers import Workers
from marionette.backends.redis.codec import encode_call, encode_options
from marionette.backends.redis.handler import RedisHandler, label
from marionette.backends.redis.periodic import RedisPeriodic, definition, first_plan, resumed
from marionette.config import check_limit
from marionette.errors import TaskManagerStopped, Unschedulable, text
from marionette.events import TaskEventKind
from marionette.handler import Submittable, T, TaskHandler
from marionette.manager import Lifecycle, remaining
from marionette.periodic import Periodic, parse_cron, parse_every, parse_zone
from marionette.registry import Call, RegisteredTask
from marionette.stats import GroupStats, Stats

__all__ = ["RedisManager"]

#: Registered options every process needs to read a task (its label, its headline
#: error, its key and group); the others are applied by the process that runs it,
#: from its own registry.
_SHARED_OPTIONS = ("name", "error", "key", "group")
#: `pending()`'s bound when none is given.
PENDING_LIMIT = 1000


class RedisManager(Workers):
    """A `TaskManager` whose tasks, schedule and results live in Redis, shared by every
    process of its namespace (see the module docstring and `Config`)."""

    # -- submission --------------------------------------------------------------

    def wrap_task(self, task: Submittable[T], **opts: Any) -> TaskHandler[T]:
        """Not on Redis: a task's handler exists once it is submitted (its id is the
        cluster's); submit with `queue`, `delay` or `schedule`."""
        raise TypeError(
            "wrap_task() is in-memory only: on Redis a handler exists once its task is "
            "submitted; use queue(), delay() or schedule()"
        )

    def queue(self, task: Submittable[T], *, block: bool = True, **opts: Any) -> TaskHandler[T]:
        """Put a registered call in the shared queue; returns its handler.

        Never waits for room (the shared queue is bounded by Redis's memory): `block`
        is accepted for compatibility and `QueueFull` never raised. The task is in
        Redis when this returns; while Redis is unreachable this retries for `lease`
        seconds, then raises `BackendUnavailable` (a retried call never makes a second
        task). A plain callable or `Task` object raises `TypeError` (register it with
        ``@tm.task``); arguments that are not JSON raise `TypeError` naming them, a
        payload over 512 KiB `ValueError`. Raises `TaskManagerStopped` unless running.
        """
        if block is not True and block is not False:
            raise TypeError(f"block must be a bool, not {block!r}")
        return self._submit(task, opts, "q", 0)

    def delay(self, delay: float | timedelta, task: Submittable[T], **opts: Any) -> TaskHandler[T]:
        """Put a registered call in the shared schedule, due `delay` seconds (or a
        `timedelta`) from now (by the Redis server's clock); negative means now. As
        `queue` otherwise."""
        wait = seconds(delay, "delay", error=Unschedulable)
        return self._submit(task, opts, "d", max(0, math.ceil(wait * 1000)))

    def schedule(self, at: datetime, task: Submittable[T], **opts: Any) -> TaskHandler[T]:
        """Put a registered call in the shared schedule, due at the aware `datetime`
        `at` (a past time means now). As `queue` otherwise."""
        return self._submit(task, opts, "a", math.ceil(aware(at).timestamp() * 1000))

    def _submit(self, task: Any, opts: dict[str, Any], mode: str, when: int) -> RedisHandler[Any]:
        call = _call_of(task)
        registered = call.task
        options = encode_options({**self._travelling(registered), **opts})
        payload = encode_call(registered.name, call.args, call.kwargs)
        options_text = json.dumps(options, separators=(",", ":")) if options else ""
        key, group = options.get("key", ""), options.get("group", "")
        if group:
            self._check_group(group)
        if self._state is not Lifecycle.RUNNING:
            raise TaskManagerStopped()
        proc, token, lane = self._proc, str(next(self._tokens)), self._take_lane()
        tries = 0

        def submit() -> tuple[int, bool]:
            nonlocal tries
            tries += 1
            return self._store.submit(
                proc, lane, token, registered.name, payload, options_text, mode, when, key,
                group, tries > 1,
            )  # fmt: skip

        ticket = 0  # none: no listener wants SUBMITTED, so no event waits for it
        if TaskEventKind.SUBMITTED in self._events.wanted:
            with self._lock:
                ticket = self._submitting_locked()
        handler = None
        try:
            task_id, new = self._call(submit)
            handler = self._handler(task_id, label(registered.name, options_text))
        finally:
            self._give_lane(lane)
            if ticket:
                with self._lock:
                    self._announced_locked(ticket, handler if handler is not None and new else None)
        return handler

    def _check_group(self, group: str) -> None:
        """An unknown group raises `ValueError` (a typo must not lift a limit)."""
        if group in self._known_groups:
            return
        if not self._call(lambda: self._store.is_group(group)):
            raise ValueError(
                f"unknown group {group!r}: configure it in Config.limits or set_limit()"
            )
        self._known_groups.add(group)

    def _travelling(self, registered: RegisteredTask[Any, Any]) -> dict[str, Any]:
        """The options of `registered` that its task must carry: those every process
        needs to read it (label, headline error, key, group), and those that differ
        from the registration (`rt.options(...)` variants), which the running process
        cannot know. A strategy object differing from the registration cannot travel:
        `TypeError`."""
        base = self._registry.get(registered.name)
        base_defaults = {} if base is None else base.defaults
        out = {}
        for option, value in registered.defaults.items():
            same = option in base_defaults and base_defaults[option] is value
            if option in _SHARED_OPTIONS or not same:
                if same and callable(value):
                    continue
                out[option] = value
        return out

    # -- cancellation --------------------------------------------------------------

    def _cancel(self, handler: RedisHandler[Any]) -> bool:
        """`RedisHandler.cancel`: a waiting task is removed atomically and never runs
        (True); a running one, in any process, has its context cancelled (False)."""
        state: str = self._call(lambda: self._store.cancel(handler.id))
        if state == "now":
            if TaskEventKind.CANCELLED in self._events.wanted:
                with self._lock:
                    self._emit_locked(TaskEventKind.CANCELLED, handler)
            return True
        if state == "r":
            self._cancel_running(handler.id)  # at once if it runs here
            return False
        return state == "C"

    # -- waiting and inspection ----------------------------------------------------

    def join(self, timeout: float | None = None) -> bool:
        """Block until no task of the cluster is queued, running, delayed or waiting
        for a retry (future runs of a periodic aside); False if `timeout` seconds
        pass first. Woken by the cluster's "idle" message, never by polling. From
        inside a task or a listener it raises `RuntimeError`; on a stopped manager
        (nothing carries the news) it raises `TaskManagerStopped` unless idle now."""
        if _threads.current_owner() is self:
            raise RuntimeError("join() from inside a task would wait for that task itself")
        limit = None if timeout is None else min(seconds(timeout, "timeout"), 1e9)
        deadline = None if limit is None else time.monotonic() + limit
        while True:
            with self._lock:
                seen = self._idle
            counters = self._call(self._store.counters)
            if all(counters.get(g, 0) <= 0 for g in ("queued", "scheduled", "running")):
                return True
            if not self.is_running():
                raise TaskManagerStopped("join() on Redis needs a running manager")
            with self._lock:
                if not self._changed.wait_for(
                    functools.partial(self._idle_changed, seen), remaining(deadline)
                ):
                    return False

    def _idle_changed(self, seen: int) -> bool:
        """Since `seen`, the cluster may have gone idle, or the manager stopped."""
        return self._idle != seen or not self.is_running()

    def stats(self) -> Stats:
        """The cluster's counters, `queued`, `scheduled`, `running` and `processes`,
        with this process's `workers`, `busy` and `uptime` (two reads of Redis)."""
        counters = self._call(self._store.counters)
        processes = self._call(self._store.live_processes)
        with self._lock:
            busy = self._busy
            uptime = (
                time.monotonic() - self._started_at if self._state is not Lifecycle.STOPPED else 0.0
            )
        groups = self._call(self._store.groups)
        return Stats(
            workers=self._config.workers,
            busy=busy,
            queued=max(0, counters.get("queued", 0)),
            scheduled=max(0, counters.get("scheduled", 0)),
            running=max(0, counters.get("running", 0)),
            submitted=counters.get("submitted", 0),
            succeeded=counters.get("succeeded", 0),
            failed=counters.get("failed", 0),
            retried=counters.get("retried", 0),
            cancelled=counters.get("cancelled", 0),
            coalesced=counters.get("coalesced", 0),
            groups=types.MappingProxyType(
                {
                    name: GroupStats(limit, running, waiting)
                    for name, (limit, running, waiting) in groups.items()
                }
            ),
            uptime=uptime,
            processes=processes,
        )

    # -- keys, rescheduling, groups ------------------------------------------------

    def get(self, key: str) -> TaskHandler[Any] | None:
        """The key's pending task in the cluster, else its running one, else None."""
        if not isinstance(key, str):
            raise TypeError(f"key must be a str, not {key!r}")
        pending, running = self._call(lambda: self._store.key_tasks(key))
        task_id = pending if pending is not None else running
        return None if task_id is None else self.handler(task_id)

    def reschedule(
        self, task: str | TaskHandler[Any], when: float | datetime, *, only_sooner: bool = False
    ) -> bool:
        """Move a scheduled task of the cluster (delayed, scheduled, or waiting for a
        retry; by key or handler) to `when` (a delay or an aware `datetime`); for a
        key with no such task, its periodic's next occurrence. With `only_sooner`, only
        to an earlier time. Returns whether it moved."""
        if not isinstance(task, (str, TaskHandler)):
            raise TypeError(f"task must be a key or a TaskHandler, not {task!r}")
        if isinstance(when, datetime):
            due = math.ceil(aware(when, "when").timestamp() * 1000)
        else:
            wait = seconds(when, "when", error=Unschedulable)
            due = math.ceil((time.time() + self._skew + max(0.0, wait)) * 1000)
        if isinstance(task, TaskHandler):
            if not isinstance(task, RedisHandler) or task._manager is not self:
                raise ValueError(f"{task!r} belongs to another TaskManager")
            return self._call(lambda: self._store.move(task.id, due, only_sooner))
        pending, running = self._call(lambda: self._store.key_tasks(task))
        for task_id in (pending, running):
            if task_id is not None and self._call(
                lambda i=task_id: self._store.move(i, due, only_sooner)  # type: ignore[misc]
            ):
                return True
        return self._call(lambda: self._store.replan(task, due, only_sooner))

    def set_limit(self, group: str, limit: int) -> None:
        """Set or add a group's limit for the whole cluster (`n` an int >= 1, else
        `ValueError`); raising it starts waiting tasks at once, lowering it lets
        running tasks finish and holds new starts until the group is under it."""
        check_limit(group, limit)
        self._call(lambda: self._store.limit(group, limit, False))
        self._known_groups.add(group)

    # -- periodics -------------------------------------------------------------------

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
        """Run a registered call every `interval` seconds, once per occurrence in the
        whole cluster; `key` (required on Redis) is the periodic's identity. A process
        defining a key that exists joins it (keeping the cluster's schedule: `start`
        is not part of the definition); a different definition replaces it."""
        period, spread, fixed, first = parse_every(interval, jitter, fixed_delay, start)
        now = (time.time() + self._skew) * 1000
        return self._define(
            "every",
            task,
            key,
            opts,
            now + max(0.0, first) * 1000,
            interval=period,
            fixed_delay=fixed,
            jitter=spread,
        )

    def cron(
        self, expression: str, task: Any, *, tz: Any = None, key: str | None = None, **opts: Any
    ) -> Periodic:
        """Run a registered call at the times a cron expression names in `tz` (a zone
        name or a `zoneinfo.ZoneInfo`), once per occurrence in the whole cluster; `key`
        is required on Redis (see `every`)."""
        text = parse_cron(expression)
        zone = parse_zone(tz)
        name = getattr(zone, "key", None) or ("UTC" if zone is UTC else None)
        if name is None:
            raise TypeError(f"on Redis, tz must be a zone name or a zoneinfo.ZoneInfo, not {tz!r}")
        now = (time.time() + self._skew) * 1000
        return self._define("cron", task, key, opts, now, cron=text, tz=name)

    def _define(
        self, kind: str, task: Any, key: str | None, opts: dict[str, Any], start: float, **plan: Any
    ) -> Periodic:
        if key is None:
            raise ValueError("on Redis, every() and cron() need a key=: the periodic's identity")
        if not isinstance(key, str) or not key:
            raise TypeError(f"key must be a non-empty str, not {key!r}")
        if "key" in opts:
            raise TypeError("key is given once, as every(..., key=...) / cron(..., key=...)")
        call = _call_of(task)
        registered = call.task
        options = encode_options({**self._travelling(registered), **opts})
        options.pop("key", None)
        group = options.get("group", "")
        if group:
            self._check_group(group)
        payload = encode_call(registered.name, call.args, call.kwargs)
        options_text = json.dumps(options, separators=(",", ":")) if options else ""
        spec_text = definition(kind, registered.name, payload, options_text, group, **plan)
        spec = json.loads(spec_text)
        if self._state is not Lifecycle.RUNNING:
            raise TaskManagerStopped()
        now = (time.time() + self._skew) * 1000
        planned = first_plan(spec, start, now)
        if planned is None:
            raise ValueError(f"the cron expression {plan.get('cron')!r} names no time ahead")
        grid, due = planned
        outcome = self._call(
            lambda: self._store.define(
                key,
                spec_text,
                (registered.name, payload, options_text, group),
                (
                    "1" if spec["fixed_delay"] else "",
                    int(spec["interval"] * 1000),
                    int(spec["jitter"] * 1000),
                ),
                (int(grid), math.ceil(due)),
            )
        )
        if outcome == "replaced":
            self._log.warning("periodic definition replaced", key=key, task=registered.name)
        return RedisPeriodic(self, key, label(registered.name, options_text))

    def periodics(self) -> list[Periodic]:
        """The cluster's periodics."""
        found: list[Periodic] = []
        for key in self._call(self._store.periodic_keys):
            fields = self._periodic_fields(key)
            if fields:
                found.append(
                    RedisPeriodic(self, key, label(fields.get("rn", key), fields.get("ro")))
                )
        return found

    def _periodic_fields(self, key: str) -> dict[str, str]:
        return self._call(lambda: self._store.periodic(key))

    def _periodic_due(self, key: str) -> float | None:
        return self._call(lambda: self._store.periodic_due(key))

    def _periodic_stop(self, key: str, how: str) -> None:
        """`Periodic.pause` ('p') and `Periodic.cancel` ('x'), for the whole cluster."""
        cancelled = self._call(lambda: self._store.pause(key, how))
        if cancelled > 0 and TaskEventKind.CANCELLED in self._events.wanted:
            handler = self._handler(cancelled, None)
            with self._lock:
                self._emit_locked(TaskEventKind.CANCELLED, handler)

    def _periodic_resume(self, key: str) -> None:
        fields = self._periodic_fields(key)
        if fields.get("state") != "p":
            return
        now = (time.time() + self._skew) * 1000
        planned = resumed(json.loads(fields["def"]), float(fields.get("grid", now)), now)
        if planned is not None:
            grid, due = planned
            self._call(lambda: self._store.resume(key, int(grid), math.ceil(due)))

    def handler(self, task_id: int) -> TaskHandler[Any] | None:
        """A handler for any task of the cluster, by id; None when Redis does not
        know it (never submitted, or settled longer than `result_ttl` ago)."""
        if not isinstance(task_id, int) or isinstance(task_id, bool):
            raise TypeError(f"task_id must be an int, not {task_id!r}")
        fields = self._read(task_id)
        if fields is None:
            return None
        handler = self._handler(task_id, label(fields.name, fields.options))
        handler._keep(fields)
        return handler

    def pending(self, limit: int | None = None) -> list[TaskHandler[Any]]:
        """The head of the cluster's queues (oldest first), then the next due tasks;
        at most `limit` (None: 1,000) in all."""
        bound = PENDING_LIMIT if limit is None else limit
        if not isinstance(bound, int) or isinstance(bound, bool) or bound < 0:
            raise ValueError(f"limit must be an int >= 0 or None, not {limit!r}")
        queued, scheduled = self._call(lambda: self._store.waiting(bound))
        found: list[TaskHandler[Any]] = [
            self._handler(task_id, label(name, options))
            for task_id, name, options in (*queued, *scheduled)
        ]
        return found[:bound]


def _call_of(task: Any) -> Call[Any]:
    """What a Redis submission takes: a call of a registered task."""
    if isinstance(task, Call):
        return task
    if isinstance(task, TaskHandler):
        raise ValueError(f"{task!r} was already submitted: a handler runs once")
    if isinstance(task, RegisteredTask):
        raise TypeError(
            f"submit a call of {task.name}: {task.name}.queue(...) or tm.queue(rt.bind(...))"
        )
    raise TypeError(
        f"on Redis a task must be registered so that every process finds it by name, and "
        f"{text(task)} is not: decorate the function with @tm.task, then submit "
        f"rt.queue(...) or tm.queue(rt.bind(...))"
    )
