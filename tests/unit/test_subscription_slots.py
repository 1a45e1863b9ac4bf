"""Subscription slots: a subscribe is refused exactly when a limit would be passed, and every
slot given back makes room again."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from domain.errors import RateLimited
from read_api.subscription_limits import SubscriptionSlots

# (user, connection, take?) steps; a "give back" ends the oldest subscription of that connection.
steps = st.lists(st.tuples(st.sampled_from("ab"), st.integers(0, 3), st.booleans()), max_size=200)


@given(
    per_connection=st.integers(1, 6),
    per_user=st.integers(1, 10),
    script=steps,
)
def test_refused_exactly_over_a_limit_and_every_slot_comes_back(
    per_connection: int, per_user: int, script: list[tuple[str, int, bool]]
) -> None:
    slots = SubscriptionSlots(per_connection=per_connection, per_user=per_user)
    held: dict[tuple[str, int], int] = {}
    for user, connection, take in script:
        key = (user, connection)
        if take:
            on_connection = held.get(key, 0)
            by_user = sum(n for (u, _), n in held.items() if u == user)
            allowed = on_connection < per_connection and by_user < per_user
            try:
                slots.take(user, held_by_connection=on_connection)
            except RateLimited:
                assert not allowed
            else:
                assert allowed
                held[key] = on_connection + 1
        elif held.get(key):
            slots.give_back(user)
            held[key] -= 1
        for name in "ab":
            assert slots.active(name) == sum(n for (u, _), n in held.items() if u == name)
            assert slots.active(name) <= per_user
    for (user, _), count in held.items():
        for _ in range(count):
            slots.give_back(user)
    assert slots.active("a") == slots.active("b") == 0


def test_the_refusal_names_the_limit() -> None:
    slots = SubscriptionSlots(per_connection=2, per_user=3)
    with pytest.raises(RateLimited, match="this connection already has 2 active"):
        slots.take("u", held_by_connection=2)
    for held in range(2):
        slots.take("u", held_by_connection=held)
    slots.take("u", held_by_connection=0)
    with pytest.raises(RateLimited, match="user u already has 3 active"):
        slots.take("u", held_by_connection=0)


@pytest.mark.parametrize(("per_connection", "per_user"), [(0, 1), (1, 0)])
def test_limits_below_one_are_refused(per_connection: int, per_user: int) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        SubscriptionSlots(per_connection=per_connection, per_user=per_user)
