"""Read-your-writes: a consistency token makes a read wait for the write it names."""

from __future__ import annotations

import time
from uuid import UUID

from api_client import wait_for
from e2e_stack import MakeStack, Stack, user_id

from commands import models as m
from commands.handlers import Actor

CARD = "query($id: ID!) { card(id: $id) { title version } }"


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
