"""``agentworks serve`` alone says what it lacks, and is not ready while nothing feeds it."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
from cli_process import Agentworks, clean_env, free_port
from users import user_id

from adapters.tokens import BOOTSTRAP_WORKSPACE, issue_token

if TYPE_CHECKING:
    pass

pytestmark = pytest.mark.slow

SECRET = "serve-alone-test-secret-" + "s" * 32


def readyz(serve: Agentworks) -> httpx.Response:
    return httpx.get(f"{serve.url}/readyz", timeout=10)


def test_serve_alone_names_what_it_lacks_and_turns_not_ready_when_lag_stops_moving(
    tmp_path: Path, database_url: str, running: list[Agentworks]
) -> None:
    port = free_port()
    env = clean_env(
        AGENTWORKS_DATABASE_URL=database_url,
        AGENTWORKS_JWT_SECRET=SECRET,
        AGENTWORKS_PROJECTOR_STALL_SECONDS="1",
    )
    serve = Agentworks.start(tmp_path, "serve", "--port", str(port), env=env, port=port)
    running.append(serve)
    serve.wait_until_serving(timeout=60)

    assert "no projectors in this process" in serve.stderr
    assert "agentworks dev" in serve.stderr
    assert readyz(serve).status_code == 200  # an empty log: nothing to be behind on

    bootstrap = issue_token(
        user_id=user_id("ops"), workspace_id=BOOTSTRAP_WORKSPACE, role="OWNER", ttl_seconds=60,
        secret=SECRET,
    )  # fmt: skip
    serve.graphql(
        bootstrap, 'mutation { createWorkspace(input: {name: "Alone"}) { workspace { id } } }', {}
    )

    deadline = time.monotonic() + 30
    answer = readyz(serve)
    while answer.status_code == 200 and time.monotonic() < deadline:
        time.sleep(0.3)
        answer = readyz(serve)
    assert answer.status_code == 503, answer.text
    body = answer.json()
    assert body["status"] == "not ready"
    assert all(p["lag"] > 0 and p["stalledSeconds"] >= 1 for p in body["projectors"].values())

    # Something consumes the log (here a rebuild): ready again.
    rebuilt = subprocess.run(
        [sys.executable, "-m", "infra.cli", "rebuild", "all"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert readyz(serve).status_code == 200, readyz(serve).text
