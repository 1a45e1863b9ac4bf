"""Lane re-spread: a placement whose key would pass RESPREAD_THRESHOLD gives the lane fresh keys.

Keys grow by about one character per five moves into one gap; without a re-spread a busy lane's
keys grow for ever. These hold the board (the Project aggregate) and the keys themselves to: the
keys stay within the bound after any sequence of moves, the order is exactly the one a plain list
of the same moves has, a WIP limit never fires for it, and every re-keyed card is told.
"""

from __future__ import annotations

import itertools
import random
from uuid import UUID, uuid4

from aw_builders import collect, meta, new_card
from hypothesis import given, settings
from hypothesis import strategies as st

from domain.card import Card
from domain.positions import (
    MAX_RESPREAD_CARDS,
    RESPREAD_TARGET,
    RESPREAD_THRESHOLD,
    is_valid_position,
    position_between,
    positions_for,
    positions_spread_between,
    respread,
)
from domain.project import LaneSpec, Project

CARDS = [uuid4() for _ in range(12)]

#: Runs of moves squeezing into one gap (right after the lane's first card, or right before its
#: last: the one pattern that lengthens keys, a character per five moves) among moves anywhere.
squeezes = st.integers(1, 120)
moves = st.lists(
    st.one_of(
        st.tuples(st.just("squeeze_front"), st.integers(0, 11), squeezes),
        st.tuples(st.just("squeeze_back"), st.integers(0, 11), squeezes),
        st.tuples(st.just("anywhere"), st.integers(0, 11), st.integers(0, 12)),
        st.tuples(st.just("lane"), st.integers(0, 11), st.sampled_from(["Todo", "Done"])),
        st.tuples(st.just("lift"), st.integers(0, 11)),
    ),
    min_size=1,
    max_size=25,
)


def _board(wip_limit: int | None = None) -> Project:
    workspace_id = uuid4()
    project = Project.create(
        project_id=uuid4(),
        workspace_id=workspace_id,
        name="P",
        lanes=[LaneSpec("Todo", wip_limit), LaneSpec("Done")],
        meta=meta(workspace_id),
    )
    for card in CARDS:
        project.place_card(card, "Todo", meta=meta(workspace_id))
    collect(project)
    return project


def _apply(project: Project, reference: dict[str, list[UUID]], op: tuple[object, ...]) -> None:
    """One move on the board, and the same on ``reference`` (plain lists of card ids)."""
    mt = meta(project.workspace_id)
    kind, index, *rest = op
    card = CARDS[int(str(index))]
    if kind == "lift":
        if card in project.placements:
            reference[project.lane_of(card)].remove(card)
            project.lift_card(card, meta=mt)
        return
    lane = str(rest[0]) if kind == "lane" else "Todo"
    if card in project.placements:
        reference[project.lane_of(card)].remove(card)
    others = reference[lane]
    after = before = None
    if kind == "squeeze_front" and others:
        after = others[0]
        before = others[1] if len(others) > 1 else None
    elif kind == "squeeze_back" and others:
        before = others[-1]
        after = others[-2] if len(others) > 1 else None
    elif kind == "anywhere" and others:
        gap = int(str(rest[0])) % (len(others) + 1)
        after = others[gap - 1] if gap else None
        before = others[gap] if gap < len(others) else None
    if card in project.placements:
        project.move_card(card, lane, after_card_id=after, before_card_id=before, meta=mt)
    else:
        project.place_card(card, lane, after_card_id=after, before_card_id=before, meta=mt)
    at = others.index(before) if before is not None else len(others)
    others.insert(at, card)


def _steps(op: tuple[object, ...]) -> list[tuple[object, ...]]:
    """A squeeze run as its single moves (the cards taken in turn); any other move as it is."""
    kind, card, *rest = op
    if kind not in ("squeeze_front", "squeeze_back"):
        return [op]
    first, times = int(str(card)), int(str(rest[0]))
    return [(kind, (first + n) % len(CARDS)) for n in range(times)]


@settings(max_examples=60, deadline=None)
@given(moves)
def test_after_any_moves_keys_stay_within_the_bound_and_the_order_is_the_reference_order(
    ops: list[tuple[object, ...]],
) -> None:
    project = _board()
    reference: dict[str, list[UUID]] = {"Todo": list(CARDS), "Done": []}
    for step in itertools.chain.from_iterable(_steps(op) for op in ops):
        _apply(project, reference, step)
        for lane, expected in reference.items():
            keys = project.cards_in(lane)
            assert [card for _, card in keys] == expected
            assert all(len(key) <= RESPREAD_THRESHOLD for key, _ in keys), keys


def test_squeezing_into_one_gap_re_spreads_the_lane_and_keeps_its_order() -> None:
    project = _board()
    reference = {"Todo": list(CARDS), "Done": []}
    respreads = 0
    for n in range(400):
        _apply(project, reference, ("squeeze_front", n % len(CARDS)))
        events = collect(project)
        rekeyed = [e for e in events if isinstance(e, Project.CardMoved)][:-1]
        if rekeyed:
            respreads += 1
            # A run of the lane's cards around the gap, each moved within the lane, before the
            # move that needed the room, all with short keys.
            lane = reference["Todo"]
            at = sorted(lane.index(e.card_id) for e in events)
            assert at == list(range(at[0], at[0] + len(events)))
            assert all(e.from_lane == e.to_lane == "Todo" for e in rekeyed)
            assert all(len(e.position) <= RESPREAD_TARGET for e in events)
        assert [card for _, card in project.cards_in("Todo")] == reference["Todo"]
    assert respreads >= 2  # ~150 squeezes reach the threshold; a re-spread buys as many again


def test_a_re_spread_in_a_lane_at_its_wip_limit_is_no_wip_breach() -> None:
    project = _board(wip_limit=len(CARDS))
    reference = {"Todo": list(CARDS), "Done": []}
    for n in range(200):
        _apply(project, reference, ("squeeze_front", n % len(CARDS)))
    assert project.count("Todo") == len(CARDS)
    assert max(len(key) for key, _ in project.cards_in("Todo")) <= RESPREAD_THRESHOLD


def test_archived_cards_keep_their_place_out_of_the_re_spread_and_come_back_in_order() -> None:
    project = _board()
    reference = {"Todo": list(CARDS), "Done": []}
    _apply(project, reference, ("lift", 5))
    for n in range(200):
        _apply(project, reference, ("squeeze_front", [0, 1, 2][n % 3]))
    assert CARDS[5] in project.lifted
    assert CARDS[5] not in project.placements
    _apply(project, reference, ("anywhere", 5, 3))
    assert [card for _, card in project.cards_in("Todo")] == reference["Todo"]


def test_a_re_spread_card_records_its_fresh_key_in_its_lane() -> None:
    card = new_card(title="t", description="d")
    collect(card)
    card.respread("Doing", "V5", meta=meta(card.workspace_id))
    (event,) = collect(card)
    assert isinstance(event, Card.Respread)
    assert (card.lane, card.position) == ("Doing", "V5")


# -- the keys -------------------------------------------------------------------------------------


def _squeezed_lane(size: int, squeezes: int, seed: int) -> tuple[list[str], int]:
    """A lane of ``size`` seeded keys with ``squeezes`` keys pushed into one gap; and that gap."""
    rng = random.Random(seed)
    keys = positions_for(size)
    gap = rng.randrange(1, size)
    for _ in range(squeezes):
        keys.insert(gap, position_between(keys[gap - 1], keys[gap]))
    return keys, gap


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 1_500), st.integers(0, 300), st.integers(0, 2**32), st.integers(0, 3))
def test_a_re_spread_keeps_every_key_in_order_and_bounds_its_window(
    size: int, squeezes: int, seed: int, shift: int
) -> None:
    keys, gap = _squeezed_lane(size, squeezes, seed)
    gap = min(len(keys), gap + shift)
    spread = respread(keys, gap)
    assert spread is not None
    assert spread.end - spread.start <= MAX_RESPREAD_CARDS
    lane = keys[: spread.start] + spread.keys + keys[spread.end :]
    assert lane[spread.gap] == spread.newcomer
    assert all(low < high for low, high in itertools.pairwise(lane))
    assert all(is_valid_position(key) for key in spread.keys)
    assert spread.start <= gap <= spread.end
    if len(keys) <= MAX_RESPREAD_CARDS or squeezes < MAX_RESPREAD_CARDS // 2:
        assert max(len(key) for key in spread.keys) <= RESPREAD_TARGET


@given(st.sampled_from(["V1", "V3zzzzzzzz1", "W11", "Vz"]), st.integers(1, 600))
def test_keys_spread_between_two_keys_lie_strictly_between_them(before: str, n: int) -> None:
    after = position_between(before, None)
    for low, high in [
        (before, after),
        (before, position_between(before, after)),
        (before, None),
        (None, before),
    ]:
        spread = positions_spread_between(low, high, n)
        assert len(spread) == n
        bounded = [key for key in [low, *spread, high] if key is not None]
        assert all(a < b for a, b in itertools.pairwise(bounded))
        assert all(is_valid_position(key) for key in spread)
    # A window at an end of the lane spreads over the free integer beyond its long neighbour.
    assert max(map(len, positions_spread_between("V3zzzzzzzzzzzzzzzzz1", None, n))) <= 5


@settings(max_examples=5, deadline=None)
@given(st.integers(0, 2**32))
def test_a_long_lane_squeezed_in_one_place_keeps_its_keys_within_the_bound(seed: int) -> None:
    """Beyond MAX_RESPREAD_CARDS only a window is re-spread: squeezing 3,000 times into one spot
    of a 1,500-card lane (taking cards from anywhere) keeps every key within the threshold
    (plus a little slack: beyond the cap it is not guaranteed) where, without re-spreads, keys
    would reach 600 characters."""
    rng = random.Random(seed)
    keys = positions_for(1_500)
    gap = 700
    for _ in range(3_000):
        keys.pop(rng.randrange(len(keys)))
        key = position_between(keys[gap - 1], keys[gap])
        if len(key) > RESPREAD_THRESHOLD:
            spread = respread(keys, gap)
            if spread is not None:
                assert spread.end - spread.start <= MAX_RESPREAD_CARDS
                keys[spread.start : spread.end] = spread.keys
                continue
        keys.insert(gap, key)
    assert all(low < high for low, high in itertools.pairwise(keys))
    assert max(len(key) for key in keys) <= RESPREAD_THRESHOLD + 4


@settings(max_examples=60, deadline=None)
@given(
    st.integers(2, 1_500),
    st.integers(0, 300),
    st.integers(0, 2**32),
    st.lists(st.integers(-3, 3), max_size=4),
)
def test_a_re_spread_leaves_fixed_keys_as_they_are_and_every_key_in_order(
    size: int, squeezes: int, seed: int, near: list[int]
) -> None:
    """Cards the board cannot re-key (their events cannot be read) keep their keys: the window
    stops at them, and what it spreads around them stays strictly in order and valid."""
    keys, gap = _squeezed_lane(size, squeezes, seed)
    fixed = sorted({min(len(keys) - 1, max(0, gap + offset)) for offset in near})
    spread = respread(keys, gap, fixed)
    if spread is None:
        return
    assert not any(spread.start <= index < spread.end for index in fixed)
    assert spread.start <= gap <= spread.end
    assert spread.end - spread.start <= MAX_RESPREAD_CARDS
    lane = keys[: spread.start] + spread.keys + keys[spread.end :]
    assert lane[spread.gap] == spread.newcomer
    assert all(low < high for low, high in itertools.pairwise(lane))
    assert all(is_valid_position(key) for key in spread.keys)
    if not fixed:
        assert spread == respread(keys, gap)


def test_squeezing_next_to_a_fixed_card_re_spreads_around_it() -> None:
    project = _board()
    reference = {"Todo": list(CARDS), "Done": []}
    fixed = CARDS[0]  # the card every squeeze goes after
    key = project.placements[fixed].position
    mt = meta(project.workspace_id)
    respreads = 0
    for n in range(400):
        others = [card for card in reference["Todo"] if card != CARDS[1 + n % 11]]
        mover = CARDS[1 + n % 11]
        reference["Todo"] = [*others[:1], mover, *others[1:]]
        project.move_card(
            mover, "Todo", after_card_id=others[0], before_card_id=others[1], fixed={fixed},
            meta=mt,
        )  # fmt: skip
        events = collect(project)
        assert fixed not in {e.card_id for e in events}
        respreads += len(events) > 1
        assert [card for _, card in project.cards_in("Todo")] == reference["Todo"]
        assert max(len(k) for k, _ in project.cards_in("Todo")) <= RESPREAD_THRESHOLD
    assert respreads >= 2
    assert project.placements[fixed].position == key
