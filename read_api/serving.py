"""How uvicorn serves the API: its options, and its HTTP and WebSocket protocols with the bounds
uvicorn leaves to the application in front of it (which this deployment may not have).

* **The request head** (request line, headers, a chunked body's trailers): uvicorn's httptools
  protocol reads it whole, however long it grows and however long it takes. A head of 200 MB was
  read into memory as fast as its sender sent it (and its ``Authorization`` parsed on the event
  loop); a socket that sent half a request line, or nothing, was held open for good, so a few
  thousand of them took every file descriptor the process had, from every tenant.
  :class:`BoundedHttpProtocol` answers a head longer than :data:`MAX_HEAD_BYTES` with 431 and
  one that has not arrived within ``request_head_timeout_seconds`` with 408, and closes the
  connection either way. The body is the application's to bound (its size and how long it may
  take: :func:`read_api.input_checks.body_within`).
* **WebSocket pings**: the server answers every ping with a pong at once, whether or not the
  client reads what it is sent. A client sending pings and reading nothing grew the server's
  send buffer by what it sent, without bound. :class:`BoundedWebSocketProtocol` stops reading
  from a client while what was sent to it waits unread (uvicorn already does so for messages
  the application has not taken yet); TCP then slows the sender down.
* **Connections per address**: with the head's timeout a connection still lives as long as its
  client sends a cheap request now and then, and nothing bounded how many one address held.
  :class:`BoundedHttpProtocol` answers one more than ``max_connections_per_address`` with 503
  and closes it (not behind trusted proxies, whose address every client shares: there the
  proxy bounds its clients). A WebSocket leaves the count at its upgrade: sockets are bounded
  per address before they sign in and per user after.
* **Clients that never read**: what a client leaves unread waits in the server for as long as
  it likes (a response of megabytes, subscription messages). A connection whose sends have
  been held up ``send_timeout_seconds`` is dropped (:class:`_DropsClientsThatDoNotRead`).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import TYPE_CHECKING, Any, ClassVar

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from read_api.app import max_websocket_message_bytes
from read_api.ratelimit import client_network
from read_api.runtime import ApiRuntime

if TYPE_CHECKING:
    from fastapi import FastAPI
    from uvicorn._types import ASGIReceiveEvent

MAX_HEAD_BYTES = 64 * 1024
"""The most a request's head may hold, its request line and headers together (and a chunked
body's trailers): a few times what a browser sends with its cookies and a token."""
DEFAULT_HEAD_TIMEOUT_SECONDS = 10.0
DEFAULT_SEND_TIMEOUT_SECONDS = 60.0


def uvicorn_options(app: FastAPI) -> dict[str, Any]:
    """What ``uvicorn.Config`` needs besides the address and logging to serve ``app``."""
    runtime = getattr(app.state, "runtime", None)
    head_timeout, send_timeout, per_address = (
        (
            runtime.services.request_head_timeout_seconds,
            runtime.services.send_timeout_seconds,
            # Behind proxies every client has a proxy's address: the proxy bounds them.
            None
            if runtime.services.trusted_proxies
            else runtime.services.max_connections_per_address,
        )
        if isinstance(runtime, ApiRuntime)
        else (DEFAULT_HEAD_TIMEOUT_SECONDS, DEFAULT_SEND_TIMEOUT_SECONDS, None)
    )

    # uvicorn builds its protocols from classes: these bounds as class attributes.
    class Http(BoundedHttpProtocol):
        pass

    class WebSocket(BoundedWebSocketProtocol):
        pass

    Http.head_timeout = head_timeout
    Http.max_connections_per_address = per_address
    Http.connections_per_address = Counter()  # this server's, shared by its connections
    Http.send_timeout = WebSocket.send_timeout = send_timeout
    return {
        "http": Http,
        "ws": WebSocket,
        "ws_max_size": max_websocket_message_bytes(app),
        # The app decides whose X-Forwarded-For to believe (AGENTWORKS_TRUSTED_PROXIES); uvicorn
        # would believe any from 127.0.0.1.
        "proxy_headers": False,
    }


class _DropsClientsThatDoNotRead:
    """A connection whose client leaves what it was sent unread is dropped after a while.

    What a client does not read waits in the transport's buffer, past its high-water mark, for
    as long as the client likes: a response of megabytes whose client reads nothing was held
    for good (and its socket with it), each request of that client's rate limit one more; a
    WebSocket's close waits for that buffer to empty before the socket goes. Once writing has
    been paused for :attr:`send_timeout` seconds the connection is aborted, its buffer freed.
    """

    send_timeout: float = DEFAULT_SEND_TIMEOUT_SECONDS
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    _send_stalled: asyncio.TimerHandle | None = None

    def _writing_paused(self) -> None:
        if self._send_stalled is None:
            self._send_stalled = self.loop.call_later(self.send_timeout, self.transport.abort)

    def _writing_resumed(self) -> None:
        if self._send_stalled is not None:
            self._send_stalled.cancel()
            self._send_stalled = None


class BoundedHttpProtocol(_DropsClientsThatDoNotRead, HttpToolsProtocol):
    """uvicorn's httptools protocol with a request head bounded in size and in time.

    Size: what arrives without a byte of body in it (a head, or the trailers after a chunked
    body) may add up to :attr:`max_head_bytes`; counted per read, so the check costs nothing per
    byte and overshoots by at most one read. Time: from the connection's start, or from a
    further request's first byte on a kept-alive connection, the head must be whole within
    :attr:`head_timeout` seconds (between requests uvicorn's keep-alive timeout applies).
    Number: a client address holds at most :attr:`max_connections_per_address` connections of
    this server at once (counted in :attr:`connections_per_address` until each one ends or is
    upgraded to a WebSocket).
    """

    head_timeout: float = DEFAULT_HEAD_TIMEOUT_SECONDS
    max_head_bytes: int = MAX_HEAD_BYTES
    max_connections_per_address: int | None = None
    connections_per_address: ClassVar[Counter[str]] = Counter()
    _address: str | None = None
    """The client address this connection counts against, while it does."""

    _unframed = 0
    """Bytes read since the last read that held body bytes or ended a message."""
    _body_seen = 0
    _messages_ended = 0
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        most = self.max_connections_per_address
        if most is not None and self.client is not None:
            address = client_network(str(self.client[0]))
            if self.connections_per_address[address] >= most:
                self._refuse(503, f"this address already has {most} connections open")
                return
            self.connections_per_address[address] += 1
            self._address = address
        self._start_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        self._writing_resumed()
        self._leave_count()
        super().connection_lost(exc)

    def handle_websocket_upgrade(self) -> None:
        self._leave_count()  # the socket's own bounds take over
        super().handle_websocket_upgrade()

    def _leave_count(self) -> None:
        address, self._address = self._address, None
        if address is not None:
            left = self.connections_per_address[address] - 1
            if left > 0:
                self.connections_per_address[address] = left
            else:
                del self.connections_per_address[address]

    def pause_writing(self) -> None:
        super().pause_writing()
        self._writing_paused()

    def resume_writing(self) -> None:
        super().resume_writing()
        self._writing_resumed()

    def data_received(self, data: bytes) -> None:
        body, ended = self._body_seen, self._messages_ended
        super().data_received(data)
        if self.transport.get_protocol() is not self:
            return  # upgraded to a WebSocket, which has bounds of its own
        if self._body_seen != body or self._messages_ended != ended:
            self._unframed = 0
            return
        self._unframed += len(data)
        if self._unframed > self.max_head_bytes and not self.transport.is_closing():
            self._refuse(431, f"the request head is larger than {self.max_head_bytes} bytes")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._head_timer is None:
            self._start_head_timer()

    def on_headers_complete(self) -> None:
        self._stop_head_timer()
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        self._body_seen += len(body)
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._messages_ended += 1
        super().on_message_complete()

    def _start_head_timer(self) -> None:
        self._head_timer = self.loop.call_later(self.head_timeout, self._head_too_slow)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            self._refuse(408, f"the request head did not arrive within {self.head_timeout:g} s")

    def _refuse(self, status: int, message: str) -> None:
        """Answer ``status`` (when no response is under way on this connection) and close."""
        self._stop_head_timer()
        if self.cycle is None or self.cycle.response_complete:
            body = message.encode("ascii")
            head = [STATUS_LINE[status]]
            for name, value in self.server_state.default_headers:
                head += [name, b": ", value, b"\r\n"]
            head += [
                b"content-type: text/plain; charset=utf-8\r\n",
                b"content-length: " + str(len(body)).encode("ascii") + b"\r\n",
                b"connection: close\r\n\r\n",
            ]
            self.transport.write(b"".join(head) + body)
        self.transport.close()


class BoundedWebSocketProtocol(_DropsClientsThatDoNotRead, WebSocketsSansIOProtocol):
    """uvicorn's WebSocket protocol, reading nothing from a client while what was sent to it
    waits unread beyond the transport's high-water mark.

    Every ping read is answered with a pong, which waits in the send buffer for as long as the
    client does not read; not reading then is what bounds that buffer (and with it the pongs a
    client can make the server hold). Reading resumes once the client has read enough, unless
    uvicorn holds it for messages the application has not taken yet.
    """

    _send_blocked = False

    def pause_writing(self) -> None:
        super().pause_writing()
        self._writing_paused()
        self._send_blocked = True
        if not self.transport.is_closing():
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        super().resume_writing()
        self._writing_resumed()
        self._send_blocked = False
        if not self.read_paused and not self.transport.is_closing():
            self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self._writing_resumed()
        super().connection_lost(exc)

    async def receive(self) -> ASGIReceiveEvent:
        # uvicorn's, except that reading stays paused while sends are.
        message = await self.queue.get()
        if self.read_paused and self.queue.empty():
            self.read_paused = False
            if not self._send_blocked and not self.transport.is_closing():
                self.transport.resume_reading()
        return message


__all__ = [
    "MAX_HEAD_BYTES",
    "BoundedHttpProtocol",
    "BoundedWebSocketProtocol",
    "uvicorn_options",
]
