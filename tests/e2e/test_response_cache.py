"""The response cache answers exactly what an uncached execution answers, under concurrent writes,
for every caller: two servers over one database, the stack's (cache on) and a twin with the cache
off, asked the same queries by owners, a viewer and a neighbouring workspace's owner while cards
are created, renamed, moved and run on.

A comparison counts when the read models' version (what the cache keys on) is the same before
the cached request and after the uncached one: both then had to read the same rows, so any
difference is a stale or misdirected answer. Reads with a write's consistency token must show
that write; a member removed mid-way must read what an uncached execution gives them (nothing).
"""

from __future__ import annotations

import dataclasses
import random
import threading
import time
from collections.abc import Iterator
from typing import Any
from uuid import UUID

import psycopg
import pytest
from api_client import ApiClient, wait_for
from e2e_stack import MakeStack, Stack, user_id
from psycopg.rows import dict_row

from commands import models as m
from commands.handlers import Actor
from projections.progress_queries import Progress, progress, scope_reading_version
from read_api.app import create_app
from read_api.broadcast import LocalBroadcaster
from read_api.response_cache import ResponseCache
from read_api.testing import RunningServer, start_in_thread

BOARD = (
    "query Board($id: ID!) { board(projectId: $id) { version lanes { name wipLimit count"
    " cards(first: 50) { edges { cursor node { id title position assignee labels cost"
    " lastRun { id status billed } runs(first: 2) { edges { node { id agent } } } } }"
    " pageInfo { hasNextPage endCursor } } } } }"
)
PROJECT = "query($id: ID!) { project(id: $id) { name archived board { version lanes { count } } } }"
CARD = "query($id: ID!) { card(id: $id) { title version lane cost lastRun { status } } }"
WORKSPACE = (
    "query($id: ID!) { workspace(id: $id) { name members { userId role } projects { id } } }"
)
LANES = ("Todo", "Doing", "Done")
WRITES = 40


@dataclasses.dataclass
class Tenant:
    workspace: str
    project: str
    cards: list[str]
    actor: Actor


def _tenant(stack: Stack, owner: str, name: str) -> Tenant:
    client, workspace = stack.owner_with_workspace(owner, name)
    project = client.create_project(workspace, f"{name} board", [{"name": n} for n in LANES])
    pid = project["project"]["id"]
    cards = [client.create_card(pid, f"{name} {i}", LANES[i % 3])["card"]["id"] for i in range(6)]
    return Tenant(workspace, pid, cards, Actor(user_id=user_id(owner), workspace_id=workspace))


@pytest.fixture
def twin(make_stack: MakeStack) -> Iterator[tuple[Stack, RunningServer]]:
    """The stack (cache on) and a second API over the same database with the cache off."""
    stack = make_stack()
    services = dataclasses.replace(
        stack.services,
        response_cache_entries=0,
        broadcaster=LocalBroadcaster(),
        redis=None,
        stats_hook=None,
    )
    uncached = start_in_thread(create_app(services))
    try:
        yield stack, uncached
    finally:
        uncached.stop()


def _version(database_url: str, workspace: str) -> str:
    with psycopg.connect(database_url, row_factory=dict_row) as conn:
        return scope_reading_version(conn, UUID(workspace), statement_timeout_ms=10_000)


def _write(stack: Stack, tenant: Tenant, rng: random.Random, i: int) -> str:
    write = stack.write
    card = UUID(rng.choice(tenant.cards))
    kind = i % 4
    if kind == 0:
        created = write.create_card(
            m.CreateCard(project_id=UUID(tenant.project), title=f"new {i}", lane=rng.choice(LANES)),
            tenant.actor,
        )
        tenant.cards.append(str(created.id))
        return created.consistency_token
    if kind == 1:
        return write.update_card(m.UpdateCard(card_id=card, title=f"renamed {i}"), tenant.actor)\
            .consistency_token  # fmt: skip
    if kind == 2:
        return write.move_card(m.MoveCard(card_id=card, to_lane=rng.choice(LANES)), tenant.actor)\
            .consistency_token  # fmt: skip
    return write.start_agent_run(m.StartAgentRun(card_id=card, agent="coder"), tenant.actor)\
        .consistency_token  # fmt: skip


def test_cached_answers_equal_uncached_ones_under_concurrent_writes(
    twin: tuple[Stack, RunningServer],
) -> None:
    stack, uncached_server = twin
    a = _tenant(stack, "ada", "A")
    b = _tenant(stack, "bo", "B")
    stack.write.add_member(
        m.AddMember(workspace_id=UUID(a.workspace), user_id=user_id("vic"), role="VIEWER"),
        a.actor,
    )
    tokens = {
        "ada": stack.token("ada", a.workspace),
        "vic": stack.token("vic", a.workspace, "VIEWER"),
        "bo": stack.token("bo", b.workspace),
    }
    cached = {name: stack.client(token) for name, token in tokens.items()}
    uncached = {name: ApiClient(uncached_server.url, token) for name, token in tokens.items()}

    def asks() -> list[tuple[str, str, dict[str, Any], str, str | None]]:
        """(caller, query, variables, workspace whose version decides the comparison, root
        field that must be null: another workspace's object)."""
        return [
            ("ada", BOARD, {"id": a.project}, a.workspace, None),
            ("ada", PROJECT, {"id": a.project}, a.workspace, None),
            ("ada", CARD, {"id": a.cards[0]}, a.workspace, None),
            ("ada", WORKSPACE, {"id": a.workspace}, a.workspace, None),
            ("vic", BOARD, {"id": a.project}, a.workspace, None),
            ("vic", CARD, {"id": a.cards[1]}, a.workspace, None),
            ("bo", BOARD, {"id": a.project}, b.workspace, "board"),
            ("bo", CARD, {"id": a.cards[0]}, b.workspace, "card"),
            ("bo", BOARD, {"id": b.project}, b.workspace, None),
        ]

    compared = 0
    failures: list[str] = []
    lock = threading.Lock()
    done = threading.Event()

    def compare_once() -> int:
        counted = 0
        for caller, query, variables, workspace, hidden in asks():
            before = _version(stack.database_url, workspace)
            mine = cached[caller].post(query, variables)
            theirs = uncached[caller].post(query, variables)
            after = _version(stack.database_url, workspace)
            if mine.status != 200 or mine.errors:
                failures.append(f"{caller}: {mine.status} {mine.body}")
            if hidden is not None and mine.data != {hidden: None}:
                failures.append(f"{caller} read another workspace's {hidden}: {mine.body}")
            if before == after:
                counted += 1
                if mine.body != theirs.body:
                    failures.append(f"{caller} {variables}: cached {mine.body} != {theirs.body}")
        return counted

    def reader() -> None:
        nonlocal compared
        while not done.is_set():
            counted = compare_once()
            with lock:
                compared += counted

    readers = [threading.Thread(target=reader, name=f"reader-{i}") for i in range(2)]
    for thread in readers:
        thread.start()
    rng = random.Random(17)
    try:
        for i in range(WRITES):
            tenant = a if i % 3 else b
            token = _write(stack, tenant, rng, i)
            # Read-your-writes through the cache: the board as the writer sees it includes the
            # write (a renamed card under its new title, every card created so far).
            answer = cached["ada" if tenant is a else "bo"].post(
                BOARD, {"id": tenant.project}, headers={"X-Consistency-Token": token}
            )
            assert not answer.stale, answer.body
            shown = {
                e["node"]["id"]: e["node"]["title"]
                for lane in answer.data["board"]["lanes"]
                for e in lane["cards"]["edges"]
            }
            assert set(shown) == set(tenant.cards)
            if i % 4 == 1:
                assert f"renamed {i}" in shown.values()
            time.sleep(rng.uniform(0, 0.05))
        stack.write.remove_member(
            m.RemoveMember(workspace_id=UUID(a.workspace), user_id=user_id("vic")), a.actor
        )
        # A last write, read with its token, so every projector has applied the removal.
        final = _write(stack, a, rng, 1)
        cached["ada"].post(CARD, {"id": a.cards[0]}, headers={"X-Consistency-Token": final})
    finally:
        done.set()
        for thread in readers:
            thread.join()
    assert failures == []

    # At rest: every caller's every query, cached (and served from the cache) == uncached.
    cache: ResponseCache = stack.server.server.config.app.state.response_cache
    hits_before = cache.hits
    for _ in range(2):
        compared += compare_once()
    assert failures == []
    assert cache.hits > hits_before
    removed = cached["vic"].post(BOARD, {"id": a.project})
    assert removed.data == {"board": None}
    # Enough comparisons happened at an unchanged version for the test to mean something.
    assert compared >= 2 * len(asks())
    for client in uncached.values():
        client.close()


def _settle(database_url: str) -> None:
    """Until every projector has applied the whole log (what was set up is all projected)."""

    def read() -> Progress:
        with psycopg.connect(database_url, row_factory=dict_row) as conn:
            return progress(conn)

    wait_for(
        read,
        timeout=30,
        until=lambda now: now.positions and min(now.positions.values()) >= now.head,
        what="every projector at the head of the log",
    )


def test_a_write_in_one_workspace_leaves_another_workspaces_answers_cached(
    make_stack: MakeStack,
) -> None:
    stack = make_stack()
    a = _tenant(stack, "ada", "A")
    b = _tenant(stack, "bo", "B")
    ada = stack.client(stack.token("ada", a.workspace))
    bo = stack.client(stack.token("bo", b.workspace))
    cache: ResponseCache = stack.server.server.config.app.state.response_cache
    _settle(stack.database_url)
    for client, tenant in ((ada, a), (bo, b)):
        client.post(BOARD, {"id": tenant.project})
        client.post(CARD, {"id": tenant.cards[0]})
    a_version = _version(stack.database_url, a.workspace)
    b_version = _version(stack.database_url, b.workspace)
    before = ada.post(BOARD, {"id": a.project}).body

    rng = random.Random(3)
    _write(stack, b, rng, 0)  # a card created in B
    token = _write(stack, b, rng, 1)  # and one renamed (kind 1 renames a random card of B)
    misses = cache.misses
    fresh = bo.post(BOARD, {"id": b.project}, headers={"X-Consistency-Token": token})
    assert cache.misses == misses + 1  # B's board: read again
    shown = {
        e["node"]["id"]: e["node"]["title"]
        for lane in fresh.data["board"]["lanes"]
        for e in lane["cards"]["edges"]
    }
    assert set(shown) == set(b.cards)
    assert "renamed 1" in shown.values()
    assert bo.post(CARD, {"id": b.cards[0]}).data["card"] is not None
    assert cache.misses == misses + 2  # B's card too: every answer of B is refreshed

    hits, misses = cache.hits, cache.misses
    assert ada.post(BOARD, {"id": a.project}).body == before
    ada.post(CARD, {"id": a.cards[0]})
    assert (cache.hits, cache.misses) == (hits + 2, misses)  # A's answers: still served
    assert _version(stack.database_url, a.workspace) == a_version
    assert _version(stack.database_url, b.workspace) != b_version
