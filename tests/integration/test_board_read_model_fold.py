"""The board read model says what the write side's board says, after any mix of board commands.

The Project aggregate (the fold of the board's events) is the truth: its lanes in order with their
WIP limits, which live cards sit in each lane and in which order, and the board's version. After
random card moves (with neighbours), creates, archives, restores and lane changes (add, rename,
reorder, remove, WIP limit), the Kanban read model must show exactly that: the lanes, each lane's
count, each live card's lane and position in board order, and every archived card as archived.
That includes re-spreads: a run of moves squeezing into one gap passes the key-length threshold,
and the lane's cards get fresh keys through the normal pipeline.
"""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import psycopg
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis_profiles import expensive_property
from psycopg.rows import dict_row
from read_side_helpers import ReadSide, World, squeeze

from commands import models as m
from domain.card import Card
from domain.errors import AgentWorksError
from domain.positions import RESPREAD_THRESHOLD
from domain.project import Project
from projections.activity import ActivityProjector
from projections.history import board_as_of
from projections.kanban import KanbanProjector
from read_api.eventlog import card_events

pick = st.integers(min_value=0, max_value=1_000)
operations = st.lists(
    st.one_of(
        st.tuples(st.just("create"), pick),
        st.tuples(st.just("move"), pick, pick, pick, st.sampled_from(["end", "after", "before"])),
        st.tuples(st.just("move"), pick, pick, pick, st.sampled_from(["end", "after", "before"])),
        st.tuples(st.just("archive"), pick),
        st.tuples(st.just("restore"), pick, st.none() | pick),
        st.tuples(st.just("wip"), pick, st.none() | st.integers(1, 4)),
        st.tuples(st.just("add_lane"), pick, st.sampled_from(["QA", "Todo", "Ready"])),
        st.tuples(st.just("rename_lane"), pick, st.sampled_from(["QA", "Todo", "Shipped", "X"])),
        st.tuples(st.just("reorder"), st.randoms(use_true_random=False)),
        st.tuples(st.just("remove_lane"), pick),
        st.tuples(st.just("block"), pick, st.booleans()),
        st.tuples(st.just("squeeze"), pick, pick),
    ),
    min_size=5,
    max_size=30,
)


def send(side: ReadSide, world: World, cards: list[UUID], op: tuple[Any, ...]) -> None:
    app, owner, project_id = side.app, world.owner, world.project_id
    board: Project = app.aggregate(Project, project_id)
    lanes = [spec.name for spec in board.lanes]
    kind, *args = op
    if kind == "create":
        made = app.create_card(
            m.CreateCard(project_id=project_id, title="c", lane=lanes[args[0] % len(lanes)]),
            owner,
        )
        cards.append(made.id)
        return
    if kind in ("add_lane", "rename_lane", "remove_lane", "wip", "reorder"):
        if kind == "add_lane":
            index, name = args
            add = m.AddLane(project_id=project_id, name=name, index=index % (len(lanes) + 1))
            app.add_lane(add, owner)
        elif kind == "rename_lane":
            lane, name = args
            app.rename_lane(
                m.RenameLane(project_id=project_id, lane=lanes[lane % len(lanes)], name=name),
                owner,
            )
        elif kind == "remove_lane":
            app.remove_lane(
                m.RemoveLane(project_id=project_id, lane=lanes[args[0] % len(lanes)]), owner
            )
        elif kind == "wip":
            lane, limit = args
            name = lanes[lane % len(lanes)]
            app.set_wip_limit(
                m.SetWipLimit(project_id=project_id, lane=name, wip_limit=limit), owner
            )
        else:
            order = list(lanes)
            args[0].shuffle(order)
            app.reorder_lanes(m.ReorderLanes(project_id=project_id, order=order), owner)
        return
    if not cards:
        return
    card_id = cards[args[0] % len(cards)]
    if kind == "squeeze":
        squeeze(side, world, board.lanes[args[1] % len(lanes)].name, card_id)
        return
    if kind == "move":
        _, lane, neighbour, where = args
        to_lane = lanes[lane % len(lanes)]
        others = [cid for _, cid in board.cards_in(to_lane) if cid != card_id]
        after = before = None
        if others and where == "after":
            after = others[neighbour % len(others)]
        elif others and where == "before":
            before = others[neighbour % len(others)]
        move = m.MoveCard(
            card_id=card_id, to_lane=to_lane, after_card_id=after, before_card_id=before
        )
        app.move_card(move, owner)
    elif kind == "archive":
        app.archive_card(m.ArchiveCard(card_id=card_id), owner)
    elif kind == "restore":
        lane = None if args[1] is None else lanes[args[1] % len(lanes)]
        app.restore_card(m.RestoreCard(card_id=card_id, lane=lane), owner)
    elif kind == "block":
        if args[1]:
            app.block_card(m.BlockCard(card_id=card_id, reason="waiting"), owner)
        else:
            app.unblock_card(m.UnblockCard(card_id=card_id), owner)


def assert_read_model_is_the_fold(side: ReadSide, world: World, cards: list[UUID]) -> None:
    board: Project = side.app.aggregate(Project, world.project_id)
    lanes = side.rows(
        "SELECT name, ord, wip_limit, card_count FROM rm_lanes WHERE project_id = %s ORDER BY ord",
        (world.project_id,),
    )
    assert [(row["name"], row["ord"], row["wip_limit"], row["card_count"]) for row in lanes] == [
        (spec.name, i, spec.wip_limit, board.count(spec.name)) for i, spec in enumerate(board.lanes)
    ]
    version = side.row(
        "SELECT version FROM rm_projects WHERE project_id = %s", (world.project_id,)
    )["version"]
    assert version == board.version
    for spec in board.lanes:
        shown = side.rows(
            "SELECT card_id, position FROM rm_cards WHERE project_id = %s AND lane = %s"
            " AND NOT archived ORDER BY position, card_id",
            (world.project_id, spec.name),
        )
        assert [(row["position"], row["card_id"]) for row in shown] == board.cards_in(spec.name)
    for card_id in cards:
        card: Card = side.app.aggregate(Card, card_id)
        row = side.row(
            "SELECT archived, version, position FROM rm_cards WHERE card_id = %s", (card_id,)
        )
        assert (row["archived"], row["version"]) == (card.archived, card.version)
        assert row["archived"] == (card_id not in board.placements)


@settings(expensive_property(dev=15, ci=30))
@given(ops=operations)
@example(ops=[("create", 0), ("create", 0), ("create", 0), ("create", 0), ("squeeze", 0, 0)])
def test_the_board_read_model_equals_the_write_sides_board(
    shared_side: ReadSide, ops: list[tuple[Any, ...]]
) -> None:
    side = shared_side
    world = side.new_world()
    cards: list[UUID] = []
    for i, op in enumerate(ops):
        with contextlib.suppress(AgentWorksError):  # a rule refused it: part of the game
            send(side, world, cards, op)
        if i % 3 == 2:
            side.project(KanbanProjector())
    side.project(KanbanProjector())
    assert_read_model_is_the_fold(side, world, cards)


def test_a_re_spread_reaches_the_board_its_cards_histories_and_the_board_as_of_now(
    shared_side: ReadSide,
) -> None:
    side = shared_side
    world = side.new_world()
    app, owner = side.app, world.owner
    cards = [
        app.create_card(m.CreateCard(project_id=world.project_id, title=f"c{n}"), owner).id
        for n in range(5)
    ]
    squeeze(side, world, "Todo", cards[1])
    board: Project = app.aggregate(Project, world.project_id)
    keys = board.cards_in("Todo")
    assert max(len(key) for key, _ in keys) <= RESPREAD_THRESHOLD
    outcome = side.project(KanbanProjector())
    side.project(ActivityProjector())
    assert_read_model_is_the_fold(side, world, cards)

    with psycopg.connect(side.database_url, row_factory=dict_row) as conn:
        histories = {
            card_id: card_events(conn, app.mapper, card_id=card_id, workspace_id=world.workspace_id)
            for card_id in cards
        }
        folded = board_as_of(conn, app.mapper, project_id=world.project_id, as_of=datetime.now(UTC))
    respread = {
        card_id: [e for e in events if e.type == "Card.Respread"]
        for card_id, events in histories.items()
    }
    # The lane's first card is the one every squeeze goes after: re-keyed, never moved by anyone.
    first = keys[0][1]
    assert respread[first], "no re-spread in the history of the lane's first card"
    assert [e.type for e in histories[first]] == [
        "Card.Created",
        *["Card.Respread"] * len(respread[first]),
    ]
    for event in respread[first]:
        assert event.payload["lane"] == "Todo"
        assert len(event.payload["position"]) <= RESPREAD_THRESHOLD
        assert event.metadata["actor"] == owner.user_id
    assert app.aggregate(Card, first).position == board.placements[first].position
    # The board's subscribers hear of each re-keyed card as of a move, at the re-spread's place.
    told = [
        change.payload
        for change in outcome.changes
        if change.channel == f"board:{world.project_id}" and change.payload["cardId"] == str(first)
    ]
    assert [p["position"] for p in told if p["kind"] == "card.moved"] == [
        e.position for e in respread[first]
    ]
    # The board as of now, folded from the log for an audit, orders the lane as the board does.
    (todo,) = [lane for lane in folded.lanes if lane.name == "Todo"]
    assert [(c.card.position, c.card.id) for c in todo.cards] == keys
    # The activity feed shows the moves, not the board's re-keying of the cards around them.
    kinds = side.rows(
        "SELECT DISTINCT kind FROM rm_activity WHERE project_id = %s AND card_id IS NOT NULL",
        (world.project_id,),
    )
    assert {row["kind"] for row in kinds} == {"card.created", "card.moved"}
