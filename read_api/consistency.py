"""Read-your-writes: waiting until the read models include a given write.

A mutation answers with ``consistencyToken = "position:aggregate id:version"``. A read waits until
every projector that follows that kind of aggregate has applied the aggregate up to ``version``
(``projection_versions``) and has reached ``position`` (``projection_positions``). The version is
what makes the wait correct through Kafka, where a projector can pass a position before an earlier
event of another partition arrives; the position makes it cover the command's other events (a
card move also changes the board) on the embedded path, where the log is applied in order.

Waits are bounded (``consistency_wait_ms``); a read that gave up answers with what there is and
``extensions.stale = true``.

A token is the client's to forge. One naming another workspace's aggregate is treated exactly like
one naming no aggregate at all (stale at once): the waiter only ever polls tracking for an aggregate
whose first event says it belongs to the caller's workspace, so how long a read waits never depends
on another tenant's data. One naming a write that was never made (a version past the aggregate's
last, a position past the log's head) is stale at once too: no projector will ever get there, and
waiting for it would only poll the database for the whole budget, as often as its sender likes.
So is one naming a write that a projector parked (dead-lettered): it waits for an operator.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from uuid import UUID

from domain.errors import ValidationFailed
from projections import progress_queries
from projections.kanban_queries import scope_to_workspace
from projections.progress_queries import Reach
from read_api import eventlog

if TYPE_CHECKING:
    from eventsourcing.persistence import Mapper
    from psycopg import Connection
    from psycopg.rows import DictRow
    from psycopg_pool import ConnectionPool

    from projections.base import Projector
    from read_api.db import Offloader

# Short first: an embedded projector usually applies a write within a few milliseconds.
_BACKOFF = (0.001, 0.002, 0.003, 0.005, 0.008)
_MAX_SLEEP = 0.015


def _fields(parts: list[str]) -> tuple[int, UUID, int]:
    if len(parts) != 3:
        raise ValueError(":".join(parts))
    return int(parts[0]), UUID(parts[1]), int(parts[2])


@dataclass(frozen=True)
class ConsistencyToken:
    position: int
    aggregate_id: UUID
    version: int

    @classmethod
    def parse(cls, text: str) -> ConsistencyToken:
        parts = text.strip().split(":")
        try:
            position, aggregate_id, version = _fields(parts)
        except ValueError:
            raise ValidationFailed(
                f"X-Consistency-Token {text[:100]!r} is not a token a mutation returned "
                "('position:aggregate id:version')"
            ) from None
        if position < 0 or version < 0:
            raise ValidationFailed(f"X-Consistency-Token {text[:100]!r} has a negative number")
        if max(position, version) > 2**63 - 1:
            raise ValidationFailed(f"X-Consistency-Token {text[:100]!r} has too large a number")
        return cls(position, aggregate_id, version)

    def __str__(self) -> str:
        return f"{self.position}:{self.aggregate_id}:{self.version}"


@dataclass(eq=False)
class _Wait:
    """One read waiting for a write: what it waits for, and what tells it that it arrived."""

    wanted: progress_queries.Wanted
    reached: asyncio.Future[bool] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


def followers(projectors: tuple[type[Projector], ...], aggregate: str) -> list[str]:
    """Names of the projectors that follow ``aggregate`` (``"Card"``)."""
    return sorted(p.name for p in projectors if aggregate in p.aggregates)


class ConsistencyWaiter:
    """Polls projector tracking until a write is visible, within a time budget."""

    def __init__(
        self,
        *,
        pool: ConnectionPool[Connection[DictRow]],
        offloader: Offloader,
        projectors: tuple[type[Projector], ...],
        wait_ms: int,
        mapper: Mapper[UUID],
    ) -> None:
        self._pool = pool
        self._mapper = mapper
        self._offloader = offloader
        self._projectors = projectors
        self._wait_seconds = wait_ms / 1000
        self._waiting: list[_Wait] = []
        self._poller: asyncio.Task[None] | None = None
        self._joined = False

    def projectors_for(self, wanted: tuple[str, ...]) -> list[str]:
        """The deployment's projectors among ``wanted``."""
        known = {p.name for p in self._projectors}
        return [name for name in wanted if name in known]

    async def wait_for_token(self, token: ConsistencyToken, workspace_id: UUID | None) -> bool:
        """Wait for every projector following the token's aggregate; ``False`` on timeout, and at
        once when the aggregate is not one of ``workspace_id``'s (unknown, or another tenant's)
        or the log holds no such write."""
        if workspace_id is None:
            return False
        aggregate = await self._offloader.run(self._aggregate_of, token, workspace_id)
        if aggregate is None:
            return False
        names = followers(self._projectors, aggregate)
        return await self.wait_for(token, names)

    async def wait_for_creation(self, aggregate_id: UUID, workspace_id: UUID) -> bool:
        """Wait until every projector following ``aggregate_id`` applied its first event, when
        the log holds it in ``workspace_id``; ``False`` at once when it does not (an id of no
        aggregate, or another workspace's), and on timeout."""
        return await self.wait_for_token(ConsistencyToken(0, aggregate_id, 1), workspace_id)

    async def wait_for(self, token: ConsistencyToken, projectors: list[str]) -> bool:
        """Wait until each of ``projectors`` applied the token's write; ``False`` on timeout,
        and as soon as one of them parked the token's aggregate at or before the write (only an
        operator's retry moves it on: the read would wait out its budget for nothing).

        Checked once at once (a projector usually applies a write within milliseconds); then
        the read joins every other read waiting in this process, polled together in one
        round trip: each polling on its own, many reads waiting at once (a lag, or one tenant's
        tokens) put a query per read every few milliseconds on the pool and the worker threads
        that every tenant's reads use."""
        if not projectors:
            return True
        reach = await self._offloader.run(self._reach, token, projectors)
        if reach is not Reach.WAITING:
            return reach is Reach.REACHED
        wait = _Wait((projectors, token.aggregate_id, token.position, token.version))
        self._waiting.append(wait)
        self._joined = True
        if self._poller is None or self._poller.done():
            self._poller = asyncio.create_task(self._poll(), name="consistency-waits")
        try:
            async with asyncio.timeout(self._wait_seconds):
                return await wait.reached
        except TimeoutError:
            return False
        finally:
            if wait in self._waiting:
                self._waiting.remove(wait)

    async def _poll(self) -> None:
        """Poll for every waiting read until none is left, backing off as one read did."""
        attempt = 0
        while self._waiting:
            if self._joined:  # a read that just began waiting is looked at soon, as alone
                attempt, self._joined = 0, False
            await asyncio.sleep(_BACKOFF[attempt] if attempt < len(_BACKOFF) else _MAX_SLEEP)
            attempt += 1
            waits = [wait for wait in self._waiting if not wait.reached.done()]
            if not waits:
                continue
            try:
                reaches = await self._offloader.run(self._each_reach, waits)
            except Exception as error:  # noqa: BLE001 - every waiting read is answered with it
                for wait in waits:
                    if not wait.reached.done():
                        wait.reached.set_exception(error)
                continue
            for wait, reach in zip(waits, reaches, strict=True):
                if reach is not Reach.WAITING and not wait.reached.done():
                    wait.reached.set_result(reach is Reach.REACHED)

    def _reach(self, token: ConsistencyToken, projectors: list[str]) -> Reach:
        with self._pool.connection() as conn:
            return progress_queries.include(
                conn, projectors, aggregate_id=token.aggregate_id, position=token.position,
                version=token.version,
            )  # fmt: skip

    def _each_reach(self, waits: list[_Wait]) -> list[Reach]:
        with self._pool.connection() as conn:
            return progress_queries.include_each(conn, [wait.wanted for wait in waits])

    def _aggregate_of(self, token: ConsistencyToken, workspace_id: UUID) -> str | None:
        """The kind of the token's aggregate when it is ``workspace_id``'s and the log holds the
        write the token names; else ``None``."""
        with self._pool.connection() as conn:
            # Scoped like every API read: where the event store has row-level security, another
            # workspace's events are not even visible to these statements.
            scope_to_workspace(conn, workspace_id)
            aggregate = eventlog.aggregate_in_workspace(
                conn, self._mapper, aggregate_id=token.aggregate_id, workspace_id=workspace_id
            )
            if aggregate is None or not eventlog.written(
                conn, aggregate_id=token.aggregate_id, version=token.version,
                position=token.position,
            ):  # fmt: skip
                return None
            return aggregate
