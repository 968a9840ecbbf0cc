"""Shared fixtures: managers that are always stopped, a frozen clock, no leaked threads,
and real Redis servers started by the suite."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any
from uuid import uuid4

import freezegun
import freezegun.api
import pytest
from hypothesis import HealthCheck, settings
from redis_server import RedisServer, delete_namespace

from marionette import TaskManager

if TYPE_CHECKING:
    import redis  # in the test extra; imported by the Redis tests only

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
    before.update(_session_threads())
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


#: A test using one of these needs a real server: it gets the `redis` marker, so that
#: `pytest -m redis` runs exactly the tests that touch Redis.
REDIS_FIXTURES = frozenset({"redis_server", "redis_url", "fresh_redis", "redis_make"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that uses a Redis fixture (directly or through another fixture).

    A fixture obtained with ``request.getfixturevalue`` is invisible here: a
    parametrized fixture that does so marks its Redis parameter itself
    (``pytest.param("redis", marks=pytest.mark.redis)``).
    """
    for item in items:
        if REDIS_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.redis)


#: The session's server once started. Its output thread lives until the session
#: ends, and may start in the middle of a test (``request.getfixturevalue``): the
#: leak check leaves it alone.
_session_servers: list[RedisServer] = []


def _session_threads() -> list[threading.Thread]:
    return [thread for server in _session_servers for thread in server.threads]


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One server for the whole session, started when a test first needs it.

    Tests share it, each in its own namespace (`redis_url`); a test that kills,
    restarts or reconfigures a server uses `fresh_redis` instead.
    """
    server = RedisServer()
    _session_servers.append(server)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        _session_servers.remove(server)


@pytest.fixture
def redis_namespace() -> str:
    """A namespace of this test alone; its keys are ``{namespace}:...``."""
    return f"t{uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def _redis_admin(redis_server: RedisServer) -> redis.Redis:
    """The suite's own client of the session server (closed when the server stops)."""
    return redis_server.client()


@pytest.fixture
def redis_url(
    redis_server: RedisServer, redis_namespace: str, _redis_admin: redis.Redis
) -> Iterator[str]:
    """The session server's URL; every key of `redis_namespace` is deleted after the
    test, so the next test starts clean."""
    yield redis_server.url
    delete_namespace(_redis_admin, redis_namespace)


@pytest.fixture
def redis_make(redis_url: str, redis_namespace: str) -> Iterator[Callable[..., TaskManager]]:
    """Make managers of the test's Redis cluster (started unless ``start=False``; a 2 s
    lease unless given); every one is stopped after the test."""
    made: list[TaskManager] = []

    def factory(start: bool = True, **overrides: Any) -> TaskManager:
        overrides.setdefault("lease", 2.0)
        manager = TaskManager(backend=redis_url, namespace=redis_namespace, **overrides)
        made.append(manager)
        if start:
            manager.start()
        return manager

    yield factory
    for manager in made:
        manager.stop(timeout=WAIT)


@pytest.fixture
def fresh_redis() -> Iterator[RedisServer]:
    """A server of this test alone, with an fsynced append-only file, so that
    ``kill()`` then ``restart()`` keeps every acknowledged write; stopped after it."""
    with RedisServer(appendonly=True) as server:
        yield server
