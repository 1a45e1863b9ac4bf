"""What a developer meets in ``dev`` and a production server never offers.

In dev: ``dev`` says how to get a token, a token from another data dir is refused with a 401
that says so, GraphiQL answers a browser at ``GET /graphql``, and a SPA on any localhost port may
call the API (CORS) unless ``AGENTWORKS_CORS_ORIGINS`` says otherwise. In prod: none of that.
Everywhere: a garbage token is "malformed token", not the decoder's internals.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pg
import pytest
from cli_process import Agentworks, assert_clean_exit, clean_env, free_port, start_dev

from adapters.tokens import BOOTSTRAP_WORKSPACE, issue_token

pytestmark = pytest.mark.slow

PROD_SECRET = "prod-conveniences-secret-" + "p" * 32
QUERY = {"query": "{ __typename }"}


@pytest.fixture
def data_dirs(embedded_dir: Path) -> tuple[Path, Path]:
    return embedded_dir / "mine", embedded_dir / "other"


def cli_token(tmp_path: Path, data_dir: Path) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "infra.cli", "token", "--bootstrap", "--data-dir", str(data_dir)],
        cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return result.stdout.strip()


def post(server: Agentworks, token: str) -> httpx.Response:
    return httpx.post(
        f"{server.url}/graphql", json=QUERY, headers={"Authorization": f"Bearer {token}"}
    )


def preflight(server: Agentworks, origin: str) -> httpx.Response:
    return httpx.options(
        f"{server.url}/graphql",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        },
    )


def graphiql(server: Agentworks) -> httpx.Response:
    return httpx.get(f"{server.url}/graphql", headers={"Accept": "text/html,*/*"})


def message(response: httpx.Response) -> str:
    return str(response.json()["errors"][0]["message"])


def test_dev_helps_with_tokens_graphiql_and_cors_from_localhost(
    tmp_path: Path, data_dirs: tuple[Path, Path], running: list[Agentworks]
) -> None:
    mine, other = data_dirs
    dev = start_dev(tmp_path, mine, running=running)
    assert f"agentworks token --bootstrap --data-dir {mine}" in dev.stderr

    assert post(dev, cli_token(tmp_path, mine)).status_code == 200
    foreign = post(dev, cli_token(tmp_path, other))
    assert foreign.status_code == 401
    assert "another data dir" in message(foreign)
    assert str(mine.resolve()) in message(foreign)
    garbage = post(dev, "not-a-token")
    assert garbage.status_code == 401
    assert message(garbage).startswith("malformed token")

    page = graphiql(dev)
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "graphiql" in page.text.lower()

    for origin in ("http://localhost:5173", "http://127.0.0.1:3000", "http://localhost"):
        allowed = preflight(dev, origin)
        assert allowed.status_code == 200, (origin, allowed.text)
        assert allowed.headers["access-control-allow-origin"] == origin
    for origin in ("http://evil.example", "http://localhost.evil.example:80", "https://localhost"):
        refused = preflight(dev, origin)
        assert "access-control-allow-origin" not in refused.headers, origin

    code, _ = dev.stop(signal.SIGINT)
    assert_clean_exit(code, dev.stderr)


def test_prod_offers_no_dev_conveniences_and_configured_origins_replace_localhost(
    tmp_path: Path, database_url: str, running: list[Agentworks]
) -> None:
    servers = {}
    for name, extra in (
        ("prod", {"AGENTWORKS_ENV": "prod", **pg.LOGIN_ENV}),
        ("dev-with-origins", {"AGENTWORKS_CORS_ORIGINS": "https://app.example"}),
    ):
        port = free_port()
        run_dir = tmp_path / name
        run_dir.mkdir()
        env = clean_env(
            AGENTWORKS_DATABASE_URL=database_url, AGENTWORKS_JWT_SECRET=PROD_SECRET, **extra
        )
        servers[name] = Agentworks.start(run_dir, "serve", "--port", str(port), env=env, port=port)
        running.append(servers[name])
    for server in servers.values():
        server.wait_until_serving(timeout=60)

    prod = servers["prod"]
    foreign = issue_token(
        user_id="u", workspace_id=BOOTSTRAP_WORKSPACE, role="OWNER", ttl_seconds=60,
        secret="another-secret-" + "x" * 32,
    )  # fmt: skip
    refused = post(prod, foreign)
    assert refused.status_code == 401
    assert message(refused) == "token signature does not verify"
    assert message(post(prod, "a.b.c")).startswith("malformed token")
    assert graphiql(prod).status_code == 405
    assert "access-control-allow-origin" not in preflight(prod, "http://localhost:5173").headers

    configured = servers["dev-with-origins"]
    assert (
        "access-control-allow-origin" not in preflight(configured, "http://localhost:5173").headers
    )
    allowed = preflight(configured, "https://app.example")
    assert allowed.headers["access-control-allow-origin"] == "https://app.example"
