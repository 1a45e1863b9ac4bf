"""Subscriptions over graphql-transport-ws, in process and through Redis pub/sub."""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import pytest
from api_client import PROTOCOL, ApiClient, Subscription, first_change, subscribe
from e2e_stack import MakeStack, Stack
from users import user_id
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from adapters.tokens import issue_token
from commands import models as m
from commands.handlers import Actor

BOARD_CHANGED = """
subscription($id: ID!) {
  boardChanged(projectId: $id) { kind cardId runId position card { id title lane } }
}
"""
RUN_LOG = """
subscription($id: ID!, $after: Int) { agentRunLog(runId: $id, afterSeq: $after) { seq text } }
"""


@pytest.fixture(params=["local", "redis"])
def live_stack(request: pytest.FixtureRequest, make_stack: MakeStack) -> Stack:
    return make_stack(broadcaster=request.param)


def test_board_changes_arrive_with_the_card_as_the_read_model_has_it(live_stack: Stack) -> None:
    alice, ws = live_stack.owner_with_workspace()
    pid = alice.create_project(ws, "P", [{"name": "Todo"}, {"name": "Doing"}])["project"]["id"]
    with subscribe(live_stack.ws_url, alice.token, BOARD_CHANGED, {"id": pid}) as sub:
        first = first_change(sub, lambda: alice.create_card(pid, "warm-up"))
        assert first["data"]["boardChanged"]["kind"] == "card.created"

        card = alice.create_card(pid, "spec")["card"]
        event = _next_for(sub, card["id"], "card.created")
        assert event["card"] == {"id": card["id"], "title": "spec", "lane": "Todo"}
        assert int(event["position"]) > 0

        alice.data(
            'mutation($id: ID!) { moveCard(input: {cardId: $id, toLane: "Doing"}) {'
            " card { id } } }",
            {"id": card["id"]},
        )
        moved = _next_for(sub, card["id"], "card.moved")
        assert moved["card"]["lane"] == "Doing"

        run = alice.start_agent_run(card["id"])["run"]["id"]
        requested = _next_for(sub, card["id"], "run.requested")
        assert requested["runId"] == run


def _next_for(sub: Subscription, card_id: str, kind: str) -> dict[str, Any]:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        event: dict[str, Any] = sub.next(timeout=15)["data"]["boardChanged"]
        if event["cardId"] == card_id and event["kind"] == kind:
            return event
    raise AssertionError(f"no {kind} event for card {card_id}")


def _begun_run(stack: Stack) -> tuple[ApiClient, UUID, Actor]:
    """A run on a new card of alice's new workspace, begun by an orchestrator: alice, the run,
    and the orchestrator acting on it."""
    alice, ws = stack.owner_with_workspace()
    pid = alice.create_project(ws, "P", [{"name": "Todo"}])["project"]["id"]
    card = alice.create_card(pid, "build")["card"]["id"]
    run_id = UUID(alice.start_agent_run(card)["run"]["id"])
    service = Actor.service("orchestrator", ws)
    stack.write.begin_run(m.BeginRun(run_id=run_id, worker="w1"), service)
    return alice, run_id, service


def _append(stack: Stack, run_id: UUID, service: Actor, texts: list[str]) -> None:
    now = datetime.now(UTC)
    lines = [m.LogLineInput(at=now, text=text) for text in texts]
    stack.write.append_run_log(m.AppendRunLog(run_id=run_id, lines=lines), service)


def test_a_run_log_replays_then_follows_live_without_gap_or_duplicate(live_stack: Stack) -> None:
    alice, run_id, service = _begun_run(live_stack)
    run = str(run_id)
    write = live_stack.write

    def append(count: int, label: str) -> None:
        now = datetime.now(UTC)
        write.append_run_log(
            m.AppendRunLog(
                run_id=run_id,
                lines=[m.LogLineInput(at=now, text=f"{label} {i}") for i in range(count)],
            ),
            service,
        )

    append(5, "before")
    # Lines keep coming while the client subscribes and replays: the race the design covers.
    stop = threading.Event()

    def writer() -> None:
        chunk = 0
        while not stop.is_set() and chunk < 40:
            append(3, f"chunk {chunk}")
            chunk += 1
            time.sleep(0.01)

    thread = threading.Thread(target=writer)
    thread.start()
    seqs: list[int] = []
    try:
        with subscribe(live_stack.ws_url, alice.token, RUN_LOG, {"id": run, "after": 2}) as sub:
            while len(seqs) < 40:
                seqs.append(sub.next()["data"]["agentRunLog"]["seq"])
            stop.set()
            thread.join()
            append(2, "after")
            write.finish_run(m.FinishRun(run_id=run_id, outcome="SUCCEEDED"), service)
            while True:
                message = sub.next_message(timeout=15)
                if message["type"] == "complete":
                    break
                assert message["type"] == "next", message
                seqs.append(message["payload"]["data"]["agentRunLog"]["seq"])
    finally:
        stop.set()
        thread.join()
    total = alice.data("query($id: ID!) { agentRun(id: $id) { logLineCount } }", {"id": run})
    last = total["agentRun"]["logLineCount"]
    assert seqs == list(range(3, last + 1))


def test_a_finished_runs_log_replays_and_completes(live_stack: Stack) -> None:
    alice, run_id, service = _begun_run(live_stack)
    _append(live_stack, run_id, service, [f"line {i}" for i in range(3)])
    finished = live_stack.write.finish_run(
        m.FinishRun(run_id=run_id, outcome="FAILED", error="boom"), service
    )
    alice.post(
        "query($id: ID!) { agentRun(id: $id) { status } }",
        {"id": str(run_id)},
        headers={"X-Consistency-Token": finished.consistency_token},
    )
    with subscribe(live_stack.ws_url, alice.token, RUN_LOG, {"id": str(run_id)}) as sub:
        seqs = [sub.next()["data"]["agentRunLog"]["seq"] for _ in range(3)]
        assert sub.next_message()["type"] == "complete"
    assert seqs == [1, 2, 3]


def test_a_negative_after_seq_is_refused_alike_over_http_and_the_websocket(stack: Stack) -> None:
    """agentRunLogs and agentRunLog take one afterSeq: the log pane reads the stored lines over
    HTTP and follows them over the WebSocket from the same number, so both refuse what one does."""
    alice, run_id, service = _begun_run(stack)
    _append(stack, run_id, service, ["one", "two"])
    run = str(run_id)

    answer = alice.post(
        "query($id: ID!) { agentRunLogs(runId: $id, afterSeq: -1) { seq } }", {"id": run}
    )
    assert answer.codes == ["VALIDATION"], answer.body
    assert "afterSeq" in answer.errors[0]["message"]

    with subscribe(stack.ws_url, alice.token, RUN_LOG, {"id": run, "after": -1}) as sub:
        refusal = sub.next_message()
    assert refusal["type"] == "error", refusal
    assert [e["extensions"]["code"] for e in refusal["payload"]] == ["VALIDATION"]
    assert refusal["payload"][0]["message"] == answer.errors[0]["message"]


@pytest.mark.parametrize("broadcaster", ["local", "redis"])
def test_a_chunk_too_large_to_send_live_arrives_whole_and_in_time(
    make_stack: MakeStack, broadcaster: str
) -> None:
    """A large chunk is announced, not sent (``LIVE_LINES_MOST_TEXT``): a live subscriber reads
    it from the read model on the announcement, not at its next quiet-spell re-read."""
    stack = make_stack(broadcaster=broadcaster, subscription_recheck_seconds=120)
    alice, run_id, service = _begun_run(stack)
    texts = [f"{i:04d}" + "é" * 1500 for i in range(60)]  # about 180 KB of UTF-8
    with subscribe(stack.ws_url, alice.token, RUN_LOG, {"id": str(run_id)}) as sub:
        _append(stack, run_id, service, ["small"])
        assert sub.next()["data"]["agentRunLog"] == {"seq": 1, "text": "small"}
        _append(stack, run_id, service, texts)
        got = [sub.next(timeout=20)["data"]["agentRunLog"] for _ in texts]
    assert got == [{"seq": i + 2, "text": text} for i, text in enumerate(texts)]


def test_a_websocket_without_a_valid_token_is_refused_saying_why(stack: Stack) -> None:
    """Refused with 4403, whose reason starts with the error's code, then its message (at
    most the 123 bytes a close frame's reason holds). Every refusal said "Forbidden", whatever
    it was: the SPA could not tell a token to refresh from a limit to wait out."""
    expired = issue_token(
        user_id=user_id("alice"), workspace_id="*", role="OWNER", ttl_seconds=60,
        secret=stack.secret, now=datetime.now(UTC) - timedelta(hours=1),
    )  # fmt: skip
    for payload, said in (
        ({}, "UNAUTHENTICATED: "),
        ({"Authorization": "Bearer not-a-jwt"}, "UNAUTHENTICATED: "),
        ({"Authorization": f"Bearer {expired}"}, "UNAUTHENTICATED: token has expired"),
    ):
        with connect(f"{stack.ws_url}/graphql", subprotocols=[PROTOCOL]) as socket:
            socket.send(json.dumps({"type": "connection_init", "payload": payload}))
            with pytest.raises(ConnectionClosed) as closed:
                socket.recv(timeout=10)
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 4403
        assert closed.value.rcvd.reason.startswith(said), closed.value.rcvd.reason
        assert len(closed.value.rcvd.reason.encode()) <= 123


def test_a_token_json_can_carry_but_utf8_cannot_is_refused_not_a_dropped_socket(
    stack: Stack,
) -> None:
    """A lone surrogate (a ``\\ud800`` escape in connection_init) crashed the handshake:
    PyJWT, and the digest of an API key's secret, encode the token as UTF-8. The socket was
    dropped without a close frame instead of closing with 4403."""
    alice, ws = stack.owner_with_workspace()
    key = alice.data(
        'mutation($w: ID!) { createApiKey(input: {workspaceId: $w, name: "k", role: VIEWER}) {'
        " apiKey { id } } }",
        {"w": ws},
    )["createApiKey"]["apiKey"]["id"]
    for payload in (
        {"token": "eyJhbGciOiJIUzI1NiJ9.e30.x\ud800"},
        {"Authorization": "Bearer \ud800"},
        {"token": f"awk_{UUID(key).hex}_x\ud800"},
    ):
        with connect(f"{stack.ws_url}/graphql", subprotocols=[PROTOCOL]) as socket:
            socket.send(json.dumps({"type": "connection_init", "payload": payload}))
            with pytest.raises(ConnectionClosed) as closed:
                socket.recv(timeout=10)
            assert closed.value.rcvd is not None, payload
            assert closed.value.rcvd.code == 4403, payload


def _ended_with(sub: Subscription, code: str, what: str, timeout: float = 10.0) -> None:
    """The subscription ends with an error of ``code`` within ``timeout`` (anything it sent
    before that is what was already on its way)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            message = sub.next_message(timeout=max(0.1, deadline - time.monotonic()))
        except TimeoutError:
            break
        if message["type"] == "next" and "errors" not in message["payload"]:
            continue
        errors = message["payload"] if message["type"] == "error" else message["payload"]["errors"]
        assert [e["extensions"]["code"] for e in errors] == [code], message
        return
    raise AssertionError(f"the subscription went on after {what}")


def test_a_revoked_api_keys_subscription_ends(make_stack: MakeStack) -> None:
    """A revoked key was refused on its next request, but a subscription it had opened went on
    delivering the board's changes for as long as the socket lived."""
    stack = make_stack(subscription_recheck_seconds=0.2)
    alice, ws = stack.owner_with_workspace()
    pid = alice.create_project(ws, "P", [{"name": "Todo"}])["project"]["id"]
    key = alice.data(
        'mutation($w: ID!) { createApiKey(input: {workspaceId: $w, name: "k", role: VIEWER}) {'
        " apiKey { id } secret } }",
        {"w": ws},
    )["createApiKey"]
    with subscribe(stack.ws_url, key["secret"], BOARD_CHANGED, {"id": pid}) as sub:
        first_change(sub, lambda: alice.create_card(pid, "seen"))
        alice.data(
            "mutation($k: ID!) { revokeApiKey(input: {apiKeyId: $k}) { apiKey { id } } }",
            {"k": key["apiKey"]["id"]},
        )
        time.sleep(0.5)
        for i in range(3):
            alice.create_card(pid, f"after the revocation {i}")
        _ended_with(sub, "UNAUTHENTICATED", "the key was revoked")


def test_an_api_keys_subscription_ends_once_its_creator_was_removed_even_if_added_back(
    make_stack: MakeStack,
) -> None:
    """A key is its creator's for one membership: made before they were removed, it is refused
    (401) even after they are added back. A subscription it had opened checked only that the
    key was not revoked and that its creator is a member now, so it went on delivering the
    board's changes when the removal and the return fell between two of its checks."""
    stack = make_stack(subscription_recheck_seconds=0.2)
    alice, ws = stack.owner_with_workspace()
    bob = str(UUID(user_id(f"bob-{time.monotonic_ns()}")))
    alice.add_member(ws, bob, "ADMIN")
    pid = alice.create_project(ws, "P", [{"name": "Todo"}])["project"]["id"]
    key = stack.as_user(bob, ws, "ADMIN").data(
        'mutation($w: ID!) { createApiKey(input: {workspaceId: $w, name: "k", role: VIEWER}) {'
        " secret } }",
        {"w": ws},
    )["createApiKey"]["secret"]
    with subscribe(stack.ws_url, key, BOARD_CHANGED, {"id": pid}) as sub:
        first_change(sub, lambda: alice.create_card(pid, "seen"))
        alice.data(
            "mutation($w: ID!, $u: ID!) { removeMember(input: {workspaceId: $w, userId: $u})"
            " { consistencyToken } }",
            {"w": ws, "u": bob},
        )
        alice.add_member(ws, bob, "ADMIN")
        assert stack.client(key).post("{ me { id } }").status == 401
        time.sleep(0.5)
        for i in range(3):
            alice.create_card(pid, f"after the return {i}")
        _ended_with(sub, "UNAUTHENTICATED", "the key's creator was removed")


def test_a_subscription_ends_when_its_token_expires(make_stack: MakeStack) -> None:
    """A token is good until its ``exp``; a subscription it had opened went on delivering the
    board's changes long after (an access token lives at most its TTL, API.md)."""
    stack = make_stack(subscription_recheck_seconds=0.2)
    alice, ws = stack.owner_with_workspace()
    pid = alice.create_project(ws, "P", [{"name": "Todo"}])["project"]["id"]
    short = issue_token(
        user_id=user_id("alice"), workspace_id=ws, role="VIEWER", ttl_seconds=3,
        secret=stack.secret,
    )  # fmt: skip
    with subscribe(stack.ws_url, short, BOARD_CHANGED, {"id": pid}) as sub:
        first_change(sub, lambda: alice.create_card(pid, "seen"))
        time.sleep(3.5)
        for i in range(3):
            alice.create_card(pid, f"after expiry {i}")
        _ended_with(sub, "UNAUTHENTICATED", "the token expired")


def test_a_removed_members_run_log_stops_while_lines_keep_coming(make_stack: MakeStack) -> None:
    """Live log lines came straight from the broadcast: a member removed from the workspace
    kept receiving them for as long as the run kept writing."""
    stack = make_stack(subscription_recheck_seconds=0.2)
    alice, ws = stack.owner_with_workspace()
    alice.add_member(ws, user_id("bob"), "MEMBER")
    pid = alice.create_project(ws, "P", [{"name": "Todo"}])["project"]["id"]
    card = alice.create_card(pid, "build")["card"]["id"]
    run_id = UUID(alice.start_agent_run(card)["run"]["id"])
    service = Actor.service("orchestrator", ws)
    stack.write.begin_run(m.BeginRun(run_id=run_id, worker="w1"), service)
    stop = threading.Event()

    def writer() -> None:
        while not stop.is_set():
            line = m.LogLineInput(at=datetime.now(UTC), text="tick")
            stack.write.append_run_log(m.AppendRunLog(run_id=run_id, lines=[line]), service)
            time.sleep(0.05)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        bob = stack.token("bob", ws, "MEMBER")
        with subscribe(stack.ws_url, bob, RUN_LOG, {"id": str(run_id)}) as sub:
            sub.next()
            alice.data(
                "mutation($w: ID!, $u: ID!) { removeMember(input: {workspaceId: $w, userId: $u})"
                " { workspace { id } } }",
                {"w": ws, "u": user_id("bob")},
            )
            _ended_with(sub, "NOT_FOUND", "the member was removed")
    finally:
        stop.set()
        thread.join()


def test_a_token_in_the_handshake_header_also_authenticates(stack: Stack) -> None:
    alice, ws = stack.owner_with_workspace()
    pid = alice.create_project(ws, "P", [{"name": "Todo"}])["project"]["id"]
    with subscribe(
        stack.ws_url, alice.token, BOARD_CHANGED, {"id": pid}, auth_in_payload=False
    ) as sub:
        event = first_change(sub, lambda: alice.create_card(pid, "hello"))
        assert event["data"]["boardChanged"]["kind"] == "card.created"


def test_an_invalid_subscription_is_answered_with_a_validation_error(stack: Stack) -> None:
    alice, _ = stack.owner_with_workspace()
    with subscribe(
        stack.ws_url, alice.token, 'subscription { agentRunLog(runId: "nope") { seq } }'
    ) as sub:
        message = sub.next_message()
        errors = message["payload"] if message["type"] == "error" else message["payload"]["errors"]
        assert [e["extensions"]["code"] for e in errors] == ["VALIDATION"]
        assert "Traceback" not in json.dumps(message)


def test_queries_are_not_run_over_the_websocket(stack: Stack) -> None:
    alice, ws = stack.owner_with_workspace()
    with subscribe(
        stack.ws_url, alice.token, "query($id: ID!) { workspace(id: $id) { id } }", {"id": ws}
    ) as sub:
        message = sub.next_message()
        errors = message["payload"] if message["type"] == "error" else message["payload"]["errors"]
        assert [e["extensions"]["code"] for e in errors] == ["VALIDATION"]


@pytest.mark.parametrize(
    "message",
    [
        "[]",
        '"subscribe"',
        "null",
        '{"type": "subscribe", "id": ["1"], "payload": {"query": "subscription { x }"}}',
        '{"type": "subscribe", "id": 1, "payload": {"query": "subscription { x }"}}',
        '{"type": "subscribe", "id": "1", "payload": "subscription { x }"}',
        '{"type": "subscribe", "id": "1", "payload": null}',
        '{"type": "subscribe", "id": "1", "payload": {"query": 5}}',
        '{"type": "subscribe", "id": "1", "payload": {"query": "subscription { x }",'
        ' "variables": [1]}}',
        '{"type": "subscribe", "id": "1", "payload": {"query": "subscription { x }",'
        ' "operationName": 5}}',
        '{"type": "complete", "id": {"a": 1}}',
        "[" * 5_000,
        '{"type": "subscribe", "id": "1", "payload": {"query": "subscription { x }",'
        ' "variables": {"x": ' + "[" * 5_000 + "}}}",
    ],
)
def test_a_message_the_protocol_does_not_allow_closes_the_connection_with_4400(
    stack: Stack, message: str
) -> None:
    alice, _ = stack.owner_with_workspace()
    with connect(f"{stack.ws_url}/graphql", subprotocols=[PROTOCOL]) as socket:
        init = {"type": "connection_init", "payload": {"Authorization": f"Bearer {alice.token}"}}
        socket.send(json.dumps(init))
        assert json.loads(socket.recv(timeout=10))["type"] == "connection_ack"
        socket.send(message)
        with pytest.raises(ConnectionClosed) as closed:
            # Not an error message, an INTERNAL one among them, nor a drop without a code.
            socket.recv(timeout=10)
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 4400


def test_a_websocket_message_is_held_to_the_request_body_limit(make_stack: MakeStack) -> None:
    stack = make_stack(max_body_bytes=2_000)
    alice, ws = stack.owner_with_workspace()
    pid = alice.create_project(ws, "P", [{"name": "Todo"}])["project"]["id"]
    with connect(f"{stack.ws_url}/graphql", subprotocols=[PROTOCOL]) as socket:
        init = {"type": "connection_init", "payload": {"Authorization": f"Bearer {alice.token}"}}
        socket.send(json.dumps(init))
        assert json.loads(socket.recv(timeout=10))["type"] == "connection_ack"
        payload = {"query": BOARD_CHANGED, "variables": {"id": pid, "pad": "x" * 5_000}}
        socket.send(json.dumps({"id": "1", "type": "subscribe", "payload": payload}))
        with pytest.raises(ConnectionClosed) as closed:
            socket.recv(timeout=10)
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 1009  # message too big, as a POST of it is 413
