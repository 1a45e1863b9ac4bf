"""Time travel: cards and boards as they were, folded from the event store (never a read model).

A read model shows the present; an audit asks about the past. Everything here reads the log
through the write side's repository and mapper, so snapshots shorten the fold and stored events
written at an older ``class_version`` are upcast on the way, exactly as the write side sees them.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from domain.errors import ValidationFailed

if TYPE_CHECKING:
    from domain.card import Card
    from streams.envelope import EventEnvelope


def parse_instant(text: str, *, option: str) -> datetime:
    """An ISO-8601 instant as tz-aware UTC; one without an offset is read as UTC."""
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValidationFailed(
            f"{option}: malformed time {text!r}; give ISO-8601 such as 2026-01-31T12:00:00Z"
        ) from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def card_state(card: Card) -> dict[str, Any]:
    """A card aggregate as plain JSON (the fields of the API's ``Card`` that the card holds)."""
    return {
        "id": str(card.id),
        "projectId": str(card.project_id),
        "title": card.title,
        "description": card.description,
        "lane": card.lane,
        "position": card.position,
        "assignee": card.assignee,
        "labels": list(card.labels),
        "blockedReason": card.blocked_reason,
        "archived": card.archived,
        "version": card.version,
        "createdAt": card.created_on.isoformat(),
        "updatedAt": card.modified_on.isoformat(),
    }


def history_event(envelope: EventEnvelope) -> dict[str, Any]:
    """One event of a history as plain JSON (the fields of the API's ``HistoryEvent``)."""
    return {
        "version": envelope.originator_version,
        "type": envelope.type,
        "at": envelope.timestamp.isoformat(),
        "actor": envelope.metadata.get("actor", ""),
        "position": str(envelope.position),
        "data": envelope.payload,
    }
