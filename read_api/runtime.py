"""What one running app holds besides the services: worker threads, waits, rate limits."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from read_api.consistency import ConsistencyWaiter
from read_api.db import Offloader
from read_api.key_uses import KeyUseRecorder
from read_api.ratelimit import LocalRateLimiter, RateLimiter, RedisRateLimiter
from read_api.services import ApiServices
from read_api.subscription_limits import SubscriptionSlots


@dataclass
class ApiRuntime:
    services: ApiServices
    offloader: Offloader
    waiter: ConsistencyWaiter
    limiter: RateLimiter
    subscriptions: SubscriptionSlots
    subscription_reads: asyncio.Semaphore
    """Reads of subscriptions at once: half the API pool, the other half stays for queries."""
    key_uses: KeyUseRecorder
    """Writes API keys' last uses (``ApiKey.lastUsedAt``) beside the requests."""

    @classmethod
    def build(cls, services: ApiServices) -> ApiRuntime:
        offloader = Offloader(services.db_threads)
        limiter: RateLimiter = (
            RedisRateLimiter(services.redis) if services.redis is not None else LocalRateLimiter()
        )
        return cls(
            services=services,
            offloader=offloader,
            waiter=ConsistencyWaiter(
                pool=services.pool,
                offloader=offloader,
                projectors=services.projectors,
                wait_ms=services.consistency_wait_ms,
                mapper=services.write.mapper,
            ),
            limiter=limiter,
            subscriptions=SubscriptionSlots(
                per_connection=services.max_subscriptions_per_connection,
                per_user=services.max_subscriptions_per_user,
            ),
            subscription_reads=asyncio.Semaphore(max(1, services.pool.max_size // 2)),
            key_uses=KeyUseRecorder(
                services.pool,
                offloader,
                interval_seconds=services.api_key_use_interval_seconds,
                statement_timeout_ms=services.statement_timeout_ms,
            ),
        )
