"""A cursor is bound to the list it came from, over HTTP: passed as ``after`` on another list
(another board or instant of a lane, another card's runs, another workspace's activity, the
other filter of a key or invitation list) it is ``VALIDATION``, where it used to page that list
from a wrong place; each list still pages as before. One test per kind of connection."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from typing import Any

import httpx
from api_client import ApiClient
from e2e_stack import Stack
from test_access_lists import INVITATIONS, KEYS, REVOKE_KEY, key_page, new_key
from test_invitations_and_api_keys import INVITE, code, data, gql, owner_and_admin

NOT_THIS_LIST = "does not belong to this list"

LANES = """query($p: ID!, $at: DateTime, $after: String) { board(projectId: $p, asOf: $at) {
  lanes { name cards(first: 2, after: $after) {
    edges { cursor node { title } } pageInfo { hasNextPage hasPreviousPage endCursor } } } } }"""
RUNS = """query($c: ID!, $after: String) { card(id: $c) { runs(first: 1, after: $after) {
  edges { node { id } } pageInfo { hasNextPage endCursor } } } }"""
HISTORY_RUNS = """query($c: ID!, $at: DateTime, $after: String) {
  cardHistory(cardId: $c, asOf: $at) { state { runs(first: 1, after: $after) {
    edges { node { id } } pageInfo { hasNextPage endCursor } } } } }"""
ACTIVITY = """query($w: ID!, $after: String) { activity(workspaceId: $w, first: 2, after: $after) {
  edges { node { position } } pageInfo { hasNextPage endCursor } } }"""


def refused(answer: Any) -> None:
    """Every error of ``answer`` is this refusal (one per list the cursor reached)."""
    assert answer.errors, answer.body
    assert set(answer.codes) == {"VALIDATION"}, answer.body
    assert all(NOT_THIS_LIST in error["message"] for error in answer.errors), answer.body


def pages(
    client: ApiClient, query: str, field: Any, seen: str | None = None, **variables: Any
) -> list[Any]:
    """Every page of a connection (``field`` picks it from the data), ``after`` its endCursor;
    ``seen``: a consistency token to wait for."""
    found: list[Any] = []
    after = None
    while True:
        answer = client.data(query, {**variables, "after": after}, headers=waiting(seen))
        connection = field(answer)
        found.append(connection)
        if not connection["pageInfo"]["hasNextPage"]:
            return found
        after = connection["pageInfo"]["endCursor"]


def waiting(seen: str | None) -> dict[str, str]:
    return {} if seen is None else {"X-Consistency-Token": seen}


def titles(cards: dict[str, Any]) -> list[str]:
    return [edge["node"]["title"] for edge in cards["edges"]]


def test_a_lane_cursor_pages_its_own_lane_only(auth_stack: Stack) -> None:
    alice, ws = auth_stack.owner_with_workspace("lane-cursors")
    lanes = [{"name": "Todo"}, {"name": "Doing"}]
    board, other = (alice.create_project(ws, name, lanes)["project"]["id"] for name in "PQ")
    for project in (board, other):
        for i in range(3):
            alice.create_card(project, f"{project[:4]} todo {i}")
        alice.create_card(project, f"{project[:4]} doing", "Doing")

    todo = pages(alice, LANES, _by_lane("Todo"), p=board)
    assert [title for page in todo for title in titles(page)] == [
        f"{board[:4]} todo {i}" for i in range(3)
    ]
    cursor = todo[0]["pageInfo"]["endCursor"]

    # The same board: the lane it came from pages on, its other lanes answer their first page.
    beside = alice.data(LANES, {"p": board, "after": cursor})["board"]["lanes"]
    assert [titles(lane["cards"]) for lane in beside] == [
        [f"{board[:4]} todo 2"],
        [f"{board[:4]} doing"],
    ]
    assert [lane["cards"]["pageInfo"]["hasPreviousPage"] for lane in beside] == [True, False]
    # Another board (same lane names, same position keys), the same board as it was: refused.
    refused(alice.post(LANES, {"p": other, "after": cursor}))
    refused(alice.post(LANES, {"p": board, "at": datetime.now(UTC).isoformat(), "after": cursor}))


def _by_lane(name: str) -> Any:
    return lambda answer: {lane["name"]: lane["cards"] for lane in answer["board"]["lanes"]}[name]


def test_a_run_cursor_pages_its_own_card_s_runs_only(auth_stack: Stack) -> None:
    alice, ws = auth_stack.owner_with_workspace("run-cursors")
    project = alice.create_project(ws, "P", [{"name": "Todo"}])["project"]["id"]
    card, other = (alice.create_card(project, title)["card"]["id"] for title in ("X", "Y"))
    made = {c: [start_run(alice, c) for _ in range(2)] for c in (card, other)}
    seen = made[other][-1]["consistencyToken"]
    asked = datetime.now(UTC).isoformat()

    live = pages(alice, RUNS, lambda answer: answer["card"]["runs"], seen, c=card)
    assert [len(page["edges"]) for page in live] == [1, 1]
    assert {e["node"]["id"] for page in live for e in page["edges"]} == {
        run["run"]["id"] for run in made[card]
    }
    cursor = live[0]["pageInfo"]["endCursor"]

    refused(alice.post(RUNS, {"c": other, "after": cursor}))
    # A card's history shows its runs now (no asOf) or then (asOf): the live list, and another.
    now = alice.data(HISTORY_RUNS, {"c": card, "after": cursor}, headers=waiting(seen))
    assert now["cardHistory"]["state"]["runs"]["edges"] == live[1]["edges"]
    then = {"c": card, "at": asked, "after": cursor}
    refused(alice.post(HISTORY_RUNS, then))


def start_run(client: ApiClient, card: str) -> Any:
    return client.data(
        'mutation($c: ID!) { startAgentRun(input: {cardId: $c, agent: "coder"}) {'
        " consistencyToken run { id } } }",
        {"c": card},
    )["startAgentRun"]


def test_an_activity_cursor_pages_its_own_workspace_s_feed_only(auth_stack: Stack) -> None:
    alice, ws = auth_stack.owner_with_workspace("feed-cursors", "A")
    _, other = auth_stack.owner_with_workspace("feed-cursors", "B")
    elsewhere = auth_stack.as_user("feed-cursors", other)
    seen = {}
    for workspace, client in ((ws, alice), (other, elsewhere)):
        project = client.create_project(workspace, "P", [{"name": "Todo"}])["project"]["id"]
        seen[workspace] = waiting(client.create_card(project, "card")["consistencyToken"])
    first = elsewhere.data(ACTIVITY, {"w": other}, headers=seen[other])["activity"]
    assert len(first["edges"]) == 2
    assert first["pageInfo"]["hasNextPage"]

    mine = alice.data(ACTIVITY, {"w": ws}, headers=seen[ws])["activity"]
    cursor = mine["pageInfo"]["endCursor"]
    refused(elsewhere.post(ACTIVITY, {"w": other, "after": cursor}))
    assert alice.data(ACTIVITY, {"w": ws, "after": cursor})["activity"]["edges"]

    # A cursor as the version before made them (no list in it) is refused, saying so.
    position = int(first["edges"][-1]["node"]["position"])
    old = base64.urlsafe_b64encode(json.dumps(["activity", position]).encode()).decode()
    answer = elsewhere.post(ACTIVITY, {"w": other, "after": old.rstrip("=")})
    assert answer.codes == ["VALIDATION"]
    assert "earlier version" in answer.errors[0]["message"]


def test_a_key_or_invitation_cursor_pages_its_own_filter_only(
    http: httpx.Client, auth_stack: Stack
) -> None:
    owner, ws, _, admin, _ = owner_and_admin(http, "grant-cursors.test", "Grants")
    made = [new_key(http, admin, ws, f"k{i}", "VIEWER") for i in range(3)]
    revoked = data(gql(http, owner, REVOKE_KEY, k=made[2]["apiKey"]["id"]))["revokeApiKey"]
    for email in ("one@grant-cursors.test", "two@grant-cursors.test"):
        data(gql(http, admin, INVITE, w=ws, e=email, r="VIEWER"))
    seen = revoked["consistencyToken"]

    every = key_page(http, admin, ws, seen, all=True, first=1)
    cursor = every["pageInfo"]["endCursor"]
    assert [e["node"]["id"] for e in every["edges"]] == [made[2]["apiKey"]["id"]]
    assert [e["node"]["id"] for e in key_page(http, admin, ws, seen, all=True, cursor=cursor)[
        "edges"
    ]] == [made[1]["apiKey"]["id"], made[0]["apiKey"]["id"]]  # fmt: skip
    # The live keys only: another list, though the revoked key is this workspace's.
    assert code(gql(http, admin, KEYS, w=ws, cursor=cursor)) == "VALIDATION"

    closed = data(gql(http, admin, INVITATIONS, w=ws, all=True, first=1))
    cursor = closed["workspace"]["invitations"]["pageInfo"]["endCursor"]
    assert data(gql(http, admin, INVITATIONS, w=ws, all=True, cursor=cursor))["workspace"]
    pending = gql(http, admin, INVITATIONS, w=ws, cursor=cursor)
    assert code(pending) == "VALIDATION"
    assert NOT_THIS_LIST in pending.json()["errors"][0]["message"]
