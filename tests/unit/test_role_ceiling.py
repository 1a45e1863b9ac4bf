"""A credential's role claim caps the membership role; it never raises it (API.md, "Tokens")."""

from __future__ import annotations

from dataclasses import replace

from aw_builders import World, new_app
from hypothesis import given
from hypothesis import strategies as st

from commands import models as m
from commands.handlers import Actor
from domain.errors import Forbidden, NotFound
from domain.roles import Role, capped

roles = st.sampled_from(list(Role))


@given(membership=roles, ceiling=st.none() | roles)
def test_the_effective_role_is_the_lower_of_membership_and_claim(
    membership: Role, ceiling: Role | None
) -> None:
    effective = capped(membership, ceiling)
    assert effective.rank <= membership.rank
    if ceiling is None:
        assert effective is membership
    else:
        assert effective.rank <= ceiling.rank
        assert effective in (membership, ceiling)


def _spend_limit(world: World) -> m.SetSpendLimit:
    return m.SetSpendLimit(workspace_id=world.workspace_id, monthly_limit="5.00")


def test_a_viewer_claim_keeps_an_owner_from_admin_commands() -> None:
    world = World.build()
    as_viewer = replace(world.owner, role=Role.VIEWER)
    error = world.refuses(Forbidden, world.app.set_spend_limit, _spend_limit(world), as_viewer)
    assert "VIEWER" in error.message
    card = m.CreateCard(project_id=world.project_id, title="read only")
    world.refuses(Forbidden, world.app.create_card, card, as_viewer)
    # The same user with the claim at their membership role still may.
    world.app.set_spend_limit(_spend_limit(world), replace(world.owner, role=Role.OWNER))


def test_an_owner_claim_gives_a_member_no_more_than_membership() -> None:
    world = World.build()
    member = replace(world.member("b1e7a0f2-5d0c-4a55-9c1e-2f9f3f6f0a01", Role.MEMBER),
                     role=Role.OWNER)  # fmt: skip
    world.refuses(Forbidden, world.app.set_spend_limit, _spend_limit(world), member)
    grant = m.AddMember(
        workspace_id=world.workspace_id,
        user_id="c2f8b1a3-6e1d-4b66-8d2f-3a0a4a7a1b02",
        role="OWNER",
    )
    world.refuses(Forbidden, world.app.add_member, grant, member)
    world.app.create_card(m.CreateCard(project_id=world.project_id, title="mine"), member)


def test_an_admin_claim_on_an_owner_cannot_grant_ownership() -> None:
    world = World.build()
    as_admin = replace(world.owner, role=Role.ADMIN)
    grant = m.AddMember(
        workspace_id=world.workspace_id,
        user_id="d3a9c2b4-7f2e-4c77-9e3a-4b1b5b8b2c03",
        role="OWNER",
    )
    world.refuses(Forbidden, world.app.add_member, grant, as_admin)


def test_a_removed_members_credentials_act_as_nothing() -> None:
    world = World.build()
    user = "e4b0d3c5-8a3f-4d88-8f4b-5c2c6c9c3d04"
    admin = replace(world.member(user, Role.ADMIN), role=Role.ADMIN)
    world.app.remove_member(
        m.RemoveMember(workspace_id=world.workspace_id, user_id=user), world.owner
    )
    world.refuses(NotFound, world.app.set_spend_limit, _spend_limit(world), admin)
    card = m.CreateCard(project_id=world.project_id, title="ghost")
    world.refuses(NotFound, world.app.create_card, card, admin)


def test_workspace_credentials_cannot_create_workspaces() -> None:
    world = World.build()
    create = m.CreateWorkspace(name="Side business")
    error = world.refuses(Forbidden, world.app.create_workspace, create)
    assert "bootstrap" in error.message
    app = new_app()
    app.create_workspace(create, Actor(user_id="alice", workspace_id="*", role=Role.OWNER))
