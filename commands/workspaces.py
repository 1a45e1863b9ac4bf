"""Workspace commands: creating a tenant, its members and their roles, its plan and spend limit."""

from __future__ import annotations

from collections.abc import Callable
from uuid import UUID, uuid4

from commands import models as m
from commands.service import BOOTSTRAP_SCOPE, USER_SCOPE, Actor, CommandResult, Decision, WriteSide
from domain.billing import whole_cents
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
        return self._change_workspace(
            cmd, actor, cmd.workspace_id, Role.ADMIN, "rename workspace",
            lambda workspace, meta: workspace.rename(cmd.name, meta=meta),
        )  # fmt: skip

    def add_member(self, cmd: m.AddMember, actor: Actor) -> CommandResult:
        def add(workspace: Workspace, meta: EventMeta) -> None:
            role = Role.parse(cmd.role)
            self.may_grant(workspace, actor, role)
            workspace.add_member(cmd.user_id, role, meta=meta)

        return self._change_workspace(cmd, actor, cmd.workspace_id, Role.ADMIN, "addMember", add)

    def change_role(self, cmd: m.ChangeRole, actor: Actor) -> CommandResult:
        def change(workspace: Workspace, meta: EventMeta) -> None:
            role = Role.parse(cmd.role)
            self.may_grant(workspace, actor, role)
            if workspace.role_of(cmd.user_id) is Role.OWNER:
                self.may_grant(workspace, actor, Role.OWNER)
            workspace.change_role(cmd.user_id, role, meta=meta)

        return self._change_workspace(
            cmd, actor, cmd.workspace_id, Role.ADMIN, "changeRole", change
        )

    def remove_member(self, cmd: m.RemoveMember, actor: Actor) -> CommandResult:
        def remove(workspace: Workspace, meta: EventMeta) -> None:
            if workspace.role_of(cmd.user_id) is Role.OWNER:
                self.may_grant(workspace, actor, Role.OWNER)
            workspace.remove_member(cmd.user_id, meta=meta)

        return self._change_workspace(
            cmd, actor, cmd.workspace_id, Role.ADMIN, "removeMember", remove
        )

    def set_spend_limit(self, cmd: m.SetSpendLimit, actor: Actor) -> CommandResult:
        def set_limit(workspace: Workspace, meta: EventMeta) -> None:
            limit = None if cmd.monthly_limit is None else parse_usd(cmd.monthly_limit)
            workspace.set_spend_limit(limit, meta=meta)

        return self._change_workspace(
            cmd, actor, cmd.workspace_id, Role.ADMIN, "setSpendLimit", set_limit
        )

    def set_plan(self, cmd: m.SetPlan, actor: Actor) -> CommandResult:
        """The price a workspace pays is the operator's to set (``agentworks plan``): refused
        to every user, its owner included, who could otherwise bill themselves nothing."""
        if not actor.is_service:
            raise Forbidden(
                f"the plan of workspace {cmd.workspace_id} (markup and billing increment) is set "
                "by the operator, not by its members"
            )

        def set_plan(workspace: Workspace, meta: EventMeta) -> None:
            markup = parse_markup(cmd.markup)
            increment = parse_usd(cmd.billing_increment, what="billing increment")
            # Stripe bills whole cents: a finer increment would leave every invoice of the
            # workspace unissuable (Invoice.draft refuses its lines).
            whole_cents(increment)
            workspace.set_plan(markup=markup, billing_increment_micros=increment, meta=meta)

        return self._change_workspace(cmd, actor, cmd.workspace_id, Role.OWNER, "setPlan", set_plan)

    def _change_workspace(
        self,
        cmd: m.Command,
        actor: Actor,
        workspace_id: UUID,
        needed: Role,
        action: str,
        change: Callable[[Workspace, EventMeta], object],
    ) -> CommandResult:
        """A change of the workspace alone, by an actor holding ``needed`` in it (a service
        needs no role); the workspace is saved alone."""

        def decide(meta: EventMeta) -> Decision:
            workspace = self.workspace_for(actor, workspace_id, needed, action)
            change(workspace, meta)
            return Decision(workspace, "workspace", [workspace])

        return self.execute(cmd, actor, workspace_id, decide)
