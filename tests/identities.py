"""An :class:`~commands.identity.Identity` for tests: production's parts (argon2id, RFC 6238
codes, Fernet sealing), with argon2id at its cheapest parameters so that tests stay fast, and
access tokens that only name their user (tests of the use cases, not of token signing)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from cryptography.fernet import Fernet

from adapters.credentials import Argon2Passwords, SecretBox, Totp
from commands.identity import Identity

if TYPE_CHECKING:
    from collections.abc import Callable
    from uuid import UUID


class NamedAccessTokens:
    """Issues ``access-for-<user id>``."""

    ttl_seconds = 900

    def issue(self, user_id: UUID) -> str:
        return f"access-for-{user_id}"


def cheap_passwords() -> Argon2Passwords:
    """argon2id at its cheapest parameters: production's ~0.1 s a hash (and as much again for
    the decoy each instance hashes) is a cost to attackers, not something a test checks."""
    return Argon2Passwords(time_cost=1, memory_kib=8, parallelism=1)


def cheap_identity(app: Any, *, clock: Callable[[], float] = time.time) -> Identity:
    return Identity(
        app,
        passwords=cheap_passwords(),
        totp=Totp(),
        sealer=SecretBox(Fernet.generate_key().decode()),
        access_tokens=NamedAccessTokens(),
        clock=clock,
    )
