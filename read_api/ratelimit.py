"""Request rate limits per user and per workspace, in fixed one-minute windows.

Besides requests, what their GraphQL operations executed is counted against a budget per user
and per workspace (:func:`cost_limits_for`): within the per-request bounds one request may still
execute up to ``QueryLimits.max_executed`` fields, about a second of the event loop, and at the
request rate allowed one tenant's client could hold every process's loop and every other
tenant's requests waiting. A request is refused once its user's or workspace's budget of the
minute is spent (:meth:`RateLimiter.check`), and charged what it executed when it ends
(:meth:`RateLimiter.charge`): it may overrun by what one request executes.

With Redis every API instance shares the counters (one Lua script per request: ``INCR`` and
``EXPIRE`` per limit); without it each process counts for itself. While Redis cannot be reached
each process counts for itself too (:class:`LocalRateLimiter`, bounded in size), every limit,
until Redis answers again: letting requests through gave a password guesser unlimited tries
during an outage, and refusing all traffic because a counter store is down would turn a
degraded dependency into an outage. A process's own count never exceeds the shared count it
stands in for, so the fallback refuses nothing Redis would have let through (with several API
instances a client may get up to that many times a limit while Redis is away). Once Redis
failed, requests go on without asking it until it is tried again (``RetryGate``), so a Redis
that does not answer at all costs a request a timeout now and then, not every request.
"""

from __future__ import annotations

import heapq
import ipaddress
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Protocol

import structlog
from redis.exceptions import RedisError

from adapters.outages import OUTAGES, REDIS, RetryGate
from domain.errors import RateLimited

if TYPE_CHECKING:
    import redis.asyncio

    from read_api.services import RateLimits

log = structlog.get_logger(__name__)

WINDOW_SECONDS = 60


@dataclass(frozen=True)
class Limit:
    key: str
    allowed: int
    what: str
    counts: str = "requests"
    """What the limit counts, as its refusal says it (``"requests"``, ``"executed fields"``)."""


class RateLimiter(Protocol):
    async def hit(self, limits: list[Limit]) -> None:
        """Count one request against each limit; raise :class:`RateLimited` when one is spent."""
        ...

    async def check(self, limits: list[Limit]) -> None:
        """Raise :class:`RateLimited` when a limit has nothing left in this window (the next
        :meth:`hit` would be refused); count nothing. For a limit that counts only failures,
        checked before the work that could fail."""
        ...

    async def charge(self, limits: list[Limit], amount: int) -> None:
        """Count ``amount`` against each limit, refusing nothing: work already done (what an
        operation executed), which the next :meth:`check` weighs."""
        ...


def limits_for(config: RateLimits, *, user_id: str, workspace_id: str | None) -> list[Limit]:
    """The request limits of ``user_id`` (and of ``workspace_id``)."""
    return _of_user_and_workspace(
        config.key_prefix, (config.per_user_per_minute, config.per_workspace_per_minute),
        user_id=user_id, workspace_id=workspace_id, counts="requests",
    )  # fmt: skip


def cost_limits_for(config: RateLimits, *, user_id: str, workspace_id: str | None) -> list[Limit]:
    """The budgets of executed fields a minute of ``user_id`` (and of ``workspace_id``)."""
    return _of_user_and_workspace(
        f"{config.key_prefix}:cost",
        (config.cost_per_user_per_minute, config.cost_per_workspace_per_minute),
        user_id=user_id, workspace_id=workspace_id, counts="executed fields",
    )  # fmt: skip


def _of_user_and_workspace(
    prefix: str,
    allowed: tuple[int | None, int | None],
    *,
    user_id: str,
    workspace_id: str | None,
    counts: str,
) -> list[Limit]:
    per_user, per_workspace = allowed
    limits = []
    if per_user is not None:
        limits.append(Limit(f"{prefix}:user:{user_id}", per_user, "user", counts))
    if per_workspace is not None and workspace_id is not None:
        limits.append(
            Limit(f"{prefix}:workspace:{workspace_id}", per_workspace, "workspace", counts)
        )
    return limits


def client_network(address: str | None) -> str:
    """What a limit per client address counts: an IPv4 address, or the /64 network of an IPv6
    one. A provider gives an IPv6 client a whole /64 (2^64 addresses): counted per address,
    each request could come from a fresh one, with a fresh budget."""
    if not address:
        return "unknown"
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address  # not an IP address (a test client's name, a Unix socket)
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def address_limits(config: RateLimits, address: str | None) -> list[Limit]:
    """The limit of requests from ``address`` (its network, for IPv6) that failed
    authentication."""
    if config.per_address_per_minute is None:
        return []
    return [
        Limit(
            f"{config.key_prefix}:address:{client_network(address)}",
            config.per_address_per_minute,
            "address without a valid token",
        )
    ]


def _window(now: float) -> tuple[int, float]:
    window = int(now // WINDOW_SECONDS)
    return window, (window + 1) * WINDOW_SECONDS - now


def _refuse(limit: Limit, retry_after: float) -> RateLimited:
    return RateLimited(
        f"rate limit of {limit.allowed:,} {limit.counts} per minute for this {limit.what} "
        f"reached; retry in {max(1, round(retry_after))}s",
        retry_after_seconds=max(1.0, retry_after),
    )


# Counts one request against each limit in turn and stops at the first one spent, so a request
# refused for its user does not also use up its workspace's budget. Returns the 1-based index of
# the refusing limit, or 0.
_HIT_SCRIPT = """
for i, key in ipairs(KEYS) do
  local count = redis.call('INCR', key)
  if count == 1 then redis.call('EXPIRE', key, ARGV[1]) end
  if count > tonumber(ARGV[i + 1]) then return i end
end
return 0
"""

# Adds ARGV[2] to every key, refusing nothing.
_CHARGE_SCRIPT = """
for _, key in ipairs(KEYS) do
  if redis.call('INCRBY', key, ARGV[2]) == tonumber(ARGV[2]) then
    redis.call('EXPIRE', key, ARGV[1])
  end
end
return 0
"""


class RedisRateLimiter:
    """Shared fixed-window counters in Redis, counted atomically by one Lua script; counted in
    this process while Redis is away."""

    def __init__(self, client: redis.asyncio.Redis, *, gate: RetryGate | None = None) -> None:
        self._client = client
        self._script = client.register_script(_HIT_SCRIPT)
        self._charge_script = client.register_script(_CHARGE_SCRIPT)
        self._gate = gate or RetryGate(first=0.25, longest=1.0)
        self._fallback = LocalRateLimiter()

    async def hit(self, limits: list[Limit]) -> None:
        await self._counted(limits, self._hit_shared, self._fallback.hit)

    async def check(self, limits: list[Limit]) -> None:
        await self._counted(limits, self._check_shared, self._fallback.check)

    async def charge(self, limits: list[Limit], amount: int) -> None:
        if amount > 0:
            await self._counted(
                limits,
                partial(self._charge_shared, amount=amount),
                partial(self._fallback.charge, amount=amount),
            )

    async def _counted(
        self,
        limits: list[Limit],
        shared: Callable[[list[Limit], int], Awaitable[Limit | None]],
        local: Callable[[list[Limit]], Awaitable[None]],
    ) -> None:
        """``shared`` (the limit it found spent, if any) against Redis; ``local``, in this
        process, while Redis is away: degraded, not down. A failure is said once (adapters.
        outages), not at every request, and an answer says the outage is over, from a process
        that only checks too."""
        if not limits:
            return
        if self._gate.may_try():
            window, remaining = _window(time.time())
            try:
                spent = await shared(limits, window)
            except (RedisError, OSError) as error:
                self._unreached(error)
            else:
                self._reached()
                if spent is not None:
                    raise _refuse(spent, remaining)
                return
        await local(limits)

    async def _hit_shared(self, limits: list[Limit], window: int) -> Limit | None:
        keys = [f"{limit.key}:{window}" for limit in limits]
        args = [WINDOW_SECONDS + 5, *(limit.allowed for limit in limits)]
        refused = int(await self._script(keys=keys, args=args))
        return limits[refused - 1] if refused else None

    async def _charge_shared(self, limits: list[Limit], window: int, *, amount: int) -> None:
        keys = [f"{limit.key}:{window}" for limit in limits]
        await self._charge_script(keys=keys, args=[WINDOW_SECONDS + 5, amount])

    async def _check_shared(self, limits: list[Limit], window: int) -> Limit | None:
        counts = await self._client.mget([f"{limit.key}:{window}" for limit in limits])
        for limit, count in zip(limits, counts, strict=True):
            if count is not None and int(count) >= limit.allowed:
                return limit
        return None

    def _unreached(self, error: BaseException) -> None:
        self._gate.failed(error)
        OUTAGES.down(REDIS, error)

    def _reached(self) -> None:
        self._gate.succeeded()
        OUTAGES.up(REDIS)


MAX_LOCAL_KEYS = 50_000
"""How many counters one process keeps (a few MB): a flood of keys (accounts named by logins,
client networks) must not grow its memory without bound."""


class LocalRateLimiter:
    """Per-process fixed-window counters: a single API process without Redis, or any while
    Redis is away.

    At most ``max_keys`` counters: once full, the less counted half is dropped (a dropped key
    starts again from nothing), so keys near their limits, those of a guesser, stay counted
    however many other keys a flood brings."""

    def __init__(self, *, max_keys: int = MAX_LOCAL_KEYS) -> None:
        self._counts: dict[tuple[str, int], int] = {}
        self._lock = threading.Lock()
        self._max_keys = max_keys
        self._window = -1
        """The window :attr:`_counts` was last pruned for."""

    async def hit(self, limits: list[Limit]) -> None:
        window, remaining = _window(time.time())
        refused = self._add(limits, 1, window, refuse=True)
        if refused is not None:
            raise _refuse(refused, remaining)

    async def charge(self, limits: list[Limit], amount: int) -> None:
        if amount > 0:
            self._add(limits, amount, _window(time.time())[0], refuse=False)

    def _add(self, limits: list[Limit], amount: int, window: int, *, refuse: bool) -> Limit | None:
        """Count ``amount`` against each limit in turn; with ``refuse``, stop at (and return)
        the first one it takes past what is allowed."""
        if not limits:
            return None
        with self._lock:
            if window != self._window:
                # Once per window, not per request: with many keys in the current window
                # (addresses without a valid token) a scan per request held the event loop
                # for milliseconds each, growing with every new address.
                self._counts = {k: v for k, v in self._counts.items() if k[1] >= window}
                self._window = window
            for limit in limits:
                key = (limit.key, window)
                before = self._counts.get(key, 0)
                if before == 0 and len(self._counts) >= self._max_keys:
                    self._drop_least_counted()
                self._counts[key] = before + amount
                if refuse and before + amount > limit.allowed:
                    return limit
        return None

    def _drop_least_counted(self) -> None:
        """Keep the more counted half (once per ``max_keys / 2`` new keys at most)."""
        kept = heapq.nlargest(self._max_keys // 2, self._counts.items(), key=lambda kv: kv[1])
        self._counts = dict(kept)

    async def check(self, limits: list[Limit]) -> None:
        window, remaining = _window(time.time())
        with self._lock:
            spent = [x for x in limits if self._counts.get((x.key, window), 0) >= x.allowed]
        if spent:
            raise _refuse(spent[0], remaining)
