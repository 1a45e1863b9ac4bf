"""Waking a log tailer when the store NOTIFYs that events were appended."""

from __future__ import annotations

import threading
from dataclasses import KW_ONLY, dataclass, field
from typing import Protocol

import psycopg
import structlog

from adapters.outages import OUTAGES
from adapters.postgres import connect, dependency_name

log = structlog.get_logger(__name__)


class Wakeable(Protocol):
    """What a notification wakes: a ``threading.Event``, or a bridge into an event loop."""

    def set(self) -> None: ...


@dataclass(eq=False)
class LogWakeup:
    """LISTENs on the store's channel and sets ``wake`` on each notification.

    Tailers still poll: a notification can be lost with a dropped connection, and an event held
    back by the reader's horizon becomes readable without any notification. When the connection
    drops (a database restart) it subscribes again every ``retry_interval`` until the server is
    back, and wakes the tailer once it is, to pick up what was written meanwhile; the outage
    itself is logged once (:mod:`adapters.outages`), not at every attempt.
    """

    url: str = field(repr=False)  # may carry a password
    wake: Wakeable
    _: KW_ONLY
    channel: str = "agentworks_events"
    check_interval: float = 0.5
    retry_interval: float = 0.25
    dependency: str = field(init=False)
    _stop: threading.Event = field(init=False, default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        self.dependency = dependency_name(self.url)

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._listen, name="log-wakeup", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _listen(self) -> None:
        while not self._stop.is_set():
            try:
                with connect(self.url, autocommit=True) as conn:
                    conn.execute(f'LISTEN "{self.channel}"')
                    OUTAGES.up(self.dependency)
                    self.wake.set()
                    while not self._stop.is_set():
                        for _ in conn.notifies(timeout=self.check_interval, stop_after=1):
                            self.wake.set()
            except psycopg.Error as error:
                OUTAGES.down(self.dependency, error)
                log.debug("wakeup.reconnect", channel=self.channel, error=str(error))
                self._stop.wait(self.retry_interval)
