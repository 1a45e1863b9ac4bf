"""Agent-run and usage commands through the write side: roles, tenancy, charges and budgets."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import partial
from typing import Any
from uuid import UUID

import pytest
from aw_builders import World, assert_refused, assert_role_matrix, position_of_log, stored_events
from eventsourcing.application import AggregateNotFoundError

from commands import models as m
from commands.handlers import Actor, CommandResult
from domain.agent_run import AgentRun, RunStatus
from domain.errors import (
    BudgetExceeded,
    InvalidTransition,
    NotFound,
    ValidationFailed,
)
from domain.money import billed_amount
from domain.roles import Role
from domain.usage import MonthlySpend, UsageCharge, charge_id_for, month_of, spend_id_for

ROLES = list(Role)
NOW = datetime.now(UTC)


def _now() -> datetime:
    """Now: a correction is dated after the charge it corrects (``charged`` charges it now)."""
    return datetime.now(UTC)


def queued(world: World) -> UUID:
    return world.run()


def running(world: World) -> UUID:
    return world.run(begin=True)


def charged(world: World) -> UUID:
    run_id = world.run(begin=True)
    return UUID(world.llm_call(run_id, call_id="c1", cost=1_000).extra["charge_id"])


@dataclass(frozen=True)
class Spec:
    name: str
    needed: Role
    prepare: Callable[[World], Any]
    send: Callable[[World, Any, Actor], CommandResult]

    def __str__(self) -> str:
        return self.name


SPECS = [
    Spec(
        "startAgentRun",
        Role.MEMBER,
        lambda w: w.card_id,
        lambda w, card, a: w.app.start_agent_run(m.StartAgentRun(card_id=card, agent="coder"), a),
    ),
    Spec(
        "cancelAgentRun",
        Role.MEMBER,
        queued,
        lambda w, run, a: w.app.cancel_agent_run(m.CancelAgentRun(run_id=run), a),
    ),
    Spec(
        "beginRun",
        Role.ADMIN,
        queued,
        lambda w, run, a: w.app.begin_run(m.BeginRun(run_id=run, worker="w9"), a),
    ),
    Spec(
        "startRunStep",
        Role.ADMIN,
        running,
        lambda w, run, a: w.app.start_run_step(m.StartRunStep(run_id=run, step=1, name="s"), a),
    ),
    Spec(
        "appendRunLog",
        Role.ADMIN,
        running,
        lambda w, run, a: w.app.append_run_log(
            m.AppendRunLog(run_id=run, lines=[m.LogLineInput(at=NOW, text="hi")]), a
        ),
    ),
    Spec(
        "appendRunLogs",
        Role.ADMIN,
        running,
        lambda w, run, a: w.app.append_run_logs(
            m.AppendRunLogs(
                chunks=[m.RunLogChunk(run_id=run, lines=[m.LogLineInput(at=NOW, text="hi")])]
            ),
            a,
        ),
    ),
    Spec("recordLlmCall", Role.ADMIN, running, lambda w, run, a: w.llm_call(run, actor=a)),
    Spec(
        "finishRun",
        Role.ADMIN,
        running,
        lambda w, run, a: w.app.finish_run(m.FinishRun(run_id=run, outcome="SUCCEEDED"), a),
    ),
    Spec(
        "creditCharge",
        Role.OWNER,
        charged,
        lambda w, charge, a: w.app.credit_charge(
            m.CreditCharge(charge_id=charge, amount="0.000001", reason="r", at=_now()), a
        ),
    ),
]


@pytest.mark.parametrize("role", ROLES, ids=str)
@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_role_matrix_of_run_and_usage_commands(spec: Spec, role: Role) -> None:
    world = World.build()
    target = spec.prepare(world)
    assert_role_matrix(world, role, spec.needed, lambda actor: spec.send(world, target, actor))


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_user_who_is_not_a_member_gets_not_found(spec: Spec) -> None:
    world = World.build()
    target = spec.prepare(world)
    stranger = world.actor("stranger")
    assert_refused(world.app, NotFound, lambda: spec.send(world, target, stranger))


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_another_workspaces_runs_and_charges_answer_not_found(spec: Spec) -> None:
    world = World.build()
    target = spec.prepare(world)
    other = World.build(app=world.app, owner="mallory")
    for intruder in (other.owner, other.service()):
        error = assert_refused(world.app, NotFound, partial(spec.send, world, target, intruder))
        assert error.message.endswith(f"{target} does not exist")


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_orchestrator_service_may_act_without_membership(spec: Spec) -> None:
    world = World.build()
    target = spec.prepare(world)
    assert spec.send(world, target, world.service()).position > 0


def test_ids_of_the_wrong_aggregate_type_answer_not_found() -> None:
    world = World.build()
    run_id = world.run(begin=True)
    app, owner = world.app, world.owner
    for send in (
        lambda: app.start_agent_run(m.StartAgentRun(card_id=run_id, agent="a"), owner),
        lambda: app.cancel_agent_run(m.CancelAgentRun(run_id=world.card_id), owner),
        lambda: world.llm_call(world.project_id),
        lambda: app.credit_charge(
            m.CreditCharge(charge_id=run_id, amount="1", reason="r", at=NOW), owner
        ),
    ):
        error = assert_refused(app, NotFound, send)
        assert "does not exist" in error.message


# -- the run lifecycle ------------------------------------------------------------------------


def test_a_run_goes_from_queued_to_succeeded_through_the_commands() -> None:
    world = World.build()
    run_id = world.run()
    run: AgentRun = world.get(run_id)
    assert (run.status, run.card_id, run.project_id) == (
        RunStatus.QUEUED,
        world.card_id,
        world.project_id,
    )
    world.app.begin_run(m.BeginRun(run_id=run_id, worker="w1"), world.service())
    world.app.start_run_step(m.StartRunStep(run_id=run_id, step=1, name="plan"), world.service())
    world.app.finish_run(m.FinishRun(run_id=run_id, outcome="SUCCEEDED"), world.service())
    assert world.get(run_id).status is RunStatus.SUCCEEDED


@pytest.mark.parametrize(
    ("outcome", "status", "error"),
    [
        ("FAILED", RunStatus.FAILED, "boom"),
        ("TIMED_OUT", RunStatus.TIMED_OUT, "timed out after 0s"),
    ],
)
def test_finish_run_records_the_outcome(outcome: str, status: RunStatus, error: str) -> None:
    world = World.build()
    run_id = world.run(begin=True)
    cmd = m.FinishRun(run_id=run_id, outcome=outcome, error="boom" if outcome == "FAILED" else None)
    world.app.finish_run(cmd, world.service())
    run: AgentRun = world.get(run_id)
    assert (run.status, run.error) == (status, error)


def test_beginning_a_run_twice_is_refused_and_names_the_run() -> None:
    world = World.build()
    run_id = world.run(begin=True)
    cmd = m.BeginRun(run_id=run_id, worker="w2")
    error = world.refuses(InvalidTransition, world.app.begin_run, cmd, world.service())
    assert str(run_id) in error.message


def test_cancelling_a_finished_run_is_refused() -> None:
    world = World.build()
    run_id = world.run(begin=True)
    world.app.finish_run(m.FinishRun(run_id=run_id, outcome="SUCCEEDED"), world.service())
    cmd = m.CancelAgentRun(run_id=run_id)
    error = world.refuses(InvalidTransition, world.app.cancel_agent_run, cmd)
    assert str(run_id) in error.message


def test_log_chunks_get_contiguous_sequence_numbers() -> None:
    world = World.build()
    run_id = world.run(begin=True)
    lines = [m.LogLineInput(at=NOW, text=f"l{i}") for i in range(3)]
    first = world.app.append_run_log(m.AppendRunLog(run_id=run_id, lines=lines), world.service())
    second = world.app.append_run_log(
        m.AppendRunLog(run_id=run_id, lines=lines[:2]), world.service()
    )
    assert first.extra == {"first_seq": 1, "last_seq": 3}
    assert second.extra == {"first_seq": 4, "last_seq": 5}


def test_log_lines_for_a_queued_run_are_refused() -> None:
    world = World.build()
    run_id = world.run()
    cmd = m.AppendRunLog(run_id=run_id, lines=[m.LogLineInput(at=NOW, text="x")])
    world.refuses(InvalidTransition, world.app.append_run_log, cmd, world.service())


def test_start_agent_run_rejects_a_non_positive_budget() -> None:
    world = World.build()
    cmd = m.StartAgentRun(card_id=world.card_id, agent="coder", max_cost="0")
    error = world.refuses(ValidationFailed, world.app.start_agent_run, cmd)
    assert "maxCost" in error.message


# -- LLM calls and charges --------------------------------------------------------------------


def test_record_llm_call_saves_run_charge_and_monthly_spend_together() -> None:
    world = World.build()
    run_id = world.run(begin=True)
    world.app.set_plan(
        m.SetPlan(workspace_id=world.workspace_id, markup="1.5", billing_increment="0.25"),
        world.operator(),
    )
    before = position_of_log(world.app)
    result = world.llm_call(run_id, call_id="c1", cost=333, at=NOW)
    new = stored_events(world.app)[before:]
    charge_id = charge_id_for(run_id, "c1")
    spend_id = spend_id_for(world.workspace_id, month_of(NOW))
    assert {type(e).__name__ for e in new} == {"LlmCallCompleted", "Charged", "Opened", "Added"}
    assert {e.originator_id for e in new} == {run_id, charge_id, spend_id}
    assert len({e.meta["command_id"] for e in new}) == 1
    assert result.position == position_of_log(world.app)
    billed = billed_amount(333, Decimal("1.5"))
    assert billed == 500
    assert result.extra == {"charge_id": str(charge_id), "billed": billed}
    charge: UsageCharge = world.get(charge_id)
    spend: MonthlySpend = world.get(spend_id)
    run: AgentRun = world.get(run_id)
    assert (charge.billed_micros, spend.spent_micros, run.billed_micros) == (500, 500, 500)
    assert run.provider_cost_micros == 333


def test_second_call_in_a_month_adds_to_the_same_monthly_spend() -> None:
    world = World.build()
    run_id = world.run(begin=True)
    world.llm_call(run_id, cost=100, at=NOW)
    world.llm_call(run_id, cost=7, at=NOW)
    spend = world.get(spend_id_for(world.workspace_id, month_of(NOW)))
    assert spend.spent_micros == 535
    assert spend.version == 3


def test_duplicate_llm_call_id_is_refused_and_bills_nothing() -> None:
    world = World.build()
    run_id = world.run(begin=True)
    world.llm_call(run_id, call_id="c1", cost=100, at=NOW)
    error = assert_refused(
        world.app, InvalidTransition, lambda: world.llm_call(run_id, call_id="c1", cost=100, at=NOW)
    )
    assert "c1" in error.message
    assert str(run_id) in error.message
    assert world.get(spend_id_for(world.workspace_id, month_of(NOW))).spent_micros == 500


def test_llm_call_for_a_run_that_is_not_running_is_refused() -> None:
    world = World.build()
    run_id = world.run()
    error = assert_refused(world.app, InvalidTransition, lambda: world.llm_call(run_id))
    assert str(run_id) in error.message


def test_calls_in_another_month_go_to_that_months_spend() -> None:
    world = World.build()
    run_id = world.run(begin=True)
    earlier = NOW - timedelta(days=40)
    world.llm_call(run_id, cost=10, at=earlier)
    assert world.get(spend_id_for(world.workspace_id, month_of(earlier))).spent_micros == 50
    with pytest.raises(AggregateNotFoundError):
        world.get(spend_id_for(world.workspace_id, month_of(NOW)))


def test_credit_cannot_exceed_what_the_charge_still_bills() -> None:
    world = World.build()
    charge_id = charged(world)  # 1_000 micros at markup 5 -> 5_000 billed
    credit = m.CreditCharge(charge_id=charge_id, amount="0.003", reason="goodwill", at=_now())
    world.app.credit_charge(credit, world.owner)
    refund = m.CreditCharge(
        charge_id=charge_id, amount="0.002001", reason="outage", refund=True, at=_now()
    )
    error = world.refuses(InvalidTransition, world.app.credit_charge, refund)
    assert str(charge_id) in error.message
    assert world.get(charge_id).net_micros == 2_000


def test_negative_credit_is_refused() -> None:
    world = World.build()
    charge_id = charged(world)
    cmd = m.CreditCharge(charge_id=charge_id, amount="-1", reason="r", at=NOW)
    world.refuses(ValidationFailed, world.app.credit_charge, cmd)


# -- spend limit ------------------------------------------------------------------------------


def set_limit(world: World, usd: str | None) -> None:
    world.app.set_spend_limit(
        m.SetSpendLimit(workspace_id=world.workspace_id, monthly_limit=usd), world.owner
    )


def test_start_agent_run_is_refused_once_the_months_spend_reached_the_limit() -> None:
    world = World.build()
    set_limit(world, "0.001")  # 1_000 micros
    run_id = world.run(begin=True)
    world.llm_call(run_id, cost=199)  # billed 995: still room
    world.run()
    world.llm_call(run_id, cost=1)  # billed 5: exactly at the limit
    cmd = m.StartAgentRun(card_id=world.card_id, agent="coder")
    error = world.refuses(BudgetExceeded, world.app.start_agent_run, cmd)
    assert str(world.workspace_id) in error.message
    assert month_of(NOW) in error.message


def test_calls_that_happened_are_recorded_even_past_the_limit() -> None:
    world = World.build()
    set_limit(world, "0.000001")
    run_id = world.run(begin=True)
    world.llm_call(run_id, cost=1_000)
    world.llm_call(run_id, cost=1_000)
    assert world.get(run_id).billed_micros == 10_000


def test_raising_or_clearing_the_limit_lets_runs_start_again() -> None:
    world = World.build()
    set_limit(world, "0.000010")
    run_id = world.run(begin=True)
    world.llm_call(run_id, cost=2)
    cmd = m.StartAgentRun(card_id=world.card_id, agent="coder")
    world.refuses(BudgetExceeded, world.app.start_agent_run, cmd)
    set_limit(world, "0.000011")
    world.app.start_agent_run(cmd, world.owner)
    set_limit(world, None)
    world.app.start_agent_run(cmd, world.owner)


def test_zero_limit_refuses_every_run() -> None:
    world = World.build()
    set_limit(world, "0")
    cmd = m.StartAgentRun(card_id=world.card_id, agent="coder")
    world.refuses(BudgetExceeded, world.app.start_agent_run, cmd)


def test_last_months_spend_does_not_count_against_this_month() -> None:
    world = World.build()
    set_limit(world, "0.000010")
    run_id = world.run(begin=True)
    world.llm_call(run_id, cost=1_000, at=NOW - timedelta(days=40))
    world.app.start_agent_run(m.StartAgentRun(card_id=world.card_id, agent="coder"), world.owner)


def test_several_runs_chunks_are_saved_in_one_command_with_their_own_sequences() -> None:
    world = World.build()
    first, second = world.run(begin=True), world.run(begin=True)
    world.app.append_run_log(
        m.AppendRunLog(run_id=first, lines=[m.LogLineInput(at=NOW, text="before")]),
        world.service(),
    )
    lines = [m.LogLineInput(at=NOW, text=f"l{i}") for i in range(2)]
    result = world.app.append_run_logs(
        m.AppendRunLogs(
            worker="w1",
            chunks=[
                m.RunLogChunk(run_id=first, lines=lines),
                m.RunLogChunk(run_id=second, lines=lines),
            ],
        ),
        world.service(),
    )
    assert result.extra == {"seqs": {str(first): [2, 3], str(second): [1, 2]}}
    for run_id, count in ((first, 3), (second, 2)):
        run: AgentRun = world.get(run_id)
        assert run.next_seq == count + 1


def test_a_group_with_one_refusing_run_writes_nothing() -> None:
    world = World.build()
    live, ended = world.run(begin=True), world.run(begin=True)
    world.app.cancel_agent_run(m.CancelAgentRun(run_id=ended), world.owner)
    lines = [m.LogLineInput(at=NOW, text="x")]
    cmd = m.AppendRunLogs(
        worker="w1",
        chunks=[m.RunLogChunk(run_id=live, lines=lines), m.RunLogChunk(run_id=ended, lines=lines)],
    )
    world.refuses(InvalidTransition, world.app.append_run_logs, cmd, world.service())
    run: AgentRun = world.get(live)
    assert run.next_seq == 1


def test_a_group_names_each_run_once() -> None:
    lines = [m.LogLineInput(at=NOW, text="x")]
    run_id = UUID("0f6d1c4e-2a3b-4c5d-8e9f-a0b1c2d3e4f5")
    with pytest.raises(ValueError, match="more than one chunk"):
        m.AppendRunLogs(chunks=[m.RunLogChunk(run_id=run_id, lines=lines)] * 2)
