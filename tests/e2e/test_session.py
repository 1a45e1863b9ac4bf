"""A client's whole session through the API, from a bootstrap token to a reconciled statement."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from uuid import UUID

import psycopg
from api_client import ApiClient, wait_for
from e2e_stack import Stack, user_id

from adapters.eventlog import EventLog
from commands import models as m
from commands.handlers import Actor

BOARD = """
query($id: ID!) {
  board(projectId: $id) {
    projectId version
    lanes { name wipLimit count
      cards(first: 50) { edges { cursor node { id title lane position version
        lastRun { id status agent maxCost billed } cost } }
        pageInfo { hasNextPage endCursor } } }
  }
}
"""


def test_a_client_session_from_bootstrap_to_reconciled_statement(stack: Stack) -> None:
    boot = stack.client(stack.bootstrap_token("alice"))
    created = boot.create_workspace("Acme")
    workspace = created["workspace"]
    assert workspace["name"] == "Acme"
    assert workspace["members"] == [{"userId": user_id("alice"), "role": "OWNER"}]
    assert created["consistencyToken"].count(":") == 2
    ws = workspace["id"]
    alice = stack.as_user("alice", ws)

    project = alice.create_project(
        ws,
        "Launch",
        [{"name": "Todo"}, {"name": "Doing", "wipLimit": 2}, {"name": "Done"}],
    )["project"]
    assert [lane["name"] for lane in project["board"]["lanes"]] == ["Todo", "Doing", "Done"]
    assert project["board"]["lanes"][1]["wipLimit"] == 2
    pid = project["id"]

    cards = [alice.create_card(pid, f"card {i}")["card"] for i in range(3)]
    assert all(card["lane"] == "Todo" for card in cards)
    moved = alice.data(
        "mutation($input: MoveCardInput!) { moveCard(input: $input) { card { id lane version } } }",
        {"input": {"cardId": cards[0]["id"], "toLane": "Doing", "expectedVersion": 1}},
    )["moveCard"]["card"]
    assert moved == {"id": cards[0]["id"], "lane": "Doing", "version": 2}

    run = alice.data(
        "mutation($input: StartAgentRunInput!) { startAgentRun(input: $input) {"
        " consistencyToken run { id status agent cardId maxCost billed logLineCount } } }",
        {"input": {"cardId": cards[0]["id"], "agent": "coder", "maxCost": "5.00"}},
    )["startAgentRun"]["run"]
    assert run["status"] == "QUEUED"
    assert run["maxCost"] == "5.000000"
    assert run["billed"] == "0.000000"

    board = alice.data(BOARD, {"id": pid})["board"]
    counts = {lane["name"]: lane["count"] for lane in board["lanes"]}
    assert counts == {"Todo": 2, "Doing": 1, "Done": 0}
    todo = [edge["node"]["title"] for edge in board["lanes"][0]["cards"]["edges"]]
    assert todo == ["card 1", "card 2"]
    doing = board["lanes"][1]["cards"]["edges"][0]["node"]
    assert doing["lastRun"]["id"] == run["id"]
    assert doing["lastRun"]["status"] == "QUEUED"

    # An orchestrator works the run: it logs and makes one LLM call ($0.01 cost, x5 markup).
    service = Actor.service("orchestrator", ws)
    run_id = UUID(run["id"])
    stack.write.begin_run(m.BeginRun(run_id=run_id, worker="w1"), service)
    now = datetime.now(UTC)
    stack.write.append_run_log(
        m.AppendRunLog(
            run_id=run_id,
            lines=[
                m.LogLineInput(at=now, stream="stdout", text="compiling the frobnicator"),
                m.LogLineInput(at=now, stream="stderr", text="warning: unused import"),
            ],
        ),
        service,
    )
    call = stack.write.record_llm_call(
        m.RecordLlmCall(
            run_id=run_id, call_id="c1", provider="simulated", model="sim-1", input_tokens=100,
            output_tokens=50, latency_ms=20, provider_cost_micros=10_000,
            price_table_version="v1", at=now,
        ),
        service,
    )  # fmt: skip
    token = f"{call.position}:{call.id}:{call.version}"

    run_now = alice.data(
        "query($id: ID!) { agentRun(id: $id) { status billed providerCost inputTokens"
        " outputTokens logLineCount } }",
        {"id": run["id"]},
        headers={"X-Consistency-Token": token},
    )["agentRun"]
    assert run_now == {
        "status": "RUNNING",
        "billed": "0.050000",
        "providerCost": "0.010000",
        "inputTokens": 100,
        "outputTokens": 50,
        "logLineCount": 2,
    }
    lines = alice.data(
        "query($id: ID!) { agentRunLogs(runId: $id, afterSeq: 1) { seq stream text } }",
        {"id": run["id"]},
    )["agentRunLogs"]
    assert lines == [{"seq": 2, "stream": "stderr", "text": "warning: unused import"}]
    hits = alice.data(
        'query($ws: ID!) { searchLogs(workspaceId: $ws, query: "frobnicator") { runId seq } }',
        {"ws": ws},
    )["searchLogs"]
    assert hits == [{"runId": run["id"], "seq": 1}]

    month = now.strftime("%Y-%m")
    wait_for(
        lambda: (
            alice.data(
                "query($ws: ID!, $m: String!) { statement(workspaceId: $ws, month: $m) { total } }",
                {"ws": ws, "m": month},
            )["statement"]["total"]
            != "0.000000"
        )
    )
    statement = alice.data(
        "query($ws: ID!, $m: String!) { statement(workspaceId: $ws, month: $m) {"
        " workspaceId month total lines { projectId description billedExact billed } } }",
        {"ws": ws, "m": month},
    )["statement"]
    assert statement["lines"] == [
        {
            "projectId": pid,
            "description": f"Agent usage, {month}: Launch",
            "billedExact": "0.050000",
            "billed": "0.250000",
        }
    ]
    assert statement["total"] == "0.250000"

    reconciliation = alice.data(
        "query($ws: ID!, $m: String!) { reconciliation(workspaceId: $ws, month: $m) {"
        " month eventLogTotal readModelTotal invoicedTotal ok discrepancies { kind } } }",
        {"ws": ws, "m": month},
    )["reconciliation"]
    assert reconciliation == {
        "month": month,
        "eventLogTotal": "0.050000",
        "readModelTotal": "0.050000",
        "invoicedTotal": None,
        "ok": True,
        "discrepancies": [],
    }

    usage = alice.data(
        "query($ws: ID!, $from: DateTime!, $to: DateTime!) {"
        " usage(workspaceId: $ws, from: $from, to: $to, groupBy: PROJECT) {"
        " key calls inputTokens outputTokens providerCost billed } }",
        {
            "ws": ws,
            "from": (now - timedelta(days=1)).isoformat(),
            "to": (now + timedelta(days=1)).isoformat(),
        },
    )["usage"]
    assert usage == [
        {
            "key": pid,
            "calls": 1,
            "inputTokens": 100,
            "outputTokens": 50,
            "providerCost": "0.010000",
            "billed": "0.050000",
        }
    ]

    spent = alice.data("query($ws: ID!) { workspace(id: $ws) { spentThisMonth } }", {"ws": ws})
    assert spent["workspace"]["spentThisMonth"] == "0.050000"
    cost = alice.data("query($id: ID!) { card(id: $id) { cost } }", {"id": cards[0]["id"]})
    assert cost["card"]["cost"] == "0.050000"


def test_card_history_replays_the_card_at_any_version_and_time(stack: Stack) -> None:
    alice, ws = stack.owner_with_workspace()
    pid = alice.create_project(ws, "P", [{"name": "Todo"}, {"name": "Doing"}])["project"]["id"]
    card = alice.create_card(pid, "write the spec")["card"]
    alice.data(
        'mutation($id: ID!) { updateCard(input: {cardId: $id, title: "write the PRD",'
        ' labels: ["docs"]}) { card { version } } }',
        {"id": card["id"]},
    )
    before_move = datetime.now(UTC)
    time.sleep(0.01)
    alice.data(
        'mutation($id: ID!) { moveCard(input: {cardId: $id, toLane: "Doing"}) { card { id } } }',
        {"id": card["id"]},
    )

    history_query = (
        "query($id: ID!, $v: Int, $at: DateTime) { cardHistory(cardId: $id, asOfVersion: $v,"
        " asOf: $at) { cardId version state { title lane labels version } events { version type"
        " actor position data at } } }"
    )
    now = alice.data(history_query, {"id": card["id"]})["cardHistory"]
    assert now["version"] == 4
    assert now["state"] == {
        "title": "write the PRD", "lane": "Doing", "labels": ["docs"], "version": 4,
    }  # fmt: skip
    assert [e["type"] for e in now["events"]] == [
        "Card.Created", "Card.Edited", "Card.Labelled", "Card.Moved",
    ]  # fmt: skip
    assert {e["actor"] for e in now["events"]} == {user_id("alice")}
    assert now["events"][3]["data"]["to_lane"] == "Doing"
    positions = [int(e["position"]) for e in now["events"]]
    assert positions == sorted(positions)

    first = alice.data(history_query, {"id": card["id"], "v": 1})["cardHistory"]
    assert first["state"] == {"title": "write the spec", "lane": "Todo", "labels": [], "version": 1}
    assert len(first["events"]) == 1

    at_time = alice.data(history_query, {"id": card["id"], "at": before_move.isoformat()})
    assert at_time["cardHistory"]["version"] == 3
    assert at_time["cardHistory"]["state"]["lane"] == "Todo"

    too_far = alice.post(history_query, {"id": card["id"], "v": 9})
    assert too_far.codes == ["VALIDATION"]
    before_creation = alice.post(history_query, {"id": card["id"], "at": "2001-01-01T00:00:00Z"})
    assert before_creation.codes == ["NOT_FOUND"]


def test_connections_page_with_opaque_cursors(stack: Stack) -> None:
    alice, ws = stack.owner_with_workspace()
    pid = alice.create_project(ws, "P", [{"name": "Todo"}])["project"]["id"]
    titles = [f"card {i:02d}" for i in range(7)]
    for title in titles:
        last = alice.create_card(pid, title)
    # The payload waited for the board only; the feed's projector may still be behind.
    projected = {"X-Consistency-Token": last["consistencyToken"]}
    page_query = (
        "query($id: ID!, $after: String) { board(projectId: $id) { lanes {"
        " cards(first: 3, after: $after) { edges { cursor node { title } }"
        " pageInfo { hasNextPage endCursor } } } } }"
    )
    seen: list[str] = []
    after = None
    while True:
        lane = alice.data(page_query, {"id": pid, "after": after})["board"]["lanes"][0]
        seen += [edge["node"]["title"] for edge in lane["cards"]["edges"]]
        if not lane["cards"]["pageInfo"]["hasNextPage"]:
            break
        after = lane["cards"]["pageInfo"]["endCursor"]
    assert seen == titles

    feed_query = (
        "query($ws: ID!, $after: String) { activity(workspaceId: $ws, first: 4, after: $after) {"
        " edges { cursor node { kind position } } pageInfo { hasNextPage endCursor } } }"
    )
    items: list[int] = []
    after = None
    while True:
        page = alice.data(feed_query, {"ws": ws, "after": after}, headers=projected)["activity"]
        items += [int(edge["node"]["position"]) for edge in page["edges"]]
        if not page["pageInfo"]["hasNextPage"]:
            break
        after = page["pageInfo"]["endCursor"]
    assert items == sorted(items, reverse=True)
    assert len(items) == len(set(items)) >= 9  # workspace, project, seven cards

    bogus = alice.post(feed_query, {"ws": ws, "after": "not-a-cursor"})
    assert bogus.codes == ["VALIDATION"]
    wrong_list = alice.post(feed_query, {"ws": ws, "after": lane["cards"]["pageInfo"]["endCursor"]})
    assert wrong_list.codes == ["VALIDATION"]
    too_big = alice.post(
        "query($ws: ID!) { activity(workspaceId: $ws, first: 5000) { edges { cursor } } }",
        {"ws": ws},
    )
    assert too_big.codes == ["VALIDATION"]


def test_a_retried_command_id_returns_the_first_result(stack: Stack) -> None:
    alice: ApiClient
    alice, ws = stack.owner_with_workspace()
    pid = alice.create_project(ws, "P", [{"name": "Todo"}])["project"]["id"]
    mutation = (
        "mutation($input: CreateCardInput!) { createCard(input: $input) {"
        " consistencyToken card { id title } } }"
    )
    command = {
        "projectId": pid,
        "title": "once",
        "commandId": "7b0b8c1e-0f5e-4a4e-9b1a-1c2d3e4f5a6b",
    }
    first = alice.data(mutation, {"input": command})["createCard"]
    again = alice.data(mutation, {"input": command})["createCard"]
    assert again == first
    board = alice.data(
        "query($id: ID!) { board(projectId: $id) { lanes { count } } }", {"id": pid}
    )["board"]
    assert board["lanes"][0]["count"] == 1


def test_request_id_and_traceparent_travel_into_the_events(stack: Stack) -> None:
    alice, ws = stack.owner_with_workspace()
    pid = alice.create_project(ws, "P", [{"name": "Todo"}])["project"]["id"]
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    answer = alice.post(
        'mutation($id: ID!) { createCard(input: {projectId: $id, title: "traced"}) {'
        " card { id } } }",
        {"id": pid},
        headers={"traceparent": traceparent, "X-Request-Id": "req-42"},
    )
    assert answer.headers["X-Request-Id"] == "req-42"
    card_id = UUID(answer.data["createCard"]["card"]["id"])
    log = EventLog(stack.write.recorder, stack.write.mapper)  # type: ignore[arg-type]
    (created,) = log.between(card_id, after_version=0, before_version=2)
    assert created.metadata["traceparent"] == traceparent
    assert created.metadata["correlation_id"] == "req-42"
    assert created.metadata["actor"] == user_id("alice")


def test_reconciliation_reports_a_read_model_that_drifted_from_the_log(stack: Stack) -> None:
    alice, ws = stack.owner_with_workspace("rita", "Drift")
    pid = alice.create_project(ws, "P", [{"name": "Todo"}])["project"]["id"]
    card = alice.create_card(pid, "c")["card"]["id"]
    run = UUID(alice.start_agent_run(card)["run"]["id"])
    service = Actor.service("orchestrator", ws)
    stack.write.begin_run(m.BeginRun(run_id=run, worker="w"), service)
    now = datetime.now(UTC)
    call = stack.write.record_llm_call(
        m.RecordLlmCall(
            run_id=run, call_id="c1", provider="p", model="m", input_tokens=1, output_tokens=1,
            latency_ms=1, provider_cost_micros=200_000, price_table_version="v1", at=now,
        ),
        service,
    )  # fmt: skip
    month = now.strftime("%Y-%m")
    query = (
        "query($ws: ID!, $m: String!) { reconciliation(workspaceId: $ws, month: $m) {"
        " eventLogTotal readModelTotal ok discrepancies { kind key expected actual } } }"
    )
    charge = UUID(call.extra["charge_id"])
    wait_for(lambda: alice.data(query, {"ws": ws, "m": month})["reconciliation"]["readModelTotal"]
              == "1.000000")  # fmt: skip
    assert alice.data(query, {"ws": ws, "m": month})["reconciliation"]["ok"] is True

    # Someone edits the ledger behind the projector's back (as the database owner could).
    with psycopg.connect(stack.database_url, autocommit=True) as conn:
        conn.execute(
            "UPDATE rm_ledger_entries SET billed_micros = billed_micros - 1 WHERE charge_id = %s",
            (charge,),
        )
    drifted = alice.data(query, {"ws": ws, "m": month})["reconciliation"]
    assert drifted["ok"] is False
    assert drifted["eventLogTotal"] == "1.000000"
    assert drifted["readModelTotal"] == "0.999999"
    assert drifted["discrepancies"] == [
        {"kind": "ledger", "key": pid, "expected": "1.000000", "actual": "0.999999"}
    ]
