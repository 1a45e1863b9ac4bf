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


def test_a_subscriber_cancelled_at_any_point_of_subscribing_ends_and_leaves_no_subscription(
    redis_url: str,
) -> None:
    """A dropped client's subscription is cancelled wherever it is: queued, while the SUBSCRIBE
    is written, while Redis confirms, or just after. Each moment must end the subscriber (a
    cancellation lost on the way would leave it waiting on its feed for good) and unsubscribe."""
    prefix = f"aw-test:{secrets.token_hex(6)}:"
    # At least 40 moments, and on until subscribers get as far as their feed: how many turns
    # Redis takes to confirm depends on how busy the machine is.
    moments: list[int] = []

    async def cancel_at_every_moment() -> None:
        hub = RedisBroadcaster.from_url(redis_url, channel_prefix=prefix)
        entered: list[int] = []

        async def subscriber(moment: int) -> None:
            async with hub.subscribe(f"board:{moment}"):
                entered.append(moment)
                await asyncio.Event().wait()

        try:
            moment = -1
            while moment < 40 or (len(entered) < 3 and moment < 5_000):
                moment += 1
                moments.append(moment)
                task = asyncio.create_task(subscriber(moment))
                for _ in range(moment):
                    await asyncio.sleep(0)  # one turn of the event loop
                task.cancel()
                done, _ = await asyncio.wait({task}, timeout=5)
                assert done, f"cancelled after {moment} turns, the subscriber went on"
                assert task.cancelled()
            assert entered, "no subscriber got as far as its feed: the moments are too early"
            await asyncio.sleep(0.3)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and any(
                _subscribers(redis_url, f"{prefix}board:{m}") for m in moments
            ):
                await asyncio.sleep(0.05)
            left = [m for m in moments if _subscribers(redis_url, f"{prefix}board:{m}")]
            assert left == []
        finally:
            await hub.aclose()

    asyncio.run(cancel_at_every_moment())
