"""The ``Mutation`` root: each mutation builds a command, hands it to the write side, and answers
with a payload whose object is read back from the read model once it includes the write.

No rule lives here: the handlers decide (roles from the workspace's membership, WIP limits,
transitions); a resolver names its command and handler and shapes what GraphQL spells
differently, and :func:`read_api.writes.perform` does the rest.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar
from uuid import UUID

import strawberry
from strawberry.dataloader import DataLoader

from commands import models as m
from commands.handlers import AgentWorks, CommandResult
from domain.errors import NotFound
from domain.money import format_usd
from domain.roles import Role
from projections.kanban import KanbanProjector
from projections.runs import RunsProjector
from read_api import fields as described
from read_api.consistency import ConsistencyToken
from read_api.context import Info
from read_api.db import ReadScope
from read_api.loaders import Loaders, forget
from read_api.scalars import Money
from read_api.types import ID, AgentRun, Card, Project, Workspace, parse_id
from read_api.writes import DEFAULT, perform

V = TypeVar("V")

#: The projectors whose tables a payload's object is read from.
_KANBAN = (KanbanProjector.name,)
_RUNS = (RunsProjector.name, KanbanProjector.name)


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
        # An earlier mutation of the same document may have read this workspace through these
        # loaders: what it cached (its members, its projects) is out of date now.
        for loader in (
            scope.loaders.workspace,
            scope.loaders.members,
            scope.loaders.projects_of_workspace,
        ):
            forget(loader, self.result.id)
        row = await scope.loaders.workspace.load(self.result.id)
        return None if row is None else Workspace.from_row(row, scope)


async def _written(
    info: Info,
    result: CommandResult,
    projectors: tuple[str, ...],
    loader: Callable[[Loaders], DataLoader[UUID, V | None]],
    *stale: Callable[[Loaders], DataLoader[UUID, Any]],
) -> tuple[ReadScope, V] | None:
    """The object a command wrote, read back from the caller's workspace once it is projected.

    ``loader`` (and the ``stale`` ones) pick DataLoaders of the request whose cached rows the
    write made out of date.
    """
    await _await_projection(info, result, projectors)
    scope = await info.context.member_scope_of(result.id)
    if scope is None:
        return None
    for pick in (loader, *stale):
        forget(pick(scope.loaders), result.id)
    row = await loader(scope.loaders).load(result.id)
    return None if row is None else (scope, row)


@strawberry.type
class ProjectPayload:
    consistency_token: str
    result: strawberry.Private[CommandResult]

    @strawberry.field
    async def project(self, info: Info) -> Project | None:
        found = await _written(info, self.result, _KANBAN, lambda x: x.project, lambda x: x.lanes)
        if found is None:
            return None
        # Pages of a lane's cards are cached by page, not by project: a card an earlier mutation
        # of the same document created or moved would be missing from what an earlier one read.
        found[0].loaders.lane_cards.clear_all()
        return Project.from_row(found[1], found[0])


@strawberry.type
class CardPayload:
    consistency_token: str
    result: strawberry.Private[CommandResult]

    @strawberry.field
    async def card(self, info: Info) -> Card | None:
        found = await _written(info, self.result, _KANBAN, lambda x: x.card)
        if found is None:
            return None
        # Pages of runs are cached by page, not by card: a run an earlier mutation of the same
        # document started would be missing from what an earlier one read.
        found[0].loaders.card_runs.clear_all()
        return Card.from_row(found[1], found[0])


@strawberry.type
class AgentRunPayload:
    consistency_token: str
    result: strawberry.Private[CommandResult]

    @strawberry.field
    async def run(self, info: Info) -> AgentRun | None:
        found = await _written(info, self.result, _RUNS, lambda x: x.run)
        return None if found is None else AgentRun.from_summary(found[1], found[0])


P = TypeVar("P", WorkspacePayload, ProjectPayload, CardPayload, AgentRunPayload)


def answer(payload: type[P], result: CommandResult) -> P:
    """The payload of a written object; its field reads the object back once projected."""
    return payload(consistency_token=result.consistency_token, result=result)


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
    role: Role
    command_id: ID | None = None


@strawberry.input
class ChangeRoleInput:
    workspace_id: ID
    user_id: ID
    role: Role
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
        result = await perform(info, AgentWorks.create_workspace, m.CreateWorkspace, input)
        info.context.grant(result.id)
        return answer(WorkspacePayload, result)

    @strawberry.mutation
    async def rename_workspace(self, info: Info, input: RenameWorkspaceInput) -> WorkspacePayload:
        result = await perform(info, AgentWorks.rename_workspace, m.RenameWorkspace, input)
        return answer(WorkspacePayload, result)

    @strawberry.mutation
    async def add_member(self, info: Info, input: AddMemberInput) -> WorkspacePayload:
        result = await perform(
            info, AgentWorks.add_member, m.AddMember, input,
            user_id=_user_id(input.user_id), role=input.role.value,
        )  # fmt: skip
        return answer(WorkspacePayload, result)

    @strawberry.mutation
    async def change_role(self, info: Info, input: ChangeRoleInput) -> WorkspacePayload:
        result = await perform(
            info, AgentWorks.change_role, m.ChangeRole, input,
            user_id=_user_id(input.user_id), role=input.role.value,
        )  # fmt: skip
        return answer(WorkspacePayload, result)

    @strawberry.mutation
    async def remove_member(self, info: Info, input: RemoveMemberInput) -> WorkspacePayload:
        result = await perform(
            info, AgentWorks.remove_member, m.RemoveMember, input, user_id=_user_id(input.user_id)
        )
        return answer(WorkspacePayload, result)

    @strawberry.mutation
    async def set_spend_limit(self, info: Info, input: SetSpendLimitInput) -> WorkspacePayload:
        result = await perform(
            info, AgentWorks.set_spend_limit, m.SetSpendLimit, input,
            monthly_limit=_money_text(input.monthly_limit),
        )  # fmt: skip
        return answer(WorkspacePayload, result)

    # -- projects and boards --

    @strawberry.mutation
    async def create_project(self, info: Info, input: CreateProjectInput) -> ProjectPayload:
        lanes = (
            DEFAULT
            if input.lanes is None
            else [{"name": x.name, "wip_limit": x.wip_limit} for x in input.lanes]
        )
        result = await perform(info, AgentWorks.create_project, m.CreateProject, input, lanes=lanes)
        return answer(ProjectPayload, result)

    @strawberry.mutation
    async def set_wip_limit(self, info: Info, input: SetWipLimitInput) -> ProjectPayload:
        result = await perform(info, AgentWorks.set_wip_limit, m.SetWipLimit, input)
        return answer(ProjectPayload, result)

    @strawberry.mutation
    async def add_lane(self, info: Info, input: AddLaneInput) -> ProjectPayload:
        result = await perform(info, AgentWorks.add_lane, m.AddLane, input)
        return answer(ProjectPayload, result)

    @strawberry.mutation
    async def rename_lane(self, info: Info, input: RenameLaneInput) -> ProjectPayload:
        result = await perform(info, AgentWorks.rename_lane, m.RenameLane, input)
        return answer(ProjectPayload, result)

    @strawberry.mutation
    async def reorder_lanes(self, info: Info, input: ReorderLanesInput) -> ProjectPayload:
        result = await perform(info, AgentWorks.reorder_lanes, m.ReorderLanes, input)
        return answer(ProjectPayload, result)

    @strawberry.mutation
    async def remove_lane(self, info: Info, input: RemoveLaneInput) -> ProjectPayload:
        result = await perform(info, AgentWorks.remove_lane, m.RemoveLane, input)
        return answer(ProjectPayload, result)

    @strawberry.mutation
    async def archive_project(self, info: Info, input: ArchiveProjectInput) -> ProjectPayload:
        result = await perform(info, AgentWorks.archive_project, m.ArchiveProject, input)
        return answer(ProjectPayload, result)

    # -- cards --

    @strawberry.mutation
    async def create_card(self, info: Info, input: CreateCardInput) -> CardPayload:
        result = await perform(info, AgentWorks.create_card, m.CreateCard, input)
        return answer(CardPayload, result)

    @strawberry.mutation
    async def update_card(self, info: Info, input: UpdateCardInput) -> CardPayload:
        result = await perform(info, AgentWorks.update_card, m.UpdateCard, input)
        return answer(CardPayload, result)

    @described.mutation("Move a card into toLane between two neighbours.")
    async def move_card(self, info: Info, input: MoveCardInput) -> CardPayload:
        result = await perform(info, AgentWorks.move_card, m.MoveCard, input)
        return answer(CardPayload, result)

    @strawberry.mutation
    async def assign_card(self, info: Info, input: AssignCardInput) -> CardPayload:
        assignee = None if input.assignee is None else _user_id(input.assignee, "assignee")
        result = await perform(info, AgentWorks.assign_card, m.AssignCard, input, assignee=assignee)
        return answer(CardPayload, result)

    @strawberry.mutation
    async def archive_card(self, info: Info, input: ArchiveCardInput) -> CardPayload:
        result = await perform(info, AgentWorks.archive_card, m.ArchiveCard, input)
        return answer(CardPayload, result)

    @strawberry.mutation
    async def restore_card(self, info: Info, input: RestoreCardInput) -> CardPayload:
        result = await perform(info, AgentWorks.restore_card, m.RestoreCard, input)
        return answer(CardPayload, result)

    @strawberry.mutation
    async def block_card(self, info: Info, input: BlockCardInput) -> CardPayload:
        result = await perform(info, AgentWorks.block_card, m.BlockCard, input)
        return answer(CardPayload, result)

    @strawberry.mutation
    async def unblock_card(self, info: Info, input: UnblockCardInput) -> CardPayload:
        result = await perform(info, AgentWorks.unblock_card, m.UnblockCard, input)
        return answer(CardPayload, result)

    # -- agent runs --

    @described.mutation(
        "Request an agent run on a card; it stays QUEUED until an orchestrator picks it up."
    )
    async def start_agent_run(self, info: Info, input: StartAgentRunInput) -> AgentRunPayload:
        result = await perform(
            info, AgentWorks.start_agent_run, m.StartAgentRun, input,
            max_cost=_money_text(input.max_cost),
        )  # fmt: skip
        return answer(AgentRunPayload, result)

    @strawberry.mutation
    async def cancel_agent_run(self, info: Info, input: CancelAgentRunInput) -> AgentRunPayload:
        reason = DEFAULT if input.reason is None else input.reason
        result = await perform(
            info, AgentWorks.cancel_agent_run, m.CancelAgentRun, input, reason=reason
        )
        return answer(AgentRunPayload, result)


__all__ = ["Mutation"]
