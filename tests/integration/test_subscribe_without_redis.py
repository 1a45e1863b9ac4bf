"""A subscription asked for while Redis is away is refused UNAVAILABLE, not INTERNAL.

Subscriptions hear changes through Redis pub/sub; one that cannot be subscribed there (Redis
refuses, or takes the SUBSCRIBE and never confirms it) cannot be served now, which is what
UNAVAILABLE says (with when to come back), not a bug of ours logged with a traceback.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING

import pytest
import structlog
from dedicated_postgres import free_port
from outage_helpers import start_api_stack
from redis_proxy import SilentServer
from websockets.sync.client import connect

from adapters.outages import OUTAGES, REDIS

if TYPE_CHECKING:
    from collections.abc import Iterator

pytestmark = pytest.mark.slow

BOARD_CHANGED = "subscription($p: ID!) { boardChanged(projectId: $p) { kind } }"
BOARD = "query($p: ID!) { board(projectId: $p) { version } }"


@pytest.fixture(params=["refused", "silent"])
def away_redis_url(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "refused":
        yield f"redis://127.0.0.1:{free_port()}/0"
    else:
        silent = SilentServer()
        try:
            yield silent.url
        finally:
            silent.close()
    OUTAGES.up(REDIS)  # the process's outage state: later tests start with Redis up


def test_a_subscription_asked_for_while_redis_is_away_is_unavailable(
    database_url: str, away_redis_url: str
) -> None:
    stack = start_api_stack(database_url, redis_url=away_redis_url)
    try:
        token, (project_id,) = stack.boards(1)
        deadline = time.monotonic() + 30
        while stack.post(token, BOARD, {"p": project_id}).json()["data"]["board"] is None:
            assert time.monotonic() < deadline, "the project never reached the read model"
            time.sleep(0.1)
        with (
            structlog.testing.capture_logs() as logs,
            connect(
                stack.url.replace("http", "ws", 1) + "/graphql",
                subprotocols=["graphql-transport-ws"],  # type: ignore[list-item]
                open_timeout=10,
            ) as socket,
        ):
            init = {"Authorization": f"Bearer {token}"}
            socket.send(json.dumps({"type": "connection_init", "payload": init}))
            assert json.loads(socket.recv(timeout=10))["type"] == "connection_ack"
            subscribe = {"query": BOARD_CHANGED, "variables": {"p": project_id}}
            socket.send(json.dumps({"id": "1", "type": "subscribe", "payload": subscribe}))
            answer = json.loads(socket.recv(timeout=30))
    finally:
        stack.close()

    # Refused before it started: the protocol's error message (the id free again, no
    # complete), as every other refusal of a subscribe (docs/API_NOTES.md, WebSocket errors).
    assert answer["type"] == "error", answer
    (error,) = answer["payload"]
    assert error["extensions"]["code"] == "UNAVAILABLE", answer
    assert error["extensions"]["retryAfter"] >= 1
    assert not [entry for entry in logs if entry["log_level"] == "error"]
