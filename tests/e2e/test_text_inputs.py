"""Whatever text a client sends, the API answers with success or VALIDATION (or 413 for a body
over the limit) — never INTERNAL — and the read side keeps serving every other workspace.

Text PostgreSQL cannot hold (NUL, lone surrogates, which JSON's ``\\u`` escapes carry) is refused
in every argument of every mutation and query, and is never written to the log.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from uuid import uuid4

import httpx
import pytest
from api_client import ApiClient, subscribe
from e2e_stack import Stack, user_id
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pg import log_head

from adapters.tokens import issue_token

#: Generous for CI: each example is two requests and a wait for the read side.
FUZZ = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

POISON = ["\x00", "\ud800", "\udfff", "\udbff"]

#: Characters that are ordinary text, however odd: controls, bidi marks, combining marks,
#: zero-width joiners, emoji, a BOM, noncharacters.
ODD = [
    "\x01", "\x07", "\x1b", "\x7f", "\t", "\r", "\u200f", "\u202e", "\u2066", "\u0301",
    "\u0361", "\u200d", "\ufeff", "\ufffe", "\U0001f600", "\U0010ffff", "ﷺ", "'", '"', "\\",
]  # fmt: skip

_storable = st.text(
    st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00") | st.sampled_from(ODD),
    max_size=60,
)
_long = st.builds(
    lambda unit, n: unit * n,
    st.sampled_from(["x", "é", "\u202e", "\U0001f600", "ab\x01"]),
    st.sampled_from([201, 1_001, 100_001, 400_000, 1_100_000]),
)


@st.composite
def _poisoned(draw: st.DrawFn) -> str:
    text = draw(st.one_of(_storable, _long.filter(lambda t: len(t) < 300_000)))
    at = draw(st.integers(0, len(text)))
    return text[:at] + draw(st.sampled_from(POISON)) + text[at:]


_text = st.one_of(_storable, _long, _poisoned())


def _is_poison(value: str) -> bool:
    return any(ch in value for ch in POISON)


# -- the world the fuzzing runs in ----------------------------------------------------------------


@dataclass
class World:
    client: ApiClient
    owner: str
    workspace: str
    project: str
    card: str
    run: str
    member: str


@dataclass
class Worlds:
    mine: World
    other: World


_WORLDS: dict[int, Worlds] = {}


def _world(stack: Stack, name: str) -> World:
    client, ws = stack.owner_with_workspace(name, name)
    pid = client.create_project(ws, "P", [{"name": "Todo"}, {"name": "Doing"}])["project"]["id"]
    card = client.create_card(pid, "card")["card"]["id"]
    run = client.start_agent_run(card)["run"]["id"]
    member = str(uuid4())
    client.add_member(ws, member, "MEMBER")
    return World(client, user_id(name), ws, pid, card, run, member)


def _worlds(stack: Stack) -> Worlds:
    worlds = _WORLDS.get(id(stack))
    if worlds is None:
        worlds = _WORLDS[id(stack)] = Worlds(_world(stack, "tess"), _world(stack, "uma"))
    return worlds


def _base_inputs(w: World) -> dict[str, dict[str, Any]]:
    """A well-formed input of every mutation, on the world's objects."""
    ws, pid, card = w.workspace, w.project, w.card
    return {
        "createWorkspace": {"name": "n"},
        "renameWorkspace": {"workspaceId": ws, "name": "n"},
        "addMember": {"workspaceId": ws, "userId": str(uuid4()), "role": "VIEWER"},
        "changeRole": {"workspaceId": ws, "userId": w.member, "role": "MEMBER"},
        "removeMember": {"workspaceId": ws, "userId": str(uuid4())},
        "setSpendLimit": {"workspaceId": ws, "monthlyLimit": "100.00"},
        "createProject": {"workspaceId": ws, "name": "P", "lanes": [{"name": "Todo"}]},
        "setWipLimit": {"projectId": pid, "lane": "Todo", "wipLimit": 50},
        "addLane": {"projectId": pid, "name": "L"},
        "renameLane": {"projectId": pid, "lane": "Todo", "name": "Todo"},
        "reorderLanes": {"projectId": pid, "order": ["Todo", "Doing"]},
        "removeLane": {"projectId": pid, "lane": "None such"},
        "archiveProject": {"projectId": str(uuid4())},
        "createCard": {"projectId": pid, "title": "t", "description": "d", "lane": "Todo"},
        "updateCard": {"cardId": card, "title": "t", "description": "d", "labels": ["a"]},
        "moveCard": {"cardId": card, "toLane": "Todo"},
        "assignCard": {"cardId": card, "assignee": w.owner},
        "archiveCard": {"cardId": str(uuid4())},
        "restoreCard": {"cardId": card, "lane": "Todo"},
        "blockCard": {"cardId": card, "reason": "r"},
        "unblockCard": {"cardId": card},
        "startAgentRun": {
            "cardId": card,
            "agent": "coder",
            "provider": "simulated",
            "model": "sim-1",
            "maxCost": "1.00",
        },
        "cancelAgentRun": {"runId": w.run, "reason": "r"},
        "inviteMember": {"workspaceId": ws, "email": "someone@example.com", "role": "VIEWER"},
        "acceptInvitation": {"token": f"{uuid4().hex}.secret"},
        "revokeInvitation": {"invitationId": str(uuid4())},
        "createApiKey": {"workspaceId": ws, "name": "k", "role": "VIEWER"},
        "revokeApiKey": {"apiKeyId": str(uuid4())},
    }


_TEXT_SCALARS = {"String", "ID", "Money"}


def _text_inputs(client: ApiClient) -> dict[str, list[str]]:
    """Every mutation's text fields, from the schema itself (``lanes.0.name`` for nested ones),
    so a mutation or field added later is fuzzed too — or this test fails until it is."""
    schema = client.data(
        "{ __schema { mutationType { fields { name args { name type { ...T } } } }"
        " types { name kind inputFields { name type { ...T } } } } }"
        " fragment T on __Type { kind name ofType { kind name ofType { kind name"
        " ofType { kind name } } } }"
    )["__schema"]
    inputs = {t["name"]: t["inputFields"] for t in schema["types"] if t["kind"] == "INPUT_OBJECT"}

    def named(kind: dict[str, Any]) -> tuple[str, bool]:
        listed = False
        while kind["kind"] in ("NON_NULL", "LIST"):
            listed = listed or kind["kind"] == "LIST"
            kind = kind["ofType"]
        return kind["name"], listed

    def paths(type_name: str, prefix: str) -> list[str]:
        found = []
        for field in inputs[type_name]:
            name, listed = named(field["type"])
            path = f"{prefix}{field['name']}{'.0' if listed else ''}"
            if name in _TEXT_SCALARS:
                found.append(path)
            elif name in inputs:
                found.extend(paths(name, path + "."))
        return found

    result = {}
    for mutation in schema["mutationType"]["fields"]:
        (arg,) = mutation["args"]
        result[mutation["name"]] = paths(named(arg["type"])[0], "")
    return result


def _put(value: dict[str, Any], path: str, text: str) -> dict[str, Any]:
    """``value`` with ``text`` at ``path`` (``name``, ``labels.0``, ``lanes.0.name``)."""
    head, _, rest = path.partition(".")
    copy = dict(value)
    if not rest:
        copy[head] = text
        return copy
    index, _, inner = rest.partition(".")
    if index != "0":
        copy[head] = _put(copy.get(head) or {}, rest, text)
        return copy
    items = list(copy.get(head) or [])
    items[:1] = [_put(items[0] if items else {}, inner, text) if inner else text]
    copy[head] = items
    return copy


def _mutation(name: str) -> str:
    input_type = name[0].upper() + name[1:] + "Input"
    return f"mutation($input: {input_type}!) {{ {name}(input: $input) {{ consistencyToken }} }}"


def _send(client: ApiClient, query: str, variables: dict[str, Any]) -> httpx.Response:
    # json.dumps escapes lone surrogates as \\udxxx, as a JSON client would send them.
    return client.raw(json.dumps({"query": query, "variables": variables}).encode())


def _refusal_or_success(response: httpx.Response, *, poisoned: bool) -> None:
    assert response.status_code in (200, 413), response.text[:500]
    body = response.json()
    codes = [e.get("extensions", {}).get("code") for e in body.get("errors", [])]
    assert "INTERNAL" not in codes, body
    assert "Traceback" not in response.text
    if response.status_code == 413:
        assert codes == ["VALIDATION"] or codes == []
        return
    if poisoned:
        assert codes == ["VALIDATION"], body
        message = body["errors"][0]["message"]
        assert "NUL" in message or "surrogate" in message, message


def _fresh_write_elsewhere(worlds: Worlds) -> None:
    """A write in another workspace comes back in its own payload, not stale: the read side
    did not stall on what the fuzzed request did."""
    other = worlds.other
    answer = other.client.post(
        "mutation($input: UpdateCardInput!) { updateCard(input: $input) { card { title } } }",
        {"input": {"cardId": other.card, "title": f"fresh {uuid4().hex[:8]}"}},
    )
    assert answer.errors == [], answer.body
    assert not answer.stale, answer.body
    assert answer.data["updateCard"]["card"] is not None, answer.body


# -- every text input of every mutation ------------------------------------------------------------


def test_the_fuzzed_fields_are_every_text_input_of_every_mutation(stack: Stack) -> None:
    worlds = _worlds(stack)
    fields = _text_inputs(worlds.mine.client)
    assert set(fields) == set(_base_inputs(worlds.mine)), "a mutation without a base input"
    assert "labels.0" in fields["updateCard"]
    assert "lanes.0.name" in fields["createProject"]
    assert "userId" in fields["addMember"]
    assert "assignee" in fields["assignCard"]
    assert sum(len(f) for f in fields.values()) > 50


_MUTATION_FIELDS: dict[str, list[str]] = {}


def _mutation_fields(client: ApiClient) -> dict[str, list[str]]:
    if not _MUTATION_FIELDS:
        _MUTATION_FIELDS.update(_text_inputs(client))
    return _MUTATION_FIELDS


@FUZZ
@given(data=st.data(), text=_text)
def test_any_text_in_any_mutation_is_success_or_validation_and_nothing_stalls(
    stack: Stack, data: st.DataObject, text: str
) -> None:
    worlds = _worlds(stack)
    fields = _mutation_fields(worlds.mine.client)
    name = data.draw(st.sampled_from(sorted(fields)), label="mutation")
    path = data.draw(st.sampled_from(fields[name]), label="field")
    variables = {"input": _put(_base_inputs(worlds.mine)[name], path, text)}
    poisoned = _is_poison(text)

    before = log_head(stack.database_url)
    response = _send(worlds.mine.client, _mutation(name), variables)
    _refusal_or_success(response, poisoned=poisoned)
    if poisoned or response.status_code == 413:
        assert log_head(stack.database_url) == before, "a refused request wrote events"
    _fresh_write_elsewhere(worlds)


# -- every text argument of the queries ----------------------------------------------------------

_QUERIES: dict[str, tuple[str, Callable[[World, str], dict[str, Any]]]] = {
    "searchLogs": (
        "query($ws: ID!, $t: String!) { searchLogs(workspaceId: $ws, query: $t) { seq } }",
        lambda w, t: {"ws": w.workspace, "t": t},
    ),
    "cards.after": (
        "query($p: ID!, $t: String) { board(projectId: $p) { lanes { cards(after: $t) {"
        " edges { cursor } } } } }",
        lambda w, t: {"p": w.project, "t": t},
    ),
    "runs.after": (
        "query($c: ID!, $t: String) { card(id: $c) { runs(after: $t) { edges { cursor } } } }",
        lambda w, t: {"c": w.card, "t": t},
    ),
    "activity.after": (
        "query($ws: ID!, $t: String) { activity(workspaceId: $ws, after: $t) {"
        " edges { cursor } } }",
        lambda w, t: {"ws": w.workspace, "t": t},
    ),
    "statement.month": (
        "query($ws: ID!, $t: String!) { statement(workspaceId: $ws, month: $t) { total } }",
        lambda w, t: {"ws": w.workspace, "t": t},
    ),
    "card.id": ("query($t: ID!) { card(id: $t) { id } }", lambda w, t: {"t": t}),
    "usage.from": (
        "query($ws: ID!, $t: DateTime!) { usage(workspaceId: $ws, from: $t,"
        ' to: "2030-01-01T00:00:00Z", groupBy: DAY) { key } }',
        lambda w, t: {"ws": w.workspace, "t": t},
    ),
}


def _forged_cursor(parts: list[Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(parts).encode()).decode().rstrip("=")


_cursors = st.builds(
    _forged_cursor,
    st.lists(
        st.one_of(
            st.sampled_from(["card", "run", "activity"]),
            _storable,
            _poisoned(),
            st.integers(min_value=-(10**30), max_value=10**30),
            st.uuids().map(str),
        ),
        max_size=4,
    ),
)


@FUZZ
@given(which=st.sampled_from(sorted(_QUERIES)), text=st.one_of(_text, _cursors))
def test_any_text_in_a_query_argument_is_an_answer_or_validation(
    stack: Stack, which: str, text: str
) -> None:
    worlds = _worlds(stack)
    query, variables = _QUERIES[which]
    response = _send(worlds.mine.client, query, variables(worlds.mine, text))
    _refusal_or_success(response, poisoned=_is_poison(text))
    _fresh_write_elsewhere(worlds)


# -- the findings of the report, one by one --------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "path"),
    [
        ("blockCard", "reason"),
        ("updateCard", "labels.0"),
        ("assignCard", "assignee"),
        ("startAgentRun", "agent"),
        ("addMember", "userId"),
        ("createProject", "lanes.0.name"),
    ],
)
@pytest.mark.parametrize("poison", ["a\x00b", "a\ud800b"])
def test_the_reported_poison_inputs_are_validation_naming_the_field(
    stack: Stack, name: str, path: str, poison: str
) -> None:
    worlds = _worlds(stack)
    before = log_head(stack.database_url)
    variables = {"input": _put(_base_inputs(worlds.mine)[name], path, poison)}
    response = _send(worlds.mine.client, _mutation(name), variables)
    assert response.status_code == 200
    (error,) = response.json()["errors"]
    assert error["extensions"]["code"] == "VALIDATION"
    assert f"$input.{path}" in error["message"]
    assert log_head(stack.database_url) == before
    _fresh_write_elsewhere(worlds)


def test_poison_in_a_document_literal_is_validation_naming_the_argument(stack: Stack) -> None:
    mine = _worlds(stack).mine
    answer = mine.client.post(
        f'mutation {{ blockCard(input: {{cardId: "{mine.card}", reason: "a\\u0000b"}})'
        " { consistencyToken } }"
    )
    assert answer.codes == ["VALIDATION"]
    assert answer.errors[0]["message"].startswith("blockCard.input.reason must not contain NUL")
    search = mine.client.post(
        'query($ws: ID!) { searchLogs(workspaceId: $ws, query: "\\u0000") { seq } }',
        {"ws": mine.workspace},
    )
    assert search.codes == ["VALIDATION"]


def test_search_cursor_and_activity_inputs_that_answered_internal_are_validation(
    stack: Stack,
) -> None:
    mine = _worlds(stack).mine
    search = mine.client.post(
        "query($ws: ID!, $q: String!) { searchLogs(workspaceId: $ws, query: $q) { seq } }",
        {"ws": mine.workspace, "q": "\x00"},
    )
    assert search.codes == ["VALIDATION"]
    nul_cursor = _forged_cursor(["card", "a\x00", str(uuid4())])
    cards = mine.client.post(
        "query($p: ID!, $c: String) { board(projectId: $p) { lanes { cards(after: $c) {"
        " edges { cursor } } } } }",
        {"p": mine.project, "c": nul_cursor},
    )
    assert set(cards.codes) == {"VALIDATION"}, cards.body
    for position in (10**30, -1, 2**63):
        activity = mine.client.post(
            "query($ws: ID!, $c: String) { activity(workspaceId: $ws, after: $c) {"
            " edges { cursor } } }",
            {"ws": mine.workspace, "c": _forged_cursor(["activity", position])},
        )
        assert activity.codes == ["VALIDATION"], activity.body


def test_a_document_of_two_operations_without_operation_name_is_an_error(stack: Stack) -> None:
    mine = _worlds(stack).mine
    document = (
        "query First($id: ID!) { workspace(id: $id) { name } }"
        ' mutation Second($id: ID!) { renameWorkspace(input: {workspaceId: $id, name: "x"})'
        " { consistencyToken } }"
    )
    name = "query($id: ID!) { workspace(id: $id) { name } }"
    renamed = mine.client.data(_mutation("renameWorkspace"), {"input": {
        "workspaceId": mine.workspace, "name": "before"}})["renameWorkspace"]  # fmt: skip
    seen = {"X-Consistency-Token": renamed["consistencyToken"]}
    answer = mine.client.post(document, {"id": mine.workspace})
    assert answer.codes == ["VALIDATION"], answer.body
    assert "operationName" in answer.errors[0]["message"]
    assert not answer.data
    chosen = mine.client.post(
        document, {"id": mine.workspace}, operation_name="First", headers=seen
    )
    assert chosen.errors == []
    assert chosen.data["workspace"]["name"] == "before"
    after = mine.client.data(name, {"id": mine.workspace}, headers=seen)
    assert after["workspace"]["name"] == "before"


# -- user ids are UUIDs ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "field", "extra"),
    [
        ("addMember", "userId", {"role": "MEMBER"}),
        ("changeRole", "userId", {"role": "VIEWER"}),
        ("removeMember", "userId", {}),
    ],
)
def test_a_user_id_that_is_not_a_uuid_is_validation(
    stack: Stack, name: str, field: str, extra: dict[str, Any]
) -> None:
    mine = _worlds(stack).mine
    answer = mine.client.post(
        _mutation(name), {"input": {"workspaceId": mine.workspace, field: "bob", **extra}}
    )
    assert answer.codes == ["VALIDATION"], answer.body
    assert "userId must be a UUID" in answer.errors[0]["message"]


def test_an_assignee_must_be_a_uuid_and_a_member(stack: Stack) -> None:
    worlds = _worlds(stack)
    mine = worlds.mine
    assign = _mutation("assignCard").replace("consistencyToken", "card { assignee }")
    not_uuid = mine.client.post(assign, {"input": {"cardId": mine.card, "assignee": "bob"}})
    assert not_uuid.codes == ["VALIDATION"]
    assert "assignee must be a UUID" in not_uuid.errors[0]["message"]

    before = log_head(stack.database_url)
    stranger = str(uuid4())
    for outsider in (stranger, worlds.other.owner, worlds.other.member):
        answer = mine.client.post(assign, {"input": {"cardId": mine.card, "assignee": outsider}})
        assert answer.codes == ["VALIDATION"], answer.body
        assert "not a member" in answer.errors[0]["message"]
    assert log_head(stack.database_url) == before

    member = mine.client.post(assign, {"input": {"cardId": mine.card, "assignee": mine.member}})
    assert member.errors == [], member.body
    assert member.data["assignCard"]["card"]["assignee"] == mine.member


def test_a_token_whose_subject_is_not_a_uuid_is_401(stack: Stack) -> None:
    token = issue_token(
        user_id="bob", workspace_id="*", role="OWNER", ttl_seconds=60, secret=stack.secret
    )
    answer = stack.client(token).post("{ __typename }")
    assert answer.status == 401
    assert answer.codes == ["UNAUTHENTICATED"]
    assert "'sub'" in answer.errors[0]["message"]


def test_the_owner_and_members_are_listed_by_uuid(stack: Stack) -> None:
    mine = _worlds(stack).mine
    members = mine.client.data(
        "query($id: ID!) { workspace(id: $id) { members { userId role } } }", {"id": mine.workspace}
    )["workspace"]["members"]
    assert {"userId": mine.owner, "role": "OWNER"} in members
    assert {"userId": mine.member, "role": "MEMBER"} in members


@pytest.mark.parametrize("name", ["\ud800", "a\x00"])
def test_an_operation_name_that_is_not_text_is_validation_not_a_500(
    stack: Stack, name: str
) -> None:
    mine = _worlds(stack).mine
    body = {"query": "query A { __typename } query B { __typename }", "operationName": name}
    response = mine.client.raw(json.dumps(body).encode())
    assert response.status_code == 400, response.text
    assert response.json()["errors"][0]["extensions"]["code"] == "VALIDATION"


def test_a_subscription_variable_that_is_not_text_is_refused_over_the_websocket(
    stack: Stack,
) -> None:
    mine = _worlds(stack).mine
    query = "subscription($p: ID!) { boardChanged(projectId: $p) { kind } }"
    with subscribe(stack.ws_url, mine.client.token, query, {"p": "a\x00b"}) as sub:
        message = sub.next_message()
    assert message["type"] in ("error", "next"), message
    errors = message["payload"] if message["type"] == "error" else message["payload"]["errors"]
    assert [e["extensions"]["code"] for e in errors] == ["VALIDATION"], message
    assert "NUL" in errors[0]["message"]


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"\xff\xfe", 400),  # not UTF-8 at all
        (b"\xed\xa0\x80", 200),  # a surrogate encoded as UTF-8 bytes (CESU), which json accepts
        (b"\xc0\x80", 400),  # an overlong NUL
    ],
)
def test_a_body_that_is_not_valid_utf8_is_validation(stack: Stack, raw: bytes, status: int) -> None:
    mine = _worlds(stack).mine
    body = (
        b'{"query": "mutation($input: BlockCardInput!) { blockCard(input: $input)'
        b' { consistencyToken } }", "variables": {"input": {"cardId": "'
        + mine.card.encode()
        + b'", "reason": "a'
        + raw
        + b'b"}}}'
    )
    before = log_head(stack.database_url)
    response = mine.client.raw(body)
    assert response.status_code == status, response.text
    assert [e["extensions"]["code"] for e in response.json()["errors"]] == ["VALIDATION"]
    assert log_head(stack.database_url) == before
