"""Agent-run commands: requesting, running and finishing a run, and the usage it charges.

A recorded LLM call saves the run, its charge and the month's spend together: the write side's
``MonthlySpend`` decides the 50/80/100 % thresholds exactly. Spend *checks* (refusing a run up
front, holding budget for a call) read the month's usage through ``spend``, the Redis counter
or the billing read model, which trail the log; budget holds cover that lag
(``orchestrator.holds``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any
from uuid import UUID, uuid4

from eventsourcing.domain import Aggregate

from commands import models as m
from commands.service import Actor, CommandResult, Decision, WriteSide, expect_version
from domain.agent_run import AgentRun
from domain.agents import agent_named, prompt_floor_micros
from domain.base import StampedEvent
from domain.card import Card
from domain.errors import BudgetExceeded, InvalidTransition
from domain.meta import EventMeta
from domain.metering import LlmCall, charge_llm_call
from domain.money import billed_amount, format_usd, parse_usd
from domain.project import Project
from domain.roles import Role
from domain.routing import validate_choice
from domain.usage import MonthlySpend, UsageCharge, check_month_room
from domain.workspace import Workspace

#: The error of the attempt a call is recorded as when its worker stopped during it.
ORPHANED_CALL = (
    "its worker stopped during the call without recording it; charged for its prompt "
    "(estimated) when the run was taken over"
)
#: The same, the run having ended (cancelled, say) before anybody took it over.
ORPHANED_CALL_OF_ENDED_RUN = (
    "its worker stopped during the call without recording it; charged for its prompt "
    "(estimated) after the run ended"
)


def _attempt_result(run: AgentRun, worker: str, attempt: int, billed: int) -> dict[str, Any]:
    """A recorded attempt's result: its number, what it billed, and whether the run is still
    ``worker``'s."""
    return {"attempt": attempt, "billed": billed, "taken_over": run.worker != worker}


@dataclass(frozen=True, kw_only=True)
class RunBudget:
    """What a running run may spend (billed micro-USD; ``None``: no limit). The month's usage
    is not here: spend checks read it through the write side's ``spend`` reader."""

    markup: Decimal
    run_billed_micros: int
    run_max_micros: int | None
    month_limit_micros: int | None

    @property
    def run_room_micros(self) -> int | None:
        return None if self.run_max_micros is None else self.run_max_micros - self.run_billed_micros

    def limiting(self, room: int | None) -> str:
        """The budget that leaves ``room`` (the least any leaves), as a stopped run's error
        names it: its owner raises the run's maxCost, only an owner or admin the month's limit."""
        run_room = self.run_room_micros
        if (
            self.run_max_micros is not None
            and run_room is not None
            and (room is None or room >= run_room)
        ):
            return f"the run's maxCost ({format_usd(self.run_max_micros)})"
        return f"the workspace's monthly limit ({format_usd(self.month_limit_micros or 0)})"


class RunCommands(WriteSide):
    """Commands on an :class:`~domain.agent_run.AgentRun` and the usage charges it records."""

    def start_agent_run(self, cmd: m.StartAgentRun, actor: Actor) -> CommandResult:
        def decide(meta: EventMeta) -> Decision:
            card = self.load(Card, cmd.card_id, actor, Role.MEMBER, cmd.action)
            max_cost = None if cmd.max_cost is None else parse_usd(cmd.max_cost)
            # The decision's instant: the month whose spend it opens has begun by then (a clock
            # read here, a moment later, may already be in the next month).
            now = StampedEvent.create_timestamp()
            if card.archived:
                raise InvalidTransition(f"card {card.id} is archived; restore it to run agents")
            self.aggregate(Project, card.project_id).ensure_writable()
            spec = agent_named(cmd.agent.strip())
            validate_choice(
                provider=cmd.provider, model=cmd.model, policy=cmd.policy, prices=self.prices,
                at=now,
            )  # fmt: skip
            workspace = self.aggregate(Workspace, card.workspace_id)
            if workspace.monthly_limit_micros is not None:
                # The usage checks read lags the log while the billing projector is behind; the
                # write model's, loaded here anyway, counts every charge written.
                written = self.spend_for(workspace, now, meta)
                month = written.month
                spent = max(self.spend.read(workspace.id, month).spent, written.spent_micros)
                check_month_room(workspace.id, month, spent, workspace.monthly_limit_micros)
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

        return self.execute(cmd, actor, self._scope_hint(actor), decide)

    def cancel_agent_run(self, cmd: m.CancelAgentRun, actor: Actor) -> CommandResult:
        return self._change_run(
            cmd, actor, Role.MEMBER, lambda run, meta: run.cancel(cmd.reason, meta=meta)
        )

    def begin_run(self, cmd: m.BeginRun, actor: Actor) -> CommandResult:
        return self._change_run(
            cmd, actor, Role.ADMIN, lambda run, meta: run.start(worker=cmd.worker, meta=meta)
        )

    def start_run_step(self, cmd: m.StartRunStep, actor: Actor) -> CommandResult:
        return self._change_run(
            cmd, actor, Role.ADMIN, lambda run, meta: run.start_step(cmd.step, cmd.name, meta=meta)
        )

    def append_run_log(self, cmd: m.AppendRunLog, actor: Actor) -> CommandResult:
        def decide(meta: EventMeta) -> Decision:
            run = self.load(AgentRun, cmd.run_id, actor, Role.ADMIN, cmd.action)
            run.expect_worker(cmd.worker)
            first, last = run.append_log(
                [(line.at, line.stream, line.text) for line in cmd.lines], meta=meta
            )
            return Decision(run, "run", [run], {"first_seq": first, "last_seq": last})

        return self.execute(cmd, actor, self._scope_hint(actor), decide)

    def append_run_logs(self, cmd: m.AppendRunLogs, actor: Actor) -> CommandResult:
        """Several runs' chunks in one transaction; all or nothing (a run that refuses its chunk
        fails the command, and the sender writes the chunks one by one to learn which)."""

        def decide(meta: EventMeta) -> Decision:
            runs: list[AgentRun] = []
            seqs: dict[str, list[int]] = {}
            for chunk in cmd.chunks:
                run = self.load(AgentRun, chunk.run_id, actor, Role.ADMIN, cmd.action)
                run.expect_worker(cmd.worker)
                first, last = run.append_log(
                    [(line.at, line.stream, line.text) for line in chunk.lines], meta=meta
                )
                runs.append(run)
                seqs[str(run.id)] = [first, last]
            return Decision(runs[0], "run", list(runs), {"seqs": seqs})

        return self.execute(cmd, actor, self._scope_hint(actor), decide)

    def record_llm_call(self, cmd: m.RecordLlmCall, actor: Actor) -> CommandResult:
        """Record a finished LLM call, its charge and the month's new spend, atomically."""

        def decide(meta: EventMeta) -> Decision:
            run = self.load(AgentRun, cmd.run_id, actor, Role.ADMIN, cmd.action)
            workspace = self.aggregate(Workspace, run.workspace_id)
            billed = billed_amount(cmd.provider_cost_micros, workspace.markup)
            spend = self.spend_for(workspace, cmd.at, meta)
            call = LlmCall(
                call_id=cmd.call_id,
                provider=cmd.provider,
                model=cmd.model,
                input_tokens=cmd.input_tokens,
                output_tokens=cmd.output_tokens,
                latency_ms=cmd.latency_ms,
                provider_cost_micros=cmd.provider_cost_micros,
                billed_micros=billed,
                price_table_version=cmd.price_table_version,
                at=cmd.at,
            )
            charge = charge_llm_call(run, workspace, spend, call, meta=meta)
            return Decision(
                run, "run", [run, charge, spend], {"charge_id": str(charge.id), "billed": billed}
            )

        return self.execute(cmd, actor, self._scope_hint(actor), decide)

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

        return self._change_run(cmd, actor, Role.ADMIN, change)

    def record_run_heartbeat(self, cmd: m.RecordRunHeartbeat, actor: Actor) -> CommandResult:
        return self._change_run(
            cmd, actor, Role.ADMIN, lambda run, meta: run.heartbeat(worker=cmd.worker, meta=meta)
        )

    def reclaim_run(self, cmd: m.ReclaimRun, actor: Actor) -> CommandResult:
        """Take the run over; the calls its workers started and never recorded are charged in
        the same save (``charged_calls`` in the result: their ids)."""

        def decide(meta: EventMeta) -> Decision:
            run = self.load(AgentRun, cmd.run_id, actor, Role.ADMIN, cmd.action)
            expect_version(run, cmd.expected_version)
            run.reclaim(worker=cmd.worker, meta=meta)
            charged, calls = self._charge_open_calls(run, meta)
            return Decision(run, "run", [run, *charged], {"charged_calls": calls})

        return self.execute(cmd, actor, self._scope_hint(actor), decide)

    def charge_orphaned_calls(self, cmd: m.ChargeOrphanedCalls, actor: Actor) -> CommandResult:
        """Charge the calls an ended run's workers started and never recorded, as a takeover
        would have (``charged_calls`` in the result: their ids; none, nothing is written).
        Saved at the version the caller judged the worker dead at: a record of the worker's
        meanwhile makes this conflict, and one after it is answered with this charge."""

        def decide(meta: EventMeta) -> Decision:
            run = self.load(AgentRun, cmd.run_id, actor, Role.ADMIN, cmd.action)
            expect_version(run, cmd.expected_version)
            run.expect_ended()
            charged, calls = self._charge_open_calls(run, meta, error=ORPHANED_CALL_OF_ENDED_RUN)
            return Decision(run, "run", [run, *charged] if calls else [], {"charged_calls": calls})

        return self.execute(cmd, actor, self._scope_hint(actor), decide)

    def start_provider_call(self, cmd: m.StartProviderCall, actor: Actor) -> CommandResult:
        """The worker is about to make a call (``AgentRun.CallStarted``); said again, it is
        answered as the first time and nothing more is written."""
        return self._change_run(
            cmd, actor, Role.ADMIN,
            lambda run, meta: run.start_call(
                call_id=cmd.call_id, worker=cmd.worker, provider=cmd.provider, model=cmd.model,
                input_tokens=cmd.input_tokens, prompt_cost_micros=cmd.prompt_cost_micros,
                price_table_version=cmd.price_table_version, meta=meta,
            ),
        )  # fmt: skip

    def record_provider_attempt(self, cmd: m.RecordProviderAttempt, actor: Actor) -> CommandResult:
        """One provider attempt and, when it used tokens, its charge and the month's spend, in
        one save. The charge's id derives from (run, call id), and a call id recorded already
        is answered as it was the first time, writing nothing, so no call is ever charged
        twice and a record whose answer was lost can be sent again. A worker the run was taken
        over from still records its call (the provider bills it); ``taken_over`` in the result
        tells it the run is no longer its."""

        def decide(meta: EventMeta) -> Decision:
            run = self.load(AgentRun, cmd.run_id, actor, Role.ADMIN, cmd.action)
            recorded = run.recorded_call(cmd.call_id, cmd.worker)
            if recorded is not None:
                extra = _attempt_result(run, cmd.worker, recorded.attempt, recorded.billed_micros)
                if recorded.charge_id is not None:
                    extra["charge_id"] = str(recorded.charge_id)
                return Decision(run, "run", [], extra | {"recorded_before": True})
            workspace = self.aggregate(Workspace, run.workspace_id)
            cost = (
                self.prices.cost(
                    cmd.provider, cmd.model, at=cmd.started_at, input_tokens=cmd.input_tokens,
                    output_tokens=cmd.output_tokens, markup=workspace.markup,
                )
                if cmd.input_tokens > 0 or cmd.output_tokens > 0
                else None
            )  # fmt: skip
            priced = None if cost is None else (cost.provider_cost_micros, cost.billed_micros)
            changed, extra = self._record_attempt(
                run, workspace, cmd, meta, priced=priced, price_table_version=self.prices.version
            )
            return Decision(run, "run", changed, extra)

        return self.execute(cmd, actor, self._scope_hint(actor), decide)

    def _record_attempt(
        self,
        run: AgentRun,
        workspace: Workspace,
        cmd: m.RecordProviderAttempt,
        meta: EventMeta,
        *,
        priced: tuple[int, int] | None,
        price_table_version: str,
        spends: dict[UUID, MonthlySpend] | None = None,
    ) -> tuple[list[Aggregate], dict[str, Any]]:
        """Record ``cmd``'s attempt on ``run`` and, when ``priced`` (provider cost, billed), its
        charge: the aggregates to save (the run among them) and the command's result.
        ``spends``: the months' spends this save changes already, by id (several charges of one
        save add to one spend)."""
        number = run.record_attempt(
            provider=cmd.provider, model=cmd.model, status=cmd.status,
            http_status=cmd.http_status, error=cmd.error, latency_ms=cmd.latency_ms,
            input_tokens=cmd.input_tokens, output_tokens=cmd.output_tokens,
            provider_cost_micros=priced[0] if priced else 0, estimated=cmd.estimated,
            meta=meta, worker=cmd.worker, call_id=cmd.call_id,
        )  # fmt: skip
        changed: list[Aggregate] = [run]
        extra = _attempt_result(run, cmd.worker, number, 0)
        if priced is not None:
            spend = self.spend_for(workspace, cmd.started_at, meta)
            if spends is not None:
                spend = spends.setdefault(spend.id, spend)
            call = LlmCall(
                call_id=cmd.call_id or f"attempt-{number}", provider=cmd.provider,
                model=cmd.model, worker=cmd.worker,
                input_tokens=cmd.input_tokens, output_tokens=cmd.output_tokens,
                latency_ms=cmd.latency_ms, provider_cost_micros=priced[0],
                billed_micros=priced[1], price_table_version=price_table_version,
                at=cmd.started_at,
            )  # fmt: skip
            charge = charge_llm_call(run, workspace, spend, call, meta=meta)
            changed += [charge, spend]
            extra.update(charge_id=str(charge.id), billed=priced[1])
        return changed, extra

    def _charge_open_calls(
        self, run: AgentRun, meta: EventMeta, *, error: str = ORPHANED_CALL
    ) -> tuple[list[Aggregate], list[str]]:
        """Charge every call the run's workers started and never recorded (they stopped during
        it) for its prompt as its worker estimated it, at the prices it named: recorded as
        that worker's failed attempt, under the call's id, so that the worker's own record, if
        it comes after all, is answered with this one and bills nothing more. The aggregates
        changed besides the run, and the calls' ids."""
        if not run.open_calls:
            return [], []
        workspace = self.aggregate(Workspace, run.workspace_id)
        spends: dict[UUID, MonthlySpend] = {}
        changed: dict[UUID, Aggregate] = {}
        calls = list(run.open_calls.values())
        for call in calls:
            attempt = m.RecordProviderAttempt(
                run_id=run.id, worker=call.worker, call_id=call.call_id, provider=call.provider,
                model=call.model, status="failed", error=error, latency_ms=0,
                input_tokens=call.input_tokens, output_tokens=0, estimated=True,
                started_at=call.timestamp,
            )  # fmt: skip
            priced = (
                (call.prompt_cost_micros, billed_amount(call.prompt_cost_micros, workspace.markup))
                if call.input_tokens > 0
                else None
            )
            more, _ = self._record_attempt(
                run, workspace, attempt, meta, priced=priced,
                price_table_version=call.price_table_version, spends=spends,
            )  # fmt: skip
            changed.update((aggregate.id, aggregate) for aggregate in more[1:])
        return list(changed.values()), [call.call_id for call in calls]

    def run_budget(self, run_id: UUID) -> RunBudget:
        """What a running run may still spend of its own budget, and its month's limit."""
        run = self.aggregate(AgentRun, run_id, copy=False)
        workspace = self.aggregate(Workspace, run.workspace_id, copy=False)
        return RunBudget(
            markup=workspace.markup,
            run_billed_micros=run.billed_micros,
            run_max_micros=run.max_cost_micros,
            month_limit_micros=workspace.monthly_limit_micros,
        )

    def run_snapshot(self, run_id: UUID) -> AgentRun:
        """The run as the write model holds it now (read only)."""
        return self.aggregate(AgentRun, run_id)

    def credit_charge(self, cmd: m.CreditCharge, actor: Actor) -> CommandResult:
        def decide(meta: EventMeta) -> Decision:
            charge = self.load(UsageCharge, cmd.charge_id, actor, Role.OWNER, cmd.action)
            amount = parse_usd(cmd.amount)
            # A closed month's statement is final: the correction goes to the first open month,
            # whose spend is saved with it so that a close racing it makes one of them retry.
            spend = self.spend_for(self.aggregate(Workspace, charge.workspace_id), cmd.at, meta)
            charge.correct(
                amount, cmd.reason, refund=cmd.refund, at=cmd.at, meta=meta,
                billed_month=spend.month,
            )  # fmt: skip
            spend.file_correction(charge.id, amount, meta=meta)
            return Decision(charge, "charge", [charge, spend])

        return self.execute(cmd, actor, self._scope_hint(actor), decide)

    def _change_run(
        self,
        cmd: m.RunCommand,
        actor: Actor,
        needed: Role,
        change: Callable[[AgentRun, EventMeta], object],
    ) -> CommandResult:
        """A change of the run alone (its worker's progress, or a member cancelling it)."""
        return self._change(AgentRun, "run", cmd.run_id, cmd, actor, needed=needed, change=change)
