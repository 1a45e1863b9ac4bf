"""A subscriber's queue is bounded in bytes as well as in messages.

By count alone (a thousand messages), a slow subscriber of a run whose chunks are large held up
to a thousand of them in the API's memory. Past its bytes, what is queued gives way to a loss
notice, and the subscription re-reads the read model, as after any loss.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import pytest

from read_api.broadcast import LocalBroadcaster, MessagesLost, RedisBroadcaster

MOST_BYTES = 10_000
PAYLOAD = {"kind": "lines", "text": "x" * 3_000}


@pytest.fixture(params=["local", "redis"])
def broadcaster(
    request: pytest.FixtureRequest, redis_url: str
) -> Callable[[], AbstractAsyncContextManager[Any]]:
    @contextlib.asynccontextmanager
    async def make() -> AsyncIterator[Any]:
        hub: LocalBroadcaster | RedisBroadcaster
        if request.param == "local":
            hub = LocalBroadcaster(queue_bytes=MOST_BYTES)
        else:
            prefix = f"t{secrets.token_hex(4)}:"
            hub = RedisBroadcaster.from_url(
                redis_url, channel_prefix=prefix, queue_bytes=MOST_BYTES
            )
        try:
            yield hub
        finally:
            await hub.aclose()

    return make


async def _slow_subscriber_gets(hub: Any, published: int) -> list[Any]:
    """What a subscriber that reads nothing until ``published`` messages were delivered then
    reads (``None`` for a loss notice). A second subscriber of the same channel, reading each as
    it comes, tells when it was delivered to both."""
    async with hub.subscribe("run:1") as slow, hub.subscribe("run:1") as fast:
        async with asyncio.timeout(10):
            for _ in range(published):
                await hub.publish("run:1", PAYLOAD)
                assert await fast.get() == PAYLOAD
            got: list[Any] = []
            while len(got) < published and None not in got:
                try:
                    got.append(await slow.get())
                except MessagesLost:
                    got.append(None)
        return got


def test_a_subscriber_past_its_bytes_is_told_of_a_loss(
    broadcaster: Callable[[], AbstractAsyncContextManager[Any]],
) -> None:
    async def scenario() -> list[Any]:
        async with broadcaster() as hub:
            return await _slow_subscriber_gets(hub, 4)  # 12 KB of text: past the bound

    assert asyncio.run(scenario()) == [None]


def test_a_subscriber_within_its_bytes_gets_every_message(
    broadcaster: Callable[[], AbstractAsyncContextManager[Any]],
) -> None:
    async def scenario() -> list[Any]:
        async with broadcaster() as hub:
            return await _slow_subscriber_gets(hub, 3)

    assert asyncio.run(scenario()) == [PAYLOAD] * 3
