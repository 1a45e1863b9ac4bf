"""How many subscriptions one caller may keep open: per WebSocket connection and per user.

Each active subscription costs a task, a broadcaster listener and, while it reads, a pooled
connection; without a bound one signed-in user could hold as many as they care to send. A
``subscribe`` over either limit is refused with ``RATE_LIMITED`` and nothing else changes: the
connection stays open and its other subscriptions go on.

The per-user count is kept per API instance, in process: a user's subscriptions on one instance
are bounded by ``per_user``, across N instances by N times that. Sharing the count through Redis
would need a lease per subscription, renewed while it lives, so that an instance that dies does
not leave its users' slots taken for good; the per-instance bound already protects each
instance's pool, which is what the limit is for.

Open connections are bounded per user by the same ``per_user``: each useful connection holds at
least one subscription, so no user needs more, while without a bound one signed-in user could
open (a few hundred a minute, within the rate limit) and keep idle connections until the
instance ran out of file descriptors for everyone. One over the bound is refused at
``connection_init``.

Before ``connection_init`` a socket names nobody: :class:`UnsignedSocketsPerAddress` bounds those
per client address (what it holds until it signs in, at most the 10 s strawberry waits for the
``connection_init``), so that one address cannot open sockets by the thousand and hold them,
each a file descriptor of the instance, while the per-user bound cannot yet see them. Signed-in
sockets are not counted per address: many users behind one NAT are bounded each by their own.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Receive, Scope, Send

from domain.errors import RateLimited
from read_api.ratelimit import client_network

RETRY_AFTER_SECONDS = 1.0
"""A slot frees as soon as one of the caller's own subscriptions ends: nothing to wait out."""


@dataclass
class PerUser:
    """How many of something each user holds in this process: at most ``most``."""

    most: int
    what: str
    """What is counted, as a refusal names it ("open WebSocket connections")."""
    advice: str
    """What a refused caller can do about it."""
    _held: Counter[str] = field(default_factory=Counter)

    def take(self, user_id: str) -> None:
        """Count one more for ``user_id``, or raise :class:`RateLimited`."""
        if self._held[user_id] >= self.most:
            raise RateLimited(
                f"user {user_id} already has {self.most} {self.what}, the most allowed; "
                f"{self.advice}",
                retry_after_seconds=RETRY_AFTER_SECONDS,
            )
        self._held[user_id] += 1

    def give_back(self, user_id: str) -> None:
        left = self._held[user_id] - 1
        if left > 0:
            self._held[user_id] = left
        else:
            del self._held[user_id]

    def held(self, user_id: str) -> int:
        return self._held[user_id]


@dataclass
class SubscriptionSlots:
    """Active subscriptions and open connections per user in this process; used from the API's
    event loop only."""

    per_connection: int
    per_user: int
    subscriptions: PerUser = field(init=False)
    connections: PerUser = field(init=False)

    def __post_init__(self) -> None:
        if self.per_connection < 1 or self.per_user < 1:
            raise ValueError(
                "subscription limits must be at least 1, got "
                f"per connection {self.per_connection}, per user {self.per_user}"
            )
        self.subscriptions = PerUser(
            self.per_user, "active subscriptions", "complete one before subscribing again"
        )
        self.connections = PerUser(
            self.per_user, "open WebSocket connections", "close one before opening another"
        )

    def take(self, user_id: str, *, held_by_connection: int) -> None:
        """Count one more subscription for ``user_id``, whose connection holds
        ``held_by_connection`` already, or raise :class:`RateLimited`."""
        if held_by_connection >= self.per_connection:
            raise RateLimited(
                f"this connection already has {self.per_connection} active subscriptions, the "
                "most allowed; complete one before subscribing again",
                retry_after_seconds=RETRY_AFTER_SECONDS,
            )
        self.subscriptions.take(user_id)

    def give_back(self, user_id: str) -> None:
        self.subscriptions.give_back(user_id)

    def active(self, user_id: str) -> int:
        return self.subscriptions.held(user_id)


#: Where a socket's scope keeps the function that gives its address's slot back (idempotent):
#: called once the socket signs in, and when it closes.
UNSIGNED_SLOT = "agentworks.unsigned_socket_slot"


class UnsignedSocketsPerAddress:
    """ASGI middleware: at most ``most`` WebSockets per client address (an IPv6 client's /64
    network: :func:`read_api.ratelimit.client_network`) that have not signed in
    (``connection_init``) yet, in this process; one more is refused at its handshake (HTTP
    403). Put it inside the proxy-headers middleware, so that the address is the client's."""

    def __init__(self, app: ASGIApp, *, most: int) -> None:
        self.app = app
        self.unsigned = PerUser(most, "sockets not signed in", "sign in on those first")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "websocket":
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        address = client_network(str(client[0]) if client else None)
        try:
            self.unsigned.take(address)
        except RateLimited:
            await receive()  # the handshake (websocket.connect); refused before it is accepted
            await send({"type": "websocket.close", "code": 1008})
            return
        given_back = False

        def give_back() -> None:
            nonlocal given_back
            if not given_back:
                given_back = True
                self.unsigned.give_back(address)

        scope[UNSIGNED_SLOT] = give_back
        try:
            await self.app(scope, receive, send)
        finally:
            give_back()


def signed_in(scope: Scope) -> None:
    """The socket of ``scope`` signed in: its address's slot is free for another."""
    give_back: Callable[[], None] | None = scope.get(UNSIGNED_SLOT)
    if give_back is not None:
        give_back()
