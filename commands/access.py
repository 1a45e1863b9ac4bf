"""Invitations and API keys: the commands, and the check of an API key on each request.

They run through the write side's machinery (idempotency, retries, one save per command). A
secret (an invitation's accept token, an API key) is returned beside the result and never put
in it: results are kept in the command log, and a replayed ``commandId`` gets no secret back.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TypeVar
from uuid import UUID, uuid4

from eventsourcing.application import AggregateNotFoundError
from pydantic import Field

from commands import models as m
from commands.handlers import USER_SCOPE, Actor, AgentWorks, CommandResult, Decision
from domain.access import ApiKey, Invitation
from domain.errors import Duplicate, Forbidden, NotFound, Unauthenticated
from domain.meta import EventMeta
from domain.roles import Role
from domain.user import EmailClaim, User, email_claim_ids, email_to_find, normalise_email
from domain.workspace import Workspace

INVITATION_TTL = timedelta(days=7)
API_KEY_PREFIX = "awk_"

_Grant = TypeVar("_Grant", Invitation, ApiKey)


class InviteMember(m.Command):
    workspace_id: UUID
    email: str = Field(min_length=3, max_length=254)
    role: str


class AcceptInvitation(m.Command):
    token: str = Field(min_length=1, max_length=200)


class RevokeInvitation(m.Command):
    invitation_id: UUID


class CreateApiKey(m.Command):
    workspace_id: UUID
    name: str = Field(max_length=200)
    role: str


class RevokeApiKey(m.Command):
    api_key_id: UUID


@dataclass(frozen=True)
class Issued:
    """A command's result and the secret it made, ``None`` when the command was a replay."""

    result: CommandResult
    secret: str | None


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _invitation_extra(invitation: Invitation) -> dict[str, object]:
    return {
        "email": invitation.email,
        "role": invitation.role.value,
        "expires_at": invitation.expires_at.isoformat(),
        "accepted_at": invitation.accepted_at.isoformat() if invitation.accepted_at else None,
        "revoked_at": invitation.revoked_at.isoformat() if invitation.revoked_at else None,
    }


def _key_extra(key: ApiKey) -> dict[str, object]:
    return {
        "name": key.name,
        "role": key.role.value,
        "created_at": key.created_on.isoformat(),
        "revoked_at": key.revoked_at.isoformat() if key.revoked_at else None,
    }


# Module functions rather than methods: AgentWorks's machinery is reused through its public
# methods (execute, load, workspace_for, may_grant), like billing's.


def invite_member(
    app: AgentWorks, cmd: InviteMember, actor: Actor, *, ttl: timedelta = INVITATION_TTL
) -> Issued:
    invitation_id = uuid4()
    secret = secrets.token_urlsafe(32)

    def issue(workspace: Workspace, role: Role, meta: EventMeta) -> Decision:
        app.may_grant(workspace, actor, role)
        email = normalise_email(cmd.email)
        member = _account_of(app, email)
        if member is not None and (now := workspace.role_of(str(member.id))) is not None:
            # Accepting it would change nothing: the member keeps the role they have.
            raise Duplicate(
                f"{email} is already a member of this workspace, as {now.value}; "
                "change their role with changeRole"
            )
        invitation = Invitation.create(
            invitation_id=invitation_id,
            workspace_id=workspace.id,
            email=email,
            role=role,
            token_hash=_digest(secret),
            expires_at=datetime.now(UTC) + ttl,
            invited_by=actor.user_id,
            meta=meta.in_workspace(workspace.id),
        )
        return Decision(invitation, "invitation", [invitation], _invitation_extra(invitation))

    return _issue(app, cmd, actor, issue, secret=f"{invitation_id.hex}.{secret}")


def accept_invitation(app: AgentWorks, cmd: AcceptInvitation, actor: Actor) -> CommandResult:
    """Join the invitation's workspace at its role; accepting again is answered, not refused."""
    if actor.workspace_id != USER_SCOPE:
        raise Forbidden("accepting an invitation needs a user token (from /auth/login)")
    invitation_hex, _, secret = cmd.token.strip().partition(".")
    try:
        invitation_id = UUID(hex=invitation_hex)
    except ValueError:
        raise NotFound("no invitation has this token") from None

    def decide(meta: EventMeta) -> Decision:
        try:
            invitation = app.aggregate(Invitation, invitation_id)
        except NotFound:
            # As for a wrong secret: whoever holds an id learns nothing of it.
            raise NotFound("no invitation has this token") from None
        if not secrets.compare_digest(invitation.token_hash, _digest(secret)):
            raise NotFound("no invitation has this token")
        meta = meta.in_workspace(invitation.workspace_id)
        user = _user(app, actor.user_id)
        workspace = app.aggregate(Workspace, invitation.workspace_id)
        accepted = invitation.accept(
            actor.user_id,
            email_to_find(user.email),  # (stored before A-labels were spelled in Unicode)
            inviter_role=workspace.role_of(invitation.invited_by),
            now=datetime.now(UTC),
            meta=meta,
        )
        if accepted and workspace.role_of(actor.user_id) is None:
            workspace.add_member(actor.user_id, invitation.role, meta=meta)
        return Decision(workspace, "workspace", [invitation, workspace])

    return app.execute(cmd, actor, None, decide)


def revoke_invitation(app: AgentWorks, cmd: RevokeInvitation, actor: Actor) -> CommandResult:
    return _revoke(
        app, cmd, actor, Invitation, cmd.invitation_id, kind="invitation", extra=_invitation_extra
    )


def create_api_key(app: AgentWorks, cmd: CreateApiKey, actor: Actor) -> Issued:
    key_id = uuid4()
    secret = secrets.token_urlsafe(32)

    def issue(workspace: Workspace, role: Role, meta: EventMeta) -> Decision:
        mine = workspace.role_of(actor.user_id) or Role.VIEWER
        actor.require(mine, role, action=f"creating a {role.value} API key")
        key = ApiKey.create(
            key_id=key_id,
            workspace_id=workspace.id,
            name=cmd.name,
            role=role,
            created_by=actor.user_id,
            secret_hash=_digest(secret),
            meta=meta.in_workspace(workspace.id),
        )
        return Decision(key, "api_key", [key], _key_extra(key))

    return _issue(app, cmd, actor, issue, secret=f"{API_KEY_PREFIX}{key_id.hex}_{secret}")


def revoke_api_key(app: AgentWorks, cmd: RevokeApiKey, actor: Actor) -> CommandResult:
    return _revoke(app, cmd, actor, ApiKey, cmd.api_key_id, kind="api_key", extra=_key_extra)


def _issue(
    app: AgentWorks,
    cmd: InviteMember | CreateApiKey,
    actor: Actor,
    issue: Callable[[Workspace, Role, EventMeta], Decision],
    *,
    secret: str,
) -> Issued:
    """An ADMIN's grant of ``cmd.role`` in ``cmd.workspace_id`` that a secret proves: ``issue``
    checks the actor may grant the role and creates the grant; never with an API key. The secret
    goes back to the caller only on the first run, never on a replay (results are kept in the
    command log)."""

    def decide(meta: EventMeta) -> Decision:
        workspace = app.workspace_for(actor, cmd.workspace_id, Role.ADMIN, cmd.action)
        if actor.api_key_id is not None:
            # What a key makes is its creator's and outlives it: a leaked key, found and
            # revoked, would have left a way in behind (another key, a membership).
            raise Forbidden(
                f"{cmd.action} is not done with an API key (API key {actor.api_key_id}):"
                " a member signs in as themselves to grant access"
            )
        return issue(workspace, Role.parse(cmd.role), meta)

    result = app.execute(cmd, actor, cmd.workspace_id, decide)
    return Issued(result, None if result.replayed else secret)


def _revoke(
    app: AgentWorks,
    cmd: m.Command,
    actor: Actor,
    cls: type[_Grant],
    grant_id: UUID,
    *,
    kind: str,
    extra: Callable[[_Grant], dict[str, object]],
) -> CommandResult:
    """An ADMIN revokes an invitation or an API key of their workspace."""

    def decide(meta: EventMeta) -> Decision:
        grant = app.load(cls, grant_id, actor, Role.ADMIN, cmd.action)
        grant.revoke(meta=meta.in_workspace(grant.workspace_id))
        return Decision(grant, kind, [grant], extra(grant))

    return app.execute(cmd, actor, None, decide)


@dataclass(frozen=True)
class KeyHolder:
    """Who an API key speaks for: its creator, in its workspace, at most at its role."""

    user_id: str
    workspace_id: UUID
    role: Role
    key_id: UUID


def check_api_key(app: AgentWorks, presented: str) -> KeyHolder:
    """The holder of a live key; UNAUTHENTICATED for an unknown, forged or revoked one.

    Read from the event store on every request, so a revocation holds from the next request on.
    """
    body = presented.strip().removeprefix(API_KEY_PREFIX)
    key_hex, _, secret = body.partition("_")
    try:
        key_id = UUID(hex=key_hex)
    except ValueError:
        raise Unauthenticated("API key is not valid") from None
    try:
        key = app.aggregate(ApiKey, key_id)
    except NotFound:
        raise Unauthenticated("API key is not valid") from None
    if not secrets.compare_digest(key.secret_hash, _digest(secret)):
        raise Unauthenticated("API key is not valid")
    if key.revoked_at is not None:
        raise Unauthenticated(f"API key {key.id} was revoked")
    if _outlived_its_membership(app, key):
        raise Unauthenticated(
            f"API key {key.id} was made before its creator was removed from the workspace; "
            "a key is theirs for one membership: a member makes a new one"
        )
    return KeyHolder(
        user_id=key.created_by, workspace_id=key.workspace_id, role=key.role, key_id=key.id
    )


def _outlived_its_membership(app: AgentWorks, key: ApiKey) -> bool:
    """Whether ``key``'s creator is no longer in the membership it was made in: removed (a key
    then acts for nobody, and lets nobody in), or added again since."""
    workspace = app.aggregate(Workspace, key.workspace_id, copy=False)
    if workspace.role_of(key.created_by) is None:
        return True
    joined = workspace.member_since(key.created_by)
    return joined is not None and joined > key.created_on


def api_key_revoked(app: AgentWorks, key_id: UUID) -> bool:
    """Whether the key lets nobody in any more since it was checked (for what it opened that
    lives on: a subscription): revoked, or its creator removed and added again since it was
    made (as :func:`check_api_key` refuses it)."""
    try:
        key = app.aggregate(ApiKey, key_id, copy=False)
    except NotFound:
        return True
    return key.revoked_at is not None or _outlived_its_membership(app, key)


def _account_of(app: AgentWorks, email: str) -> User | None:
    """The account that signed up with ``email`` (normalised), if any."""
    for claim_id in email_claim_ids(email):
        try:
            claim = app.aggregate(EmailClaim, claim_id)
            user = app.aggregate(User, claim.user_id)
        except NotFound:
            continue
        return user
    return None


def _user(app: AgentWorks, user_id: str) -> User:
    try:
        user: object = app.repository.get(UUID(user_id))
    except (ValueError, AggregateNotFoundError):
        raise Forbidden("this token's user has no account; sign up first") from None
    if not isinstance(user, User):
        raise Forbidden("this token's user has no account; sign up first")
    return user
