"""The production processes together: serve, relay and workers on PostgreSQL, Kafka and Redis.

Each runs as its own ``agentworks`` process, as docker-compose runs them; a client speaks HTTP to
``serve`` only and reads its own writes, which travelled command -> event store -> relay ->
broker -> worker -> read model.
"""

from __future__ import annotations

import secrets
import time
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from fanout_helpers import KafkaFanout, Service, cli

from adapters.kafka_broker import free_port
from adapters.tokens import BOOTSTRAP_WORKSPACE, issue_token

if TYPE_CHECKING:
    from pathlib import Path

    from adapters.kafka_broker import LocalBroker

ALICE = "8e4f2a1b-6c3d-4f5e-9a0b-7c1d2e3f4a05"

pytestmark = pytest.mark.slow


def _graphql(url: str, token: str, query: str, **headers: str) -> Any:
    response = httpx.post(
        f"{url}/graphql",
        json={"query": query},
        headers={"Authorization": f"Bearer {token}", **headers},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert "errors" not in body, body
    return body["data"]


def test_serve_relay_and_workers_serve_a_client_through_kafka_and_redis(
    database_url: str, redis_url: str, kafka_broker: LocalBroker, tmp_path: Path
) -> None:
    secret = secrets.token_urlsafe(48)
    prefix = f"t{secrets.token_hex(4)}."
    fanout = KafkaFanout(
        database_url, kafka_broker.bootstrap, tmp_path, topic_prefix=prefix, per_projector=False
    )
    fanout.env["AGENTWORKS_REDIS_URL"] = redis_url
    fanout.env["AGENTWORKS_JWT_SECRET"] = secret
    # Workers need a few seconds to join their groups; let reads wait for them.
    fanout.env["AGENTWORKS_CONSISTENCY_WAIT_MS"] = "30000"
    port = free_port()
    serve = Service("serve", cli("serve", "--port", str(port)), env=dict(fanout.env), cwd=tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        fanout.start()
        serve.start()
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, serve.log_tail()
            time.sleep(0.2)

        boot = issue_token(
            user_id=ALICE, workspace_id=BOOTSTRAP_WORKSPACE, role="OWNER", ttl_seconds=600,
            secret=secret,
        )  # fmt: skip
        created = _graphql(
            url, boot, 'mutation { createWorkspace(input: {name: "Prod"}) { workspace { id } } }'
        )
        workspace_id = created["createWorkspace"]["workspace"]["id"]
        token = issue_token(
            user_id=ALICE, workspace_id=workspace_id, role="OWNER", ttl_seconds=600,
            secret=secret,
        )  # fmt: skip
        project = _graphql(
            url,
            token,
            f'mutation {{ createProject(input: {{workspaceId: "{workspace_id}", name: "P"}}) '
            "{ consistencyToken project { id } } }",
        )["createProject"]
        project_id = project["project"]["id"]
        card = _graphql(
            url,
            token,
            f'mutation {{ createCard(input: {{projectId: "{project_id}", title: "via Kafka"}}) '
            "{ consistencyToken card { id title lane } } }",
        )["createCard"]
        # The payload already waited until the Kanban read model, fed through Kafka, had it.
        assert card["card"]["title"] == "via Kafka"
        board = _graphql(
            url,
            token,
            f'{{ board(projectId: "{project_id}") {{ lanes {{ name count '
            "cards { edges { node { title } } } } } }",
            **{"X-Consistency-Token": card["consistencyToken"]},
        )["board"]
        titles = [e["node"]["title"] for lane in board["lanes"] for e in lane["cards"]["edges"]]
        assert titles == ["via Kafka"]
        assert sum(lane["count"] for lane in board["lanes"]) == 1
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        assert "agentworks_projector_lag_events" in metrics
        assert fanout.dead() == [], fanout.diagnostics()
    finally:
        serve.stop()
        fanout.stop()
