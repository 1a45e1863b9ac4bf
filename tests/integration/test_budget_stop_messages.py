"""A run stopped by a budget says which budget stopped it: its own ``maxCost`` or its
workspace's monthly limit, and the amount of that budget, so that its owner knows what to raise."""

from __future__ import annotations

import pytest
from orchestrator_helpers import (
    card_on_board,
    fast_simulated,
    finished,
    orchestrator_thread,
    wait_for,
)

from commands import models as m
from commands.handlers import AgentWorks
from domain.agent_run import RunStatus

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    ("max_cost", "monthly_limit", "named"),
    [
        # The prompt (~80 tokens) fits in $0.0005 at sim-1 x 5; 400 output tokens do not.
        ("0.0005", None, "the run's maxCost (0.000500)"),
        (None, "0.000500", "the workspace's monthly limit (0.000500)"),
        # The prompt alone is billed about $0.0002: the month's $0.0001 cannot pay for it.
        (None, "0.000100", "the workspace's monthly limit (0.000100)"),
        # Both apply; the month's is the lower.
        ("0.0005", "0.000100", "the workspace's monthly limit (0.000100)"),
    ],
    ids=["max-cost-mid-stream", "month-mid-stream", "month-before-the-call", "lower-of-both"],
)
def test_a_run_stopped_by_a_budget_names_the_budget(
    write_side: AgentWorks,
    database_url: str,
    max_cost: str | None,
    monthly_limit: str | None,
    named: str,
) -> None:
    """Before, every stop read 'budget reached ... (0.000012 was left)': a member could not
    tell the run's own maxCost from the workspace's limit, which only an owner can change."""
    card = card_on_board(write_side)
    owner = card.board.owner
    if monthly_limit is not None:
        write_side.set_spend_limit(
            m.SetSpendLimit(workspace_id=card.board.workspace_id, monthly_limit=monthly_limit),
            owner,
        )
    slow = fast_simulated(tokens_per_second=400, output_tokens=400)
    with orchestrator_thread(database_url, {"simulated": slow}):
        run_id = write_side.start_agent_run(
            m.StartAgentRun(card_id=card.card_id, agent="coder", max_cost=max_cost), owner
        ).id
        run = wait_for(write_side, run_id, finished)
    assert run.status is RunStatus.FAILED
    assert "budget" in (run.error or "")
    assert named in (run.error or ""), run.error
