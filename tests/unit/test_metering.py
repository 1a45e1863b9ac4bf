"""Charging one LLM call: the run, its charge and the month's spend, decided together."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from uuid import uuid4

import pytest
from aw_builders import collect, meta, request_run

from domain.agent_run import AgentRun
from domain.errors import InvalidTransition
from domain.metering import LlmCall, charge_llm_call
from domain.usage import MonthlySpend, UsageCharge, charge_id_for
from domain.workspace import Workspace

FEB = datetime(2025, 2, 27, 23, 0, tzinfo=UTC)


def running_run(workspace: Workspace) -> AgentRun:
    run = request_run(workspace_id=workspace.id)
    run.start(worker="w1", meta=meta(workspace.id))
    collect(run)
    return run


def workspace_with(*, markup: str, limit: int | None) -> Workspace:
    workspace_id = uuid4()
    workspace = Workspace.create(
        workspace_id=workspace_id, name="Acme", owner_id="u1", meta=meta(workspace_id)
    )
    workspace.set_plan(
        markup=Decimal(markup), billing_increment_micros=10_000, meta=meta(workspace_id)
    )
    workspace.set_spend_limit(limit, meta=meta(workspace_id))
    collect(workspace)
    return workspace


def open_spend(workspace: Workspace, month: str) -> MonthlySpend:
    spend = MonthlySpend.open(workspace_id=workspace.id, month=month, meta=meta(workspace.id))
    collect(spend)
    return spend


def llm_call(call_id: str = "c1", *, billed: int = 450) -> LlmCall:
    return LlmCall(
        call_id=call_id, provider="openai", model="gpt-x", input_tokens=100, output_tokens=20,
        latency_ms=30, provider_cost_micros=billed // 3, billed_micros=billed,
        price_table_version="2025-01", at=FEB,
    )  # fmt: skip


def test_a_call_is_recorded_on_the_run_charged_and_added_to_the_spends_month() -> None:
    workspace = workspace_with(markup="3", limit=None)
    run = running_run(workspace)
    spend = open_spend(workspace, "2025-03")  # February is closed: the call is billed in March
    charge = charge_llm_call(run, workspace, spend, llm_call(), meta=meta(workspace.id))
    (completed,) = collect(run)
    (charged,) = collect(charge)
    (added,) = collect(spend)
    assert charge.id == charge_id_for(run.id, "c1") == completed.charge_id == added.charge_id
    assert isinstance(charged, UsageCharge.Charged)
    assert (charged.month, charged.markup, charged.timestamp) == ("2025-03", "3", FEB)
    assert (charged.run_id, charged.card_id, charged.project_id) == (
        run.id, run.card_id, run.project_id,
    )  # fmt: skip
    assert (completed.latency_ms, completed.billed_micros, added.billed_micros) == (30, 450, 450)
    assert (run.billed_micros, spend.spent_micros) == (450, 450)


def test_each_threshold_of_the_workspaces_limit_is_noted_once() -> None:
    workspace = workspace_with(markup="3", limit=1_000)
    run = running_run(workspace)
    spend = open_spend(workspace, "2025-02")
    for call_id, billed, crossed in (("c1", 450, []), ("c2", 400, [50, 80]), ("c3", 10, [])):
        charge_llm_call(run, workspace, spend, llm_call(call_id, billed=billed),
                        meta=meta(workspace.id))  # fmt: skip
        events = collect(spend)
        assert [e.threshold for e in events if isinstance(e, MonthlySpend.ThresholdCrossed)] == (
            crossed
        )


def test_a_call_the_run_refuses_leaves_the_spend_untouched() -> None:
    workspace = workspace_with(markup="3", limit=None)
    run = running_run(workspace)
    spend = open_spend(workspace, "2025-02")
    charge_llm_call(run, workspace, spend, llm_call(), meta=meta(workspace.id))
    collect(spend)
    with pytest.raises(InvalidTransition, match="already recorded"):
        charge_llm_call(run, workspace, spend, llm_call(), meta=meta(workspace.id))
    assert (collect(spend), spend.spent_micros) == ([], 450)
