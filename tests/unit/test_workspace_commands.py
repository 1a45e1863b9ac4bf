"""Workspace commands through the write side: who may do what, tenancy, and what gets saved."""

from __future__ import annotations

from uuid import UUID, uuid4

import pytest
from aw_builders import (
    OWNER,
    Spec,
    World,
    assert_refused,
    assert_role_matrix,
    new_app,
    position_of_log,
    stored_events,
)

from commands import models as m
from commands.handlers import Actor, AgentWorks
from domain.errors import (
    Duplicate,
    Forbidden,
    InvalidTransition,
    NotFound,
    ValidationFailed,
)
from domain.project import Project
from domain.roles import Role
from domain.workspace import Workspace

ROLES = list(Role)


def _add_target(world: World) -> None:
    world.member("target", Role.MEMBER)


SPECS = [
    Spec.of(Role.ADMIN, AgentWorks.rename_workspace, m.RenameWorkspace, name="Renamed"),
    Spec.of(Role.ADMIN, AgentWorks.add_member, m.AddMember, user_id="newbie", role="MEMBER"),
    Spec.of(
        Role.ADMIN,
        AgentWorks.change_role,
        m.ChangeRole,
        _add_target,
        user_id="target",
        role="VIEWER",
    ),
    Spec.of(Role.ADMIN, AgentWorks.remove_member, m.RemoveMember, _add_target, user_id="target"),
    Spec.of(Role.ADMIN, AgentWorks.set_spend_limit, m.SetSpendLimit, monthly_limit="100.00"),
    Spec.of(Role.MEMBER, AgentWorks.create_project, m.CreateProject, name="Another"),
]


@pytest.mark.parametrize("role", ROLES, ids=str)
@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_role_matrix_of_workspace_commands(spec: Spec, role: Role) -> None:
    world = World.build()
    spec.prepare(world)
    error = assert_role_matrix(world, role, spec.needed, lambda actor: spec.send(world, actor))
    if error is not None:
        assert role.value in error.message


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_user_who_is_not_a_member_gets_not_found(spec: Spec) -> None:
    world = World.build()
    spec.prepare(world)
    stranger = world.actor("stranger")
    error = assert_refused(world.app, NotFound, lambda: spec.send(world, stranger))
    assert str(world.workspace_id) in error.message


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_commands_for_another_workspace_answer_not_found(spec: Spec) -> None:
    world = World.build()
    spec.prepare(world)
    other = World.build(app=world.app, owner="mallory")
    # mallory owns her own workspace but sends commands naming alice's workspace
    error = assert_refused(world.app, NotFound, lambda: spec.send(world, other.owner))
    assert error.message == f"workspace {world.workspace_id} does not exist"


def test_bootstrap_credentials_cannot_act_inside_a_workspace() -> None:
    world = World.build()
    boot = Actor(user_id=OWNER, workspace_id="*")
    cmd = m.RenameWorkspace(workspace_id=world.workspace_id, name="X")
    world.refuses(NotFound, world.app.rename_workspace, cmd, boot)


def test_a_project_id_is_not_a_workspace_id() -> None:
    world = World.build()
    actor = Actor(user_id=OWNER, workspace_id=str(world.project_id))
    cmd = m.RenameWorkspace(workspace_id=world.project_id, name="X")
    error = world.refuses(NotFound, world.app.rename_workspace, cmd, actor)
    assert str(world.project_id) in error.message


# -- createWorkspace ------------------------------------------------------------------------------


def test_create_workspace_makes_the_caller_its_owner_and_stamps_its_id_in_metadata() -> None:
    app = new_app()
    actor = Actor(user_id="alice", workspace_id="*", correlation_id="corr-1")
    result = app.create_workspace(m.CreateWorkspace(name="Acme"), actor)
    workspace: Workspace = app.repository.get(result.id)
    assert isinstance(workspace, Workspace)
    assert workspace.members == {"alice": Role.OWNER}
    assert (result.kind, result.version, result.position) == ("workspace", 1, 1)
    (event,) = stored_events(app)
    assert event.meta["workspace_id"] == str(result.id)
    assert event.meta["actor"] == "alice"
    assert event.meta["correlation_id"] == "corr-1"


def test_blank_workspace_name_is_refused_and_writes_nothing() -> None:
    app = new_app()
    boot = Actor(user_id="alice", workspace_id="*")
    assert_refused(
        app, ValidationFailed, lambda: app.create_workspace(m.CreateWorkspace(name="  "), boot)
    )


# -- members --------------------------------------------------------------------------------------


def test_admin_can_add_members_and_admins_but_not_owners() -> None:
    world = World.build()
    admin = world.member("ada", Role.ADMIN)
    for user, role in (("m1", "MEMBER"), ("a1", "admin"), ("v1", "VIEWER")):
        world.app.add_member(
            m.AddMember(workspace_id=world.workspace_id, user_id=user, role=role), admin
        )
    cmd = m.AddMember(workspace_id=world.workspace_id, user_id="o2", role="OWNER")
    error = world.refuses(Forbidden, world.app.add_member, cmd, admin)
    assert "OWNER" in error.message
    workspace = world.get(world.workspace_id)
    assert workspace.role_of("a1") is Role.ADMIN
    assert workspace.role_of("o2") is None


def test_only_an_owner_can_grant_owner() -> None:
    world = World.build()
    world.member("bob", Role.MEMBER)
    admin = world.member("ada", Role.ADMIN)
    promote = m.ChangeRole(workspace_id=world.workspace_id, user_id="bob", role="OWNER")
    world.refuses(Forbidden, world.app.change_role, promote, admin)
    world.app.change_role(promote, world.owner)
    assert world.get(world.workspace_id).role_of("bob") is Role.OWNER


def test_admin_cannot_promote_themselves_to_owner() -> None:
    world = World.build()
    admin = world.member("ada", Role.ADMIN)
    cmd = m.ChangeRole(workspace_id=world.workspace_id, user_id="ada", role="OWNER")
    world.refuses(Forbidden, world.app.change_role, cmd, admin)


def test_admin_cannot_demote_or_remove_an_owner() -> None:
    world = World.build()
    admin = world.member("ada", Role.ADMIN)
    demote = m.ChangeRole(workspace_id=world.workspace_id, user_id=OWNER, role="MEMBER")
    remove = m.RemoveMember(workspace_id=world.workspace_id, user_id=OWNER)
    world.refuses(Forbidden, world.app.change_role, demote, admin)
    world.refuses(Forbidden, world.app.remove_member, remove, admin)
    assert world.get(world.workspace_id).role_of(OWNER) is Role.OWNER


def test_admin_can_demote_another_admin() -> None:
    world = World.build()
    admin = world.member("ada", Role.ADMIN)
    world.member("abe", Role.ADMIN)
    cmd = m.ChangeRole(workspace_id=world.workspace_id, user_id="abe", role="VIEWER")
    world.app.change_role(cmd, admin)
    assert world.get(world.workspace_id).role_of("abe") is Role.VIEWER


def test_last_owner_cannot_demote_or_remove_themselves() -> None:
    world = World.build()
    demote = m.ChangeRole(workspace_id=world.workspace_id, user_id=OWNER, role="ADMIN")
    remove = m.RemoveMember(workspace_id=world.workspace_id, user_id=OWNER)
    for send in (
        lambda: world.app.change_role(demote, world.owner),
        lambda: world.app.remove_member(remove, world.owner),
    ):
        error = assert_refused(world.app, InvalidTransition, send)
        assert "last OWNER" in error.message
        assert OWNER in error.message


def test_an_owner_can_step_down_once_a_second_owner_exists() -> None:
    world = World.build()
    world.member("bob", Role.OWNER)
    cmd = m.RemoveMember(workspace_id=world.workspace_id, user_id=OWNER)
    world.app.remove_member(cmd, world.owner)
    assert world.get(world.workspace_id).members == {"bob": Role.OWNER}


def test_adding_an_existing_member_is_a_duplicate_and_writes_nothing() -> None:
    world = World.build()
    world.member("bob", Role.MEMBER)
    cmd = m.AddMember(workspace_id=world.workspace_id, user_id="bob", role="ADMIN")
    error = world.refuses(Duplicate, world.app.add_member, cmd)
    assert "bob" in error.message
    assert world.get(world.workspace_id).role_of("bob") is Role.MEMBER


def test_unknown_role_is_refused_and_lists_the_roles() -> None:
    world = World.build()
    cmd = m.AddMember(workspace_id=world.workspace_id, user_id="bob", role="GOD")
    error = world.refuses(ValidationFailed, world.app.add_member, cmd)
    assert "'GOD'" in error.message
    assert "OWNER, ADMIN, MEMBER, VIEWER" in error.message


def test_removed_member_loses_access() -> None:
    world = World.build()
    bob = world.member("bob", Role.MEMBER)
    world.app.remove_member(
        m.RemoveMember(workspace_id=world.workspace_id, user_id="bob"), world.owner
    )
    cmd = m.CreateProject(workspace_id=world.workspace_id, name="P2")
    world.refuses(NotFound, world.app.create_project, cmd, bob)


def test_removing_a_non_member_is_not_found() -> None:
    world = World.build()
    cmd = m.RemoveMember(workspace_id=world.workspace_id, user_id="ghost")
    error = world.refuses(NotFound, world.app.remove_member, cmd)
    assert "ghost" in error.message


# -- spend limit and plan -------------------------------------------------------------------------


def test_set_spend_limit_stores_exact_micros_and_can_clear_it() -> None:
    world = World.build()
    world.app.set_spend_limit(
        m.SetSpendLimit(workspace_id=world.workspace_id, monthly_limit="12.345678"), world.owner
    )
    assert world.get(world.workspace_id).monthly_limit_micros == 12_345_678
    world.app.set_spend_limit(m.SetSpendLimit(workspace_id=world.workspace_id), world.owner)
    assert world.get(world.workspace_id).monthly_limit_micros is None


@pytest.mark.parametrize("limit", ["-1", "-0.000001", "1e3", "0.0000001", "ten"])
def test_negative_or_malformed_spend_limit_is_refused(limit: str) -> None:
    world = World.build()
    cmd = m.SetSpendLimit(workspace_id=world.workspace_id, monthly_limit=limit)
    error = world.refuses(ValidationFailed, world.app.set_spend_limit, cmd)
    assert limit in error.message


def test_set_plan_stores_markup_and_increment() -> None:
    world = World.build()
    world.app.set_plan(
        m.SetPlan(workspace_id=world.workspace_id, markup="1.25", billing_increment="0.05"),
        world.operator(),
    )
    workspace = world.get(world.workspace_id)
    assert str(workspace.markup) == "1.25"
    assert workspace.billing_increment_micros == 50_000


@pytest.mark.parametrize("role", ROLES, ids=str)
def test_no_member_sets_the_plan_the_owner_included(role: Role) -> None:
    """A workspace's owner setting its markup would set the price they pay: the operator's."""
    world = World.build()
    actor = world.owner if role is Role.OWNER else world.member("someone", role)
    cmd = m.SetPlan(workspace_id=world.workspace_id, markup="0.000001", billing_increment="0.01")
    error = world.refuses(Forbidden, world.app.set_plan, cmd, actor)
    assert "operator" in error.message
    assert str(world.get(world.workspace_id).markup) == "5"


@pytest.mark.parametrize(("markup", "increment"), [("0", "0.25"), ("5", "0"), ("-1", "0.25")])
def test_plan_with_zero_markup_or_increment_is_refused(markup: str, increment: str) -> None:
    world = World.build()
    cmd = m.SetPlan(workspace_id=world.workspace_id, markup=markup, billing_increment=increment)
    world.refuses(ValidationFailed, world.app.set_plan, cmd, world.operator())


@pytest.mark.parametrize("increment", ["0.000001", "0.005", "0.255"])
def test_plan_with_an_increment_finer_than_a_cent_is_refused(increment: str) -> None:
    """Stripe bills whole cents: no invoice of the workspace could be issued with it."""
    world = World.build()
    cmd = m.SetPlan(workspace_id=world.workspace_id, markup="5", billing_increment=increment)
    world.refuses(ValidationFailed, world.app.set_plan, cmd, world.operator())


# -- projects -------------------------------------------------------------------------------------


def test_create_project_saves_a_board_in_the_callers_workspace() -> None:
    world = World.build()
    member = world.member("bob", Role.MEMBER)
    lanes = [m.LaneInput(name="Todo", wip_limit=3), m.LaneInput(name="Done")]
    result = world.app.create_project(
        m.CreateProject(workspace_id=world.workspace_id, name="Apollo", lanes=lanes), member
    )
    project = world.get(result.id)
    assert isinstance(project, Project)
    assert project.workspace_id == world.workspace_id
    assert [(lane.name, lane.wip_limit) for lane in project.lanes] == [("Todo", 3), ("Done", None)]


def test_project_with_duplicate_lanes_is_refused_and_writes_nothing() -> None:
    world = World.build()
    lanes = [m.LaneInput(name="A"), m.LaneInput(name="A")]
    cmd = m.CreateProject(workspace_id=world.workspace_id, name="P", lanes=lanes)
    world.refuses(Duplicate, world.app.create_project, cmd)


def test_results_report_the_new_version_and_global_position() -> None:
    world = World.build()
    before = position_of_log(world.app)
    result = world.app.rename_workspace(
        m.RenameWorkspace(workspace_id=world.workspace_id, name="New name"), world.owner
    )
    assert (result.kind, result.id, result.version) == ("workspace", world.workspace_id, 2)
    assert result.position == before + 1 == position_of_log(world.app)


def test_a_command_that_changes_nothing_writes_nothing() -> None:
    world = World.build()
    before = position_of_log(world.app)
    result = world.app.rename_workspace(
        m.RenameWorkspace(workspace_id=world.workspace_id, name="Acme"), world.owner
    )
    assert result.position == 0
    assert position_of_log(world.app) == before


def test_random_workspace_id_is_not_found() -> None:
    app = new_app()
    ghost: UUID = uuid4()
    actor = Actor(user_id="alice", workspace_id=str(ghost))
    cmd = m.RenameWorkspace(workspace_id=ghost, name="X")
    error = assert_refused(app, NotFound, lambda: app.rename_workspace(cmd, actor))
    assert str(ghost) in error.message
