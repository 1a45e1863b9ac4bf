"""An aggregate's events as the write side loads them, with a stored event that cannot be decoded
told as :class:`~domain.errors.UndecodableEvent` instead of the library's or Python's error, and
one that decodes but that today's ``apply`` refuses as :class:`~domain.errors.UnappliableEvent`.

A command loads every aggregate it touches through the library's repository, which decodes each
stored event with the mapper. A bad upgrade (a class renamed, an upcaster that fails, a state that
is not JSON) made that decoding raise whatever it met (``TopicError``, a JSON error, a
``KeyError``), which no edge knows: the command answered INTERNAL. The log's readers already go
on past such an event (:func:`~adapters.eventlog.undecodable_envelope`); the write side cannot
decide on an aggregate it cannot fold, so it refuses with the stable code naming the event.

An event that decodes can still fail in its aggregate's ``apply`` while the repository folds it
(a role or a lane today's code no longer knows, an attribute an older writer left out): the
``ValueError``, ``KeyError`` or ``AttributeError`` escaped the same way, and is told the same way
by :class:`ApplyingRepository`.
"""

from __future__ import annotations

import contextlib
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar, cast
from uuid import UUID

import structlog
from eventsourcing.application import ProjectorFunction, Repository, project_aggregate
from eventsourcing.domain import MutableOrImmutableAggregate, TDomainEvent
from eventsourcing.persistence import EventStore

from adapters.eventlog import UNKNOWN_TIME, undecodable_envelope
from domain.errors import UnappliableEvent, UndecodableEvent

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

    from eventsourcing.domain import CanMutateProtocol, DomainEventProtocol
    from eventsourcing.persistence import StoredEvent

log = structlog.get_logger(__name__)

A = TypeVar("A", bound=MutableOrImmutableAggregate[Any])


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
    still says) its time and its workspace (``details["workspace_id"]``: to whom it may be
    told); the decoding error goes to the log, not to the client."""
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
        workspace_id=None if envelope.workspace_id is None else str(envelope.workspace_id),
    )


class ApplyingRepository(Repository[UUID]):
    """The library's repository whose fold raises :class:`UnappliableEvent` for a stored event
    that decodes and that its aggregate's ``apply`` refuses.

    A cached aggregate that such an event failed on is dropped from the cache: ``apply`` may
    have changed it before it raised (the library bumps the version only after), and the next
    load folds it again from the store."""

    @classmethod
    def of(cls, library: Repository[UUID]) -> ApplyingRepository:
        """``library``'s repository as the application configured it (cache, fast-forward)."""
        repository = cls.__new__(cls)
        repository.__dict__.update(library.__dict__)
        return repository

    def get(
        self,
        aggregate_id: UUID,
        *,
        version: int | None = None,
        projector_func: ProjectorFunction[A, TDomainEvent] = project_aggregate,
        fastforward_skipping: bool = False,
        deepcopy_from_cache: bool = True,
    ) -> A:
        try:
            return super().get(
                aggregate_id,
                version=version,
                projector_func=fold if projector_func is project_aggregate else projector_func,
                fastforward_skipping=fastforward_skipping,
                deepcopy_from_cache=deepcopy_from_cache,
            )
        except UnappliableEvent:
            if self.cache is not None:
                with contextlib.suppress(KeyError):
                    self.cache.get(aggregate_id, evict=True)
            raise


def fold(aggregate: A | None, events: Iterable[TDomainEvent]) -> A | None:
    """The library's fold (``project_aggregate``), a failing ``apply`` told as
    :class:`UnappliableEvent`; decoding errors are the event store's (:func:`unreadable`)."""
    for event in events:
        try:
            aggregate = cast("CanMutateProtocol[A]", event).mutate(aggregate)
        except Exception as error:  # folding a stored event is pure: the event's own fault
            raise unappliable(event, error) from error
    return aggregate


def unappliable(event: TDomainEvent, error: BaseException) -> UnappliableEvent:
    """The refusal for ``event``: its aggregate id, version, type, time and workspace (to whom
    it may be told); the error goes to the log, not to the client."""
    stored_type = type(event).__qualname__
    log.warning(
        "eventstore.unappliable_aggregate_event",
        originator_id=str(event.originator_id),
        originator_version=event.originator_version,
        type=stored_type,
        error=f"{type(error).__name__}: {error}",
    )
    timestamp = getattr(event, "timestamp", None)
    meta = getattr(event, "meta", None)
    workspace = meta.get("workspace_id") if isinstance(meta, dict) else None
    return UnappliableEvent(
        f"{stored_type.split('.', 1)[0]} {event.originator_id}: its stored event at version "
        f"{event.originator_version} ({stored_type}) could not be applied",
        version=event.originator_version,
        at=timestamp.isoformat() if isinstance(timestamp, datetime) else None,
        aggregate_id=str(event.originator_id),
        stored_type=stored_type,
        workspace_id=workspace if isinstance(workspace, str) and workspace else None,
    )
