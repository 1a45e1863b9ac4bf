"""``board(projectId, asOf)`` over HTTP: the board as it was, folded from the event store."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from e2e_stack import Stack

BOARD = (
    "query($id: ID!, $at: DateTime) { board(projectId: $id, asOf: $at) { projectId version"
    " lanes { name wipLimit count cards { edges { node { id title lane position version } } } } } }"
)
PAGE = (
    "query($id: ID!, $at: DateTime, $after: String) { board(projectId: $id, asOf: $at) {"
    " lanes { cards(first: 1, after: $after) { edges { node { title } }"
    " pageInfo { hasNextPage endCursor } } } } }"
)


def _titles(board: dict[str, Any]) -> dict[str, list[str]]:
    return {
        lane["name"]: [e["node"]["title"] for e in lane["cards"]["edges"]]
        for lane in board["lanes"]
    }


def test_board_as_of_shows_the_board_then_and_now(stack: Stack) -> None:
    alice, ws = stack.owner_with_workspace()
    pid = alice.create_project(ws, "P", [{"name": "Todo"}, {"name": "Doing", "wipLimit": 2}])[
        "project"
    ]["id"]
    first = alice.create_card(pid, "first")["card"]
    alice.create_card(pid, "second")
    time.sleep(0.01)
    then = datetime.now(UTC)
    time.sleep(0.01)
    moved = alice.data(
        'mutation($id: ID!) { moveCard(input: {cardId: $id, toLane: "Doing"}) {'
        " consistencyToken } }",
        {"id": first["id"]},
    )["moveCard"]

    at_then = alice.data(BOARD, {"id": pid, "at": then.isoformat()})["board"]
    assert _titles(at_then) == {"Todo": ["first", "second"], "Doing": []}
    assert [lane["count"] for lane in at_then["lanes"]] == [2, 0]
    assert at_then["lanes"][1]["wipLimit"] == 2

    written = {"X-Consistency-Token": moved["consistencyToken"]}
    live = alice.data(BOARD, {"id": pid}, headers=written)["board"]
    assert _titles(live) == {"Todo": ["second"], "Doing": ["first"]}
    now = alice.data(BOARD, {"id": pid, "at": datetime.now(UTC).isoformat()})["board"]
    assert now == live
    assert at_then["version"] < live["version"]

    pages: list[str] = []
    after: str | None = None
    while True:
        lanes = alice.data(PAGE, {"id": pid, "at": then.isoformat(), "after": after})["board"][
            "lanes"
        ]
        todo = lanes[0]["cards"]
        pages.extend(e["node"]["title"] for e in todo["edges"])
        if not todo["pageInfo"]["hasNextPage"]:
            break
        after = todo["pageInfo"]["endCursor"]
    assert pages == ["first", "second"]


def test_board_before_the_project_or_of_another_workspace_is_null(stack: Stack) -> None:
    alice, ws = stack.owner_with_workspace()
    pid = alice.create_project(ws, "P", [{"name": "Todo"}])["project"]["id"]
    before = alice.data(BOARD, {"id": pid, "at": "2001-01-01T00:00:00Z"})
    assert before["board"] is None
    mallory, _ = stack.owner_with_workspace()
    assert mallory.data(BOARD, {"id": pid, "at": datetime.now(UTC).isoformat()})["board"] is None


def test_an_instant_out_of_range_in_utc_is_validation(stack: Stack) -> None:
    """Year 1 an hour east of UTC (or 9999 an hour west) is a year DateTime cannot hold in UTC:
    refused as input (VALIDATION), never an internal error."""
    alice, ws = stack.owner_with_workspace()
    pid = alice.create_project(ws, "P", [{"name": "Todo"}])["project"]["id"]
    cid = alice.create_card(pid, "first")["card"]["id"]
    history = "query($id: ID!, $at: DateTime) { cardHistory(cardId: $id, asOf: $at) { version } }"
    for at in ("0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"):
        assert alice.post(BOARD, {"id": pid, "at": at}).codes == ["VALIDATION"]
        assert alice.post(history, {"id": cid, "at": at}).codes == ["VALIDATION"]
        literal = f'{{ board(projectId: "{pid}", asOf: "{at}") {{ version }} }}'
        assert alice.post(literal).codes == ["VALIDATION"]
