"""A ``subscribe`` refused before its operation starts is answered with graphql-transport-ws's
``error`` message (PROTOCOL.md, "Error": "This can occur before execution starts, usually due to
validation errors"), its errors carrying our ``extensions.code``; no ``complete`` follows, the id
is free again, and the connection and its other subscriptions go on. Errors once a subscription
runs are ``next`` with errors, then ``complete``.

Each refusal is sent on a connection that already holds a live subscription; afterwards the
refused id is subscribed again, validly, and both subscriptions must report a board change.
"""

from __future__ import annotations

import json
import time
from typing import Any
from uuid import uuid4

import pytest
from api_client import ApiClient
from e2e_stack import MakeStack, Stack
from test_subscription_limits import RawConnection

from read_api.input_checks import MAX_VARIABLE_NESTING, MAX_VARIABLE_VALUES

BOARD_CHANGED = "subscription($id: ID!) { boardChanged(projectId: $id) { kind cardId } }"


def _board(stack: Stack) -> tuple[ApiClient, str, str]:
    """An owner, their workspace and a one-lane project of it."""
    alice, ws = stack.owner_with_workspace("alice", f"refusals {uuid4().hex[:6]}")
    project = alice.create_project(ws, "P", [{"name": "Todo"}])["project"]["id"]
    return alice, ws, project


def _refused_with_an_error_message(
    stack: Stack, payload: dict[str, Any], *, code: str = "VALIDATION"
) -> dict[str, Any]:
    """Send ``payload`` as a subscribe on a connection holding a live subscription; check the
    answer is one ``error`` message of ``code`` and nothing else for its id, that the connection
    goes on (the live subscription and the refused id, subscribed again, both report a change);
    return the error message."""
    alice, _, project = _board(stack)
    connection = RawConnection(stack.ws_url, alice.token or "")
    try:
        connection.subscribe("live", BOARD_CHANGED, {"id": project})
        assert [m for m in connection.sync() if m["type"] != "next"] == []

        connection.send({"id": "refused", "type": "subscribe", "payload": payload})
        answers = [m for m in connection.sync() if m.get("id") == "refused"]
        assert [m["type"] for m in answers] == ["error"], answers
        [refusal] = answers
        assert isinstance(refusal["payload"], list), refusal
        assert [e["extensions"]["code"] for e in refusal["payload"]] == [code], refusal
        assert "Traceback" not in json.dumps(refusal)

        # The protocol frees the id with the error: the same id is accepted again (strawberry
        # closes the connection with 4409 when an id is still in use).
        connection.subscribe("refused", BOARD_CHANGED, {"id": project})
        assert [m for m in connection.sync() if m["type"] != "next"] == []
        _both_report_a_change(connection, alice, project)
        return refusal
    finally:
        connection.close()


def _both_report_a_change(connection: RawConnection, alice: ApiClient, project: str) -> None:
    waiting = {"live", "refused"}
    deadline = time.monotonic() + 30
    while waiting and time.monotonic() < deadline:
        alice.create_card(project, "a change")
        try:
            while waiting:
                message = connection.recv(timeout=1.0)
                assert message["type"] == "next", message
                assert "errors" not in message["payload"], message
                waiting.discard(message["id"])
        except TimeoutError:
            continue
    assert not waiting, f"subscriptions {sorted(waiting)} never reported a change"


def test_a_document_of_two_operations_without_an_operation_name_is_an_error_message(
    stack: Stack,
) -> None:
    document = (
        BOARD_CHANGED.replace("subscription(", "subscription A(")
        + "\n"
        + BOARD_CHANGED.replace("subscription(", "subscription B(")
    )
    refusal = _refused_with_an_error_message(
        stack, {"query": document, "variables": {"id": str(uuid4())}}
    )
    assert "operationName" in refusal["payload"][0]["message"]


@pytest.mark.parametrize(
    ("text", "said"), [("a\x00b", "NUL"), ("a\ud800b", "surrogate")], ids=["nul", "surrogate"]
)
def test_a_variable_holding_text_postgresql_cannot_store_is_an_error_message(
    stack: Stack, text: str, said: str
) -> None:
    refusal = _refused_with_an_error_message(
        stack, {"query": BOARD_CHANGED, "variables": {"id": text}}
    )
    assert "$id" in refusal["payload"][0]["message"]
    assert said in refusal["payload"][0]["message"]


def test_a_literal_holding_text_postgresql_cannot_store_is_an_error_message(
    stack: Stack,
) -> None:
    document = 'subscription { boardChanged(projectId: "a\\u0000b") { kind } }'
    refusal = _refused_with_an_error_message(stack, {"query": document})
    assert "boardChanged.projectId" in refusal["payload"][0]["message"]
    assert "NUL" in refusal["payload"][0]["message"]


@pytest.mark.parametrize(
    ("extra", "said"),
    [
        (list(range(MAX_VARIABLE_VALUES)), f"more than {MAX_VARIABLE_VALUES} values"),
        (
            json.loads("[" * MAX_VARIABLE_NESTING + "]" * MAX_VARIABLE_NESTING),
            f"deeper than {MAX_VARIABLE_NESTING} levels",
        ),
    ],
    ids=["values", "nesting"],
)
def test_variables_too_large_to_take_are_an_error_message(
    stack: Stack, extra: object, said: str
) -> None:
    """The bounds of a POSTed request's ``variables`` (read_api.input_checks.shape_problem):
    a variable the operation does not declare is walked by every check all the same."""
    refusal = _refused_with_an_error_message(
        stack, {"query": BOARD_CHANGED, "variables": {"id": str(uuid4()), "extra": extra}}
    )
    assert said in refusal["payload"][0]["message"]
    assert "variables" in refusal["payload"][0]["message"]


def test_a_subscription_over_the_cost_estimate_is_an_error_message(stack: Stack) -> None:
    document = (
        "subscription($id: ID!) { boardChanged(projectId: $id) {"
        " card { runs(first: 100000) { edges { node { id } } } } } }"
    )
    refusal = _refused_with_an_error_message(
        stack, {"query": document, "variables": {"id": str(uuid4())}}
    )
    assert "too expensive" in refusal["payload"][0]["message"]


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        # Refusals strawberry itself already answered with an error message: kept so.
        ({"query": BOARD_CHANGED, "operationName": "Other"}, "VALIDATION"),
        ({"query": "subscription { boardChanged(projectId: 1) { nope } }"}, "VALIDATION"),
        ({"query": BOARD_CHANGED, "variables": {}}, "VALIDATION"),
        ({"query": "query { __typename }"}, "VALIDATION"),
        ({"query": "mutation { __typename }"}, "VALIDATION"),
        ({"query": BOARD_CHANGED, "variables": {"id": str(uuid4())}}, "NOT_FOUND"),
    ],
    ids=["unknown-operation", "invalid", "missing-variable", "query", "mutation", "not-found"],
)  # fmt: skip
def test_other_refusals_before_the_start_stay_error_messages(
    stack: Stack, payload: dict[str, Any], code: str
) -> None:
    _refused_with_an_error_message(stack, payload, code=code)


def test_an_error_once_the_subscription_runs_is_a_next_then_complete(
    make_stack: MakeStack,
) -> None:
    """Not a refusal: the subscription started and delivered, then access was withdrawn."""
    stack = make_stack(subscription_recheck_seconds=0.2)
    alice, ws, project = _board(stack)
    bob = str(uuid4())
    alice.add_member(ws, bob, "VIEWER")
    connection = RawConnection(stack.ws_url, stack.as_user(bob, ws, "VIEWER").token or "")
    try:
        connection.subscribe("1", BOARD_CHANGED, {"id": project})
        deadline = time.monotonic() + 30
        while True:
            alice.create_card(project, "seen")
            try:
                first = connection.recv(timeout=1.0)
                break
            except TimeoutError:
                assert time.monotonic() < deadline, "the subscription never reported a change"
        assert first["type"] == "next", first
        assert "errors" not in first["payload"], first
        alice.data(
            "mutation($w: ID!, $u: ID!) { removeMember(input: {workspaceId: $w, userId: $u})"
            " { consistencyToken } }",
            {"w": ws, "u": bob},
        )
        time.sleep(0.5)
        ending: list[dict[str, Any]] = []
        while not ending or ending[-1]["type"] != "complete":
            assert time.monotonic() < deadline, f"the subscription went on: {ending}"
            alice.create_card(project, "after the removal")
            try:
                ending.append(connection.recv(timeout=1.0))
            except TimeoutError:
                continue
        ended = [m for m in ending if m["type"] != "next" or "errors" in m["payload"]]
        assert [m["type"] for m in ended] == ["next", "complete"], ending
        assert [e["extensions"]["code"] for e in ended[0]["payload"]["errors"]] == ["NOT_FOUND"]
    finally:
        connection.close()
