"""A structlog-style logger for tests: it keeps every event and lets a test wait."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from conftest import WAIT


class Recorder:
    """Keeps every event as a dict (``event``, ``level``, bound and given values).

    Thread-safe. `cond` is notified on every event, so a test may share it to wait
    for "this was logged, or that happened", whichever comes first.
    """

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.cond = threading.Condition()
        self.bound: dict[str, Any] = {}

    def bind(self, **values: Any) -> Recorder:
        child = type(self)()
        child.events, child.cond, child.bound = self.events, self.cond, {**self.bound, **values}
        return child

    def _log(self, level: str, event: str, **values: Any) -> None:
        with self.cond:
            self.events.append({"event": event, "level": level, **self.bound, **values})
            self.cond.notify_all()

    def debug(self, event: str, **values: Any) -> None:
        self._log("debug", event, **values)

    def info(self, event: str, **values: Any) -> None:
        self._log("info", event, **values)

    def warning(self, event: str, **values: Any) -> None:
        self._log("warning", event, **values)

    def error(self, event: str, **values: Any) -> None:
        self._log("error", event, **values)

    def named(self, event: str) -> list[dict[str, Any]]:
        with self.cond:
            return [e for e in self.events if e["event"] == event]

    def wait_for(self, event: str, count: int = 1) -> list[dict[str, Any]]:
        """Wait (bounded by WAIT) until `event` was logged at least `count` times."""
        with self.cond:
            ok = self.cond.wait_for(
                lambda: sum(e["event"] == event for e in self.events) >= count, WAIT
            )
        assert ok, f"{event!r} was not logged {count} times: {self.named(event)}"
        return self.named(event)

    def note(self, values: list[str], value: str) -> None:
        """Append `value` to `values` and wake whoever waits on `cond`."""
        with self.cond:
            values.append(value)
            self.cond.notify_all()

    def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Wait (bounded by WAIT) until `predicate()`, checked on every notification."""
        with self.cond:
            self.cond.wait_for(predicate, WAIT)
