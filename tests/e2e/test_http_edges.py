"""What the API answers at its edges: auth, limits, malformed input, health — never a 5xx."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from api_client import PROTOCOL, ApiClient
from e2e_stack import MakeStack, Stack, user_id
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rate_windows import clear_of_a_window_end
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect as ws_connect

from adapters.tokens import issue_token
from commands import models as m
from commands.handlers import Actor
from read_api.input_checks import MAX_VARIABLE_VALUES
from read_api.services import QueryLimits, RateLimits

QUERY = "query($id: ID!) { workspace(id: $id) { id name } }"


def _no_trace(response: httpx.Response) -> None:
    assert response.status_code < 500, response.text
    assert "Traceback" not in response.text
    assert 'File "' not in response.text
    body = response.json()
    for error in body.get("errors", []):
        assert error["extensions"]["code"], body
        # Bad input is the client's problem, never an internal error.
        assert error["extensions"]["code"] != "INTERNAL", body


@pytest.mark.parametrize(
    "authorization",
    [None, "", "Bearer", "Basic YWxpY2U6c2VjcmV0", "Bearer not.a.jwt", "Bearer " + "x" * 5000],
)
def test_a_request_without_a_valid_token_is_401_with_a_graphql_error(
    stack: Stack, authorization: str | None
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    response = httpx.post(f"{stack.url}/graphql", json={"query": "{ __typename }"},
                          headers=headers)  # fmt: skip
    assert response.status_code == 401
    body = response.json()
    assert body["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


def test_a_token_signed_with_another_key_or_expired_is_refused(stack: Stack) -> None:
    forged = issue_token(user_id="alice", workspace_id="*", role="OWNER", ttl_seconds=60,
                         secret="another-secret-of-sufficient-length-123456")  # fmt: skip
    assert stack.client(forged).post("{ __typename }").status == 401
    expired = issue_token(
        user_id="alice", workspace_id="*", role="OWNER", ttl_seconds=60, secret=stack.secret,
        now=datetime.now(UTC) - timedelta(hours=2),
    )  # fmt: skip
    answer = stack.client(expired).post("{ __typename }")
    assert answer.status == 401
    assert "expired" in answer.errors[0]["message"]


def test_rate_limits_answer_429_with_retry_after(make_stack: MakeStack) -> None:
    stack = make_stack(rate_limits=RateLimits(per_user_per_minute=5, per_workspace_per_minute=8,
                                              key_prefix="rl-local"))  # fmt: skip
    _exhaust(stack)


def test_rate_limits_are_shared_through_redis(make_stack: MakeStack) -> None:
    limits = RateLimits(per_user_per_minute=5, per_workspace_per_minute=8,
                        key_prefix=f"rl-{secrets.token_hex(4)}")  # fmt: skip
    first = make_stack(broadcaster="redis", rate_limits=limits)
    _exhaust(first)
    # A second API instance on the same Redis counts against the same budget.
    second = make_stack(broadcaster="redis", rate_limits=limits, secret=first.secret)
    alice = second.as_user("alice", "00000000-0000-0000-0000-000000000001")
    assert alice.post("{ __typename }").status == 429


def _exhaust(stack: Stack) -> None:
    clear_of_a_window_end(10)
    ws = "00000000-0000-0000-0000-000000000001"
    alice = stack.as_user("alice", ws)
    statuses = [alice.post("{ __typename }").status for _ in range(6)]
    assert statuses[:5] == [200] * 5
    assert statuses[5] == 429
    refused = alice.post("{ __typename }")
    assert refused.status == 429
    assert refused.codes == ["RATE_LIMITED"]
    retry = int(refused.headers["Retry-After"])
    assert 1 <= retry <= 60
    assert refused.errors[0]["extensions"]["retryAfter"] == retry
    # Another user has their own budget, until the workspace's is spent; alice's refused
    # requests did not count against the workspace.
    bob = stack.as_user("bob", ws)
    assert [bob.post("{ __typename }").status for _ in range(4)] == [200, 200, 200, 429]


def test_the_body_size_is_limited(make_stack: MakeStack) -> None:
    stack = make_stack(max_body_bytes=2_000)
    alice = stack.as_user("alice", "00000000-0000-0000-0000-000000000001")
    big = json.dumps({"query": "{ __typename }", "variables": {"x": "y" * 5_000}}).encode()
    response = alice.raw(big)
    assert response.status_code == 413
    assert response.json()["errors"][0]["extensions"]["code"] == "VALIDATION"

    def chunks() -> Iterator[bytes]:
        yield big[:1000]
        yield big[1000:]

    streamed = alice.http.post("/graphql", content=chunks(), headers=alice.headers(
        {"Content-Type": "application/json"}))  # fmt: skip
    assert streamed.status_code == 413


@pytest.mark.parametrize(
    ("content", "content_type", "status"),
    [
        (b"not json", "application/json", 400),
        (b"[]", "application/json", 400),
        (b'"query"', "application/json", 400),
        (b'{"query": 5}', "application/json", 400),
        (b'{"query": "{ __typename }", "variables": []}', "application/json", 400),
        (b'{"query": "{ __typename }", "operationName": 1}', "application/json", 400),
        (b"{ __typename }", "text/plain", 415),
        (b"[" * 100_000, "application/json", 400),
        (b'{"query": "subscription { boardChanged(projectId: \\"x\\") { kind } }"}',
         "application/json", 400),
    ],
)  # fmt: skip
def test_malformed_requests_are_400_never_500(
    stack: Stack, content: bytes, content_type: str, status: int
) -> None:
    alice = stack.as_user("alice", "00000000-0000-0000-0000-000000000001")
    response = alice.raw(content, content_type=content_type)
    assert response.status_code == status, response.text
    _no_trace(response)


@pytest.mark.parametrize("depth", [33, 900, 930, 960, 975])
def test_variables_nested_deeper_than_any_input_are_400_and_the_server_goes_on(
    stack: Stack, depth: int
) -> None:
    """Deep enough for the JSON parser, too deep for the recursive walks after it: the text
    check overflowed the stack (INTERNAL), and its error log, rendering the variable in each of
    a thousand frames, held the event loop for minutes: no one was answered meanwhile."""
    alice, ws = stack.owner_with_workspace()
    for nested in ("[" * depth + "]" * depth, '{"a":' * depth + "1" + "}" * depth):
        body = '{"query": "query($x: ID!) { card(id: $x) { id } }", "variables": {"x": %s}}'
        response = alice.raw((body % nested).encode())
        assert response.status_code == 400, response.text
        assert response.json()["errors"][0]["extensions"]["code"] == "VALIDATION"
        if depth < 500:  # deeper, the parser itself may give up first ("not valid JSON")
            assert "nest deeper" in response.json()["errors"][0]["message"]
        _no_trace(response)
    assert alice.data("query($id: ID!) { workspace(id: $id) { id } }", {"id": ws})


_MANY = 300_000


@pytest.mark.parametrize(
    "variables",
    [
        {"i": {"labels": [1] * _MANY}},
        {"i": {"labels": [{}] * _MANY}},
        {"i": {"labels": ["x"] * (_MANY * 3 // 4)}},
        {"i": {f"f{n}": 0 for n in range(_MANY // 4)}},
        {f"v{n}": 0 for n in range(_MANY // 4)},
    ],
    ids=["ints", "objects", "strings", "fields", "variables"],
)
def test_variables_holding_more_values_than_any_input_are_400_before_any_walk(
    stack: Stack, variables: dict[str, Any]
) -> None:
    """Within the body limit, a list of a few hundred thousand items: every check walking the
    variables (their nesting, their text), then coercion and the command's model went through
    each item on the event loop, over a second of every tenant's requests per request."""
    alice, ws = stack.owner_with_workspace()
    pid = alice.create_project(ws, "P", [{"name": "Todo"}])["project"]["id"]
    card = alice.create_card(pid, "c")["card"]["id"]
    if "i" in variables:
        variables = {"i": {"cardId": card, **variables["i"]}}
    update = "mutation($i: UpdateCardInput!) { updateCard(input: $i) { card { version } } }"
    body = json.dumps({"query": update, "variables": variables}, separators=(",", ":"))
    assert len(body) < 1_000_000  # within the body limit: the size alone refuses nothing
    response = alice.raw(body.encode())
    assert response.status_code == 400, response.text[:300]
    error = response.json()["errors"][0]
    assert error["extensions"]["code"] == "VALIDATION"
    assert f"more than {MAX_VARIABLE_VALUES} values" in error["message"]
    _no_trace(response)
    labels = {"i": {"cardId": card, "labels": [f"l{n}" for n in range(50)]}}
    assert alice.data(update, labels)["updateCard"]["card"]["version"] > 1


def test_documents_beyond_the_limits_are_refused_before_running(make_stack: MakeStack) -> None:
    stack = make_stack(
        query_limits=QueryLimits(max_depth=6, max_aliases=20, max_tokens=600, max_cost=1000)
    )
    alice, ws = stack.owner_with_workspace()
    shallow = "query($id: ID!) { workspace(id: $id) { projects { board { lanes { name } } } } }"
    assert alice.post(shallow, {"id": ws}).errors == []
    deep = (
        "query($id: ID!) { workspace(id: $id) { projects { board { lanes { cards { edges {"
        " node { id } } } } } } } }"
    )
    assert alice.post(deep, {"id": ws}).codes == ["VALIDATION"]
    aliases = "{ " + " ".join(f"a{i}: __typename" for i in range(30)) + " }"
    assert alice.post(aliases).codes == ["VALIDATION"]
    tokens = "{ " + " ".join("__typename" for _ in range(700)) + " }"
    assert alice.post(tokens).codes == ["VALIDATION"]
    costly = (
        "query($id: ID!) { board(projectId: $id) { lanes { cards(first: 200) { edges { node {"
        " lastRun { id } } } } } } }"
    )
    answer = stack.as_user("alice", ws).post(costly, {"id": ws})
    assert answer.codes == ["VALIDATION"]
    assert "too expensive" in answer.errors[0]["message"]


@pytest.mark.parametrize(
    ("field", "times"),
    [("me { id }", 950), ("__typename", 3_900), ('workspace(id: "x") { id }', 400)],
)
def test_a_document_asking_for_one_field_over_and_over_is_refused_as_too_complex(
    stack: Stack, field: str, times: int
) -> None:
    """Within the token limit: validation compared each pair of the same-named fields, 1.5-4 s
    of the event loop per request, and then answered only "Validation aborted."."""
    alice, ws = stack.owner_with_workspace()
    repeated = "query { " + f"{field} " * times + "}"  # within the token limit
    answer = alice.post(repeated)
    assert answer.codes == ["VALIDATION"], answer.body
    assert "too complex to validate" in answer.errors[0]["message"]
    twice = "query($id: ID!) { workspace(id: $id) { id } workspace(id: $id) { id name } }"
    assert alice.data(twice, {"id": ws})["workspace"]["id"] == ws


@pytest.mark.parametrize("fields", [1_300, 60])
def test_an_input_object_wider_than_any_input_is_refused_in_one_short_error(
    stack: Stack, fields: int
) -> None:
    """Within the token limit: validation answered each unknown field with an error printing
    the whole object, 100 errors of 13 KB (1.3 MB) for 1,300 fields, 3 s of the event loop."""
    alice, _ = stack.owner_with_workspace()
    wide = ", ".join(f"f{n}: 1" for n in range(fields))
    response = alice.raw(
        json.dumps(
            {"query": f"mutation {{ createWorkspace(input: {{{wide}}}) {{ consistencyToken }} }}"}
        ).encode()
    )
    _no_trace(response)
    errors = response.json()["errors"]
    assert [e["extensions"]["code"] for e in errors] == ["VALIDATION"]
    assert f"input object of {fields} fields" in errors[0]["message"]
    assert len(response.content) < 1_000
    # An unknown field or two in an input of the usual size is named as before.
    typo = 'mutation { createWorkspace(input: {name: "x", nmae: "y"}) { consistencyToken } }'
    assert "nmae" in alice.post(typo).errors[0]["message"]


def test_a_costly_document_is_refused_at_the_default_limits(stack: Stack) -> None:
    alice, ws = stack.owner_with_workspace()
    costly = (
        "query($id: ID!) { board(projectId: $id) { lanes { cards(first: 200) { edges { node {"
        " runs(first: 200) { edges { node { id billed status } } } } } } } } }"
    )
    answer = alice.post(costly, {"id": ws})
    assert answer.codes == ["VALIDATION"]
    assert "too expensive" in answer.errors[0]["message"]


def test_bad_ids_money_and_times_are_validation_errors(stack: Stack) -> None:
    alice, ws = stack.owner_with_workspace()
    cases = [
        ("query { card(id: \"12\") { id } }", None),
        ("query($ws: ID!) { statement(workspaceId: $ws, month: \"2025-13\") { total } }",
         {"ws": ws}),
        ("query($ws: ID!) { usage(workspaceId: $ws, from: \"yesterday\","
         " to: \"2030-01-01T00:00:00Z\", groupBy: DAY) { key } }", {"ws": ws}),
        ("query($ws: ID!) { usage(workspaceId: $ws, from: \"2025-01-01T00:00:00\","
         " to: \"2030-01-01T00:00:00Z\", groupBy: DAY) { key } }", {"ws": ws}),
        ("mutation($ws: ID!) { setSpendLimit(input: {workspaceId: $ws, monthlyLimit: 1.5}) {"
         " consistencyToken } }", {"ws": ws}),
        ("mutation($ws: ID!, $m: Money) { setSpendLimit(input: {workspaceId: $ws,"
         " monthlyLimit: $m}) { consistencyToken } }", {"ws": ws, "m": "1.0000001"}),
        ("mutation($ws: ID!, $m: Money) { setSpendLimit(input: {workspaceId: $ws,"
         " monthlyLimit: $m}) { consistencyToken } }", {"ws": ws, "m": "-5"}),
        ("mutation { createCard(input: {projectId: \"nope\", title: \"x\"}) {"
         " consistencyToken } }", None),
        ("mutation($ws: ID!) { createProject(input: {workspaceId: $ws, name: \"%s\"}) {"
         " consistencyToken } }" % ("n" * 300), {"ws": ws}),
        ("mutation($ws: ID!) { createWorkspace(input: {name: \"x\", commandId: \"not-uuid\"}) {"
         " consistencyToken } }", {"ws": ws}),
        ("query { agentRunLogs(runId: \"00000000-0000-0000-0000-000000000000\", first: 1001)"
         " { seq } }", None),
    ]  # fmt: skip
    for query, variables in cases:
        answer = alice.post(query, variables)
        assert answer.status == 200, (query, answer.body)
        assert answer.codes == ["VALIDATION"], (query, answer.body)
        assert "Traceback" not in json.dumps(answer.body)


def test_a_domain_refusal_keeps_its_code(stack: Stack) -> None:
    alice, ws = stack.owner_with_workspace()
    pid = alice.create_project(ws, "P", [{"name": "Todo"}, {"name": "Doing", "wipLimit": 1}])[
        "project"
    ]["id"]
    first, second = (alice.create_card(pid, t)["card"]["id"] for t in ("a", "b"))
    move = 'mutation($id: ID!) { moveCard(input: {cardId: $id, toLane: "Doing"}) { card { id } } }'
    assert alice.post(move, {"id": first}).errors == []
    assert alice.error_codes(move, {"id": second}) == ["WIP_LIMIT"]
    stale = (
        'mutation($id: ID!) { updateCard(input: {cardId: $id, title: "z", expectedVersion: 1}) {'
        " card { id } } }"
    )
    assert alice.error_codes(stale, {"id": first}) == ["CONFLICT"]
    archive = "mutation($id: ID!) { archiveCard(input: {cardId: $id}) { card { archived } } }"
    assert alice.post(archive, {"id": second}).errors == []
    assert alice.error_codes(archive, {"id": second}) == ["INVALID_TRANSITION"]
    limit = (
        'mutation($ws: ID!) { setSpendLimit(input: {workspaceId: $ws, monthlyLimit: "0.01"}) {'
        " workspace { monthlyLimit } } }"
    )
    assert alice.data(limit, {"ws": ws})["setSpendLimit"]["workspace"]["monthlyLimit"] == "0.010000"
    duplicate = (
        "mutation($ws: ID!, $alice: ID!) { addMember(input: {workspaceId: $ws, userId: $alice,"
        " role: MEMBER}) { consistencyToken } }"
    )
    assert alice.error_codes(duplicate, {"ws": ws, "alice": user_id("alice")}) in (
        ["DUPLICATE"],
        ["INVALID_TRANSITION"],
    )


def test_health_and_readiness(make_stack: MakeStack) -> None:
    stack = make_stack(broadcaster="redis")
    assert httpx.get(f"{stack.url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{stack.url}/readyz")
    assert ready.status_code == 200, ready.text
    body = ready.json()
    assert body["status"] == "ready"
    assert body["database"] == "ok"
    assert body["redis"] == "ok"
    assert set(body["projectors"]) == {"kanban", "runs", "billing", "activity"}

    # With the projectors stopped, a write puts them behind the head of the log.
    stack.fanout.stop()
    stack.write.create_workspace(
        m.CreateWorkspace(name="lagging"), Actor(user_id="alice", workspace_id="*")
    )
    stack.services.max_projector_lag = 0
    lagging = httpx.get(f"{stack.url}/readyz")
    assert lagging.status_code == 503
    assert lagging.json()["status"] == "not ready"
    assert max(p["lag"] for p in lagging.json()["projectors"].values()) >= 1


def test_unknown_paths_and_get_queries_answer_graphql_shaped_errors(stack: Stack) -> None:
    missing = httpx.get(f"{stack.url}/nope")
    assert missing.status_code == 404
    assert missing.json()["errors"][0]["extensions"]["code"] == "NOT_FOUND"
    get = httpx.get(f"{stack.url}/graphql", params={"query": "{ __typename }"})
    assert get.status_code == 405
    assert get.json()["errors"][0]["extensions"]["code"] == "VALIDATION"


# -- fuzzing -------------------------------------------------------------------------------------

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                max_size=4),
    max_leaves=12,
)  # fmt: skip

_fragments = st.sampled_from([
    "query", "mutation", "subscription", "{", "}", "(", ")", ":", "$id", "$x", "ID!", "Int",
    "workspace", "card", "board", "projectId", "id", "first", "after", "edges", "node", "...",
    "on", "Card", "fragment", "f", "@skip(if: true)", "\"x\"", "1", "-1", "2147483648", "null",
    "createCard", "input", "title", "moveCard", "__typename", "__schema", "cardHistory",
    "asOfVersion", "Money", "maxCost", "\"1.5\"", "[", "]", ",", "#", "\\u0000",
])  # fmt: skip

_queries = st.one_of(
    st.text(max_size=200),
    st.lists(_fragments, max_size=30).map(" ".join),
)

_known_query = st.sampled_from([
    "query($id: ID!, $first: Int, $after: String) { board(projectId: $id) { lanes {"
    " cards(first: $first, after: $after) { edges { node { id } } } } } }",
    "query($id: ID!, $v: Int, $at: DateTime) { cardHistory(cardId: $id, asOfVersion: $v,"
    " asOf: $at) { version } }",
    "mutation($input: CreateCardInput!) { createCard(input: $input) { card { id } } }",
    "mutation($input: StartAgentRunInput!) { startAgentRun(input: $input) { run { id } } }",
    "query($id: ID!, $m: String!) { statement(workspaceId: $id, month: $m) { total } }",
    "query($id: ID!, $after: String, $first: Int) { activity(workspaceId: $id, first: $first,"
    " after: $after) { edges { cursor } } }",
])  # fmt: skip


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(query=_queries, variables=st.dictionaries(st.text(max_size=8), _json_values, max_size=4))
def test_random_documents_never_cause_a_5xx_or_a_trace(
    stack: Stack, query: str, variables: dict[str, Any]
) -> None:
    alice = _fuzz_client(stack)
    response = alice.raw(json.dumps({"query": query, "variables": variables}).encode())
    _no_trace(response)
    if response.status_code == 200:
        assert "errors" in response.json() or "data" in response.json()


@settings(max_examples=80, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(
    query=_known_query,
    pick=st.sampled_from(["workspace", "project", "card", "run", None]),
    variables=st.fixed_dictionaries(
        {},
        optional={
            "id": st.one_of(st.uuids().map(str), st.text(max_size=40), st.integers()),
            "first": st.one_of(st.integers(), st.none(), st.text(max_size=5)),
            "after": st.one_of(st.text(max_size=60), st.none(), st.integers()),
            "v": st.one_of(st.integers(), st.none()),
            "at": st.one_of(st.text(max_size=30), st.datetimes().map(str)),
            "m": st.text(max_size=10),
            "input": st.dictionaries(
                st.sampled_from(["projectId", "cardId", "title", "agent", "maxCost", "lane",
                                 "commandId", "bogus"]),
                _json_values, max_size=5,
            ),
        },
    ),
)  # fmt: skip
def test_random_variables_are_validation_errors_never_500(
    stack: Stack, query: str, pick: str | None, variables: dict[str, Any]
) -> None:
    alice, ids = _fuzz_world(stack)
    if pick is not None:
        # Real ids reach the resolvers' deeper paths (history, runs, pages, commands).
        variables = {**variables, "id": ids[pick]}
        if isinstance(variables.get("input"), dict):
            variables["input"] = {**variables["input"], "cardId": ids["card"],
                                  "projectId": ids["project"]}  # fmt: skip
    response = alice.raw(json.dumps({"query": query, "variables": variables}).encode())
    _no_trace(response)


_FUZZ_WORLDS: dict[int, tuple[ApiClient, dict[str, str]]] = {}


def _fuzz_client(stack: Stack) -> ApiClient:
    return _fuzz_world(stack)[0]


def _fuzz_world(stack: Stack) -> tuple[ApiClient, dict[str, str]]:
    """One workspace with a project, a card and a run, made once per stack."""
    cached: tuple[ApiClient, dict[str, str]] | None = _FUZZ_WORLDS.get(id(stack))
    if cached is None:
        client, ws = stack.owner_with_workspace("fuzzer", "Fuzz")
        project = client.create_project(ws, "P", [{"name": "Todo"}, {"name": "Doing"}])
        pid = project["project"]["id"]
        card = client.create_card(pid, "fuzzed")["card"]["id"]
        run = client.start_agent_run(card)["run"]["id"]
        cached = (client, {"workspace": ws, "project": pid, "card": card, "run": run})
        _FUZZ_WORLDS[id(stack)] = cached
    return cached


def test_cors_lets_configured_origins_call_the_api(make_stack: MakeStack) -> None:
    stack = make_stack(cors_origins=("https://app.agentworks.example",))
    preflight = httpx.options(
        f"{stack.url}/graphql",
        headers={
            "Origin": "https://app.agentworks.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type, x-consistency-token",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "https://app.agentworks.example"
    other = httpx.options(
        f"{stack.url}/graphql",
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
    )
    assert "access-control-allow-origin" not in other.headers


def test_origins_cors_allows_by_pattern_may_open_a_websocket_too(make_stack: MakeStack) -> None:
    stack = make_stack(cors_origin_regex=r"http://(localhost|127\.0\.0\.1)(:\d+)?")
    alice = stack.as_user("alice", "00000000-0000-0000-0000-000000000001")
    spa = {"Origin": "http://localhost:5173"}
    preflight = httpx.options(
        f"{stack.url}/graphql",
        headers={**spa, "Access-Control-Request-Method": "POST"},
    )
    assert preflight.headers["access-control-allow-origin"] == spa["Origin"]
    with ws_connect(
        f"{stack.ws_url}/graphql", subprotocols=[PROTOCOL], additional_headers=spa
    ) as socket:
        init = {"type": "connection_init", "payload": {"Authorization": f"Bearer {alice.token}"}}
        socket.send(json.dumps(init))
        assert json.loads(socket.recv(timeout=10))["type"] == "connection_ack"
    with pytest.raises(InvalidStatus) as refused:
        ws_connect(
            f"{stack.ws_url}/graphql",
            subprotocols=[PROTOCOL],
            additional_headers={"Origin": "https://evil.example"},
        )
    assert refused.value.response.status_code == 403


@pytest.mark.parametrize("version", [0, -1])
def test_an_expected_version_no_aggregate_can_be_at_is_refused_as_bad_input(
    stack: Stack, version: int
) -> None:
    """An ``expectedVersion`` below 1 was CONFLICT ('is at version 1, not the expected -1;
    reload it and retry'): the client reloaded and sent the same number again."""
    alice, ws = stack.owner_with_workspace()
    pid = alice.create_project(ws, "P", [{"name": "Todo"}, {"name": "Doing"}])["project"]["id"]
    card = alice.create_card(pid, "a")["card"]["id"]
    for mutation, fields in (
        ("updateCard", 'title: "z"'), ("moveCard", 'toLane: "Doing"'),
        ("assignCard", "assignee: null"), ("archiveCard", ""),
    ):  # fmt: skip
        answer = alice.post(
            f"mutation($id: ID!, $v: Int) {{ {mutation}(input: {{cardId: $id, {fields}"
            f" expectedVersion: $v}}) {{ card {{ id }} }} }}",
            {"id": card, "v": version},
        )
        assert answer.codes == ["VALIDATION"], (mutation, answer.body)
        assert "expectedVersion" in answer.errors[0]["message"], answer.errors
