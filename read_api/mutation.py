"""The ``Mutation`` root: each mutation builds a command, hands it to the write side, and answers
with a payload whose object is read back from the read model once it includes the write.

No rule lives here: the handlers decide (roles from the workspace's membership, WIP limits,
transitions); this module parses input, picks the handler and maps nothing but shapes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import pydantic
import strawberry

from commands import models as m
from commands.handlers import Actor, CommandResult
from domain.errors import NotFound, ValidationFailed
from domain.money import format_usd
from projections.kanban import KanbanProjector
from projections.runs import RunsProjector
from read_api import fields as described
from read_api.consistency import ConsistencyToken
from read_api.context import Info
from read_api.db import ReadScope
from read_api.errors import describe_validation_error
from read_api.loaders import Row, forget
from read_api.scalars import Money
from read_api.types import ID, AgentRun, Card, Project, RoleEnum, Workspace, parse_id

C = TypeVar("C", bound=m.Command)

#: The projectors whose tables a payload's object is read from.
_KANBAN = (KanbanProjector.name,)
_RUNS = (RunsProjector.name, KanbanProjector.name)


def _command(kind: type[C], /, **fields: object) -> C:
    try:
        return kind(**fields)
    except pydantic.ValidationError as error:
        raise ValidationFailed(describe_validation_error(error)) from error


async def _execute(
    info: Info, handler: Callable[[C, Actor], CommandResult], command: C
) -> CommandResult:
    ctx = info.context
    return await ctx.offload(handler, command, ctx.actor())


async def _await_projection(info: Info, result: CommandResult, projectors: tuple[str, ...]) -> None:
    waiter = info.context.runtime.waiter
    token = ConsistencyToken(result.position, result.id, result.version)
    if not await waiter.wait_for(token, waiter.projectors_for(projectors)):
        info.context.stale = True


def _user_id(value: str, what: str = "userId") -> str:
    """A user id argument: a UUID (API.md), in the canonical form tokens and members use."""
    return str(parse_id(value, what))


def _money_text(value: Money | None) -> str | None:
    return None if value is None else format_usd(value)


# -- payloads -------------------------------------------------------------------------------------


@strawberry.type
class WorkspacePayload:
    consistency_token: str
    result: strawberry.Private[CommandResult]

    @strawberry.field
    async def workspace(self, info: Info) -> Workspace | None:
        await _await_projection(info, self.result, _KANBAN)
        try:
            scope = info.context.scope_for(self.result.id)
            if not await scope.is_member():
                return None
        except NotFound:
            return None
        forget(scope.loaders.workspace, self.result.id)
        row = await scope.loaders.workspace.load(self.result.id)
        return None if row is None else Workspace.from_row(row, scope)


async def _written(
    info: Info, result: CommandResult, projectors: tuple[str, ...], loader: str, *stale: str
) -> tuple[ReadScope, Row] | None:
    """The object a command wrote, read back from the caller's workspace once it is projected.

    ``loader`` (and the ``stale`` ones) are DataLoaders of the request whose cached rows the
    write made out of date.
    """
    await _await_projection(info, result, projectors)
    scope = await info.context.scope_of(result.id)
    if scope is None or not await scope.is_member():
        return None
    for name in (loader, *stale):
        forget(getattr(scope.loaders, name), result.id)
    row = await getattr(scope.loaders, loader).load(result.id)
    return None if row is None else (scope, row)


@strawberry.type
class ProjectPayload:
    consistency_token: str
    result: strawberry.Private[CommandResult]

    @strawberry.field
    async def project(self, info: Info) -> Project | None:
        found = await _written(info, self.result, _KANBAN, "project", "lanes")
        return None if found is None else Project.from_row(found[1], found[0])


@strawberry.type
class CardPayload:
    consistency_token: str
    result: strawberry.Private[CommandResult]

    @strawberry.field
    async def card(self, info: Info) -> Card | None:
        found = await _written(info, self.result, _KANBAN, "card")
        return None if found is None else Card.from_row(found[1], found[0])


@strawberry.type
class AgentRunPayload:
    consistency_token: str
    result: strawberry.Private[CommandResult]

    @strawberry.field
    async def run(self, info: Info) -> AgentRun | None:
        found = await _written(info, self.result, _RUNS, "run")
        return None if found is None else AgentRun.from_row(found[1])


def _workspace_payload(result: CommandResult) -> WorkspacePayload:
    return WorkspacePayload(consistency_token=result.consistency_token, result=result)


def _project_payload(result: CommandResult) -> ProjectPayload:
    return ProjectPayload(consistency_token=result.consistency_token, result=result)


def _card_payload(result: CommandResult) -> CardPayload:
    return CardPayload(consistency_token=result.consistency_token, result=result)


def _run_payload(result: CommandResult) -> AgentRunPayload:
    return AgentRunPayload(consistency_token=result.consistency_token, result=result)


# -- inputs ---------------------------------------------------------------------------------------


@strawberry.input
class CreateWorkspaceInput:
    name: str
    command_id: ID | None = None


@strawberry.input
class RenameWorkspaceInput:
    workspace_id: ID
    name: str
    command_id: ID | None = None


@strawberry.input
class AddMemberInput:
    workspace_id: ID
    user_id: ID
    role: RoleEnum
    command_id: ID | None = None


@strawberry.input
class ChangeRoleInput:
    workspace_id: ID
    user_id: ID
    role: RoleEnum
    command_id: ID | None = None


@strawberry.input
class RemoveMemberInput:
    workspace_id: ID
    user_id: ID
    command_id: ID | None = None


@strawberry.input
class SetSpendLimitInput:
    workspace_id: ID
    monthly_limit: Money | None = strawberry.field(
        default=None, description="USD per calendar month; null removes the limit."
    )
    command_id: ID | None = None


@strawberry.input
class SetPlanInput:
    workspace_id: ID
    markup: str = strawberry.field(description='Multiplier of provider cost, e.g. "5".')
    billing_increment: Money
    command_id: ID | None = None


@strawberry.input
class LaneInput:
    name: str
    wip_limit: int | None = None


@strawberry.input
class CreateProjectInput:
    workspace_id: ID
    name: str
    lanes: list[LaneInput] | None = strawberry.field(
        default=None, description="Defaults to Backlog, In progress, Review, Done."
    )
    command_id: ID | None = None


@strawberry.input
class SetWipLimitInput:
    project_id: ID
    lane: str
    wip_limit: int | None = strawberry.field(default=None, description="null = no limit")
    command_id: ID | None = None


@strawberry.input
class AddLaneInput:
    project_id: ID
    name: str
    wip_limit: int | None = None
    index: int | None = None
    command_id: ID | None = None


@strawberry.input
class RenameLaneInput:
    project_id: ID
    lane: str
    name: str
    command_id: ID | None = None


@strawberry.input
class ReorderLanesInput:
    project_id: ID
    order: list[str]
    command_id: ID | None = None


@strawberry.input
class RemoveLaneInput:
    project_id: ID
    lane: str
    command_id: ID | None = None


@strawberry.input
class ArchiveProjectInput:
    project_id: ID
    command_id: ID | None = None


@strawberry.input
class CreateCardInput:
    project_id: ID
    title: str
    description: str = ""
    lane: str | None = strawberry.field(default=None, description="Defaults to the first lane.")
    command_id: ID | None = None


@strawberry.input
class UpdateCardInput:
    card_id: ID
    title: str | None = None
    description: str | None = None
    labels: list[str] | None = strawberry.field(
        default=None, description="The complete new set of labels; null leaves them as they are."
    )
    expected_version: int | None = None
    command_id: ID | None = None


@strawberry.input
class MoveCardInput:
    card_id: ID
    to_lane: str
    before_card_id: ID | None = None
    after_card_id: ID | None = None
    expected_version: int | None = None
    command_id: ID | None = None


@strawberry.input
class AssignCardInput:
    card_id: ID
    assignee: ID | None = strawberry.field(default=None, description="null unassigns.")
    expected_version: int | None = None
    command_id: ID | None = None


@strawberry.input
class ArchiveCardInput:
    card_id: ID
    expected_version: int | None = None
    command_id: ID | None = None


@strawberry.input
class RestoreCardInput:
    card_id: ID
    lane: str | None = None
    command_id: ID | None = None


@strawberry.input
class BlockCardInput:
    card_id: ID
    reason: str
    command_id: ID | None = None


@strawberry.input
class UnblockCardInput:
    card_id: ID
    command_id: ID | None = None


@strawberry.input
class StartAgentRunInput:
    card_id: ID
    agent: str
    provider: str | None = None
    model: str | None = None
    max_cost: Money | None = strawberry.field(default=None, description="Budget of the run.")
    command_id: ID | None = None
    policy: str | None = strawberry.field(
        default=None, description="cheapest (default), fastest or pinned."
    )


@strawberry.input
class CancelAgentRunInput:
    run_id: ID
    reason: str | None = None
    command_id: ID | None = None


# -- the root -------------------------------------------------------------------------------------


@strawberry.type
class Mutation:
    # -- workspaces --

    @described.mutation("Create a workspace; the caller becomes its OWNER.")
    async def create_workspace(self, info: Info, input: CreateWorkspaceInput) -> WorkspacePayload:
        command = _command(m.CreateWorkspace, name=input.name, command_id=input.command_id)
        result = await _execute(info, info.context.runtime.services.write.create_workspace, command)
        info.context.grant(result.id)
        return _workspace_payload(result)

    @strawberry.mutation
    async def rename_workspace(self, info: Info, input: RenameWorkspaceInput) -> WorkspacePayload:
        command = _command(
            m.RenameWorkspace,
            workspace_id=input.workspace_id,
            name=input.name,
            command_id=input.command_id,
        )
        write = info.context.runtime.services.write
        return _workspace_payload(await _execute(info, write.rename_workspace, command))

    @strawberry.mutation
    async def add_member(self, info: Info, input: AddMemberInput) -> WorkspacePayload:
        command = _command(
            m.AddMember,
            workspace_id=input.workspace_id,
            user_id=_user_id(input.user_id),
            role=input.role.value,
            command_id=input.command_id,
        )
        write = info.context.runtime.services.write
        return _workspace_payload(await _execute(info, write.add_member, command))

    @strawberry.mutation
    async def change_role(self, info: Info, input: ChangeRoleInput) -> WorkspacePayload:
        command = _command(
            m.ChangeRole,
            workspace_id=input.workspace_id,
            user_id=_user_id(input.user_id),
            role=input.role.value,
            command_id=input.command_id,
        )
        write = info.context.runtime.services.write
        return _workspace_payload(await _execute(info, write.change_role, command))

    @strawberry.mutation
    async def remove_member(self, info: Info, input: RemoveMemberInput) -> WorkspacePayload:
        command = _command(
            m.RemoveMember,
            workspace_id=input.workspace_id,
            user_id=_user_id(input.user_id),
            command_id=input.command_id,
        )
        write = info.context.runtime.services.write
        return _workspace_payload(await _execute(info, write.remove_member, command))

    @strawberry.mutation
    async def set_spend_limit(self, info: Info, input: SetSpendLimitInput) -> WorkspacePayload:
        command = _command(
            m.SetSpendLimit,
            workspace_id=input.workspace_id,
            monthly_limit=_money_text(input.monthly_limit),
            command_id=input.command_id,
        )
        write = info.context.runtime.services.write
        return _workspace_payload(await _execute(info, write.set_spend_limit, command))

    @described.mutation("Set markup and billing increment (OWNER only).")
    async def set_plan(self, info: Info, input: SetPlanInput) -> WorkspacePayload:
        command = _command(
            m.SetPlan,
            workspace_id=input.workspace_id,
            markup=input.markup,
            billing_increment=format_usd(input.billing_increment),
            command_id=input.command_id,
        )
        write = info.context.runtime.services.write
        return _workspace_payload(await _execute(info, write.set_plan, command))

    # -- projects and boards --

    @strawberry.mutation
    async def create_project(self, info: Info, input: CreateProjectInput) -> ProjectPayload:
        fields: dict[str, object] = {
            "workspace_id": input.workspace_id,
            "name": input.name,
            "command_id": input.command_id,
        }
        if input.lanes is not None:
            fields["lanes"] = [{"name": x.name, "wip_limit": x.wip_limit} for x in input.lanes]
        command = _command(m.CreateProject, **fields)
        write = info.context.runtime.services.write
        return _project_payload(await _execute(info, write.create_project, command))

    @strawberry.mutation
    async def set_wip_limit(self, info: Info, input: SetWipLimitInput) -> ProjectPayload:
        command = _command(
            m.SetWipLimit,
            project_id=input.project_id,
            lane=input.lane,
            wip_limit=input.wip_limit,
            command_id=input.command_id,
        )
        write = info.context.runtime.services.write
        return _project_payload(await _execute(info, write.set_wip_limit, command))

    @strawberry.mutation
    async def add_lane(self, info: Info, input: AddLaneInput) -> ProjectPayload:
        command = _command(
            m.AddLane,
            project_id=input.project_id,
            name=input.name,
            wip_limit=input.wip_limit,
            index=input.index,
            command_id=input.command_id,
        )
        write = info.context.runtime.services.write
        return _project_payload(await _execute(info, write.add_lane, command))

    @strawberry.mutation
    async def rename_lane(self, info: Info, input: RenameLaneInput) -> ProjectPayload:
        command = _command(
            m.RenameLane,
            project_id=input.project_id,
            lane=input.lane,
            name=input.name,
            command_id=input.command_id,
        )
        write = info.context.runtime.services.write
        return _project_payload(await _execute(info, write.rename_lane, command))

    @strawberry.mutation
    async def reorder_lanes(self, info: Info, input: ReorderLanesInput) -> ProjectPayload:
        command = _command(
            m.ReorderLanes,
            project_id=input.project_id,
            order=input.order,
            command_id=input.command_id,
        )
        write = info.context.runtime.services.write
        return _project_payload(await _execute(info, write.reorder_lanes, command))

    @strawberry.mutation
    async def remove_lane(self, info: Info, input: RemoveLaneInput) -> ProjectPayload:
        command = _command(
            m.RemoveLane, project_id=input.project_id, lane=input.lane, command_id=input.command_id
        )
        write = info.context.runtime.services.write
        return _project_payload(await _execute(info, write.remove_lane, command))

    @strawberry.mutation
    async def archive_project(self, info: Info, input: ArchiveProjectInput) -> ProjectPayload:
        command = _command(
            m.ArchiveProject, project_id=input.project_id, command_id=input.command_id
        )
        write = info.context.runtime.services.write
        return _project_payload(await _execute(info, write.archive_project, command))

    # -- cards --

    @strawberry.mutation
    async def create_card(self, info: Info, input: CreateCardInput) -> CardPayload:
        command = _command(
            m.CreateCard,
            project_id=input.project_id,
            title=input.title,
            description=input.description,
            lane=input.lane,
            command_id=input.command_id,
        )
        write = info.context.runtime.services.write
        return _card_payload(await _execute(info, write.create_card, command))

    @strawberry.mutation
    async def update_card(self, info: Info, input: UpdateCardInput) -> CardPayload:
        command = _command(
            m.UpdateCard,
            card_id=input.card_id,
            title=input.title,
            description=input.description,
            labels=input.labels,
            expected_version=input.expected_version,
            command_id=input.command_id,
        )
        write = info.context.runtime.services.write
        return _card_payload(await _execute(info, write.update_card, command))

    @described.mutation("Move a card into toLane between two neighbours.")
    async def move_card(self, info: Info, input: MoveCardInput) -> CardPayload:
        command = _command(
            m.MoveCard,
            card_id=input.card_id,
            to_lane=input.to_lane,
            before_card_id=input.before_card_id,
            after_card_id=input.after_card_id,
            expected_version=input.expected_version,
            command_id=input.command_id,
        )
        write = info.context.runtime.services.write
        return _card_payload(await _execute(info, write.move_card, command))

    @strawberry.mutation
    async def assign_card(self, info: Info, input: AssignCardInput) -> CardPayload:
        command = _command(
            m.AssignCard,
            card_id=input.card_id,
            assignee=None if input.assignee is None else _user_id(input.assignee, "assignee"),
            expected_version=input.expected_version,
            command_id=input.command_id,
        )
        write = info.context.runtime.services.write
        return _card_payload(await _execute(info, write.assign_card, command))

    @strawberry.mutation
    async def archive_card(self, info: Info, input: ArchiveCardInput) -> CardPayload:
        command = _command(
            m.ArchiveCard,
            card_id=input.card_id,
            expected_version=input.expected_version,
            command_id=input.command_id,
        )
        write = info.context.runtime.services.write
        return _card_payload(await _execute(info, write.archive_card, command))

    @strawberry.mutation
    async def restore_card(self, info: Info, input: RestoreCardInput) -> CardPayload:
        command = _command(
            m.RestoreCard, card_id=input.card_id, lane=input.lane, command_id=input.command_id
        )
        write = info.context.runtime.services.write
        return _card_payload(await _execute(info, write.restore_card, command))

    @strawberry.mutation
    async def block_card(self, info: Info, input: BlockCardInput) -> CardPayload:
        command = _command(
            m.BlockCard, card_id=input.card_id, reason=input.reason, command_id=input.command_id
        )
        write = info.context.runtime.services.write
        return _card_payload(await _execute(info, write.block_card, command))

    @strawberry.mutation
    async def unblock_card(self, info: Info, input: UnblockCardInput) -> CardPayload:
        command = _command(m.UnblockCard, card_id=input.card_id, command_id=input.command_id)
        write = info.context.runtime.services.write
        return _card_payload(await _execute(info, write.unblock_card, command))

    # -- agent runs --

    @described.mutation(
        "Request an agent run on a card; it stays QUEUED until an orchestrator picks it up."
    )
    async def start_agent_run(self, info: Info, input: StartAgentRunInput) -> AgentRunPayload:
        command = _command(
            m.StartAgentRun,
            card_id=input.card_id,
            agent=input.agent,
            provider=input.provider,
            model=input.model,
            max_cost=_money_text(input.max_cost),
            command_id=input.command_id,
            policy=input.policy,
        )
        write = info.context.runtime.services.write
        return _run_payload(await _execute(info, write.start_agent_run, command))

    @strawberry.mutation
    async def cancel_agent_run(self, info: Info, input: CancelAgentRunInput) -> AgentRunPayload:
        fields: dict[str, object] = {"run_id": input.run_id, "command_id": input.command_id}
        if input.reason is not None:
            fields["reason"] = input.reason
        command = _command(m.CancelAgentRun, **fields)
        write = info.context.runtime.services.write
        return _run_payload(await _execute(info, write.cancel_agent_run, command))


__all__ = ["Mutation"]
