"""The aggregate base all AgentWorks aggregates share: tenant-owned, every event stamped."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from uuid import UUID

from eventsourcing.domain import Aggregate

from domain.meta import EventMeta


class TenantAggregate(Aggregate):
    """An aggregate owned by exactly one workspace.

    Every event carries its :class:`~domain.meta.EventMeta` as a plain dict so that stored events
    stay self-describing JSON and a projector never needs the aggregate to know who did what.
    """

    # State is set by each creation event's ``apply``. Attribute annotations live under
    # TYPE_CHECKING because the library turns runtime class annotations into __init__ parameters.
    if TYPE_CHECKING:
        workspace_id: UUID

    class Event(Aggregate.Event):
        meta: dict[str, str]

    class Created(Event, Aggregate.Created):
        workspace_id: UUID

        def apply(self, aggregate: Any) -> None:
            aggregate.workspace_id = self.workspace_id

    def _record(self, event_class: type[Aggregate.Event], meta: EventMeta, **payload: Any) -> None:
        self.trigger_event(event_class, meta=meta.as_dict(), **payload)
