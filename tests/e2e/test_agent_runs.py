"""Agent runs as a client sees them: started over GraphQL, executed by an orchestrator on the
simulated provider, the log followed live over a subscription, attempts, output and charges read
back from the API."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from api_client import ApiClient, subscribe, wait_for
from e2e_stack import MakeStack, Stack

from adapters.eventlog import EventLog
from adapters.providers.simulated import SimulatedProvider
from infra.bootstrap import build_write_side
from orchestrator.service import Orchestrator, OrchestratorConfig, OrchestratorThread

pytestmark = pytest.mark.slow

RUN_LOG = """
subscription($id: ID!) { agentRunLog(runId: $id) { seq stream text } }
"""
RUN = """
query($id: ID!) { agentRun(id: $id) {
  status output error inputTokens outputTokens providerCost billed logLineCount
  attempts { provider model status httpStatus latencyMs inputTokens outputTokens providerCost }
} }
"""


@contextmanager
def orchestrator(stack: Stack, **provider: Any) -> Iterator[Orchestrator]:
    write = build_write_side(stack.database_url)
    orch = Orchestrator(
        write,
        EventLog(write.recorder, write.mapper),  # type: ignore[arg-type]
        {"simulated": SimulatedProvider(**provider)},
        OrchestratorConfig(heartbeat_interval=1.0),
    )
    thread = OrchestratorThread(orch)
    thread.start()
    try:
        yield orch
    finally:
        thread.stop()
        write.close()


def start_run(client: ApiClient, card: str, **extra: Any) -> Any:
    return client.post(
        "mutation($input: StartAgentRunInput!) { startAgentRun(input: $input) { run { id } } }",
        {"input": {"cardId": card, "agent": "coder", **extra}},
    ).body


def wait_run(client: ApiClient, run: str, *, timeout: float = 30) -> dict[str, Any]:
    found: dict[str, Any] = wait_for(
        lambda: client.data(RUN, {"id": run})["agentRun"],
        timeout=timeout,
        until=lambda run: run["status"] not in ("QUEUED", "RUNNING") and run["attempts"],
        every=0.1,
        what="the run ended",
    )
    return found


def test_a_run_started_from_graphql_streams_its_log_live_and_is_charged(
    make_stack: MakeStack,
) -> None:
    stack = make_stack()
    alice, ws = stack.owner_with_workspace()
    pid = alice.create_project(ws, "P", [{"name": "Todo"}])["project"]["id"]
    card = alice.create_card(pid, "Login page")["card"]["id"]
    with orchestrator(stack, tokens_per_second=40, output_tokens=120):
        run = start_run(alice, card)["data"]["startAgentRun"]["run"]["id"]
        received: list[tuple[float, dict[str, Any]]] = []
        with subscribe(stack.ws_url, alice.token, RUN_LOG, {"id": run}) as sub:
            while True:
                try:
                    line = sub.next(timeout=10)["data"]["agentRunLog"]
                except TimeoutError:
                    break
                received.append((time.monotonic(), line))
                if line["stream"] == "system" and "calling" not in line["text"]:
                    break
                if len([ln for _, ln in received if ln["stream"] == "stdout"]) >= 4:
                    break
        result = wait_run(alice, run)
    assert result["status"] == "SUCCEEDED", result
    stdout = [ln for _, ln in received if ln["stream"] == "stdout"]
    assert len(stdout) >= 4
    # Live, not all at once at the end: the lines came over more than one chunk's interval.
    assert received[-1][0] - received[0][0] > 0.2
    seqs = [ln["seq"] for _, ln in received]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    assert result["output"].startswith(stdout[0]["text"])
    [attempt] = result["attempts"]
    assert (attempt["provider"], attempt["model"], attempt["status"]) == (
        "simulated",
        "sim-1",
        "ok",
    )
    assert attempt["inputTokens"] == result["inputTokens"] > 0
    assert attempt["outputTokens"] == result["outputTokens"] > 0
    assert attempt["providerCost"] == result["providerCost"]
    from decimal import Decimal

    assert Decimal(result["billed"]) == Decimal(result["providerCost"]) * 5

    board = alice.data(
        "query($id: ID!) { card(id: $id) { cost lastRun { id status } } }", {"id": card}
    )["card"]
    assert board["lastRun"] == {"id": run, "status": "SUCCEEDED"}
    assert Decimal(board["cost"]) == Decimal(result["billed"])


def test_bad_agent_or_provider_and_unaffordable_budgets_are_refused(make_stack: MakeStack) -> None:
    stack = make_stack()
    alice, ws = stack.owner_with_workspace()
    pid = alice.create_project(ws, "P", [{"name": "Todo"}])["project"]["id"]
    card = alice.create_card(pid, "x")["card"]["id"]
    codes = {
        "agent": start_run(alice, card, agent="poet"),
        "provider": start_run(alice, card, provider="acme"),
        "model": start_run(alice, card, provider="openai", model="gpt-9"),
        "budget": start_run(alice, card, maxCost="0.000001"),
    }
    assert {k: v["errors"][0]["extensions"]["code"] for k, v in codes.items()} == {
        "agent": "VALIDATION",
        "provider": "VALIDATION",
        "model": "VALIDATION",
        "budget": "BUDGET_EXCEEDED",
    }


def test_a_card_of_an_archived_project_runs_no_agent(make_stack: MakeStack) -> None:
    """An archived project takes no new cards, moves or lane changes; a run on one of its cards
    would be billed to a project the board list no longer shows."""
    stack = make_stack()
    alice, ws = stack.owner_with_workspace()
    pid = alice.create_project(ws, "P", [{"name": "Todo"}])["project"]["id"]
    card = alice.create_card(pid, "x")["card"]["id"]
    alice.data(
        "mutation($id: ID!) { archiveProject(input: {projectId: $id}) { consistencyToken } }",
        {"id": pid},
    )

    refused = start_run(alice, card)

    assert [e["extensions"]["code"] for e in refused["errors"]] == ["INVALID_TRANSITION"]
    assert f"project {pid} is archived" in refused["errors"][0]["message"]
    runs = alice.data(
        "query($id: ID!) { card(id: $id) { runs { edges { node { id } } } } }", {"id": card}
    )
    assert runs["card"]["runs"]["edges"] == []
