"""A blocked card keeps its lane whichever way it would leave it: a move, or an archive and a
restore elsewhere (refused alike, ``INVALID_TRANSITION``), until it is unblocked."""

from __future__ import annotations

from e2e_stack import Stack

CARD = "card { lane archived blockedReason }"
BLOCK = f"""mutation($c: ID!) {{
  blockCard(input: {{cardId: $c, reason: "waiting for legal"}}) {{ {CARD} }} }}"""
UNBLOCK = f"mutation($c: ID!) {{ unblockCard(input: {{cardId: $c}}) {{ {CARD} }} }}"
ARCHIVE = f"mutation($c: ID!) {{ archiveCard(input: {{cardId: $c}}) {{ {CARD} }} }}"
RESTORE = f"""mutation($c: ID!, $l: String) {{
  restoreCard(input: {{cardId: $c, lane: $l}}) {{ consistencyToken {CARD} }} }}"""
MOVE = (
    f"mutation($c: ID!, $l: String!) {{ moveCard(input: {{cardId: $c, toLane: $l}}) {{ {CARD} }} }}"
)
BOARD = "query($p: ID!) { board(projectId: $p) { lanes { name cards { edges { node { id } } } } } }"


def test_a_blocked_card_cannot_change_lane_through_archive_and_restore(stack: Stack) -> None:
    alice, ws = stack.owner_with_workspace("blocked-restore", "Blocked restore")
    lanes = [{"name": "Todo"}, {"name": "Doing"}, {"name": "Done"}]
    pid = alice.create_project(ws, "P", lanes)["project"]["id"]
    card = alice.create_card(pid, "Contract", lane="Todo")["card"]["id"]
    alice.data(BLOCK, {"c": card})

    moved = alice.post(MOVE, {"c": card, "l": "Done"})
    assert moved.codes == ["INVALID_TRANSITION"]
    alice.data(ARCHIVE, {"c": card})
    restored = alice.post(RESTORE, {"c": card, "l": "Done"})
    assert restored.codes == ["INVALID_TRANSITION"]
    message = restored.errors[0]["message"]
    assert "blocked" in message
    assert "'Todo'" in message

    # Back into the lane it left (named or by default), still blocked; once unblocked it moves.
    back = alice.data(RESTORE, {"c": card, "l": None})["restoreCard"]
    assert back["card"] == {"lane": "Todo", "archived": False, "blockedReason": "waiting for legal"}
    board = alice.data(BOARD, {"p": pid}, headers={"X-Consistency-Token": back["consistencyToken"]})
    placed = [
        (lane["name"], [edge["node"]["id"] for edge in lane["cards"]["edges"]])
        for lane in board["board"]["lanes"]
    ]
    assert placed == [("Todo", [card]), ("Doing", []), ("Done", [])]
    alice.data(ARCHIVE, {"c": card})
    alice.data(RESTORE, {"c": card, "l": "Todo"})
    alice.data(UNBLOCK, {"c": card})
    assert alice.data(MOVE, {"c": card, "l": "Done"})["moveCard"]["card"]["lane"] == "Done"
