"""Workspace roles and what each may do.

The ordering OWNER > ADMIN > MEMBER > VIEWER is the whole policy: a command names the least role it
needs and any higher role passes.
"""

from __future__ import annotations

from enum import StrEnum
from uuid import UUID

from domain.errors import Forbidden, ValidationFailed


class Role(StrEnum):
    OWNER = "OWNER"
    ADMIN = "ADMIN"
    MEMBER = "MEMBER"
    VIEWER = "VIEWER"

    @property
    def rank(self) -> int:
        return _RANK[self]

    def at_least(self, other: Role) -> bool:
        return self.rank >= other.rank

    @classmethod
    def parse(cls, value: str) -> Role:
        try:
            return cls(value.upper())
        except ValueError:
            allowed = ", ".join(r.value for r in cls)
            raise ValidationFailed(f"unknown role {value!r}; expected one of {allowed}") from None


_RANK = {Role.VIEWER: 0, Role.MEMBER: 1, Role.ADMIN: 2, Role.OWNER: 3}


def capped(membership: Role, ceiling: Role | None) -> Role:
    """The role a credential acts with: its claim caps the membership, it never raises it.

    A token minted ``VIEWER`` for an owner reads only; a token minted ``OWNER`` for a member
    acts as that member. ``ceiling=None`` is a credential without a role claim.
    """
    if ceiling is None or membership.rank <= ceiling.rank:
        return membership
    return ceiling


def needed_to_grant(role: Role) -> Role:
    """The least role that may give someone ``role``: OWNER for OWNER, ADMIN for the rest
    (``addMember``, ``changeRole`` and ``inviteMember`` all need an ADMIN)."""
    return Role.OWNER if role is Role.OWNER else Role.ADMIN


def require_role(
    membership: Role,
    needed: Role,
    *,
    action: str,
    user_id: str,
    ceiling: Role | None = None,
    api_key_id: UUID | None = None,
) -> None:
    """Refuse ``action`` unless the role ``user_id`` acts with (``membership`` capped by the
    credential's ``ceiling``) is at least ``needed``. When the credential is what falls short,
    the refusal names it (the API key, else the token's role claim): that is what to change,
    not the user's membership."""
    acting = capped(membership, ceiling)
    if acting.at_least(needed):
        return
    held = f"has role {acting.value}"
    if acting is not membership:
        credential = f"API key {api_key_id}" if api_key_id else "this token's role claim"
        held = f"acts as {acting.value} through {credential} (their own role is {membership.value})"
    raise Forbidden(
        f"user {user_id} {held}; {action} needs {needed.value} or higher",
        user_id=user_id,
        role=acting.value,
        needed=needed.value,
    )
