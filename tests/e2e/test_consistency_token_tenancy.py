"""An ``X-Consistency-Token`` naming another workspace's write tells nothing about it: the read
answers exactly as for a token naming no write at all."""

from __future__ import annotations

import asyncio
import time
from typing import Any
from uuid import UUID, uuid4

from e2e_stack import MakeStack, Stack
from in_process_api import CountingOffloader
from pg import log_head

from read_api.consistency import ConsistencyToken, ConsistencyWaiter

WORKSPACE = "query($id: ID!) { workspace(id: $id) { id name } }"
CARD = "query($id: ID!) { card(id: $id) { id title } }"


def _foreign_write(stack: Stack) -> ConsistencyToken:
    """A write in bob's workspace, already in the read models."""
    bob, ws = stack.owner_with_workspace(str(uuid4()), "Bob's")
    pid = bob.create_project(ws, "P", [{"name": "Todo"}])["project"]["id"]
    card = bob.create_card(pid, "secret")
    assert card["card"]["title"] == "secret"
    return ConsistencyToken.parse(card["consistencyToken"])


def _tokens(applied: ConsistencyToken) -> dict[str, ConsistencyToken]:
    far = ConsistencyToken(applied.position + 1000, applied.aggregate_id, applied.version + 1000)
    return {
        "foreign, applied": applied,
        "foreign, not yet": far,
        "unknown, applied": ConsistencyToken(applied.position, uuid4(), applied.version),
        "unknown, not yet": ConsistencyToken(far.position, uuid4(), far.version),
    }


def test_a_foreign_token_answers_like_an_unknown_one(make_stack: MakeStack) -> None:
    stack = make_stack(consistency_wait_ms=1500)
    applied = _foreign_write(stack)
    alice, ws = stack.owner_with_workspace(str(uuid4()), "Alice's")
    queries = {"own workspace": (WORKSPACE, {"id": ws}),
               "bob's card": (CARD, {"id": str(applied.aggregate_id)})}  # fmt: skip

    answers: dict[str, dict[str, tuple[int, Any, bool, list[str]]]] = {q: {} for q in queries}
    took: dict[str, float] = {}
    for name, token in _tokens(applied).items():
        started = time.perf_counter()
        for label, (query, variables) in queries.items():
            answer = alice.post(query, variables, headers={"X-Consistency-Token": str(token)})
            answers[label][name] = (answer.status, answer.data, answer.stale, answer.codes)
        took[name] = time.perf_counter() - started
    print("seconds per token kind:", {k: round(v, 3) for k, v in took.items()})

    expected = {
        "own workspace": (200, {"workspace": {"id": ws, "name": "Alice's"}}, True, []),
        "bob's card": (200, {"card": None}, True, []),
    }
    for label, by_token in answers.items():
        assert list(by_token.values()) == [expected[label]] * len(by_token), answers


def test_a_foreign_token_never_polls_the_foreign_aggregates_tracking(stack: Stack) -> None:
    """Structural: whatever bob's aggregate's state, alice's wait does the same work as for an
    id that does not exist (one look-up, no polling); an own token does poll."""
    applied = _foreign_write(stack)
    _, alice_ws = stack.owner_with_workspace(str(uuid4()), "Alice's")
    offloader = CountingOffloader()

    def waiter(*extra: Any) -> ConsistencyWaiter:
        return ConsistencyWaiter(
            pool=stack.services.pool,
            offloader=offloader,
            projectors=(*stack.services.projectors, *extra),
            wait_ms=300,
            mapper=stack.write.mapper,
        )

    async def calls(
        token: ConsistencyToken, workspace: UUID, waiting: ConsistencyWaiter
    ) -> tuple[bool, int]:
        offloader.calls = 0
        caught_up = await waiting.wait_for_token(token, workspace)
        return caught_up, offloader.calls

    try:
        seen = {
            name: asyncio.run(calls(token, UUID(alice_ws), waiter()))
            for name, token in _tokens(applied).items()
        }
        bobs = asyncio.run(calls(applied, _workspace_of(stack, applied), waiter()))
        # A projector following cards that never runs: bob's wait polls it until the timeout.
        bobs_behind = asyncio.run(
            calls(applied, _workspace_of(stack, applied), waiter(_IdleCardProjector))
        )
    finally:
        offloader.shutdown()
    assert set(seen.values()) == {(False, 1)}, seen
    assert bobs == (True, 2)
    assert bobs_behind[0] is False
    assert bobs_behind[1] > 2


class _IdleCardProjector:
    """A projector of cards that never applies anything."""

    name = "idle-cards"
    aggregates = ("Card",)


def _workspace_of(stack: Stack, token: ConsistencyToken) -> UUID:
    workspace = stack.write.repository.get(token.aggregate_id).workspace_id
    assert isinstance(workspace, UUID)
    return workspace


def test_a_token_naming_an_aggregate_whose_first_event_cannot_be_read_answers_stale(
    stack: Stack,
) -> None:
    """The waiter learns a token's aggregate kind from its first event; one that could not be
    decoded made every read carrying such a token answer HTTP 500 (a client's header)."""
    alice, ws = stack.owner_with_workspace(str(uuid4()), "Broken")
    pid = alice.create_project(ws, "P", [{"name": "Todo"}])["project"]["id"]
    card = alice.create_card(pid, "fine")["card"]["id"]
    (first,) = stack.write.recorder.select_events(UUID(card), limit=1)
    broken = uuid4()
    module, _, qualname = first.topic.partition(":")
    stack.write.recorder.insert_events(
        [type(first)(originator_id=broken, originator_version=1,
                     topic=f"{module}:{qualname}Retired", state=first.state)]
    )  # fmt: skip
    written = log_head(stack.database_url)
    token = f"{written}:{broken}:1"
    answer = alice.post(WORKSPACE, {"id": ws}, headers={"X-Consistency-Token": token})
    assert answer.status == 200, answer.body
    assert answer.data == {"workspace": {"id": ws, "name": "Broken"}}
    assert answer.stale  # no write can be waited for on it


def test_reads_waiting_at_once_share_their_polls(stack: Stack) -> None:
    """Each waiting read polled the projectors' tracking on its own, up to every 15 ms for the
    whole wait: a tenant holding many reads waiting (within its rate limit, with tokens that
    cannot be reached soon, as one naming the log's head can be through Kafka) had the API
    query the database thousands of times a second, on the pool and the worker threads every
    tenant's reads use. Reads waiting at once now share one poll; each still makes its own
    look-up and its own first check."""
    applied = _foreign_write(stack)
    workspace = _workspace_of(stack, applied)
    offloader = CountingOffloader()
    waiter = ConsistencyWaiter(
        pool=stack.services.pool,
        offloader=offloader,
        projectors=(*stack.services.projectors, _IdleCardProjector),
        wait_ms=300,
        mapper=stack.write.mapper,
    )
    reads = 30

    async def waiting() -> list[bool]:
        return list(
            await asyncio.gather(*(waiter.wait_for_token(applied, workspace) for _ in range(reads)))
        )

    try:
        caught_up = asyncio.run(waiting())
        together = offloader.calls
        offloader.calls = 0
        assert asyncio.run(waiter.wait_for_token(applied, workspace)) is False
        alone = offloader.calls
    finally:
        offloader.shutdown()
    assert caught_up == [False] * reads
    assert alone > 4  # a read alone polls all along its wait
    # Each read's look-up and first check, and about one read's polls (not one per read).
    assert together <= 2 * reads + 2 * alone, (together, alone)
