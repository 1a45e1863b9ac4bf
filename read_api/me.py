"""``me``: who the token speaks for, and the workspaces they belong to (API.md "Identity")."""

from __future__ import annotations

from typing import TYPE_CHECKING
from uuid import UUID

import strawberry
from strawberry import ID

from domain.errors import Unauthenticated
from domain.roles import Role, capped
from projections.kanban_queries import user_workspaces

if TYPE_CHECKING:
    from psycopg.rows import DictRow

    from read_api.context import Info


@strawberry.type
class MyWorkspace:
    id: ID
    name: str
    role: Role


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
            return user_workspaces(conn, principal.user_id)

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
            MyWorkspace(
                id=ID(str(r["workspace_id"])),
                name=r["name"],
                # The role this credential acts with there: a workspace token's claim or an API
                # key's role caps the membership (API.md "Tokens"), as every command checks it.
                role=capped(Role(r["role"]), principal.role),
            )
            for r in rows
        ],
    )
