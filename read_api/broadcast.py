"""Live updates for GraphQL subscriptions: projectors publish after commit, subscribers listen.

Two implementations of one :class:`Broadcaster` interface:

* :class:`LocalBroadcaster` — in process, for the embedded mode: projector threads publish, each
  subscriber's asyncio loop receives (``loop.call_soon_threadsafe``).
* :class:`RedisBroadcaster` — Redis pub/sub, so any API instance serves any subscriber; one pub/sub
  connection per API process carries every channel its subscribers listen to.

Messages are hints, not the record: a subscriber that falls behind, or loses messages while Redis
reconnects, is told so (:class:`MessagesLost`) and re-reads the read model, which holds
everything a message could have said. Publishing never fails a projector's batch.

:meth:`Broadcaster.publish_changes` is the projection runner's ``on_commit`` callback; a process
that runs projectors without serving the API publishes with :class:`RedisChangePublisher`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import redis
import redis.asyncio
import structlog
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from adapters.outages import OUTAGES, REDIS, RetryGate
from domain.errors import Unavailable

if TYPE_CHECKING:
    from contextlib import AbstractAsyncContextManager

    from projections.base import Change

log = structlog.get_logger(__name__)

Payload = dict[str, Any]

DEFAULT_QUEUE_SIZE = 1000
DEFAULT_QUEUE_BYTES = 4 * 1024 * 1024
"""What one subscriber's queue may hold, as the messages' JSON: bounded by count alone, a slow
subscriber of a run whose chunks were large (up to 64 KiB of text live) held up to a thousand of
them in the API's memory."""
DEFAULT_CHANNEL_PREFIX = "agentworks:"
READ_SECONDS = 1.0
"""How long one read of the pub/sub connection waits for a message."""
PING_AFTER_SECONDS = 5.0
"""How long the pub/sub connection may stay quiet before its reader sends a PING."""
PONG_WITHIN_SECONDS = 2.0
"""How long the reader waits for Redis to say anything after its PING before it gives the
connection up (a partition, a host gone: nothing refused, nothing answered)."""


class MessagesLost(Exception):
    """Some messages for this feed were dropped (slow consumer or a broken connection).

    Not an :class:`~domain.errors.AgentWorksError`: no caller ever sees it. Subscriptions turn
    it into a resync (the board) or a catch-up read (run logs) of the read model.
    """


class Feed:
    """One subscriber's queue of messages on one channel, read in its own asyncio loop."""

    def __init__(self, channel: str, *, maxsize: int, max_bytes: int) -> None:
        """A feed read in the running loop."""
        self.channel = channel
        self.loop = asyncio.get_running_loop()
        self._max_bytes = max_bytes
        self._bytes = 0
        # ``None`` in the queue marks the place where messages were dropped.
        self._queue: asyncio.Queue[tuple[Payload, int] | None] = asyncio.Queue(maxsize)

    async def get(self) -> Payload:
        """The next message; raises :class:`MessagesLost` where messages were dropped."""
        queued = await self._queue.get()
        if queued is None:
            raise MessagesLost(self.channel)
        payload, size = queued
        self._bytes -= size
        return payload

    def deliver(self, payload: Payload, size: int) -> None:
        """Queue ``payload`` (``size`` bytes as JSON); must run in :attr:`loop`."""
        if self._bytes + size > self._max_bytes:
            self.mark_lost()
            return
        try:
            self._queue.put_nowait((payload, size))
        except asyncio.QueueFull:
            self.mark_lost()
            return
        self._bytes += size

    def mark_lost(self) -> None:
        """Replace what is queued by a loss marker; must run in :attr:`loop`.

        The reader re-reads the read model on the marker, which covers every dropped message.
        """
        while not self._queue.empty():
            self._queue.get_nowait()
        self._bytes = 0
        self._queue.put_nowait(None)


class Broadcaster(Protocol):
    """Channels of JSON-able payloads (``"board:<projectId>"``, ``"run:<runId>"``)."""

    def subscribe(self, channel: str) -> AbstractAsyncContextManager[Feed]:
        """A feed of ``channel``; messages published after the ``async with`` is entered arrive."""
        ...

    async def publish(self, channel: str, payload: Payload) -> None: ...

    def publish_changes(self, changes: Sequence[Change]) -> None:
        """Publish projector changes; synchronous and thread-safe (a runner's ``on_commit``)."""
        ...

    async def aclose(self) -> None: ...


@dataclass(kw_only=True, eq=False)
class LocalBroadcaster:
    """In-process channels: publish from any thread, receive in each subscriber's loop."""

    queue_size: int = DEFAULT_QUEUE_SIZE
    queue_bytes: int = DEFAULT_QUEUE_BYTES
    _feeds: dict[str, set[Feed]] = field(init=False, default_factory=dict, repr=False)
    _lock: threading.Lock = field(init=False, default_factory=threading.Lock, repr=False)

    @contextlib.asynccontextmanager
    async def subscribe(self, channel: str) -> AsyncIterator[Feed]:
        feed = Feed(channel, maxsize=self.queue_size, max_bytes=self.queue_bytes)
        with self._lock:
            self._feeds.setdefault(channel, set()).add(feed)
        try:
            yield feed
        finally:
            with self._lock:
                feeds = self._feeds.get(channel)
                if feeds is not None:
                    feeds.discard(feed)
                    if not feeds:
                        del self._feeds[channel]

    def publish_sync(self, channel: str, payload: Payload) -> None:
        with self._lock:
            feeds = list(self._feeds.get(channel, ()))
        if not feeds:
            return
        size = len(encode_payload(payload))
        for feed in feeds:
            try:
                feed.loop.call_soon_threadsafe(feed.deliver, payload, size)
            except RuntimeError:
                # The subscriber's loop is closed: it is going away.
                continue

    async def publish(self, channel: str, payload: Payload) -> None:
        self.publish_sync(channel, payload)

    def publish_changes(self, changes: Sequence[Change]) -> None:
        for change in changes:
            self.publish_sync(change.channel, change.payload)

    async def aclose(self) -> None:
        with self._lock:
            self._feeds.clear()


@contextlib.asynccontextmanager
async def subscribed(broadcaster: Broadcaster, channel: str) -> AsyncIterator[Feed]:
    """``broadcaster.subscribe(channel)`` for a subscriber: a channel that cannot be subscribed
    now (Redis refused the SUBSCRIBE, or never confirmed it) is :class:`Unavailable`, which the
    client is told as such with when to come back, not an internal error of ours."""
    entered = False
    try:
        async with broadcaster.subscribe(channel) as feed:
            entered = True
            yield feed
    except (RedisError, OSError, TimeoutError) as error:
        if entered:  # the subscriber's own failure, not the subscribing's
            raise
        OUTAGES.down(REDIS, error)
        raise Unavailable(
            "live updates are unavailable: Redis cannot be reached; retry shortly"
        ) from error


def encode_payload(payload: Mapping[str, Any]) -> str:
    return json.dumps(payload, separators=(",", ":"), default=str)


@dataclass(eq=False)
class RedisChangePublisher:
    """Publishes projector changes to Redis from a synchronous thread (workers, fan-out).

    It runs on the projector's thread after each commit, so a Redis that does not answer
    holds the next batch up for the client's socket timeout: once publishing failed, commits
    publish nothing until one tries again (``gate``), a second or so later."""

    client: redis.Redis
    _: KW_ONLY
    channel_prefix: str = DEFAULT_CHANNEL_PREFIX
    gate: RetryGate = field(default_factory=lambda: RetryGate(first=0.25, longest=1.0))

    @classmethod
    def from_url(
        cls, url: str, *, channel_prefix: str = DEFAULT_CHANNEL_PREFIX
    ) -> RedisChangePublisher:
        client = redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
        return cls(client, channel_prefix=channel_prefix)

    def publish_changes(self, changes: Sequence[Change]) -> None:
        if not changes or not self.gate.may_try():
            return
        try:
            pipe = self.client.pipeline(transaction=False)
            for change in changes:
                pipe.publish(self.channel_prefix + change.channel, encode_payload(change.payload))
            pipe.execute()
        except RedisError as error:
            # Subscribers re-read the read model after a quiet spell; a lost hint costs latency,
            # while raising would make the runner re-apply a batch it already committed.
            self.gate.failed(error)
            OUTAGES.down(REDIS, error)
            log.debug("broadcast.publish_failed", error=str(error), changes=len(changes))
            return
        self.gate.succeeded()
        OUTAGES.up(REDIS)

    def close(self) -> None:
        self.client.close()


@dataclass(eq=False)
class RedisBroadcaster:
    """Redis pub/sub channels shared by every API instance.

    One pub/sub connection per process, read by one task, fans messages out to local feeds.
    Subscribing waits for Redis to confirm, so a message published after :meth:`subscribe`
    returns is never missed — which lets a subscriber subscribe first and then read history.

    Which channels have feeds is decided synchronously, and the SUBSCRIBE and UNSUBSCRIBE that
    follow are sent by one task of the broadcaster's own, in that order. Subscribers never send
    them: redis-py writes a command under ``asyncio.wait_for`` (its socket timeout), which on
    Python 3.11 drops a cancellation that arrives as the write completes. A subscriber whose
    client vanished would then carry on, holding its feed and the channel subscribed for good;
    and a subscriber cancelled mid-command could leave its command to race the next one's.
    """

    client: redis.asyncio.Redis
    _: KW_ONLY
    publisher: RedisChangePublisher | None = None
    channel_prefix: str = DEFAULT_CHANNEL_PREFIX
    queue_size: int = DEFAULT_QUEUE_SIZE
    queue_bytes: int = DEFAULT_QUEUE_BYTES
    confirm_timeout: float = 5.0
    read_timeout: float = READ_SECONDS
    ping_after: float = PING_AFTER_SECONDS
    pong_within: float = PONG_WITHIN_SECONDS
    _feeds: dict[str, set[Feed]] = field(init=False, default_factory=dict, repr=False)
    _confirmations: dict[str, asyncio.Future[None]] = field(
        init=False, default_factory=dict, repr=False
    )
    """Redis channel → done once Redis confirmed the SUBSCRIBE of its current feeds."""
    _pubsub: redis.asyncio.client.PubSub | None = field(init=False, default=None, repr=False)
    _reader: asyncio.Task[None] | None = field(init=False, default=None, repr=False)
    _commands: asyncio.Queue[tuple[str, str]] | None = field(init=False, default=None, repr=False)
    _sender: asyncio.Task[None] | None = field(init=False, default=None, repr=False)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        channel_prefix: str = DEFAULT_CHANNEL_PREFIX,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        queue_bytes: int = DEFAULT_QUEUE_BYTES,
        confirm_timeout: float = 5.0,
        read_timeout: float = READ_SECONDS,
        ping_after: float = PING_AFTER_SECONDS,
        pong_within: float = PONG_WITHIN_SECONDS,
    ) -> RedisBroadcaster:
        """A broadcaster with its own clients: async for subscribers, sync for publishing."""
        return cls(
            # Bounded like every other Redis client's: a reconnect to a silent Redis (its
            # handshake) or a PING sent to one must fail, not hold the reader for good.
            redis.asyncio.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0),
            publisher=RedisChangePublisher.from_url(url, channel_prefix=channel_prefix),
            channel_prefix=channel_prefix,
            queue_size=queue_size,
            queue_bytes=queue_bytes,
            confirm_timeout=confirm_timeout,
            read_timeout=read_timeout,
            ping_after=ping_after,
            pong_within=pong_within,
        )

    @contextlib.asynccontextmanager
    async def subscribe(self, channel: str) -> AsyncIterator[Feed]:
        feed = Feed(channel, maxsize=self.queue_size, max_bytes=self.queue_bytes)
        confirmed = self._add(channel, feed)
        try:
            # Shielded: the confirmation is shared with the channel's other feeds.
            async with asyncio.timeout(self.confirm_timeout):
                await asyncio.shield(confirmed)
            yield feed
        finally:
            # Synchronous: however this subscriber ends, nothing can interrupt its removal.
            self._remove(channel, feed)

    async def publish(self, channel: str, payload: Payload) -> None:
        await self.client.publish(self.channel_prefix + channel, encode_payload(payload))

    def publish_changes(self, changes: Sequence[Change]) -> None:
        if self.publisher is None:
            raise RuntimeError("this RedisBroadcaster was built without a synchronous publisher")
        self.publisher.publish_changes(changes)

    async def aclose(self) -> None:
        for task in (self._sender, self._reader):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._sender = self._reader = None
        self._commands = None
        if self._pubsub is not None:
            with contextlib.suppress(RedisError, OSError):
                await self._pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]
            self._pubsub = None
        self._feeds.clear()
        self._confirmations.clear()
        with contextlib.suppress(RedisError, OSError):
            await self.client.aclose()
        if self.publisher is not None:
            self.publisher.close()

    # -- the shared connection ------------------------------------------------------------------

    def _add(self, channel: str, feed: Feed) -> asyncio.Future[None]:
        """Add ``feed``; returns what tells when Redis has confirmed its channel."""
        key = self.channel_prefix + channel
        feeds = self._feeds.get(channel)
        if feeds:
            feeds.add(feed)
            return self._confirmations[key]
        self._feeds[channel] = {feed}
        confirmed = self._confirmations[key] = asyncio.get_running_loop().create_future()
        self._send("subscribe", key)
        return confirmed

    def _remove(self, channel: str, feed: Feed) -> None:
        feeds = self._feeds.get(channel)
        if feeds is None:
            return
        feeds.discard(feed)
        if feeds:
            return
        del self._feeds[channel]
        key = self.channel_prefix + channel
        self._confirmations.pop(key, None)
        # Sent after the channel's SUBSCRIBE, even when that is still queued: Redis ends up not
        # subscribed, whenever this subscriber went (before or after the confirmation).
        self._send("unsubscribe", key)

    def _send(self, command: str, key: str) -> None:
        if self._commands is None:
            self._commands = asyncio.Queue()
        self._commands.put_nowait((command, key))
        if self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(
                self._send_commands(self._commands), name="redis-broadcast-commands"
            )

    async def _send_commands(self, commands: asyncio.Queue[tuple[str, str]]) -> None:
        """Send SUBSCRIBE and UNSUBSCRIBE one at a time, in the order they were decided."""
        while True:
            command, key = await commands.get()
            if self._pubsub is None:
                self._pubsub = self.client.pubsub()
            try:
                if command == "subscribe":
                    await self._pubsub.subscribe(key)
                    # The reader starts once the connection exists (after the first SUBSCRIBE).
                    self._ensure_reader(self._pubsub)
                else:
                    await self._pubsub.unsubscribe(key)
            except Exception as error:  # noqa: BLE001 — the only sender must go on sending
                # Whatever failed, the commands after it must still go out: this task is the only
                # one that sends them.
                log.debug("broadcast.command_failed", command=command, error=repr(error))
                confirmed = self._confirmations.get(key)
                if command == "subscribe" and confirmed is not None and not confirmed.done():
                    # Its subscribers fail (and remove their feeds, which unsubscribes).
                    confirmed.set_exception(error)

    def _ensure_reader(self, pubsub: redis.asyncio.client.PubSub) -> None:
        if self._reader is None or self._reader.done():
            self._reader = asyncio.create_task(self._read(pubsub), name="redis-broadcast")

    async def _read(self, pubsub: redis.asyncio.client.PubSub) -> None:
        failures = 0
        liveness = _Liveness(ping_after=self.ping_after, pong_within=self.pong_within)
        while True:
            try:
                await liveness.ping_if_quiet(pubsub)
                message = await pubsub.get_message(timeout=self.read_timeout)
                if message is None:
                    liveness.check()
                if failures:
                    OUTAGES.up(REDIS)
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 — the reader must outlive any failure
                # Whatever broke the connection, subscribers must hear that messages may be lost;
                # the reader itself must not die, or every feed would go quiet for good. Retried
                # at most a second apart, so feeds resume within about a second of Redis.
                failures += 1
                OUTAGES.down(REDIS, error)
                log.debug("broadcast.redis_read_failed", error=repr(error))
                self._all_lost()
                if liveness.pinged is not None and pubsub.connection is not None:
                    # Given up: the next read connects again (and subscribes its channels).
                    await pubsub.connection.disconnect()
                await asyncio.sleep(min(0.1 * 2**failures, 1.0))
                liveness.heard()
                continue
            if message is not None:
                liveness.heard()
                self._dispatch(message)

    def _dispatch(self, message: Mapping[str, Any]) -> None:
        kind = message.get("type")
        channel = _text(message.get("channel"))
        if kind == "subscribe":
            confirmed = self._confirmations.get(channel)
            if confirmed is not None and not confirmed.done():
                confirmed.set_result(None)
            return
        if kind != "message" or not channel.startswith(self.channel_prefix):
            return
        feeds = self._feeds.get(channel[len(self.channel_prefix) :])
        if not feeds:
            return
        data = _text(message.get("data"))
        try:
            payload = json.loads(data)
        except ValueError:
            log.warning("broadcast.bad_message", channel=channel)
            return
        if not isinstance(payload, dict):
            return
        for feed in list(feeds):
            feed.deliver(payload, len(data))

    def _all_lost(self) -> None:
        for feeds in self._feeds.values():
            for feed in feeds:
                feed.mark_lost()


@dataclass
class _Liveness:
    """Whether the pub/sub connection's Redis still answers. Idle reads alone cannot tell a
    quiet channel from a Redis gone silent (a partition, a host gone after a failover: nothing
    refused, nothing answered), whose subscribers would never hear again nor learn that they
    miss messages; after ``ping_after`` seconds without a word the reader sends a PING, and
    Redis must say something within ``pong_within`` seconds of it."""

    ping_after: float
    pong_within: float
    _heard: float = field(default_factory=time.monotonic)
    pinged: float | None = None
    """When the PING waiting for an answer was sent."""

    def heard(self) -> None:
        self._heard = time.monotonic()
        self.pinged = None

    async def ping_if_quiet(self, pubsub: redis.asyncio.client.PubSub) -> None:
        if self.pinged is None and time.monotonic() - self._heard >= self.ping_after:
            await pubsub.ping()
            self.pinged = time.monotonic()

    def check(self) -> None:
        """Raise if the PING went unanswered for too long."""
        if self.pinged is not None and time.monotonic() - self.pinged >= self.pong_within:
            raise RedisTimeoutError(f"no answer to PING within {self.pong_within}s")


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return "" if value is None else str(value)
