"""The in-memory backend's reactive layer: keys, gates and periodic tasks.

A task with a key, a group, or a periodic behind it is checked when a worker is
about to start it (`_pass_gates_locked`): if its key's other instance still runs, or
its group is at its limit, it is parked (holding no worker) and put back at the
front of the queue when the gate opens. A periodic's planned next run is one entry
of the scheduler; when it comes due it becomes an ordinary task (a run), or merges
into the run still waiting to start. All of it under the manager's lock (see
`_core`).
"""

from __future__ import annotations

import dataclasses
import time
from datetime import datetime, timedelta
from typing import Any

from marionette.backends.memory.handler import MemoryHandler
from marionette.backends.memory.periodic import MemoryPeriodic
from marionette.backends.memory.periodic import _State as _PeriodicState
from marionette.errors import TaskManagerStopped
from marionette.events import TaskEventKind
from marionette.handler import Options, TaskState, default_name
from marionette.manager import Lifecycle
from marionette.periodic import Periodic, parse_cron, parse_every, parse_zone

from ._core import MemoryCore
from ._gates import Slot

__all__ = ["Reactive"]

_PENDING = TaskState.PENDING
_Kind = TaskEventKind


class Reactive(MemoryCore):
    """Keys, gates and periodics of an in-memory manager."""

    # -- periodic tasks ----------------------------------------------------------

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
        """Run `task` every `interval` seconds (or `timedelta`); returns its `Periodic`.

        The first run is at `start` (a delay or an aware `datetime`; default: one
        interval from now; a past time means now). Later runs stay on the grid
        ``start + k * interval`` (fixed rate), or, with `fixed_delay`, follow the
        end of the previous run by `interval`. `jitter` adds a random 0..jitter
        seconds to each run, planned from the un-jittered grid. Runs never overlap,
        never pile up, and are never skipped for busy workers (see `Periodic`).
        `interval` below a microsecond (zero and negative included) or `jitter` < 0
        raise `ValueError`; a naive `start` raises
        `Unschedulable`. Each run is an ordinary task with `opts`.
        """
        period, spread, fixed, first = parse_every(interval, jitter, fixed_delay, start)
        return self._add_periodic(
            task,
            key,
            opts,
            time.monotonic() + first,
            interval=period,
            jitter=spread,
            fixed_delay=fixed,
        )

    def cron(
        self,
        expression: str,
        task: Any,
        *,
        tz: Any = None,
        key: str | None = None,
        **opts: Any,
    ) -> Periodic:
        """Run `task` at the times a cron expression names; returns its `Periodic`.

        Five fields (minute hour day month weekday), or six with seconds first, or
        an alias (``@hourly``, ``@daily``, ``@weekly``, ``@monthly``, ``@yearly``),
        evaluated in `tz` (a `zoneinfo.ZoneInfo` or a zone name; default UTC).
        Across daylight saving changes, a wall time that does not exist is skipped,
        and one that occurs twice runs once, at its first occurrence. An invalid
        expression or an unknown zone raises `ValueError`. Runs never overlap,
        never pile up, and are never skipped for busy workers (see `Periodic`).
        """
        text = parse_cron(expression)
        zone = parse_zone(tz)
        return self._add_periodic(task, key, opts, time.monotonic(), cron=text, tz=zone)

    def _add_periodic(
        self, task: Any, key: str | None, opts: dict[str, Any], first: float, **plan: Any
    ) -> Periodic:
        if key is not None and (not isinstance(key, str) or not key):
            raise TypeError(f"key must be a non-empty str, not {key!r}")
        if "key" in opts:
            raise TypeError("key is given once, as every(..., key=...) / cron(..., key=...)")
        fn, options, name = self._prepare(task, opts)
        with self._lock:
            if self._state is not Lifecycle.RUNNING:
                raise TaskManagerStopped()
            slot = None if key is None else self._keys.get(key)
            if slot is not None and slot.periodic is not None:
                return slot.periodic
            if slot is None:
                slot = Slot(key)
                if key is not None:
                    self._keys[key] = slot
            periodic = MemoryPeriodic(self, fn, name or default_name(task), key=key, **plan)
            periodic._slot = slot
            periodic._opts = dataclasses.replace(options, key=key, periodic=periodic, gated=True)
            slot.periodic = periodic
            self._periodics[periodic] = None
            self._plan_locked(periodic, periodic._first(first))
        return periodic

    def periodics(self) -> list[Periodic]:
        """The manager's periodics (paused ones too; cancelled ones are gone), oldest
        first."""
        with self._lock:
            return list(self._periodics)

    def _plan_locked(self, periodic: MemoryPeriodic, plan: tuple[float, bool] | None) -> None:
        """Put a periodic's next occurrence in the scheduler (None: there is none)."""
        if plan is None:
            return
        due, wall = plan
        self._scheduler._push_locked(periodic, due, wall)

    def _periodic_stop(self, periodic: MemoryPeriodic, state: _PeriodicState) -> None:
        """`Periodic.cancel` and `Periodic.pause`."""
        with self._lock:
            if periodic._state is _PeriodicState.CANCELLED:
                return
            if state is _PeriodicState.PAUSED and periodic._state is not _PeriodicState.ACTIVE:
                return
            periodic._state = state
            self._scheduler._cancel_locked(periodic)
            slot = periodic._slot
            waiting = slot.pending
            if state is _PeriodicState.CANCELLED:
                slot.periodic = None
                self._periodics.pop(periodic, None)
                self._forget_slot_locked(slot)
        if waiting is not None:
            waiting.cancel()

    def _periodic_resume(self, periodic: MemoryPeriodic) -> None:
        """`Periodic.resume`."""
        with self._lock:
            if periodic._state is not _PeriodicState.PAUSED:
                return
            periodic._state = _PeriodicState.ACTIVE
            self._plan_locked(periodic, periodic._resumed(time.monotonic(), time.time()))

    # -- keys and gates ----------------------------------------------------------

    def _claim_key_locked(self, handler: MemoryHandler[Any]) -> MemoryHandler[Any] | None:
        """Make `handler` its key's pending instance, or return the one there is."""
        key = handler._opts.key
        assert key is not None
        slot = self._keys.get(key)
        if slot is not None and slot.pending is not None:
            return slot.pending
        if handler._state is not _PENDING:
            return handler  # wrapped and cancelled before its submission
        if slot is None:
            slot = self._keys[key] = Slot(key)
        slot.pending = handler
        return None

    def _unclaim_key_locked(self, handler: MemoryHandler[Any]) -> None:
        """Undo `_claim_key_locked` for a submission that did not happen."""
        key = handler._opts.key
        if key is not None:
            slot = self._keys[key]
            slot.ended(handler)
            self._forget_slot_locked(slot)

    def _pass_gates_locked(self, handler: MemoryHandler[Any], opts: Options) -> bool:
        """Check the task's key (or periodic) slot, then its group; park it if shut."""
        slot = self._slot_of(opts)
        if slot is not None and slot.running is not None and slot.running is not handler:
            slot.parked = True  # its namesake still runs: wait for it to end
            self._parked[handler] = None
            return False
        if opts.group is not None and not self._groups[opts.group].admit(handler):
            self._parked[handler] = None
            return False
        if slot is not None:
            slot.admit(handler)
            if opts.periodic is not None and handler._attempts == 0:
                opts.periodic._runs += 1
        return True

    def _slot_of(self, opts: Options) -> Slot | None:
        if opts.periodic is not None:
            return opts.periodic._slot
        return None if opts.key is None else self._keys.get(opts.key)

    def _ungate_locked(self, handler: MemoryHandler[Any], *, final: bool) -> None:
        """An attempt of a gated task ended: free its group slot, and if the task
        ended for good, its key (or periodic) slot too."""
        opts = handler._opts
        released: list[MemoryHandler[Any]] = []
        if opts.group is not None:
            released.extend(self._groups[opts.group].finished())
        if final:
            self._slot_ended_locked(handler, released)
        self._release_locked(released)

    def _slot_ended_locked(
        self, handler: MemoryHandler[Any], released: list[MemoryHandler[Any]]
    ) -> None:
        """`handler` will never run again (it ended, or was cancelled while it waited):
        let its key's parked instance go, and plan a fixed-delay periodic's next run
        (fixed-delay runs are planned from the end of the previous one, whether it
        ran or not)."""
        opts = handler._opts
        slot = self._slot_of(opts)
        if slot is None:
            return
        parked = slot.ended(handler)
        if parked is not None:
            released.append(parked)
        periodic = opts.periodic
        if (
            periodic is not None
            and periodic._fixed_delay
            and periodic._state is _PeriodicState.ACTIVE
            and slot.pending is None
            and slot.running is None
        ):
            self._plan_locked(periodic, periodic._following(time.monotonic(), time.time()))
        self._forget_slot_locked(slot)

    def _forget_waiting_locked(self, handler: MemoryHandler[Any]) -> None:
        """A gated task that was waiting to run (not running) was cancelled."""
        opts = handler._opts
        self._parked.pop(handler, None)
        released: list[MemoryHandler[Any]] = []
        if opts.group is not None:
            released.extend(self._groups[opts.group].forget(handler))
        self._slot_ended_locked(handler, released)
        self._release_locked(released)
