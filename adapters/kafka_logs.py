"""kafka-python's records of a broker it cannot reach, cut to one per outage.

While a broker is away kafka-python logs every failed attempt to reach it: a connection failed
(ERROR), a connection lost (ERROR), a bootstrap or metadata refresh retried (WARNING), about a
second apart at first and for as long as the outage lasts. The relay says the outage once itself
(``dependency.down``, :mod:`adapters.outages`); the library's repetitions buried that line. Its
first record of an outage is kept (it says what the library met); the others are dropped until
a connection to a broker succeeds again, which the library says at INFO (``<connection>:
Connected``): so that record is let through to :class:`BrokerRetries` only, never further.

Kept apart from :mod:`adapters.kafka` so that configuring logging does not import kafka-python
in processes that never use it.
"""

from __future__ import annotations

import logging
import threading

#: The loggers whose records :class:`BrokerRetries` judges (kafka-python 3.0).
LOGGERS = ("kafka.net.manager", "kafka.net.connection", "kafka.net.transport", "kafka.cluster")
#: The logger that says a connection to a broker succeeded, at INFO.
_CONNECTION_LOGGER = "kafka.net.connection"
_CONNECTED = "%s: Connected"
#: kafka-python's messages (unformatted) of an attempt to reach a broker that failed.
_AWAY = frozenset(
    {
        "Connection failed: %s",
        "%s: Connection lost: %s",
        "%s: socket disconnected",
        "%s: Error receiving network data closing socket",
        "%s: Error sending request data: %s",
        "%s: Abort (%s)",
        "%s: Request timed out after %d ms. Closing connection.",
        "Bootstrap %s not ready; waiting %.2f secs",
        "Bootstrap connection to %s failed: %s (backoff %.2f secs)",
        "Bootstrap failed: %s",
        "No node available for metadata refresh - backoff/retry",
        "Metadata refresh: failed %s",
    }
)
#: A message built before logging (an f-string), so matched by its start.
_AWAY_PREFIXES = ("Bootstrap attempt to ",)


class BrokerRetries(logging.Filter):
    """Keeps the first of kafka-python's records of a broker out of reach, drops the rest of
    that outage; one process-wide outage (any broker), ended by any successful connection."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._away = False

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.msg
        if record.name == _CONNECTION_LOGGER and record.levelno < logging.WARNING:
            if message == _CONNECTED:
                with self._lock:
                    self._away = False
            return False  # let through to this filter only (see install)
        if not isinstance(message, str) or not (
            message in _AWAY or message.startswith(_AWAY_PREFIXES)
        ):
            return True
        with self._lock:
            first, self._away = not self._away, True
        return first


def install(level: int) -> None:
    """Route kafka-python's connection records through one :class:`BrokerRetries` (again on
    every call: a configuration made again replaces the last); ``level``: the level its other
    records are kept from."""
    retries = BrokerRetries()
    for name in LOGGERS:
        logger = logging.getLogger(name)
        for old in [f for f in logger.filters if isinstance(f, BrokerRetries)]:
            logger.removeFilter(old)
        logger.addFilter(retries)
        logger.setLevel(max(level, logging.WARNING))
    # A success is said at INFO: heard by the filter, which drops it (and DEBUG stays off).
    logging.getLogger(_CONNECTION_LOGGER).setLevel(logging.INFO)
