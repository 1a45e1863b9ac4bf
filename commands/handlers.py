"""The write-side application service: one method per command, one ``save()`` per command.

Each handler loads what the command touches, checks the actor may do it, lets the aggregates
decide, and saves every changed aggregate in one transaction together with the command's
idempotency record. A concurrent write to any of them makes the save collide on a version; the
handler then reloads and decides again, a bounded number of times.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, ClassVar, Protocol, TypeVar
from uuid import UUID, uuid4

from eventsourcing.application import AggregateNotFoundError, Application, ProcessingEvent
from eventsourcing.domain import Aggregate

from commands import models as m
from commands.idempotency import fingerprint
from domain.agent_run import AgentRun
from domain.agents import agent_named, prompt_floor_micros
from domain.billing import next_month
from domain.card import Card
from domain.errors import (
    AgentWorksError,
    BudgetExceeded,
    Conflict,
    DuplicateCommand,
    Forbidden,
    InvalidTransition,
    NotFound,
    Unauthenticated,
    Unavailable,
    ValidationFailed,
)
from domain.idempotency import CommandLog, CommandRecord
from domain.meta import EventMeta
from domain.money import billed_amount, format_usd, parse_markup, parse_usd
from domain.pricing import PriceTable, built_in_price_table
from domain.project import LaneSpec, Project
from domain.roles import Role, capped, require_role
from domain.routing import validate_choice
from domain.usage import MonthlySpend, UsageCharge, month_of, spend_id_for
from domain.workspace import Workspace

BOOTSTRAP_SCOPE = "*"
#: ``Actor.workspace_id`` of a user token: no workspace claim, membership decides everywhere.
USER_SCOPE = ""

log = logging.getLogger(__name__)


class CommandObserver(Protocol):
    """Wraps each command (timing, tracing); yields the ``traceparent`` its events carry."""

    def __call__(self, command_type: str, traceparent: str) -> AbstractContextManager[str]: ...


def _unobserved(command_type: str, traceparent: str) -> AbstractContextManager[str]:
    return nullcontext(traceparent)


A = TypeVar("A", bound=Aggregate)


@dataclass(frozen=True, kw_only=True)
class Actor:
    """Who sends a command, as their credentials say.

    ``workspace_id`` is the workspace the credentials are for (``"*"`` for a bootstrap token).
    ``role`` is the credentials' role claim: a ceiling on the user's membership role, checked
    against the workspace's members on every command (``None``: no claim, the membership alone
    decides). A service actor (the orchestrator) acts inside its workspace without being a member.
    """

    user_id: str
    workspace_id: str
    role: Role | None = None
    is_service: bool = False
    correlation_id: str | None = None
    causation_id: str | None = None
    traceparent: str = ""

    @classmethod
    def service(cls, name: str, workspace_id: UUID | str, **kwargs: Any) -> Actor:
        return cls(user_id=name, workspace_id=str(workspace_id), is_service=True, **kwargs)


@dataclass(frozen=True, kw_only=True)
class CommandResult:
    """What a command did: the object it touched, its new version and where its events landed.

    ``position`` is the highest global position the command wrote (0 when it changed nothing);
    a read that waits until the read models reached it sees the command's effect.
    """

    kind: str
    id: UUID
    version: int
    position: int
    replayed: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def consistency_token(self) -> str:
        """``position:aggregate id:version``: enough for a reader to wait for this write.

        On the embedded path projectors apply the log in order, so the position alone tells; through
        Kafka partitions a projector may pass a position before an earlier one arrives, so readers
        check the aggregate's version in the projector's tracking instead.
        """
        return f"{self.position}:{self.id}:{self.version}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "id": str(self.id),
            "version": self.version,
            "position": self.position,
            "extra": self.extra,
        }

    @classmethod
    def from_stored(cls, data: dict[str, Any]) -> CommandResult:
        return cls(
            kind=str(data["kind"]),
            id=UUID(str(data["id"])),
            version=int(data["version"]),
            position=int(data["position"]),
            replayed=True,
            extra=dict(data.get("extra") or {}),
        )


@dataclass(frozen=True, kw_only=True)
class RunBudget:
    """A run's room to spend, in billed micro-USD (``None``: no limit)."""

    markup: Decimal
    run_billed_micros: int
    run_max_micros: int | None
    month_spent_micros: int
    month_limit_micros: int | None

    def room_micros(self, *, reserved_elsewhere: int = 0) -> int | None:
        rooms = []
        if self.run_max_micros is not None:
            rooms.append(self.run_max_micros - self.run_billed_micros)
        if self.month_limit_micros is not None:
            rooms.append(self.month_limit_micros - self.month_spent_micros - reserved_elsewhere)
        return min(rooms) if rooms else None


@dataclass
class Decision:
    """What one attempt at a command decided: the aggregates to save and the one it reports."""

    target: Aggregate
    kind: str
    changed: list[Aggregate]
    extra: dict[str, Any] = field(default_factory=dict)


class AgentWorks(Application[UUID]):
    """The AgentWorks write side (one bounded context, one event store)."""

    name = "AgentWorks"
    # Cards are read at any past version for history and audit; a snapshot every 100 events
    # bounds that to at most 99 events replayed. (Other aggregates hold enums and dataclasses
    # the JSON transcoder does not round-trip, and are read at their latest version.)
    snapshotting_intervals: ClassVar[dict[type[Any], int]] = {Card: 100}

    def __init__(
        self,
        env: dict[str, str] | None = None,
        *,
        command_log: CommandLog | None = None,
        retries: int = 5,
        observe: CommandObserver = _unobserved,
        prices: PriceTable | None = None,
        settle_seconds: float = 5.0,
    ) -> None:
        super().__init__(env)
        self.prices = prices or built_in_price_table()
        self.command_log = command_log
        self.retries = retries
        self.observe = observe
        self.settle_seconds = settle_seconds
        """How long a write whose commit was interrupted waits for the database to say whether
        it committed, before answering UNAVAILABLE with ``outcome="unknown"``."""
        self.settle_poll_seconds = 0.1

    # -- workspaces ---------------------------------------------------------------------------

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

        return self._execute(cmd, actor, None, decide)

    def rename_workspace(self, cmd: m.RenameWorkspace, actor: Actor) -> CommandResult:
        def decide(meta: EventMeta) -> Decision:
            workspace = self._workspace_for(actor, cmd.workspace_id, Role.ADMIN, "rename workspace")
            workspace.rename(cmd.name, meta=meta)
            return Decision(workspace, "workspace", [workspace])

        return self._execute(cmd, actor, cmd.workspace_id, decide)

    def add_member(self, cmd: m.AddMember, actor: Actor) -> CommandResult:
        def decide(meta: EventMeta) -> Decision:
            workspace = self._workspace_for(actor, cmd.workspace_id, Role.ADMIN, "addMember")
            role = Role.parse(cmd.role)
            self._may_grant(workspace, actor, role)
            workspace.add_member(cmd.user_id, role, meta=meta)
            return Decision(workspace, "workspace", [workspace])

        return self._execute(cmd, actor, cmd.workspace_id, decide)

    def change_role(self, cmd: m.ChangeRole, actor: Actor) -> CommandResult:
        def decide(meta: EventMeta) -> Decision:
            workspace = self._workspace_for(actor, cmd.workspace_id, Role.ADMIN, "changeRole")
            role = Role.parse(cmd.role)
            self._may_grant(workspace, actor, role)
            if workspace.role_of(cmd.user_id) is Role.OWNER:
                self._may_grant(workspace, actor, Role.OWNER)
            workspace.change_role(cmd.user_id, role, meta=meta)
            return Decision(workspace, "workspace", [workspace])

        return self._execute(cmd, actor, cmd.workspace_id, decide)

    def remove_member(self, cmd: m.RemoveMember, actor: Actor) -> CommandResult:
        def decide(meta: EventMeta) -> Decision:
            workspace = self._workspace_for(actor, cmd.workspace_id, Role.ADMIN, "removeMember")
            if workspace.role_of(cmd.user_id) is Role.OWNER:
                self._may_grant(workspace, actor, Role.OWNER)
            workspace.remove_member(cmd.user_id, meta=meta)
            return Decision(workspace, "workspace", [workspace])

        return self._execute(cmd, actor, cmd.workspace_id, decide)

    def set_spend_limit(self, cmd: m.SetSpendLimit, actor: Actor) -> CommandResult:
        def decide(meta: EventMeta) -> Decision:
            workspace = self._workspace_for(actor, cmd.workspace_id, Role.ADMIN, "setSpendLimit")
            limit = None if cmd.monthly_limit is None else parse_usd(cmd.monthly_limit)
            workspace.set_spend_limit(limit, meta=meta)
            return Decision(workspace, "workspace", [workspace])

        return self._execute(cmd, actor, cmd.workspace_id, decide)

    def set_plan(self, cmd: m.SetPlan, actor: Actor) -> CommandResult:
        def decide(meta: EventMeta) -> Decision:
            workspace = self._workspace_for(actor, cmd.workspace_id, Role.OWNER, "setPlan")
            markup = parse_markup(cmd.markup)
            increment = parse_usd(cmd.billing_increment)
            workspace.set_plan(markup=markup, billing_increment_micros=increment, meta=meta)
            return Decision(workspace, "workspace", [workspace])

        return self._execute(cmd, actor, cmd.workspace_id, decide)

    # -- projects and boards ------------------------------------------------------------------

    def create_project(self, cmd: m.CreateProject, actor: Actor) -> CommandResult:
        def decide(meta: EventMeta) -> Decision:
            workspace = self._workspace_for(actor, cmd.workspace_id, Role.MEMBER, "createProject")
            project = Project.create(
                project_id=uuid4(),
                workspace_id=workspace.id,
                name=cmd.name,
                lanes=[LaneSpec(lane.name, lane.wip_limit) for lane in cmd.lanes],
                meta=meta,
            )
            return Decision(project, "project", [project])

        return self._execute(cmd, actor, cmd.workspace_id, decide)

    def set_wip_limit(self, cmd: m.SetWipLimit, actor: Actor) -> CommandResult:
        return self._change_project(
            cmd, actor, Role.ADMIN, "setWipLimit",
            lambda p, meta: p.set_wip_limit(cmd.lane, cmd.wip_limit, meta=meta),
        )  # fmt: skip

    def add_lane(self, cmd: m.AddLane, actor: Actor) -> CommandResult:
        return self._change_project(
            cmd, actor, Role.ADMIN, "addLane",
            lambda p, meta: p.add_lane(
                cmd.name, wip_limit=cmd.wip_limit, index=cmd.index, meta=meta
            ),
        )  # fmt: skip

    def rename_lane(self, cmd: m.RenameLane, actor: Actor) -> CommandResult:
        return self._change_project(
            cmd, actor, Role.ADMIN, "renameLane",
            lambda p, meta: p.rename_lane(cmd.lane, cmd.name, meta=meta),
        )  # fmt: skip

    def reorder_lanes(self, cmd: m.ReorderLanes, actor: Actor) -> CommandResult:
        return self._change_project(
            cmd, actor, Role.ADMIN, "reorderLanes",
            lambda p, meta: p.reorder_lanes(cmd.order, meta=meta),
        )  # fmt: skip

    def remove_lane(self, cmd: m.RemoveLane, actor: Actor) -> CommandResult:
        return self._change_project(
            cmd, actor, Role.ADMIN, "removeLane",
            lambda p, meta: p.remove_lane(cmd.lane, meta=meta),
        )  # fmt: skip

    def archive_project(self, cmd: m.ArchiveProject, actor: Actor) -> CommandResult:
        return self._change_project(
            cmd, actor, Role.ADMIN, "archiveProject", lambda p, meta: p.archive(meta=meta)
        )

    def _change_project(
        self,
        cmd: m.Command,
        actor: Actor,
        needed: Role,
        action: str,
        change: Callable[[Project, EventMeta], object],
    ) -> CommandResult:
        project_id: UUID = getattr(cmd, "project_id")  # noqa: B009

        def decide(meta: EventMeta) -> Decision:
            project = self._load(Project, project_id, actor, needed, action)
            change(project, meta)
            return Decision(project, "project", [project])

        return self._execute(cmd, actor, self._scope_hint(actor), decide)

    # -- cards ----------------------------------------------------------------------------------

    def create_card(self, cmd: m.CreateCard, actor: Actor) -> CommandResult:
        def decide(meta: EventMeta) -> Decision:
            project = self._load(Project, cmd.project_id, actor, Role.MEMBER, "createCard")
            lane = cmd.lane if cmd.lane is not None else project.lanes[0].name
            card_id = uuid4()
            position = project.place_card(card_id, lane, meta=meta)
            card = Card.create(
                card_id=card_id,
                workspace_id=project.workspace_id,
                project_id=project.id,
                title=cmd.title,
                description=cmd.description,
                lane=lane,
                position=position,
                meta=meta,
            )
            return Decision(card, "card", [card, project])

        return self._execute(cmd, actor, self._scope_hint(actor), decide)

    def update_card(self, cmd: m.UpdateCard, actor: Actor) -> CommandResult:
        def change(card: Card, meta: EventMeta) -> None:
            card.edit(title=cmd.title, description=cmd.description, meta=meta)
            if cmd.labels is not None:
                wanted = {label.strip() for label in cmd.labels}
                for label in sorted(set(card.labels) - wanted):
                    card.unlabel(label, meta=meta)
                for label in sorted(wanted - set(card.labels)):
                    card.label(label, meta=meta)

        return self._change_card(cmd, actor, "updateCard", change, cmd.expected_version)

    def move_card(self, cmd: m.MoveCard, actor: Actor) -> CommandResult:
        def decide(meta: EventMeta) -> Decision:
            card = self._load(Card, cmd.card_id, actor, Role.MEMBER, "moveCard")
            _expect_version(card, cmd.expected_version)
            project = self._get(Project, card.project_id)
            card.ensure_live("move")
            from_lane = project.lane_of(card.id)
            card.ensure_movable(cmd.to_lane, from_lane=from_lane)
            position = project.move_card(
                card.id,
                cmd.to_lane,
                after_card_id=cmd.after_card_id,
                before_card_id=cmd.before_card_id,
                meta=meta,
            )
            card.move(cmd.to_lane, position, from_lane=from_lane, meta=meta)
            return Decision(card, "card", [card, project])

        return self._execute(cmd, actor, self._scope_hint(actor), decide)

    def assign_card(self, cmd: m.AssignCard, actor: Actor) -> CommandResult:
        def assign(card: Card, meta: EventMeta) -> None:
            card.ensure_live("assign")
            if cmd.assignee is not None:
                workspace = self._get(Workspace, card.workspace_id, copy=False)
                if workspace.role_of(cmd.assignee.strip()) is None:
                    raise ValidationFailed(
                        f"assignee {cmd.assignee.strip()[:100]!r} is not a member of workspace "
                        f"{workspace.id}; add them with addMember first"
                    )
            card.assign(cmd.assignee, meta=meta)

        return self._change_card(cmd, actor, "assignCard", assign, cmd.expected_version)

    def label_card(self, cmd: m.LabelCard, actor: Actor) -> CommandResult:
        return self._change_card(
            cmd, actor, "labelCard", lambda card, meta: card.label(cmd.label, meta=meta)
        )

    def unlabel_card(self, cmd: m.UnlabelCard, actor: Actor) -> CommandResult:
        return self._change_card(
            cmd, actor, "unlabelCard", lambda card, meta: card.unlabel(cmd.label, meta=meta)
        )

    def block_card(self, cmd: m.BlockCard, actor: Actor) -> CommandResult:
        return self._change_card(
            cmd, actor, "blockCard", lambda card, meta: card.block(cmd.reason, meta=meta)
        )

    def unblock_card(self, cmd: m.UnblockCard, actor: Actor) -> CommandResult:
        return self._change_card(
            cmd, actor, "unblockCard", lambda card, meta: card.unblock(meta=meta)
        )

    def archive_card(self, cmd: m.ArchiveCard, actor: Actor) -> CommandResult:
        def decide(meta: EventMeta) -> Decision:
            card = self._load(Card, cmd.card_id, actor, Role.MEMBER, "archiveCard")
            _expect_version(card, cmd.expected_version)
            card.archive(meta=meta)
            project = self._get(Project, card.project_id)
            project.lift_card(card.id, meta=meta)
            return Decision(card, "card", [card, project])

        return self._execute(cmd, actor, self._scope_hint(actor), decide)

    def restore_card(self, cmd: m.RestoreCard, actor: Actor) -> CommandResult:
        def decide(meta: EventMeta) -> Decision:
            card = self._load(Card, cmd.card_id, actor, Role.MEMBER, "restoreCard")
            project = self._get(Project, card.project_id)
            lane = cmd.lane or project.lane_to_restore(card.id)
            if not card.archived:
                card.restore(lane, card.position, meta=meta)  # raises: not archived
            position = project.place_card(card.id, lane, meta=meta)
            card.restore(lane, position, meta=meta)
            return Decision(card, "card", [card, project])

        return self._execute(cmd, actor, self._scope_hint(actor), decide)

    def _change_card(
        self,
        cmd: m.Command,
        actor: Actor,
        action: str,
        change: Callable[[Card, EventMeta], object],
        expected_version: int | None = None,
    ) -> CommandResult:
        card_id: UUID = getattr(cmd, "card_id")  # noqa: B009

        def decide(meta: EventMeta) -> Decision:
            card = self._load(Card, card_id, actor, Role.MEMBER, action)
            _expect_version(card, expected_version)
            change(card, meta)
            return Decision(card, "card", [card])

        return self._execute(cmd, actor, self._scope_hint(actor), decide)

    # -- agent runs -----------------------------------------------------------------------------

    def start_agent_run(self, cmd: m.StartAgentRun, actor: Actor) -> CommandResult:
        def decide(meta: EventMeta) -> Decision:
            card = self._load(Card, cmd.card_id, actor, Role.MEMBER, "startAgentRun")
            max_cost = None if cmd.max_cost is None else parse_usd(cmd.max_cost)
            now = datetime.now(UTC)
            if card.archived:
                raise InvalidTransition(f"card {card.id} is archived; restore it to run agents")
            spec = agent_named(cmd.agent.strip())
            validate_choice(
                provider=cmd.provider, model=cmd.model, policy=cmd.policy, prices=self.prices,
                at=now,
            )  # fmt: skip
            workspace = self._get(Workspace, card.workspace_id)
            spend = self._spend_for(workspace, now, meta)
            spend.check_room(workspace.monthly_limit_micros, wanted_micros=0)
            run = AgentRun.request(
                run_id=uuid4(),
                workspace_id=card.workspace_id,
                project_id=card.project_id,
                card_id=card.id,
                agent=cmd.agent,
                provider=cmd.provider,
                model=cmd.model,
                max_cost_micros=max_cost,
                meta=meta,
                policy=cmd.policy,
            )
            floor = prompt_floor_micros(
                spec, title=card.title, description=card.description, prices=self.prices,
                provider=cmd.provider, model=cmd.model, at=now, markup=workspace.markup,
            )  # fmt: skip
            if max_cost is not None and floor > max_cost:
                raise BudgetExceeded(
                    f"maxCost {format_usd(max_cost)} cannot pay even for the prompt of "
                    f"{spec.name} on card {card.id} (about {format_usd(floor)})"
                )
            return Decision(run, "run", [run])

        return self._execute(cmd, actor, self._scope_hint(actor), decide)

    def cancel_agent_run(self, cmd: m.CancelAgentRun, actor: Actor) -> CommandResult:
        return self._change_run(
            cmd, actor, Role.MEMBER, "cancelAgentRun",
            lambda run, meta: run.cancel(cmd.reason, meta=meta),
        )  # fmt: skip

    def begin_run(self, cmd: m.BeginRun, actor: Actor) -> CommandResult:
        return self._change_run(
            cmd,
            actor,
            Role.ADMIN,
            "beginRun",
            lambda run, meta: run.start(worker=cmd.worker, meta=meta),
        )

    def start_run_step(self, cmd: m.StartRunStep, actor: Actor) -> CommandResult:
        return self._change_run(
            cmd, actor, Role.ADMIN, "startRunStep",
            lambda run, meta: run.start_step(cmd.step, cmd.name, meta=meta),
        )  # fmt: skip

    def append_run_log(self, cmd: m.AppendRunLog, actor: Actor) -> CommandResult:
        def decide(meta: EventMeta) -> Decision:
            run = self._load(AgentRun, cmd.run_id, actor, Role.ADMIN, "appendRunLog")
            run.expect_worker(cmd.worker)
            first, last = run.append_log(
                [(line.at, line.stream, line.text) for line in cmd.lines], meta=meta
            )
            return Decision(run, "run", [run], {"first_seq": first, "last_seq": last})

        return self._execute(cmd, actor, self._scope_hint(actor), decide)

    def record_llm_call(self, cmd: m.RecordLlmCall, actor: Actor) -> CommandResult:
        """Record a finished LLM call, its charge and the month's new spend, atomically."""

        def decide(meta: EventMeta) -> Decision:
            run = self._load(AgentRun, cmd.run_id, actor, Role.ADMIN, "recordLlmCall")
            workspace = self._get(Workspace, run.workspace_id)
            billed = billed_amount(cmd.provider_cost_micros, workspace.markup)
            spend = self._spend_for(workspace, cmd.at, meta)
            charge = UsageCharge.charge(
                workspace_id=run.workspace_id,
                project_id=run.project_id,
                card_id=run.card_id,
                run_id=run.id,
                call_id=cmd.call_id,
                provider=cmd.provider,
                model=cmd.model,
                input_tokens=cmd.input_tokens,
                output_tokens=cmd.output_tokens,
                provider_cost_micros=cmd.provider_cost_micros,
                markup=workspace.markup,
                billed_micros=billed,
                price_table_version=cmd.price_table_version,
                at=cmd.at,
                meta=meta,
                billed_month=spend.month,
            )
            run.record_llm_call(
                call_id=cmd.call_id,
                charge_id=charge.id,
                provider=cmd.provider,
                model=cmd.model,
                input_tokens=cmd.input_tokens,
                output_tokens=cmd.output_tokens,
                latency_ms=cmd.latency_ms,
                provider_cost_micros=cmd.provider_cost_micros,
                billed_micros=billed,
                meta=meta,
            )
            spend.add(charge.id, billed, meta=meta)
            spend.note_thresholds(workspace.monthly_limit_micros, meta=meta)
            return Decision(
                run, "run", [run, charge, spend], {"charge_id": str(charge.id), "billed": billed}
            )

        return self._execute(cmd, actor, self._scope_hint(actor), decide)

    def finish_run(self, cmd: m.FinishRun, actor: Actor) -> CommandResult:
        def change(run: AgentRun, meta: EventMeta) -> None:
            run.expect_worker(cmd.worker)
            if cmd.output is not None:
                run.record_output(cmd.output, meta=meta)
            if cmd.outcome == "SUCCEEDED":
                run.succeed(meta=meta)
            elif cmd.outcome == "FAILED":
                run.fail(cmd.error or "unknown error", meta=meta)
            else:
                run.time_out(cmd.after_seconds or 0, meta=meta)

        return self._change_run(cmd, actor, Role.ADMIN, "finishRun", change)

    def record_run_heartbeat(self, cmd: m.RecordRunHeartbeat, actor: Actor) -> CommandResult:
        return self._change_run(
            cmd, actor, Role.ADMIN, "recordRunHeartbeat",
            lambda run, meta: run.heartbeat(worker=cmd.worker, meta=meta),
        )  # fmt: skip

    def reclaim_run(self, cmd: m.ReclaimRun, actor: Actor) -> CommandResult:
        def decide(meta: EventMeta) -> Decision:
            run = self._load(AgentRun, cmd.run_id, actor, Role.ADMIN, "reclaimRun")
            _expect_version(run, cmd.expected_version)
            run.reclaim(worker=cmd.worker, meta=meta)
            return Decision(run, "run", [run])

        return self._execute(cmd, actor, self._scope_hint(actor), decide)

    def record_provider_attempt(self, cmd: m.RecordProviderAttempt, actor: Actor) -> CommandResult:
        """One provider attempt and, when it used tokens, its charge and the month's spend, in
        one save. The charge's id derives from (run, attempt number), and the run refuses a
        recorded call id, so a restarted worker can never charge an attempt twice."""

        def decide(meta: EventMeta) -> Decision:
            run = self._load(AgentRun, cmd.run_id, actor, Role.ADMIN, "recordProviderAttempt")
            run.expect_worker(cmd.worker)
            workspace = self._get(Workspace, run.workspace_id)
            charged = cmd.input_tokens > 0 or cmd.output_tokens > 0
            cost = (
                self.prices.cost(
                    cmd.provider, cmd.model, at=cmd.started_at, input_tokens=cmd.input_tokens,
                    output_tokens=cmd.output_tokens, markup=workspace.markup,
                )
                if charged
                else None
            )  # fmt: skip
            number = run.record_attempt(
                provider=cmd.provider, model=cmd.model, status=cmd.status,
                http_status=cmd.http_status, error=cmd.error, latency_ms=cmd.latency_ms,
                input_tokens=cmd.input_tokens, output_tokens=cmd.output_tokens,
                provider_cost_micros=cost.provider_cost_micros if cost else 0,
                estimated=cmd.estimated, meta=meta,
            )  # fmt: skip
            changed: list[Aggregate] = [run]
            extra: dict[str, Any] = {"attempt": number, "billed": 0}
            if cost is not None:
                call_id = f"attempt-{number}"
                charge = UsageCharge.charge(
                    workspace_id=run.workspace_id, project_id=run.project_id,
                    card_id=run.card_id, run_id=run.id, call_id=call_id,
                    provider=cmd.provider, model=cmd.model, input_tokens=cmd.input_tokens,
                    output_tokens=cmd.output_tokens,
                    provider_cost_micros=cost.provider_cost_micros, markup=workspace.markup,
                    billed_micros=cost.billed_micros, price_table_version=self.prices.version,
                    at=cmd.started_at, meta=meta,
                )  # fmt: skip
                run.record_llm_call(
                    call_id=call_id, charge_id=charge.id, provider=cmd.provider,
                    model=cmd.model, input_tokens=cmd.input_tokens,
                    output_tokens=cmd.output_tokens, latency_ms=cmd.latency_ms,
                    provider_cost_micros=cost.provider_cost_micros,
                    billed_micros=cost.billed_micros, meta=meta,
                )  # fmt: skip
                spend = self._spend_for(workspace, cmd.started_at, meta)
                spend.add(charge.id, cost.billed_micros, meta=meta)
                spend.note_thresholds(workspace.monthly_limit_micros, meta=meta)
                changed += [charge, spend]
                extra.update(charge_id=str(charge.id), billed=cost.billed_micros)
            return Decision(run, "run", changed, extra)

        return self._execute(cmd, actor, self._scope_hint(actor), decide)

    def run_budget(self, run_id: UUID, at: datetime) -> RunBudget:
        """What a running run may still spend: its own budget and its workspace's month."""
        run = self._get(AgentRun, run_id, copy=False)
        workspace = self._get(Workspace, run.workspace_id, copy=False)
        try:
            spent = self._get(MonthlySpend, spend_id_for(workspace.id, month_of(at)), copy=False)
            month_spent = spent.spent_micros
        except NotFound:
            month_spent = 0
        return RunBudget(
            markup=workspace.markup,
            run_billed_micros=run.billed_micros,
            run_max_micros=run.max_cost_micros,
            month_spent_micros=month_spent,
            month_limit_micros=workspace.monthly_limit_micros,
        )

    def run_snapshot(self, run_id: UUID) -> AgentRun:
        """The run as the write model holds it now (read only)."""
        return self._get(AgentRun, run_id)

    def card_snapshot(self, card_id: UUID) -> Card:
        return self._get(Card, card_id)

    def credit_charge(self, cmd: m.CreditCharge, actor: Actor) -> CommandResult:
        def decide(meta: EventMeta) -> Decision:
            charge = self._load(UsageCharge, cmd.charge_id, actor, Role.OWNER, "creditCharge")
            amount = parse_usd(cmd.amount)
            # A closed month's statement is final: the correction goes to the first open month.
            month = self._spend_for(self._get(Workspace, charge.workspace_id), cmd.at, meta).month
            if cmd.refund:
                charge.refund(amount, cmd.reason, at=cmd.at, meta=meta, billed_month=month)
            else:
                charge.credit(amount, cmd.reason, at=cmd.at, meta=meta, billed_month=month)
            return Decision(charge, "charge", [charge])

        return self._execute(cmd, actor, self._scope_hint(actor), decide)

    def _change_run(
        self,
        cmd: m.Command,
        actor: Actor,
        needed: Role,
        action: str,
        change: Callable[[AgentRun, EventMeta], object],
    ) -> CommandResult:
        run_id: UUID = getattr(cmd, "run_id")  # noqa: B009

        def decide(meta: EventMeta) -> Decision:
            run = self._load(AgentRun, run_id, actor, needed, action)
            change(run, meta)
            return Decision(run, "run", [run])

        return self._execute(cmd, actor, self._scope_hint(actor), decide)

    # -- reading the write model ------------------------------------------------------------------

    def card_at(self, card_id: UUID, actor: Actor, *, version: int | None = None) -> Card:
        """A card as it was at ``version`` (or now), for history and audit."""
        return self._load(Card, card_id, actor, Role.VIEWER, "read card", version=version)

    # -- the machinery --------------------------------------------------------------------------

    def _execute(
        self,
        cmd: m.Command,
        actor: Actor,
        workspace_hint: UUID | None,
        decide: Callable[[EventMeta], Decision],
    ) -> CommandResult:
        with self.observe(type(cmd).__name__, actor.traceparent) as traceparent:
            return self._execute_observed(cmd, actor, workspace_hint, decide, traceparent)

    def _execute_observed(
        self,
        cmd: m.Command,
        actor: Actor,
        workspace_hint: UUID | None,
        decide: Callable[[EventMeta], Decision],
        traceparent: str,
    ) -> CommandResult:
        # Bootstrap credentials are not a tenant: each bootstrap user gets a scope of their own.
        scope = actor.workspace_id if actor.workspace_id != "*" else f"*:{actor.user_id}"
        if actor.workspace_id == USER_SCOPE:
            scope = f"user:{actor.user_id}"
            workspace_hint = workspace_hint or self._target_workspace(cmd)
        sent_id = cmd.command_id is not None
        if not sent_id:
            # Every write is recorded under an id, so that one whose commit was interrupted can
            # be looked up and answered truthfully (see _settle).
            cmd = cmd.model_copy(update={"command_id": uuid4()})
        command_id = str(cmd.command_id)
        digest = fingerprint(cmd)
        meta = EventMeta.for_command(
            workspace_id=workspace_hint
            or (actor.workspace_id if actor.workspace_id != "*" else ""),
            actor=actor.user_id,
            command_id=cmd.command_id or uuid4(),
            correlation_id=actor.correlation_id,
            causation_id=actor.causation_id,
            traceparent=traceparent,
        )
        # The store raises UNAVAILABLE itself when loading or appending fails before anything
        # was committed.
        if sent_id:
            earlier = self._earlier_result(scope, command_id, cmd, digest, decide, meta)
            if earlier is not None:
                return earlier
        return self._attempts(cmd, actor, scope, command_id, digest, decide, meta)

    def _attempts(
        self,
        cmd: m.Command,
        actor: Actor,
        scope: str,
        command_id: str,
        digest: str,
        decide: Callable[[EventMeta], Decision],
        meta: EventMeta,
    ) -> CommandResult:
        for attempt in range(self.retries + 1):
            decision = decide(meta)
            changed = [agg for agg in decision.changed if agg.pending_events]
            version = decision.target.version
            provisional = CommandResult(
                kind=decision.kind, id=decision.target.id, version=version, position=0,
                extra=decision.extra,
            )  # fmt: skip
            try:
                return self._save_with_record(changed, scope, cmd, digest, actor, provisional)
            except Unavailable as unknown:
                if unknown.outcome != "unknown":
                    raise
                settled = self._settle(unknown, scope, command_id)
                if settled is not None:
                    return settled
                # Not committed: nothing was written, so deciding again is safe.
                if attempt == self.retries:
                    raise Unavailable(
                        f"{type(cmd).__name__} was not written: the database connection kept "
                        "breaking; retry shortly",
                        retry_after_seconds=1.0,
                    ) from unknown
                continue
            except Conflict as error:
                if isinstance(error, DuplicateCommand):
                    earlier = self._earlier_result(scope, command_id, cmd, digest, decide, meta)
                    if earlier is not None:
                        return earlier
                if attempt == self.retries:
                    raise Conflict(
                        f"{type(cmd).__name__} on {decision.kind} {decision.target.id} lost "
                        f"{self.retries + 1} races with concurrent writes; retry later"
                    ) from error
                # Jittered backoff: writers that retry in lockstep collide again.
                time.sleep(random.uniform(0, 0.002 * 2**attempt))  # noqa: S311
                continue
        raise AssertionError("unreachable")  # pragma: no cover

    def _settle(self, unknown: Unavailable, scope: str, command_id: str) -> CommandResult | None:
        """The true outcome of a write whose commit was interrupted: its result if it committed,
        None if it did not; if the store cannot tell within ``settle_seconds``, UNAVAILABLE with
        ``outcome="unknown"`` and the commandId that a retry learns the truth with."""
        transaction_id = unknown.details.get("transaction_id")
        deadline = time.monotonic() + self.settle_seconds
        while True:
            try:
                if self.command_log is None or not isinstance(transaction_id, str):
                    break
                committed = self.command_log.committed(transaction_id)
                if committed is False:
                    log.info("command.commit_settled: %s was not committed", command_id)
                    return None
                if committed:
                    stored = self.command_log.find(scope, command_id)
                    if stored is not None:
                        log.info("command.commit_settled: %s was committed", command_id)
                        return replace(CommandResult.from_stored(stored.result), replayed=False)
            except Unavailable:
                pass  # the database is not back yet
            if time.monotonic() >= deadline:
                break
            time.sleep(self.settle_poll_seconds)
        log.warning("command.commit_unknown: %s, the client was told to retry with it", command_id)
        raise Unavailable(
            "the database connection was lost while this write was committing and the outcome "
            f"could not be learnt within {self.settle_seconds:g} s; retry with commandId "
            f"{command_id} to get its result without writing twice",
            retry_after_seconds=1.0,
            outcome="unknown",
            command_id=command_id,
        ) from unknown

    def _take_snapshots(self, processing_event: ProcessingEvent[UUID]) -> None:
        """Snapshots are a shortcut for reading, taken after the command committed: failing to
        write one must not turn a committed command into a failure."""
        try:
            super()._take_snapshots(processing_event)
        except Unavailable:
            log.warning("command.snapshot_skipped: the database is unavailable")

    def _save_with_record(
        self,
        changed: list[Aggregate],
        scope: str,
        cmd: m.Command,
        digest: str,
        actor: Actor,
        provisional: CommandResult,
    ) -> CommandResult:
        """Save the events and the command's idempotency record, atomically."""
        record = CommandRecord(
            scope=scope,
            command_id=str(cmd.command_id),
            command_type=type(cmd).__name__,
            fingerprint=digest,
            actor=actor.user_id,
            result=provisional.as_dict(),
        )
        recordings = self.save(*changed, command_record=record)
        position = max((r.notification.id for r in recordings), default=0)
        return replace(provisional, position=position)

    def _earlier_result(
        self,
        scope: str,
        command_id: str,
        cmd: m.Command,
        digest: str,
        decide: Callable[[EventMeta], Decision],
        meta: EventMeta,
    ) -> CommandResult | None:
        """The first result of a command sent again, for a caller who may run it now.

        The replay re-runs the command's checks against the current state and writes nothing:
        a refusal of who is asking (FORBIDDEN, NOT_FOUND) is the answer, so a VIEWER replaying an
        owner's commandId learns nothing; a refusal of the state (the card has moved since, a
        version moved on) is expected after the first run and the first result stands.
        """
        if self.command_log is None:
            return None
        stored = self.command_log.find(scope, command_id)
        if stored is None:
            return None
        if stored.command_type != type(cmd).__name__ or stored.fingerprint != digest:
            raise ValidationFailed(
                f"commandId {command_id} was already used for a different command "
                f"({stored.command_type}); use a new commandId for a new command"
            )
        try:
            decide(meta)
        except (Forbidden, NotFound, Unauthenticated, Unavailable):
            raise
        except AgentWorksError:
            pass
        return CommandResult.from_stored(stored.result)

    def _target_workspace(self, cmd: m.Command) -> UUID | None:
        """The workspace a user token's command acts in, from the object it names: user tokens
        carry no workspace, and every event must still be stamped with its tenant."""
        direct = getattr(cmd, "workspace_id", None)
        if isinstance(direct, UUID):
            return direct
        for field_name, cls in _TARGETS:
            target = getattr(cmd, field_name, None)
            if isinstance(target, UUID):
                try:
                    owner: UUID = self._get(cls, target, copy=False).workspace_id  # type: ignore[attr-defined]
                except NotFound:
                    return None
                return owner
        return None

    def _scope_hint(self, actor: Actor) -> UUID | None:
        try:
            return UUID(actor.workspace_id)
        except ValueError:
            return None

    def _get(
        self, cls: type[A], aggregate_id: UUID, *, version: int | None = None, copy: bool = True
    ) -> A:
        """Load an aggregate; ``copy=False`` shares the cached instance, for reading only."""
        try:
            aggregate: Aggregate = self.repository.get(
                aggregate_id, version=version, deepcopy_from_cache=copy
            )
        except AggregateNotFoundError:
            raise NotFound(f"{_kind(cls)} {aggregate_id} does not exist") from None
        if not isinstance(aggregate, cls):
            raise NotFound(f"{_kind(cls)} {aggregate_id} does not exist")
        return aggregate

    def _load(
        self,
        cls: type[A],
        aggregate_id: UUID,
        actor: Actor,
        needed: Role,
        action: str,
        *,
        version: int | None = None,
    ) -> A:
        """An aggregate the actor may act on; another workspace's ids look like missing ones."""
        aggregate = self._get(cls, aggregate_id, version=version)
        workspace_id = aggregate.workspace_id  # type: ignore[attr-defined]
        if actor.workspace_id != USER_SCOPE and str(workspace_id) != actor.workspace_id:
            raise NotFound(f"{_kind(cls)} {aggregate_id} does not exist")
        if not actor.is_service:
            workspace = self._get(Workspace, workspace_id, copy=False)
            self._check_role(workspace, actor, needed, action)
        return aggregate

    def _workspace_for(
        self, actor: Actor, workspace_id: UUID, needed: Role, action: str
    ) -> Workspace:
        if actor.workspace_id != USER_SCOPE and str(workspace_id) != actor.workspace_id:
            raise NotFound(f"workspace {workspace_id} does not exist")
        workspace = self._get(Workspace, workspace_id)
        if not actor.is_service:
            self._check_role(workspace, actor, needed, action)
        return workspace

    def _check_role(self, workspace: Workspace, actor: Actor, needed: Role, action: str) -> None:
        role = workspace.role_of(actor.user_id)
        if role is None:
            raise NotFound(f"workspace {workspace.id} does not exist")
        require_role(capped(role, actor.role), needed, action=action, user_id=actor.user_id)

    def _may_grant(self, workspace: Workspace, actor: Actor, role: Role) -> None:
        if role is Role.OWNER and not actor.is_service:
            mine = capped(workspace.role_of(actor.user_id) or Role.VIEWER, actor.role)
            require_role(mine, Role.OWNER, action="granting or taking OWNER", user_id=actor.user_id)

    def _spend_for(self, workspace: Workspace, at: datetime, meta: EventMeta) -> MonthlySpend:
        """The spend of ``at``'s month, or of the first open month after it once that is closed
        (late usage of a closed month is billed in the next statement)."""
        month = month_of(at)
        while True:
            try:
                spend = self._get(MonthlySpend, spend_id_for(workspace.id, month))
            except NotFound:
                return MonthlySpend.open(workspace_id=workspace.id, month=month, meta=meta)
            if not spend.closed:
                return spend
            month = next_month(month)


_TARGETS: tuple[tuple[str, type[Aggregate]], ...] = (
    ("card_id", Card),
    ("project_id", Project),
    ("run_id", AgentRun),
    ("charge_id", UsageCharge),
)


def _expect_version(aggregate: Aggregate, expected: int | None) -> None:
    if expected is not None and aggregate.version != expected:
        raise Conflict(
            f"{_kind(type(aggregate))} {aggregate.id} is at version {aggregate.version}, "
            f"not the expected {expected}; reload it and retry",
            expected=expected,
            actual=aggregate.version,
        )


def _kind(cls: type[Aggregate]) -> str:
    return {
        "Workspace": "workspace",
        "Project": "project",
        "Card": "card",
        "AgentRun": "agent run",
        "UsageCharge": "usage charge",
        "MonthlySpend": "monthly spend",
    }.get(cls.__name__, cls.__name__.lower())
