"""Cursors bound to their list (``read_api.cursors``): a cursor made for a list is taken back by
that list, and by no other; a cursor of the shape the version before made (no list in it) is
refused, saying to start again."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from uuid import UUID

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from domain.errors import ValidationFailed
from read_api import cursors

_parts = st.lists(
    st.one_of(
        st.uuids(),
        st.text(max_size=40),
        st.datetimes(timezones=st.just(UTC)),
        st.booleans(),
        st.none(),
    ),
    max_size=5,
).map(tuple)

_ID = UUID("5f0c6c1e-8f56-4a8e-9a53-2d1d2f1e7b10")
_AT = datetime(2026, 12, 8, 9, 30, 1, 123456, tzinfo=UTC)

#: Per kind of list: a cursor of it made for a list, and that cursor read back by a list.
KINDS: dict[str, tuple[Callable[[str], str], Callable[[str, str], Any], Any]] = {
    "card": (
        lambda within: cursors.card_cursor("V1a", _ID, within),
        lambda cursor, within: cursors.parse_card_cursor(cursor, within),
        ("V1a", _ID),
    ),
    "run": (
        lambda within: cursors.run_cursor(_AT, _ID, within),
        lambda cursor, within: cursors.parse_run_cursor(cursor, within),
        (_AT, _ID),
    ),
    "activity": (
        lambda within: cursors.activity_cursor(2**63 - 1, within),
        lambda cursor, within: cursors.parse_activity_cursor(cursor, within),
        2**63 - 1,
    ),
    "apiKey": (
        lambda within: cursors.grant_cursor("apiKey", _ID, within),
        lambda cursor, within: cursors.parse_grant_cursor(cursor, "apiKey", within),
        _ID,
    ),
}


def _same(parts: tuple[Any, ...]) -> tuple[Any, ...]:
    """What a list's parts say (an id as its text, an instant in UTC)."""
    return tuple(str(p) if isinstance(p, UUID) else p for p in parts)


@pytest.mark.parametrize("kind", sorted(KINDS))
@given(mine=_parts, other=_parts)
def test_a_cursor_is_taken_back_by_its_own_list_only(
    kind: str, mine: tuple[Any, ...], other: tuple[Any, ...]
) -> None:
    make, read, key = KINDS[kind]
    cursor = make(cursors.list_of(*mine))

    assert read(cursor, cursors.list_of(*mine)) == key
    assert len(cursor) <= cursors.MAX_CURSOR_LENGTH
    assume(_same(mine) != _same(other))
    with pytest.raises(ValidationFailed, match="does not belong to this list"):
        read(cursor, cursors.list_of(*other))


@given(parts=_parts)
def test_a_list_is_named_in_eleven_characters_whatever_defines_it(parts: tuple[Any, ...]) -> None:
    assert len(cursors.list_of(*parts)) == 11


def test_an_instant_is_the_same_list_in_any_time_zone() -> None:
    paris = _AT.astimezone(timezone(timedelta(hours=1)))

    assert cursors.list_of(_ID, paris) == cursors.list_of(_ID, _AT)
    assert cursors.list_of(_ID, _AT + timedelta(microseconds=1)) != cursors.list_of(_ID, _AT)


def test_a_lane_cursor_given_to_another_lane_beside_it_is_not_followed_nor_refused() -> None:
    todo, doing, elsewhere = (cursors.list_of(_ID, lane) for lane in ("Todo", "Doing", "Done"))
    cursor = cursors.card_cursor("V1a", _ID, todo)

    assert cursors.parse_card_cursor(cursor, todo, beside={todo, doing}) == ("V1a", _ID)
    assert cursors.parse_card_cursor(cursor, doing, beside={todo, doing}) is None
    with pytest.raises(ValidationFailed, match="does not belong to this list"):
        cursors.parse_card_cursor(cursor, elsewhere, beside={doing, elsewhere})


@pytest.mark.parametrize(
    ("parts", "read"),
    [
        (["card", "V1a", str(_ID)], lambda c: cursors.parse_card_cursor(c)),
        (["run", _AT.isoformat(), str(_ID)], lambda c: cursors.parse_run_cursor(c)),
        (["activity", 31], lambda c: cursors.parse_activity_cursor(c)),
        (["invitation", str(_ID)], lambda c: cursors.parse_grant_cursor(c, "invitation")),
    ],
)
def test_a_cursor_of_the_version_before_is_refused_saying_to_start_again(
    parts: list[Any], read: Callable[[str], Any]
) -> None:
    old = base64.urlsafe_b64encode(json.dumps(parts).encode()).decode().rstrip("=")

    with pytest.raises(ValidationFailed, match=r"earlier version.*first page"):
        read(old)
