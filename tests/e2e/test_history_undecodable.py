"""A card's history goes on past a stored event that cannot be decoded, and says so.

A bad upgrade can leave events in the log that today's code cannot read: a class renamed or
removed (the stored topic no longer resolves) or a state that is not JSON (its row then names no
workspace, and row-level security hides it from the API). ``cardHistory`` answered INTERNAL for
the whole query; now it shows every version, the unreadable one as an entry of type
``agentworks.undecodable`` holding what the log still tells of it, with an ``UNDECODABLE`` error
beside the data at that entry's path, and the card's state as of the version before it.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from uuid import UUID, uuid4

import pytest
from undecodable import RENAMED, plant_unappliable, plant_undecodable

from domain.card import Card
from domain.project import Project

if TYPE_CHECKING:
    from collections.abc import Callable

    from api_client import ApiClient
    from e2e_stack import Stack

    from commands.handlers import AgentWorks

HISTORY = (
    "query($c: ID!, $v: Int) { h: cardHistory(cardId: $c, asOfVersion: $v) {"
    " version state { version title labels }"
    " events { version type at actor position data } } }"
)
AS_OF = "query($c: ID!, $at: DateTime) { cardHistory(cardId: $c, asOf: $at) { version } }"
RETITLE = 'mutation($c: ID!) { updateCard(input: {cardId: $c, title: "second"}) { card { id } } }'


def card_of_two_versions(stack: Stack, name: str) -> tuple[ApiClient, str]:
    alice, ws = stack.owner_with_workspace("alice", name)
    pid = alice.create_project(ws, "P", [{"name": "Todo"}])["project"]["id"]
    card = alice.create_card(pid, "first")["card"]["id"]
    alice.data(RETITLE, {"c": card})
    return alice, card


def history(client: ApiClient, card: str, version: int | None = None) -> tuple[Any, list[Any]]:
    answer = client.post(HISTORY, {"c": card, "v": version})
    assert answer.status == 200, answer.body
    return answer.data["h"], answer.errors


@pytest.mark.parametrize("broken_json", [False, True], ids=["unknown-topic", "broken-json"])
def test_the_history_shows_an_undecodable_event_and_the_rest(
    stack: Stack, broken_json: bool
) -> None:
    alice, card = card_of_two_versions(stack, f"undecodable {broken_json}")
    assert plant_undecodable(stack.write, UUID(card), broken_json=broken_json) == 3
    shown, errors = history(alice, card)
    assert shown["version"] == 4
    assert [e["version"] for e in shown["events"]] == [1, 2, 3, 4]
    before, unread, after = shown["events"][1:]
    assert (unread["type"], after["type"]) == ("agentworks.undecodable", "Card.Labelled")
    assert after["data"]["label"] == "after"
    # The state stops before what cannot be folded.
    assert shown["state"] == {"version": 2, "title": "second", "labels": []}
    (error,) = errors
    assert error["path"] == ["h", "events", 2]
    assert error["extensions"]["code"] == "UNDECODABLE"
    assert error["extensions"]["version"] == 3
    assert "version 3 could not be decoded" in error["message"]
    assert "state is shown as of version 2" in error["message"]
    if broken_json:
        # Hidden from the API (its row names no workspace): only its version is known.
        assert unread["data"] == {"storedType": None}
        assert unread["position"] == ""
        assert error["extensions"]["at"] is None
        assert unread["at"] == before["at"]  # the time it was made no earlier than
        # Asked as of that time, the history stops before it: it is counted at the time of
        # the next event whose time is known.
        answer = alice.post(AS_OF, {"c": card, "at": before["at"]})
        assert (answer.data["cardHistory"]["version"], answer.errors) == (2, [])
    else:
        assert unread["data"] == {"storedType": RENAMED}
        assert int(before["position"]) < int(unread["position"]) < int(after["position"])
        assert error["extensions"]["at"] is not None
        assert before["at"] <= unread["at"] <= after["at"]
        assert unread["actor"] == before["actor"]


def test_a_history_before_the_undecodable_event_is_whole(stack: Stack) -> None:
    alice, card = card_of_two_versions(stack, "undecodable later")
    plant_undecodable(stack.write, UUID(card), broken_json=True)
    shown, errors = history(alice, card, 2)
    assert errors == []
    assert shown["state"]["version"] == 2
    assert [e["type"] for e in shown["events"]] == ["Card.Created", "Card.Edited"]


def test_an_unreadable_last_event_hidden_from_the_api_is_shown_too(stack: Stack) -> None:
    alice, card = card_of_two_versions(stack, "undecodable last")
    plant_undecodable(stack.write, UUID(card), broken_json=True, then_good=False)
    shown, errors = history(alice, card)
    assert [(e["version"], e["type"]) for e in shown["events"]][2:] == [
        (3, "agentworks.undecodable")
    ]
    assert shown["state"]["version"] == 2
    assert [e["extensions"]["version"] for e in errors] == [3]


BOARD_THEN = (
    "query($p: ID!, $at: DateTime!) { b: board(projectId: $p, asOf: $at) {"
    " lanes { cards { edges { node { id version title labels } } } } } }"
)

#: How a card's third version is planted unreadable, a good fourth after it where it can be.
PLANTED: dict[str, Callable[[AgentWorks, UUID], int]] = {
    "unknown-topic": lambda write, card: plant_undecodable(write, card),
    "broken-json": lambda write, card: plant_undecodable(write, card, broken_json=True),
    "unappliable": lambda write, card: plant_unappliable(
        write, card, Card.Labelled, drop="label", label="x"
    ),
}


@pytest.mark.parametrize("unreadable", ["unknown-topic", "broken-json", "unappliable"])
def test_a_board_as_of_an_instant_shows_a_card_up_to_its_undecodable_event(
    stack: Stack, unreadable: str
) -> None:
    """``board(asOf:)`` folded a card through an event it could not decode and answered
    INTERNAL for the whole board. Now the card is shown as of the version before it, the
    board's other cards whole, with an UNDECODABLE error beside the data naming the card and
    the version (as ``cardHistory`` does). An event whose state is not JSON is hidden from the
    API (it names no workspace): the card was folded past it, as if it were not there, with
    the event after it applied and no error. One that decodes and that the card's ``apply``
    refuses (a label left out) answered INTERNAL for the whole board."""
    alice, ws = stack.owner_with_workspace("alice", f"undecodable board {unreadable}")
    pid = alice.create_project(ws, "P", [{"name": "Todo"}])["project"]["id"]
    card = alice.create_card(pid, "first")["card"]["id"]
    alice.data(RETITLE, {"c": card})
    other = alice.create_card(pid, "other")["card"]["id"]
    before = datetime.now(UTC).isoformat()
    time.sleep(0.01)
    assert PLANTED[unreadable](stack.write, UUID(card)) == 3
    earlier = alice.post(BOARD_THEN, {"p": pid, "at": before})
    assert earlier.status == 200, earlier.body
    assert not earlier.errors  # the unreadable event came after that instant
    answer = alice.post(BOARD_THEN, {"p": pid, "at": datetime.now(UTC).isoformat()})
    assert answer.status == 200, answer.body
    ((lane,),) = [answer.data["b"]["lanes"]]
    shown = {edge["node"]["id"]: edge["node"] for edge in lane["cards"]["edges"]}
    assert shown[card] == {"id": card, "version": 2, "title": "second", "labels": []}
    assert shown[other]["title"] == "other"
    (error,) = answer.errors
    assert error["path"] == ["b"]
    assert error["extensions"]["code"] == "UNDECODABLE"
    assert error["extensions"]["version"] == 3
    assert card in error["message"]


@pytest.mark.parametrize("broken_json", [False, True], ids=["unknown-topic", "broken-json"])
def test_a_board_as_of_past_an_unreadable_project_event_is_undecodable_and_whole_before(
    stack: Stack, broken_json: bool
) -> None:
    """A project event whose state is not JSON is hidden from the API (it names no workspace).
    The board was folded past it with no error, and at an instant before the next event the
    version's bisection met the hidden row: INTERNAL. One whose class was renamed failed the
    board at any instant, even before it was made. Now the board before such an event is
    whole, and past it is the UNDECODABLE error alone."""
    alice, ws = stack.owner_with_workspace("alice", f"unreadable project event {broken_json}")
    pid = alice.create_project(ws, "P", [{"name": "Todo"}])["project"]["id"]
    titles = ["first", "second", "third"]
    for title in titles:
        alice.create_card(pid, title)
    (last,) = stack.write.recorder.select_events(UUID(pid), desc=True, limit=1)
    placed = stack.write.mapper.to_domain_event(last)
    time.sleep(0.01)
    between = datetime.now(UTC).isoformat()
    time.sleep(0.01)
    hidden = last.originator_version + 1
    stored = [
        stack.write.mapper.to_stored_event(
            Project.CardPlaced(
                originator_id=UUID(pid), originator_version=version,
                timestamp=datetime.now(UTC), meta=dict(placed.meta), card_id=uuid4(),
                lane="Todo", position=f"V{version}",
            )
        )
        for version in (hidden, hidden + 1)
    ]  # fmt: skip
    bad = stored[0]
    stored[0] = type(bad)(
        originator_id=bad.originator_id, originator_version=hidden,
        topic=bad.topic if broken_json else bad.topic + "Retired",
        state=b'{"broken' if broken_json else bad.state,
    )  # fmt: skip
    stack.write.recorder.insert_events(stored)
    earlier = alice.post(BOARD_THEN, {"p": pid, "at": between})
    assert earlier.status == 200, earlier.body
    assert not earlier.errors, earlier.errors
    ((lane,),) = [earlier.data["b"]["lanes"]]
    assert [edge["node"]["title"] for edge in lane["cards"]["edges"]] == titles
    answer = alice.post(BOARD_THEN, {"p": pid, "at": datetime.now(UTC).isoformat()})
    assert answer.status == 200, answer.body
    assert answer.data == {"b": None}
    (error,) = answer.errors
    assert error["extensions"]["code"] == "UNDECODABLE", error
    assert error["extensions"]["version"] == hidden
    assert f"project {pid}" in error["message"]


EDIT = 'mutation($c: ID!) { updateCard(input: {cardId: $c, title: "third"}) { card { version } } }'


#: How the card's third version is planted, and what the refusal says of it.
UNREADABLE: dict[str, tuple[Callable[[AgentWorks, UUID], object], str]] = {
    "unknown-topic": (
        lambda write, card: plant_undecodable(write, card, then_good=False),
        f"version 3 ({RENAMED}) could not be decoded",
    ),
    "broken-json": (
        lambda write, card: plant_undecodable(write, card, broken_json=True, then_good=False),
        "version 3",
    ),
    # Decoded, but today's apply refuses it: an older writer's label event without its label.
    "unappliable": (
        lambda write, card: plant_unappliable(write, card, Card.Labelled, drop="label", label="x"),
        "version 3 (Card.Labelled) could not be applied",
    ),
}


@pytest.mark.parametrize("planted", UNREADABLE.values(), ids=UNREADABLE.keys())
def test_a_mutation_on_a_card_with_an_unreadable_event_answers_undecodable(
    stack: Stack, planted: tuple[Callable[[AgentWorks, UUID], object], str]
) -> None:
    """The write side could not load the card and let the decoding error (or, for an event it
    decoded, the error of the card's ``apply``) escape: INTERNAL. Now the mutation answers
    UNDECODABLE naming the card and the version, writes nothing, and the other cards'
    mutations go on."""
    plant, said = planted
    alice, ws = stack.owner_with_workspace("alice", f"unreadable write {said}")
    pid = alice.create_project(ws, "P", [{"name": "Todo"}])["project"]["id"]
    card = alice.create_card(pid, "first")["card"]["id"]
    other = alice.create_card(pid, "other")["card"]["id"]
    alice.data(EDIT, {"c": card})  # the write side has the card cached at version 2
    plant(stack.write, UUID(card))
    for _ in range(2):
        answer = alice.post(EDIT, {"c": card})
        assert answer.status == 200, answer.body
        (error,) = answer.errors
        assert error["extensions"]["code"] == "UNDECODABLE", error
        assert error["extensions"]["version"] == 3
        assert f"card {card}" in error["message"]
        assert said in error["message"]
    assert [e.originator_version for e in stack.write.recorder.select_events(UUID(card))] == [
        1, 2, 3,
    ]  # fmt: skip
    assert alice.data(EDIT, {"c": other})["updateCard"]["card"]["version"] == 2


def test_a_board_as_of_past_a_project_event_its_apply_refuses_is_undecodable(
    stack: Stack,
) -> None:
    """A project event that decodes and that today's apply refuses (a lane order naming a lane
    the board does not have) answered INTERNAL for the board at every instant after it. As
    past a project event that cannot be decoded: the UNDECODABLE error alone, naming the
    project and the version, and the board before it whole."""
    alice, ws = stack.owner_with_workspace("alice", "unappliable project event")
    pid = alice.create_project(ws, "P", [{"name": "Todo"}])["project"]["id"]
    alice.create_card(pid, "first")
    time.sleep(0.01)
    before = datetime.now(UTC).isoformat()
    time.sleep(0.01)
    version = plant_unappliable(stack.write, UUID(pid), Project.LanesReordered, order=["Gone"])
    earlier = alice.post(BOARD_THEN, {"p": pid, "at": before})
    assert earlier.status == 200, earlier.body
    assert not earlier.errors
    assert [e["node"]["title"] for e in earlier.data["b"]["lanes"][0]["cards"]["edges"]] == [
        "first"
    ]
    answer = alice.post(BOARD_THEN, {"p": pid, "at": datetime.now(UTC).isoformat()})
    assert answer.status == 200, answer.body
    assert answer.data is None or answer.data["b"] is None
    (error,) = answer.errors
    assert error["extensions"]["code"] == "UNDECODABLE", error
    assert error["extensions"]["version"] == version
    assert pid in error["message"]
