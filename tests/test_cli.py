"""The command line: ``python -m marionette inspect``, ``dead list|requeue|purge`` and
``worker``.

`inspect` and `dead` run in this process (``marionette.__main__.main([...])``, output
captured); `worker` runs as a subprocess (it waits for SIGTERM), with the tasks of
tests/redis_tasks.py. The clusters inspected are managers of this process, each test
in a namespace of its own.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import WAIT

from marionette import Context, TaskError, TaskManager, TaskState
from marionette.__main__ import main
from marionette.backends.redis.codec import encode_call

TESTS = Path(__file__).parent
ROOT = TESTS.parent

Make = Callable[..., TaskManager]
Cli = Callable[..., tuple[int, str, str]]


@pytest.fixture
def make(redis_url: str, redis_namespace: str) -> Iterator[Make]:
    """Make started managers of the test's cluster (a 2 s lease); all are stopped
    after the test."""
    made: list[TaskManager] = []

    def factory(workers: int, tasks: Callable[[TaskManager], object] | None = None) -> TaskManager:
        manager = TaskManager(
            backend=redis_url, namespace=redis_namespace, lease=2.0, workers=workers
        )
        made.append(manager)
        if tasks is not None:
            tasks(manager)
        manager.start()
        return manager

    yield factory
    for manager in made:
        manager.stop(timeout=WAIT)


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Cli:
    """Run ``python -m marionette ARGS`` in this process: (exit status, stdout, stderr)."""

    def run(*args: str) -> tuple[int, str, str]:
        status = main(list(args))
        out, err = capsys.readouterr()
        return status, out, err

    return run


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_url)
    yield c
    c.close()


def free_port() -> int:
    """A port nobody listens on (it was free a moment ago)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def section(out: str, title: str) -> list[list[str]]:
    """The rows of the table under the line starting with `title` in `inspect`'s
    human output (its header skipped), each split into cells."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title))
    rows = []
    for line in lines[start + 2 :]:
        if not line.strip():
            break
        rows.append(line.split())
    return rows


class Cluster:
    """A small cluster in a known state: a submit-only manager and a worker manager;
    `orphan` tasks (registered by no worker) queued and scheduled, a `hold` task
    running, a `fail` task failed."""

    def __init__(self, make: Make) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.worker = make(2, self._worker_tasks)
        self.web = make(0, self._web_tasks)
        registry = self.web._registry
        self.queued = [registry["orphan"].queue(i) for i in range(2)]
        self.scheduled = registry["orphan"].delay(60, 9)
        self.running = registry["hold"].queue()
        self.failed = registry["fail"].queue()
        assert self.started.wait(WAIT)
        with pytest.raises(TaskError):
            self.failed.result(WAIT)

    def _worker_tasks(self, tm: TaskManager) -> None:
        @tm.task(name="hold")
        def hold(ctx: Context) -> str:
            self.started.set()
            self.release.wait(WAIT)
            return "released"

        @tm.task(name="fail")
        def fail(ctx: Context) -> None:
            raise ValueError("no")

    def _web_tasks(self, tm: TaskManager) -> None:
        self._worker_tasks(tm)

        @tm.task(name="orphan")
        def orphan(ctx: Context, n: int) -> int:
            return n

    def close(self) -> None:
        self.release.set()
        assert self.running.result(WAIT) == "released"


@pytest.fixture
def cluster(make: Make) -> Iterator[Cluster]:
    c = Cluster(make)
    try:
        yield c
    finally:
        c.close()


# -- inspect -------------------------------------------------------------------------------


def test_inspect_shows_processes_counts_and_next_due_tasks(
    cli: Cli, cluster: Cluster, redis_url: str, redis_namespace: str
) -> None:
    """`inspect` prints the live processes (host, pid, workers), the counts per task
    name (queued, scheduled, running, failed) and the next due tasks."""
    status, out, err = cli("inspect", "--backend", redis_url, "--namespace", redis_namespace)
    assert (status, err) == (0, "")
    assert out.startswith(f"namespace {redis_namespace} at ")
    assert "processes (2 live)" in out
    processes = section(out, "processes")
    host, pid = socket.gethostname(), str(os.getpid())
    assert sorted(row[:3] for row in processes) == [[host, pid, "0"], [host, pid, "2"]]
    assert all(row[-1] == "marionette" and row[-2].endswith("s") for row in processes)
    tasks = {row[0]: row[1:] for row in section(out, "tasks")}
    assert tasks == {
        "fail": ["0", "0", "0", "1"],
        "hold": ["0", "0", "1", "0"],
        "orphan": ["2", "1", "0", "0"],
    }
    [due] = section(out, "next due")
    assert due[:2] == [str(cluster.scheduled.id), "orphan"]
    assert datetime.fromisoformat(due[2]).timestamp() > datetime.now().timestamp() + 50
    assert "counters: submitted=5, succeeded=0, failed=1" in out
    assert "dead letters: 0" in out


def test_inspect_json_is_parseable_with_the_same_facts(
    cli: Cli, cluster: Cluster, redis_url: str, redis_namespace: str
) -> None:
    """`inspect --json` prints JSON with the processes, per-name counts, next due
    tasks, counters and dead letters."""
    status, out, _ = cli(
        "inspect", "--backend", redis_url, "--namespace", redis_namespace, "--json"
    )
    assert status == 0
    snapshot = json.loads(out)
    assert {"processes", "tasks", "next_due", "counters", "dead_letters"} <= snapshot.keys()
    assert snapshot["namespace"] == redis_namespace
    processes = snapshot["processes"]
    assert sorted(p["workers"] for p in processes) == [0, 2]
    assert all(p["pid"] == os.getpid() and p["alive"] for p in processes)
    assert all(0 < p["lease_left"] <= 2.0 for p in processes)
    worker = next(p for p in processes if p["workers"] == 2)
    assert worker["claimed"] == 1  # its running task (`busy` is as of its last heartbeat)
    assert worker["names"] == ["fail", "hold"]
    assert snapshot["tasks"] == {
        "fail": {"queued": 0, "scheduled": 0, "running": 0, "failed": 1},
        "hold": {"queued": 0, "scheduled": 0, "running": 1, "failed": 0},
        "orphan": {"queued": 2, "scheduled": 1, "running": 0, "failed": 0},
    }
    [due] = snapshot["next_due"]
    assert (due["id"], due["name"]) == (cluster.scheduled.id, "orphan")
    assert snapshot["counters"]["submitted"] == 5
    assert snapshot["dead_letters"] == []


def test_inspect_reads_the_backend_and_namespace_from_the_environment(
    cli: Cli,
    cluster: Cluster,
    redis_url: str,
    redis_namespace: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without --backend and --namespace, `inspect` uses MARIONETTE_BACKEND and
    MARIONETTE_NAMESPACE; the flags win over them."""
    monkeypatch.setenv("MARIONETTE_BACKEND", redis_url)
    monkeypatch.setenv("MARIONETTE_NAMESPACE", redis_namespace)
    status, out, _ = cli("inspect", "--json")
    assert status == 0
    snapshot = json.loads(out)
    assert snapshot["namespace"] == redis_namespace
    assert len(snapshot["processes"]) == 2
    monkeypatch.setenv("MARIONETTE_BACKEND", f"redis://127.0.0.1:{free_port()}/0")
    status, out, _ = cli("inspect", "--json", "--backend", redis_url, "--namespace", "other")
    assert status == 0
    assert json.loads(out)["processes"] == []


def test_inspect_fails_clearly_when_redis_is_unreachable(cli: Cli) -> None:
    """A Redis nobody listens on: exit status 1 and a message naming the URL, its
    password masked."""
    url = f"redis://:secret@127.0.0.1:{free_port()}/0"
    for args in (["inspect"], ["dead", "list"]):
        status, out, err = cli(*args, "--backend", url)
        assert (status, out) == (1, "")
        assert err.startswith("python -m marionette: cannot reach Redis at redis://:***@127.0.0.1")
        assert "secret" not in err


def test_inspect_without_a_backend_says_so(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    """No --backend and no MARIONETTE_BACKEND: exit status 1 and a message saying how
    to give one."""
    monkeypatch.delenv("MARIONETTE_BACKEND", raising=False)
    for args in (["inspect"], ["dead", "purge"]):
        status, out, err = cli(*args)
        assert (status, out) == (1, "")
        assert "no Redis given: pass --backend URL or set MARIONETTE_BACKEND" in err


def test_inspect_does_not_count_a_cancelled_task_as_queued(
    cli: Cli, make: Make, redis_url: str, redis_namespace: str
) -> None:
    """A task cancelled while queued (no process serves its name) is not counted as
    queued by `inspect`, as the cluster's stats do not count it."""
    web = make(0, add_task())
    handler = web._registry["add"].queue(1, 2)
    assert handler.cancel() is True
    assert web.stats().queued == 0
    status, out, _ = cli(
        "inspect", "--json", "--backend", redis_url, "--namespace", redis_namespace
    )
    assert status == 0
    assert json.loads(out)["tasks"]["add"]["queued"] == 0


def test_inspect_counts_claimed_tasks_not_started_as_queued(
    cli: Cli, make: Make, redis_url: str, redis_namespace: str
) -> None:
    """Tasks a busy process claimed and has not started still wait: `inspect` counts
    them queued under their name, as the cluster's stats count them."""
    started, release = threading.Event(), threading.Event()

    def tasks(tm: TaskManager) -> None:
        @tm.task(name="hold")
        def hold(ctx: Context) -> None:
            started.set()
            release.wait(WAIT)

    web = make(0, tasks)
    handlers = [web._registry["hold"].queue() for _ in range(3)]
    try:
        make(1, tasks)  # its first claim takes all three; it runs one
        assert started.wait(WAIT)
        assert web.stats().queued == 2
        where = ("--backend", redis_url, "--namespace", redis_namespace)
        status, out, _ = cli("inspect", "--json", *where)
        assert status == 0
        counts = json.loads(out)["tasks"]["hold"]
        assert (counts["running"], counts["queued"]) == (1, 2)
    finally:
        release.set()
        for handler in handlers:
            handler.result(WAIT)


# -- dead letters --------------------------------------------------------------------------


def add_task(calls: list[tuple[int, int]] | None = None) -> Callable[[TaskManager], None]:
    """Registers `add` on a manager (recording its calls in `calls`)."""

    def tasks(tm: TaskManager) -> None:
        @tm.task(name="add")
        def add(ctx: Context, a: int, b: int) -> int:
            if calls is not None:
                calls.append((a, b))
            return a + b

    return tasks


def make_dead_letter(make: Make, client: redis.Redis, namespace: str) -> tuple[int, list[Any]]:
    """A queued `add` task whose payload is then corrupted, claimed by a worker: a dead
    letter. Returns its id and the worker's record of `add` calls."""
    web = make(0, add_task())
    handler = web._registry["add"].queue(2, 3)
    client.hset(f"{{{namespace}}}:t:{handler.id}", "a", "[[2,")
    calls: list[Any] = []
    make(1, add_task(calls))
    with pytest.raises(TaskError) as caught:
        handler.result(WAIT)  # it ended dead
    assert "payload cannot be read" in str(caught.value)
    return handler.id, calls


def test_dead_list_shows_a_corrupt_payload(
    cli: Cli, make: Make, client: redis.Redis, redis_url: str, redis_namespace: str
) -> None:
    """`dead list` shows the dead letter of a task whose payload could not be read:
    its id, name, time and reason; --json too; `inspect` counts it."""
    task_id, calls = make_dead_letter(make, client, redis_namespace)
    where = ("--backend", redis_url, "--namespace", redis_namespace)
    status, out, _ = cli("dead", "list", *where)
    assert status == 0
    lines = out.splitlines()
    assert lines[0] == "1 dead letters"
    assert lines[1].startswith(f"  #{task_id} add at ")
    assert "its payload cannot be read: not JSON" in lines[1]
    status, out, _ = cli("dead", "list", "--json", *where)
    [letter] = json.loads(out)["dead_letters"]
    assert (letter["id"], letter["name"]) == (task_id, "add")
    datetime.fromisoformat(letter["at"])
    status, out, _ = cli("inspect", *where)
    assert "dead letters: 1" in out
    assert f"#{task_id} add: its payload cannot be read" in out
    assert calls == []


def test_dead_requeue_of_a_still_corrupt_payload_makes_it_dead_again(
    cli: Cli, make: Make, client: redis.Redis, redis_url: str, redis_namespace: str
) -> None:
    """`dead requeue` puts the task back in its queue; still corrupt, it is a dead
    letter again and never runs."""
    task_id, calls = make_dead_letter(make, client, redis_namespace)
    where = ("--backend", redis_url, "--namespace", redis_namespace)
    assert cli("dead", "requeue", *where)[:2] == (0, "requeued 1, gone 0\n")
    reader = make(0)  # a manager holding no handler of it yet
    handler = reader.handler(task_id)
    assert handler is not None
    with pytest.raises(TaskError):
        handler.result(WAIT)
    assert cli("dead", "list", *where)[1].splitlines()[0] == "1 dead letters"
    assert calls == []


def test_dead_requeue_after_fixing_the_payload_runs_the_task(
    cli: Cli, make: Make, client: redis.Redis, redis_url: str, redis_namespace: str
) -> None:
    """A dead letter whose payload was repaired in Redis runs once `dead requeue` puts
    it back, and succeeds; the dead letters are then empty."""
    task_id, calls = make_dead_letter(make, client, redis_namespace)
    client.hset(f"{{{redis_namespace}}}:t:{task_id}", "a", encode_call("add", (2, 3), {}))
    where = ("--backend", redis_url, "--namespace", redis_namespace)
    assert cli("dead", "requeue", *where)[:2] == (0, "requeued 1, gone 0\n")
    reader = make(0)  # a manager holding no handler of it yet
    handler = reader.handler(task_id)
    assert handler is not None
    assert handler.result(WAIT) == 5
    assert calls == [(2, 3)]
    assert cli("dead", "list", *where)[1] == "0 dead letters\n"
    assert cli("dead", "requeue", *where)[1] == "requeued 0, gone 0\n"


def test_a_handler_held_across_a_requeue_sees_the_task_run_again(
    cli: Cli, make: Make, client: redis.Redis, redis_url: str, redis_namespace: str
) -> None:
    """After `dead requeue` of a repaired task, tm.handler(id) in a process that held a
    handler of the dead task says it is pending again, and gives its new result."""
    web = make(0, add_task())
    held = web._registry["add"].queue(2, 3)
    client.hset(f"{{{redis_namespace}}}:t:{held.id}", "a", "[[2,")
    worker = make(1, add_task())
    with pytest.raises(TaskError):
        held.result(WAIT)
    worker.stop()  # nothing runs the task until the test says so
    client.hset(f"{{{redis_namespace}}}:t:{held.id}", "a", encode_call("add", (2, 3), {}))
    where = ("--backend", redis_url, "--namespace", redis_namespace)
    assert cli("dead", "requeue", *where)[:2] == (0, "requeued 1, gone 0\n")
    again = web.handler(held.id)
    assert again is not None
    assert again.state is TaskState.PENDING
    make(1, add_task())
    assert again.result(WAIT) == 5


def test_dead_purge_empties_the_dead_letters(
    cli: Cli, make: Make, client: redis.Redis, redis_url: str, redis_namespace: str
) -> None:
    """`dead purge` drops every dead letter (their tasks then expire); the list is
    empty and a requeue finds nothing."""
    task_id, _ = make_dead_letter(make, client, redis_namespace)
    where = ("--backend", redis_url, "--namespace", redis_namespace)
    assert cli("dead", "purge", *where)[:2] == (0, "purged 1\n")
    assert cli("dead", "list", *where)[1] == "0 dead letters\n"
    assert cli("dead", "requeue", *where)[1] == "requeued 0, gone 0\n"
    assert cli("dead", "purge", *where)[1] == "purged 0\n"
    assert client.pttl(f"{{{redis_namespace}}}:t:{task_id}") > 0


# -- worker --------------------------------------------------------------------------------


def worker_env(redis_url: str, redis_namespace: str) -> dict[str, str]:
    """The environment of a worker running tests/redis_tasks.py (see there)."""
    env = {
        **os.environ,
        "MARIONETTE_BACKEND": redis_url,
        "MARIONETTE_NAMESPACE": redis_namespace,
        "MARIONETTE_LEASE": "2",
        "MARIONETTE_TEST_REDIS": redis_url,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)]),
    }
    env.pop("MARIONETTE_WORKERS", None)
    return env


def test_worker_with_a_bad_target_exits_1_with_a_message(
    cli: Cli, redis_url: str, redis_namespace: str
) -> None:
    """`worker` with a module that does not exist exits 1 saying it cannot load it (a
    real process); so do a target without ':', a missing attribute, and an attribute
    that is not a TaskManager (in process)."""
    done = subprocess.run(
        [sys.executable, "-m", "marionette", "worker", "no_such_module_xyz:tm"],
        cwd=TESTS,
        env=worker_env(redis_url, redis_namespace),
        capture_output=True,
        text=True,
        timeout=6 * WAIT,
    )
    assert done.returncode == 1
    assert "python -m marionette: cannot load no_such_module_xyz:tm" in done.stderr
    assert "No module named 'no_such_module_xyz'" in done.stderr
    for target, reason in (
        ("json", "is not MODULE:ATTR"),
        ("json:no_such_attr", "no_such_attr"),
        ("json:dumps", "not a TaskManager"),
    ):
        status, out, err = cli("worker", target)
        assert (status, out) == (1, "")
        assert err.startswith(f"python -m marionette: cannot load {target}: ")
        assert reason in err


class WorkerProcess:
    """``python -m marionette worker redis_tasks:tm ARGS``; `lines` is its stderr."""

    def __init__(self, env: dict[str, str], *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "marionette", "worker", "redis_tasks:tm", *args],
            cwd=TESTS,
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self.changed = threading.Condition()
        self.reader = threading.Thread(target=self._read, name="test-worker-stderr")
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            with self.changed:
                self.lines.append(line.rstrip("\n"))
                self.changed.notify_all()
        with self.changed:
            self.changed.notify_all()

    def wait_for(self, text: str) -> str:
        """The first line containing `text` (waiting, bounded, while the process runs)."""
        with self.changed:
            self.changed.wait_for(
                lambda: any(text in line for line in self.lines) or self.process.poll() is not None,
                6 * WAIT,
            )
            found = [line for line in self.lines if text in line]
        assert found, self.lines
        return found[0]

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(WAIT)
        self.reader.join(WAIT)


@pytest.fixture
def spawn() -> Iterator[Callable[..., WorkerProcess]]:
    """Start worker processes; every one is killed (if still running) and reaped."""
    started: list[WorkerProcess] = []

    def start(env: dict[str, str], *args: str) -> WorkerProcess:
        worker = WorkerProcess(env, *args)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.close()


def test_worker_applies_its_workers_option(
    cli: Cli, spawn: Callable[..., WorkerProcess], redis_url: str, redis_namespace: str
) -> None:
    """`worker --workers 3` runs the manager with 3 workers (the cluster's process list
    says so, where the default would be 4); SIGTERM stops it with exit status 0, and it
    leaves the cluster."""
    worker = spawn(worker_env(redis_url, redis_namespace), "--workers", "3", "--grace", "5")
    assert "workers=3" in worker.wait_for("task manager started")
    where = ("--backend", redis_url, "--namespace", redis_namespace)
    status, out, _ = cli("inspect", "--json", *where)
    assert status == 0
    [process] = json.loads(out)["processes"]
    assert (process["pid"], process["workers"]) == (worker.process.pid, 3)
    assert "pid" in process["names"]
    worker.process.send_signal(signal.SIGTERM)
    assert worker.process.wait(6 * WAIT) == 0
    status, out, _ = cli("inspect", "--json", *where)
    assert json.loads(out)["processes"] == []
