"""``cardHistory`` names a card's lane as the board did at the instant shown: a lane renamed
after the card entered it, and before that instant, by its new name (the card's own events never
mention the rename). The live card, ``board(asOf:)`` and ``cardHistory`` agree."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from api_client import ApiClient
    from e2e_stack import Stack

HISTORY = (
    "query($id: ID!, $at: DateTime, $v: Int) { cardHistory(cardId: $id, asOf: $at,"
    " asOfVersion: $v) { version state { lane version } } }"
)
BOARD = (
    "query($id: ID!, $at: DateTime) { board(projectId: $id, asOf: $at) {"
    " lanes { name cards { edges { node { id lane } } } } } }"
)
CARD = "query($id: ID!) { card(id: $id) { lane } }"


def _instant() -> str:
    time.sleep(0.01)
    at = datetime.now(UTC).isoformat()
    time.sleep(0.01)
    return at


def _write(client: ApiClient, mutation: str, input: dict[str, Any]) -> dict[str, str]:
    name = mutation.split("(")[0]
    answer = client.data(
        f"mutation($input: {name[0].upper()}{name[1:]}Input!) {{ {name}(input: $input) {{"
        " consistencyToken } }",
        {"input": input},
    )
    return {"X-Consistency-Token": answer[name]["consistencyToken"]}


def _lane_on_board(client: ApiClient, pid: str, cid: str, at: str) -> str:
    board = client.data(BOARD, {"id": pid, "at": at})["board"]
    (lane,) = [
        edge["node"]["lane"]
        for lane in board["lanes"]
        for edge in lane["cards"]["edges"]
        if edge["node"]["id"] == cid
    ]
    return str(lane)


def _lane_in_history(client: ApiClient, cid: str, **at: Any) -> str:
    return str(client.data(HISTORY, {"id": cid, **at})["cardHistory"]["state"]["lane"])


def test_a_card_in_a_renamed_lane_has_that_lanes_name_then(stack: Stack) -> None:
    alice, ws = stack.owner_with_workspace()
    pid = alice.create_project(ws, "P", [{"name": "Todo"}, {"name": "Doing"}])["project"]["id"]
    cid = alice.create_card(pid, "first", lane="Todo")["card"]["id"]
    before = _instant()
    _write(alice, "renameLane", {"projectId": pid, "lane": "Todo", "name": "Backlog"})
    after = _instant()
    written = _write(alice, "addLane", {"projectId": pid, "name": "Todo"})

    assert alice.data(CARD, {"id": cid}, headers=written)["card"]["lane"] == "Backlog"
    assert _lane_in_history(alice, cid) == "Backlog"
    assert _lane_on_board(alice, pid, cid, after) == "Backlog"
    assert _lane_in_history(alice, cid, at=after) == "Backlog"
    assert _lane_on_board(alice, pid, cid, before) == "Todo"
    assert _lane_in_history(alice, cid, at=before) == "Todo"
    # At a version: as the board named the lane when that version was made.
    assert _lane_in_history(alice, cid, v=1) == "Todo"

    # Moved on into the new lane of the old name: renames before the move are not its lane's.
    _write(alice, "moveCard", {"cardId": cid, "toLane": "Todo"})
    later = _instant()
    assert _lane_in_history(alice, cid) == "Todo"
    assert _lane_in_history(alice, cid, at=later) == "Todo"
    assert _lane_on_board(alice, pid, cid, later) == "Todo"
    assert _lane_in_history(alice, cid, at=after) == "Backlog"
    assert _lane_in_history(alice, cid, v=1) == "Todo"
