"""Ways into a workspace besides being added by id: invitations by e-mail, and API keys.

Both hold only a SHA-256 digest of their secret (a long random string, computed outside the
domain): the accept token of an invitation and the secret of an API key are shown once.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING
from uuid import UUID

from domain.base import TenantAggregate
from domain.errors import Forbidden, InvalidTransition, ValidationFailed
from domain.instants import instant_text
from domain.meta import EventMeta
from domain.roles import Role, needed_to_grant

MAX_KEY_NAME_LENGTH = 200


class Invitation(TenantAggregate):
    """An offer of a role in a workspace to whoever signs in with ``email``, until it expires."""

    if TYPE_CHECKING:
        email: str
        role: Role
        token_hash: str
        expires_at: datetime
        invited_by: str
        accepted_by: str | None
        accepted_at: datetime | None
        revoked: bool
        revoked_at: datetime | None

    class Created(TenantAggregate.Created):
        email: str
        role: str
        token_hash: str
        expires_at: str
        invited_by: str

        def apply(self, aggregate: Invitation) -> None:
            aggregate.workspace_id = self.workspace_id
            aggregate.email = self.email
            aggregate.role = Role(self.role)
            aggregate.token_hash = self.token_hash
            aggregate.expires_at = datetime.fromisoformat(self.expires_at)
            aggregate.invited_by = self.invited_by
            aggregate.accepted_by = None
            aggregate.accepted_at = None
            aggregate.revoked = False
            aggregate.revoked_at = None

    class Accepted(TenantAggregate.Event):
        user_id: str

        def apply(self, aggregate: Invitation) -> None:
            aggregate.accepted_by = self.user_id
            aggregate.accepted_at = self.timestamp

    class Revoked(TenantAggregate.Event):
        def apply(self, aggregate: Invitation) -> None:
            aggregate.revoked = True
            aggregate.revoked_at = self.timestamp

    @classmethod
    def create(
        cls,
        *,
        invitation_id: UUID,
        workspace_id: UUID,
        email: str,
        role: Role,
        token_hash: str,
        expires_at: datetime,
        invited_by: str,
        meta: EventMeta,
    ) -> Invitation:
        return cls._create(
            cls.Created,
            id=invitation_id,
            workspace_id=workspace_id,
            email=email,
            role=role.value,
            token_hash=token_hash,
            expires_at=instant_text(expires_at, what="expires_at"),
            invited_by=invited_by,
            meta=meta.as_dict(),
        )

    def accept(
        self,
        user_id: str,
        user_email: str,
        *,
        inviter_role: Role | None,
        now: datetime,
        meta: EventMeta,
    ) -> bool:
        """Accept for ``user_id``; False when this user already accepted (nothing to do).

        ``inviter_role`` is the inviter's membership role now (``None``: no longer a member).
        An invitation grants only what its inviter may still grant: one made by an ADMIN since
        demoted or removed grants nothing, as an API key is capped by its creator's current role.
        """
        if self.accepted_by == user_id:
            return False
        if self.revoked:
            raise InvalidTransition(f"invitation {self.id} was revoked")
        if self.accepted_by is not None:
            raise InvalidTransition(f"invitation {self.id} was already accepted")
        if now >= self.expires_at:
            raise InvalidTransition(
                f"invitation {self.id} expired at {self.expires_at.isoformat()}; ask for a new one"
            )
        if user_email != self.email:
            raise Forbidden(
                f"invitation {self.id} is for another e-mail address; sign in as its addressee",
                user_id=user_id,
            )
        needed = needed_to_grant(self.role)
        if inviter_role is None or not inviter_role.at_least(needed):
            standing = (
                "no longer a member of" if inviter_role is None else f"now {inviter_role.value} in"
            )
            raise Forbidden(
                f"invitation {self.id} was made by {self.invited_by}, who is {standing} "
                f"workspace {self.workspace_id} and may no longer grant {self.role.value} "
                f"(that needs {needed.value}); ask an admin for a new invitation",
                user_id=user_id,
            )
        self._record(self.Accepted, meta, user_id=user_id)
        return True

    def revoke(self, *, meta: EventMeta) -> None:
        if self.accepted_by is not None:
            raise InvalidTransition(f"invitation {self.id} was accepted; remove the member instead")
        if not self.revoked:
            self._record(self.Revoked, meta)


class ApiKey(TenantAggregate):
    """A secret that acts in one workspace at ``role``, capped on every use by the current role
    of the member who created it (so it never outranks its creator, nor outlives them)."""

    if TYPE_CHECKING:
        name: str
        role: Role
        created_by: str
        secret_hash: str
        revoked_at: datetime | None

    class Created(TenantAggregate.Created):
        name: str
        role: str
        created_by: str
        secret_hash: str

        def apply(self, aggregate: ApiKey) -> None:
            aggregate.workspace_id = self.workspace_id
            aggregate.name = self.name
            aggregate.role = Role(self.role)
            aggregate.created_by = self.created_by
            aggregate.secret_hash = self.secret_hash
            aggregate.revoked_at = None

    class Revoked(TenantAggregate.Event):
        def apply(self, aggregate: ApiKey) -> None:
            aggregate.revoked_at = self.timestamp

    @classmethod
    def create(
        cls,
        *,
        key_id: UUID,
        workspace_id: UUID,
        name: str,
        role: Role,
        created_by: str,
        secret_hash: str,
        meta: EventMeta,
    ) -> ApiKey:
        clean = name.strip()
        if not clean or len(clean) > MAX_KEY_NAME_LENGTH or "\x00" in clean:
            raise ValidationFailed(
                f"API key name must be 1 to {MAX_KEY_NAME_LENGTH} characters, without NUL"
            )
        return cls._create(
            cls.Created,
            id=key_id,
            workspace_id=workspace_id,
            name=clean,
            role=role.value,
            created_by=created_by,
            secret_hash=secret_hash,
            meta=meta.as_dict(),
        )

    def revoke(self, *, meta: EventMeta) -> None:
        if self.revoked_at is None:
            self._record(self.Revoked, meta)
