"""Budget holds in Redis, shared by every orchestrator that points at the same Redis.

One hash per workspace-month (``agentworks:holds:<workspace>:<month>``); each field is a hold
(named by the id its call's charge will have), valued ``<micro-USD>:<lapses at, ms since the
epoch>``. A settled hold (its charge written) has a marker beside it, ``settled:<hold>``, valued
``0:<lapses at>``: a field that a script of the version before markers reads as a hold of
nothing, so orchestrators of both versions can share one Redis while one replaces the other.
The decision runs inside Redis as one Lua script, so deciding and recording are atomic across
processes: two orchestrators can never both take the same room. The script mirrors
``domain.budget_holds.decide_hold`` exactly; a test holds the two equal.

The month's usage is the larger of the request's reading and the spend counter beside the holds
(``adapters.spend_counter``), read in the same script: the billing projector raises that counter
and drops the holds of the charges it counted in one step of its own, so at any instant each
charge is in the counter or in a hold, never in neither. A settled hold that lapses before its
charge is counted leaves the charge in the write model's usage, which the request carries: the
month counts as spent at least that much, less the settled holds still kept.

Expired fields (a dead orchestrator's holds) are dropped by the next decision on that month.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from redis.exceptions import RedisError

from adapters.outages import OUTAGES, REDIS, RetryGate
from adapters.spend_counter import SETTLED, counter_key, holds_key
from domain.budget_holds import Hold, HoldRequest
from domain.errors import Unavailable

if TYPE_CHECKING:
    from uuid import UUID

    import redis.asyncio

#: KEYS[1] the month's holds, KEYS[2] its spend counter. ARGV: hold, want, floor, spent,
#: limit (-1: none), run_room ("none" or an integer that may be negative), now ms, ttl ms,
#: written (the write model's usage; absent from a caller of the version before it: 0).
#: Returns {granted or -1, room or "none"}.
_HOLD = """
local key = KEYS[1]
local run = ARGV[1]
local want = tonumber(ARGV[2])
local floor = tonumber(ARGV[3])
local spent = tonumber(ARGV[4])
local limit = tonumber(ARGV[5])
local run_room = ARGV[6]
local now = tonumber(ARGV[7])
local ttl = tonumber(ARGV[8])
local written = tonumber(ARGV[9] or '0')
local prefix = '@SETTLED@'
-- Lua writes a number with 14 significant digits ("1e+14"): amounts go out as %.0f, exact
-- for every integer a double holds exactly.
local function text(n) return string.format('%.0f', n) end
local counted = tonumber(redis.call('GET', KEYS[2]) or '0')
if counted > spent then spent = counted end
local elsewhere = 0
local latest = now + ttl
local held = {}
local markers = {}
local fields = redis.call('HGETALL', key)
for i = 1, #fields, 2 do
  local sep = string.find(fields[i + 1], ':', 1, true)
  local amount = tonumber(string.sub(fields[i + 1], 1, sep - 1))
  local lapses = tonumber(string.sub(fields[i + 1], sep + 1))
  if lapses <= now then
    redis.call('HDEL', key, fields[i])
  else
    if lapses > latest then latest = lapses end
    if string.sub(fields[i], 1, #prefix) == prefix then
      markers[string.sub(fields[i], #prefix + 1)] = fields[i]
    elseif fields[i] ~= run then
      elsewhere = elsewhere + amount
      held[fields[i]] = amount
    end
  end
end
local settled = 0
for hold, marker in pairs(markers) do
  if held[hold] ~= nil then
    settled = settled + held[hold]
  elseif hold ~= run then
    redis.call('HDEL', key, marker)
  end
end
if written - settled > spent then spent = written - settled end
local room = nil
if limit >= 0 then room = limit - spent - elsewhere end
if run_room ~= 'none' then
  local r = tonumber(run_room)
  if room == nil or r < room then room = r end
end
if room == nil then
  redis.call('HDEL', key, prefix .. run)
  redis.call('HSET', key, run, text(want) .. ':' .. text(now + ttl))
  redis.call('PEXPIREAT', key, latest)
  return {want, 'none'}
end
if floor > room then return {-1, text(room)} end
local granted = want
if room < granted then granted = room end
-- A hold asked for again is a call's, not yet settled (as in-process holds replace it).
redis.call('HDEL', key, prefix .. run)
redis.call('HSET', key, run, text(granted) .. ':' .. text(now + ttl))
redis.call('PEXPIREAT', key, latest)
return {granted, text(room)}
""".replace("@SETTLED@", SETTLED)

#: KEYS[1] the month's holds. ARGV: hold, billed, now ms, ttl ms. A hold the projector already
#: dropped (its charge counted) is not brought back.
_SETTLE = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
local lapses = tonumber(ARGV[3]) + tonumber(ARGV[4])
local at = string.format('%.0f', lapses)
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ':' .. at, '@SETTLED@' .. ARGV[1], '0:' .. at)
local pttl = redis.call('PTTL', KEYS[1])
if pttl >= 0 and tonumber(ARGV[3]) + pttl < lapses then
  redis.call('PEXPIREAT', KEYS[1], lapses)
end
return 1
""".replace("@SETTLED@", SETTLED)


class RedisBudgetHolds:
    """Holds kept in Redis (see the module docstring). Amounts stay integers end to end: Lua
    numbers are doubles, exact for integers below 2**53 micro-USD (about 9 billion USD)."""

    def __init__(self, client: redis.asyncio.Redis, *, gate: RetryGate | None = None) -> None:
        self._client = client
        self._hold = client.register_script(_HOLD)
        self._settle = client.register_script(_SETTLE)
        self._gate = gate or RetryGate(first=0.25, longest=1.0)
        """Once Redis timed out, calls hold in process without asking it until one tries it
        again: each call that asks a Redis that does not answer waits a socket timeout."""

    async def hold(self, request: HoldRequest, *, ttl: float) -> Hold:
        async with self._reaching():
            return await self._hold_in_redis(request, ttl=ttl)

    async def _hold_in_redis(self, request: HoldRequest, *, ttl: float) -> Hold:
        now_ms = int(await self._now_ms())
        answer = await self._hold(
            keys=[
                holds_key(request.workspace_id, request.month),
                counter_key(request.workspace_id, request.month),
            ],
            args=[
                str(request.hold_id),
                request.want,
                request.floor,
                request.spent,
                -1 if request.limit is None else request.limit,
                "none" if request.run_room is None else request.run_room,
                now_ms,
                max(1, int(ttl * 1000)),
                request.written,
            ],
        )
        granted, room = int(answer[0]), _text(answer[1])
        return Hold(
            granted=None if granted < 0 else granted,
            room=None if room == "none" else int(room),
        )

    async def settle(
        self, workspace_id: UUID, month: str, hold_id: UUID, *, billed: int, ttl: float
    ) -> None:
        async with self._reaching():
            await self._settle(
                keys=[holds_key(workspace_id, month)],
                args=[str(hold_id), billed, await self._now_ms(), max(1, int(ttl * 1000))],
            )

    async def release(self, workspace_id: UUID, month: str, hold_id: UUID) -> None:
        async with self._reaching():
            await self._client.hdel(
                holds_key(workspace_id, month), str(hold_id), f"{SETTLED}{hold_id}"
            )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _now_ms(self) -> int:
        """Redis's own clock, so holds lapse on one clock whichever host decided them."""
        seconds, micros = await self._client.time()
        return int(seconds) * 1000 + int(micros) // 1000

    @asynccontextmanager
    async def _reaching(self) -> AsyncIterator[None]:
        """A request to Redis: one that could not reach it is reported to outages (logged once
        per outage, ``agentworks_dependency_up``) and raised as :class:`Unavailable`, as is one
        not sent while Redis is known not to answer; one that did says Redis is back."""
        if not self._gate.may_try():
            raise Unavailable("the budget holds' Redis does not answer")
        try:
            yield
        except (RedisError, OSError) as error:
            self._gate.failed(error)
            OUTAGES.down(REDIS, error)
            raise Unavailable(f"the budget holds' Redis cannot be reached: {error}") from error
        self._gate.succeeded()
        OUTAGES.up(REDIS)


def _text(value: bytes | str | int) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
