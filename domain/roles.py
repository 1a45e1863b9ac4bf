"""Workspace roles and what each may do.

The ordering OWNER > ADMIN > MEMBER > VIEWER is the whole policy: a command names the least role it
needs and any higher role passes.
"""

from __future__ import annotations

from enum import StrEnum

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


def require_role(actual: Role, needed: Role, *, action: str, user_id: str) -> None:
    """Refuse ``action`` unless ``actual`` is at least ``needed``."""
    if not actual.at_least(needed):
        raise Forbidden(
            f"user {user_id} has role {actual.value}; {action} needs {needed.value} or higher",
            user_id=user_id,
            role=actual.value,
            needed=needed.value,
        )
