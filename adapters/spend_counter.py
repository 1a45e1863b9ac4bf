"""The spend counter in Redis: each workspace-month's usage, fed by the billing projector.

``agentworks:spend:<workspace>:<month>`` holds the month's usage in billed micro-USD (charges
only: credits and refunds do not give a spend limit room back, as on the write side), the
value the billing projector just committed to ``rm_monthly_spend.charged_micros``. It is written
as an absolute value by one Lua script that keeps the larger of the stored and the new value:
usage only grows within a month, so a redelivered, late or rebuilt total changes nothing and a
flushed counter heals at the next write (or the next read, which seeds it from the read model).
The same script drops the budget holds (``adapters.budget_holds``) of the charges the total
counts, and their settled markers, so a check never counts a charge twice nor misses one that
left its hold.

Redis is an accelerator here, the read model the truth: a feed that fails is logged, counted
(``agentworks_spend_counter_failures_total``) and kept to be written with the next one, and the
projector goes on; a read that fails reads the read model.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING

import structlog
from redis.exceptions import RedisError

from adapters.metrics import SPEND_COUNTER_FAILURES
from adapters.outages import OUTAGES, REDIS, RetryGate
from domain.budget_holds import CountedSpend, SpendReader, SpendReading

if TYPE_CHECKING:
    from uuid import UUID

    import redis

log = structlog.get_logger(__name__)

#: A counter outlives its month long enough for late usage and statements; one left alone
#: that long is seeded from the read model when next read.
COUNTER_TTL_MS = 62 * 24 * 3600 * 1000

#: Charge ids kept from failed feeds per workspace-month, at most: past it the oldest are
#: forgotten (their holds lapse on their own; the totals themselves are never dropped).
MAX_PENDING_CHARGES = 100_000

#: The prefix of the field beside a settled hold (``adapters.budget_holds``) that marks it so.
SETTLED = "settled:"

#: KEYS[1] the counter; KEYS[2..] holds hashes. ARGV: total, ttl ms, then for each holds hash
#: how many charge ids follow and the ids. Returns the counter's value after.
_FEED = """
local stored = redis.call('GET', KEYS[1])
local total = tonumber(ARGV[1])
if stored == false or tonumber(stored) < total then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  stored = ARGV[1]
else
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
local i = 3
for k = 2, #KEYS do
  local n = tonumber(ARGV[i])
  i = i + 1
  for j = 1, n do
    redis.call('HDEL', KEYS[k], ARGV[i], '@SETTLED@' .. ARGV[i])
    i = i + 1
  end
end
return stored
""".replace("@SETTLED@", SETTLED)


def counter_key(workspace_id: UUID, month: str) -> str:
    return f"agentworks:spend:{workspace_id}:{month}"


def holds_key(workspace_id: UUID, month: str) -> str:
    return f"agentworks:holds:{workspace_id}:{month}"


def _feed_call(total: CountedSpend) -> tuple[list[str], list[str | int]]:
    by_month: dict[str, list[str]] = {}
    for hold_month, charge_id in total.charges:
        by_month.setdefault(hold_month, []).append(str(charge_id))
    keys = [counter_key(total.workspace_id, total.month)]
    args: list[str | int] = [total.charged_micros, COUNTER_TTL_MS]
    for hold_month, ids in sorted(by_month.items()):
        keys.append(holds_key(total.workspace_id, hold_month))
        args += [len(ids), *ids]
    return keys, args


class RedisSpendCounter:
    """The billing projector's side: writes what each commit made true (after the commit, from
    the runner's thread). Never raises on Redis: the projector must not stall on its
    accelerator. After a failure it waits ``retry_after`` seconds (doubling, up to
    ``max_retry_after``) before trying Redis again, so a dead Redis costs one timeout now and
    then, not one per batch."""

    def __init__(
        self, client: redis.Redis, *, retry_after: float = 0.5, max_retry_after: float = 15.0
    ) -> None:
        self._client = client
        self._script = client.register_script(_FEED)
        self._pending: dict[tuple[UUID, str], CountedSpend] = {}
        self._retry_after = retry_after
        self._max_retry_after = max_retry_after
        self._backoff = retry_after
        self._next_try = 0.0

    @property
    def pending(self) -> int:
        """Workspace-months whose latest totals wait for Redis to come back."""
        return len(self._pending)

    def feed(self, totals: Sequence[CountedSpend]) -> None:
        for total in totals:
            self._merge(total)
        if not self._pending or time.monotonic() < self._next_try:
            return
        batch = list(self._pending.values())
        try:
            pipe = self._client.pipeline(transaction=False)
            for total in batch:
                keys, args = _feed_call(total)
                self._script(keys=keys, args=args, client=pipe)
            pipe.execute()
        except RedisError as error:
            SPEND_COUNTER_FAILURES.labels("feed").inc()
            OUTAGES.down(REDIS, error)
            log.warning("spend_counter.feed_failed", error=str(error), workspace_months=len(batch))
            self._next_try = time.monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, self._max_retry_after)
            return
        OUTAGES.up(REDIS)
        self._backoff = self._retry_after
        self._next_try = 0.0
        for total in batch:
            key = (total.workspace_id, total.month)
            if self._pending.get(key) is total:
                del self._pending[key]

    def _merge(self, total: CountedSpend) -> None:
        key = (total.workspace_id, total.month)
        earlier = self._pending.pop(key, None)
        if earlier is not None:
            total = CountedSpend(
                total.workspace_id,
                total.month,
                max(total.charged_micros, earlier.charged_micros),
                (earlier.charges + total.charges)[-MAX_PENDING_CHARGES:],
            )
        self._pending[key] = total

    def close(self) -> None:
        self._client.close()


class RedisSpend:
    """Spend checks' side: the counter when it is there; on a missing key the read model's
    usage (``fallback``), which also seeds the counter through the same max-keeping script; on
    a Redis failure the read model alone. Which ``pending`` charges are counted only the read
    model knows (the counter's own holds are dropped in Redis), so it is asked when there are
    any: holds an orchestrator kept in-process while Redis was away."""

    def __init__(
        self, client: redis.Redis, fallback: SpendReader, *, gate: RetryGate | None = None
    ) -> None:
        self._client = client
        self._fallback = fallback
        self._script = client.register_script(_FEED)
        self._gate = gate or RetryGate(first=0.25, longest=1.0)
        """Once Redis timed out, checks read the read model without asking it until one tries
        it again: each check that asks a Redis that does not answer waits a socket timeout."""

    def read(self, workspace_id: UUID, month: str, pending: Collection[UUID] = ()) -> SpendReading:
        if not self._gate.may_try():
            return self._fallback.read(workspace_id, month, pending)
        try:
            stored = self._client.get(counter_key(workspace_id, month))
        except RedisError as error:
            self._gate.failed(error)
            return self._fall_back(workspace_id, month, pending, error)
        self._gate.succeeded()
        if stored is not None:
            OUTAGES.up(REDIS)
            if not pending:
                return SpendReading(int(stored))
            # Holds kept in-process while Redis was away: only the read model can say which
            # charges it counts, and its usage is then the one that counts them.
            reading = self._fallback.read(workspace_id, month, pending)
            return SpendReading(max(int(stored), reading.spent), reading.counted)
        reading = self._fallback.read(workspace_id, month, pending)
        try:
            keys, args = _feed_call(CountedSpend(workspace_id, month, reading.spent))
            seeded = self._script(keys=keys, args=args)
        except RedisError as error:
            self._gate.failed(error)
            SPEND_COUNTER_FAILURES.labels("read").inc()
            OUTAGES.down(REDIS, error)
            return reading
        return SpendReading(max(int(seeded), reading.spent), reading.counted)

    def _fall_back(
        self, workspace_id: UUID, month: str, pending: Collection[UUID], error: RedisError
    ) -> SpendReading:
        SPEND_COUNTER_FAILURES.labels("read").inc()
        OUTAGES.down(REDIS, error)
        return self._fallback.read(workspace_id, month, pending)

    def close(self) -> None:
        self._client.close()
