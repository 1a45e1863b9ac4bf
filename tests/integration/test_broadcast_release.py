"""A Redis broadcaster gives back the Redis subscription of a subscriber that never got going."""

from __future__ import annotations

import asyncio
import secrets
import time

import pytest
import redis

from read_api.broadcast import RedisBroadcaster


def _subscribers(redis_url: str, channel: str) -> int:
    client = redis.Redis.from_url(redis_url)
    try:
        return int(dict(client.pubsub_numsub(channel))[channel.encode()])
    finally:
        client.close()


def test_a_subscribe_that_fails_before_redis_confirms_leaves_no_redis_subscription(
    redis_url: str,
) -> None:
    prefix = f"aw-test:{secrets.token_hex(6)}:"
    channel = "board:dropped"

    async def subscribe_unconfirmed() -> None:
        # No time at all to confirm: the SUBSCRIBE goes out, the wait for Redis's answer fails.
        hub = RedisBroadcaster.from_url(redis_url, channel_prefix=prefix, confirm_timeout=0)
        try:
            with pytest.raises(TimeoutError):
                async with hub.subscribe(channel):
                    pass
            # Let Redis take both commands of the hub's connection before looking from another.
            await asyncio.sleep(0.3)
            deadline = time.monotonic() + 5
            while _subscribers(redis_url, prefix + channel) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert _subscribers(redis_url, prefix + channel) == 0
        finally:
            await hub.aclose()

    asyncio.run(subscribe_unconfirmed())
