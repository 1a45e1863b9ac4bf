"""Redis restarted under the API: it keeps answering, says so once, and is whole again after.

Redis here is a server of the test's own on a free port (the shared one on 6379 is never
restarted). While it is away, rate limits are counted in process (requests go through rather
than fail), change notifications are dropped (subscribers re-read the read model), ``/readyz`` says
not ready so a balancer can prefer another instance, and the outage is logged once.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from typing import TYPE_CHECKING

import httpx
import pytest
import redis
import structlog
from dedicated_postgres import free_port
from outage_helpers import CREATE_CARD, start_api_stack

from adapters.outages import REDIS

if TYPE_CHECKING:
    from collections.abc import Iterator

pytestmark = pytest.mark.slow

BOARD = "query($p: ID!) { board(projectId: $p) { lanes { name } } }"


class RedisServer:
    def __init__(self) -> None:
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(redis.ConnectionError), redis.Redis(port=self.port) as client:
                if client.ping():
                    return
            if time.monotonic() > deadline:
                raise TimeoutError("redis-server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_api_keeps_answering_while_redis_restarts(
    database_url: str, redis_server: RedisServer
) -> None:
    stack = start_api_stack(database_url, redis_url=redis_server.url)
    try:
        token, (project_id,) = stack.boards(1)
        assert httpx.get(f"{stack.url}/readyz", timeout=10).status_code == 200

        with structlog.testing.capture_logs() as logs:
            redis_server.stop()
            during = [
                stack.post(token, BOARD, {"p": project_id}).status_code for _ in range(20)
            ] + [
                stack.post(
                    token, CREATE_CARD, {"input": {"projectId": project_id, "title": f"r{i}"}}
                ).status_code
                for i in range(5)
            ]
            ready_during = httpx.get(f"{stack.url}/readyz", timeout=10)
            redis_server.start()
            ready_after = None
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                ready_after = httpx.get(f"{stack.url}/readyz", timeout=10)
                if ready_after.status_code == 200:
                    break
                time.sleep(0.05)
            after = stack.post(token, BOARD, {"p": project_id}).status_code

        assert during == [200] * 25
        assert ready_during.status_code == 503
        assert ready_during.json()["redis"].startswith("unavailable")
        assert ready_after is not None
        assert ready_after.status_code == 200
        assert after == 200
        downs = [e for e in logs if e["event"] == "dependency.down" and e["dependency"] == REDIS]
        ups = [e for e in logs if e["event"] == "dependency.up" and e["dependency"] == REDIS]
        assert len(downs) == 1
        assert len(ups) == 1
        # Rate limits are counted in Redis again.
        with redis.Redis(port=redis_server.port) as client:
            assert any(key.startswith(b"agentworks:ratelimit") for key in client.keys("*"))
    finally:
        stack.close()
