"""Periodic tasks: every interval (fixed rate or fixed delay), or on a cron schedule.

`Periodic` is the face every backend's periodic shares (the in-memory one in
`backends.memory.periodic`, the Redis one, shared by the cluster, in
`backends.redis.periodic`). Planning is kept in pure functions here (`next_grid`,
`next_cron`), used by both.

Cron expressions are parsed and evaluated by cronsim (chosen over croniter: across
an autumn DST fold croniter runs a daily 02:30 job twice, cronsim once). Two rules
are added on top of it, using cronsim's own matching: a wall time that does not
exist (spring gap) is skipped rather than moved to the end of the gap, and a wall
time that occurs twice (autumn fold) runs once, at its first occurrence.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta, tzinfo
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

from ._time import aware, seconds
from .errors import Unschedulable

if TYPE_CHECKING:
    from .handler import TaskHandler

__all__ = [
    "MIN_INTERVAL",
    "Periodic",
    "next_cron",
    "next_grid",
    "parse_cron",
    "parse_every",
    "parse_zone",
]

_ALIASES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}


def next_grid(grid: float, interval: float, now: float) -> float:
    """The first point of the grid ``grid + k * interval`` (k >= 0) after `now`.

    Fixed-rate planning: however late the previous run was, the next one stays on
    the grid, and missed points collapse into this one (no burst after a stall).
    """
    if grid > now:
        return grid
    # now + the phase of the grid: no overflow however far behind the grid is.
    return now + ((grid - now) % interval or interval)


#: The shortest `every` interval: below it the monotonic clock's float resolution
#: makes "the next point of the grid" meaningless.
MIN_INTERVAL = 1e-6


def parse_every(
    interval: object, jitter: object, fixed_delay: object, start: object
) -> tuple[float, float, bool, float]:
    """`every()`'s arguments, checked: (interval, jitter, fixed_delay, start), with
    `start` as seconds from now (negative for a past time; the interval without one).

    `interval` below a microsecond or `jitter` < 0 raise `ValueError`, a naive
    `start` `Unschedulable`, values of the wrong type `TypeError`.
    """
    period = seconds(interval, "interval")
    if period < MIN_INTERVAL:
        raise ValueError(f"interval must be at least {MIN_INTERVAL} s, not {interval!r}")
    spread = seconds(jitter, "jitter", allow_negative=False)
    if fixed_delay is not True and fixed_delay is not False:
        raise TypeError(f"fixed_delay must be a bool, not {fixed_delay!r}")
    if start is None:
        first = period
    elif isinstance(start, datetime):
        first = aware(start, "start").timestamp() - time.time()
    else:
        first = seconds(start, "start", error=Unschedulable)
    return period, spread, fixed_delay, first


def parse_zone(tz: object) -> tzinfo:
    """A tzinfo from a `tzinfo`, an IANA zone name, or None (UTC)."""
    if tz is None:
        return UTC
    if isinstance(tz, tzinfo):
        return tz
    if not isinstance(tz, str):
        raise TypeError(f"tz must be a zoneinfo.ZoneInfo or a zone name, not {tz!r}")
    try:
        return ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError, OSError) as exc:  # OSError: a directory
        raise ValueError(f"unknown time zone {tz!r}") from exc


def parse_cron(expression: object) -> str:
    """Validate a cron expression (5 fields, or 6 with seconds first, or an alias)."""
    if not isinstance(expression, str):
        raise TypeError(f"a cron expression must be a str, not {expression!r}")
    text = _ALIASES.get(expression.strip().lower(), expression.strip())
    try:
        CronSim(text, datetime(2000, 1, 1))
    except (CronSimError, ValueError, IndexError, KeyError) as exc:
        raise ValueError(f"invalid cron expression {expression!r}: {exc}") from exc
    return text


def _matches(expression: str, wall: datetime) -> bool:
    """Does `expression` match the naive wall time `wall`?"""
    try:
        return next(CronSim(expression, wall - timedelta(seconds=1))) == wall
    except StopIteration:
        return False


def next_cron(expression: str, tz: tzinfo, after: datetime) -> datetime | None:
    """The first time after `after` that `expression` names in `tz`, or None.

    A wall time that does not exist is skipped; one that occurs twice counts once,
    at its first occurrence. None when nothing matches within cronsim's horizon.
    """
    start = after.astimezone(tz)
    try:
        for candidate in CronSim(expression, start):
            if candidate <= after:
                continue  # cronsim works on wall time: it can step back over a fold
            if candidate.fold and candidate.utcoffset() != candidate.replace(fold=0).utcoffset():
                continue  # the second occurrence of a repeated wall time
            if not _matches(expression, candidate.replace(tzinfo=None, fold=0)):
                continue  # moved out of a wall time that does not exist
            return candidate
    except StopIteration:
        pass
    return None


class Periodic:
    """A task run again and again, made by `TaskManager.every` or `TaskManager.cron`.

    Runs never overlap and never pile up: an occurrence that comes due while the
    previous run has not started is merged into it (`coalesced`); one that comes due
    while it runs waits and starts right after it; after a stall or a stop the
    missed occurrences become one run. Any thread may call its methods; they never
    block on a run. Each backend has its own kind; this is their common face (as
    asyncio's AbstractEventLoop, it raises NotImplementedError where a backend
    implements).
    """

    @property
    def key(self) -> str | None:
        raise NotImplementedError

    @property
    def name(self) -> str:
        """The label of the periodic and of each of its runs."""
        raise NotImplementedError

    @property
    def runs(self) -> int:
        """Runs started so far."""
        raise NotImplementedError

    @property
    def coalesced(self) -> int:
        """Occurrences merged into a run that had not started yet."""
        raise NotImplementedError

    @property
    def last(self) -> TaskHandler[Any] | None:
        """The latest run's handler, or None before the first run is due."""
        raise NotImplementedError

    @property
    def next_run(self) -> datetime | None:
        """When the next run is planned (aware UTC, jitter included), else None.

        None while paused, once cancelled, and, for a fixed-delay periodic, while a
        run is under way (the next one is planned when it ends).
        """
        raise NotImplementedError

    def paused(self) -> bool:
        raise NotImplementedError

    def cancelled(self) -> bool:
        raise NotImplementedError

    def cancel(self) -> None:
        """Stop for good: drop the planned run and a run not yet started. Idempotent.

        A run already running finishes.
        """
        raise NotImplementedError

    def pause(self) -> None:
        """No runs until `resume()`: the planned run and a run not yet started are
        dropped (a running run finishes). A no-op unless active."""
        raise NotImplementedError

    def resume(self) -> None:
        """Plan the next run from the schedule after now; no catch-up for the pause.

        A no-op unless paused.
        """
        raise NotImplementedError
