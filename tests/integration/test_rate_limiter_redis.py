"""The Redis rate limiter says an outage of Redis once, and once that it is back, whichever of
its calls meets it."""

from __future__ import annotations

import asyncio

import redis.asyncio
import structlog
from dedicated_postgres import free_port

from adapters.outages import OUTAGES, REDIS
from read_api.ratelimit import Limit, RedisRateLimiter


def test_a_check_that_reaches_redis_again_says_it_is_up(redis_url: str) -> None:
    """An API that only checks limits (failed sign-ins counted elsewhere) after an outage never
    said ``dependency.up``: only :meth:`hit` reported a success."""
    limits = [Limit("test:up-after-check:address:10.0.0.1", 5, "address")]

    async def check_away_then_back() -> None:
        away = redis.asyncio.Redis(port=free_port(), socket_connect_timeout=1)
        back = redis.asyncio.Redis.from_url(redis_url)
        try:
            await RedisRateLimiter(away).check(limits)
            assert OUTAGES.is_down(REDIS)
            await RedisRateLimiter(back).check(limits)
        finally:
            await away.aclose()
            await back.aclose()

    try:
        with structlog.testing.capture_logs() as logs:
            asyncio.run(check_away_then_back())
    finally:
        OUTAGES.up(REDIS)  # whatever happened, later tests start with Redis up

    events = [(entry["event"], entry.get("dependency")) for entry in logs]
    assert events == [("dependency.down", REDIS), ("dependency.up", REDIS)]
