"""A faust app whose consumer waits at most a chosen time for a fetch to fill.

faust builds its aiokafka consumer with ``fetch_max_wait_ms=1500`` and offers no setting for it.
A broker that answers a fetch only when that wait is over while nothing new is there (tansu does,
for a fetch that started on an empty partition) then adds up to 1.5 s to every event's way into
a read model. Against Kafka the wait only paces idle polling: a fetch returns as soon as a record
arrives. So the worker's app builds its consumer through the subclasses below, which keep faust's
construction and change that one number.
"""

from __future__ import annotations

from typing import Any

import faust
from faust.transport.drivers import aiokafka as driver

__all__ = ["ProjectorApp"]


class _ConsumerThread(driver.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        # Read by AIOKafkaConsumer.start() when it builds its fetcher; set before start.
        consumer._fetch_max_wait_ms = getattr(self.app, "fetch_max_wait_ms", 1500)
        return consumer


class _Consumer(driver.Consumer):
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

    def _new_transport(self) -> Any:
        return _Transport(self.conf.broker_consumer, self)
