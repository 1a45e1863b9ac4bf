"""Over HTTP: a token's role claim caps what its user's membership allows, and a workspace token
cannot create workspaces (API.md, "Tokens")."""

from __future__ import annotations

from uuid import uuid4

from e2e_stack import Stack

SPEND_LIMIT = (
    'mutation($ws: ID!) { setSpendLimit(input: {workspaceId: $ws, monthlyLimit: "5.00"})'
    " { workspace { id } } }"
)
CREATE_PROJECT = (
    'mutation($ws: ID!) { createProject(input: {workspaceId: $ws, name: "P"}) { project { id } } }'
)
CREATE_WORKSPACE = 'mutation { createWorkspace(input: {name: "Another"}) { workspace { id } } }'
WORKSPACE = "query($ws: ID!) { workspace(id: $ws) { id } }"


def test_a_viewer_token_for_an_owner_only_reads(stack: Stack) -> None:
    owner = str(uuid4())
    _, ws = stack.owner_with_workspace(owner, "Ceiling")
    viewer = stack.as_user(owner, ws, "VIEWER")
    assert viewer.error_codes(SPEND_LIMIT, {"ws": ws}) == ["FORBIDDEN"]
    assert viewer.error_codes(CREATE_PROJECT, {"ws": ws}) == ["FORBIDDEN"]
    assert viewer.data(WORKSPACE, {"ws": ws})["workspace"] == {"id": ws}
    assert stack.as_user(owner, ws, "OWNER").error_codes(SPEND_LIMIT, {"ws": ws}) == []


def test_an_owner_token_for_a_member_acts_as_that_member(stack: Stack) -> None:
    alice, ws = stack.owner_with_workspace(str(uuid4()), "Members")
    bob = str(uuid4())
    alice.add_member(ws, bob, "MEMBER")
    inflated = stack.as_user(bob, ws, "OWNER")
    assert inflated.error_codes(SPEND_LIMIT, {"ws": ws}) == ["FORBIDDEN"]
    assert inflated.error_codes(CREATE_PROJECT, {"ws": ws}) == []


def test_a_removed_members_token_acts_as_nothing(stack: Stack) -> None:
    alice, ws = stack.owner_with_workspace(str(uuid4()), "Removal")
    carol = str(uuid4())
    alice.add_member(ws, carol, "ADMIN")
    token = stack.as_user(carol, ws, "ADMIN")
    assert token.error_codes(SPEND_LIMIT, {"ws": ws}) == []
    alice.data(
        "mutation($ws: ID!, $u: ID!) { removeMember(input: {workspaceId: $ws, userId: $u})"
        " { consistencyToken } }",
        {"ws": ws, "u": carol},
    )
    assert token.error_codes(SPEND_LIMIT, {"ws": ws}) == ["NOT_FOUND"]
    assert token.error_codes(CREATE_PROJECT, {"ws": ws}) == ["NOT_FOUND"]


def test_only_a_bootstrap_token_creates_workspaces(stack: Stack) -> None:
    owner, _ = stack.owner_with_workspace(str(uuid4()), "Tenant")
    answer = owner.post(CREATE_WORKSPACE)
    assert answer.codes == ["FORBIDDEN"]
    assert answer.data is None or answer.data.get("createWorkspace") is None
    assert stack.client(stack.bootstrap_token(str(uuid4()))).post(CREATE_WORKSPACE).codes == []
