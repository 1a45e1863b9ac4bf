"""Test users by name: every layer's tests call them "alice", "bob"…, the API wants UUIDs."""

from __future__ import annotations

from uuid import NAMESPACE_URL, UUID, uuid5

_USERS = uuid5(NAMESPACE_URL, "https://agentworks.test/users")


def user_id(name: str) -> str:
    """The user id (a UUID, as every id of the API) of the test user called ``name``.

    The same name is the same user everywhere (tokens, addMember, assignCard), and a UUID given as
    the name is used as it is.
    """
    try:
        return str(UUID(name))
    except ValueError:
        return str(uuid5(_USERS, name))
