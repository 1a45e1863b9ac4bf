from __future__ import annotations

import itertools
import random
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from domain.errors import ValidationFailed
from domain.positions import (
    ALPHABET,
    FIRST_POSITION,
    is_valid_position,
    position_between,
    positions_for,
)

# Digits at the edges of the alphabet are where carries and borrows happen.
digits = st.one_of(st.sampled_from(ALPHABET), st.sampled_from("01yzUVW"))


def integer_length(head: str) -> int:
    """Digits after the head, as the module documents: V=1 … z=31 going up, U=1 … 0=31 down."""
    value = ALPHABET.index(head)
    return value - 30 if value >= 31 else 31 - value


@st.composite
def position_keys(draw: st.DrawFn) -> str:
    head = draw(st.one_of(st.sampled_from("TUVWX"), st.sampled_from(ALPHABET)))
    integer = "".join(
        draw(st.lists(digits, min_size=integer_length(head), max_size=integer_length(head)))
    )
    fraction = "".join(draw(st.lists(digits, max_size=5)))
    key = head + integer + fraction
    if key.endswith("0"):
        key += draw(st.sampled_from(ALPHABET[1:]))
    return key


def two_distinct_keys() -> st.SearchStrategy[tuple[str, str]]:
    return st.tuples(position_keys(), position_keys()).filter(lambda pair: pair[0] != pair[1])


def assert_strictly_increasing(keys: list[str]) -> None:
    for low, high in itertools.pairwise(keys):
        assert low < high, (low, high)


# --- position_between ------------------------------------------------------------------------


def test_first_key_of_an_empty_lane_is_valid() -> None:
    assert position_between(None, None) == FIRST_POSITION
    assert is_valid_position(FIRST_POSITION)


@given(two_distinct_keys())
def test_key_between_two_neighbours_lies_strictly_between_them(pair: tuple[str, str]) -> None:
    low, high = sorted(pair)
    key = position_between(low, high)
    assert low < key < high
    assert is_valid_position(key)


@given(position_keys())
def test_key_after_the_last_card_sorts_after_it(last: str) -> None:
    key = position_between(last, None)
    assert key > last
    assert is_valid_position(key)


@given(position_keys())
def test_key_before_the_first_card_sorts_before_it(first: str) -> None:
    key = position_between(None, first)
    assert key < first
    assert is_valid_position(key)


@pytest.mark.parametrize(
    "key",
    [
        "0" * 31 + "1",  # smallest integer key
        "0" * 32 + "1",  # inside the fraction space below it
        "0" * 33 + "01",
        "z" * 32,  # largest integer key
        "z" * 32 + "z",
    ],
)
def test_keys_exist_beyond_the_extreme_integers(key: str) -> None:
    assert is_valid_position(key)
    below = position_between(None, key)
    above = position_between(key, None)
    assert below < key < above
    assert is_valid_position(below)
    assert is_valid_position(above)


@given(two_distinct_keys())
def test_neighbours_out_of_order_are_refused(pair: tuple[str, str]) -> None:
    low, high = sorted(pair)
    with pytest.raises(ValidationFailed, match="strictly below"):
        position_between(high, low)


@given(position_keys())
def test_same_key_on_both_sides_is_refused(key: str) -> None:
    with pytest.raises(ValidationFailed, match="strictly below"):
        position_between(key, key)


INVALID_KEYS: list[Any] = [
    "",
    "V",
    "V0",
    "W1",
    "W10",
    "V1-",
    "V1 ",
    "Vé",
    "V1\n",
    "0" * 31,
    5,
    b"V1",
]


@pytest.mark.parametrize("key", INVALID_KEYS)
def test_invalid_keys_are_not_valid(key: Any) -> None:
    assert not is_valid_position(key)


@pytest.mark.parametrize("key", INVALID_KEYS)
def test_position_between_refuses_invalid_neighbours_and_names_them(key: Any) -> None:
    with pytest.raises(ValidationFailed, match="not a valid position") as refused:
        position_between(key, None)
    assert repr(key) in str(refused.value)
    with pytest.raises(ValidationFailed, match="not a valid position"):
        position_between(None, key)


@given(position_keys())
def test_generated_keys_are_valid(key: str) -> None:
    assert is_valid_position(key)


@given(st.one_of(position_keys(), st.text(alphabet=ALPHABET, max_size=40)))
def test_key_ending_in_zero_is_never_valid(text: str) -> None:
    assert not is_valid_position(text + "0")


# --- sequences of moves ----------------------------------------------------------------------


@given(st.lists(st.integers(min_value=0, max_value=10**6), max_size=300))
def test_random_insertions_keep_the_lane_sorted_and_unique(choices: list[int]) -> None:
    lane: list[str] = []
    for choice in choices:
        gap = choice % (len(lane) + 1)
        before = lane[gap - 1] if gap > 0 else None
        after = lane[gap] if gap < len(lane) else None
        lane.insert(gap, position_between(before, after))
    assert_strictly_increasing(lane)
    assert all(is_valid_position(key) for key in lane)


def test_thousands_of_random_moves_keep_keys_short() -> None:
    rng = random.Random(20240601)
    lane = positions_for(50)
    for _ in range(5_000):
        lane.pop(rng.randrange(len(lane)))
        gap = rng.randrange(len(lane) + 1)
        before = lane[gap - 1] if gap > 0 else None
        after = lane[gap] if gap < len(lane) else None
        lane.insert(gap, position_between(before, after))
    assert_strictly_increasing(lane)
    assert max(len(key) for key in lane) <= 12


def test_ten_thousand_appends_keep_keys_at_most_four_characters() -> None:
    lane = [position_between(None, None)]
    for _ in range(9_999):
        lane.append(position_between(lane[-1], None))
    assert_strictly_increasing(lane)
    assert max(len(key) for key in lane) <= 4


def test_ten_thousand_prepends_keep_keys_at_most_four_characters() -> None:
    lane = [position_between(None, None)]
    for _ in range(9_999):
        lane.insert(0, position_between(None, lane[0]))
    assert_strictly_increasing(lane)
    assert max(len(key) for key in lane) <= 4


def test_repeated_insertion_into_one_gap_grows_keys_only_linearly() -> None:
    low, high = "V1", "V2"
    for count in range(1, 601):
        high = position_between(low, high)
        assert low < high
        assert len(high) <= 3 + count // 4
    low, high = "V1", "V2"
    for count in range(1, 601):
        low = position_between(low, high)
        assert low < high
        assert len(low) <= 3 + count // 4


# --- positions_for ---------------------------------------------------------------------------


@given(st.integers(min_value=0, max_value=5_000))
def test_positions_for_gives_n_increasing_valid_keys_of_equal_length(n: int) -> None:
    keys = positions_for(n)
    assert len(keys) == n
    assert_strictly_increasing(keys)
    assert all(is_valid_position(key) for key in keys)
    assert len({len(key) for key in keys}) <= 1


@given(st.integers(min_value=1, max_value=2_000))
def test_seeded_positions_leave_room_in_every_gap(n: int) -> None:
    keys = positions_for(n)
    width = len(keys[0])
    bounds = [None, *keys, None]
    for before, after in itertools.pairwise(bounds):
        assert len(position_between(before, after)) <= width


def test_positions_for_spreads_keys_evenly() -> None:
    assert positions_for(3) == ["VF", "VU", "Vj"]


@pytest.mark.parametrize("n", [-1, 1.5, True, "3"])
def test_positions_for_refuses_a_bad_count(n: Any) -> None:
    with pytest.raises(ValidationFailed, match="number of positions"):
        positions_for(n)
