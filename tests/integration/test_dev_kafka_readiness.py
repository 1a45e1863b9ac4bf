"""``agentworks dev`` through Kafka is ready only when its fan-out can deliver.

On a fresh broker the workers first join their consumer groups (against tansu that alone takes
half the session timeout); until each holds its partitions, an event published now sits in Kafka
and a mutation's payload, which waits a bounded time for the read model, comes back ``null`` and
stale. So ``/readyz`` answers 503 naming what is missing until the relay holds its lease and every
worker consumes all of its partitions, and ``dev`` prints its URL only then.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from users import user_id

from adapters.kafka_broker import free_port
from adapters.tokens import BOOTSTRAP_WORKSPACE, issue_token

if TYPE_CHECKING:
    from collections.abc import Iterator

    from adapters.kafka_broker import LocalBroker

pytest_plugins = ["kafka_fixtures"]
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SECRET = "dev-kafka-readiness-secret-" + "r" * 32
URL_LINE = "GraphQL: http://"
CREATE = (
    'mutation { createWorkspace(input: {name: "First"}) {'
    " consistencyToken workspace { id name members { role } } } }"
)


@pytest.fixture
def dev(
    database_url: str, kafka_broker: LocalBroker, tmp_path: Path
) -> Iterator[tuple[subprocess.Popen[bytes], int, Path]]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTWORKS_")}
    env.update(
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
        AGENTWORKS_DATABASE_URL=database_url,
        AGENTWORKS_KAFKA_BOOTSTRAP=kafka_broker.bootstrap,
        # Topics and consumer groups no one has used: a fresh broker as far as dev can tell.
        AGENTWORKS_TOPIC_PREFIX=f"ready-{uuid.uuid4().hex[:8]}.",
        AGENTWORKS_JWT_SECRET=SECRET,
        AGENTWORKS_DATA_DIR=str(tmp_path / "data"),
    )
    err = tmp_path / "stderr"
    with err.open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "infra.cli", "dev", "--port", str(port)],
            cwd=tmp_path,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,
        )
    try:
        yield process, port, err
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


@pytest.mark.many_connections
def test_the_first_write_after_dev_is_ready_reads_back_fresh(
    dev: tuple[subprocess.Popen[bytes], int, Path],
) -> None:
    process, port, err = dev
    url = f"http://127.0.0.1:{port}"
    early: list[tuple[int, dict[str, Any]]] = []
    deadline = time.monotonic() + 120
    while URL_LINE not in err.read_text():
        assert process.poll() is None, err.read_text()
        assert time.monotonic() < deadline, err.read_text()
        try:
            answer = httpx.get(f"{url}/readyz", timeout=2)
        except httpx.HTTPError:
            pass
        else:
            early.append((answer.status_code, answer.json()))
        time.sleep(0.1)
    started = time.monotonic()
    ready = _ready(url, deadline)

    bootstrap = issue_token(user_id=user_id("ada"), workspace_id=BOOTSTRAP_WORKSPACE, role="OWNER",
                            ttl_seconds=600, secret=SECRET)  # fmt: skip
    response = httpx.post(
        f"{url}/graphql",
        json={"query": CREATE},
        headers={"Authorization": f"Bearer {bootstrap}"},
        timeout=30,
    )
    took = time.monotonic() - started
    body = response.json()
    assert response.status_code == 200, body
    assert "errors" not in body, body
    assert not (body.get("extensions") or {}).get("stale"), body
    workspace = body["data"]["createWorkspace"]["workspace"]
    assert workspace is not None, body
    assert workspace["name"] == "First"
    assert workspace["members"] == [{"role": "OWNER"}]

    fanout = ready["fanout"]
    assert fanout["relay"] == "ok"
    workers = {k for k in fanout if k.startswith("worker ")}
    assert workers == {"worker kanban", "worker activity", "worker runs", "worker billing"}
    assert set(fanout.values()) == {"ok"}, fanout
    not_ready = [body for status, body in early if status != 200]
    print(f"readyz polls before the URL: {len(early)} ({len(not_ready)} not ready);"
          f" ready -> first write answered in {took:.2f}s")  # fmt: skip
    for status, answer in early:
        assert (status == 200) == (set(answer["fanout"].values()) == {"ok"}), answer


def _ready(url: str, deadline: float) -> dict[str, Any]:
    """The first 200 answer of ``/readyz`` (the server may still be binding its port)."""
    while True:
        assert time.monotonic() < deadline, "never ready"
        try:
            answer = httpx.get(f"{url}/readyz", timeout=2)
        except httpx.HTTPError:
            answer = None
        if answer is not None and answer.status_code == 200:
            body: dict[str, Any] = answer.json()
            return body
        time.sleep(0.05)
