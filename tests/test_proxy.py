"""The partitioning TCP proxy of the tests: bytes pass, a cut is a black hole, heal
restores traffic."""

from __future__ import annotations

import select
import socket
import threading
from collections.abc import Iterator

import pytest
import redis
from conftest import WAIT
from helpers import Threads
from proxy import TcpProxy
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis_server import RedisServer, free_port


class EchoServer:
    """Echoes every byte back; counts connections and bytes received. Keeps each
    connection's socket so a test can push bytes from the server side."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        # Guards the fields below; notified when any of them changes.
        self.cond = threading.Condition()
        self.conns: list[socket.socket] = []
        self.received = 0
        self.stopping = False
        self.threads = [threading.Thread(target=self._accept, name="echo-accept")]
        self.threads[0].start()

    def _accept(self) -> None:
        while True:
            conn, _ = self.listener.accept()
            with self.cond:
                if self.stopping:
                    conn.close()
                    return
                self.conns.append(conn)
                thread = threading.Thread(target=self._echo, args=(conn,), name="echo-conn")
                self.threads.append(thread)
                self.cond.notify_all()
            thread.start()

    def _echo(self, conn: socket.socket) -> None:
        try:
            while data := conn.recv(65536):
                with self.cond:
                    self.received += len(data)
                    self.cond.notify_all()
                conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)  # echo the half-close too
        except OSError:
            pass

    def connections(self) -> int:
        with self.cond:
            return len(self.conns)

    def wait_connections(self, count: int) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.conns) >= count, WAIT)

    def close(self) -> None:
        with self.cond:
            self.stopping = True
        socket.create_connection(("127.0.0.1", self.port)).close()  # wakes accept()
        with self.cond:
            conns = list(self.conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)  # wakes its recv()
            except OSError:
                pass
        for thread in self.threads:
            thread.join(WAIT)
        for conn in conns:
            conn.close()
        self.listener.close()


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def proxy(echo: EchoServer) -> Iterator[TcpProxy]:
    with TcpProxy(echo.port) as p:
        yield p


def connect(proxy: TcpProxy) -> socket.socket:
    return socket.create_connection(("127.0.0.1", proxy.port), timeout=WAIT)


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, f"connection closed after {len(data)} of {size} bytes"
        data += chunk
    return bytes(data)


def nothing_to_read(sock: socket.socket) -> bool:
    readable, _, _ = select.select([sock], [], [], 0)
    return not readable


def closed_by_peer(sock: socket.socket) -> bool:
    """Whether the next read sees the connection end (FIN or reset); blocks up to WAIT."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_bytes_pass_both_ways(proxy: TcpProxy) -> None:
    """Bytes sent through the proxy reach the target, and its replies come back."""
    with connect(proxy) as sock:
        sock.sendall(b"hello")
        assert recv_exactly(sock, 5) == b"hello"


def test_a_large_stream_passes_intact(proxy: TcpProxy) -> None:
    """Four MiB written while the replies are read arrive intact and in order."""
    payload = bytes(range(256)) * (4 * 4096)
    threads = Threads()
    with connect(proxy) as sock:
        threads.start(lambda: sock.sendall(payload))
        assert recv_exactly(sock, len(payload)) == payload
        threads.join()


def test_a_half_close_is_passed_on(proxy: TcpProxy) -> None:
    """A client that shuts its writing half still gets the replies, then the end."""
    with connect(proxy) as sock:
        sock.sendall(b"last words")
        sock.shutdown(socket.SHUT_WR)
        assert recv_exactly(sock, 10) == b"last words"
        assert sock.recv(1) == b""


def test_a_cut_drops_bytes_to_the_target(proxy: TcpProxy, echo: EchoServer) -> None:
    """After cut(), bytes a client sends vanish: the target never gets them."""
    with connect(proxy) as sock:
        sock.sendall(b"ping")
        assert recv_exactly(sock, 4) == b"ping"
        proxy.cut()
        sock.sendall(b"lost")
        assert proxy.wait_dropped(4)
        assert echo.received == 4
        assert nothing_to_read(sock)


def test_a_cut_drops_bytes_from_the_target(proxy: TcpProxy, echo: EchoServer) -> None:
    """After cut(), bytes the target sends vanish: the client never gets them."""
    with connect(proxy) as sock:
        echo.wait_connections(1)
        proxy.cut()
        echo.conns[0].sendall(b"pushed")
        assert proxy.wait_dropped(6)
        assert nothing_to_read(sock)


def test_a_cut_hides_connections_ending(proxy: TcpProxy, echo: EchoServer) -> None:
    """During a cut the client does not see the target close its connection."""
    with connect(proxy) as sock:
        echo.wait_connections(1)
        proxy.cut()
        echo.conns[0].shutdown(socket.SHUT_RDWR)
        sock.sendall(b"anyone?")  # read in the same proxy round as, or after, the close
        assert proxy.wait_dropped(7)
        assert nothing_to_read(sock)


def test_a_cut_blackholes_new_connections(proxy: TcpProxy, echo: EchoServer) -> None:
    """A connection made during a cut is accepted but never reaches the target."""
    proxy.cut()
    with connect(proxy) as sock:
        sock.sendall(b"hello?")
        assert proxy.wait_dropped(6)
        assert echo.connections() == 0
        assert nothing_to_read(sock)


def test_heal_closes_cut_connections_and_lets_new_ones_through(
    proxy: TcpProxy, echo: EchoServer
) -> None:
    """heal() closes every connection that was cut, and new connections flow again."""
    with connect(proxy) as first, connect(proxy) as second:
        echo.wait_connections(2)
        proxy.cut()
        with connect(proxy) as during:
            during.sendall(b"x")
            assert proxy.wait_dropped(1)
            proxy.heal()
            assert closed_by_peer(first)
            assert closed_by_peer(second)
            assert closed_by_peer(during)
    with connect(proxy) as after:
        after.sendall(b"back")
        assert recv_exactly(after, 4) == b"back"
    assert echo.connections() == 3


def test_a_target_that_is_down_closes_the_client() -> None:
    """With nothing listening at the target, a client's connection is closed at once."""
    with TcpProxy(free_port()) as proxy, connect(proxy) as sock:
        assert closed_by_peer(sock)


def test_url_for_points_a_url_at_the_proxy(proxy: TcpProxy) -> None:
    """url_for() swaps host and port and keeps credentials, database and query."""
    url = proxy.url_for("redis://user:pw@localhost:6400/3?socket_timeout=2")
    assert url == f"redis://user:pw@127.0.0.1:{proxy.port}/3?socket_timeout=2"
    assert proxy.url_for("redis://127.0.0.1:6400/0") == f"redis://127.0.0.1:{proxy.port}/0"


def test_close_is_idempotent_and_ends_the_proxy(echo: EchoServer) -> None:
    """close() twice is fine; afterwards cut() raises and the port refuses connections."""
    proxy = TcpProxy(echo.port)
    proxy.close()
    proxy.close()
    with pytest.raises(RuntimeError, match="closed"):
        proxy.cut()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=WAIT)


def test_a_redis_client_times_out_in_a_cut_and_recovers_after_heal(
    redis_server: RedisServer,
) -> None:
    """A redis-py client behind a cut times out, and works again once it is healed."""
    with TcpProxy(redis_server.port) as proxy:
        url = proxy.url_for(redis_server.url)
        # A short timeout is what is under test here; no retries, to see each failure.
        no_retry = Retry(NoBackoff(), 0)
        with redis.Redis.from_url(url, socket_timeout=0.5, retry=no_retry) as client:
            assert client.ping()
            proxy.cut()
            with pytest.raises(redis.TimeoutError):
                client.ping()
            proxy.heal()
            assert client.ping()
