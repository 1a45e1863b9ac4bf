"""The in-process parts of the API stacks of the e2e and outage tests: the hub subscriptions hear
changes through, the API server, and the fan-out that runs beside it."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import redis.asyncio

from adapters.eventlog import EventLog
from projections.registry import ALL_PROJECTORS
from projections.runner import ProjectionRunner
from read_api.app import create_app
from read_api.broadcast import DEFAULT_CHANNEL_PREFIX, LocalBroadcaster, RedisBroadcaster
from read_api.db import Offloader
from read_api.services import ApiServices, JwtVerification
from read_api.testing import start_in_thread
from streams.embedded import EmbeddedFanout

if TYPE_CHECKING:
    from psycopg import Connection
    from psycopg.rows import DictRow
    from psycopg_pool import ConnectionPool

    from commands.handlers import AgentWorks
    from read_api.broadcast import Broadcaster
    from read_api.testing import RunningServer

P = ParamSpec("P")
T = TypeVar("T")


class CountingOffloader(Offloader):
    """Counts the blocking calls a consistency wait makes (each one a round trip to the
    database)."""

    def __init__(self) -> None:
        super().__init__(2)
        self.calls = 0

    async def run(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        self.calls += 1
        return await super().run(fn, *args, **kwargs)


def broadcasting(
    redis_url: str | None, *, channel_prefix: str = DEFAULT_CHANNEL_PREFIX
) -> tuple[Broadcaster, redis.asyncio.Redis | None]:
    """The hub and the Redis client of an API: both on Redis at ``redis_url`` (channels under
    ``channel_prefix``), or, without one, a hub in this process and no client."""
    if redis_url is None:
        return LocalBroadcaster(), None
    hub = RedisBroadcaster.from_url(redis_url, channel_prefix=channel_prefix)
    # The timeouts of the API's own client (infra.stack): a Redis gone silent fails a call.
    return hub, redis.asyncio.Redis.from_url(
        redis_url, socket_timeout=1.0, socket_connect_timeout=1.0
    )


def serve_api(
    write: AgentWorks,
    pool: ConnectionPool[Connection[DictRow]],
    *,
    secret: str,
    hub: Broadcaster,
    redis_client: redis.asyncio.Redis | None,
    **options: Any,
) -> tuple[ApiServices, RunningServer]:
    """The API on ``write`` and ``pool``, verifying tokens signed with ``secret`` (``options``:
    the other ``ApiServices`` fields), served in a thread."""
    services = ApiServices(
        write=write,
        pool=pool,
        jwt=JwtVerification(secret=secret),
        broadcaster=hub,
        redis=redis_client,
        **options,
    )
    return services, start_in_thread(create_app(services))


def start_embedded_fanout(
    write: AgentWorks,
    projector_pool: ConnectionPool[Connection[DictRow]],
    database_url: str,
    hub: Broadcaster,
) -> EmbeddedFanout:
    """Every projector applying ``write``'s log through ``projector_pool`` and publishing its
    changes to ``hub``, woken by the log's notifications on ``database_url``; started."""
    log = EventLog(write.recorder, write.mapper)  # type: ignore[arg-type]
    runners = [
        ProjectionRunner(projector(), projector_pool, log, on_commit=hub.publish_changes)
        for projector in ALL_PROJECTORS
    ]
    fanout = EmbeddedFanout(log, runners, listen_url=database_url, poll_interval=0.2)
    fanout.start()
    return fanout
