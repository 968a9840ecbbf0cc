"""Helpers shared by the tests: a recording logger, and threads that report errors."""

from __future__ import annotations

import threading
import time
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


class Threads:
    """Run functions in named threads; `join()` re-raises the first error they raised."""

    def __init__(self) -> None:
        self.threads: list[threading.Thread] = []
        self.errors: list[BaseException] = []

    def start(self, fn: Callable[[], object]) -> None:
        def run() -> None:
            try:
                fn()
            except BaseException as exc:
                self.errors.append(exc)

        thread = threading.Thread(target=run, name=f"test-thread-{len(self.threads)}")
        self.threads.append(thread)
        thread.start()

    def join(self, timeout: float = 6 * WAIT) -> None:
        """Join them all within `timeout` (a hang guard); fail on a hung thread."""
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        assert [t.name for t in self.threads if t.is_alive()] == [], "a thread hung"
        if self.errors:
            raise self.errors[0]
