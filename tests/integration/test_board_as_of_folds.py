"""A board as of any instant shows each card exactly as folding the card's whole history up to
that instant makes it: whichever snapshot ``board_as_of`` starts from, whichever events
PostgreSQL drops by their time, however it decodes them."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any
from uuid import UUID

import psycopg
import pytest
from eventsourcing.persistence import Mapper

from commands import models as m
from domain.card import Card
from domain.errors import AgentWorksError
from domain.meta import EventMeta
from projections.history import _EARLY, _instant, board_as_of, card_state

if TYPE_CHECKING:
    from read_side_helpers import ReadSide, World

LANES = ["Todo", "Doing", "Done"]


def _work(side: ReadSide, world: World, cards: list[UUID], rng: random.Random) -> None:
    """One round: each card gets a save of a few edits or one other command (some refused)."""
    app, actor = side.app, world.owner
    meta = EventMeta.for_command(workspace_id=world.workspace_id, actor=actor.user_id)
    for card_id in cards:
        pick = rng.random()
        card: Card = app.repository.get(card_id)
        try:
            if card.archived:
                if pick < 0.3:
                    app.restore_card(m.RestoreCard(card_id=card_id), actor)
            elif card.blocked_reason is not None and pick < 0.3:
                app.unblock_card(m.UnblockCard(card_id=card_id), actor)
            elif pick < 0.55:
                for i in range(rng.randint(2, 9)):
                    card.edit(title=f"t{rng.random():.6f}", description=f"d{i}", meta=meta)
                app.save(card)
            elif pick < 0.68:
                app.move_card(m.MoveCard(card_id=card_id, to_lane=rng.choice(LANES)), actor)
            elif pick < 0.76:
                who = rng.choice([None, "bob", "carol"])
                app.assign_card(m.AssignCard(card_id=card_id, assignee=who), actor)
            elif pick < 0.84:
                label = rng.choice(["bug", "ui"])
                if rng.random() < 0.6:
                    app.label_card(m.LabelCard(card_id=card_id, label=label), actor)
                else:
                    app.unlabel_card(m.UnlabelCard(card_id=card_id, label=label), actor)
            elif pick < 0.92:
                app.block_card(m.BlockCard(card_id=card_id, reason="waiting"), actor)
            else:
                app.archive_card(m.ArchiveCard(card_id=card_id), actor)
        except AgentWorksError:
            pass  # refused by the rules (a full lane, archived twice ...): nothing written


def _folded(history: list[Any], instant: datetime) -> Card | None:
    """The card as the fold of its whole history up to ``instant`` (no snapshot)."""
    card: Any = None
    for event in history:
        if event.timestamp <= instant:
            card = event.mutate(card)
    return card


class _Unchanged:
    """A compressor that leaves states as they are: a mapper with it reads the same store, but
    ``board_as_of`` must treat the states as opaque (compare times in Python, not in SQL)."""

    def compress(self, data: bytes) -> bytes:
        return data

    def decompress(self, data: bytes) -> bytes:
        return data


def _rewrite_some_states(database_url: str, cards: list[UUID]) -> None:
    """Store a third of the cards' events and snapshots as JSON that does not start with their
    time (as another writer might): PostgreSQL cannot read their times, so it may neither drop
    them by time nor drop an earlier event of their kind for them; the fold decides."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("SET session_replication_role = replica")  # past the immutability trigger
        for table in ("agentworks_events", "agentworks_snapshots"):
            conn.execute(
                f"UPDATE {table} SET state = convert_to(convert_from(state, 'UTF8')::jsonb::text,"
                " 'UTF8') WHERE originator_id = ANY(%s) AND originator_version %% 3 = 0",
                (cards,),
            )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("interval", "opaque", "rewritten"),
    [(100, False, False), (7, False, False), (7, True, False), (7, False, True)],
    ids=[
        "snapshots every 100",
        "every 7",
        "every 7, states read in Python",
        "every 7, some states not read by PostgreSQL",
    ],
)
def test_each_card_on_a_board_as_of_is_its_whole_history_folded(
    side: ReadSide, monkeypatch: pytest.MonkeyPatch, interval: int, opaque: bool, rewritten: bool
) -> None:
    monkeypatch.setattr(side.app, "snapshotting_intervals", {Card: interval})
    mapper = side.app.mapper
    if opaque:
        mapper = Mapper(transcoder=mapper.transcoder, compressor=_Unchanged())
    world = side.new_world()
    app, rng = side.app, random.Random(interval)
    seen = side.envelopes()[-1].position
    cards = [
        app.create_card(m.CreateCard(project_id=world.project_id, title=f"c{n}"), world.owner).id
        for n in range(4)
    ]
    for _ in range(60):
        _work(side, world, cards, rng)
    if rewritten:
        _rewrite_some_states(side.database_url, cards)
    histories = {
        card_id: [app.mapper.to_domain_event(s) for s in app.recorder.select_events(card_id)]
        for card_id in cards
    }
    assert min(len(h) for h in histories.values()) > 100  # every card has a snapshot
    with psycopg.connect(side.database_url) as conn:
        taken = conn.execute(
            "SELECT count(*) FROM agentworks_snapshots WHERE originator_id = ANY(%s)", (cards,)
        ).fetchone()
    assert taken is not None
    assert taken[0] >= len(cards)

    stamps = [e.timestamp for e in side.envelopes(after=seen)]
    first, last = min(stamps), max(stamps)
    instants = [first + (last - first) * rng.random() for _ in range(25)]
    for stamp in rng.sample(stamps, 25):  # right at an event's time, and just before it
        instants += [stamp, stamp - timedelta(microseconds=1)]
    with psycopg.connect(side.database_url) as conn:
        for instant in [*instants, last]:
            board = board_as_of(conn, mapper, project_id=world.project_id, as_of=instant)
            shown = {c.card.id: c.state() for lane in board.lanes for c in lane.cards}
            expected = {}
            for card_id, history in histories.items():
                card = _folded(history, instant)
                if card is not None and not card.archived:
                    expected[card_id] = card_state(card)
            assert shown == expected, instant


_INSTANT = datetime(2026, 3, 4, 5, 6, 7, 500000, tzinfo=UTC)


@pytest.mark.parametrize(
    "stamp",
    [
        _INSTANT,
        _INSTANT - timedelta(microseconds=1),
        _INSTANT + timedelta(microseconds=1),
        _INSTANT.replace(microsecond=0),  # written without its fraction
        _INSTANT + timedelta(seconds=1) - timedelta(microseconds=500000),
        _INSTANT.astimezone(timezone(timedelta(hours=2))),  # another offset, the same time
        _INSTANT.astimezone(timezone(timedelta(hours=-5))) + timedelta(microseconds=1),
        datetime(999, 1, 2, 3, 4, 5, 6, tzinfo=UTC),
    ],
    ids=str,
)
@pytest.mark.parametrize("as_of", [_INSTANT, _INSTANT.astimezone(timezone(timedelta(hours=9)))])
def test_postgresql_compares_a_stored_time_with_the_instant_as_python_does(
    database_url: str, stamp: datetime, as_of: datetime
) -> None:
    stamped = b'{"timestamp":{"_type_":"datetime_iso","_data_":"%s"},"title":"t"}'
    other = b'{"title":"t","timestamp":{"_type_":"datetime_iso","_data_":"%s"}}'
    with psycopg.connect(database_url) as conn:
        for state, expected in [(stamped, stamp <= as_of), (other, None)]:
            row = conn.execute(
                f"SELECT {_EARLY} FROM (SELECT %(state)s::bytea AS state) AS stored",
                {"state": state % stamp.isoformat().encode(), **_instant(as_of)},
            ).fetchone()
            assert row == (expected,), state
