"""Redis stops answering (hung, or its network partitioned) under the API: requests go on
without it rather than each waiting for it.

A stopped Redis refuses connections at once; a silent one takes every command and answers
nothing, so each request that asks it waits out the client's socket timeout. Rate limits are
counted in process while Redis is away (README, "When a dependency goes away"); that must not
cost every request a wait for a Redis already known to be away.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING
from uuid import uuid4

import pytest
import redis
import redis.asyncio
from outage_helpers import start_api_stack
from redis_proxy import SilentServer, proxy_to

from adapters.budget_holds import RedisBudgetHolds
from adapters.outages import OUTAGES, REDIS
from adapters.spend_counter import RedisSpend
from domain.budget_holds import HoldRequest, SpendReading
from domain.errors import Unavailable
from projections.base import Change
from read_api.broadcast import Feed, MessagesLost, RedisBroadcaster, RedisChangePublisher

if TYPE_CHECKING:
    from collections.abc import Callable, Collection, Iterator
    from uuid import UUID

pytestmark = pytest.mark.slow

BOARD = "query($p: ID!) { board(projectId: $p) { lanes { name } } }"


@pytest.fixture
def silent() -> Iterator[SilentServer]:
    server = SilentServer()
    try:
        yield server
    finally:
        server.close()
        OUTAGES.up(REDIS)  # the process's outage state: later tests start with Redis up


def test_requests_while_redis_is_silent_do_not_each_wait_for_it(
    database_url: str, silent: SilentServer
) -> None:
    stack = start_api_stack(database_url, redis_url=silent.url, fanout=False)
    try:
        token, (project_id,) = stack.boards(1)  # the first requests find Redis silent
        asked_before = silent.connections
        answers = [stack.post(token, BOARD, {"p": project_id}) for _ in range(10)]
        asked = silent.connections - asked_before
    finally:
        stack.close()

    assert [answer.status_code for answer in answers] == [200] * 10
    # Each request that asked waited for a timeout (and dropped its connection); while Redis
    # is known away only a request now and then asks it again.
    assert asked <= 2, f"{asked} of 10 requests waited on a silent Redis"


def _publish(url: str, times: int) -> None:
    """Projector commits: each publishes its changes on the projector's thread."""
    publisher = RedisChangePublisher.from_url(url)
    try:
        for n in range(times):
            publisher.publish_changes([Change(channel="board:p", payload={"n": n})])
    finally:
        publisher.close()


def _hold(url: str, times: int) -> None:
    """An orchestrator's calls: each asks for a budget hold before it starts (and holds in
    process when the shared store is unavailable)."""

    async def calls() -> None:
        holds = RedisBudgetHolds(redis.asyncio.Redis.from_url(url))
        try:
            for _ in range(times):
                request = HoldRequest(
                    workspace_id=uuid4(), month="2026-12", hold_id=uuid4(), want=10,
                    floor=1, spent=0, limit=1_000, run_room=None,
                )  # fmt: skip
                with pytest.raises(Unavailable):
                    await holds.hold(request, ttl=60)
        finally:
            await holds.aclose()

    asyncio.run(calls())


class _ReadModelSpend:
    """The read model's usage, as a spend reader falls back to it (a fake of ours)."""

    def read(self, workspace_id: UUID, month: str, pending: Collection[UUID] = ()) -> SpendReading:
        return SpendReading(7)

    def close(self) -> None:
        pass


def _read_spend(url: str, times: int) -> None:
    """Spend checks: every startAgentRun, and an orchestrator before each provider call."""
    reader = RedisSpend(
        redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0),
        _ReadModelSpend(),
    )
    try:
        for _ in range(times):
            assert reader.read(uuid4(), "2026-12").spent == 7
    finally:
        reader.close()


@pytest.mark.parametrize(
    "calls",
    [_publish, _hold, _read_spend],
    ids=["projector commits", "budget holds", "spend checks"],
)
def test_calls_that_go_on_without_redis_do_not_each_wait_on_a_silent_one(
    silent: SilentServer, calls: Callable[[str, int], None]
) -> None:
    """A projector publishes after each commit (each wait held back the next batch of every
    tenant's read model); an orchestrator asks for a hold before each provider call (each wait
    held the call, and another on its settle)."""
    calls(silent.url, 5)
    assert silent.connections <= 1, f"{silent.connections} of 5 calls waited on a silent Redis"


@pytest.fixture
def proxy(redis_url: str) -> Iterator[SilentServer]:
    with proxy_to(redis_url) as server:
        yield server


def test_subscribers_are_told_when_redis_goes_silent_under_them_and_hear_it_again_after(
    redis_url: str, proxy: SilentServer
) -> None:
    """A pub/sub connection whose Redis went silent (a partition, a host gone after a failover)
    only ever saw idle reads: its subscribers were never told that messages were being lost,
    and never heard another one once Redis was reachable again. The reader pings after an idle
    spell; no answer, and the connection is given up, its subscribers told, and another one
    made (here through the proxy, once it carries again)."""
    direct = redis.Redis.from_url(redis_url)
    prefix = f"test-silent-{uuid4().hex}:"

    async def heard(feed: Feed) -> dict[str, object]:
        """The next message, publishing until one arrives; the losses met on the way skipped."""
        async with asyncio.timeout(30):  # a deadline, not a measure: it hangs otherwise
            while True:
                direct.publish(f"{prefix}board:p", '{"n": 1}')
                with contextlib.suppress(MessagesLost, TimeoutError):
                    async with asyncio.timeout(0.2):
                        return await feed.get()

    async def drained(feed: Feed) -> None:
        """Read until a loss is signalled (what was published before the cut is skipped)."""
        while True:
            await feed.get()

    async def partitioned_then_healed() -> int:
        hub = RedisBroadcaster.from_url(
            proxy.url, channel_prefix=prefix, read_timeout=0.05, ping_after=0.2, pong_within=0.2
        )
        try:
            async with hub.subscribe("board:p") as feed:
                assert await heard(feed) == {"n": 1}
                proxy.silence()
                async with asyncio.timeout(30):
                    with pytest.raises(MessagesLost):
                        await drained(feed)
                connections_silent = proxy.connections
                proxy.resume()
                assert await heard(feed) == {"n": 1}
                return proxy.connections - connections_silent
        finally:
            await hub.aclose()

    with direct:
        reconnected = asyncio.run(partitioned_then_healed())
    assert reconnected >= 1  # what it heard came on a new connection
