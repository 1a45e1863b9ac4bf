"""Who acted, as the API names them: IDs are UUIDs (API.md), a service's included."""

from __future__ import annotations

import time
from typing import Any
from uuid import UUID

from api_client import ApiClient
from e2e_stack import Stack
from users import user_id

ACTIVITY = """query($w: ID!) { activity(workspaceId: $w, first: 50) {
  edges { node { actor actorService kind } } } }"""
HISTORY = "query($c: ID!) { cardHistory(cardId: $c) { events { actor actorService type } } }"


def _activity_once(client: ApiClient, workspace: str, kind: str) -> list[dict[str, Any]]:
    """The workspace's activity once it shows an item of ``kind`` (its projector may lag the
    write it tells of)."""
    deadline = time.monotonic() + 20
    while True:
        edges = client.data(ACTIVITY, {"w": workspace})["activity"]["edges"]
        items = [edge["node"] for edge in edges]
        if any(item["kind"] == kind for item in items) or time.monotonic() > deadline:
            return items
        time.sleep(0.05)


def test_a_services_actor_is_a_stable_uuid_with_the_services_name_beside_it(stack: Stack) -> None:
    """The orchestrator's events were answered with actor "orchestrator": no UUID, though the
    field is an ID, so a client that looks actors up among members by id failed on it."""
    owner, workspace = stack.owner_with_workspace("alice")
    _, card, _ = stack.begun_run(owner, workspace)
    items = _activity_once(owner, workspace, "run.started")
    by_service = [i for i in items if i["actorService"] is not None]
    assert {i["actorService"] for i in by_service} == {"orchestrator"}, items
    assert {i["actor"] for i in items if i["actorService"] is None} == {user_id("alice")}
    for item in items:
        UUID(item["actor"])  # every actor is a UUID
    (orchestrator,) = {i["actor"] for i in by_service}
    assert orchestrator != user_id("alice")
    # The same service is the same id everywhere, and again later.
    again = owner.data(ACTIVITY, {"w": workspace})["activity"]["edges"]
    assert {e["node"]["actor"] for e in again if e["node"]["actorService"]} == {orchestrator}
    history = owner.data(HISTORY, {"c": card})["cardHistory"]["events"]
    assert {(e["actor"], e["actorService"]) for e in history} == {(user_id("alice"), None)}
