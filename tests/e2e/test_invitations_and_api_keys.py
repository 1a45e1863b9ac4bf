"""Inviting a colleague by e-mail, and automating with API keys, over HTTP as a client would."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import psycopg
from e2e_stack import Stack
from test_identity_flow import UNSEEN_IN_ADDRESSES

from adapters.tokens import issue_token

PASSWORD = "correct horse battery"


#: Every test here signs up and in from 127.0.0.1, more than the per-address limit allows in
#: a minute (that limit has its own test in test_identity_flow).
AUTH_SETTINGS = {"login_per_address_per_minute": 10_000}


INVITE = """mutation($w: ID!, $e: String!, $r: Role!) {
  inviteMember(input: {workspaceId: $w, email: $e, role: $r}) {
    invitation { id email role expiresAt acceptedAt } acceptToken consistencyToken } }"""
ACCEPT = """mutation($t: String!) {
  acceptInvitation(input: {token: $t}) { workspace { id name } consistencyToken } }"""
REVOKE_INVITATION = """mutation($i: ID!) {
  revokeInvitation(input: {invitationId: $i}) { invitation { id } } }"""
CREATE_KEY = """mutation($w: ID!, $n: String!, $r: Role!, $c: ID) {
  createApiKey(input: {workspaceId: $w, name: $n, role: $r, commandId: $c}) {
    apiKey { id name role createdAt lastUsedAt revokedAt } secret consistencyToken } }"""
REVOKE_KEY = """mutation($k: ID!) {
  revokeApiKey(input: {apiKeyId: $k}) { apiKey { id revokedAt } secret } }"""
CREATE_PROJECT = """mutation($w: ID!, $n: String!) {
  createProject(input: {workspaceId: $w, name: $n, lanes: [{name: "Todo"}]}) { project { id } } }"""
ME = "{ me { id workspaces { id name role } } }"
CHANGE_ROLE = """mutation($w: ID!, $u: ID!, $r: Role!) {
  changeRole(input: {workspaceId: $w, userId: $u, role: $r}) { consistencyToken } }"""
ADD_MEMBER = """mutation($w: ID!, $u: ID!, $r: Role!) {
  addMember(input: {workspaceId: $w, userId: $u, role: $r}) { consistencyToken } }"""
REMOVE_MEMBER = """mutation($w: ID!, $u: ID!) {
  removeMember(input: {workspaceId: $w, userId: $u}) { consistencyToken } }"""


def user(http: httpx.Client, email: str) -> tuple[str, str]:
    """A signed-up user's id and access token."""
    made = http.post("/auth/signup", json={"email": email, "password": PASSWORD, "name": email})
    assert made.status_code == 201, made.text
    session = http.post("/auth/login", json={"email": email, "password": PASSWORD})
    assert session.status_code == 200, session.text
    return str(made.json()["userId"]), str(session.json()["accessToken"])


def gql(
    http: httpx.Client, token: str, query: str, *, after: str | None = None, **variables: Any
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"}
    if after:
        headers["X-Consistency-Token"] = after
    return http.post("/graphql", json={"query": query, "variables": variables}, headers=headers)


def data(answer: httpx.Response) -> Any:
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert "errors" not in body, body
    return body["data"]


def code(answer: httpx.Response) -> str:
    assert answer.status_code == 200, answer.text
    return str(answer.json()["errors"][0]["extensions"]["code"])


def workspace_of(http: httpx.Client, token: str, name: str) -> str:
    made = data(
        gql(
            http, token,
            "mutation($n: String!) { createWorkspace(input: {name: $n}) { workspace { id } } }",
            n=name,
        )
    )  # fmt: skip
    return str(made["createWorkspace"]["workspace"]["id"])


def owner_and_admin(http: httpx.Client, domain: str, name: str) -> tuple[str, str, str, str, str]:
    """A new workspace ``name``: its owner's token, its id, an ADMIN's id and token, and the
    consistency token of the ADMIN's addition."""
    _, owner = user(http, f"owner@{domain}")
    workspace_id = workspace_of(http, owner, name)
    admin_id, admin = user(http, f"admin@{domain}")
    added = data(gql(http, owner, ADD_MEMBER, w=workspace_id, u=admin_id, r="ADMIN"))
    return owner, workspace_id, admin_id, admin, str(added["addMember"]["consistencyToken"])


def test_invite_accept_twice_and_revoke(http: httpx.Client, auth_stack: Stack) -> None:
    _, owner = user(http, "owner@invite.test")
    workspace_id = workspace_of(http, owner, "Invites")
    invitee_id, invitee = user(http, "invitee@invite.test")
    _, stranger = user(http, "stranger@invite.test")

    invited = data(gql(http, owner, INVITE, w=workspace_id, e="Invitee@Invite.test", r="MEMBER"))
    payload = invited["inviteMember"]
    assert payload["invitation"]["email"] == "invitee@invite.test"
    assert payload["invitation"]["acceptedAt"] is None
    expires = datetime.fromisoformat(payload["invitation"]["expiresAt"])
    assert abs(expires - (datetime.now(UTC) + timedelta(days=7))) < timedelta(minutes=10)
    token = payload["acceptToken"]
    assert token

    assert code(gql(http, stranger, ACCEPT, t=token)) == "FORBIDDEN"  # another address
    assert code(gql(http, invitee, ACCEPT, t=token + "x")) == "NOT_FOUND"
    workspace_token = auth_stack.token(invitee_id, workspace_id, "OWNER")
    assert code(gql(http, workspace_token, ACCEPT, t=token)) == "FORBIDDEN"

    accepted = data(gql(http, invitee, ACCEPT, t=token))["acceptInvitation"]
    assert accepted["workspace"] == {"id": workspace_id, "name": "Invites"}
    again = data(gql(http, invitee, ACCEPT, t=token))["acceptInvitation"]  # harmless
    assert again["workspace"]["id"] == workspace_id
    me = data(gql(http, invitee, ME, after=again["consistencyToken"]))["me"]
    assert me["workspaces"] == [{"id": workspace_id, "name": "Invites", "role": "MEMBER"}]
    assert data(gql(http, invitee, CREATE_PROJECT, w=workspace_id, n="By invitee"))

    # A MEMBER may not invite; a revoked invitation cannot be accepted.
    assert code(gql(http, invitee, INVITE, w=workspace_id, e="x@invite.test", r="VIEWER")) == (
        "FORBIDDEN"
    )
    second = data(gql(http, owner, INVITE, w=workspace_id, e="stranger@invite.test", r="VIEWER"))
    invitation_id = second["inviteMember"]["invitation"]["id"]
    data(gql(http, owner, REVOKE_INVITATION, i=invitation_id))
    assert code(gql(http, stranger, ACCEPT, t=second["inviteMember"]["acceptToken"])) == (
        "INVALID_TRANSITION"
    )
    assert code(gql(http, owner, INVITE, w=workspace_id, e="not-an-address", r="VIEWER")) == (
        "VALIDATION"
    )


def test_an_expired_invitation_cannot_be_accepted(http: httpx.Client, auth_stack: Stack) -> None:
    from uuid import UUID

    from commands.access import InviteMember, invite_member
    from commands.handlers import USER_SCOPE, Actor

    owner_id, owner = user(http, "owner@expiry.test")
    workspace_id = workspace_of(http, owner, "Expiry")
    _, invitee = user(http, "late@expiry.test")
    issued = invite_member(
        auth_stack.write,
        InviteMember(workspace_id=UUID(workspace_id), email="late@expiry.test", role="VIEWER"),
        Actor(user_id=owner_id, workspace_id=USER_SCOPE),
        ttl=timedelta(seconds=-1),
    )
    assert issued.secret is not None
    assert code(gql(http, invitee, ACCEPT, t=issued.secret)) == "INVALID_TRANSITION"


def test_api_key_acts_at_its_role_capped_by_its_creator_and_dies_on_revoke(
    http: httpx.Client, auth_stack: Stack
) -> None:
    owner, workspace_id, admin_id, admin, _ = owner_and_admin(http, "keys.test", "Keys")

    assert code(gql(http, admin, CREATE_KEY, w=workspace_id, n="too high", r="OWNER")) == (
        "FORBIDDEN"
    )
    command_id = "6d3c2f7e-0d4b-4b8e-9d57-6f0c1d2e3a4b"
    created = data(gql(http, admin, CREATE_KEY, w=workspace_id, n="ci", r="ADMIN", c=command_id))
    key = created["createApiKey"]
    secret = key["secret"]
    assert secret.startswith("awk_")
    assert key["apiKey"]["role"] == "ADMIN"
    assert key["apiKey"]["revokedAt"] is None
    replay = data(gql(http, admin, CREATE_KEY, w=workspace_id, n="ci", r="ADMIN", c=command_id))
    assert replay["createApiKey"]["secret"] is None  # shown once
    assert replay["createApiKey"]["apiKey"]["id"] == key["apiKey"]["id"]

    # The key acts as its creator at its role: an ADMIN may set a WIP limit's project up.
    assert data(gql(http, secret, CREATE_PROJECT, w=workspace_id, n="By key"))
    seen = data(gql(http, secret, "query($w: ID!) { workspace(id: $w) { name } }", w=workspace_id))
    assert seen["workspace"] == {"name": "Keys"}

    # Capped by the creator's current role: demoted to VIEWER, the key can only read.
    data(gql(http, owner, CHANGE_ROLE, w=workspace_id, u=admin_id, r="VIEWER"))
    assert code(gql(http, secret, CREATE_PROJECT, w=workspace_id, n="Refused")) == "FORBIDDEN"

    # Revocation holds from the next request on.
    data(gql(http, owner, CHANGE_ROLE, w=workspace_id, u=admin_id, r="ADMIN"))
    revoked = data(gql(http, owner, REVOKE_KEY, k=key["apiKey"]["id"]))["revokeApiKey"]
    assert revoked["apiKey"]["revokedAt"] is not None
    assert revoked["secret"] is None
    after = gql(http, secret, CREATE_PROJECT, w=workspace_id, n="After revoke")
    assert after.status_code == 401
    assert after.json()["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"
    forged = gql(http, secret[:-2] + "zz", ME)
    assert forged.status_code == 401

    with psycopg.connect(auth_stack.database_url) as conn:
        stored = b"".join(row[0] for row in conn.execute("SELECT state FROM agentworks_events"))
        logged = b"".join(
            str(row[0]).encode() for row in conn.execute("SELECT result FROM command_log")
        )
    assert secret.split("_", 2)[2].encode() not in stored
    assert secret.split("_", 2)[2].encode() not in logged


def test_a_refusal_for_want_of_role_names_the_credential_that_lowered_it(
    http: httpx.Client, auth_stack: Stack
) -> None:
    """An OWNER's VIEWER key (or VIEWER-claim token) is refused a write: the message names the
    key (or the claim) whose role fell short, not the owner as if they were a VIEWER."""
    owner_id, owner = user(http, "owner@refusal-names.test")
    workspace_id = workspace_of(http, owner, "Refusals")
    made = data(gql(http, owner, CREATE_KEY, w=workspace_id, n="dashboard", r="VIEWER"))
    key = made["createApiKey"]
    claim = issue_token(
        user_id=owner_id, workspace_id=workspace_id, role="VIEWER", ttl_seconds=600,
        secret=auth_stack.secret,
    )  # fmt: skip

    by_key = gql(http, key["secret"], CREATE_PROJECT, w=workspace_id, n="Refused")
    by_claim = gql(http, claim, CREATE_PROJECT, w=workspace_id, n="Refused")
    listing = gql(
        http, key["secret"], "query($w: ID!) { workspace(id: $w) { apiKeys { edges {"
        " node { id } } } } }", w=workspace_id,
    )  # fmt: skip

    assert code(by_key) == code(by_claim) == "FORBIDDEN"
    key_says = by_key.json()["errors"][0]["message"]
    assert f"API key {key['apiKey']['id']}" in key_says, key_says
    assert owner_id in key_says
    assert "role claim" in by_claim.json()["errors"][0]["message"]
    assert code(listing) == "FORBIDDEN"
    assert f"API key {key['apiKey']['id']}" in listing.json()["errors"][0]["message"]


def test_a_key_does_not_outlive_its_creator_s_membership_even_when_they_come_back(
    http: httpx.Client, auth_stack: Stack
) -> None:
    """A key acts as its creator, capped by their current role: removed from the workspace,
    its creator's key acted for nobody, but once they were added again (for another job, at
    any role) the old key, perhaps leaked meanwhile, worked again. A key is its creator's for
    the membership it was made in; after a removal it answers UNAUTHENTICATED for good, while
    a key the member makes after coming back works."""
    owner, workspace_id, admin_id, admin, _ = owner_and_admin(http, "comeback.test", "Back")
    old = data(gql(http, admin, CREATE_KEY, w=workspace_id, n="before", r="ADMIN"))
    secret = old["createApiKey"]["secret"]
    assert data(gql(http, secret, CREATE_PROJECT, w=workspace_id, n="By the first key"))
    data(gql(http, owner, REMOVE_MEMBER, w=workspace_id, u=admin_id))
    added = data(gql(http, owner, ADD_MEMBER, w=workspace_id, u=admin_id, r="ADMIN"))
    after = added["addMember"]["consistencyToken"]
    refused = gql(http, secret, CREATE_PROJECT, w=workspace_id, n="Old key", after=after)
    assert refused.status_code == 401, refused.text
    assert refused.json()["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"
    assert "removed" in refused.json()["errors"][0]["message"]
    new = data(gql(http, admin, CREATE_KEY, w=workspace_id, n="after", r="ADMIN", after=after))
    fresh = new["createApiKey"]["secret"]
    assert data(gql(http, fresh, CREATE_PROJECT, w=workspace_id, n="By the new key"))


def test_a_key_answers_unauthenticated_as_soon_as_its_creator_is_removed(
    http: httpx.Client, auth_stack: Stack
) -> None:
    """Between its creator's removal and any return, the key was still let in: it acted for
    nobody (null, NOT_FOUND), and ``me`` told whoever held it its creator's e-mail address, name
    and whether they use MFA, although they had left the workspace."""
    owner, workspace_id, admin_id, admin, _ = owner_and_admin(http, "gone.test", "Gone")
    made = data(gql(http, admin, CREATE_KEY, w=workspace_id, n="left behind", r="MEMBER"))
    secret = made["createApiKey"]["secret"]
    assert data(gql(http, secret, ME))["me"]["id"] == admin_id
    removed = data(gql(http, owner, REMOVE_MEMBER, w=workspace_id, u=admin_id))
    after = removed["removeMember"]["consistencyToken"]
    for query, variables in ((ME, {}), (CREATE_PROJECT, {"w": workspace_id, "n": "Not mine"})):
        refused = gql(http, secret, query, after=after, **variables)
        assert refused.status_code == 401, refused.text
        assert refused.json()["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"
        assert "admin@gone.test" not in refused.text


def test_an_invitation_grants_only_what_its_inviter_may_still_grant(
    http: httpx.Client, auth_stack: Stack
) -> None:
    owner, workspace_id, admin_id, admin, _ = owner_and_admin(
        http, "inviter-demoted.test", "Inviter demoted"
    )
    _, invitee = user(http, "invitee@inviter-demoted.test")
    _, other = user(http, "other@inviter-demoted.test")
    as_admin = data(
        gql(http, admin, INVITE, w=workspace_id, e="invitee@inviter-demoted.test", r="ADMIN")
    )["inviteMember"]["acceptToken"]
    as_member = data(
        gql(http, admin, INVITE, w=workspace_id, e="other@inviter-demoted.test", r="MEMBER")
    )["inviteMember"]["acceptToken"]

    # Demoted to VIEWER, the inviter may grant nothing: the invitation does not grant ADMIN.
    data(gql(http, owner, CHANGE_ROLE, w=workspace_id, u=admin_id, r="VIEWER"))
    refused = gql(http, invitee, ACCEPT, t=as_admin)
    assert code(refused) == "FORBIDDEN"
    assert "may no longer grant ADMIN" in refused.json()["errors"][0]["message"]
    assert data(gql(http, invitee, ME))["me"]["workspaces"] == []

    # Promoted again, the same invitation holds (nothing was spent by the refusal).
    data(gql(http, owner, CHANGE_ROLE, w=workspace_id, u=admin_id, r="ADMIN"))
    accepted = data(gql(http, invitee, ACCEPT, t=as_admin))["acceptInvitation"]
    me = data(gql(http, invitee, ME, after=accepted["consistencyToken"]))["me"]
    assert me["workspaces"] == [{"id": workspace_id, "name": "Inviter demoted", "role": "ADMIN"}]

    # Removed, the inviter grants nothing either.
    data(gql(http, owner, REMOVE_MEMBER, w=workspace_id, u=admin_id))
    removed = gql(http, other, ACCEPT, t=as_member)
    assert code(removed) == "FORBIDDEN"
    assert "no longer a member" in removed.json()["errors"][0]["message"]
    assert data(gql(http, other, ME))["me"]["workspaces"] == []


def test_me_shows_the_role_each_credential_acts_with(http: httpx.Client, auth_stack: Stack) -> None:
    owner, workspace_id, admin_id, admin, written = owner_and_admin(
        http, "me-roles.test", "Me roles"
    )

    def role_seen(token: str) -> str:
        (mine,) = data(gql(http, token, ME, after=written))["me"]["workspaces"]
        assert mine["id"] == workspace_id
        return str(mine["role"])

    assert role_seen(admin) == "ADMIN"  # a user token: the membership's role
    # A workspace token's claim is a ceiling: it lowers the role, never raises it.
    viewer_token = auth_stack.token(admin_id, workspace_id, "VIEWER")
    assert role_seen(viewer_token) == "VIEWER"
    assert code(gql(http, viewer_token, CREATE_PROJECT, w=workspace_id, n="Refused")) == (
        "FORBIDDEN"
    )
    assert role_seen(auth_stack.token(admin_id, workspace_id, "OWNER")) == "ADMIN"
    # An API key acts at its role, capped by its creator's current role.
    key = data(gql(http, admin, CREATE_KEY, w=workspace_id, n="bot", r="MEMBER"))
    secret = key["createApiKey"]["secret"]
    assert role_seen(secret) == "MEMBER"
    demoted = data(gql(http, owner, CHANGE_ROLE, w=workspace_id, u=admin_id, r="VIEWER"))
    written = demoted["changeRole"]["consistencyToken"]
    assert role_seen(secret) == "VIEWER"
    # A token for an id nobody signed up with (an operator's bootstrap token, say) has no
    # account: it was told its user "no longer exists".
    nobody = gql(http, auth_stack.bootstrap_token("nobody"), ME)
    assert code(nobody) == "UNAUTHENTICATED"
    assert nobody.json()["errors"][0]["message"] == "this token's user has no account"


def test_an_api_key_makes_no_lasting_credentials(http: httpx.Client, auth_stack: Stack) -> None:
    """A key acts as its creator, so an ADMIN key could make another ADMIN key (its creator's,
    not revoked with the key that made it) or invite an address to a membership: a leaked key,
    once found and revoked, had left behind a way in that outlived it. Credentials are made by
    members signed in as themselves; a key is refused (FORBIDDEN), and nothing is written."""
    _, workspace_id, _, admin, _ = owner_and_admin(http, "mint.test", "Mint")
    made = data(gql(http, admin, CREATE_KEY, w=workspace_id, n="leaked", r="ADMIN"))
    secret = made["createApiKey"]["secret"]
    assert data(gql(http, secret, CREATE_PROJECT, w=workspace_id, n="Work by key"))

    minted = gql(http, secret, CREATE_KEY, w=workspace_id, n="spare", r="ADMIN")
    invited = gql(http, secret, INVITE, w=workspace_id, e="accomplice@else.test", r="ADMIN")

    assert code(minted) == "FORBIDDEN", minted.text
    assert "API key" in minted.json()["errors"][0]["message"]
    assert code(invited) == "FORBIDDEN", invited.text
    with psycopg.connect(auth_stack.database_url) as conn:
        made_here = conn.execute(
            "SELECT topic FROM agentworks_events WHERE workspace_id = %s"
            " AND (topic LIKE %s OR topic LIKE %s)",
            (workspace_id, "%:ApiKey.Created", "%:Invitation.Created"),
        ).fetchall()
    assert [topic.rsplit(":", 1)[1] for (topic,) in made_here] == ["ApiKey.Created"]
    # Members signed in as themselves still make both.
    assert data(gql(http, admin, CREATE_KEY, w=workspace_id, n="by hand", r="MEMBER"))
    assert data(gql(http, admin, INVITE, w=workspace_id, e="colleague@mint.test", r="MEMBER"))


def test_an_invitation_to_an_address_with_control_characters_is_refused(
    http: httpx.Client,
) -> None:
    """The rule of a sign-up's address (test_identity_flow): an invitation to an address no
    account can have is refused, naming the field."""
    _, owner = user(http, "owner@unseen.test")
    workspace_id = workspace_of(http, owner, "Unseen")
    for email in UNSEEN_IN_ADDRESSES.values():
        answer = gql(http, owner, INVITE, w=workspace_id, e=email, r="MEMBER")
        assert code(answer) == "VALIDATION", (email, answer.text)
        assert "email" in answer.json()["errors"][0]["message"], answer.text


def test_inviting_a_member_of_the_workspace_is_refused_naming_changerole(
    http: httpx.Client, auth_stack: Stack
) -> None:
    """An invitation to a member (the inviter included) was issued, and accepting it answered
    the workspace with the member's role unchanged: an ADMIN invited as VIEWER stayed ADMIN, an
    owner demoted by nobody, and nothing said why."""
    owner, workspace_id, _, admin, _ = owner_and_admin(http, "member.test", "Members")
    for inviter, email in ((owner, "admin@member.test"), (admin, "Admin@Member.test"),
                           (owner, "owner@member.test")):  # fmt: skip
        refused = gql(http, inviter, INVITE, w=workspace_id, e=email, r="VIEWER")
        assert code(refused) == "DUPLICATE"
        message = refused.json()["errors"][0]["message"]
        assert "already a member" in message
        assert "changeRole" in message
    # Anyone else is invited as before, an address no account has included.
    assert data(gql(http, owner, INVITE, w=workspace_id, e="new@member.test", r="VIEWER"))
