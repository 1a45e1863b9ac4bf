"""Invitations and API keys in GraphQL (API.md "Identity"), and API-key authentication.

The payloads answer from the command's result rather than a read model: what they show is what
the command just decided, and a secret is only in the first answer.
"""

from __future__ import annotations

import functools
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

import strawberry
from strawberry import ID

from adapters.tokens import Principal
from commands.access import (
    API_KEY_PREFIX,
    INVITATION_TTL,
    AcceptInvitation,
    CreateApiKey,
    InviteMember,
    RevokeApiKey,
    RevokeInvitation,
    accept_invitation,
    check_api_key,
    create_api_key,
    invite_member,
    revoke_api_key,
    revoke_invitation,
)
from domain.errors import NotFound, Unavailable
from domain.roles import Role
from projections.key_uses import key_last_used
from read_api.context import Info
from read_api.mutation import WorkspacePayload, answer
from read_api.types import ApiKey, Invitation
from read_api.writes import perform

if TYPE_CHECKING:
    from commands.handlers import AgentWorks, CommandResult


def is_api_key(token: str) -> bool:
    return token.startswith(API_KEY_PREFIX)


def api_key_principal(write: AgentWorks, token: str) -> Principal:
    """The principal of an API key: its creator, in its workspace, with the key's role as the
    ceiling (the handlers cap it by the creator's current membership on every command)."""
    holder = check_api_key(write, token)
    return Principal(
        user_id=holder.user_id,
        workspace_id=str(holder.workspace_id),
        role=holder.role,
        is_bootstrap=False,
        api_key_id=holder.key_id,
    )


@strawberry.type
class InvitationPayload:
    invitation: Invitation | None
    accept_token: str | None
    consistency_token: str


@strawberry.type
class ApiKeyPayload:
    api_key: ApiKey | None
    secret: str | None
    consistency_token: str


@strawberry.input
class InviteMemberInput:
    workspace_id: ID
    email: str
    role: Role
    command_id: ID | None = None


@strawberry.input
class AcceptInvitationInput:
    token: str
    command_id: ID | None = None


@strawberry.input
class RevokeInvitationInput:
    invitation_id: ID
    command_id: ID | None = None


@strawberry.input
class CreateApiKeyInput:
    workspace_id: ID
    name: str
    role: Role
    command_id: ID | None = None


@strawberry.input
class RevokeApiKeyInput:
    api_key_id: ID
    command_id: ID | None = None


def _when(value: object) -> datetime | None:
    return None if value is None else datetime.fromisoformat(str(value))


def _invitation_payload(result: CommandResult, secret: str | None) -> InvitationPayload:
    x = result.extra
    invitation = Invitation(
        id=ID(str(result.id)),
        email=str(x["email"]),
        role=Role(x["role"]),
        expires_at=datetime.fromisoformat(str(x["expires_at"])),
        accepted_at=_when(x.get("accepted_at")),
        revoked_at=_when(x.get("revoked_at")),
    )
    return InvitationPayload(
        invitation=invitation, accept_token=secret, consistency_token=result.consistency_token
    )


async def _last_use(info: Info, result: CommandResult) -> datetime | None:
    """The key's last recorded use (``read_api.key_uses``), read in the key's workspace by a
    caller who may manage the key (the command just let them). A failed read answers null: the
    command has been done and its answer must not be lost to it."""
    scope = await info.context.scope_of(result.id)
    if scope is None:
        return None
    try:
        return await scope.run(lambda conn: key_last_used(conn, result.id))
    except (NotFound, Unavailable):
        return None


def _key_payload(
    result: CommandResult, secret: str | None, last_used_at: datetime | None
) -> ApiKeyPayload:
    x = result.extra
    key = ApiKey(
        id=ID(str(result.id)),
        name=str(x["name"]),
        role=Role(x["role"]),
        created_at=datetime.fromisoformat(str(x["created_at"])),
        last_used_at=last_used_at,
        revoked_at=_when(x.get("revoked_at")),
    )
    return ApiKeyPayload(api_key=key, secret=secret, consistency_token=result.consistency_token)


@strawberry.type
class AccessMutation:
    @strawberry.mutation
    async def invite_member(self, info: Info, input: InviteMemberInput) -> InvitationPayload:
        auth = info.context.runtime.services.auth
        ttl = INVITATION_TTL if auth is None else timedelta(seconds=auth.invitation_ttl_seconds)
        issued = await perform(
            info, functools.partial(invite_member, ttl=ttl), InviteMember, input,
            role=input.role.value,
        )  # fmt: skip
        return _invitation_payload(issued.result, issued.secret)

    @strawberry.mutation
    async def accept_invitation(self, info: Info, input: AcceptInvitationInput) -> WorkspacePayload:
        result = await perform(info, accept_invitation, AcceptInvitation, input)
        return answer(WorkspacePayload, result)

    @strawberry.mutation
    async def revoke_invitation(
        self, info: Info, input: RevokeInvitationInput
    ) -> InvitationPayload:
        result = await perform(info, revoke_invitation, RevokeInvitation, input)
        return _invitation_payload(result, None)

    @strawberry.mutation
    async def create_api_key(self, info: Info, input: CreateApiKeyInput) -> ApiKeyPayload:
        issued = await perform(info, create_api_key, CreateApiKey, input, role=input.role.value)
        # A new key has not been used; a replayed creation may have been since.
        used = await _last_use(info, issued.result) if issued.result.replayed else None
        return _key_payload(issued.result, issued.secret, used)

    @strawberry.mutation
    async def revoke_api_key(self, info: Info, input: RevokeApiKeyInput) -> ApiKeyPayload:
        result = await perform(info, revoke_api_key, RevokeApiKey, input)
        return _key_payload(result, None, await _last_use(info, result))
