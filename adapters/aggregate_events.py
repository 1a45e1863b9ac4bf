"""An aggregate's events as the write side loads them, with a stored event that cannot be decoded
told as :class:`~domain.errors.UndecodableEvent` instead of the library's or Python's error.

A command loads every aggregate it touches through the library's repository, which decodes each
stored event with the mapper. A bad upgrade (a class renamed, an upcaster that fails, a state that
is not JSON) made that decoding raise whatever it met (``TopicError``, a JSON error, a
``KeyError``), which no edge knows: the command answered INTERNAL. The log's readers already go
on past such an event (:func:`~adapters.eventlog.undecodable_envelope`); the write side cannot
decide on an aggregate it cannot fold, so it refuses with the stable code naming the event.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from uuid import UUID

import structlog
from eventsourcing.persistence import EventStore

from adapters.eventlog import UNKNOWN_TIME, undecodable_envelope
from domain.errors import UndecodableEvent

if TYPE_CHECKING:
    from collections.abc import Iterator

    from eventsourcing.domain import DomainEventProtocol
    from eventsourcing.persistence import StoredEvent

log = structlog.get_logger(__name__)


class DecodingEventStore(EventStore[UUID]):
    """The library's event store whose reads raise :class:`UndecodableEvent` for a stored event
    the mapper cannot decode; writes are the library's."""

    def get(
        self,
        originator_id: UUID,
        *,
        gt: int | None = None,
        lte: int | None = None,
        desc: bool = False,
        limit: int | None = None,
    ) -> Iterator[DomainEventProtocol[UUID]]:
        stored = self.recorder.select_events(
            originator_id=originator_id, gt=gt, lte=lte, desc=desc, limit=limit
        )
        return map(self._decoded, stored)

    def _decoded(self, stored: StoredEvent) -> DomainEventProtocol[UUID]:
        try:
            return self.mapper.to_domain_event(stored)
        except Exception as error:  # decoding is pure: the stored event's own fault
            raise unreadable(stored, error) from error


def unreadable(stored: StoredEvent, error: BaseException) -> UndecodableEvent:
    """The refusal for ``stored``: its aggregate id, version, stored type and (when its state
    still says) its time; the decoding error goes to the log, not to the client."""
    originator_id: Any = stored.originator_id
    envelope = undecodable_envelope(
        (0, originator_id, stored.originator_version, stored.topic, stored.state), error
    )
    log.warning(
        "eventstore.undecodable_aggregate_event",
        originator_id=str(originator_id),
        originator_version=stored.originator_version,
        topic=stored.topic,
        error=f"{type(error).__name__}: {error}",
    )
    at = None if envelope.timestamp == UNKNOWN_TIME else envelope.timestamp.isoformat()
    return UndecodableEvent(
        f"{envelope.aggregate} {originator_id}: its stored event at version "
        f"{stored.originator_version} ({envelope.type}) could not be decoded",
        version=stored.originator_version,
        at=at,
        aggregate_id=str(originator_id),
        stored_type=envelope.type,
    )
