"""Recording API key uses for ``ApiKey.lastUsedAt`` without a write per request.

A busy key makes thousands of requests a minute, and operators only need to know roughly when a
key was last used (to find stale keys and revoke them). So a use is written at most once per key
per interval (:data:`API_KEY_USE_INTERVAL_SECONDS`) by each API process, and the database refuses
to rewrite a key's row younger than the interval, whichever process asks: together the
processes rewrite a key's row about once per interval. The stored time is that of a use seen by
the API, never more than one interval before the key's latest use.

Writing happens beside the request, never in it: :meth:`KeyUseRecorder.used` only decides (in
memory) and queues; one background task per process writes what is queued, in order, on one
connection at a time. A write that fails (the database down, a privilege missing) is logged and
counted (``agentworks_api_key_uses_unrecorded_total``) and not retried: the key's next use after
the interval is. The request has been answered all the same.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING
from uuid import UUID

import psycopg
import structlog

from adapters.metrics import API_KEY_USES_UNRECORDED
from projections.key_uses import KeyUse, record_key_uses

if TYPE_CHECKING:
    from psycopg import Connection
    from psycopg.rows import DictRow
    from psycopg_pool import ConnectionPool

    from adapters.tokens import Principal
    from read_api.db import Offloader

log = structlog.get_logger(__name__)

API_KEY_USE_INTERVAL_SECONDS = 60.0
"""How often a key's use is written at most: ``lastUsedAt`` is precise to this."""

_MAX_QUEUED = 10_000
"""Uses waiting to be written; more are dropped (the database is down or slow, and a key's next
use after the interval is queued again)."""
_MAX_BATCH = 500
"""Uses written in one transaction."""


class KeyUseRecorder:
    """Records, off the request path, that API keys were used (see the module docstring)."""

    def __init__(
        self,
        pool: ConnectionPool[Connection[DictRow]],
        offloader: Offloader,
        *,
        interval_seconds: float = API_KEY_USE_INTERVAL_SECONDS,
        statement_timeout_ms: int,
    ) -> None:
        self._pool = pool
        self._offloader = offloader
        self._interval = timedelta(seconds=interval_seconds)
        self._statement_timeout_ms = statement_timeout_ms
        self._due: dict[UUID, datetime] = {}
        """Per key, when its next use is worth writing."""
        self._forget_above = _MAX_QUEUED
        self._queue: asyncio.Queue[KeyUse] = asyncio.Queue(maxsize=_MAX_QUEUED)
        self._writer: asyncio.Task[None] | None = None

    def used(self, principal: Principal) -> None:
        """Note that ``principal`` (when it is an API key) was just let in; never blocks, never
        raises. Called on the event loop."""
        key_id = principal.api_key_id
        if key_id is None:
            return
        now = datetime.now(UTC)
        due = self._due.get(key_id)
        if due is not None and now < due:
            return
        try:
            self._queue.put_nowait(KeyUse(key_id, UUID(principal.workspace_id), now))
        except asyncio.QueueFull:
            API_KEY_USES_UNRECORDED.labels("dropped").inc()
            return
        self._due[key_id] = now + self._interval
        if len(self._due) > self._forget_above:
            self._forget_due_before(now)
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(
                self._write_queued(), name="api-key-uses"
            )

    async def aclose(self) -> None:
        """Stop writing (the app shuts down); uses still queued are not recorded."""
        if self._writer is not None:
            self._writer.cancel()
            await asyncio.gather(self._writer, return_exceptions=True)

    def _forget_due_before(self, now: datetime) -> None:
        """Drop keys whose next use would be written anyway: the map holds recent keys only."""
        for key_id in [key_id for key_id, due in self._due.items() if due <= now]:
            del self._due[key_id]
        # Many keys in use at once: look again only when their number has doubled, so that
        # sweeping the map costs a constant per use however many there are.
        self._forget_above = max(_MAX_QUEUED, 2 * len(self._due))

    async def _write_queued(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < _MAX_BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                stored = await self._offloader.run(self._write, batch)
            except psycopg.Error as error:
                API_KEY_USES_UNRECORDED.labels("failed").inc(len(batch))
                log.warning("api_key_uses.not_recorded", keys=len(batch), error=str(error))
                continue
            for key_id, at in stored.items():
                # Another process may have stored a use fresher than ours: the next one worth
                # writing is an interval after what is stored.
                self._due[key_id] = at + self._interval

    def _write(self, batch: list[KeyUse]) -> dict[UUID, datetime]:
        with self._pool.connection() as conn, conn.transaction():
            return record_key_uses(
                conn,
                batch,
                interval=self._interval,
                statement_timeout_ms=self._statement_timeout_ms,
            )
