"""Concurrency limits per group: Config.limits, group=, set_limit, waiting tasks."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import freezegun.api
import pytest
from conftest import WAIT

from marionette import (
    Config,
    ConfigError,
    Context,
    GroupStats,
    TaskEventKind,
    TaskHandler,
    TaskManager,
    TaskState,
)

Clock = freezegun.api.FrozenDateTimeFactory


# -- helpers -----------------------------------------------------------------------


class Gauge:
    """Task bodies that count how many run at once, record their start order, and
    (unless told otherwise) block until `release` is set."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.inside = 0
        self.peak = 0
        self.order: list[str] = []
        self.release = threading.Event()

    def task(self, name: str, *, block: bool = True) -> Callable[[Context], str]:
        def body(ctx: Context) -> str:
            with self._cond:
                self.inside += 1
                self.peak = max(self.peak, self.inside)
                self.order.append(name)
                self._cond.notify_all()
            try:
                if block:
                    self.release.wait(WAIT)
                return name
            finally:
                with self._cond:
                    self.inside -= 1

        return body

    def wait_started(self, count: int) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: len(self.order) >= count, WAIT)

    def started(self) -> list[str]:
        with self._cond:
            return list(self.order)


class Blocker:
    """A task that says when it started and returns once released."""

    def __init__(self, value: str = "blocker") -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.value = value

    def __call__(self, ctx: Context) -> str:
        self.started.set()
        self.release.wait(WAIT)
        return self.value


def drain_queue(manager: TaskManager, n: int = 4) -> None:
    """Queue `n` ungrouped probes and wait for them: every task queued before them has
    then been met by a worker (started, or held by its group)."""
    for probe in [manager.queue(lambda ctx: None) for _ in range(n)]:
        probe.result(WAIT)


# -- configuration ---------------------------------------------------------------------


def test_limits_come_from_config_or_overrides(make: Callable[..., TaskManager]) -> None:
    """limits= as a TaskManager override or in a Config: every group shows in stats."""
    by_override = make(limits={"http": 2, "db": 4})
    by_config = make(config=Config(limits={"http": 3}))
    assert dict(by_override.stats().groups) == {
        "http": GroupStats(limit=2, running=0, waiting=0),
        "db": GroupStats(limit=4, running=0, waiting=0),
    }
    assert dict(by_config.stats().groups) == {"http": GroupStats(limit=3, running=0, waiting=0)}


@pytest.mark.parametrize("limit", [0, -1])
def test_a_limit_below_one_in_config_raises_config_error(limit: int) -> None:
    """A limit < 1 is a ConfigError, raised when the Config is made."""
    with pytest.raises(ConfigError, match="http"):
        Config(limits={"http": limit})
    with pytest.raises(ConfigError, match="http"):
        TaskManager(limits={"http": limit})


@pytest.mark.parametrize("limit", [1.5, "2"])
def test_a_limit_that_is_not_an_int_in_config_raises_config_error(limit: Any) -> None:
    """A limit that is not an int is not 'an int >= 1': ConfigError."""
    with pytest.raises(ConfigError):
        Config(limits={"http": limit})


def test_limits_from_the_environment() -> None:
    """MARIONETTE_LIMITS="http=2,db=4" is read by Config.from_env."""
    config = Config.from_env(environ={"MARIONETTE_LIMITS": "http=2, db=4"})
    assert dict(config.limits) == {"http": 2, "db": 4}
    assert dict(Config.from_env(environ={}).limits) == {}


@pytest.mark.parametrize("raw", ["http", "http=", "http=x", "=2", "http=0", "http=-1"])
def test_malformed_limits_in_the_environment_raise_config_error(raw: str) -> None:
    """A malformed or invalid MARIONETTE_LIMITS raises ConfigError naming the variable."""
    with pytest.raises(ConfigError, match="MARIONETTE_LIMITS"):
        Config.from_env(environ={"MARIONETTE_LIMITS": raw})


def test_limits_in_config_are_read_only() -> None:
    """The limits mapping cannot be changed behind the manager's back."""
    source = {"http": 2}
    config = Config(limits=source)
    source["http"] = 99
    assert config.limits["http"] == 2
    with pytest.raises(TypeError):
        config.limits["http"] = 5  # type: ignore[index]


# -- the limit ---------------------------------------------------------------------------


def test_never_more_than_the_limit_run_at_once(make: Callable[..., TaskManager]) -> None:
    """Limit 2 on 4 workers: 2 of 6 run, 4 wait PENDING (counted), all run in turn."""
    manager = make(workers=4, limits={"http": 2})
    gauge = Gauge()
    handlers = [manager.queue(gauge.task(f"t{i}"), group="http") for i in range(6)]
    assert gauge.wait_started(2)
    drain_queue(manager)
    assert gauge.started() == ["t0", "t1"]
    assert manager.stats().groups["http"] == GroupStats(limit=2, running=2, waiting=4)
    assert [h.state for h in handlers[2:]] == [TaskState.PENDING] * 4
    gauge.release.set()
    assert [h.result(WAIT) for h in handlers] == [f"t{i}" for i in range(6)]
    assert gauge.peak == 2
    assert manager.join(WAIT)
    assert manager.stats().groups["http"] == GroupStats(limit=2, running=0, waiting=0)


def test_limits_hold_under_load_across_groups(make: Callable[..., TaskManager]) -> None:
    """Many short tasks in two groups and none: each group stays within its limit."""
    manager = make(workers=4, limits={"http": 2, "db": 1})
    gauges = {"http": Gauge(), "db": Gauge(), None: Gauge()}
    handlers: list[TaskHandler] = []
    for i in range(60):
        group = ("http", "db", None)[i % 3]
        body = gauges[group].task(str(i), block=False)
        handlers.append(manager.queue(body, group=group) if group else manager.queue(body))
    for handler in handlers:
        handler.result(WAIT)
    assert gauges["http"].peak <= 2
    assert gauges["db"].peak == 1
    assert sum(len(g.started()) for g in gauges.values()) == 60


def test_a_waiting_task_holds_no_worker(make: Callable[..., TaskManager]) -> None:
    """workers=2, a limit-1 group full of slow tasks: ungrouped tasks still run."""
    manager = make(workers=2, limits={"slow": 1})
    gauge = Gauge()
    slow = [manager.queue(gauge.task(f"slow{i}"), group="slow") for i in range(4)]
    assert gauge.wait_started(1)
    others = [manager.queue(lambda ctx, i=i: i) for i in range(10)]
    assert [h.result(WAIT) for h in others] == list(range(10))
    assert gauge.started() == ["slow0"]
    assert manager.stats().groups["slow"] == GroupStats(limit=1, running=1, waiting=3)
    gauge.release.set()
    assert [h.result(WAIT) for h in slow] == [f"slow{i}" for i in range(4)]
    assert gauge.peak == 1


def test_waiting_tasks_start_in_submission_order_and_can_be_cancelled(
    make: Callable[..., TaskManager],
) -> None:
    """Waiting tasks are pending, cancellable, and start in submission order."""
    manager = make(workers=4, limits={"g": 1})
    gauge = Gauge()
    handlers = [manager.queue(gauge.task(f"t{i}"), group="g") for i in range(6)]
    assert gauge.wait_started(1)
    drain_queue(manager)
    assert manager.pending() == handlers[1:]
    assert manager.stats().groups["g"].waiting == 5
    assert handlers[3].cancel()
    assert handlers[3].state is TaskState.CANCELLED
    assert manager.stats().groups["g"].waiting == 4
    assert manager.pending() == [h for i, h in enumerate(handlers) if i not in (0, 3)]
    gauge.release.set()
    assert manager.join(WAIT)
    assert gauge.started() == ["t0", "t1", "t2", "t4", "t5"]
    stats = manager.stats()
    assert stats.cancelled == 1
    assert stats.submitted == stats.succeeded + stats.failed + stats.cancelled


def test_a_retry_backoff_holds_no_slot(frozen: Clock, make: Callable[..., TaskManager]) -> None:
    """While a grouped task waits for its retry, another task of the group runs."""
    manager = make(workers=2, limits={"g": 1})
    retrying = threading.Event()
    manager.add_listener(lambda event: retrying.set(), events=[TaskEventKind.RETRYING])

    def flaky(ctx: Context) -> str:
        if ctx.attempt == 1:
            raise OSError("first attempt fails")
        return "retried"

    first = manager.queue(flaky, group="g", retries=1, backoff=30)
    assert retrying.wait(WAIT)
    assert first.state is TaskState.SCHEDULED
    assert manager.stats().groups["g"] == GroupStats(limit=1, running=0, waiting=0)
    assert manager.queue(lambda ctx: "meanwhile", group="g").result(WAIT) == "meanwhile"
    frozen.tick(30)
    manager.scheduler.wake()
    assert first.result(WAIT) == "retried"


def test_a_cancelled_running_task_frees_its_slot(make: Callable[..., TaskManager]) -> None:
    """Cancelling the running task of a full group lets the waiting one start."""
    manager = make(workers=2, limits={"g": 1})
    started = threading.Event()

    def cooperative(ctx: Context) -> None:
        started.set()
        ctx.wait(WAIT)
        ctx.check()

    running = manager.queue(cooperative, group="g")
    assert started.wait(WAIT)
    waiting = manager.queue(lambda ctx: "next", group="g")
    assert not running.cancel()
    assert waiting.result(WAIT) == "next"
    assert running.state is TaskState.CANCELLED


def test_a_failed_task_frees_its_slot(make: Callable[..., TaskManager]) -> None:
    """A grouped task that fails for good gives its slot back."""
    manager = make(workers=2, limits={"g": 1})

    def boom(ctx: Context) -> None:
        raise ValueError("boom")

    failed = manager.queue(boom, group="g")
    after = manager.queue(lambda ctx: "after", group="g")
    assert after.result(WAIT) == "after"
    assert isinstance(failed.exception(WAIT), Exception)
    assert manager.stats().groups["g"] == GroupStats(limit=1, running=0, waiting=0)


def test_unknown_group_raises_at_submission(make: Callable[..., TaskManager]) -> None:
    """A group name that is not configured raises ValueError; nothing is submitted."""
    manager = make(limits={"http": 2})
    at = datetime.now(UTC)
    attempts: list[Callable[[], object]] = [
        lambda: manager.queue(lambda ctx: None, group="htpp"),
        lambda: manager.delay(1, lambda ctx: None, group="htpp"),
        lambda: manager.schedule(at, lambda ctx: None, group="htpp"),
        lambda: manager.wrap_task(lambda ctx: None, group="htpp"),
        lambda: manager.every(1, lambda ctx: None, group="htpp"),
        lambda: manager.cron("* * * * *", lambda ctx: None, group="htpp"),
    ]
    for attempt in attempts:
        with pytest.raises(ValueError, match="htpp"):
            attempt()
    assert manager.stats().submitted == 0
    assert manager.pending() == []


def test_waiting_tasks_are_kept_across_a_stop_that_timed_out(
    make: Callable[..., TaskManager],
) -> None:
    """A task waiting for its group survives a stop(timeout) and runs after start()."""
    manager = make(workers=2, limits={"g": 1})
    blocker = Blocker()
    running = manager.queue(blocker, group="g")
    assert blocker.started.wait(WAIT)
    waiting = manager.queue(lambda ctx: "kept", group="g")
    drain_queue(manager)
    manager.stop(timeout=0.05)
    assert not manager.is_running()
    assert waiting.state is TaskState.PENDING
    blocker.release.set()
    assert running.result(WAIT) == "blocker"
    assert waiting.state is TaskState.PENDING
    manager.start()
    assert waiting.result(WAIT) == "kept"


# -- set_limit -------------------------------------------------------------------------


def test_raising_a_limit_starts_waiting_tasks_at_once(make: Callable[..., TaskManager]) -> None:
    """set_limit up: waiting tasks start while the running one still runs."""
    manager = make(workers=4, limits={"g": 1})
    gauge = Gauge()
    handlers = [manager.queue(gauge.task(f"t{i}"), group="g") for i in range(4)]
    assert gauge.wait_started(1)
    drain_queue(manager)
    assert gauge.started() == ["t0"]
    manager.set_limit("g", 3)
    assert gauge.wait_started(3)
    assert gauge.started() == ["t0", "t1", "t2"]
    assert manager.stats().groups["g"] == GroupStats(limit=3, running=3, waiting=1)
    gauge.release.set()
    assert [h.result(WAIT) for h in handlers] == ["t0", "t1", "t2", "t3"]
    assert gauge.peak == 3


def test_lowering_a_limit_lets_running_tasks_finish_and_holds_new_starts(
    make: Callable[..., TaskManager],
) -> None:
    """Lowering a limit lets running tasks finish and holds new starts until under it."""
    manager = make(workers=4, limits={"g": 3})
    blockers = [Blocker(f"b{i}") for i in range(3)]
    running = [manager.queue(b, group="g") for b in blockers]
    for blocker in blockers:
        assert blocker.started.wait(WAIT)
    manager.set_limit("g", 1)
    assert manager.stats().groups["g"] == GroupStats(limit=1, running=3, waiting=0)
    held = manager.queue(lambda ctx: "held", group="g")
    drain_queue(manager)
    assert held.state is TaskState.PENDING
    for index in (0, 1):
        blockers[index].release.set()
        assert running[index].result(WAIT) == f"b{index}"
        assert held.state is TaskState.PENDING
    assert manager.stats().groups["g"] == GroupStats(limit=1, running=1, waiting=1)
    blockers[2].release.set()
    assert held.result(WAIT) == "held"


def test_set_limit_adds_a_group(make: Callable[..., TaskManager]) -> None:
    """set_limit on a new name adds the group: it is accepted and shows in stats."""
    manager = make()
    with pytest.raises(ValueError, match="fresh"):
        manager.queue(lambda ctx: None, group="fresh")
    manager.set_limit("fresh", 2)
    assert manager.queue(lambda ctx: "ok", group="fresh").result(WAIT) == "ok"
    assert manager.stats().groups["fresh"] == GroupStats(limit=2, running=0, waiting=0)


def test_set_limit_works_on_a_stopped_manager() -> None:
    """set_limit before start() configures the group for the run."""
    manager = TaskManager(workers=1)
    manager.set_limit("g", 1)
    manager.start()
    try:
        assert manager.queue(lambda ctx: "ok", group="g").result(WAIT) == "ok"
    finally:
        manager.stop(timeout=WAIT)


@pytest.mark.parametrize("limit", [0, -1, 1.5, "2", True, None])
def test_set_limit_rejects_anything_but_an_int_of_at_least_one(
    make: Callable[..., TaskManager], limit: Any
) -> None:
    """set_limit with n < 1 or a non-int raises ValueError and changes nothing."""
    manager = make(limits={"g": 2})
    with pytest.raises(ValueError, match="limit"):
        manager.set_limit("g", limit)
    with pytest.raises(ValueError, match="limit"):
        manager.set_limit("new", limit)
    assert dict(manager.stats().groups) == {"g": GroupStats(limit=2, running=0, waiting=0)}


def test_lowering_a_limit_holds_a_task_released_but_not_yet_started(
    make: Callable[..., TaskManager],
) -> None:
    """A task released by a raised limit, not yet started, is held when the limit drops."""
    manager = make(workers=3, limits={"g": 2})
    gauge = Gauge()
    running = [manager.queue(gauge.task(f"r{i}"), group="g") for i in range(2)]
    assert gauge.wait_started(2)
    released = manager.queue(gauge.task("released"), group="g")
    other = Blocker("other")
    other_handler = manager.queue(other)  # the third worker met `released` first
    assert other.started.wait(WAIT)
    manager.set_limit("g", 3)  # `released` gets a slot but no worker is free
    manager.set_limit("g", 1)
    other.release.set()
    assert other_handler.result(WAIT) == "other"  # its worker then met `released`
    try:
        assert released.state is TaskState.PENDING
        assert manager.stats().groups["g"].running <= 2
    finally:
        gauge.release.set()
        for handler in [*running, released]:
            handler.result(WAIT)
