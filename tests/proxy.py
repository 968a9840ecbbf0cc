"""A TCP proxy that the tests can cut, like a network partition between a process and
Redis, and heal.

One thread runs one selector loop over every socket; nothing polls: it blocks in
``select()`` until a socket is ready or a command (cut, heal, close) arrives on a
socketpair.
"""

from __future__ import annotations

import selectors
import socket
import threading
from types import TracebackType
from typing import Self
from urllib.parse import urlsplit, urlunsplit

#: Bytes read from one side and not yet written to the other; beyond it we stop
#: reading that side, so a slow reader slows its writer as TCP would.
BUFFER_LIMIT = 256 * 1024
#: Hang guards, never synchronization.
CONNECT_TIMEOUT = 5.0
COMMAND_TIMEOUT = 10.0

_READ = selectors.EVENT_READ
_WRITE = selectors.EVENT_WRITE


class _End:
    """One socket of a link, and the bytes waiting to be written to it."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.pending = bytearray()
        self.read_eof = False  # its peer closed its writing half: nothing more to read
        self.shut_when_flushed = False  # shutdown(SHUT_WR) once `pending` is written
        self.events = 0  # what it is registered for; 0 when not registered
        self.closed = False


class _Link:
    """A client connection and its upstream connection. Cut, the upstream end may be
    missing (a connection accepted during the cut never reaches the target)."""

    def __init__(self, client: _End, upstream: _End | None, cut: bool) -> None:
        self.client = client
        self.upstream = upstream
        self.cut = cut

    def ends(self) -> list[_End]:
        return [end for end in (self.client, self.upstream) if end is not None]

    def peer(self, end: _End) -> _End | None:
        return self.upstream if end is self.client else self.client


class TcpProxy:
    """Forwards 127.0.0.1:`port` to `target_host`:`target_port`, until cut.

    ``cut()``: from its return on, no byte passes in either direction on any
    connection, and new connections are accepted but reach nothing: bytes sent
    vanish (counted in `dropped`), nothing comes back, and no side sees the
    connection close, as when a network drops packets. ``heal()``: the connections
    that were cut are closed (so clients notice and reconnect), and new ones flow
    again. ``close()`` stops everything and joins the thread; idempotent.

    `cut`, `heal` and `close` may be called from any thread; each returns once the
    proxy's thread has applied it.
    """

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        self._wake_recv, self._wake_send = socket.socketpair()
        self._wake_recv.setblocking(False)
        # Guards `_commands`, `_closed` and `_dropped`; notified when `_dropped` grows.
        self._cond = threading.Condition()
        self._commands: list[tuple[str, threading.Event]] = []
        self._closed = False
        self._dropped = 0
        # Owned by the proxy's thread alone.
        self._selector = selectors.DefaultSelector()
        self._links: set[_Link] = set()
        self._cut = False
        self._selector.register(self._listener, _READ, "accept")
        self._selector.register(self._wake_recv, _READ, "command")
        self._thread = threading.Thread(target=self._run, name=f"tcp-proxy-{self.port}")
        self._thread.start()

    # -- the API ---------------------------------------------------------------------

    def url_for(self, server_url: str) -> str:
        """`server_url` (``redis://user:pw@host:port/db?...``) pointed at this proxy."""
        parts = urlsplit(server_url)
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = f"{userinfo}@127.0.0.1:{self.port}" if userinfo else f"127.0.0.1:{self.port}"
        return urlunsplit(parts._replace(netloc=netloc))

    @property
    def dropped(self) -> int:
        """Bytes that vanished into a cut so far (both directions)."""
        with self._cond:
            return self._dropped

    def wait_dropped(self, count: int, timeout: float = COMMAND_TIMEOUT) -> bool:
        """Block until at least `count` bytes vanished into a cut (False on timeout)."""
        with self._cond:
            return self._cond.wait_for(lambda: self._dropped >= count, timeout)

    def cut(self) -> None:
        """Partition: every connection, present and future, becomes a black hole."""
        self._command("cut")

    def heal(self) -> None:
        """End the partition: close the connections that were cut; new ones flow."""
        self._command("heal")

    def close(self) -> None:
        """Close every connection and the listening socket; join the thread. Idempotent."""
        with self._cond:
            closed = self._closed
        if not closed:
            self._command("close")
        self._thread.join(COMMAND_TIMEOUT)
        assert not self._thread.is_alive(), "the proxy's thread did not end"

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _command(self, name: str) -> None:
        done = threading.Event()
        with self._cond:
            if self._closed:
                raise RuntimeError(f"{name}() on a closed proxy")
            self._commands.append((name, done))
        try:
            self._wake_send.send(b"\0")
        except OSError:  # closed by a close() that raced us; it has set `done`
            pass
        if not done.wait(COMMAND_TIMEOUT):
            raise RuntimeError(f"the proxy's thread did not apply {name}()")

    # -- the proxy's thread ----------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._closed:
                for key, mask in self._selector.select():
                    if key.data == "accept":
                        self._accept()
                    elif key.data == "command":
                        self._apply_commands()
                    else:
                        link, end = key.data
                        # An earlier event of this round may have closed it.
                        if link in self._links and not end.closed:
                            self._ready(link, end, mask)
        finally:
            with self._cond:
                self._closed = True
                commands, self._commands = self._commands, []
            for link in list(self._links):
                self._close_link(link)
            self._selector.close()
            for sock in (self._listener, self._wake_recv, self._wake_send):
                sock.close()
            for _, done in commands:
                done.set()

    def _apply_commands(self) -> None:
        try:
            while self._wake_recv.recv(4096):
                pass
        except BlockingIOError:
            pass
        with self._cond:
            commands, self._commands = self._commands, []
        for name, done in commands:
            if name == "cut":
                self._cut = True
                for link in self._links:
                    self._cut_link(link)
            elif name == "heal":
                self._cut = False
                for link in [link for link in self._links if link.cut]:
                    self._close_link(link)
            else:
                with self._cond:
                    self._closed = True  # the loop ends after this round
            done.set()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except BlockingIOError:
                return
            client = _End(sock)
            upstream: _End | None = None
            if not self._cut:
                try:
                    upstream = _End(socket.create_connection(self.target, CONNECT_TIMEOUT))
                except OSError:  # the target is down: the client sees its connection close
                    client.sock.close()
                    continue
            link = _Link(client, upstream, cut=self._cut)
            self._links.add(link)
            for end in link.ends():
                self._interest(link, end)

    def _cut_link(self, link: _Link) -> None:
        link.cut = True
        for end in link.ends():
            end.pending.clear()
            self._interest(link, end)

    def _ready(self, link: _Link, end: _End, mask: int) -> None:
        try:
            if mask & _WRITE:
                self._flush(end)
            if mask & _READ:
                self._read(link, end)
        except OSError:  # reset, broken pipe: the connection is over for both sides
            self._close_link(link)
            return
        if link.cut:
            return
        if all(e.read_eof and not e.pending for e in link.ends()):
            self._close_link(link)
            return
        for e in link.ends():
            self._interest(link, e)

    def _read(self, link: _Link, end: _End) -> None:
        data = end.sock.recv(65536)
        if link.cut:
            if data:  # into the black hole
                with self._cond:
                    self._dropped += len(data)
                    self._cond.notify_all()
            elif end is link.client:  # the client gave up: forget the connection
                self._close_link(link)
            else:  # the target closed; the client must not learn it until heal
                self._close_end(end)
                link.upstream = None
            return
        peer = link.peer(end)
        assert peer is not None
        if data:
            peer.pending += data
            self._flush(peer)
        else:
            end.read_eof = True
            peer.shut_when_flushed = True
            self._flush(peer)

    def _flush(self, end: _End) -> None:
        if end.pending:
            try:
                sent = end.sock.send(end.pending)
            except BlockingIOError:
                sent = 0
            del end.pending[:sent]
        if not end.pending and end.shut_when_flushed:
            end.shut_when_flushed = False
            end.sock.shutdown(socket.SHUT_WR)

    def _interest(self, link: _Link, end: _End) -> None:
        if end.closed:
            return
        if link.cut:
            events = _READ  # read and discard: detects a client that hangs up
        else:
            peer = link.peer(end)
            assert peer is not None
            events = 0
            if not end.read_eof and len(peer.pending) < BUFFER_LIMIT:
                events |= _READ
            if end.pending:
                events |= _WRITE
        if events == end.events:
            return
        if end.events == 0:
            self._selector.register(end.sock, events, (link, end))
        elif events == 0:
            self._selector.unregister(end.sock)
        else:
            self._selector.modify(end.sock, events, (link, end))
        end.events = events

    def _close_end(self, end: _End) -> None:
        if end.events:
            self._selector.unregister(end.sock)
            end.events = 0
        end.closed = True
        end.sock.close()

    def _close_link(self, link: _Link) -> None:
        for end in link.ends():
            if not end.closed:
                self._close_end(end)
        self._links.discard(link)
