"""MemoryPeriodic: a periodic task of the in-memory backend.

A `MemoryPeriodic` is itself an item of the manager's scheduler: its planned next run
is one entry, so 10,000 periodics cost 10,000 heap entries and no thread of their own.
When an occurrence comes due the manager turns it into an ordinary task (a "run"),
and runs pass through a `Slot` like keyed tasks: never two at once, at most one
waiting behind a running one, and an occurrence that finds a run still waiting to
start is merged into it (`coalesced`). Planning uses the pure functions of
`marionette.periodic`; the manager owns the state changes, under its lock.
"""

from __future__ import annotations

import enum
import random
import time
from datetime import UTC, datetime, tzinfo
from typing import TYPE_CHECKING, Any, Protocol

from marionette.periodic import Periodic, next_cron, next_grid

if TYPE_CHECKING:
    from marionette.backends.memory._gates import Slot
    from marionette.handler import Options, TaskHandler
    from marionette.scheduler import Scheduler

__all__ = ["MemoryPeriodic"]


class _Owner(Protocol):
    """What a periodic needs from the manager that made it."""

    _scheduler: Scheduler[Any]

    def _periodic_stop(self, periodic: MemoryPeriodic, state: _State) -> None: ...
    def _periodic_resume(self, periodic: MemoryPeriodic) -> None: ...


class _State(enum.Enum):
    ACTIVE = "active"
    PAUSED = "paused"
    CANCELLED = "cancelled"


class MemoryPeriodic(Periodic):
    """A periodic of an in-memory manager (see `Periodic` for the interface).

    Any thread may call its methods; they never block on a run. Its fields change
    under the manager's lock. Runs survive `stop()`/`start()` like scheduled tasks.
    """

    def __init__(
        self,
        owner: _Owner,
        fn: Any,
        name: str,
        *,
        key: str | None,
        interval: float | None = None,
        jitter: float = 0.0,
        fixed_delay: bool = False,
        cron: str | None = None,
        tz: tzinfo = UTC,
    ) -> None:
        self._owner = owner
        self._fn = fn
        self._name = name
        self._key = key
        self._interval = interval
        self._jitter = jitter
        self._fixed_delay = fixed_delay
        self._cron = cron
        self._tz = tz
        # The un-jittered time of the next occurrence: a time.monotonic() value for
        # `every`, a time.time() value for `cron`.
        self._grid = 0.0
        self._state = _State.ACTIVE
        # Set by the manager right after construction.
        self._slot: Slot
        self._opts: Options
        self._runs = 0
        self._coalesced = 0
        self._last: TaskHandler[Any] | None = None

    # -- reading ---------------------------------------------------------------

    @property
    def key(self) -> str | None:
        return self._key

    @property
    def name(self) -> str:
        """The label of the periodic and of each of its runs."""
        return self._name

    @property
    def runs(self) -> int:
        """Runs started so far."""
        return self._runs

    @property
    def coalesced(self) -> int:
        """Occurrences merged into a run that had not started yet."""
        return self._coalesced

    @property
    def last(self) -> TaskHandler[Any] | None:
        """The latest run's handler, or None before the first run is due."""
        return self._last

    @property
    def next_run(self) -> datetime | None:
        """When the next run is planned (aware UTC, jitter included), else None.

        None while paused, once cancelled, and, for a fixed-delay periodic, while a
        run is under way (the next one is planned when it ends).
        """
        return self._owner._scheduler.due(self)

    def paused(self) -> bool:
        return self._state is _State.PAUSED

    def cancelled(self) -> bool:
        return self._state is _State.CANCELLED

    # -- acting ----------------------------------------------------------------

    def cancel(self) -> None:
        """Stop for good: drop the planned run and a run not yet started. Idempotent.

        A run already running finishes.
        """
        self._owner._periodic_stop(self, _State.CANCELLED)

    def pause(self) -> None:
        """No runs until `resume()`: the planned run and a run not yet started are
        dropped (a running run finishes). A no-op unless active."""
        self._owner._periodic_stop(self, _State.PAUSED)

    def resume(self) -> None:
        """Plan the next run from the schedule after now; no catch-up for the pause.

        A no-op unless paused.
        """
        self._owner._periodic_resume(self)

    # -- planning (called by the manager, under its lock) ----------------------

    def _first(self, start: float) -> tuple[float, bool] | None:
        """Plan the first occurrence from `start` (monotonic); `(due, wall)`."""
        if self._cron is not None:
            return self._plan_cron(time.time())
        self._grid = start
        return self._jittered(start), False

    def _following(self, now: float, wall_now: float) -> tuple[float, bool] | None:
        """Plan the occurrence after the one due now; None when there is none."""
        if self._cron is not None:
            # After the one just due, even if the wall clock was set back meanwhile.
            return self._plan_cron(max(wall_now, self._grid))
        assert self._interval is not None
        if self._fixed_delay:
            self._grid = now + self._interval
        else:
            self._grid = next_grid(self._grid, self._interval, now)
        return self._jittered(self._grid), False

    def _resumed(self, now: float, wall_now: float) -> tuple[float, bool] | None:
        """Plan the first occurrence after now, on the schedule (no catch-up)."""
        if self._cron is not None:
            return self._plan_cron(wall_now)
        return self._following(now, wall_now)

    def _plan_cron(self, after_wall: float) -> tuple[float, bool] | None:
        assert self._cron is not None
        found = next_cron(self._cron, self._tz, datetime.fromtimestamp(after_wall, UTC))
        if found is None:
            return None
        self._grid = found.timestamp()
        return self._grid, True

    def _jittered(self, grid: float) -> float:
        return grid + random.uniform(0.0, self._jitter) if self._jitter else grid

    def __repr__(self) -> str:
        when = self._owner._scheduler._peek(self)  # no lock: a repr may be made under it
        planned = when.isoformat() if when else "-"
        return f"<Periodic {self.name} {self._state.value} next={planned} runs={self._runs}>"
