"""Shared fixtures: managers that are always stopped, a frozen clock, no leaked threads."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import freezegun
import freezegun.api
import pytest
from hypothesis import HealthCheck, settings

from marionette import TaskManager

# Threads make examples slower and less even than hypothesis expects.
settings.register_profile(
    "marionette",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    max_examples=50,
)
settings.load_profile("marionette")

#: Generous guard against hangs on a shared, noisy machine; never a synchronization.
WAIT = 10.0


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """Fail a test that leaves a thread running (every fixture stops what it starts)."""
    before = set(threading.enumerate())
    yield
    new = [t for t in threading.enumerate() if t not in before]
    for thread in new:  # a stopped thread may still be on its way out: join, bounded
        thread.join(WAIT)
    alive = [t.name for t in new if t.is_alive()]
    assert not alive, f"threads left running: {alive}"


@pytest.fixture
def tm() -> Iterator[TaskManager]:
    """A running manager with 4 workers, stopped after the test."""
    manager = TaskManager(workers=4)
    manager.start()
    try:
        yield manager
    finally:
        manager.stop(timeout=WAIT)


@pytest.fixture
def make() -> Iterator[Callable[..., TaskManager]]:
    """Make managers with Config overrides (started unless ``start=False``); every
    one is stopped after the test."""
    made: list[TaskManager] = []

    def factory(start: bool = True, **overrides: Any) -> TaskManager:
        manager = TaskManager(**overrides)
        made.append(manager)
        if start:
            manager.start()
        return manager

    yield factory
    for manager in made:
        manager.stop(timeout=WAIT)


@pytest.fixture
def frozen(monkeypatch: pytest.MonkeyPatch) -> Iterator[freezegun.api.FrozenDateTimeFactory]:
    """A frozen clock that the library's own threads see too.

    freezegun hands the real clock to callers whose recent frames pass through the
    `threading` module (every thread the library starts); setting the stack
    inspection limit to 0 switches that off for the test. Move the clock with
    ``frozen.tick(seconds)`` and then call ``scheduler.wake()``.
    """
    monkeypatch.setattr(freezegun.api, "call_stack_inspection_limit", 0)
    with freezegun.freeze_time("2026-01-05 12:00:00", tick=False) as clock:
        yield clock
