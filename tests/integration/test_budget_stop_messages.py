"""A run stopped by a budget says which budget stopped it: its own ``maxCost`` or its
workspace's monthly limit, and the amount of that budget, so that its owner knows what to raise;
and an unpinned run is stopped only when no candidate model's prompt fits what is left."""

from __future__ import annotations

import pytest
from orchestrator_helpers import (
    card_on_board,
    events_of,
    fast_simulated,
    finished,
    orchestrator_thread,
    start,
    wait_for,
)
from provider_servers import FakeProviderServer, Reply, openai_events

from adapters.providers.base import Provider
from adapters.providers.openai import OpenAIProvider
from commands import models as m
from commands.handlers import AgentWorks
from domain.agent_run import AgentRun, RunStatus

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


def test_an_unpinned_run_goes_to_a_model_its_budget_can_pay_for(
    write_side: AgentWorks, database_url: str
) -> None:
    """The fastest model seen (gpt-4o) bills the prompt alone past the run's maxCost, which
    gpt-4o-mini's prompt fits (as startAgentRun judged, taking the run). The run failed 'budget
    reached' with nothing spent; it now asks the next candidate its budget can pay for."""
    card = card_on_board(write_side)
    events = openai_events(["Plan: ship it"], prompt_tokens=150, completion_tokens=5)
    with FakeProviderServer([Reply(events=events)]) as server:
        providers: dict[str, Provider] = {
            "openai": OpenAIProvider(api_key="k", base_url=server.url)
        }
        with orchestrator_thread(database_url, providers) as orchestrator:
            orchestrator.latency.observe("openai", "gpt-4o", 1.0)
            run_id = start(write_side, card, policy="fastest", max_cost="0.0005")
            run = wait_for(write_side, run_id, finished)
    assert run.status is RunStatus.SUCCEEDED, run.error
    assert [r.body["model"] for r in server.requests] == ["gpt-4o-mini"]
    assert 0 < run.billed_micros <= 500
    # The log says the model was not called, and calls only the one that was (it said
    # "calling openai/gpt-4o" first, then that it was not called).
    said = [
        line["text"]
        for chunk in events_of(write_side, run_id, AgentRun.LogChunkAppended)
        for line in chunk.lines
        if "calling" in line["text"]
    ]
    assert [text.split(":")[0] for text in said] == [
        "not calling openai/gpt-4o",
        "calling openai/gpt-4o-mini (attempt 1)",
    ]
