"""Listing a workspace's API keys and invitations (``Workspace.apiKeys``/``invitations``) over
HTTP as a client would: newest first, open ones by default, ADMIN or OWNER only, one tenant's
never shown to another, read-your-writes through the consistency token, and the same lists after
``agentworks rebuild``."""

from __future__ import annotations

from datetime import timedelta
from typing import Any
from uuid import UUID, uuid4

import httpx
import pg
import psycopg
import pytest
from api_client import wait_for
from e2e_stack import Stack
from test_invitations_and_api_keys import (
    ACCEPT,
    ADD_MEMBER,
    CREATE_KEY,
    INVITE,
    code,
    data,
    gql,
    owner_and_admin,
    user,
    workspace_of,
)

from commands.access import InviteMember, invite_member
from commands.handlers import USER_SCOPE, Actor
from infra.bootstrap import build_read_side
from infra.settings import Settings
from projections.rebuild import rebuild_many

KEYS = """query($w: ID!, $all: Boolean, $first: Int, $cursor: String) {
  workspace(id: $w) { apiKeys(includeRevoked: $all, first: $first, after: $cursor) {
    edges { cursor node { id name role createdAt lastUsedAt revokedAt } }
    pageInfo { hasNextPage hasPreviousPage endCursor } } } }"""
INVITATIONS = """query($w: ID!, $all: Boolean, $first: Int, $cursor: String) {
  workspace(id: $w) { invitations(includeClosed: $all, first: $first, after: $cursor) {
    edges { cursor node { id email role expiresAt acceptedAt revokedAt } }
    pageInfo { hasNextPage hasPreviousPage endCursor } } } }"""
WORKSPACE = "query($w: ID!) { workspace(id: $w) { name } }"
REVOKE_KEY = """mutation($k: ID!) {
  revokeApiKey(input: {apiKeyId: $k}) { apiKey { id revokedAt } consistencyToken } }"""
REVOKE_INVITATION = """mutation($i: ID!) {
  revokeInvitation(input: {invitationId: $i}) { invitation { id revokedAt } consistencyToken } }"""


def keys(
    http: httpx.Client, token: str, workspace_id: str, seen: str, **variables: Any
) -> list[Any]:
    """The workspace's keys as ``token`` lists them once the write of ``seen`` (a consistency
    token) is in the read models."""
    return [
        edge["node"] for edge in key_page(http, token, workspace_id, seen, **variables)["edges"]
    ]


def key_page(http: httpx.Client, token: str, workspace_id: str, seen: str, **variables: Any) -> Any:
    """The connection of keys as :func:`keys` reads it."""
    answer = data(gql(http, token, KEYS, after=seen, w=workspace_id, **variables))
    return answer["workspace"]["apiKeys"]


def invitations(
    http: httpx.Client, token: str, workspace_id: str, seen: str, **variables: Any
) -> list[Any]:
    answer = data(gql(http, token, INVITATIONS, after=seen, w=workspace_id, **variables))
    return [edge["node"] for edge in answer["workspace"]["invitations"]["edges"]]


def new_key(http: httpx.Client, token: str, workspace_id: str, name: str, role: str) -> Any:
    return data(gql(http, token, CREATE_KEY, w=workspace_id, n=name, r=role))["createApiKey"]


def test_keys_are_listed_newest_first_live_ones_unless_revoked_ones_are_asked_for(
    http: httpx.Client, auth_stack: Stack
) -> None:
    owner, workspace_id, _, admin, _ = owner_and_admin(http, "key-list.test", "Key list")
    made = [new_key(http, admin, workspace_id, f"key {i}", "MEMBER") for i in range(3)]
    first, second, third = (key["apiKey"]["id"] for key in made)
    revoked = data(gql(http, owner, REVOKE_KEY, k=second))["revokeApiKey"]
    assert revoked["apiKey"]["revokedAt"] is not None
    seen = revoked["consistencyToken"]

    # Read-your-writes: with the revocation's token the list already shows it.
    answer = gql(http, admin, KEYS, after=seen, w=workspace_id, all=True)
    assert "stale" not in (answer.json().get("extensions") or {})
    listed = [edge["node"] for edge in data(answer)["workspace"]["apiKeys"]["edges"]]
    assert [key["id"] for key in listed] == [third, second, first]
    assert listed[1]["revokedAt"] == revoked["apiKey"]["revokedAt"]
    assert [key["revokedAt"] for key in (listed[0], listed[2])] == [None, None]
    assert [key["name"] for key in listed] == ["key 2", "key 1", "key 0"]
    assert [key["createdAt"] for key in listed] == [
        key["apiKey"]["createdAt"] for key in made[::-1]
    ]
    assert {key["role"] for key in listed} == {"MEMBER"}
    assert [key["id"] for key in keys(http, admin, workspace_id, seen)] == [third, first]
    assert [key["id"] for key in keys(http, owner, workspace_id, seen, all=None)] == [third, first]

    # Never a secret, nor its digest: not in the answer, not in the read model.
    text = gql(http, admin, KEYS, w=workspace_id, all=True).text
    for key in made:
        assert key["secret"] not in text
        assert key["secret"].split("_", 2)[2] not in text
    with psycopg.connect(auth_stack.database_url) as conn:
        columns = {
            str(row[0])
            for row in conn.execute(
                "SELECT column_name FROM information_schema.columns"
                " WHERE table_name IN ('rm_api_keys', 'rm_invitations')"
            )
        }
    assert columns
    assert not {name for name in columns if "hash" in name or "secret" in name or "token" in name}

    # A key's use shows as its lastUsedAt once the API has written it (off the request path).
    assert data(gql(http, made[0]["secret"], WORKSPACE, w=workspace_id))["workspace"]
    used = wait_for(
        lambda: keys(http, admin, workspace_id, seen)[-1]["lastUsedAt"],
        what="the first key's use listed",
    )
    assert used is not None
    assert keys(http, admin, workspace_id, seen)[0]["lastUsedAt"] is None


def test_keys_are_read_a_page_at_a_time(http: httpx.Client) -> None:
    _, workspace_id, _, admin, _ = owner_and_admin(http, "key-pages.test", "Key pages")
    made = [new_key(http, admin, workspace_id, f"k{i}", "VIEWER") for i in range(5)]
    seen = made[-1]["consistencyToken"]

    pages: list[list[str]] = []
    cursor = None
    while True:
        page = key_page(http, admin, workspace_id, seen, first=2, cursor=cursor)
        pages.append([edge["node"]["id"] for edge in page["edges"]])
        assert page["pageInfo"]["hasPreviousPage"] is (cursor is not None)
        if not page["pageInfo"]["hasNextPage"]:
            break
        cursor = page["pageInfo"]["endCursor"]
        assert cursor == page["edges"][-1]["cursor"]
    assert [len(page) for page in pages] == [2, 2, 1]
    assert [k for page in pages for k in page] == [key["apiKey"]["id"] for key in made[::-1]]
    assert keys(http, admin, workspace_id, seen, first=0) == []

    assert code(gql(http, admin, KEYS, w=workspace_id, first=501)) == "VALIDATION"
    assert code(gql(http, admin, KEYS, w=workspace_id, cursor=str(uuid4()))) == "VALIDATION"
    assert code(gql(http, admin, KEYS, w=workspace_id, cursor="not-an-id")) == "VALIDATION"
    # A cursor of one list is no cursor of the other.
    invitation_list = INVITATIONS.replace("$all: Boolean, ", "").replace(
        "includeClosed: $all, ", ""
    )
    assert code(gql(http, admin, invitation_list, w=workspace_id, cursor=cursor)) == "VALIDATION"


def test_invitations_listed_are_the_pending_ones_unless_closed_ones_are_asked_for(
    http: httpx.Client, auth_stack: Stack
) -> None:
    owner, workspace_id, admin_id, admin, _ = owner_and_admin(http, "inv-list.test", "Inv list")
    _, joiner = user(http, "joiner@inv-list.test")

    def invite(email: str, role: str = "MEMBER") -> Any:
        return data(gql(http, admin, INVITE, w=workspace_id, e=email, r=role))["inviteMember"]

    accepted = invite("joiner@inv-list.test")
    revoked = invite("revoked@inv-list.test", "VIEWER")
    expired = invite_member(
        auth_stack.write,
        InviteMember(workspace_id=UUID(workspace_id), email="late@inv-list.test", role="VIEWER"),
        Actor(user_id=admin_id, workspace_id=USER_SCOPE),
        ttl=timedelta(seconds=-1),
    ).result
    pending = invite("pending@inv-list.test", "ADMIN")
    joined = data(gql(http, joiner, ACCEPT, t=accepted["acceptToken"]))["acceptInvitation"]
    assert joined["workspace"]["id"] == workspace_id
    gone = data(gql(http, owner, REVOKE_INVITATION, i=revoked["invitation"]["id"]))
    gone = gone["revokeInvitation"]
    assert gone["invitation"]["revokedAt"] is not None
    seen = gone["consistencyToken"]

    listed = invitations(http, admin, workspace_id, seen)
    assert listed == [{**pending["invitation"], "revokedAt": None}]
    assert listed[0]["role"] == "ADMIN"

    everything = {i["email"]: i for i in invitations(http, owner, workspace_id, seen, all=True)}
    assert list(everything) == [
        "pending@inv-list.test",
        "late@inv-list.test",
        "revoked@inv-list.test",
        "joiner@inv-list.test",
    ]
    assert everything["late@inv-list.test"]["id"] == str(expired.id)
    assert everything["late@inv-list.test"]["acceptedAt"] is None
    assert everything["joiner@inv-list.test"]["acceptedAt"] is not None
    assert everything["revoked@inv-list.test"]["revokedAt"] == gone["invitation"]["revokedAt"]
    listed_text = gql(http, owner, INVITATIONS, w=workspace_id, all=True).text
    assert accepted["acceptToken"] not in listed_text


def test_only_an_admin_or_owner_may_list_and_the_credential_caps_the_role(
    http: httpx.Client, auth_stack: Stack
) -> None:
    owner, workspace_id, admin_id, admin, _ = owner_and_admin(http, "key-roles.test", "Roles")
    member_id, member = user(http, "member@key-roles.test")
    data(gql(http, owner, ADD_MEMBER, w=workspace_id, u=member_id, r="MEMBER"))
    key = new_key(http, admin, workspace_id, "listed", "ADMIN")
    member_key = new_key(http, admin, workspace_id, "member key", "MEMBER")
    seen = member_key["consistencyToken"]

    refused = gql(http, member, KEYS, after=seen, w=workspace_id)
    assert code(refused) == "FORBIDDEN"
    assert refused.json()["errors"][0]["path"] == ["workspace", "apiKeys"]
    assert code(gql(http, member, INVITATIONS, w=workspace_id)) == "FORBIDDEN"
    # The member still reads the rest of the workspace.
    assert data(gql(http, member, WORKSPACE, w=workspace_id))["workspace"] == {"name": "Roles"}

    # A workspace token's role is a ceiling; an API key acts at its role, capped by its creator.
    capped = auth_stack.token(admin_id, workspace_id, "MEMBER")
    assert code(gql(http, capped, KEYS, w=workspace_id)) == "FORBIDDEN"
    assert code(gql(http, member_key["secret"], INVITATIONS, w=workspace_id)) == "FORBIDDEN"
    by_key = keys(http, key["secret"], workspace_id, seen)
    assert [k["name"] for k in by_key] == ["member key", "listed"]
    assert keys(http, auth_stack.token(admin_id, workspace_id, "OWNER"), workspace_id, seen)
    assert invitations(http, owner, workspace_id, seen) == []


def test_another_tenant_sees_none_of_them(http: httpx.Client, auth_stack: Stack) -> None:
    owner, workspace_id, _, admin, _ = owner_and_admin(http, "tenant-a.test", "Tenant A")
    made = new_key(http, admin, workspace_id, "a's key", "MEMBER")
    theirs = made["apiKey"]["id"]
    their_cursor = key_page(http, admin, workspace_id, made["consistencyToken"])["pageInfo"][
        "endCursor"
    ]
    invited = data(gql(http, admin, INVITE, w=workspace_id, e="x@tenant-a.test", r="MEMBER"))
    seen = invited["inviteMember"]["consistencyToken"]
    stranger_id, stranger = user(http, "owner@tenant-b.test")
    own = workspace_of(http, stranger, "Tenant B")

    assert data(gql(http, stranger, KEYS, w=workspace_id, all=True))["workspace"] is None
    assert data(gql(http, stranger, INVITATIONS, w=workspace_id, all=True))["workspace"] is None
    assert keys(http, stranger, own, seen, all=True) == []
    assert invitations(http, stranger, own, seen, all=True) == []
    # Another tenant's cursor is no cursor here: it names nothing this workspace has.
    elsewhere = gql(http, stranger, KEYS, w=own, cursor=their_cursor)
    assert code(elsewhere) == "VALIDATION"
    assert "after" in elsewhere.json()["errors"][0]["message"]
    # With a workspace token of its own workspace, the other one is "not found" (null).
    stranger_ws = auth_stack.token(stranger_id, own, "OWNER")
    assert data(gql(http, stranger_ws, KEYS, w=workspace_id))["workspace"] is None
    assert [k["id"] for k in keys(http, owner, workspace_id, seen)] == [theirs]
    assert len(invitations(http, owner, workspace_id, seen)) == 1


@pytest.mark.many_connections
def test_the_lists_survive_a_rebuild(http: httpx.Client, auth_stack: Stack) -> None:
    owner, workspace_id, _, admin, _ = owner_and_admin(http, "rebuilt.test", "Rebuilt")
    made = [new_key(http, admin, workspace_id, f"r{i}", "VIEWER") for i in range(3)]
    data(gql(http, made[1]["secret"], WORKSPACE, w=workspace_id))  # a use, to keep
    data(gql(http, owner, REVOKE_KEY, k=made[0]["apiKey"]["id"]))
    data(gql(http, admin, INVITE, w=workspace_id, e="one@rebuilt.test", r="MEMBER"))
    last = data(gql(http, admin, INVITE, w=workspace_id, e="two@rebuilt.test", r="VIEWER"))
    revoked = data(gql(http, owner, REVOKE_INVITATION, i=last["inviteMember"]["invitation"]["id"]))
    seen = revoked["revokeInvitation"]["consistencyToken"]

    def lists() -> tuple[list[Any], list[Any], list[Any], list[Any]]:
        return (
            keys(http, owner, workspace_id, seen),
            keys(http, owner, workspace_id, seen, all=True),
            invitations(http, owner, workspace_id, seen),
            invitations(http, owner, workspace_id, seen, all=True),
        )

    wait_for(lambda: keys(http, owner, workspace_id, seen)[-1]["lastUsedAt"], what="use listed")
    before = lists()
    assert [len(x) for x in before] == [2, 3, 1, 2]
    with psycopg.connect(auth_stack.database_url) as conn:
        # The read models lost (what a rebuild is for); the keys' uses are not among them.
        conn.execute("DELETE FROM rm_api_keys WHERE workspace_id = %s", (workspace_id,))
        conn.execute("DELETE FROM rm_invitations WHERE workspace_id = %s", (workspace_id,))
    assert keys(http, owner, workspace_id, seen, all=True) == []

    read_side = build_read_side(Settings.load(**pg.LOGIN_SETTINGS), auth_stack.database_url)
    try:
        results = rebuild_many(  # what `agentworks rebuild all` runs
            [runner.projector for runner in read_side.runners],
            read_side.pool,
            read_side.event_log,
        )
    finally:
        read_side.close()
    assert all(result.swapped for result in results)
    assert lists() == before
