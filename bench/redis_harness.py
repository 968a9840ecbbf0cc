"""The processes of the Redis benchmark: a private redis-server, workers, producers.

Runs in the harness (``bench/redis_peers.py``), which imports no task system:

- `RedisServer`: one redis-server per run, on a free port (never 6379), in a
  temporary directory, without persistence (``--save '' --appendonly no``); flushed
  before every measurement and stopped by pid at the end.
- `WorkerProcess`: a worker started from its system's own command line, in its own
  session; CPU is read over its whole process tree, and `kill` SIGKILLs that tree.
- `Harness`: runs producer processes (``bench/redis_child.py``), starts and stops
  workers, waits on the lists the tasks push to (see ``redis_tasks``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import psutil
import redis
from redis_systems import System

HERE = Path(__file__).resolve().parent
CHILD = HERE / "redis_child.py"
REDIS_PORT_DEFAULT = 6379

Result = dict[str, Any]


class MeasurementError(RuntimeError):
    """A measurement could not be made; the message says why (reported, not raised
    out of the run)."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now, never Redis's default one."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port != REDIS_PORT_DEFAULT:
            return port


CpuReading = dict[int, int]  # on-CPU nanoseconds by thread id


def cpu_reading(pids: Iterable[int]) -> CpuReading:
    """The on-CPU time of every thread of `pids` so far, in nanoseconds, from Linux's
    ``/proc/PID/task/TID/schedstat``: exact, where psutil's ``cpu_times`` counts
    10 ms clock ticks, too coarse for a process that is idle. Empty elsewhere."""
    reading: CpuReading = {}
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:  # exited, or not Linux
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as stat:
                    reading[int(tid)] = int(stat.read().split()[0])
            except (OSError, ValueError, IndexError):  # the thread ended meanwhile
                continue
    return reading


def cpu_seconds(before: CpuReading, after: CpuReading) -> float:
    """CPU seconds used between two readings by the threads alive at the second one
    (a thread that ended in between is not counted)."""
    return sum(ns - before.get(tid, 0) for tid, ns in after.items()) / 1e9


class RedisServer:
    """A private redis-server without persistence, for one benchmark run."""

    def __init__(self, executable: str, directory: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.log = directory / "redis-server.log"
        command = [
            executable,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(directory),
            "--logfile",
            str(self.log),
        ]
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, start_new_session=True)
        self.client = redis.Redis.from_url(self.url, decode_responses=True)
        deadline = time.monotonic() + 10
        while True:
            try:
                self.client.ping()
                break
            except redis.ConnectionError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"redis-server did not start; see {self.log}") from None
                time.sleep(0.05)

    def version(self) -> str:
        return str(self.client.info("server")["redis_version"])

    def flush(self) -> None:
        """Empties the server: every key and every cached Lua script."""
        self.client.flushall()
        self.client.script_flush()

    def used_memory(self) -> int:
        """``INFO memory`` used_memory: bytes the server has allocated."""
        return int(self.client.info("memory")["used_memory"])

    def commands_processed(self) -> int:
        """``INFO stats`` total_commands_processed (this call not included)."""
        return int(self.client.info("stats")["total_commands_processed"])

    def connected_clients(self) -> int:
        return int(self.client.info("clients")["connected_clients"])

    def cpu(self) -> CpuReading:
        """The CPU time of every thread of the server so far."""
        return cpu_reading([self.process.pid])

    def stop(self) -> None:
        """Stops the server by its pid (SIGTERM, then SIGKILL after 10 s)."""
        self.client.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class WorkerProcess:
    """One worker started from its system's command line, its output to a log file."""

    def __init__(self, command: Sequence[str], env: dict[str, str], cwd: Path, log: Path) -> None:
        self.log = log
        with open(log, "wb") as out:
            self.started = time.time()
            self.process = subprocess.Popen(
                list(command),
                env=env,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._root = psutil.Process(self.process.pid)

    @property
    def pid(self) -> int:
        return self.process.pid

    def tree(self) -> list[psutil.Process]:
        """The worker process and its live descendants (empty once it has exited)."""
        try:
            return [self._root, *self._root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def owns(self, *pids: int) -> bool:
        """Whether any of `pids` is this worker or a live descendant of it."""
        mine = {p.pid for p in self.tree()}
        return any(pid in mine for pid in pids)

    def cpu(self) -> CpuReading:
        """The CPU time of every thread of the tree so far."""
        return cpu_reading(p.pid for p in self.tree())

    def threads(self) -> tuple[int, int]:
        """Processes and threads of the tree."""
        procs = self.tree()
        threads = 0
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                threads += p.num_threads()
        return len(procs), threads

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return " / ".join(text.strip().splitlines()[-lines:])

    def kill(self) -> None:
        """SIGKILLs the whole tree at once: the root first, so that no supervisor
        reacts to its children's deaths, then every descendant found before."""
        procs = self.tree()
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(signal.SIGKILL)
        self.process.wait()
        psutil.wait_procs(procs[1:], timeout=5)


class Harness:
    """Everything a measurement needs besides the system: the server, the producer
    processes and the workers, and the lists the tasks record to."""

    def __init__(self, server: RedisServer, directory: Path, timeout: float) -> None:
        self.server = server
        self.redis = server.client
        self.directory = directory
        self.timeout = timeout
        self.workers: list[WorkerProcess] = []
        self._logs = 0
        pythonpath = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH")) if p)
        self.env = {
            **os.environ,
            "PYTHONPATH": pythonpath,
            "PYTHONDONTWRITEBYTECODE": "1",
            "BENCH_REDIS_URL": server.url,
            # marionette's own variables too, in case its worker command reads them;
            # the task module passes both explicitly (redis_tasks.marionette_tasks).
            "MARIONETTE_BACKEND": server.url,
            "MARIONETTE_NAMESPACE": "mbench",
        }

    # -- producers -------------------------------------------------------------------

    def producer(self, system: System, action: str, **kwargs: Any) -> Result:
        """Runs `action` in a fresh producer process and returns its JSON result;
        raises `MeasurementError` if it failed."""
        command = [sys.executable, str(CHILD), system.name, action]
        return self.run_child(command, action, kwargs, {**self.env, "BENCH_ROLE": "producer"})

    def run_child(
        self, command: list[str], action: str, kwargs: dict[str, Any], env: dict[str, str]
    ) -> Result:
        """Runs a producer `command` with `kwargs` as JSON on stdin; its last line of
        output, a JSON object, is the result (``{"error": ...}`` if it failed)."""
        try:
            done = subprocess.run(
                command,
                input=json.dumps(kwargs),
                capture_output=True,
                text=True,
                env=env,
                cwd=self.directory,
                timeout=self.timeout,
            )
        except subprocess.TimeoutExpired:
            raise MeasurementError(
                f"producer {action} timed out after {self.timeout:.0f} s"
            ) from None
        lines = done.stdout.strip().splitlines()
        result: Result = json.loads(lines[-1]) if lines else {}
        if done.returncode != 0 or "error" in result:
            reason = result.get("error") or " / ".join(done.stderr.strip().splitlines()[-3:])
            raise MeasurementError(f"producer {action} failed: {reason}")
        return result

    # -- workers ---------------------------------------------------------------------

    def start_worker(self, system: System) -> WorkerProcess:
        self._logs += 1
        log = self.directory / f"worker-{self._logs}-{system.name}.log"
        env = {**self.env, "BENCH_ROLE": "worker"}
        worker = WorkerProcess(system.worker_command(self.server.url), env, self.directory, log)
        self.workers.append(worker)
        return worker

    def stop_workers(self) -> None:
        """SIGKILLs every worker still running (the state they leave is flushed)."""
        while self.workers:
            self.workers.pop().kill()

    def fresh(self) -> None:
        """A clean slate for the next measurement: no worker, an empty server, and
        no client connected but the harness."""
        self.stop_workers()
        self.wait_for_clients()
        self.server.flush()

    def wait_for_clients(self, timeout: float = 5.0) -> None:
        """Waits until no client but the harness is connected (the connections of
        processes that just exited are closed a moment later)."""
        deadline = time.monotonic() + timeout
        while self.server.connected_clients() > 1 and time.monotonic() < deadline:
            time.sleep(0.02)

    def check_alive(self) -> None:
        for w in self.workers:
            if not w.alive():
                raise MeasurementError(
                    f"worker exited with status {w.process.returncode}: {w.log_tail()}"
                )

    # -- the lists the tasks record to ----------------------------------------------------

    def wait_for(self, key: str, n: int, timeout: float) -> int:
        """Waits until the list `key` has `n` entries or `timeout` seconds pass;
        returns its length. Fails fast if a worker exits."""
        deadline = time.monotonic() + timeout
        while True:
            length = int(self.redis.llen(key))
            if length >= n or time.monotonic() >= deadline:
                return length
            self.check_alive()
            time.sleep(0.02)

    def entries(self, key: str) -> list[list[str]]:
        """The entries of the list `key`, each split on spaces."""
        return [str(e).split() for e in self.redis.lrange(key, 0, -1)]

    def pop(self, key: str, timeout: float) -> list[str] | None:
        """The next entry of the list `key`, waiting up to `timeout` seconds."""
        found = self.redis.blpop([key], timeout=timeout)
        return None if found is None else str(found[1]).split()

    def ready(self, system: System, workers: Sequence[WorkerProcess], timeout: float) -> float:
        """Sends ``tick`` probes until every one of `workers` has run one, and returns
        how long that took. With one worker, one probe; with several, a few probes
        half a second apart per try, so that no worker takes them all at once."""
        from redis_tasks import TICKS

        start = time.monotonic()
        deadline = start + timeout
        pending = list(workers)
        seen = 0
        while pending:
            n = 1 if len(workers) == 1 else 6
            self.producer(system, "probe", n=n, interval=0.5)
            seen += n
            left = deadline - time.monotonic()
            if left <= 0 or self.wait_for(TICKS, seen, left) < seen:
                raise MeasurementError(f"workers not ready after {timeout:.0f} s")
            for pid, ppid, _ in self.entries(TICKS):
                pending = [w for w in pending if not w.owns(int(pid), int(ppid))]
        return time.monotonic() - start


@contextlib.contextmanager
def redis_server(executable: str | None, directory: Path) -> Iterator[RedisServer]:
    """A private redis-server for the `with` block, stopped by pid at its end."""
    found = executable or shutil.which("redis-server") or "/usr/bin/redis-server"
    server = RedisServer(found, directory)
    try:
        yield server
    finally:
        server.stop()
