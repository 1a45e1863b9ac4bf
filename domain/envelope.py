"""The event envelope: one shape for an event on every path out of the store.

The relay puts envelopes on Kafka; the embedded fan-out hands them to projectors in-process; both
build them with :func:`envelope_from_event` and projectors see the same JSON-safe payload either
way, so one projector test-suite covers both paths.
"""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal
from enum import Enum
from typing import Any
from uuid import UUID

from eventsourcing.domain import DomainEventProtocol
from pydantic import BaseModel, ConfigDict

from domain.events import EventPayload, payload_of

ENVELOPE_SCHEMA_VERSION = 1

#: Kafka topic (before the configurable prefix) for each aggregate's events.
TOPIC_BY_AGGREGATE: dict[str, str] = {
    "Workspace": "workspace-events",
    "ApiKey": "workspace-events",
    "Invitation": "workspace-events",
    "Project": "card-events",
    "Card": "card-events",
    "AgentRun": "agent-runs",
    "UsageCharge": "usage-events",
    "MonthlySpend": "usage-events",
    "Invoice": "usage-events",
}
TOPICS: tuple[str, ...] = tuple(sorted(set(TOPIC_BY_AGGREGATE.values())))

#: Metadata key of an envelope whose stored event could not be decoded (a topic that no longer
#: resolves, a state that is not what the mapper reads): its value is the error. Such an envelope
#: has no payload; a projector following its aggregate parks the aggregate there.
UNDECODABLE = "agentworks.undecodable"

#: Metadata key of an envelope the relay published without its payload, because the whole of it
#: would not fit a Kafka message: its value says why. A consumer reads the event from the store.
OMITTED = "agentworks.omitted"

#: Metadata key of an envelope read without its stored state (a type whose payload none of its
#: readers uses, see ``EventLog.read_following``): where it sits and what it is, no payload, no
#: time nor metadata of its own. Only ever handed to projectors that ignore its type.
UNREAD = "agentworks.unread"

#: Where an envelope keeps its decoded payload (outside the model's fields: never serialised).
_EVENT = "_typed_event"

_BASE_FIELDS = frozenset(
    {"originator_id", "originator_version", "timestamp", "meta", "originator_topic"}
)


class EventEnvelope(BaseModel):
    """An event as it leaves the store: where it sits in the log, what it is, and its payload."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: int = ENVELOPE_SCHEMA_VERSION
    position: int
    originator_id: UUID
    originator_version: int
    aggregate: str
    type: str
    event_version: int
    timestamp: datetime
    workspace_id: UUID | None
    metadata: dict[str, str]
    payload: dict[str, Any]

    @property
    def event(self) -> EventPayload:
        """The payload, typed (see :mod:`domain.events`): what projectors dispatch on.

        Decoded on first use and kept on the envelope, so the projectors sharing an envelope
        decode it once; a copy with another type or payload (``model_copy``) decodes again.
        """
        fields = self.__dict__  # (read directly: the projectors ask every envelope, often)
        cached: tuple[str, EventPayload] | None = fields.get(_EVENT)
        if (
            cached is None
            or cached[0] is not fields["type"]
            or cached[1].__dict__ is not fields["payload"]
        ):
            cached = fields[_EVENT] = (
                fields["type"],
                payload_of(fields["type"], fields["payload"]),
            )
        return cached[1]

    @property
    def topic(self) -> str:
        return TOPIC_BY_AGGREGATE.get(self.aggregate, "other-events")

    @property
    def undecodable(self) -> str:
        """Why the stored event could not be decoded (see :data:`UNDECODABLE`); ``""`` when
        it was."""
        return self.metadata.get(UNDECODABLE, "")

    @property
    def traceparent(self) -> str:
        return self.metadata.get("traceparent", "")

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> EventEnvelope:
        return cls.model_validate_json(raw)


def envelope_from_event(position: int, event: DomainEventProtocol[UUID]) -> EventEnvelope:
    """Wrap a decoded domain event that the store gave ``position``.

    The event's fields are its instance attributes (the library's events are dataclasses): the
    payload is all of them but the base fields, and ``timestamp`` is one of those the library's
    protocol does not name.
    """
    state = vars(event)
    event_class = type(event)
    qualname = event_class.__qualname__
    aggregate = qualname.split(".", 1)[0]
    meta: dict[str, str] = dict(getattr(event, "meta", {}) or {})
    workspace = meta.get("workspace_id") or None
    payload = {key: json_safe(value) for key, value in state.items() if key not in _BASE_FIELDS}
    return EventEnvelope(
        position=position,
        originator_id=event.originator_id,
        originator_version=event.originator_version,
        aggregate=aggregate,
        type=qualname,
        event_version=int(getattr(event_class, "class_version", 1)),
        timestamp=state["timestamp"],
        workspace_id=UUID(workspace) if workspace else None,
        metadata=meta,
        payload=payload,
    )


def json_safe(value: object) -> object:
    """Plain JSON values only: ids and money become strings, never floats."""
    if isinstance(value, UUID | Decimal):
        return str(value)
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, set | frozenset):
        # Members of one set are of one kind, so their JSON forms order as they do.
        members: list[Any] = [json_safe(v) for v in value]
        return sorted(members)
    if isinstance(value, float):
        raise TypeError(f"float {value!r} in an event payload; money and counts are exact")
    return value
