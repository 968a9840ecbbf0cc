"""RedisPeriodic: a periodic task of the cluster, and how its occurrences are planned.

A periodic lives in Redis under its key (``{ns}:per:<key>``): its definition, its
state, the grid time of its next occurrence, its counters. The next occurrence is an
entry of the zset ``{ns}:pers``; every process's scheduler thread sleeps until the
earliest entry of it or of the task schedule, and the first to wake fires it with
the ``fire`` script, which checks the grid it was given: an occurrence fires once in
the cluster, whichever processes run or die. A run is an ordinary task of the
periodic's key, so runs never overlap anywhere, and an occurrence that finds the
previous run not started merges into it (coalesced), as in memory.

Planning happens in the process that fires (cron needs cronsim, and jitter a random
number), on the server's clock (milliseconds), with the same functions as in memory
(`next_grid`, `next_cron`): fixed rate stays on its grid and missed occurrences
collapse into one run; fixed delay is planned by the run's end (in the scripts); cron
follows its zone across daylight saving changes.
"""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from marionette.handler import TaskHandler
from marionette.periodic import Periodic, next_cron, next_grid, parse_zone

if TYPE_CHECKING:
    from marionette.backends.redis.manager import RedisManager

__all__ = ["RedisPeriodic", "definition", "first_plan", "following", "resumed"]


def definition(
    kind: str,
    task: str,
    payload: str,
    options: str,
    group: str,
    *,
    interval: float = 0.0,
    fixed_delay: bool = False,
    jitter: float = 0.0,
    cron: str = "",
    tz: str = "",
) -> str:
    """A periodic's definition as canonical JSON: equal definitions are equal text."""
    return json.dumps(
        {
            "kind": kind,
            "task": task,
            "payload": payload,
            "options": options,
            "group": group,
            "interval": interval,
            "fixed_delay": fixed_delay,
            "jitter": jitter,
            "cron": cron,
            "tz": tz,
        },
        sort_keys=True,
        separators=(",", ":"),
    )


def _jitter(spec: dict[str, Any]) -> float:
    jitter = float(spec.get("jitter", 0.0))
    return random.uniform(0.0, jitter * 1000) if jitter else 0.0


def _cron_after(spec: dict[str, Any], after_ms: float) -> float | None:
    found = next_cron(
        spec["cron"], parse_zone(spec["tz"] or None), datetime.fromtimestamp(after_ms / 1000, UTC)
    )
    return None if found is None else found.timestamp() * 1000


def first_plan(spec: dict[str, Any], start_ms: float, now_ms: float) -> tuple[float, float] | None:
    """(grid, due) of a new periodic's first occurrence: for `every`, at `start_ms`;
    for cron, the first time after now."""
    if spec["kind"] == "cron":
        grid = _cron_after(spec, now_ms)
        return None if grid is None else (grid, grid)
    return start_ms, start_ms + _jitter(spec)


def following(spec: dict[str, Any], grid_ms: float, now_ms: float) -> tuple[float, float] | None:
    """(grid, due) of the occurrence after the one at `grid_ms`, fired at `now_ms`;
    None for a fixed-delay periodic (its run's end plans the next) or a cron that
    names no later time."""
    if spec["kind"] == "cron":
        grid = _cron_after(spec, max(now_ms, grid_ms))
        return None if grid is None else (grid, grid)
    if spec["fixed_delay"]:
        return None
    grid = next_grid(grid_ms, float(spec["interval"]) * 1000, now_ms)
    return grid, grid + _jitter(spec)


def resumed(spec: dict[str, Any], grid_ms: float, now_ms: float) -> tuple[float, float] | None:
    """(grid, due) of the first occurrence after now, on the schedule (no catch-up)."""
    if spec["kind"] == "every" and spec["fixed_delay"]:
        grid = now_ms + float(spec["interval"]) * 1000
        return grid, grid + _jitter(spec)
    return following({**spec, "fixed_delay": False}, grid_ms, now_ms)


class RedisPeriodic(Periodic):
    """A periodic of the cluster, by key (see the module docstring). Its properties
    read Redis (one round trip each); its methods change it for the whole cluster."""

    def __init__(self, manager: RedisManager, key: str, name: str) -> None:
        self._manager = manager
        self._key = key
        self._name = name

    def _fields(self) -> dict[str, str]:
        return self._manager._periodic_fields(self._key)

    @property
    def key(self) -> str:
        return self._key

    @property
    def name(self) -> str:
        return self._name

    @property
    def runs(self) -> int:
        return int(self._fields().get("runs", 0))

    @property
    def coalesced(self) -> int:
        return int(self._fields().get("coalesced", 0))

    @property
    def last(self) -> TaskHandler[Any] | None:
        last = self._fields().get("last")
        return None if last is None else self._manager._handler(int(last), self._name)

    @property
    def next_run(self) -> datetime | None:
        due = self._manager._periodic_due(self._key)
        return None if due is None else datetime.fromtimestamp(due / 1000, UTC)

    def paused(self) -> bool:
        return self._fields().get("state") == "p"

    def cancelled(self) -> bool:
        return not self._fields()

    def cancel(self) -> None:
        self._manager._periodic_stop(self._key, "x")

    def pause(self) -> None:
        self._manager._periodic_stop(self._key, "p")

    def resume(self) -> None:
        self._manager._periodic_resume(self._key)

    def __repr__(self) -> str:
        return f"<Periodic {self._name} key={self._key}>"
