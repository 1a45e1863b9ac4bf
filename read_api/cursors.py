"""Opaque Relay cursors: a kind tag, the identity of their list and the sort key of the last item,
base64url JSON.

Clients must treat cursors as opaque. A cursor is bound to the list it came from: it carries
:func:`list_of` the parts that define that list (its parent's ids, the instant shown, the filters
that choose its items), so a cursor of one list passed as ``after`` on another (another lane,
board, card, workspace, filter) is ``VALIDATION`` instead of silently paging from a wrong place.
The identity is a short hash, not a secret and not a signature: anyone may forge a cursor of a
list they may read, which pages that list from wherever they like; the hash only tells lists
apart, checked before anything is read, and shows nothing of the list it names.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Collection
from datetime import UTC, datetime
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

ListPart = str | UUID | datetime | bool | None


def list_of(*parts: ListPart) -> str:
    """The identity of a list, to bind its cursors to: 64 bits of BLAKE2b over ``parts`` (the
    workspace, the parent's ids, the instant shown, the filters), 11 characters. Two lists a
    client pages tell apart but by a 2^-64 chance; a datetime counts as its instant (UTC)."""
    canonical = json.dumps([_canonical(part) for part in parts], separators=(",", ":"))
    digest = hashlib.blake2b(canonical.encode(), digest_size=8, person=b"agentworks.list")
    return base64.urlsafe_b64encode(digest.digest()).decode().rstrip("=")


def _canonical(part: ListPart) -> str | bool | None:
    if isinstance(part, datetime):
        return (part.astimezone(UTC) if part.tzinfo else part).isoformat()
    return part if part is None or isinstance(part, bool) else str(part)


UNLISTED = list_of()
"""The identity given where there is no list (a cursor made or read out of any connection)."""


def encode(kind: str, within: str, *key: str | int) -> str:
    raw = json.dumps([kind, within, *key], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode(
    cursor: str, kind: str, arity: int, within: str, *, max_length: int = MAX_CURSOR_LENGTH
) -> list[str | int]:
    """The sort key a cursor of the list ``within`` carries; any other is ``VALIDATION``,
    refused before anything is read."""
    bound_to, key = _opened(cursor, kind, arity, max_length=max_length)
    if bound_to != within:
        raise _not_of_this_list(cursor)
    return key


def _opened(
    cursor: str, kind: str, arity: int, *, max_length: int
) -> tuple[str | int, list[str | int]]:
    """A well-formed cursor of ``kind``: the list it is bound to, and its sort key."""
    if len(cursor) > max_length:
        raise ValidationFailed("cursor is too long; pass an endCursor this API returned")
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        value = json.loads(raw)
    except (binascii.Error, ValueError, RecursionError):
        # RecursionError: a forged cursor of deeply nested arrays, which only a long one can be.
        raise ValidationFailed(f"cursor {cursor[:40]!r} is not one this API returned") from None
    if not isinstance(value, list) or not value or value[0] != kind:
        raise _not_of_this_list(cursor)
    if len(value) == arity + 1:
        # The shape cursors had before they named their list: which list it came from is
        # unknown, so following it could page from a wrong place (docs/API_NOTES.md, Cursors).
        raise ValidationFailed(
            f"cursor {cursor[:40]!r} is from an earlier version of this API, which did not bind "
            "cursors to their list: start this list again from its first page (without after)"
        )
    if len(value) != arity + 2 or not all(_sane(part) for part in value):
        raise _not_of_this_list(cursor)
    return value[1], value[2:]


def _not_of_this_list(cursor: str) -> ValidationFailed:
    return ValidationFailed(
        f"cursor {cursor[:40]!r} does not belong to this list: after must be the endCursor of "
        "a page of this same list"
    )


def _sane(part: object) -> bool:
    """A sort key the database can compare: text it can hold, a number a bigint can hold.

    A forged cursor is decoded JSON, so it can hold NUL, lone surrogates or 10^30; without this
    they would reach SQL and fail there (INTERNAL) instead of being refused as input.
    """
    if isinstance(part, str):
        return text_problem(part) is None
    return isinstance(part, int) and not isinstance(part, bool) and 0 <= part <= MAX_BIGINT


def card_cursor(position: str, card_id: UUID, within: str = UNLISTED) -> str:
    """A cursor of a lane's cards (``within``: :func:`list_of` the lane)."""
    return encode("card", within, position, str(card_id))


def parse_card_cursor(
    cursor: str, within: str = UNLISTED, *, beside: Collection[str] = ()
) -> tuple[str, UUID] | None:
    """The card a lane's page follows; None for a cursor of another lane ``beside`` it (of the
    same board, shown in the same answer: one ``after`` reaches all of them)."""
    bound_to, key = _opened(cursor, "card", 2, max_length=MAX_CARD_CURSOR_LENGTH)
    if bound_to != within:
        if bound_to in beside:
            return None
        raise _not_of_this_list(cursor)
    position, card_id = key
    return str(position), _uuid(card_id)


def run_cursor(requested_at: datetime, run_id: UUID, within: str = UNLISTED) -> str:
    """A cursor of a card's runs (``within``: :func:`list_of` the card and instant shown)."""
    return encode("run", within, requested_at.isoformat(), str(run_id))


def parse_run_cursor(cursor: str, within: str = UNLISTED) -> tuple[datetime, UUID]:
    at, run_id = decode(cursor, "run", 2, within)
    try:
        when = datetime.fromisoformat(str(at))
    except ValueError:
        raise _not_of_this_list(cursor) from None
    return when, _uuid(run_id)


def activity_cursor(position: int, within: str = UNLISTED) -> str:
    """A cursor of a workspace's activity (``within``: :func:`list_of` the workspace)."""
    return encode("activity", within, position)


def parse_activity_cursor(cursor: str, within: str = UNLISTED) -> int:
    (position,) = decode(cursor, "activity", 1, within)
    if not isinstance(position, int):
        raise _not_of_this_list(cursor)
    return position


def grant_cursor(kind: str, grant_id: UUID, within: str = UNLISTED) -> str:
    """A cursor of a workspace's API keys (``kind`` "apiKey") or invitations ("invitation"):
    the id of the last item; the list orders by creation, which the id's row knows.
    ``within``: :func:`list_of` the workspace and the filter (closed ones included or not)."""
    return encode(kind, within, str(grant_id))


def parse_grant_cursor(cursor: str, kind: str, within: str = UNLISTED) -> UUID:
    (grant_id,) = decode(cursor, kind, 1, within)
    return _uuid(grant_id)


def _uuid(value: str | int) -> UUID:
    try:
        return UUID(str(value))
    except ValueError:
        raise ValidationFailed("cursor does not belong to this list") from None
