"""The Redis rate limiter says an outage of Redis once, and once that it is back, whichever of
its calls meets it."""

from __future__ import annotations

import asyncio
from uuid import uuid4

import pytest
import redis.asyncio
import structlog
from dedicated_postgres import free_port

from adapters.outages import OUTAGES, REDIS
from domain.errors import RateLimited
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


def test_a_budget_charged_in_redis_is_weighed_by_every_instance(redis_url: str) -> None:
    """Two API instances on one Redis: what one charged, the other's check refuses."""
    budget = [Limit(f"test:cost:{uuid4()}:user:u", 1_000, "user", "executed fields")]

    async def charge_here_check_there() -> None:
        here = redis.asyncio.Redis.from_url(redis_url)
        there = redis.asyncio.Redis.from_url(redis_url)
        try:
            await RedisRateLimiter(there).check(budget)
            await RedisRateLimiter(here).charge(budget, 600)
            await RedisRateLimiter(there).check(budget)
            await RedisRateLimiter(here).charge(budget, 600)
            with pytest.raises(RateLimited, match="1,000 executed fields per minute"):
                await RedisRateLimiter(there).check(budget)
            (key,) = await here.keys(f"{budget[0].key}:*")
            assert 0 < await here.ttl(key) <= 65  # it expires with its window
        finally:
            await here.aclose()
            await there.aclose()

    asyncio.run(charge_here_check_there())
