"""The runs projector's attempts and outputs, and budget thresholds in the activity feed, on both
the event-by-event and the batch path (a rebuild must equal the incremental tables)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from read_side_helpers import ReadSide, World, running_run

from commands import models as m
from projections.activity import ActivityProjector
from projections.runs import RunsProjector

NOW = datetime.now(UTC)


@pytest.fixture
def side(shared_side: ReadSide) -> ReadSide:
    return shared_side


def attempt(run_id: object, status: str, tin: int, tout: int, **extra: object) -> m.Command:
    return m.RecordProviderAttempt(
        run_id=run_id, worker="worker-1", provider="simulated", model="sim-1", status=status,
        latency_ms=7, input_tokens=tin, output_tokens=tout, started_at=NOW, **extra,
    )  # fmt: skip


def test_attempts_and_output_are_projected_in_order(side: ReadSide) -> None:
    world: World = side.new_world()
    run_id = running_run(side, world)
    side.app.record_provider_attempt(
        attempt(run_id, "failed", 0, 0, http_status=503, error="down"), world.orchestrator
    )
    side.app.record_provider_attempt(attempt(run_id, "ok", 120, 30), world.orchestrator)
    side.app.finish_run(
        m.FinishRun(run_id=run_id, outcome="SUCCEEDED", worker="worker-1", output="all done"),
        world.orchestrator,
    )
    side.project(RunsProjector())
    rows = side.rows(
        "SELECT attempt, status, http_status, input_tokens, output_tokens, provider_cost_micros,"
        " estimated FROM rm_run_attempts WHERE run_id = %s ORDER BY attempt",
        (run_id,),
    )
    assert [(r["attempt"], r["status"], r["http_status"]) for r in rows] == [
        (1, "failed", 503),
        (2, "ok", None),
    ]
    assert rows[0]["provider_cost_micros"] == 0
    assert rows[1]["provider_cost_micros"] > 0
    run = side.row(
        "SELECT status, provider_cost_micros, llm_calls FROM rm_runs WHERE run_id = %s", (run_id,)
    )
    assert run == {
        "status": "SUCCEEDED",
        "provider_cost_micros": rows[1]["provider_cost_micros"],
        "llm_calls": 1,
    }
    out = side.row("SELECT output FROM rm_run_outputs WHERE run_id = %s", (run_id,))
    assert out == {"output": "all done"}


def test_budget_thresholds_show_in_activity_once_each(side: ReadSide) -> None:
    world: World = side.new_world()
    side.app.set_spend_limit(
        m.SetSpendLimit(workspace_id=world.workspace_id, monthly_limit="0.010000"), world.owner
    )
    run_id = running_run(side, world)
    for _ in range(5):
        side.app.record_provider_attempt(attempt(run_id, "ok", 1000, 0), world.orchestrator)
    side.project(ActivityProjector())
    items = side.rows(
        "SELECT kind, summary FROM rm_activity WHERE workspace_id = %s AND kind = %s"
        " ORDER BY position",
        (world.workspace_id, "budget.threshold"),
    )
    assert [i["summary"].split(" reached ")[1][:4] for i in items] == ["50% ", "80% ", "100%"]
