"""Waking a log tailer when the store NOTIFYs that events were appended."""

from __future__ import annotations

import threading

import psycopg
import structlog

log = structlog.get_logger(__name__)


class LogWakeup:
    """LISTENs on the store's channel and sets ``wake`` on each notification.

    Tailers still poll: a notification can be lost with a dropped connection, and an event held
    back by the reader's horizon becomes readable without any notification.
    """

    def __init__(
        self,
        url: str,
        wake: threading.Event,
        *,
        channel: str = "agentworks_events",
        check_interval: float = 0.5,
    ) -> None:
        self.url = url
        self.wake = wake
        self.channel = channel
        self.check_interval = check_interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

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
                with psycopg.connect(self.url, autocommit=True) as conn:
                    conn.execute(f'LISTEN "{self.channel}"')
                    while not self._stop.is_set():
                        for _ in conn.notifies(timeout=self.check_interval, stop_after=1):
                            self.wake.set()
            except psycopg.Error:
                log.warning("wakeup.reconnect", channel=self.channel, exc_info=True)
                self._stop.wait(1.0)
