"""A stranger's answer about another workspace's object is the answer about no object at all.

Every credential of workspace A (its user's token, a workspace token, an API key) that names an
object of workspace B must get, word for word, what it gets for an id that exists nowhere: a
different message (or code) would tell it that B's object exists, and which workspace holds it.
"""

from __future__ import annotations

import json
from typing import Any
from uuid import UUID, uuid4

from api_client import ApiClient, subscribe
from e2e_stack import Stack, user_id
from test_tenancy_and_roles import (
    INPUT_TYPES,
    MUTATIONS,
    QUERIES_ANSWERING_NOT_FOUND,
    QUERIES_ANSWERING_NULL,
    Tenant,
    _tenant,
)
from undecodable import plant_undecodable

from adapters.tokens import issue_user_token

#: Mutations naming an invitation or an API key (AccessMutation), beside MUTATIONS.
ACCESS_MUTATIONS: list[tuple[str, dict[str, Any]]] = [
    ("revokeInvitation", {"invitationId": "invitation"}),
    ("revokeApiKey", {"apiKeyId": "apiKey"}),
    ("inviteMember", {"workspaceId": "workspace", "email": "eve@example.com", "role": "MEMBER"}),
    ("createApiKey", {"workspaceId": "workspace", "name": "theirs", "role": "MEMBER"}),
]


def _targets(theirs: Tenant) -> dict[str, str]:
    """Every kind of object of ``theirs`` a mutation can name, by the name MUTATIONS uses."""
    invitation = theirs.client.data(
        "mutation($i: InviteMemberInput!) { inviteMember(input: $i) { invitation { id } } }",
        {"i": {"workspaceId": theirs.workspace, "email": "zed@example.com", "role": "MEMBER"}},
    )["inviteMember"]["invitation"]["id"]
    key = theirs.client.data(
        "mutation($i: CreateApiKeyInput!) { createApiKey(input: $i) { apiKey { id } } }",
        {"i": {"workspaceId": theirs.workspace, "name": "theirs", "role": "MEMBER"}},
    )["createApiKey"]["apiKey"]["id"]
    return {
        "workspace": theirs.workspace, "project": theirs.project, "card": theirs.card,
        "run": theirs.run, "invitation": invitation, "apiKey": key,
    }  # fmt: skip


def _credentials(stack: Stack, mine: Tenant, user: str) -> dict[str, ApiClient]:
    """Workspace A's three kinds of credential, all of its owner."""
    secret = mine.client.data(
        "mutation($i: CreateApiKeyInput!) { createApiKey(input: $i) { secret } }",
        {"i": {"workspaceId": mine.workspace, "name": "mine", "role": "OWNER"}},
    )["createApiKey"]["secret"]
    return {
        "workspace token": mine.client,
        "user token": stack.client(
            issue_user_token(user_id=user_id(user), ttl_seconds=600, secret=stack.secret)
        ),
        "API key": stack.client(secret),
    }


def _mutation(name: str) -> str:
    kind = INPUT_TYPES.get(name, name[0].upper() + name[1:] + "Input")
    return f"mutation($input: {kind}!) {{ {name}(input: $input) {{ consistencyToken }} }}"


def _named(fields: dict[str, Any], ids: dict[str, str]) -> dict[str, Any]:
    return {k: ids.get(v, v) if isinstance(v, str) else v for k, v in fields.items()}


def _without(body: dict[str, Any], *ids: dict[str, str]) -> str:
    """The answer with the ids it was asked about blanked: what is left must not differ."""
    text = json.dumps(body, sort_keys=True)
    for named in ids:
        for value in named.values():
            text = text.replace(value, "<id>")
    return text


def test_a_command_on_another_workspaces_object_answers_as_for_no_object(stack: Stack) -> None:
    mine = _tenant(stack, "oracle-alice", "Alpha")
    theirs = _tenant(stack, "oracle-bob", "Beta")
    real = _targets(theirs)
    nowhere = {kind: str(uuid4()) for kind in real}
    for credential, client in _credentials(stack, mine, "oracle-alice").items():
        for name, fields in [*MUTATIONS, *ACCESS_MUTATIONS]:
            query = _mutation(name)
            answer = client.post(query, {"input": _named(fields, real)})
            assert answer.codes == ["NOT_FOUND"], (credential, name, answer.body)
            # Not "workspace <B> does not exist": B's id was never named by the caller.
            if "workspaceId" not in fields:
                assert theirs.workspace not in json.dumps(answer.body), (credential, name)
            unknown = client.post(query, {"input": _named(fields, nowhere)})
            assert _without(answer.body, real) == _without(unknown.body, nowhere), (
                credential, name, answer.body, unknown.body,
            )  # fmt: skip
    # Nothing of theirs changed.
    card = theirs.client.data(
        "query($id: ID!) { card(id: $id) { title lane archived version } }", {"id": theirs.card}
    )["card"]
    assert card == {"title": "Beta card", "lane": "Todo", "archived": False, "version": 1}


def test_a_query_of_another_workspaces_object_answers_as_for_no_object(stack: Stack) -> None:
    """Every query taking an id, with each kind of credential of workspace A (the test of
    tenancy names the workspace token's answers; user tokens and API keys find the object's
    workspace by other paths)."""
    mine = _tenant(stack, "query-alice", "Alpha")
    theirs = _tenant(stack, "query-bob", "Beta")
    real = _targets(theirs)
    nowhere = {kind: str(uuid4()) for kind in real}
    queries = [(q, target) for q, target, _ in QUERIES_ANSWERING_NULL]
    queries += QUERIES_ANSWERING_NOT_FOUND
    for credential, client in _credentials(stack, mine, "query-alice").items():
        for query, target in queries:
            answer = client.post(query, {"id": real[target]})
            unknown = client.post(query, {"id": nowhere[target]})
            assert answer.status == 200, (credential, query, answer.body)
            assert _without(answer.body, real) == _without(unknown.body, nowhere), (
                credential, query, answer.body, unknown.body,
            )  # fmt: skip


def test_a_user_token_learns_nothing_of_another_workspaces_unreadable_card(stack: Stack) -> None:
    """A user token's read finds the workspace of the object it names on the write side; for
    another tenant's card holding an event that cannot be decoded, that look-up failed with
    UNDECODABLE (naming the version and the stored type), and as a consistency token, with
    HTTP 500, where an id that exists nowhere reads as nothing."""
    mine = _tenant(stack, "unread-alice", "Alpha")
    theirs = _tenant(stack, "unread-bob", "Beta")
    plant_undecodable(stack.write, UUID(theirs.card), then_good=False)
    user = _credentials(stack, mine, "unread-alice")["user token"]
    nowhere = str(uuid4())
    for query in (
        "query($id: ID!) { card(id: $id) { id } }",
        "query($id: ID!) { cardHistory(cardId: $id) { version } }",
    ):
        answer = user.post(query, {"id": theirs.card})
        unknown = user.post(query, {"id": nowhere})
        assert answer.status == unknown.status == 200, (query, answer.body)
        assert _without(answer.body, {"id": theirs.card}) == _without(
            unknown.body, {"id": nowhere}
        ), (query, answer.body, unknown.body)
    token = f"1:{theirs.card}:2"
    read = "query($id: ID!) { workspace(id: $id) { id } }"
    answer = user.post(read, {"id": mine.workspace}, headers={"X-Consistency-Token": token})
    assert answer.status == 200, answer.body
    assert answer.data == {"workspace": {"id": mine.workspace}}
    assert answer.stale
    # Its members still read it, from the read model.
    owner = stack.client(
        issue_user_token(user_id=user_id("unread-bob"), ttl_seconds=600, secret=stack.secret)
    )
    assert owner.data("query($id: ID!) { card(id: $id) { id } }", {"id": theirs.card}) == {
        "card": {"id": theirs.card}
    }


def test_a_subscription_to_another_workspaces_object_is_refused_naming_it(stack: Stack) -> None:
    """A user token (no workspace claim) subscribing to an object of a workspace it is no
    member of was told "a bootstrap token sees no workspace; create one first", which it is
    not, rather than that the object does not exist (as any other credential is told)."""
    mine = _tenant(stack, "sub-alice", "Alpha")
    theirs = _tenant(stack, "sub-bob", "Beta")
    user = _credentials(stack, mine, "sub-alice")["user token"]
    for query, named, kind in (
        ("subscription($id: ID!) { boardChanged(projectId: $id) { kind } }", theirs.project,
         "project"),
        ("subscription($id: ID!) { agentRunLog(runId: $id) { seq } }", theirs.run, "agent run"),
    ):  # fmt: skip
        for wanted in (named, str(uuid4())):
            with subscribe(stack.ws_url, user.token, query, {"id": wanted}) as sub:
                message = sub.next_message()
            assert message["type"] == "error", message
            assert [(e["message"], e["extensions"]["code"]) for e in message["payload"]] == [
                (f"{kind} {wanted} does not exist", "NOT_FOUND")
            ]


def test_accepting_with_a_wrong_token_says_the_same_whether_the_invitation_exists(
    stack: Stack,
) -> None:
    """An accept token is ``<invitation id>.<secret>``: with a wrong secret, an existing
    invitation's id was answered "no invitation has this token" and any other id "invitation
    <id> does not exist", telling whoever holds an id whether it is a live invitation."""
    mine = _tenant(stack, "accept-alice", "Alpha")
    theirs = _tenant(stack, "accept-bob", "Beta")
    real = _targets(theirs)["invitation"]
    user = _credentials(stack, mine, "accept-alice")["user token"]
    accept = (
        "mutation($i: AcceptInvitationInput!) { acceptInvitation(input: $i) { consistencyToken } }"
    )
    answers = [
        user.post(accept, {"i": {"token": f"{UUID(named).hex}.not-the-secret"}}).body
        for named in (real, str(uuid4()))
    ]
    assert answers[0] == answers[1]
    assert answers[0]["errors"][0]["extensions"]["code"] == "NOT_FOUND"
