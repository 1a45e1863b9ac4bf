"""An API key's last use (``ApiKey.lastUsedAt``), over HTTP and WebSocket as a client would.

The stack writes a key's use at most once an hour here, so "a second use inside the interval"
never depends on how fast the test runs. The API writes uses beside the requests, one at a time
in the order it saw them: a test waits for a use to be stored, and a fresh key's use, once stored,
shows that every use seen before it has been written (or skipped).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import psycopg
import pytest
from api_client import subscribe, wait_for
from e2e_stack import Stack, StackBuilder
from test_invitations_and_api_keys import CREATE_KEY, CREATE_PROJECT, data, gql, user, workspace_of

from adapters.metrics import API_KEY_USES_UNRECORDED

INTERVAL_SECONDS = 3600.0
REVOKE_KEY = """mutation($k: ID!) {
  revokeApiKey(input: {apiKeyId: $k}) { apiKey { id lastUsedAt revokedAt } } }"""
WORKSPACE = "query($w: ID!) { workspace(id: $w) { name } }"
BOARD_CHANGED = "subscription($p: ID!) { boardChanged(projectId: $p) { kind } }"


@pytest.fixture(scope="module")
def keys_stack(module_database_url: str, redis_url: str) -> Iterator[Stack]:
    stacks = StackBuilder(redis_url)
    yield stacks.build(module_database_url, auth={}, api_key_use_interval_seconds=INTERVAL_SECONDS)
    stacks.close()


@pytest.fixture
def http(keys_stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=keys_stack.url, timeout=15.0) as client:
        yield client


@pytest.fixture
def owner(http: httpx.Client, request: pytest.FixtureRequest) -> tuple[str, str]:
    """A signed-up owner's token and a workspace of theirs."""
    _, token = user(http, f"owner-{request.node.name[-40:]}@last-use.test".lower())
    return token, workspace_of(http, token, "Last use")


def new_key(
    http: httpx.Client, owner: tuple[str, str], name: str, command_id: str | None = None
) -> tuple[str, str]:
    """A fresh ADMIN key of the owner's workspace: its id and secret."""
    token, workspace_id = owner
    made = data(gql(http, token, CREATE_KEY, w=workspace_id, n=name, r="ADMIN", c=command_id))
    return str(made["createApiKey"]["apiKey"]["id"]), str(made["createApiKey"]["secret"])


def use(http: httpx.Client, secret: str, workspace_id: str) -> None:
    assert data(gql(http, secret, WORKSPACE, w=workspace_id))["workspace"] == {"name": "Last use"}


def stored(stack: Stack, key_id: str) -> tuple[datetime, int] | None:
    """The key's stored use and its row version (``xmin``: any rewrite changes it)."""
    with psycopg.connect(stack.database_url) as conn:
        row = conn.execute(
            "SELECT last_used_at, xmin::text::bigint FROM api_key_uses WHERE key_id = %s",
            (key_id,),
        ).fetchone()
    return None if row is None else (row[0], row[1])


def recorded(stack: Stack, key_id: str) -> tuple[datetime, int]:
    found = wait_for(lambda: stored(stack, key_id), what=f"key {key_id}'s use stored")
    assert found is not None
    return found


def when(value: Any) -> datetime:
    return datetime.fromisoformat(str(value))


def test_a_keys_use_shows_as_its_last_used_at_and_outlives_its_revocation(
    http: httpx.Client, keys_stack: Stack, owner: tuple[str, str]
) -> None:
    token, workspace_id = owner
    command_id = "0b8e1c56-3a0f-4d59-9a43-7c1e2f3d4a5b"
    key_id, secret = new_key(http, owner, "ci", command_id)
    replay = gql(http, token, CREATE_KEY, w=workspace_id, n="ci", r="ADMIN", c=command_id)
    assert data(replay)["createApiKey"]["apiKey"]["lastUsedAt"] is None  # never used

    before = datetime.now(UTC)
    use(http, secret, workspace_id)
    after = datetime.now(UTC)
    at, _ = recorded(keys_stack, key_id)
    assert before <= at <= after

    replay = gql(http, token, CREATE_KEY, w=workspace_id, n="ci", r="ADMIN", c=command_id)
    assert when(data(replay)["createApiKey"]["apiKey"]["lastUsedAt"]) == at
    revoked = data(gql(http, token, REVOKE_KEY, k=key_id))["revokeApiKey"]["apiKey"]
    assert revoked["revokedAt"] is not None
    assert when(revoked["lastUsedAt"]) == at

    # A revoked key's attempt is no use; the key keeps the last one it had.
    assert gql(http, secret, WORKSPACE, w=workspace_id).status_code == 401
    again = data(gql(http, token, REVOKE_KEY, k=key_id))["revokeApiKey"]["apiKey"]
    assert when(again["lastUsedAt"]) == at


def test_uses_inside_the_interval_write_nothing_more(
    http: httpx.Client, keys_stack: Stack, owner: tuple[str, str]
) -> None:
    _, workspace_id = owner
    key_id, secret = new_key(http, owner, "busy")
    use(http, secret, workspace_id)
    first = recorded(keys_stack, key_id)

    for _ in range(5):
        use(http, secret, workspace_id)
    project = data(gql(http, secret, CREATE_PROJECT, w=workspace_id, n="By key"))
    project_id = project["createProject"]["project"]["id"]
    with subscribe(keys_stack.ws_url, secret, BOARD_CHANGED, {"p": project_id}):
        pass

    # Written after whatever the uses above could have queued.
    witness_id, witness = new_key(http, owner, "witness")
    use(http, witness, workspace_id)
    recorded(keys_stack, witness_id)
    assert stored(keys_stack, key_id) == first  # same time, same row version: no rewrite


def test_a_websocket_connection_is_a_use(
    http: httpx.Client, keys_stack: Stack, owner: tuple[str, str]
) -> None:
    token, workspace_id = owner
    project = data(gql(http, token, CREATE_PROJECT, w=workspace_id, n="Watched"))
    project_id = project["createProject"]["project"]["id"]
    key_id, secret = new_key(http, owner, "watcher")
    before = datetime.now(UTC)
    with subscribe(keys_stack.ws_url, secret, BOARD_CHANGED, {"p": project_id}):
        at, _ = recorded(keys_stack, key_id)
    assert before <= at <= datetime.now(UTC)


def test_a_use_the_database_refuses_to_record_is_still_served(
    http: httpx.Client, keys_stack: Stack, owner: tuple[str, str]
) -> None:
    _, workspace_id = owner
    key_id, secret = new_key(http, owner, "unrecorded")
    failed = API_KEY_USES_UNRECORDED.labels("failed")
    failures = failed._value.get()
    with psycopg.connect(keys_stack.database_url, autocommit=True) as owner_conn:
        owner_conn.execute("REVOKE INSERT, UPDATE ON api_key_uses FROM agentworks_api")
        try:
            use(http, secret, workspace_id)
            project = gql(http, secret, CREATE_PROJECT, w=workspace_id, n="Unrecorded")
            assert data(project)["createProject"]["project"]["id"]
            wait_for(lambda: failed._value.get() > failures, what="the refused write counted")
        finally:
            owner_conn.execute("GRANT INSERT, UPDATE ON api_key_uses TO agentworks_api")
    assert stored(keys_stack, key_id) is None
