"""Reading the event log as envelopes: in global order (fan-out) or per aggregate (healing)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from streams.envelope import EventEnvelope, envelope_from_event

if TYPE_CHECKING:
    from uuid import UUID

    from eventsourcing.persistence import Mapper, Notification

    from adapters.eventstore import EventStoreRecorder


class EventLog:
    """The store's notification log, decoded into envelopes."""

    def __init__(self, recorder: EventStoreRecorder, mapper: Mapper[UUID]) -> None:
        self.recorder = recorder
        self.mapper = mapper

    def read(self, after: int, limit: int = 1000) -> list[EventEnvelope]:
        """Up to ``limit`` events with positions above ``after``, in order, never past a gap
        that a still-open transaction may fill."""
        notifications = self.recorder.select_notifications(
            start=after, limit=limit, inclusive_of_start=False
        )
        return [self._envelope(n) for n in notifications]

    def between(
        self, originator_id: UUID, *, after_version: int, before_version: int | None
    ) -> list[EventEnvelope]:
        return [
            self._envelope(n)
            for n in self.recorder.select_positioned_events(
                originator_id, gt=after_version, lt=before_version
            )
        ]

    def head(self) -> int:
        return self.recorder.max_notification_id() or 0

    def _envelope(self, notification: Notification) -> EventEnvelope:
        return envelope_from_event(notification.id, self.mapper.to_domain_event(notification))
