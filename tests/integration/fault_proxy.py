"""A TCP proxy in front of PostgreSQL that breaks a connection exactly around a COMMIT.

A real restart rarely lands between a COMMIT leaving the client and its answer coming back; this
proxy makes that moment happen on demand:

* ``cut_after_commit()``: the next client message holding ``COMMIT`` reaches the server (which
  commits), then the client's connection is cut before the answer comes back: the write exists,
  the client cannot know;
* ``cut_before_commit()``: that message is dropped and the connection cut: the server rolls the
  transaction back when it sees the connection go;
* ``refuse(True)``: new connections are closed at once (the server "is down" for the client).

Connections must not use TLS (``sslmode=disable``) so the proxy can see the messages.
No pytest in here.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from typing import Literal
from urllib.parse import urlsplit, urlunsplit


class FaultProxy:
    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._armed: Literal["after", "before"] | None = None
        self._then_down = False
        self._refusing = False
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._sockets: set[socket.socket] = set()
        self.cuts = 0
        threading.Thread(target=self._accept, daemon=True, name="fault-proxy").start()

    def url_for(self, database_url: str) -> str:
        """``database_url`` with its host and port replaced by this proxy's."""
        parts = urlsplit(database_url)
        user = parts.username or "postgres"
        query = parts.query + ("&" if parts.query else "") + "sslmode=disable"
        return urlunsplit((parts.scheme, f"{user}@127.0.0.1:{self.port}", parts.path, query, ""))

    def cut_after_commit(self, *, then_down: bool = False) -> None:
        """``then_down``: at the cut, every other connection is cut too and new ones refused
        (until ``refuse(False)``), so the client cannot ask what became of its commit."""
        self._then_down = then_down
        self._armed = "after"

    def cut_before_commit(self) -> None:
        self._armed = "before"

    def refuse(self, refusing: bool) -> None:
        self._refusing = refusing

    def drop_all(self) -> None:
        """Cut every open connection (what a server restart does to its clients)."""
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            _close(sock)

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        with self._lock:
            for sock in list(self._sockets):
                _close(sock)

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self._refusing:
                _close(client)
                continue
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                _close(client)
                continue
            with self._lock:
                # Checked again under the lock: a cut with ``then_down`` may have begun while
                # this connection was being made, after its snapshot of the open sockets.
                refused = self._refusing
                if not refused:
                    self._sockets.update((client, server))
            if refused:
                _close(client)
                _close(server)
                continue
            threading.Thread(target=self._pump_up, args=(client, server), daemon=True).start()
            threading.Thread(target=self._pump_down, args=(server, client), daemon=True).start()

    def _pump_up(self, client: socket.socket, server: socket.socket) -> None:
        """Client → server, watching for the COMMIT to break the connection at."""
        try:
            while data := client.recv(65536):
                armed = self._armed
                if armed is not None and b"COMMIT" in data:
                    self._armed = None
                    self.cuts += 1
                    if armed == "after":
                        # "Down" must begin before the client can notice its cut: otherwise it
                        # could reconnect in between and learn the outcome after all.
                        if self._then_down:
                            with self._lock:
                                self._refusing = True
                                others = [s for s in self._sockets if s not in (client, server)]
                            for sock in others:
                                _close(sock)
                        # The client loses its connection before any answer can reach it; the
                        # server gets the COMMIT, and its socket a moment longer, and commits.
                        _close(client)
                        server.sendall(data)
                        threading.Timer(0.5, _close, args=(server,)).start()
                    else:
                        _close(client)
                        _close(server)
                    return
                server.sendall(data)
        except OSError:
            pass
        _close(server)
        _close(client)

    def _pump_down(self, server: socket.socket, client: socket.socket) -> None:
        try:
            while data := server.recv(65536):
                client.sendall(data)
        except OSError:
            pass
        _close(client)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()
