"""A faust app whose consumer waits at most a chosen time for a fetch to fill.

faust builds its aiokafka consumer with ``fetch_max_wait_ms=1500`` and offers no setting for it.
A broker that answers a fetch only when that wait is over while nothing new is there (tansu does,
for a fetch that started on an empty partition) then adds up to 1.5 s to every event's way into
a read model. Against Kafka the wait only paces idle polling: a fetch returns as soon as a record
arrives. So the worker's app builds its consumer through the subclasses below, which keep faust's
construction and change that one number.

They also keep the consumer from committing offsets it read from a log the broker has since lost.
A worker stalled over a restart of a broker that keeps its log in memory (tansu) still holds a
fetch the old broker answered; it applies those records and acknowledges them while it rejoins,
and faust commits such acknowledgements whenever it can. aiokafka sends a commit made between
losing the group and joining it again without a member id, which a broker that no longer knows
the group accepts; and faust's generation check, which drops what was read before a rebalance,
sees no rebalance on tansu (every group stays at generation 0). The committed offset then lies
past records the relay republished into the new log, and the next assignment starts there: they
are never read. So here a commit goes out only while the consumer is a member of its group, and
every assignment (and every revocation) starts a new generation, so that an acknowledgement of a
record read in an earlier one is not committed (the record is read again, a duplicate).
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

import faust
from faust.transport import consumer as faust_consumer
from faust.transport.drivers import aiokafka as driver
from faust.types import TP, TransportT
from faust.types.tuples import ack_lock
from mode.utils.futures import notify

from domain.errors import SetupError

__all__ = ["FaustInternalsChanged", "ProjectorApp", "read_offsets_of"]


class FaustInternalsChanged(SetupError, RuntimeError):
    """The installed faust no longer works the way the worker relies on: fail at start-up, not
    later with events silently dropped. An operator pins faust or adapts the worker; still a
    ``RuntimeError`` for faust's own handling of what its consumer raises."""

    code = "FAUST_INTERNALS"


def read_offsets_of(consumer: object) -> MutableMapping[TP, int]:
    """faust's per-partition read marks (``Consumer._read_offset``, private): the last offset
    read from each partition, below which faust drops what it fetches.

    After a broker lost its log, a partition restarts at offset 0 and everything republished
    there would be dropped until it passed the old mark, so the worker clears the marks of
    assigned partitions. That needs faust both to keep the marks in this mapping and to read
    them where it filters fetched messages; if either changed, raise instead of running a
    worker that quietly skips the republished events.
    """
    marks = getattr(consumer, "_read_offset", None)
    filters_by_marks = "_read_offset" in faust_consumer.Consumer._drain_messages.__code__.co_names
    if not isinstance(marks, MutableMapping) or not filters_by_marks:
        raise FaustInternalsChanged(
            f"faust {faust.__version__}: {type(consumer).__name__} has no per-partition read "
            "marks at Consumer._read_offset (or no longer filters fetched messages by them); "
            "streams.worker.forget_read_offsets_of must be adapted to this faust version"
        )
    return marks


class _RebalanceListener(driver.ConsumerRebalanceListener):
    """Numbers generations itself: one more at every revocation and every assignment."""

    def on_partitions_revoked(self, revoked: Any) -> Any:
        # From here on, whatever was read before belongs to an assignment that is ending.
        self._thread.app.consumer_generation_id += 1
        return super().on_partitions_revoked(revoked)

    async def on_partitions_assigned(self, assigned: Any) -> None:
        app = self._thread.app
        app.consumer_generation_id += 1
        await self._thread.on_partitions_assigned(
            faust_consumer.ensure_TPset(assigned), app.consumer_generation_id
        )


class _ConsumerThread(driver.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: driver.Transport) -> Any:
        consumer = super()._create_worker_consumer(transport)
        # Read by AIOKafkaConsumer.start() when it builds its fetcher; set before start.
        consumer._fetch_max_wait_ms = getattr(self.app, "fetch_max_wait_ms", 1500)
        return consumer

    async def _commit(self, offsets: Any) -> bool:
        if not self._ensure_consumer()._coordinator.member_id:
            # Between losing the group and joining it again (see the module's docstring).
            return False
        committed: bool = await super()._commit(offsets)
        return committed


class _Consumer(driver.Consumer):
    RebalanceListener = _RebalanceListener

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        read_offsets_of(self)  # at start-up: refuse to run on a faust that changed underneath

    def ack(self, message: Any) -> bool:
        """Acknowledge ``message``; not for a commit if it was read in an earlier generation."""
        if message.generation_id == self.app.consumer_generation_id:
            acked: bool = super().ack(message)
            return acked
        with ack_lock:
            message.acked = True
            self._unacked_messages.discard(message)
            notify(self._waiting_for_ack)  # a revocation waits for what is in flight
        return False

    def _new_consumer_thread(self) -> _ConsumerThread:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)


class _Transport(driver.Transport):
    Consumer = _Consumer


class ProjectorApp(faust.App):
    """``faust.App`` with ``fetch_max_wait_ms`` for its consumer (see the module docstring)."""

    def __init__(self, *args: Any, fetch_max_wait_ms: int = 100, **kwargs: Any) -> None:
        self.fetch_max_wait_ms = fetch_max_wait_ms
        self.holding: Any = None
        """The worker's :class:`streams.worker.PartitionHolding`, set by ``build_worker_app``."""
        super().__init__(*args, **kwargs)

    def _new_transport(self) -> TransportT:
        return _Transport(self.conf.broker_consumer, self)
