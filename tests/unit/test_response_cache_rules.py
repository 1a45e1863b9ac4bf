"""Which documents the response cache may answer, how it keys them, and that an answer is only
served at the read-model version it was read at."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any
from uuid import uuid4

import pytest
from graphql import GraphQLObjectType

from adapters.tokens import USER_SCOPE, Principal
from domain.roles import Role
from read_api.response_cache import CACHEABLE_FIELDS, Entry, Key, ResponseCache, render
from read_api.schema import build_schema

SCHEMA = build_schema()
BOARD = (
    "query Board($id: ID!) { board(projectId: $id) { lanes { name wipLimit count"
    " cards(first: 100) { edges { node { id title position assignee labels"
    " lastRun { status } cost } } } } } }"
)


def cache(**kwargs: int) -> ResponseCache:
    return ResponseCache(SCHEMA._schema, **kwargs)


def member(role: Role = Role.MEMBER, workspace: str | None = None) -> Principal:
    return Principal(
        user_id="u1", workspace_id=workspace or str(uuid4()), role=role, is_bootstrap=False
    )


@pytest.mark.parametrize(
    "document",
    [
        BOARD,
        '{ board(projectId: "x") { __typename version lanes { name } } }',
        'query A { card(id: "x") { ...C } } fragment C on Card { id title runs { edges'
        " { node { id output attempts { provider } } } } }",
        '{ project(id: "x") { name board { lanes { cards { edges { cursor } } } } } }',
        '{ workspace(id: "x") { name members { userId role } projects { id } } }',
        '{ agentRun(id: "x") { ... on AgentRun { status billed } } }',
        '{ board(projectId: "x") { __type: version } }',  # an alias reads the same field
    ],
)
def test_documents_reading_only_read_models_are_cacheable(document: str) -> None:
    assert cache().cacheable(document, None)


@pytest.mark.parametrize(
    ("document", "operation"),
    [
        ('{ board(projectId: "x", asOf: "2026-01-01T00:00:00Z") { version } }', None),
        ("{ me { userId } }", None),
        ('{ workspace(id: "x") { spentThisMonth } }', None),
        ('{ cardHistory(cardId: "x") { version } }', None),
        ('{ board(projectId: "x") { version } me { userId } }', None),
        ("{ __schema { types { name } } }", None),
        ('mutation { archiveCard(cardId: "x") { card { id } } }', None),
        ('query A { board(projectId: "x") { version } } query B { me { userId } }', None),
        ('query A { board(projectId: "x") { version } } query B { me { userId } }', "B"),
        ('query A { card(id: "x") { ...F } } fragment F on Card { ...F }', None),
        ('query A { card(id: "x") { ...G } }', None),
        ("{ board(projectId: ", None),
        ('subscription { boardEvents(projectId: "x") { type } }', None),
    ],
)
def test_anything_else_executes(document: str, operation: str | None) -> None:
    assert not cache().cacheable(document, operation)


def test_an_operation_named_among_several_is_judged_alone() -> None:
    document = 'query A { board(projectId: "x") { version } } query B { me { userId } }'
    assert cache().cacheable(document, "A")


def test_every_listed_field_exists_in_the_schema() -> None:
    for type_name, fields in CACHEABLE_FIELDS.items():
        graphql_type = SCHEMA._schema.get_type(type_name)
        assert isinstance(graphql_type, GraphQLObjectType), type_name
        assert fields <= set(graphql_type.fields), (type_name, fields - set(graphql_type.fields))


def test_the_key_holds_workspace_role_variables_and_document() -> None:
    c = cache()
    workspace = uuid4()
    principal = member(workspace=str(workspace))
    key = c.key(principal, workspace, BOARD, {"id": "p"}, "Board")
    assert key is not None
    assert c.key(principal, workspace, BOARD, {"id": "p"}, "Board") == key
    assert c.key(principal, workspace, BOARD, {"id": "q"}, "Board") != key
    assert c.key(principal, uuid4(), BOARD, {"id": "p"}, "Board") != key
    viewer = member(Role.VIEWER, str(workspace))
    assert c.key(viewer, workspace, BOARD, {"id": "p"}, "Board") != key
    assert c.key(principal, workspace, BOARD + " ", {"id": "p"}, "Board") != key


def test_no_key_without_a_home_workspace_or_for_user_tokens_or_when_switched_off() -> None:
    workspace = uuid4()
    user = Principal(user_id="u1", workspace_id=USER_SCOPE, role=None, is_bootstrap=False)
    assert cache().key(user, workspace, BOARD, {"id": "p"}, None) is None
    assert cache().key(member(), None, BOARD, {"id": "p"}, None) is None
    assert cache(max_entries=0).key(member(), workspace, BOARD, {"id": "p"}, None) is None


def test_an_answer_is_served_only_at_the_version_it_was_read_at() -> None:
    c = cache()
    workspace = uuid4()
    key = c.key(member(workspace=str(workspace)), workspace, BOARD, {"id": "p"}, None)
    assert key is not None
    c.put(key, "kanban@10", {"board": {"lanes": []}}, {})
    hit = c.get(key, "kanban@10")
    assert hit is not None
    assert hit.data == render({"board": {"lanes": []}})
    assert c.get(key, "kanban@11") is None
    c.put(key, "kanban@11", {"board": None}, {})
    assert c.get(key, "kanban@10") is None
    assert (c.hits, c.misses) == (1, 2)


def test_entries_and_bytes_are_bounded_least_recently_used_first() -> None:
    c = cache(max_entries=2)
    workspace = uuid4()
    principal = member(workspace=str(workspace))
    keys = [c.key(principal, workspace, BOARD, {"id": str(i)}, None) for i in range(3)]
    assert all(k is not None for k in keys)
    c.put(keys[0], "v", {"n": 0}, {})  # type: ignore[arg-type]
    c.put(keys[1], "v", {"n": 1}, {})  # type: ignore[arg-type]
    assert c.get(keys[0], "v") is not None  # type: ignore[arg-type]
    c.put(keys[2], "v", {"n": 2}, {})  # type: ignore[arg-type]
    assert c.get(keys[1], "v") is None  # type: ignore[arg-type]
    assert c.get(keys[0], "v") is not None  # type: ignore[arg-type]
    small = cache(max_bytes=20)
    k = small.key(principal, workspace, BOARD, {"id": "p"}, None)
    assert k is not None
    small.put(k, "v", {"text": "x" * 40}, {})
    assert small.get(k, "v") is None


def test_rendering_matches_starlette() -> None:
    from starlette.responses import JSONResponse

    payload = {"data": {"t": "ünï", "n": [1, None, True]}}
    assert JSONResponse(payload).body == b'{"data":' + render(payload["data"]) + b"}"


def test_huge_documents_and_variables_are_not_kept() -> None:
    workspace = uuid4()
    principal = member(workspace=str(workspace))
    padded = BOARD + " " * 40_000
    assert cache().key(principal, workspace, padded, {"id": "p"}, None) is None
    assert cache().key(principal, workspace, BOARD, {"id": "p" * 40_000}, None) is None


def _board_key(c: ResponseCache) -> Key:
    workspace = uuid4()
    key = c.key(member(workspace=str(workspace)), workspace, BOARD, {"id": "p"}, None)
    assert key is not None
    return key


class _Execution:
    """An execution that ends when the test says so, counting how often it ran."""

    def __init__(self, answer: dict[str, object] | None) -> None:
        self.answer = answer
        self.runs = 0
        self.release = asyncio.Event()

    async def __call__(self) -> dict[str, object] | None:
        self.runs += 1
        await self.release.wait()
        return self.answer


def _on_one_key(scenario: Callable[[ResponseCache, Key], Coroutine[Any, Any, None]]) -> None:
    """Run ``scenario`` in an event loop on a fresh cache and the key of one board query."""
    c = cache()
    asyncio.run(scenario(c, _board_key(c)))


def _keeper(c: ResponseCache, key: Key, version: str) -> Callable[[object], Entry | None]:
    def keep(result: object) -> Entry | None:
        return None if result is None else c.put(key, version, result, {})

    return keep


def test_concurrent_misses_of_one_key_execute_once() -> None:
    async def scenario(c: ResponseCache, key: Key) -> None:
        execution = _Execution({"board": {"lanes": []}})
        keep = _keeper(c, key, "v1")
        waiting = [asyncio.create_task(c.serve(key, "v1", execution, keep)) for _ in range(5)]
        await asyncio.sleep(0)
        # Another version is another answer: it does not wait for the first.
        other = _Execution({"board": None})
        newer = asyncio.create_task(c.serve(key, "v2", other, _keeper(c, key, "v2")))
        await asyncio.sleep(0)
        assert (execution.runs, other.runs) == (1, 1)
        execution.release.set()
        other.release.set()
        answers = await asyncio.gather(*waiting)
        assert answers[0] == {"board": {"lanes": []}}  # the one that executed
        for answer in answers[1:]:
            assert isinstance(answer, Entry)
            assert answer.data == render({"board": {"lanes": []}})
        assert await newer == {"board": None}
        assert execution.runs == 1
        assert (c.misses, c.shared, c.hits) == (6, 4, 0)

    _on_one_key(scenario)


def test_waiters_execute_themselves_when_the_first_keeps_nothing() -> None:
    async def scenario(c: ResponseCache, key: Key) -> None:
        failing = _Execution(None)  # an answer with errors: not kept
        first = asyncio.create_task(c.serve(key, "v", failing, _keeper(c, key, "v")))
        await asyncio.sleep(0)
        second = asyncio.create_task(c.serve(key, "v", failing, _keeper(c, key, "v")))
        await asyncio.sleep(0)
        assert failing.runs == 1
        failing.release.set()
        assert await first is None
        assert await second is None
        assert failing.runs == 2
        assert c.shared == 0  # nobody was answered by the other's execution

    _on_one_key(scenario)


def test_a_cancelled_first_execution_releases_its_waiters() -> None:
    async def scenario(c: ResponseCache, key: Key) -> None:
        stuck = _Execution({"board": None})
        first = asyncio.create_task(c.serve(key, "v", stuck, _keeper(c, key, "v")))
        await asyncio.sleep(0)
        answer = {"board": {"lanes": []}}

        async def fresh() -> dict[str, object]:
            return answer

        second = asyncio.create_task(c.serve(key, "v", fresh, _keeper(c, key, "v")))
        await asyncio.sleep(0)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        assert await second == answer
        # And a later miss leads again instead of waiting for the cancelled one.
        hit = await c.serve(key, "v", stuck, _keeper(c, key, "v"))
        assert isinstance(hit, Entry)

    _on_one_key(scenario)


def test_a_cancelled_waiter_leaves_the_others_waiting() -> None:
    async def scenario(c: ResponseCache, key: Key) -> None:
        execution = _Execution({"board": None})
        keep = _keeper(c, key, "v")
        first = asyncio.create_task(c.serve(key, "v", execution, keep))
        await asyncio.sleep(0)
        gone, staying = (asyncio.create_task(c.serve(key, "v", execution, keep)) for _ in "ab")
        await asyncio.sleep(0)
        gone.cancel()
        await asyncio.sleep(0)
        execution.release.set()
        assert await first == {"board": None}
        assert isinstance(await staying, Entry)
        assert gone.cancelled()
        assert execution.runs == 1

    _on_one_key(scenario)


def _doubling(levels: int, leaf: str) -> str:
    fragments = "\n".join(
        f"fragment F{i} on Query {{ ...F{i + 1} ...F{i + 1} }}" for i in range(levels)
    )
    return f"query {{ ...F0 }}\n{fragments}\nfragment F{levels} on Query {{ {leaf} }}"


@pytest.mark.parametrize(("leaf", "cacheable"), [("__typename", True), ("me { id }", False)])
def test_each_fragment_is_judged_once(leaf: str, cacheable: bool) -> None:
    """Deciding runs in the event loop before the schema's limits: fragments that each spread
    the next twice (22 levels: 4 million spreads, under 1 KB) took seconds there."""
    started = time.monotonic()
    assert cache().cacheable(_doubling(22, leaf), None) is cacheable
    assert time.monotonic() - started < 0.5
