"""The aggregate base all AgentWorks aggregates share: tenant-owned, every event stamped."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from copy import copy
from datetime import datetime
from typing import TYPE_CHECKING, Self
from uuid import UUID

from eventsourcing.domain import Aggregate, CanCreateTimestamp, CanInitAggregate

from domain.meta import EventMeta
from domain.text import refuse_unstorable

_DECIDED_AT: ContextVar[datetime | None] = ContextVar("decided_at", default=None)


@contextmanager
def decided_at(instant: datetime) -> Iterator[None]:
    """Stamp every event triggered inside with ``instant`` (one command's decision), unless it
    names its own time (a charge at its call's).

    A command is one decision, committed at once; its events stamped one by one as they were
    triggered made a board or an export as of an instant between two of them see it half done
    (a card placed on the board before it existed)."""
    token = _DECIDED_AT.set(instant)
    try:
        yield
    finally:
        _DECIDED_AT.reset(token)


class StampedEvent(CanCreateTimestamp):
    """An event stamped with the instant of the decision it is part of (see :func:`decided_at`),
    or when it is triggered outside one."""

    @staticmethod
    def create_timestamp() -> datetime:
        return _DECIDED_AT.get() or CanCreateTimestamp.create_timestamp()


class TenantAggregate(Aggregate):
    """An aggregate owned by exactly one workspace.

    Every event carries its :class:`~domain.meta.EventMeta` as a plain dict so that stored events
    stay self-describing JSON and a projector never needs the aggregate to know who did what.
    """

    # State is set by each creation event's ``apply``. Attribute annotations live under
    # TYPE_CHECKING because the library turns runtime class annotations into __init__ parameters.
    if TYPE_CHECKING:
        workspace_id: UUID

    class Event(StampedEvent, Aggregate.Event):
        meta: dict[str, str]

    class Created(Event, Aggregate.Created):
        """Each subclass's ``apply`` sets ``workspace_id`` with the rest of its aggregate's state
        (typed by that aggregate, which a shared ``apply`` here could not be)."""

        workspace_id: UUID

    def __deepcopy__(self, memo: dict[int, object]) -> Self:
        """Copy for a command: new containers, shared contents.

        The repository hands every command a copy of the cached aggregate. Aggregate state holds
        only immutable values (str, UUID, int, Decimal, enums, frozen dataclasses) inside
        dicts, lists and sets, so copying the containers is a full copy at a fraction of
        ``copy.deepcopy``'s cost.
        """
        clone = object.__new__(type(self))
        for key, value in self.__dict__.items():
            clone.__dict__[key] = copy(value) if isinstance(value, dict | list | set) else value
        return clone

    @classmethod
    def _create(
        cls,
        event_class: type[CanInitAggregate[UUID]],
        *,
        id: UUID | None = None,
        **kwargs: object,
    ) -> Self:
        # The last gate before the log: whatever an edge let through, an event whose text no
        # read model could hold is never recorded (see domain.text).
        refuse_unstorable(kwargs, what=_event_name(event_class))
        return super()._create(event_class, id=id, **kwargs)

    def _record(
        self, event_class: type[Aggregate.Event], meta: EventMeta, **payload: object
    ) -> None:
        recorded = meta.as_dict()
        refuse_unstorable({**payload, "meta": recorded}, what=_event_name(event_class))
        self.trigger_event(event_class, meta=recorded, **payload)


def _event_name(event_class: type[object]) -> str:
    return event_class.__qualname__
