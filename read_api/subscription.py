"""The ``Subscription`` root: live board changes and run logs over graphql-transport-ws.

Broadcast messages say *that* something changed; the read model says *what*. So a subscription
checks access first (the project or run must be in the caller's workspace), subscribes, and then
reads anything it has to show from the read model in a fresh scope per event.

``agentRunLog`` subscribes before it replays: every line committed after the subscription
started arrives as a message, every line committed before it is in ``rm_log_lines``, so replay
then live has no gap; lines at or below the last sequence number sent are skipped, so there is no
duplicate either. A message that shows a gap (lost while Redis reconnected, or dropped because
the client was slow), a loss notice, a chunk announced as too large to send, or a quiet spell
makes it re-read the read model.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar, cast
from uuid import UUID

import strawberry

from domain.errors import NotFound
from projections import queries
from projections.kanban import board_channel
from projections.runs import run_channel
from read_api import fields as described
from read_api.broadcast import Feed, MessagesLost, subscribed
from read_api.consistency import ConsistencyToken
from read_api.context import Info
from read_api.types import ID, BoardEvent, Card, LogLine, parse_id, seq_after

if TYPE_CHECKING:
    from read_api.context import RequestContext
    from read_api.db import ReadScope

REPLAY_BATCH = 1000
TERMINAL = frozenset({"SUCCEEDED", "FAILED", "CANCELLED", "TIMED_OUT"})


T = TypeVar("T")


async def _visible(
    ctx: RequestContext, wanted: UUID, load: Callable[[ReadScope], Awaitable[T | None]]
) -> T | None:
    """``wanted`` as ``load`` reads it, for a member of its workspace. One the read models do
    not hold yet but the log does, in that workspace (a run the board just told of, whose own
    read model commits on its own), is waited for as a consistency token's write would be."""
    found, workspace_id = await _read(ctx, load)
    waiter = ctx.runtime.waiter
    if found is None and workspace_id and await waiter.wait_for_creation(wanted, workspace_id):
        found, _ = await _read(ctx, load)
    return found


async def _read(
    ctx: RequestContext, load: Callable[[ReadScope], Awaitable[T | None]]
) -> tuple[T | None, UUID | None]:
    """What ``load`` reads, and the workspace it read in when the caller is a member there."""
    try:
        scope = ctx.fresh_scope()
    except NotFound:
        return None, None  # no workspace to look in: a user token's object is in none of theirs
    try:
        if not await scope.is_member():
            return None, None
        return await load(scope), scope.workspace_id
    finally:
        await scope.close()


async def _listening(
    ctx: RequestContext, channel: str, events: Callable[[Feed], AsyncGenerator[T, None]]
) -> AsyncIterator[T]:
    """``events`` of a feed of ``channel``, subscribed before this returns. A channel that
    cannot be subscribed now (Redis away: ``UNAVAILABLE``) thus refuses the subscription in its
    resolver, before it starts, as a refusal of its access does, and the client gets the
    protocol's ``error`` message (read_api.transport_ws), not a ``next`` with errors then a
    ``complete`` as if it had run. The stream waits inside the subscription: closing it, or
    its being collected, lets the channel go."""
    stream = _subscribed_first(ctx, channel, events)
    await anext(stream)  # subscribed: its first item marks that, it is no event
    return cast("AsyncIterator[T]", stream)


async def _subscribed_first(
    ctx: RequestContext, channel: str, events: Callable[[Feed], AsyncGenerator[T, None]]
) -> AsyncGenerator[T | None, None]:
    async with (
        subscribed(ctx.runtime.services.broadcaster, channel) as feed,
        contextlib.aclosing(events(feed)) as items,
    ):
        yield None
        async for item in items:
            yield item


async def _board_events(ctx: RequestContext, feed: Feed) -> AsyncGenerator[BoardEvent, None]:
    while True:
        try:
            payload = await feed.get()
        except MessagesLost:
            payload = {"kind": "board.resync", "position": 0}
        await ctx.still_allowed()
        scope = ctx.fresh_scope()
        try:
            yield await _board_event(scope, payload)
        finally:
            await scope.close()


async def _board_event(scope: ReadScope, payload: dict[str, Any]) -> BoardEvent:
    card_id = _uuid_or_none(payload.get("cardId"))
    run_id = _uuid_or_none(payload.get("runId"))
    card = None
    if card_id is not None:
        row = await scope.loaders.card.load(card_id)
        card = None if row is None else Card.from_row(row, scope)
    return BoardEvent(
        kind=str(payload.get("kind", "board.updated")),
        card_id=None if card_id is None else ID(str(card_id)),
        card=card,
        run_id=None if run_id is None else ID(str(run_id)),
        position=str(payload.get("position", "")),
        consistency_token=_token_of(payload),
    )


def _token_of(payload: dict[str, Any]) -> str | None:
    """The consistency token of the write a board message tells of; ``None`` for a message
    that names none (a resync)."""
    aggregate_id = _uuid_or_none(payload.get("aggregateId"))
    position, version = payload.get("position"), payload.get("version")
    if aggregate_id is None or not isinstance(position, int) or not isinstance(version, int):
        return None
    return str(ConsistencyToken(position, aggregate_id, version))


def _uuid_or_none(value: object) -> UUID | None:
    if value is None:
        return None
    try:
        return UUID(str(value))
    except ValueError:
        return None


async def _stored_lines(
    ctx: RequestContext, run_id: UUID, after_seq: int
) -> tuple[list[LogLine], bool]:
    """Up to a batch of stored lines after ``after_seq``, and whether the run had ended.

    The status is read before the lines: a run's lines are all projected before its terminal
    status, so when the status says it ended, the lines read next are complete.
    """
    scope = ctx.fresh_scope()
    try:
        run = await scope.loaders.run.load(run_id)
        if run is None:
            return [], True
        lines = await scope.run(
            lambda conn: queries.run_logs(conn, run_id, after_seq=after_seq, first=REPLAY_BATCH)
        )
    finally:
        await scope.close()
    return [
        LogLine(run_id=ID(str(x.run_id)), seq=x.seq, at=x.at, stream=x.stream, text=x.text)
        for x in lines
    ], run.status in TERMINAL


def _live_lines(run_id: UUID, payload: dict[str, Any]) -> list[LogLine]:
    lines = []
    for line in payload.get("lines") or ():
        at = line["at"]
        lines.append(
            LogLine(
                run_id=ID(str(run_id)),
                seq=int(line["seq"]),
                at=datetime.fromisoformat(at) if isinstance(at, str) else at,
                stream=str(line["stream"]),
                text=str(line["text"]),
            )
        )
    return lines


async def _run_log(
    ctx: RequestContext, run_id: UUID, after_seq: int, feed: Feed
) -> AsyncGenerator[LogLine, None]:
    last = after_seq
    recheck = ctx.runtime.services.subscription_recheck_seconds
    catch_up = True
    while True:
        if catch_up:
            while True:
                await ctx.still_allowed()
                lines, ended = await _stored_lines(ctx, run_id, last)
                for line in lines:
                    yield line
                    last = line.seq
                if len(lines) < REPLAY_BATCH:
                    break
            if ended:
                return
            catch_up = False
        try:
            # Not ``asyncio.wait_for``: on Python 3.11 it drops a cancellation (the client
            # went away) that comes as a message arrives, and this loop would go on for good.
            async with asyncio.timeout(recheck):
                payload = await feed.get()
        except (TimeoutError, MessagesLost):
            catch_up = True
            continue
        kind = payload.get("kind")
        if kind == "status":
            catch_up = payload.get("status") in TERMINAL
            continue
        if kind == "lines_stored":  # a chunk too large to send: read from the read model
            stored = payload.get("lastSeq")
            catch_up = not isinstance(stored, int) or stored > last
            continue
        if kind != "lines":
            continue
        lines = _live_lines(run_id, payload)
        await ctx.still_allowed()  # live lines come from the broadcast, read by no scope
        if lines and lines[0].seq > last + 1:
            catch_up = True  # something between what we sent and this chunk went missing
            continue
        for line in lines:
            if line.seq > last:
                yield line
                last = line.seq


@strawberry.type
class Subscription:
    @described.subscription(
        "Cards created, moved, updated or archived and run status changes on a "
        "board. kind 'board.resync' means events were missed: re-read the board."
    )
    async def board_changed(self, info: Info, project_id: ID) -> AsyncIterator[BoardEvent]:
        wanted = parse_id(project_id, "projectId")
        ctx = await info.context.for_object(wanted)
        if await _visible(ctx, wanted, lambda scope: scope.loaders.project.load(wanted)) is None:
            raise NotFound(f"project {wanted} does not exist")
        return await _listening(ctx, board_channel(wanted), lambda feed: _board_events(ctx, feed))

    @described.subscription(
        "A run's log lines after afterSeq: the stored ones, then live ones as they "
        "are written, without gap or duplicate; completes when the run has ended."
    )
    async def agent_run_log(
        self, info: Info, run_id: ID, after_seq: int | None = None
    ) -> AsyncIterator[LogLine]:
        wanted = parse_id(run_id, "runId")
        ctx = await info.context.for_object(wanted)
        after = seq_after(after_seq)
        if await _visible(ctx, wanted, lambda scope: scope.loaders.run.load(wanted)) is None:
            raise NotFound(f"agent run {wanted} does not exist")
        return await _listening(
            ctx, run_channel(wanted), lambda feed: _run_log(ctx, wanted, after, feed)
        )
