"""Subscriptions cannot exhaust the API: limits per connection and per user, and a client that
vanishes (TCP gone, no ``complete``, no close frame) leaves nothing behind.

The clients here speak graphql-transport-ws on a bare socket (websockets' sans-I/O protocol), so
a test can drop the connection the way a network does: the kernel resets it, nothing is said.
"""

from __future__ import annotations

import json
import socket
import statistics
import struct
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
import redis
from api_client import PROTOCOL, ApiClient, wait_for
from e2e_stack import API_APPLICATION_NAME, MakeStack, Stack
from rate_windows import clear_of_a_window_end
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.uri import parse_uri

from projections.kanban import board_channel
from read_api.services import RateLimits

BOARD_CHANGED = """
subscription($id: ID!) { boardChanged(projectId: $id) { kind cardId card { id title } } }
"""
BOARD = """
query($id: ID!) { project(id: $id) { name board { lanes { name count
  cards(first: 50) { edges { node { title } } } } } } }
"""


class RawConnection:
    """One graphql-transport-ws connection on a plain TCP socket, authenticated on open (with
    ``token`` None, only its handshake: a socket that has not signed in)."""

    def __init__(self, ws_url: str, token: str | None) -> None:
        uri = parse_uri(f"{ws_url}/graphql")
        self.protocol = ClientProtocol(uri, subprotocols=[PROTOCOL])
        self.sock = socket.create_connection((uri.host, uri.port), timeout=10)
        self._received: deque[dict[str, Any]] = deque()
        self._open = False
        try:
            self.protocol.send_request(self.protocol.connect())
            self._flush()
            while not self._open:
                self._pump(time.monotonic() + 10)
            if token is None:
                return
            self.send({"type": "connection_init", "payload": {"Authorization": f"Bearer {token}"}})
            ack = self.recv()
        except BaseException:
            self.sock.close()
            raise
        if ack["type"] != "connection_ack":
            self.sock.close()
            raise AssertionError(f"connection refused: {ack}")

    def send(self, message: dict[str, Any]) -> None:
        self.protocol.send_text(json.dumps(message).encode())
        self._flush()

    def subscribe(self, operation_id: str, query: str, variables: dict[str, Any]) -> None:
        self.send(
            {
                "id": operation_id,
                "type": "subscribe",
                "payload": {"query": query, "variables": variables},
            }
        )

    def recv(self, timeout: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while not self._received:
            self._pump(deadline)
        return self._received.popleft()

    def _pump(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no message from the server in time")
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return
        if data:
            self.protocol.receive_data(data)
        else:
            self.protocol.receive_eof()
        for event in self.protocol.events_received():
            if isinstance(event, Response):
                if event.status_code != 101:
                    raise AssertionError(f"handshake refused: HTTP {event.status_code}")
                self._open = True
            elif isinstance(event, Frame) and event.opcode is Opcode.TEXT:
                self._received.append(json.loads(bytes(event.data)))
        self._flush()
        if not data and not self._received:
            raise ConnectionError(
                f"closed by the server: {self.protocol.close_code} {self.protocol.close_reason}"
            )

    def sync(self) -> list[dict[str, Any]]:
        """What the server sent before it answered a ping.

        The server handles one connection's messages in order, so when the pong comes every
        ``subscribe`` sent before the ping has been accepted or refused.
        """
        self.send({"type": "ping"})
        messages = []
        while (message := self.recv())["type"] != "pong":
            messages.append(message)
        return messages

    def drop(self) -> None:
        """Vanish: reset the TCP connection, with no ``complete`` and no close frame."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def close(self) -> None:
        self.sock.close()

    def _flush(self) -> None:
        for chunk in self.protocol.data_to_send():
            if chunk:
                self.sock.sendall(chunk)


def _codes(message: dict[str, Any]) -> list[str]:
    return [error["extensions"]["code"] for error in message["payload"]]


def _tenant_with_viewer(stack: Stack, owner: str) -> tuple[ApiClient, str, ApiClient]:
    """An owner's workspace with one project, and a VIEWER member of it."""
    alice, ws = stack.owner_with_workspace(owner, f"{owner}'s")
    project = alice.create_project(ws, "P", [{"name": "Todo"}])["project"]["id"]
    viewer = str(uuid.uuid4())
    alice.add_member(ws, viewer, "VIEWER")
    return alice, project, stack.as_user(viewer, ws, "VIEWER")


def _all_receive_a_change(
    connection: RawConnection, ids: set[str], make_change: Callable[[], object]
) -> None:
    """Cause board changes until every subscription in ``ids`` has reported one."""
    waiting = set(ids)
    deadline = time.monotonic() + 30
    while waiting and time.monotonic() < deadline:
        make_change()
        try:
            while waiting:
                message = connection.recv(timeout=1.0)
                assert message["type"] == "next", message
                waiting.discard(message["id"])
        except TimeoutError:
            continue
    assert not waiting, f"subscriptions {sorted(waiting)} never reported a change"


def _api_connections_idle_in_transaction(stack: Stack) -> int:
    with psycopg.connect(stack.database_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND application_name = %s AND state LIKE 'idle in transaction%%'",
            (API_APPLICATION_NAME,),
        ).fetchone()
    return int(row[0]) if row else 0


def _pool_fully_available(stack: Stack) -> bool:
    stats = stack.services.pool.get_stats()
    return stats["pool_available"] == stats["pool_size"] and stats.get("requests_waiting", 0) == 0


@pytest.mark.slow
@pytest.mark.parametrize(
    ("broadcaster", "per_connection", "per_user"),
    [
        ("local", 20, 100),
        ("redis", 20, 100),
        # Limits out of the way: what keeps the pool whole is that subscriptions give back
        # everything they hold, not that the limits keep them few.
        ("local", 200, 600),
    ],
)
def test_a_viewer_dropping_storms_of_subscriptions_starves_no_one(
    make_stack: MakeStack, redis_url: str, broadcaster: str, per_connection: int, per_user: int
) -> None:
    stack = make_stack(
        broadcaster=broadcaster,
        max_subscriptions_per_connection=per_connection,
        max_subscriptions_per_user=per_user,
    )
    _, project, viewer = _tenant_with_viewer(stack, "alice")
    bob, bob_ws = stack.owner_with_workspace("bob", "Bob's")
    bob_project = bob.create_project(bob_ws, "Q", [{"name": "Todo"}])["project"]["id"]
    for title in ("one", "two", "three"):
        bob.create_card(bob_project, title)
    expected = {
        "name": "Q",
        "board": {
            "lanes": [
                {
                    "name": "Todo",
                    "count": 3,
                    "cards": {"edges": [{"node": {"title": t}} for t in ("one", "two", "three")]},
                }
            ]
        },
    }

    def board() -> float:
        started = time.perf_counter()
        answer = bob.post(BOARD, {"id": bob_project})
        elapsed = time.perf_counter() - started
        assert answer.status == 200, answer.body
        assert not answer.errors, answer.body
        assert answer.data["project"] == expected
        return elapsed

    before = [board() for _ in range(20)]
    # The other tenant's reads, by what the viewer was doing meanwhile.
    during: dict[str, list[float]] = {"storms": [], "refill": []}
    phase = ["storms"]
    failures: list[BaseException] = []
    stop = threading.Event()

    def keep_reading() -> None:
        while not stop.is_set():
            try:
                during[phase[0]].append(board())
            except BaseException as error:  # noqa: BLE001 - any error, reported by the test thread
                failures.append(error)
                return

    reader = threading.Thread(target=keep_reading)
    reader.start()
    try:
        for _ in range(3):
            attacker = RawConnection(stack.ws_url, viewer.token or "")
            for n in range(200):
                attacker.subscribe(str(n), BOARD_CHANGED, {"id": project})
            refused = attacker.sync()
            attacker.drop()
            assert len(refused) == 200 - per_connection
            assert {code for message in refused for code in _codes(message)} <= {"RATE_LIMITED"}
        wait_for(
            lambda: (
                _pool_fully_available(stack) and not _api_connections_idle_in_transaction(stack)
            ),
            timeout=30,
            every=0.1,
            what="every API connection back in the pool, none idle in a transaction",
        )
        if broadcaster == "redis":
            wait_for(
                lambda: not _redis_channels(redis_url, f"*{board_channel(project)}"),
                timeout=10,
                every=0.1,
                what="the API unsubscribed from the dropped subscriptions' Redis channel",
            )
        phase[0] = "refill"
        _the_user_has_every_slot_again(stack, viewer, project, per_connection, per_user)
    finally:
        stop.set()
        reader.join()
    assert not failures, failures
    assert during["storms"], "the other tenant's board was never read during the storms"
    wait_for(
        lambda: _pool_fully_available(stack) and not _api_connections_idle_in_transaction(stack),
        timeout=30,
        every=0.1,
        what="every API connection back in the pool after the last connections closed",
    )
    print(
        f"\n[{broadcaster}, {per_connection}/connection, {per_user}/user] other tenant's board"
        f" query, ms: {_summary('before', before)}; {_summary('3 storms', during['storms'])};"
        f" {_summary(f'{per_user} subscribing', during['refill'])}"
    )


def _summary(label: str, latencies: list[float]) -> str:
    if not latencies:
        return f"{label}: no reads"
    ordered = sorted(latencies)
    p95 = ordered[max(0, round(len(ordered) * 0.95) - 1)]
    return (
        f"{label}: {len(ordered)} reads, median {statistics.median(ordered) * 1000:.1f}"
        f" p95 {p95 * 1000:.1f} max {ordered[-1] * 1000:.1f}"
    )


def _redis_channels(redis_url: str, pattern: str) -> list[bytes | str]:
    client = redis.Redis.from_url(redis_url)
    try:
        return list(client.pubsub_channels(pattern))
    finally:
        client.close()


def _the_user_has_every_slot_again(
    stack: Stack, user: ApiClient, project: str, per_connection: int, per_user: int
) -> None:
    """The user can hold ``per_user`` subscriptions again, and not one more: whatever dropped
    connections held, their operations have ended and given their slots back (they may still be
    unwinding at first: try again for a while)."""
    wait_for(
        lambda: _fill_every_slot(stack, user, project, per_connection, per_user),
        timeout=15,
        every=0.2,
        what=f"the user had {per_user} subscription slots again",
    )


def _fill_every_slot(
    stack: Stack, user: ApiClient, project: str, per_connection: int, per_user: int
) -> bool:
    connections: list[RawConnection] = []
    try:
        left = per_user
        while left:
            connection = RawConnection(stack.ws_url, user.token or "")
            connections.append(connection)
            for n in range(min(left, per_connection)):
                connection.subscribe(str(n), BOARD_CHANGED, {"id": project})
            refused = connection.sync()
            if refused:
                assert {code for message in refused for code in _codes(message)} == {"RATE_LIMITED"}
                return False
            left -= min(left, per_connection)
        extra = RawConnection(stack.ws_url, user.token or "")
        connections.append(extra)
        extra.subscribe("extra", BOARD_CHANGED, {"id": project})
        [one_too_many] = extra.sync()
        assert _codes(one_too_many) == ["RATE_LIMITED"]
        # All of them are now waiting for a change, and none holds a pooled connection for that.
        wait_for(
            lambda: _pool_fully_available(stack),
            timeout=30,
            every=0.1,
            what=f"{per_user} waiting subscriptions holding no pooled connection",
        )
        return True
    finally:
        for connection in connections:
            connection.close()


def test_the_subscription_over_the_connection_limit_is_refused_and_the_others_go_on(
    make_stack: MakeStack,
) -> None:
    stack = make_stack(max_subscriptions_per_connection=5)
    alice, project, viewer = _tenant_with_viewer(stack, "alice")
    connection = RawConnection(stack.ws_url, viewer.token or "")
    try:
        for n in range(6):
            connection.subscribe(str(n), BOARD_CHANGED, {"id": project})
        [refused] = connection.sync()
        assert refused["type"] == "error"
        assert refused["id"] == "5"
        assert _codes(refused) == ["RATE_LIMITED"]
        assert "5" in refused["payload"][0]["message"]

        _all_receive_a_change(
            connection, {str(n) for n in range(5)}, lambda: alice.create_card(project, "x")
        )
        # A completed subscription frees its place.
        connection.send({"id": "0", "type": "complete"})
        _wait_for_slot(connection, "again", project)
    finally:
        connection.close()


def _wait_for_slot(connection: RawConnection, operation_id: str, project: str) -> None:
    """Subscribe until accepted: a slot is released once the ended operation has unwound."""
    deadline = time.monotonic() + 10
    while True:
        connection.subscribe(operation_id, BOARD_CHANGED, {"id": project})
        answers = [m for m in connection.sync() if m.get("id") == operation_id]
        if not answers:
            return
        assert _codes(answers[0]) == ["RATE_LIMITED"]
        if time.monotonic() > deadline:
            raise AssertionError("the completed subscription never gave its place back")
        time.sleep(0.1)


def test_a_user_is_limited_across_connections(make_stack: MakeStack) -> None:
    stack = make_stack(max_subscriptions_per_connection=5, max_subscriptions_per_user=8)
    alice, project, viewer = _tenant_with_viewer(stack, "alice")
    first = RawConnection(stack.ws_url, viewer.token or "")
    second = RawConnection(stack.ws_url, viewer.token or "")
    other = RawConnection(stack.ws_url, alice.token or "")
    try:
        for n in range(5):
            first.subscribe(str(n), BOARD_CHANGED, {"id": project})
        assert first.sync() == []
        for n in range(4):
            second.subscribe(str(n), BOARD_CHANGED, {"id": project})
        [refused] = second.sync()
        assert refused["id"] == "3"
        assert _codes(refused) == ["RATE_LIMITED"]
        # Another user is not affected by the viewer's count.
        for n in range(5):
            other.subscribe(str(n), BOARD_CHANGED, {"id": project})
        assert other.sync() == []

        _all_receive_a_change(second, {"0", "1", "2"}, lambda: alice.create_card(project, "y"))
        first.drop()
        _wait_for_slot(second, "3", project)
    finally:
        for connection in (first, second, other):
            connection.close()


def test_a_user_may_keep_no_more_connections_open_than_subscriptions(
    make_stack: MakeStack,
) -> None:
    stack = make_stack(max_subscriptions_per_connection=2, max_subscriptions_per_user=3)
    alice, _, viewer = _tenant_with_viewer(stack, "alice")
    held = [RawConnection(stack.ws_url, viewer.token or "") for _ in range(3)]
    try:
        # Idle connections (no subscription at all) count: the fourth is refused at init.
        with pytest.raises(ConnectionError, match="4403 RATE_LIMITED: "):
            held.append(RawConnection(stack.ws_url, viewer.token or ""))
        held.append(RawConnection(stack.ws_url, alice.token or ""))  # another user's own
        held.pop(0).drop()
        _wait_for_a_place(
            stack, viewer.token or "", "a place among the viewer's connections once one went away"
        )
    finally:
        for connection in held:
            connection.close()


def _wait_for_a_place(stack: Stack, token: str, what: str) -> None:
    wait_for(lambda: _connects(stack, token), timeout=10, every=0.1, what=what)


def _connects(stack: Stack, token: str) -> bool:
    """Whether a socket gets past its handshake and signs in with ``token``."""
    try:
        RawConnection(stack.ws_url, token).close()
    except ConnectionError:
        return False
    except AssertionError as refused:
        if "HTTP 403" not in str(refused):
            raise
        return False
    return True


def test_subscribes_count_against_the_callers_rate_limit(make_stack: MakeStack) -> None:
    limits = RateLimits(per_user_per_minute=6, per_workspace_per_minute=None,
                        key_prefix=f"rl-{uuid.uuid4().hex[:8]}")  # fmt: skip
    stack = make_stack(rate_limits=limits)
    clear_of_a_window_end()
    alice, project, viewer = _tenant_with_viewer(stack, "alice")
    connection = RawConnection(stack.ws_url, viewer.token or "")  # the connection: one request
    try:
        answers = []
        for n in range(8):
            connection.subscribe(str(n), BOARD_CHANGED, {"id": project})
            connection.send({"id": str(n), "type": "complete"})
            answers.extend(m for m in connection.sync() if m.get("type") == "error")
        # Five subscribes go through, the sixth request of the minute on is refused.
        assert [m["id"] for m in answers] == ["5", "6", "7"]
        assert {code for message in answers for code in _codes(message)} == {"RATE_LIMITED"}
        # Another user's budget is their own.
        assert alice.post("{ __typename }").status == 200
    finally:
        connection.close()


@pytest.mark.parametrize(
    "document",
    [
        "subscription { boardChanged(projectId: ",
        "subscription { boardChanged(projectId: 1) { nope } }",
        "subscription A { boardChanged(projectId: 1) { kind } } subscription B { x }",
    ],
)
def test_a_malformed_subscription_gets_an_error_message_and_the_connection_stays(
    stack: Stack, document: str
) -> None:
    alice, ws = stack.owner_with_workspace()
    project = alice.create_project(ws, "P", [{"name": "Todo"}])["project"]["id"]
    connection = RawConnection(stack.ws_url, alice.token or "")
    try:
        connection.subscribe("bad", document, {})
        message = connection.recv()
        assert message["type"] == "error", message
        assert message["id"] == "bad"
        assert _codes(message) == ["VALIDATION"]
        assert "Traceback" not in json.dumps(message)
        connection.subscribe("good", BOARD_CHANGED, {"id": project})
        # Accepted: no error. (The project's own creation may still be told to it: it is
        # published after its commit, which its mutation's answer does not wait for.)
        assert [m for m in connection.sync() if m["type"] != "next"] == []
        _all_receive_a_change(connection, {"good"}, lambda: alice.create_card(project, "z"))
    finally:
        connection.close()


@pytest.mark.parametrize(
    ("payload", "said"),
    [
        (
            {"query": "subscription A { boardChanged(projectId: 1) { kind } }",
             "operationName": "B"},
            'Unknown operation named "B".',
        ),
        ({"query": ""}, "query"),
        ({"query": "fragment F on Query { me { id } }"}, "operation"),
    ],
)  # fmt: skip
def test_a_subscribe_naming_no_operation_to_run_is_a_validation_error(
    stack: Stack, payload: dict[str, Any], said: str
) -> None:
    """No operation to run (an operationName the document does not hold, an empty document, one
    of fragments alone) is the client's mistake, VALIDATION as over HTTP, not INTERNAL."""
    alice, ws = stack.owner_with_workspace()
    project = alice.create_project(ws, "P", [{"name": "Todo"}])["project"]["id"]
    connection = RawConnection(stack.ws_url, alice.token or "")
    try:
        connection.send({"id": "bad", "type": "subscribe", "payload": payload})
        message = connection.recv()
        assert message["type"] == "error", message
        assert message["id"] == "bad"
        assert _codes(message) == ["VALIDATION"], message
        assert said in message["payload"][0]["message"]
        connection.subscribe("good", BOARD_CHANGED, {"id": project})
        assert [m for m in connection.sync() if m["type"] != "next"] == []
        _all_receive_a_change(connection, {"good"}, lambda: alice.create_card(project, "z"))
    finally:
        connection.close()


def test_sockets_not_signed_in_are_bounded_per_address_and_signed_in_ones_are_not(
    make_stack: MakeStack,
) -> None:
    """Before ``connection_init`` a socket names nobody, so the per-user bound cannot see it:
    one address could open sockets by the thousand and hold each for the 10 s strawberry waits
    for its ``connection_init``, file descriptors of the instance every tenant shares. At most
    ``max_unsigned_websockets_per_address`` of them per address; one more is refused at its
    handshake. A socket that signs in frees its address's place (users behind one NAT are
    bounded each by their own), and so does one that goes away."""
    stack = make_stack(max_unsigned_websockets_per_address=3)
    alice, _, viewer = _tenant_with_viewer(stack, "alice")
    held = [RawConnection(stack.ws_url, None) for _ in range(3)]
    try:
        with pytest.raises(AssertionError, match="handshake refused: HTTP 403"):
            held.append(RawConnection(stack.ws_url, None))
        with pytest.raises(AssertionError, match="handshake refused: HTTP 403"):
            held.append(RawConnection(stack.ws_url, viewer.token or ""))
        held.pop(0).close()
        _wait_for_a_place(
            stack, viewer.token or "", "a place for a socket once one not signed in went away"
        )
        # Signed-in sockets hold no place: more of them than the bound, from the same address.
        held += [RawConnection(stack.ws_url, alice.token or "") for _ in range(4)]
        held.append(RawConnection(stack.ws_url, None))
    finally:
        for connection in held:
            connection.close()
