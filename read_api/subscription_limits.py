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
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from domain.errors import RateLimited

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
