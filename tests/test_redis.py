"""The Redis backend in one process: several managers of one namespace form a cluster.

What needs several processes (SIGKILL, partitions, a restarted server) is in
tests/test_redis_processes.py. Every test runs against a real server that the suite
started (see tests/redis_server.py), in a namespace of its own.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis
import tenacity
from conftest import WAIT

from marionette import (
    BackendUnavailable,
    ConfigError,
    Context,
    RemoteError,
    TaskError,
    TaskEvent,
    TaskEventKind,
    TaskHandler,
    TaskManager,
    TaskManagerStopped,
    TaskState,
)
from marionette.backends.redis.store import Store

Make = Callable[..., TaskManager]


@pytest.fixture
def make(redis_make: Make) -> Make:
    """Managers of the test's cluster (see conftest's `redis_make`)."""
    return redis_make


class Boom(Exception):
    """A task's own exception type: it crosses processes as a RemoteError."""


def register(tm: TaskManager) -> dict[str, Any]:
    """The tasks of these tests, registered on `tm` under fixed names."""

    @tm.task(name="add")
    def add(ctx: Context, a: int, b: int) -> int:
        return a + b

    @tm.task(name="when")
    def when(ctx: Context) -> float:
        return time.time()

    @tm.task(name="flaky", retries=3, backoff=0.01)
    def flaky(ctx: Context, fails: int) -> int:
        if ctx.attempt <= fails:
            raise ConnectionError(f"reset {ctx.attempt}")
        return ctx.attempt

    @tm.task(name="boom")
    def boom(ctx: Context) -> None:
        raise Boom("custom")

    @tm.task(name="wait")
    def wait(ctx: Context, seconds: float) -> str:
        return "cancelled" if ctx.wait(seconds) else "waited"

    @tm.task(name="echo")
    def echo(ctx: Context, value: Any) -> Any:
        return value

    return {
        "add": add,
        "when": when,
        "flaky": flaky,
        "boom": boom,
        "wait": wait,
        "echo": echo,
    }


# -- configuration ---------------------------------------------------------------------


def test_import_marionette_does_not_import_redis() -> None:
    """`import marionette` never imports redis-py (a child process checks it cleanly)."""
    import subprocess
    import sys

    code = "import sys, marionette; print('redis' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_malformed_url_raises_config_error_naming_the_backend() -> None:
    """A URL redis-py cannot read raises ConfigError naming `backend`, with no password."""
    with pytest.raises(ConfigError) as caught:
        TaskManager(backend="redis://:secret@localhost:notaport/0")
    assert caught.value.field == "backend"
    assert "secret" not in str(caught.value)


def test_unreachable_redis_at_start_raises_backend_unavailable() -> None:
    """start() against a port nobody listens on retries for `lease`, then raises
    BackendUnavailable (a ConnectionError), and the manager stays stopped."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # free: nothing listens once the socket closes
    tm = TaskManager(backend=f"redis://127.0.0.1:{port}/0", lease=1.0)
    started = time.monotonic()
    with pytest.raises(BackendUnavailable) as caught:
        tm.start()
    assert isinstance(caught.value, ConnectionError)
    assert time.monotonic() - started >= 1.0
    assert not tm.is_running()


def test_zero_workers_submit_only(make: Make) -> None:
    """A manager with workers=0 submits and reads results, and never claims a task."""
    web = make(workers=0)
    tasks = register(web)
    handler = tasks["add"].queue(1, 2)
    with pytest.raises(TimeoutError):
        handler.result(0.2)
    assert handler.state is TaskState.PENDING
    worker = make(workers=2)
    register(worker)
    assert handler.result(WAIT) == 3


# -- submission and results --------------------------------------------------------------


def test_a_task_submitted_in_one_manager_runs_in_another_and_is_read_in_a_third(
    make: Make,
) -> None:
    """Submit in one manager, run in a second, read the result in a third by id."""
    web, worker, reader = make(workers=0), make(), make(workers=0)
    for tm in (web, worker, reader):
        register(tm)
    handler = web._registry["add"].queue(2, 3)
    assert handler.result(WAIT) == 5
    elsewhere = reader.handler(handler.id)
    assert elsewhere is not None
    assert elsewhere.result(WAIT) == 5
    assert elsewhere.state is TaskState.SUCCEEDED
    assert elsewhere.attempts == 1
    assert elsewhere.name == "add"
    assert reader.handler(10**9) is None


def test_ids_are_unique_and_increase_across_managers(make: Make) -> None:
    """Ids from several managers of one cluster never repeat and grow with submission."""
    managers = [make(workers=0) for _ in range(3)]
    ids = []
    for round_ in range(20):
        for tm in managers:
            ids.append(
                register(tm)["add"].queue(round_, 1).id
                if round_ == 0
                else tm._registry["add"].queue(round_, 1).id
            )
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)


def test_arguments_and_results_travel_as_json(make: Make) -> None:
    """Arguments arrive decoded from JSON (tuples as lists) and results come back so."""
    tm = make()
    tasks = register(tm)
    value = {"a": [1, 2.5, "x", None, True], "t": (1, 2)}
    assert tasks["echo"].queue(value).result(WAIT) == {"a": [1, 2.5, "x", None, True], "t": [1, 2]}


def test_arguments_that_are_not_json_raise_type_error_naming_them(make: Make) -> None:
    """A set, a datetime or a dict with int keys as an argument raises TypeError at once."""
    tm = make(workers=0)
    echo = register(tm)["echo"]
    for bad in ({1, 2}, datetime.now(UTC), {1: "x"}):
        with pytest.raises(TypeError, match="args\\[0\\]"):
            echo.queue(bad)


def test_a_payload_over_512_kib_raises_value_error(make: Make) -> None:
    """A submission whose payload exceeds 512 KiB raises ValueError."""
    tm = make(workers=0)
    with pytest.raises(ValueError, match="512"):
        register(tm)["echo"].queue("x" * (512 * 1024 + 1))


def test_a_result_that_is_not_json_fails_the_task_for_good(make: Make) -> None:
    """A task returning a set fails for good with a TypeError in its TaskError."""
    tm = make()

    @tm.task(name="settish", retries=3)
    def settish(ctx: Context) -> set[int]:
        return {1}

    handler = settish.queue()
    with pytest.raises(TaskError) as caught:
        handler.result(WAIT)
    assert isinstance(caught.value.exceptions[0], TypeError)
    assert handler.attempts == 1


def test_plain_callables_and_per_submission_strategies_raise_type_error(make: Make) -> None:
    """On Redis, a plain callable raises TypeError naming @tm.task; a strategy object or
    a context per submission raises TypeError too; wrap_task is in-memory only."""
    tm = make(workers=0)
    add = register(tm)["add"]
    with pytest.raises(TypeError, match=r"@tm\.task"):
        tm.queue(lambda ctx: 1)
    with pytest.raises(TypeError, match="registration"):
        tm.queue(add.bind(1, 2), backoff=tenacity.wait_fixed(1))
    with pytest.raises(TypeError, match="context"):
        tm.queue(add.bind(1, 2), context=Context())
    with pytest.raises(TypeError, match="in-memory"):
        tm.wrap_task(add.bind(1, 2))


def test_submitting_to_a_stopped_manager_raises(make: Make) -> None:
    """Submitting to a manager that is not running raises TaskManagerStopped."""
    tm = make(start=False)
    add = register(tm)["add"]
    with pytest.raises(TaskManagerStopped):
        add.queue(1, 2)


# -- time ----------------------------------------------------------------------------------


def test_delayed_tasks_are_never_early_and_run_once_with_three_schedulers(make: Make) -> None:
    """Tasks delayed over half a second, with three managers' schedulers awake, each run
    once, never before their due time (the server's clock, read by the task)."""
    managers = [make(workers=2) for _ in range(3)]
    for tm in managers:
        register(tm)
    when = managers[0]._registry["when"]
    delays = [0.02 * (i % 25) for i in range(50)]
    earliest, handlers = [], []
    for delay in delays:
        earliest.append(time.time() + delay)  # the server reads its clock after this
        handlers.append(when.delay(delay))
    ran = [h.result(WAIT) for h in handlers]
    early = [at - due for at, due in zip(ran, earliest, strict=True) if at < due]
    assert early == []
    assert all(h.attempts == 1 for h in handlers)
    assert managers[0].join(WAIT)
    stats = managers[1].stats()
    assert stats.succeeded == 50
    assert stats.submitted == 50


def test_schedule_runs_at_a_wall_time(make: Make) -> None:
    """schedule(at) runs on or after `at`; a naive datetime raises Unschedulable."""
    tm = make()
    when = register(tm)["when"]
    at = datetime.now(UTC) + timedelta(seconds=0.3)
    handler = when.schedule(at)
    assert handler.state is TaskState.SCHEDULED
    assert handler.result(WAIT) >= at.timestamp() - 0.001
    with pytest.raises(ValueError, match="naive"):
        when.schedule(datetime.now())


# -- failures ------------------------------------------------------------------------------


def test_retries_use_the_registered_strategies(make: Make) -> None:
    """A task failing twice with retries=3 succeeds on its third attempt; its errors are
    rebuilt as ConnectionErrors."""
    tm = make()
    handler = register(tm)["flaky"].queue(2)
    assert handler.result(WAIT) == 3
    assert handler.attempts == 3
    assert [type(e) for e in handler.errors] == [ConnectionError, ConnectionError]
    assert tm.stats().retried == 2


def test_builtin_errors_are_rebuilt_and_others_arrive_as_remote_errors(make: Make) -> None:
    """A TaskError of rebuilt builtins matches except*; a custom type is a RemoteError with
    its qualified name, message and traceback."""
    tm = make()
    tasks = register(tm)
    failing = tasks["flaky"].options(retries=0).queue(5)
    with pytest.raises(TaskError) as caught:
        failing.result(WAIT)
    matched, rest = caught.value.split(ConnectionError)
    assert matched is not None
    assert rest is None
    custom = tasks["boom"].queue()
    with pytest.raises(TaskError) as caught:
        custom.result(WAIT)
    [remote] = caught.value.exceptions
    assert isinstance(remote, RemoteError)
    assert remote.type_name.endswith("Boom")
    assert remote.message == "custom"
    assert "boom" in remote.traceback
    assert str(caught.value).startswith("boom #")


def test_changed_signature_fails_for_good_with_type_error(make: Make) -> None:
    """Arguments stored for an older signature fail the task for good with TypeError."""
    web, worker = make(workers=0), make()

    @web.task(name="greet", retries=3)
    def greet_old(ctx: Context, who: str) -> str:
        return who

    @worker.task(name="greet", retries=3)
    def greet_new(ctx: Context, who: str, greeting: str) -> str:
        return f"{greeting} {who}"

    handler = greet_old.queue("you")
    with pytest.raises(TaskError) as caught:
        handler.result(WAIT)
    assert isinstance(caught.value.exceptions[0], TypeError)
    assert handler.attempts == 1


# -- cancellation --------------------------------------------------------------------------


def test_cancel_a_waiting_task_and_it_never_runs(make: Make) -> None:
    """A delayed task cancelled before it is due never runs anywhere."""
    tm = make()
    tasks = register(tm)
    handler = tasks["when"].delay(0.2)
    assert handler.cancel() is True
    assert handler.cancel() is True  # idempotent
    assert handler.state is TaskState.CANCELLED
    with pytest.raises(concurrent.futures.CancelledError):
        handler.result(WAIT)
    assert tm.join(WAIT)
    assert tm.stats().cancelled == 1
    assert tm.stats().succeeded == 0


def test_cancel_a_task_running_in_another_manager(make: Make) -> None:
    """cancel() of a task running elsewhere cancels its context there: it ends CANCELLED
    once its attempt raises, and cancel() returns False."""
    web, worker = make(workers=0), make()
    register(web)
    started = threading.Event()

    @worker.task(name="stubborn")
    def stubborn(ctx: Context) -> None:
        started.set()
        ctx.wait(WAIT)
        ctx.check()

    web.task(name="stubborn")(lambda ctx: None)  # the web process knows the name too
    handler = web.queue(web._registry["stubborn"].bind())
    assert started.wait(WAIT)
    assert handler.cancel() is False
    with pytest.raises(concurrent.futures.CancelledError):
        handler.result(WAIT)
    assert handler.state is TaskState.CANCELLED


# -- delivery -------------------------------------------------------------------------------


def test_a_task_no_process_registered_waits_until_one_does(make: Make) -> None:
    """A task whose name no running manager registered waits (never dropped) and runs
    when a manager that registers it starts."""
    web, other = make(workers=0), make()
    register(other)

    @web.task(name="late")
    def late(ctx: Context) -> str:
        return "ran"

    handler = late.queue()
    with pytest.raises(TimeoutError):
        handler.result(0.3)
    assert handler.state is TaskState.PENDING
    knows = make(start=False)

    @knows.task(name="late")
    def late_too(ctx: Context) -> str:
        return "ran"

    knows.start()
    assert handler.result(WAIT) == "ran"


def test_stop_hands_claimed_tasks_back_at_once(make: Make) -> None:
    """A stopping manager gives back what it claimed and did not start: another one runs
    those tasks while the stopping one still waits for its running task, long before
    the lease would have expired."""
    first = make(workers=1, queue_size=8, lease=30.0)
    tasks = register(first)
    started = threading.Event()
    release = threading.Event()

    @first.task(name="block")
    def block(ctx: Context) -> str:
        started.set()
        release.wait(WAIT)
        return "released"

    blocked = block.queue()
    assert started.wait(WAIT)
    waiting = [tasks["add"].queue(i, 0) for i in range(5)]
    stopper = threading.Thread(target=first.stop, name="test-stopper")
    stopper.start()
    second = make(workers=2, lease=30.0)
    register(second)
    try:
        assert [h.result(WAIT) for h in waiting] == list(range(5))
        assert stopper.is_alive()  # still waiting for its running task
    finally:
        release.set()
        stopper.join(WAIT)
    assert blocked.result(WAIT) == "released"


def test_a_dead_process_claims_pass_on_when_its_lease_ends(
    make: Make, redis_url: str, redis_namespace: str
) -> None:
    """A process that died holding a claimed task (one that joined with a 1 s lease
    and vanished): a live manager whose own heartbeat comes every 20 s (lease 60 s)
    runs the task once that lease ends, not at its next heartbeat."""
    producer = make(workers=0, lease=60.0)
    handler = register(producer)["add"].queue(1, 2)
    client = redis.Redis.from_url(redis_url)
    store = Store(client, redis_namespace, result_ttl=60.0)
    try:
        assert store.heartbeat("dead:1:1", 1_000, None, True).held
        claimed = store.claim("dead:1:1", 10, ["add"])
        assert claimed is not None
        assert [task.id for task in claimed[1]] == [handler.id]
        register(make(workers=1, lease=60.0))
        assert handler.result(WAIT) == 3  # WAIT (10 s) is half the heartbeat interval
        assert handler.attempts == 1  # claimed, never started: no attempt was lost
    finally:
        client.close()


def test_join_waits_for_the_whole_cluster(make: Make) -> None:
    """join() returns once every task of the cluster settled, wherever it ran."""
    web = make(workers=0)
    tasks = register(web)
    workers = [make(workers=2) for _ in range(2)]
    for tm in workers:
        register(tm)
    handlers = [tasks["wait"].queue(0.01) for _ in range(20)]
    assert web.join(WAIT)
    assert all(h.done() for h in handlers)
    assert web.stats().running == 0


def test_stats_describe_the_cluster(make: Make) -> None:
    """stats() counts the cluster's tasks and live processes; at idle they add up."""
    a, b = make(workers=1), make(workers=0)
    register(a)
    tasks = register(b)
    for i in range(5):
        tasks["add"].queue(i, i)
    tasks["boom"].queue()
    tasks["when"].delay(30).cancel()
    assert b.join(WAIT)
    for tm in (a, b):
        stats = tm.stats()
        assert stats.processes == 2
        assert (stats.submitted, stats.succeeded, stats.failed, stats.cancelled) == (7, 5, 1, 1)
        assert stats.submitted == stats.succeeded + stats.failed + stats.cancelled
    assert a.stats().workers == 1
    assert b.stats().workers == 0


def test_listeners_hear_what_happens_in_their_own_process(make: Make) -> None:
    """SUBMITTED where a task was submitted; STARTED, RETRYING, SUCCEEDED where it ran."""
    web, worker = make(workers=0), make()
    register(web)
    register(worker)
    heard: dict[str, list[TaskEventKind]] = {"web": [], "worker": []}
    done = threading.Event()

    def listener(where: str) -> Callable[[TaskEvent], None]:
        def listen(event: TaskEvent) -> None:
            heard[where].append(event.kind)
            if event.kind is TaskEventKind.SUCCEEDED:
                done.set()

        return listen

    web.add_listener(listener("web"))
    worker.add_listener(listener("worker"))
    handler = web._registry["flaky"].queue(1)
    assert handler.result(WAIT) == 2
    assert done.wait(WAIT)
    worker.stop()
    web.stop()
    assert heard["web"] == [TaskEventKind.SUBMITTED]
    assert heard["worker"] == [
        TaskEventKind.STARTED,
        TaskEventKind.RETRYING,
        TaskEventKind.STARTED,
        TaskEventKind.SUCCEEDED,
    ]


def test_waiting_wakes_on_a_message_and_futures_and_await_work(make: Make) -> None:
    """result() wakes when the task settles elsewhere; as_future() and await work on
    Redis handlers; a done callback runs once with the finished handler."""
    import asyncio

    web, worker = make(workers=0), make()
    register(web)
    register(worker)
    handler: TaskHandler[Any] = web._registry["wait"].queue(0.05)
    seen: list[Any] = []
    called = threading.Event()

    def callback(h: TaskHandler[Any]) -> None:
        seen.append(h.result(0))
        called.set()

    handler.add_done_callback(callback)
    future = handler.as_future()
    assert concurrent.futures.wait([future], timeout=WAIT).done == {future}

    async def main() -> Any:
        return await asyncio.wait_for(web._registry["add"].queue(4, 4), WAIT)

    assert asyncio.run(main()) == 8
    assert future.result(0) == "waited"
    assert called.wait(WAIT)
    assert seen == ["waited"]


def test_corrupt_payloads_go_to_the_dead_letters_and_stop_nothing(
    make: Make, redis_url: str, redis_namespace: str
) -> None:
    """A queued task whose payload is not JSON, and an id Redis does not know, become
    dead letters; the worker runs the tasks around them."""
    tm = make()
    tasks = register(tm)
    client = redis.Redis.from_url(redis_url)
    prefix = "{" + redis_namespace + "}:"
    before = tasks["add"].queue(1, 1)
    assert before.result(WAIT) == 2
    client.hset(f"{prefix}t:999999", mapping={"n": "add", "a": "[[1,", "s": "q", "T": 1})
    client.lpush(f"{prefix}q:add", 999999, 888888)
    client.publish(f"{prefix}wake", "r add")
    after = tasks["add"].queue(2, 2)
    assert after.result(WAIT) == 4
    from marionette.backends.redis.inspect import Inspector

    inspector = Inspector(client, redis_namespace)
    reasons = sorted(letter["reason"] for letter in inspector.dead_letters())
    assert len(reasons) == 2
    assert reasons[0].startswith("its payload cannot be read")
    assert reasons[1] == "unknown task id"
    dead = tm.handler(999999)
    assert dead is not None
    assert dead.state is TaskState.FAILED
    client.close()


def test_idle_cluster_traffic_is_the_heartbeats_only(make: Make, redis_url: str) -> None:
    """An idle manager (lease 3 s) sends Redis one heartbeat script per second and
    nothing else: no polling. (Commands a script runs count in commandstats too: the
    heartbeat's are TIME, ZSCORE, ZADD, SET, ZRANGEBYSCORE and ZRANGE.)"""
    make(workers=4, lease=3.0)
    client = redis.Redis.from_url(redis_url)

    def calls() -> dict[str, int]:
        return {k: int(v["calls"]) for k, v in client.info("commandstats").items()}

    time.sleep(0.5)  # the measurement window opens once the start's own calls are done
    before = calls()
    time.sleep(3.0)  # the measurement window itself, not a synchronization
    after = calls()
    client.close()
    spent = {k: n - before.get(k, 0) for k, n in after.items() if n != before.get(k, 0)}
    heartbeat = {"time", "zscore", "zadd", "set", "zrangebyscore", "zrange"}
    setup = {"hello", "client|setinfo"}  # the heartbeat thread's connection, made once
    allowed = {f"cmdstat_{c}" for c in (*heartbeat, *setup, "evalsha", "info")}
    assert set(spent) <= allowed, spent
    assert 2 <= spent["cmdstat_evalsha"] <= 4, spent


def test_a_redis_backend_without_redis_py_raises_config_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without redis-py, a manager made for Redis raises ConfigError naming `backend`
    and the extra to install."""
    import sys

    monkeypatch.setitem(sys.modules, "redis", None)  # `import redis` now fails
    with pytest.raises(ConfigError) as caught:
        TaskManager(backend="redis://localhost:6379/0")
    assert caught.value.field == "backend"
    assert "marionette[redis]" in str(caught.value)
