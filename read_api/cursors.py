"""Opaque Relay cursors: a kind tag and the sort key of the last item, base64url JSON.

Clients must treat cursors as opaque; the tag makes a cursor of one list useless on another
(``VALIDATION``) instead of silently paging from a wrong place.
"""

from __future__ import annotations

import base64
import binascii
import json
from datetime import datetime
from uuid import UUID

from domain.errors import ValidationFailed
from domain.text import text_problem

MAX_CURSOR_LENGTH = 512
MAX_CARD_CURSOR_LENGTH = 2_000_000
"""A card cursor carries its card's position key, and keys have no length bound of their own: each
move into one gap (two cards swapped back and forth) adds a character about every five moves, so
a few thousand made a key whose cursor the 512-character limit refused. The request body limit
(1 MB by default) is the practical bound."""
MAX_BIGINT = 2**63 - 1


def encode(kind: str, *key: str | int) -> str:
    raw = json.dumps([kind, *key], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode(
    cursor: str, kind: str, arity: int, *, max_length: int = MAX_CURSOR_LENGTH
) -> list[str | int]:
    if len(cursor) > max_length:
        raise ValidationFailed("cursor is too long; pass an endCursor this API returned")
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        value = json.loads(raw)
    except (binascii.Error, ValueError, RecursionError):
        # RecursionError: a forged cursor of deeply nested arrays, which only a long one can be.
        raise ValidationFailed(f"cursor {cursor[:40]!r} is not one this API returned") from None
    if (
        not isinstance(value, list)
        or len(value) != arity + 1
        or value[0] != kind
        or not all(_sane(part) for part in value)
    ):
        raise ValidationFailed(f"cursor {cursor[:40]!r} does not belong to this list")
    return value[1:]


def _sane(part: object) -> bool:
    """A sort key the database can compare: text it can hold, a number a bigint can hold.

    A forged cursor is decoded JSON, so it can hold NUL, lone surrogates or 10^30; without this
    they would reach SQL and fail there (INTERNAL) instead of being refused as input.
    """
    if isinstance(part, str):
        return text_problem(part) is None
    return isinstance(part, int) and not isinstance(part, bool) and 0 <= part <= MAX_BIGINT


def card_cursor(position: str, card_id: UUID) -> str:
    return encode("card", position, str(card_id))


def parse_card_cursor(cursor: str) -> tuple[str, UUID]:
    position, card_id = decode(cursor, "card", 2, max_length=MAX_CARD_CURSOR_LENGTH)
    return str(position), _uuid(card_id)


def run_cursor(requested_at: datetime, run_id: UUID) -> str:
    return encode("run", requested_at.isoformat(), str(run_id))


def parse_run_cursor(cursor: str) -> tuple[datetime, UUID]:
    at, run_id = decode(cursor, "run", 2)
    try:
        when = datetime.fromisoformat(str(at))
    except ValueError:
        raise ValidationFailed("cursor does not belong to this list") from None
    return when, _uuid(run_id)


def activity_cursor(position: int) -> str:
    return encode("activity", position)


def parse_activity_cursor(cursor: str) -> int:
    (position,) = decode(cursor, "activity", 1)
    if not isinstance(position, int):
        raise ValidationFailed("cursor does not belong to this list")
    return position


def grant_cursor(kind: str, grant_id: UUID) -> str:
    """A cursor of a workspace's API keys (``kind`` "apiKey") or invitations ("invitation"):
    the id of the last item; the list orders by creation, which the id's row knows."""
    return encode(kind, str(grant_id))


def parse_grant_cursor(cursor: str, kind: str) -> UUID:
    (grant_id,) = decode(cursor, kind, 1)
    return _uuid(grant_id)


def _uuid(value: str | int) -> UUID:
    try:
        return UUID(str(value))
    except ValueError:
        raise ValidationFailed("cursor does not belong to this list") from None
