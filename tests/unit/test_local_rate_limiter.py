"""The in-process rate limiter (an API without Redis) under many distinct callers."""

from __future__ import annotations

import asyncio
import time

import pytest

from domain.errors import RateLimited
from read_api import ratelimit
from read_api.ratelimit import Limit, LocalRateLimiter


def test_many_addresses_in_one_window_cost_no_scan_per_request() -> None:
    """20,000 addresses without a valid token in one minute: each request used to copy every
    counter of the window (it pruned on each request past 10,000 keys), ~16 s in all on this
    machine, every millisecond of it holding the API's event loop."""
    limiter = LocalRateLimiter()

    async def hits() -> None:
        for n in range(20_000):
            await limiter.hit([Limit(f"p:address:10.0.{n // 256}.{n % 256}", 30, "address")])

    started = time.perf_counter()
    asyncio.run(hits())
    assert time.perf_counter() - started < 3.0


@pytest.fixture
def now(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The limiter's clock, a second into a window: ``now[0] += ...`` moves it."""
    clock = [1_000_000 * ratelimit.WINDOW_SECONDS + 1.0]
    monkeypatch.setattr(ratelimit.time, "time", lambda: clock[0])
    return clock


def test_counts_of_past_windows_are_dropped_and_limits_still_hold(now: list[float]) -> None:
    limiter = LocalRateLimiter()
    limit = Limit("p:user:u", 2, "user")

    async def hit() -> None:
        await limiter.hit([limit])

    for n in range(100):
        asyncio.run(limiter.hit([Limit(f"p:address:{n}", 5, "address")]))
    asyncio.run(hit())
    asyncio.run(hit())
    with pytest.raises(RateLimited):
        asyncio.run(hit())
    now[0] += ratelimit.WINDOW_SECONDS
    asyncio.run(hit())  # a new window, a new budget
    assert len(limiter._counts) == 1  # only this window's counter is kept


@pytest.mark.parametrize(
    ("address", "counted_as"),
    [
        ("203.0.113.9", "203.0.113.9"),
        ("2001:db8:0:1::1", "2001:db8:0:1::/64"),
        ("2001:db8:0:1:ffff:ffff:ffff:ffff", "2001:db8:0:1::/64"),
        ("::ffff:203.0.113.9", "203.0.113.9"),
        (None, "unknown"),
        ("testclient", "testclient"),
    ],
)
def test_an_ipv6_client_is_counted_by_its_network(address: str | None, counted_as: str) -> None:
    assert ratelimit.client_network(address) == counted_as


def test_a_check_counts_nothing_and_refuses_once_a_limit_is_spent(now: list[float]) -> None:
    limiter = LocalRateLimiter()
    limit = Limit("p:login-address:a", 2, "address")
    for _ in range(5):
        asyncio.run(limiter.check([limit]))  # counts nothing
    asyncio.run(limiter.hit([limit]))
    asyncio.run(limiter.check([limit]))
    asyncio.run(limiter.hit([limit]))
    with pytest.raises(RateLimited):
        asyncio.run(limiter.check([limit]))
    now[0] += ratelimit.WINDOW_SECONDS
    asyncio.run(limiter.check([limit]))


def test_a_flood_of_keys_keeps_the_counters_bounded_and_a_guessers_count(now: list[float]) -> None:
    """Logins naming ever new accounts (or requests from ever new networks) each add a counter:
    the limiter keeps at most ``max_keys``, and dropping some must not reset the count of the
    account a guesser is at."""
    limiter = LocalRateLimiter(max_keys=100)
    guessed = Limit("p:login-account:target", 3, "account's logins")

    async def guesses_then_flood() -> None:
        for _ in range(3):
            await limiter.hit([guessed])
        for n in range(1_000):
            await limiter.hit([Limit(f"p:login-account:{n}", 3, "account's logins")])

    asyncio.run(guesses_then_flood())
    assert len(limiter._counts) <= 100
    with pytest.raises(RateLimited):
        asyncio.run(limiter.hit([guessed]))


def test_a_budget_is_refused_once_what_was_charged_reaches_it_and_says_what_it_counts(
    now: list[float],
) -> None:
    """Work already done is charged whole, refusing nothing; the next check weighs it."""
    limiter = LocalRateLimiter()
    budget = [Limit("p:cost:user:u", 1_000, "user", "executed fields")]
    asyncio.run(limiter.check(budget))
    asyncio.run(limiter.charge(budget, 999))
    asyncio.run(limiter.check(budget))  # one field left: the next request may still run
    asyncio.run(limiter.charge(budget, 5_000))  # charged whole, past the budget
    with pytest.raises(RateLimited, match="1,000 executed fields per minute for this user"):
        asyncio.run(limiter.check(budget))
    now[0] += ratelimit.WINDOW_SECONDS
    asyncio.run(limiter.check(budget))


def test_charging_nothing_counts_no_key() -> None:
    limiter = LocalRateLimiter()
    asyncio.run(limiter.charge([Limit("p:cost:user:u", 10, "user", "executed fields")], 0))
    assert limiter._counts == {}
