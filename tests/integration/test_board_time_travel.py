"""Board time travel: the board folded from the store at any instant equals what the Kanban read
model showed right after the last write before that instant."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any
from uuid import UUID

import psycopg
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from hypothesis_profiles import expensive_property

from commands import models as m
from domain.card import Card
from domain.errors import AgentWorksError
from domain.project import Project
from projections.history import NotYet, board_as_of, card_state
from projections.kanban import KanbanProjector

if TYPE_CHECKING:
    from read_side_helpers import ReadSide, World

LANE_NAMES = ["Todo", "Doing", "Done"]
index = st.integers(min_value=0, max_value=20)
words = st.text(alphabet="abcxyz -", min_size=1, max_size=12).filter(str.strip)

board_operations = st.one_of(
    st.tuples(st.just("create"), st.integers(0, 2), words),
    st.tuples(st.just("move"), index, st.integers(0, 3)),
    st.tuples(st.just("edit"), index, words),
    st.tuples(st.just("assign"), index, st.sampled_from([None, "bob", "carol"])),
    st.tuples(st.just("label"), index, st.sampled_from(["bug", "ui"]), st.booleans()),
    st.tuples(st.just("block"), index, st.booleans()),
    st.tuples(st.just("archive"), index, st.booleans()),
    st.tuples(st.just("wip"), st.integers(0, 3), st.sampled_from([None, 1, 4])),
    st.tuples(st.just("rename_lane"), st.integers(0, 3), st.sampled_from(["Todo", "Later", "QA"])),
    st.tuples(st.just("add_lane"), st.sampled_from(["Review", "Todo", "Later"])),
)


def _send(side: ReadSide, world: World, cards: list[UUID], op: tuple[Any, ...]) -> bool:
    """Run one operation; False when the rules refused it (nothing written)."""
    app, actor, project = side.app, world.owner, world.project_id
    board: Project = app.repository.get(project)
    lanes = [lane.name for lane in board.lanes]
    pick = cards[op[1] % len(cards)] if cards and isinstance(op[1], int) else None
    kind = op[0]
    try:
        if kind == "create":
            result = app.create_card(
                m.CreateCard(project_id=project, title=op[2], lane=lanes[op[1] % len(lanes)]),
                actor,
            )
            cards.append(result.id)
        elif pick is None and kind in ("move", "edit", "assign", "label", "block", "archive"):
            return False
        elif kind == "move":
            app.move_card(m.MoveCard(card_id=pick, to_lane=lanes[op[2] % len(lanes)]), actor)
        elif kind == "edit":
            app.update_card(m.UpdateCard(card_id=pick, title=op[2]), actor)
        elif kind == "assign":
            app.assign_card(m.AssignCard(card_id=pick, assignee=op[2]), actor)
        elif kind == "label":
            command = m.LabelCard if op[3] else m.UnlabelCard
            getattr(app, "label_card" if op[3] else "unlabel_card")(
                command(card_id=pick, label=op[2]), actor
            )
        elif kind == "block":
            if op[2]:
                app.block_card(m.BlockCard(card_id=pick, reason="waiting"), actor)
            else:
                app.unblock_card(m.UnblockCard(card_id=pick), actor)
        elif kind == "archive":
            if op[2]:
                app.archive_card(m.ArchiveCard(card_id=pick), actor)
            else:
                app.restore_card(m.RestoreCard(card_id=pick), actor)
        elif kind == "wip":
            lane = lanes[op[1] % len(lanes)]
            app.set_wip_limit(m.SetWipLimit(project_id=project, lane=lane, wip_limit=op[2]), actor)
        elif kind == "rename_lane":
            lane = lanes[op[1] % len(lanes)]
            app.rename_lane(m.RenameLane(project_id=project, lane=lane, name=op[2]), actor)
        elif kind == "add_lane":
            app.add_lane(m.AddLane(project_id=project, name=op[1]), actor)
    except AgentWorksError:
        return False
    return True


def read_model_board(side: ReadSide, project_id: UUID) -> dict[str, Any]:
    """The board as the Kanban read model shows it, in the shape of ``BoardAt.as_dict``."""
    version = side.row("SELECT version FROM rm_projects WHERE project_id = %s", (project_id,))
    lanes = side.rows(
        "SELECT name, wip_limit, card_count FROM rm_lanes WHERE project_id = %s ORDER BY ord",
        (project_id,),
    )
    cards = side.rows(
        "SELECT * FROM rm_cards WHERE project_id = %s AND NOT archived", (project_id,)
    )
    by_lane: dict[str, list[dict[str, Any]]] = {lane["name"]: [] for lane in lanes}
    for row in sorted(cards, key=lambda r: (r["position"], r["card_id"])):
        by_lane[row["lane"]].append(
            {
                "id": str(row["card_id"]),
                "projectId": str(row["project_id"]),
                "title": row["title"],
                "description": row["description"],
                "lane": row["lane"],
                "position": row["position"],
                "assignee": row["assignee"],
                "labels": list(row["labels"]),
                "blockedReason": row["blocked_reason"],
                "archived": row["archived"],
                "version": row["version"],
                "createdAt": row["created_at"],
                "updatedAt": row["updated_at"],
            }
        )
    return {
        "version": version["version"],
        "lanes": [
            {"name": lane["name"], "wipLimit": lane["wip_limit"], "count": lane["card_count"],
             "cards": by_lane[lane["name"]]}
            for lane in lanes
        ],
    }  # fmt: skip


def folded_board(side: ReadSide, project_id: UUID, as_of: datetime) -> dict[str, Any]:
    with psycopg.connect(side.database_url) as conn:
        board = board_as_of(conn, side.app.mapper, project_id=project_id, as_of=as_of).as_dict()
    del board["projectId"], board["asOf"]
    for lane in board["lanes"]:
        for card in lane["cards"]:
            card["createdAt"] = datetime.fromisoformat(card["createdAt"])
            card["updatedAt"] = datetime.fromisoformat(card["updatedAt"])
    return board


@pytest.mark.slow
@expensive_property(dev=40, ci=40)
@given(operations=st.lists(board_operations, min_size=1, max_size=14))
@example(  # a lane renamed, its old name reused by a new lane, cards in both
    operations=[
        ("rename_lane", 0, "Later"),
        ("add_lane", "Todo"),
        ("create", 3, "in the new Todo"),
        ("move", 0, 3),
        ("rename_lane", 3, "QA"),
        ("archive", 1, True),
        ("archive", 1, False),
    ]
)
def test_board_as_of_each_write_equals_the_read_model_right_after_it(
    side: ReadSide, operations: list[tuple[Any, ...]]
) -> None:
    world = side.new_world()
    kanban = KanbanProjector()
    cards: list[UUID] = []
    seen = side.envelopes()[-1].position
    captured: list[tuple[datetime, dict[str, Any]]] = []
    for op in [("create", 0, "first"), *operations]:
        if not _send(side, world, cards, op):
            continue
        written = side.envelopes(after=seen)
        if not written:  # accepted, but changed nothing
            continue
        seen = written[-1].position
        side.project(kanban)
        # A command's events are stamped one after the other; its instant is the last stamp.
        instant = max(envelope.timestamp for envelope in written)
        captured.append((instant, read_model_board(side, world.project_id)))
    for instant, shown in captured:
        assert folded_board(side, world.project_id, instant) == shown, instant
        # Each card at the version the read model showed is the history's state at that version
        # (the cardHistory path: the repository, from snapshots); lanes renamed since the card
        # entered them are the board's business, not the card's.
        for lane in shown["lanes"]:
            for card in lane["cards"]:
                then = card_state(
                    side.app.card_at(UUID(card["id"]), world.owner, version=card["version"])
                )
                expected = card | {"createdAt": then["createdAt"], "updatedAt": then["updatedAt"]}
                assert then | {"lane": card["lane"]} == expected
                assert datetime.fromisoformat(then["updatedAt"]) == card["updatedAt"]


def test_a_card_with_snapshots_is_folded_from_the_right_one(side: ReadSide) -> None:
    world = side.new_world()
    app, actor = side.app, world.owner
    card_id = app.create_card(m.CreateCard(project_id=world.project_id, title="t0"), actor).id
    instants: dict[int, datetime] = {}
    for i in range(1, 251):
        app.update_card(m.UpdateCard(card_id=card_id, title=f"t{i}"), actor)
        if i in (98, 99, 150, 199, 250):
            instants[i + 1] = max(e.timestamp for e in side.envelopes()[-3:])
    with psycopg.connect(side.database_url) as conn:
        snapshots = conn.execute(
            "SELECT originator_version FROM agentworks_snapshots WHERE originator_id = %s"
            " ORDER BY originator_version",
            (card_id,),
        ).fetchall()
    assert [v for (v,) in snapshots] == [100, 200]
    for version, instant in instants.items():
        with psycopg.connect(side.database_url) as conn:
            board = board_as_of(conn, app.mapper, project_id=world.project_id, as_of=instant)
        (card,) = board.lanes[0].cards
        assert card.state() == card_state(app.card_at(card_id, actor, version=version))


def test_before_the_project_existed_is_not_yet(side: ReadSide) -> None:
    world = side.new_world()
    created = side.envelopes()[-1].timestamp
    with psycopg.connect(side.database_url) as conn, pytest.raises(NotYet):
        board_as_of(
            conn,
            side.app.mapper,
            project_id=world.project_id,
            as_of=created - timedelta(days=1),
        )


def test_a_snapshot_folded_card_in_a_reused_lane_name_stays_in_its_lane(side: ReadSide) -> None:
    world = side.new_world()
    app, actor, project = side.app, world.owner, world.project_id
    old_todo = app.create_card(m.CreateCard(project_id=project, title="old", lane="Todo"), actor)
    app.rename_lane(m.RenameLane(project_id=project, lane="Todo", name="Later"), actor)
    app.add_lane(m.AddLane(project_id=project, name="Todo"), actor)
    card_id = app.create_card(m.CreateCard(project_id=project, title="new", lane="Todo"), actor).id
    for i in range(120):  # a snapshot at version 100 hides when the card entered "Todo"
        app.update_card(m.UpdateCard(card_id=card_id, title=f"new {i}"), actor)
    app.update_card(m.UpdateCard(card_id=old_todo.id, title="old, edited"), actor)
    side.project(KanbanProjector())
    instant = max(e.timestamp for e in side.envelopes()[-3:])
    board = folded_board(side, project, instant)
    assert board == read_model_board(side, project)
    lanes = {lane["name"]: [c["title"] for c in lane["cards"]] for lane in board["lanes"]}
    assert lanes["Todo"] == ["new 119"]
    assert lanes["Later"] == ["old, edited"]


def test_a_snapshot_is_no_earlier_than_the_version_it_holds(
    side: ReadSide, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A command is stamped after what it decided on, even when that was stamped by a host whose
    clock is ahead; the snapshot taken of it right after was stamped by this host's clock, before
    the version it holds, so a board as of an instant between the two folded from it showed
    the card at that version ahead of its time."""
    import commands.service as service

    world = side.new_world()
    app, actor = side.app, world.owner
    monkeypatch.setattr(app, "snapshotting_intervals", {Card: 5})
    card_id = app.create_card(m.CreateCard(project_id=world.project_id, title="t1"), actor).id

    class Ahead(datetime):
        @classmethod
        def now(cls, tz: Any = None) -> Any:
            return datetime.now(tz) + timedelta(seconds=2)

    with monkeypatch.context() as ahead:
        ahead.setattr(service, "datetime", Ahead)
        for n in range(2, 5):  # another host's commands
            app.update_card(m.UpdateCard(card_id=card_id, title=f"t{n}"), actor)
    app.update_card(m.UpdateCard(card_id=card_id, title="t5"), actor)
    events = [app.mapper.to_domain_event(s) for s in app.recorder.select_events(card_id)]
    assert [e.timestamp for e in events] == sorted(e.timestamp for e in events)
    assert app.snapshots is not None
    (snapshot,) = app.snapshots.get(card_id)
    assert snapshot.originator_version == 5
    assert snapshot.timestamp >= events[4].timestamp
    between = events[3].timestamp + (events[4].timestamp - events[3].timestamp) / 2
    with psycopg.connect(side.database_url) as conn:
        board = board_as_of(conn, app.mapper, project_id=world.project_id, as_of=between)
    (card,) = board.lanes[0].cards
    assert (card.card.version, card.card.title) == (4, "t4")
