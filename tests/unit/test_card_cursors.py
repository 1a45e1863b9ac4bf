"""A lane's card cursors: every ``endCursor`` the API hands out is one it takes back.

A card cursor carries the card's position key, and a key has no length bound: each move into the
same gap (two cards swapped back and forth, cards dropped again and again right after one card)
adds about a character per six moves (``domain.positions``).
"""

from __future__ import annotations

import base64
from uuid import uuid4

import pytest

from domain.errors import ValidationFailed
from domain.positions import position_between
from read_api import cursors


def squeezed(moves: int) -> str:
    """The key of a card after ``moves`` swaps with its neighbour, always dropped before it."""
    low, high = "V1", "V2"
    for _ in range(moves):
        high = position_between(low, high)
    return high


@pytest.mark.parametrize("moves", [10, 3_000])
def test_the_cursor_of_a_card_squeezed_many_times_is_taken_back(moves: int) -> None:
    position, card_id = squeezed(moves), uuid4()

    cursor = cursors.card_cursor(position, card_id)

    assert cursors.parse_card_cursor(cursor) == (position, card_id)


def test_a_forged_card_cursor_nested_beyond_the_parsers_depth_is_validation() -> None:
    forged = base64.urlsafe_b64encode(b"[" * 100_000).decode()

    with pytest.raises(ValidationFailed):
        cursors.parse_card_cursor(forged)
