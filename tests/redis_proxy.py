"""A Redis that takes connections and never answers, or a proxy to a real one that goes away.

No pytest in here."""

from __future__ import annotations

import contextlib
import socket
import threading
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from adapters.outages import OUTAGES, REDIS

if TYPE_CHECKING:
    from collections.abc import Iterator


class SilentServer:
    """Accepts connections and never answers; counts the connections it was asked on.

    With ``upstream`` (a real Redis's URL) it is a proxy to it, on the same database, that goes
    silent on :meth:`silence` (a network partition, a host gone after a failover: nothing
    refused, nothing answered) or refuses connections on :meth:`refuse` (a stopped Redis), until
    :meth:`resume`. The connections it carried never carry anything again; new ones reach
    ``upstream`` once it resumed."""

    def __init__(self, upstream: str | None = None) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._port = self._listener.getsockname()[1]
        self._upstream = None if upstream is None else urlsplit(upstream)
        database = "/0" if self._upstream is None else self._upstream.path
        self.url = f"redis://127.0.0.1:{self._port}{database}"
        self.connections = 0
        self._silent = upstream is None
        self._cut: list[threading.Event] = []
        """One per connection carried to ``upstream``: set, it carries nothing any more."""
        self._held: list[socket.socket] = []
        self._listen()

    def silence(self) -> None:
        self._silent = True
        for cut in self._cut:
            cut.set()

    def refuse(self) -> None:
        self.silence()
        self.close()

    def resume(self) -> None:
        self._silent = False
        if self._listener.fileno() == -1:  # refused until now
            self._listener = socket.create_server(("127.0.0.1", self._port))
            self._listen()

    def _listen(self) -> None:
        threading.Thread(
            target=self._accept, args=(self._listener,), daemon=True, name="silent-redis"
        ).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            self.connections += 1
            self._held.append(conn)
            if self._silent or self._upstream is None:
                continue
            server = socket.create_connection((self._upstream.hostname, self._upstream.port))
            self._held.append(server)
            cut = threading.Event()
            self._cut.append(cut)
            for source, target in ((conn, server), (server, conn)):
                threading.Thread(
                    target=_carry, args=(source, target, cut), daemon=True, name="silent-redis"
                ).start()

    def close(self) -> None:
        self._listener.close()
        for conn in self._held:
            conn.close()
        self._held.clear()


@contextlib.contextmanager
def proxy_to(redis_url: str) -> Iterator[SilentServer]:
    """A proxy to the Redis at ``redis_url`` that can go silent or refuse; closed on exit, and
    the process's outage state set back to Redis up (later tests start with it up)."""
    server = SilentServer(upstream=redis_url)
    try:
        yield server
    finally:
        server.close()
        OUTAGES.up(REDIS)


def _carry(source: socket.socket, target: socket.socket, cut: threading.Event) -> None:
    """Copy what ``source`` sends to ``target`` until either closes; once ``cut``, drop it."""
    with contextlib.suppress(OSError):
        while data := source.recv(65536):
            if not cut.is_set():
                target.sendall(data)
