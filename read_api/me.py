"""``me``: who the token speaks for, and the workspaces they belong to (API.md "Identity")."""

from __future__ import annotations

from typing import TYPE_CHECKING
from uuid import UUID

import strawberry
from eventsourcing.application import AggregateNotFoundError
from strawberry import ID

from domain.errors import Unauthenticated
from domain.workspace import Workspace
from read_api.types import RoleEnum

if TYPE_CHECKING:
    from psycopg import Connection
    from psycopg.rows import DictRow

    from commands.handlers import AgentWorks
    from read_api.context import Info


@strawberry.type
class MyWorkspace:
    id: ID
    name: str
    role: RoleEnum


@strawberry.type
class Me:
    id: ID
    email: str
    name: str
    mfa_enabled: bool
    workspaces: list[MyWorkspace]


async def resolve_me(info: Info) -> Me:
    """The signed-in user; UNAUTHENTICATED for a token whose ``sub`` is no registered user
    (tokens minted by ``agentworks token`` for arbitrary ids)."""
    ctx = info.context
    principal = ctx.who.principal
    auth = ctx.runtime.services.auth
    try:
        user_id = UUID(principal.user_id)
    except ValueError:
        raise Unauthenticated("this token's user has no account") from None
    if auth is None:
        raise Unauthenticated("sign-in is not served here")
    user = await ctx.runtime.offloader.run(auth.identity.user, user_id)  # or UNAUTHENTICATED
    pool = ctx.runtime.services.pool

    def memberships() -> list[DictRow]:
        with pool.connection() as conn:
            return _rows(conn, principal.user_id)

    rows = await ctx.runtime.offloader.run(memberships)
    if not principal.is_user and not principal.is_bootstrap:
        # A workspace token sees only its own workspace, as everywhere else.
        rows = [row for row in rows if str(row["workspace_id"]) == principal.workspace_id]
    if principal.is_bootstrap:
        rows = []
    return Me(
        id=ID(str(user.id)),
        email=user.email,
        name=user.name,
        mfa_enabled=user.mfa_enabled,
        workspaces=[
            MyWorkspace(id=ID(str(r["workspace_id"])), name=r["name"], role=RoleEnum(r["role"]))
            for r in rows
        ],
    )


def _rows(conn: Connection[DictRow], user_id: str) -> list[DictRow]:
    return conn.execute(
        "SELECT workspace_id, name, role FROM agentworks_user_workspaces(%s)", (user_id,)
    ).fetchall()


def member_workspace_of(write: AgentWorks, aggregate_id: UUID, user_id: str) -> UUID | None:
    """The workspace of an aggregate a user token wrote (its consistency token names only the
    aggregate), when ``user_id`` is a member there; else ``None`` (no wait, as for strangers)."""
    try:
        aggregate: object = write.repository.get(aggregate_id, deepcopy_from_cache=False)
        workspace_id = getattr(aggregate, "workspace_id", None)
        if not isinstance(workspace_id, UUID):
            return None
        workspace: object = write.repository.get(workspace_id, deepcopy_from_cache=False)
    except AggregateNotFoundError:
        return None
    if not isinstance(workspace, Workspace) or workspace.role_of(user_id) is None:
        return None
    return workspace_id
