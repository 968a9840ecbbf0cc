"""The Redis backend across real processes: SIGKILL, partitions, a restarted server.

Workers are subprocesses running ``python -m marionette worker redis_tasks:tm`` (see
tests/redis_tasks.py); the test process submits and reads through a manager of its
own. kill -9 is a real SIGKILL; a partition is a TCP proxy that stops passing bytes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from conftest import WAIT
from proxy import TcpProxy
from redis_server import RedisServer

from marionette import (
    BackendUnavailable,
    Context,
    TaskError,
    TaskManager,
    TaskState,
    WorkerLost,
)

TESTS = Path(__file__).parent
ROOT = TESTS.parent


class Worker:
    """A worker subprocess; `started` is set once its manager started."""

    def __init__(
        self, backend: str, direct: str, namespace: str, lease: float, workers: int, limits: str
    ):
        env = {
            **os.environ,
            "MARIONETTE_BACKEND": backend,
            "MARIONETTE_NAMESPACE": namespace,
            "MARIONETTE_LEASE": str(lease),
            "MARIONETTE_LIMITS": limits,
            "MARIONETTE_TEST_REDIS": direct,
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)]),
        }
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "marionette",
                "worker",
                "redis_tasks:tm",
                "--workers",
                str(workers),
                "--grace",
                "5",
            ],
            cwd=TESTS,
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self.changed = threading.Condition()
        self.reader = threading.Thread(target=self._read, name=f"test-worker-{self.pid}")
        self.reader.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            with self.changed:
                self.lines.append(line.rstrip("\n"))
                self.changed.notify_all()
        with self.changed:
            self.changed.notify_all()

    def wait_for(self, text: str) -> None:
        """Wait (bounded) until the worker printed a line containing `text`."""
        with self.changed:
            ok = self.changed.wait_for(
                lambda: any(text in line for line in self.lines) or self.process.poll() is not None,
                WAIT,
            )
        assert ok, self.lines
        assert any(text in line for line in self.lines), self.lines

    def kill(self) -> None:
        """SIGKILL, and reap."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(WAIT)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(WAIT)
        self.reader.join(WAIT)


@pytest.fixture
def workers() -> Iterator[Callable[..., Worker]]:
    """Start worker subprocesses (waiting until each has started); all are killed and
    reaped after the test."""
    started: list[Worker] = []

    def spawn(
        backend: str, direct: str, namespace: str, lease: float, workers: int = 2, limits: str = ""
    ) -> Worker:
        worker = Worker(backend, direct, namespace, lease, workers, limits)
        started.append(worker)
        worker.wait_for("task manager started")
        return worker

    yield spawn
    for worker in started:
        worker.close()


def local(
    url: str, namespace: str, lease: float, workers: int = 0, limits: dict[str, int] | None = None
) -> TaskManager:
    """A manager in this process with the same task names as the workers (never run
    here unless `workers`)."""
    tm = TaskManager(
        backend=url, namespace=namespace, lease=lease, workers=workers, limits=limits or {}
    )

    @tm.task(name="hold")
    def hold(ctx: Context, key: str) -> int:
        raise AssertionError("runs in the workers only")

    @tm.task(name="suicide")
    def suicide(ctx: Context, key: str) -> None:
        raise AssertionError("runs in the workers only")

    @tm.task(name="stamp")
    def stamp(ctx: Context, key: str) -> float:
        raise AssertionError("runs in the workers only")

    @tm.task(name="pid")
    def pid(ctx: Context) -> int:
        return os.getpid()

    @tm.task(name="span")
    def span(ctx: Context, key: str, seconds: float) -> int:
        raise AssertionError("runs in the workers only")

    tm.start()
    return tm


def spans(client: redis.Redis, key: str) -> list[tuple[int, float, float]]:
    """The (task id, start, end) the `span` task recorded under `key`."""
    out = []
    for raw in client.lrange(key, 0, -1):
        task_id, start, end = raw.decode().split()
        out.append((int(task_id), float(start), float(end)))
    return out


def peak(intervals: list[tuple[int, float, float]]) -> int:
    """The most intervals open at once."""
    edges = sorted([(s, 1) for _, s, _ in intervals] + [(e, -1) for _, _, e in intervals])
    most = open_ = 0
    for _, step in edges:
        open_ += step
        most = max(most, open_)
    return most


def started_pid(client: redis.Redis, key: str) -> int:
    """Wait (bounded) for the next attempt of `hold`/`suicide` on `key` to start."""
    got = client.blpop([f"{key}:started"], timeout=WAIT)
    assert got is not None, "no attempt started"
    return int(got[1])


@pytest.fixture
def client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_server.url)
    yield c
    c.close()


def test_sigkill_mid_task_reruns_it_elsewhere_within_the_lease(
    workers: Callable[..., Worker], redis_url: str, redis_namespace: str, client: redis.Redis
) -> None:
    """A worker killed with SIGKILL in the middle of a task: another process runs it
    again within lease + 2 s; the lost attempt is a WorkerLost in `errors`, counts in
    `attempts`, and uses no retry (the task has none and still succeeds)."""
    lease = 2.0
    tm = local(redis_url, redis_namespace, lease)
    try:
        first = workers(redis_url, redis_url, redis_namespace, lease, workers=1)
        handler = tm._registry["hold"].queue("k1")
        assert started_pid(client, "k1") == first.pid
        first.kill()
        killed = time.monotonic()
        second = workers(redis_url, redis_url, redis_namespace, lease, workers=1)
        assert started_pid(client, "k1") == second.pid
        assert time.monotonic() - killed <= lease + 2.0
        client.rpush(f"k1:release:{second.pid}", 1)
        assert handler.result(WAIT) == second.pid
        assert handler.attempts == 2
        [lost] = handler.errors
        assert isinstance(lost, WorkerLost)
    finally:
        tm.stop()


def test_a_task_that_kills_its_process_fails_after_three_lost_attempts(
    workers: Callable[..., Worker], redis_url: str, redis_namespace: str, client: redis.Redis
) -> None:
    """A task whose every attempt kills its process fails for good after three lost
    attempts in a row, with three WorkerLost errors."""
    lease = 1.0
    tm = local(redis_url, redis_namespace, lease)
    try:
        handler = tm._registry["suicide"].options(retries=5).queue("k2")
        for _ in range(3):
            worker = workers(redis_url, redis_url, redis_namespace, lease, workers=1)
            assert started_pid(client, "k2") == worker.pid
            worker.process.wait(WAIT)
            assert worker.process.returncode == -signal.SIGKILL
        with pytest.raises(TaskError) as caught:
            handler.result(WAIT)
        assert [type(e) for e in caught.value.exceptions] == [WorkerLost] * 3
        assert handler.attempts == 3
        assert handler.state is TaskState.FAILED
    finally:
        tm.stop()


def test_a_partitioned_process_cannot_overwrite_the_rerun(
    workers: Callable[..., Worker],
    redis_url: str,
    redis_namespace: str,
    client: redis.Redis,
    redis_server: RedisServer,
) -> None:
    """A worker cut off from Redis past its lease: its task runs again elsewhere, and
    when the cut heals, its late outcome is discarded, never settled over the rerun's;
    the cut worker joins the cluster again and keeps working."""
    lease = 1.5
    tm = local(redis_url, redis_namespace, lease)
    proxy = TcpProxy(redis_server.port)
    try:
        cut_off = workers(proxy.url_for(redis_url), redis_url, redis_namespace, lease, workers=1)
        handler = tm._registry["hold"].queue("k3")
        assert started_pid(client, "k3") == cut_off.pid
        proxy.cut()
        other = workers(redis_url, redis_url, redis_namespace, lease, workers=1)
        assert started_pid(client, "k3") == other.pid  # after the lease: a rerun
        client.rpush(f"k3:release:{other.pid}", 1)
        assert handler.result(WAIT) == other.pid
        proxy.heal()
        client.rpush(f"k3:release:{cut_off.pid}", 1)  # the cut-off attempt ends now
        cut_off.wait_for("discarded")
        assert handler.result(0) == other.pid
        assert tm.handler(handler.id).result(WAIT) == other.pid  # type: ignore[union-attr]
        other.kill()  # the cut-off worker, back, now runs whatever comes
        assert tm._registry["pid"].queue().result(WAIT) == cut_off.pid
    finally:
        tm.stop()
        proxy.close()


def test_submissions_survive_a_redis_restart_with_aof(
    workers: Callable[..., Worker], fresh_redis: RedisServer, redis_namespace: str
) -> None:
    """Redis killed (SIGKILL) and restarted with appendfsync always: every acknowledged
    submission runs; a submission during the outage raises BackendUnavailable after
    the lease; the workers and the submitting manager carry on."""
    lease = 1.0
    url = fresh_redis.url
    tm = local(url, redis_namespace, lease)
    direct = redis.Redis.from_url(url)
    try:
        workers(url, url, redis_namespace, lease, workers=2)
        stamp = tm._registry["stamp"]
        handlers = [stamp.queue("k4") for _ in range(20)]
        handlers += [stamp.delay(1.5, "k4") for _ in range(20)]
        fresh_redis.kill()
        with pytest.raises(BackendUnavailable):
            stamp.queue("k4")
        fresh_redis.restart()
        results = [h.result(WAIT * 2) for h in handlers]
        assert len(results) == 40
        assert len(set(results)) >= 1
        assert tm.join(WAIT)
        stats = tm.stats()
        assert stats.succeeded == 40
        assert stats.submitted == 40
    finally:
        tm.stop()
        direct.close()


def test_a_delayed_task_runs_once_with_three_worker_processes(
    workers: Callable[..., Worker], redis_url: str, redis_namespace: str, client: redis.Redis
) -> None:
    """Three worker processes, all their schedulers awake: each of 60 delayed tasks runs
    exactly once, never before it is due."""
    lease = 2.0
    tm = local(redis_url, redis_namespace, lease)
    try:
        for _ in range(3):
            workers(redis_url, redis_url, redis_namespace, lease, workers=2)
        stamp = tm._registry["stamp"]
        earliest, handlers = [], []
        for i in range(60):
            delay = 0.02 * (i % 30)
            earliest.append(time.time() + delay)
            handlers.append(stamp.delay(delay, "k5"))
        ran = [h.result(WAIT) for h in handlers]
        assert all(at >= due for at, due in zip(ran, earliest, strict=True))
        assert tm.join(WAIT)
        assert client.llen("k5") == 60
    finally:
        tm.stop()


def test_the_worker_command_stops_on_sigterm_and_exits_zero(
    workers: Callable[..., Worker], redis_url: str, redis_namespace: str, client: redis.Redis
) -> None:
    """SIGTERM stops a worker gracefully: exit status 0, its idle claims handed back."""
    lease = 5.0
    tm = local(redis_url, redis_namespace, lease)
    try:
        worker = workers(redis_url, redis_url, redis_namespace, lease, workers=2)
        assert tm._registry["pid"].queue().result(WAIT) == worker.pid
        worker.process.send_signal(signal.SIGTERM)
        assert worker.process.wait(WAIT) == 0
        assert tm.stats().processes == 1  # it left the cluster: only this manager
    finally:
        tm.stop()


def test_a_group_limit_holds_across_worker_processes(
    workers: Callable[..., Worker], redis_url: str, redis_namespace: str, client: redis.Redis
) -> None:
    """Three worker processes of 4 workers, a group limit of 3: never more than 3 of the
    group run at once anywhere (recorded intervals), and ungrouped tasks keep flowing."""
    lease = 2.0
    tm = local(redis_url, redis_namespace, lease, limits={"http": 3})
    try:
        for _ in range(3):
            workers(redis_url, redis_url, redis_namespace, lease, workers=4, limits="http=3")
        span = tm._registry["span"]
        grouped = [span.options(group="http").queue("g6", 0.05) for _ in range(18)]
        free = [span.queue("f6", 0.0) for _ in range(6)]
        for handler in free:
            handler.result(WAIT)
        assert any(not h.done() for h in grouped)  # the free ones did not wait for the group
        for handler in grouped:
            handler.result(WAIT)
        assert peak(spans(client, "g6")) == 3
        assert len(spans(client, "g6")) == 18
    finally:
        tm.stop()


def test_the_group_slots_of_a_killed_process_come_back_after_its_lease(
    workers: Callable[..., Worker], redis_url: str, redis_namespace: str, client: redis.Redis
) -> None:
    """A process killed while it holds every slot of a group: after its lease the slots
    are free, its tasks run again elsewhere, and the group drains."""
    lease = 1.0
    tm = local(redis_url, redis_namespace, lease, limits={"http": 2})
    try:
        doomed = workers(redis_url, redis_url, redis_namespace, lease, workers=2, limits="http=2")
        hold = tm._registry["hold"].options(group="http")
        handlers = [hold.queue(f"k7{i}") for i in range(2)]
        assert {started_pid(client, f"k7{i}") for i in range(2)} == {doomed.pid}
        assert tm.stats().groups["http"].running == 2
        doomed.kill()
        other = workers(redis_url, redis_url, redis_namespace, lease, workers=2, limits="http=2")
        for i in range(2):
            assert started_pid(client, f"k7{i}") == other.pid
            client.rpush(f"k7{i}:release:{other.pid}", 1)
        assert [h.result(WAIT) for h in handlers] == [other.pid] * 2
        assert tm.join(WAIT)
        assert tm.stats().groups["http"].running == 0
    finally:
        tm.stop()


def test_a_periodic_runs_each_occurrence_once_while_processes_die_and_come_back(
    workers: Callable[..., Worker], redis_url: str, redis_namespace: str, client: redis.Redis
) -> None:
    """A 200 ms periodic over three worker processes, one killed (SIGKILL) and another
    started midway: runs never overlap, and each occurrence is one run or merged into
    the run waiting to start (about window / interval in all); each run is recorded
    once."""
    lease = 1.0
    tm = local(redis_url, redis_namespace, lease)
    try:
        pool = [workers(redis_url, redis_url, redis_namespace, lease, workers=2) for _ in range(3)]
        interval = 0.2
        periodic = tm.every(interval, tm._registry["span"].bind("p8", 0.02), key="poll")
        started = time.monotonic()
        time.sleep(1.0)  # part of the measured window
        pool[0].kill()
        workers(redis_url, redis_url, redis_namespace, lease, workers=2)
        time.sleep(1.5)  # the rest of the measured window
        started_runs, merged = periodic.runs, periodic.coalesced
        elapsed = time.monotonic() - started
        periodic.cancel()
        assert tm.join(WAIT)
        runs = spans(client, "p8")
        ids = [task_id for task_id, _, _ in runs]
        assert len(ids) == len(set(ids))  # a lost attempt may rerun; a run has one id
        assert len(ids) >= started_runs
        assert peak(runs) == 1
        # Every occurrence became a run or merged into one waiting to start (while the
        # killed process's run waited for its lease, the next ones merged): none lost,
        # none doubled. One may be pending, unstarted, when counted.
        expected = elapsed / interval
        assert expected - 2 <= started_runs + merged <= expected + 1
    finally:
        tm.stop()


def test_keyed_tasks_never_overlap_across_worker_processes(
    workers: Callable[..., Worker], redis_url: str, redis_namespace: str, client: redis.Redis
) -> None:
    """Three worker processes of 4 workers, tasks of one key submitted over and over: the
    recorded intervals never overlap, and a submission while one waits returns it."""
    lease = 2.0
    tm = local(redis_url, redis_namespace, lease)
    try:
        for _ in range(3):
            workers(redis_url, redis_url, redis_namespace, lease, workers=4)
        keyed = tm._registry["span"].options(key="account:7")
        handlers = []
        for i in range(40):
            handlers.append(keyed.queue("k9", 0.01))
            if i % 8 == 7:
                handlers[-1].result(WAIT)
        for handler in handlers:
            handler.result(WAIT)
        runs = spans(client, "k9")
        assert peak(runs) == 1
        assert len({h.id for h in handlers}) == len(runs)  # duplicates were the same task
        assert len(runs) >= 5
    finally:
        tm.stop()
