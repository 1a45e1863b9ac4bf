"""Read-your-writes: a consistency token makes a read wait for the write it names."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from uuid import UUID

from api_client import first_change, subscribe, wait_for
from e2e_stack import MakeStack, Stack, user_id

from commands import models as m
from commands.handlers import Actor
from streams.embedded import EmbeddedFanout

CARD = "query($id: ID!) { card(id: $id) { title version } }"
RUN = "query($id: ID!) { agentRun(id: $id) { id status } }"
BOARD_EVENT = """subscription($id: ID!) {
  boardChanged(projectId: $id) { kind runId consistencyToken } }"""
RUN_LOG = "subscription($id: ID!) { agentRunLog(runId: $id) { seq text } }"


def test_a_read_with_the_token_of_a_write_sees_that_write(stack: Stack) -> None:
    alice, ws = stack.owner_with_workspace()
    pid = alice.create_project(ws, "P", [{"name": "Todo"}])["project"]["id"]
    card = alice.create_card(pid, "v0")["card"]["id"]
    actor = Actor(user_id=user_id("alice"), workspace_id=ws)
    for i in range(1, 9):
        # Straight to the write side: nothing in the API waited for the projector.
        result = stack.write.update_card(m.UpdateCard(card_id=UUID(card), title=f"v{i}"), actor)
        answer = alice.post(CARD, {"id": card}, headers={"X-Consistency-Token":
                                                         result.consistency_token})  # fmt: skip
        assert answer.errors == []
        assert not answer.stale
        assert answer.data["card"] == {"title": f"v{i}", "version": i + 1}


def test_every_mutation_payload_shows_its_own_write(stack: Stack) -> None:
    alice, ws = stack.owner_with_workspace()
    pid = alice.create_project(ws, "P", [{"name": "Todo"}, {"name": "Done"}])["project"]["id"]
    card = alice.create_card(pid, "first")["card"]
    assert card["title"] == "first"
    for lane in ("Done", "Todo", "Done"):
        moved = alice.data(
            "mutation($id: ID!, $lane: String!) { moveCard(input: {cardId: $id, toLane: $lane})"
            " { consistencyToken card { lane version } } }",
            {"id": card["id"], "lane": lane},
        )["moveCard"]
        assert moved["card"]["lane"] == lane
        board = alice.data(
            "query($id: ID!) { board(projectId: $id) { lanes { name count } } }",
            {"id": pid},
            headers={"X-Consistency-Token": moved["consistencyToken"]},
        )["board"]
        assert {lane["name"]: lane["count"] for lane in board["lanes"]} == {
            "Todo": int(lane == "Todo"),
            "Done": int(lane == "Done"),
        }


def test_a_read_that_times_out_answers_with_what_there_is_and_says_stale(
    make_stack: MakeStack,
) -> None:
    stack = make_stack(consistency_wait_ms=300)
    boot = Actor(user_id=user_id("alice"), workspace_id="*")
    ws = stack.write.create_workspace(m.CreateWorkspace(name="Acme"), boot).id
    actor = Actor(user_id=user_id("alice"), workspace_id=str(ws))
    pid = stack.write.create_project(m.CreateProject(workspace_id=ws, name="P"), actor).id
    created = stack.write.create_card(m.CreateCard(project_id=pid, title="before"), actor)
    card = str(created.id)
    alice = stack.as_user("alice", ws)
    wait_for(lambda: alice.data(CARD, {"id": card})["card"], timeout=20.0)

    stack.fanout.stop()
    result = stack.write.update_card(m.UpdateCard(card_id=UUID(card), title="after"), actor)
    token = {"X-Consistency-Token": result.consistency_token}
    answer = alice.post(CARD, {"id": card}, headers=token)
    assert answer.status == 200
    assert answer.stale
    assert answer.data["card"]["title"] == "before"

    created_now = alice.post(
        'mutation($id: ID!) { createCard(input: {projectId: $id, title: "new"}) {'
        " consistencyToken card { id } } }",
        {"id": str(pid)},
    )
    assert created_now.stale
    assert created_now.data["createCard"]["card"] is None
    assert created_now.data["createCard"]["consistencyToken"]

    stack.fanout.start()
    wait_for(lambda: not alice.post(CARD, {"id": card}, headers=token).stale, timeout=20.0)
    answer = alice.post(CARD, {"id": card}, headers=token)
    assert answer.data["card"]["title"] == "after"


def test_a_malformed_consistency_token_is_refused(stack: Stack) -> None:
    alice, ws = stack.owner_with_workspace()
    answer = alice.post(
        "query($id: ID!) { workspace(id: $id) { id } }",
        {"id": ws},
        headers={"X-Consistency-Token": "yesterday"},
    )
    assert answer.status == 400
    assert answer.codes == ["VALIDATION"]


def test_a_token_naming_a_write_never_made_is_stale_at_once(stack: Stack) -> None:
    """A version past the card's last, or a position past the log's head: no projector will
    ever reach it, so the read does not poll the database for the whole wait (10 s here)."""
    alice, ws = stack.owner_with_workspace()
    pid = alice.create_project(ws, "P", [{"name": "Todo"}])["project"]["id"]
    created = alice.create_card(pid, "now")
    card = created["card"]["id"]
    position, aggregate, version = created["consistencyToken"].split(":")
    forged = {
        "version from the future": f"{position}:{aggregate}:{int(version) + 1}",
        "position from the future": f"{int(position) + 1_000_000}:{aggregate}:{version}",
    }
    for what, token in forged.items():
        started = time.perf_counter()
        answer = alice.post(CARD, {"id": card}, headers={"X-Consistency-Token": token})
        took = time.perf_counter() - started
        assert (answer.status, answer.data, answer.stale) == (
            200,
            {"card": {"title": "now", "version": 1}},
            True,
        ), what
        assert took < 2.0, f"{what}: the read waited {took:.1f}s for a write never made"
    real = alice.post(
        CARD, {"id": card}, headers={"X-Consistency-Token": created["consistencyToken"]}
    )
    assert not real.stale


def test_a_board_event_carries_a_token_that_reads_what_it_tells_of(make_stack: MakeStack) -> None:
    """The board's subscriber learns of a run from the board's read model, which commits on its
    own: the run panel it opens next reads another (the run's), maybe not there yet. The event's
    consistencyToken makes that read wait for it, as a mutation's token does."""
    stack = make_stack()
    alice, ws = stack.owner_with_workspace()
    pid = alice.create_project(ws, "P", [{"name": "Todo"}])["project"]["id"]
    card = alice.create_card(pid, "build")["card"]["id"]
    board_only = EmbeddedFanout(
        stack.fanout.event_log, [r for r in stack.fanout.runners if r.name == "kanban"]
    )
    with subscribe(stack.ws_url, alice.token, BOARD_EVENT, {"id": pid}) as sub:
        first_change(sub, lambda: alice.create_card(pid, "warm-up"))
        stack.fanout.stop()
        actor = Actor(user_id=user_id("alice"), workspace_id=ws)
        run = str(
            stack.write.start_agent_run(
                m.StartAgentRun(card_id=UUID(card), agent="coder"), actor
            ).id
        )
        board_only.run_once()  # the board tells of the run; the run's own read model has not
        event = sub.next()["data"]["boardChanged"]
        while event["runId"] != run:
            event = sub.next()["data"]["boardChanged"]

    assert alice.data(RUN, {"id": run})["agentRun"] is None
    with ThreadPoolExecutor(1) as reader:
        told = reader.submit(
            alice.post, RUN, {"id": run}, headers={"X-Consistency-Token": event["consistencyToken"]}
        )
        stack.fanout.start()
        answer = told.result(timeout=30)
    assert not answer.stale
    assert answer.data["agentRun"] == {"id": run, "status": "QUEUED"}


def test_a_run_the_board_told_of_can_be_followed_before_its_read_model_holds_it(
    make_stack: MakeStack,
) -> None:
    """On run.requested the run panel subscribes to agentRunLog at once; the run's read model
    may not hold the run yet. The subscription waits for it (as a consistency token would),
    instead of refusing a run that exists as NOT_FOUND."""
    stack = make_stack()
    alice, ws = stack.owner_with_workspace()
    pid = alice.create_project(ws, "P", [{"name": "Todo"}])["project"]["id"]
    card = UUID(alice.create_card(pid, "build")["card"]["id"])
    actor = Actor(user_id=user_id("alice"), workspace_id=ws)
    stack.fanout.stop()
    run_id = stack.write.start_agent_run(m.StartAgentRun(card_id=card, agent="coder"), actor).id
    assert alice.data(RUN, {"id": str(run_id)})["agentRun"] is None

    with subscribe(stack.ws_url, alice.token, RUN_LOG, {"id": str(run_id)}) as sub:
        stack.fanout.start()
        service = Actor.service("orchestrator", UUID(ws))
        stack.write.begin_run(m.BeginRun(run_id=run_id, worker="w1"), service)
        line = m.LogLineInput(at=datetime.now(UTC), text="hello")
        stack.write.append_run_log(m.AppendRunLog(run_id=run_id, lines=[line]), service)
        stack.write.finish_run(m.FinishRun(run_id=run_id, outcome="SUCCEEDED"), service)
        first = sub.next_message(timeout=30)
        assert first["type"] == "next", first
        assert first["payload"]["data"]["agentRunLog"] == {"seq": 1, "text": "hello"}
        assert sub.next_message(timeout=30)["type"] == "complete"
