"""Workspace commands: creating a tenant, its members and their roles, its plan and spend limit."""

from __future__ import annotations

from uuid import uuid4

from commands import models as m
from commands.service import BOOTSTRAP_SCOPE, USER_SCOPE, Actor, CommandResult, Decision, WriteSide
from domain.errors import Forbidden
from domain.meta import EventMeta
from domain.money import parse_markup, parse_usd
from domain.roles import Role
from domain.workspace import Workspace


class WorkspaceCommands(WriteSide):
    """Commands on a :class:`~domain.workspace.Workspace`."""

    def create_workspace(self, cmd: m.CreateWorkspace, actor: Actor) -> CommandResult:
        if actor.workspace_id not in (BOOTSTRAP_SCOPE, USER_SCOPE):
            # Credentials for one workspace are a tenant's; they must not mint new tenants.
            raise Forbidden(
                "credentials for a workspace cannot create workspaces; "
                "use a bootstrap token (agentworks token --bootstrap)",
                user_id=actor.user_id,
            )

        def decide(meta: EventMeta) -> Decision:
            workspace_id = uuid4()
            workspace = Workspace.create(
                workspace_id=workspace_id,
                name=cmd.name,
                owner_id=actor.user_id,
                meta=meta.in_workspace(workspace_id),
            )
            return Decision(workspace, "workspace", [workspace])

        return self.execute(cmd, actor, None, decide)

    def rename_workspace(self, cmd: m.RenameWorkspace, actor: Actor) -> CommandResult:
        def decide(meta: EventMeta) -> Decision:
            workspace = self.workspace_for(actor, cmd.workspace_id, Role.ADMIN, "rename workspace")
            workspace.rename(cmd.name, meta=meta)
            return Decision(workspace, "workspace", [workspace])

        return self.execute(cmd, actor, cmd.workspace_id, decide)

    def add_member(self, cmd: m.AddMember, actor: Actor) -> CommandResult:
        def decide(meta: EventMeta) -> Decision:
            workspace = self.workspace_for(actor, cmd.workspace_id, Role.ADMIN, "addMember")
            role = Role.parse(cmd.role)
            self.may_grant(workspace, actor, role)
            workspace.add_member(cmd.user_id, role, meta=meta)
            return Decision(workspace, "workspace", [workspace])

        return self.execute(cmd, actor, cmd.workspace_id, decide)

    def change_role(self, cmd: m.ChangeRole, actor: Actor) -> CommandResult:
        def decide(meta: EventMeta) -> Decision:
            workspace = self.workspace_for(actor, cmd.workspace_id, Role.ADMIN, "changeRole")
            role = Role.parse(cmd.role)
            self.may_grant(workspace, actor, role)
            if workspace.role_of(cmd.user_id) is Role.OWNER:
                self.may_grant(workspace, actor, Role.OWNER)
            workspace.change_role(cmd.user_id, role, meta=meta)
            return Decision(workspace, "workspace", [workspace])

        return self.execute(cmd, actor, cmd.workspace_id, decide)

    def remove_member(self, cmd: m.RemoveMember, actor: Actor) -> CommandResult:
        def decide(meta: EventMeta) -> Decision:
            workspace = self.workspace_for(actor, cmd.workspace_id, Role.ADMIN, "removeMember")
            if workspace.role_of(cmd.user_id) is Role.OWNER:
                self.may_grant(workspace, actor, Role.OWNER)
            workspace.remove_member(cmd.user_id, meta=meta)
            return Decision(workspace, "workspace", [workspace])

        return self.execute(cmd, actor, cmd.workspace_id, decide)

    def set_spend_limit(self, cmd: m.SetSpendLimit, actor: Actor) -> CommandResult:
        def decide(meta: EventMeta) -> Decision:
            workspace = self.workspace_for(actor, cmd.workspace_id, Role.ADMIN, "setSpendLimit")
            limit = None if cmd.monthly_limit is None else parse_usd(cmd.monthly_limit)
            workspace.set_spend_limit(limit, meta=meta)
            return Decision(workspace, "workspace", [workspace])

        return self.execute(cmd, actor, cmd.workspace_id, decide)

    def set_plan(self, cmd: m.SetPlan, actor: Actor) -> CommandResult:
        def decide(meta: EventMeta) -> Decision:
            workspace = self.workspace_for(actor, cmd.workspace_id, Role.OWNER, "setPlan")
            markup = parse_markup(cmd.markup)
            increment = parse_usd(cmd.billing_increment)
            workspace.set_plan(markup=markup, billing_increment_micros=increment, meta=meta)
            return Decision(workspace, "workspace", [workspace])

        return self.execute(cmd, actor, cmd.workspace_id, decide)
