"""A command on an aggregate holding a stored event that cannot be decoded is refused with
UNDECODABLE naming the aggregate and the version, writes nothing, and leaves every other
aggregate's commands alone.

The write side loads what a command touches through the library's repository, which decoded each
stored event with the mapper and let its error escape (``TopicError``, a JSON error): the command
answered INTERNAL, and the CLI printed a traceback.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from uuid import UUID, uuid4

import pytest
from parking_helpers import TwoTenants
from read_side_helpers import SQUEEZES, ReadSide
from test_board_read_model_fold import assert_read_model_is_the_fold
from test_cli import agentworks, assert_one_line_error
from undecodable import RENAMED, plant_renamed, plant_unappliable, plant_undecodable

from commands import models as m
from commands.handlers import Actor
from commands.service import USER_SCOPE
from domain.errors import Forbidden, NotFound, UndecodableEvent
from domain.positions import RESPREAD_THRESHOLD
from domain.project import Project
from domain.workspace import Workspace
from projections.kanban import KanbanProjector
from read_api.errors import error_extensions

if TYPE_CHECKING:
    from pathlib import Path

    from commands.handlers import AgentWorks


def stored_versions(app: AgentWorks, aggregate_id: UUID) -> list[int]:
    return [e.originator_version for e in app.recorder.select_events(aggregate_id)]


@pytest.mark.parametrize("broken_json", [False, True], ids=["unknown-topic", "broken-json"])
def test_a_command_on_an_unreadable_card_is_refused_as_undecodable(
    app: AgentWorks, broken_json: bool
) -> None:
    scene = TwoTenants(app)
    bad = plant_undecodable(app, scene.a1, broken_json=broken_json, then_good=False)
    before = stored_versions(app, scene.a1)
    for _ in range(2):  # the second from the cache the first attempt left behind
        with pytest.raises(UndecodableEvent) as refused:
            app.label_card(m.LabelCard(card_id=scene.a1, label="x"), scene.a.owner)
        error = refused.value
        assert error.code == "UNDECODABLE"
        assert f"card {scene.a1}" in error.message
        assert f"version {bad}" in error.message
        extensions = error_extensions(error)
        assert (extensions["code"], extensions["version"]) == ("UNDECODABLE", bad)
        assert (extensions["at"] is None) == broken_json
        if not broken_json:
            assert RENAMED in error.message
    assert stored_versions(app, scene.a1) == before
    # Another tenant still learns nothing of the card, and a viewer may still not change it.
    with pytest.raises(NotFound):
        app.label_card(m.LabelCard(card_id=scene.a1, label="x"), scene.b.owner)
    workspace = scene.a.workspace_id
    vera = m.AddMember(workspace_id=workspace, user_id="vera", role="VIEWER")
    app.add_member(vera, scene.a.owner)
    viewer = Actor(user_id="vera", workspace_id=str(workspace))
    with pytest.raises(Forbidden):
        app.label_card(m.LabelCard(card_id=scene.a1, label="x"), viewer)
    # Every other aggregate goes on, in the same workspace and in another.
    app.label_card(m.LabelCard(card_id=scene.a2, label="fine"), scene.a.owner)
    app.label_card(m.LabelCard(card_id=scene.b1, label="fine"), scene.b.owner)
    assert stored_versions(app, scene.a2)[-1] == 2


def test_a_command_on_a_card_of_an_unreadable_project_is_refused_as_undecodable(
    app: AgentWorks,
) -> None:
    scene = TwoTenants(app)
    bad = plant_renamed(app, scene.a.project_id)
    with pytest.raises(UndecodableEvent) as refused:
        app.create_card(m.CreateCard(project_id=scene.a.project_id, title="new"), scene.a.owner)
    assert f"project {scene.a.project_id}" in refused.value.message
    assert refused.value.version == bad
    app.create_card(m.CreateCard(project_id=scene.b.project_id, title="new"), scene.b.owner)


@pytest.mark.parametrize("unappliable", [False, True], ids=["renamed", "unappliable"])
def test_the_cli_exits_1_naming_the_unreadable_workspace(
    database_url: str, app: AgentWorks, tmp_path: Path, unappliable: bool
) -> None:
    """The event under a class name that no longer resolves, or one that decodes and that the
    workspace's apply refuses (a role it no longer knows)."""
    scene = TwoTenants(app)
    workspace_id = scene.a.workspace_id
    if unappliable:
        bad = plant_unappliable(
            app, workspace_id, Workspace.MemberAdded, user_id="zed", role="SUPERUSER"
        )
    else:
        bad = plant_renamed(app, workspace_id)
    environment = {"AGENTWORKS_DATABASE_URL": database_url, "AGENTWORKS_LOG_LEVEL": "ERROR"}
    credit = agentworks(
        "credit", "--workspace", str(workspace_id), "--amount", "1", "--reason", "x",
        cwd=tmp_path, env=environment,
    )  # fmt: skip
    line = assert_one_line_error(credit, code=1)
    assert f"workspace {workspace_id}" in line
    assert f"version {bad}" in line


@pytest.mark.parametrize("broken_json", [False, True], ids=["unknown-topic", "broken-json"])
def test_moves_that_re_spread_around_an_unreadable_card_succeed(
    side: ReadSide, broken_json: bool
) -> None:
    """A re-spread re-keys the cards around a crowded gap, each told its key by an event of its
    own; one of them that could not be loaded failed the move of another card. Now its key is
    kept and the re-spread goes around it."""
    world = side.new_world()
    app, owner = side.app, world.owner
    cards = [
        app.create_card(m.CreateCard(project_id=world.project_id, title=f"c{n}"), owner).id
        for n in range(6)
    ]
    unreadable = cards[0]  # the lane's first card: every squeeze goes right after it
    plant_undecodable(app, unreadable, broken_json=broken_json, then_good=False)
    key = app.aggregate(Project, world.project_id).placements[unreadable].position
    for n in range(SQUEEZES):
        order = [cid for _, cid in app.aggregate(Project, world.project_id).cards_in("Todo")]
        mover = order[2 + n % (len(order) - 2)]
        others = [cid for cid in order if cid != mover]
        app.move_card(
            m.MoveCard(
                card_id=mover, to_lane="Todo", after_card_id=others[0], before_card_id=others[1]
            ),
            owner,
        )
    board = app.aggregate(Project, world.project_id)
    assert board.placements[unreadable].position == key
    assert max(len(k) for k, _ in board.cards_in("Todo")) <= RESPREAD_THRESHOLD
    told = [e for c in cards[1:] for e in app.recorder.select_events(c) if "Respread" in e.topic]
    assert told, "no re-spread happened; the test tests nothing"
    side.project(KanbanProjector())
    assert_read_model_is_the_fold(side, world, cards[1:])


def _plant_unreadable_card(app: AgentWorks, like: UUID, *, broken_json: bool) -> UUID:
    """A new card of ``like``'s workspace whose very first stored event cannot be decoded: its
    class renamed (its state, and so its workspace, still readable) or, with ``broken_json``,
    its state not JSON (nothing of it readable)."""
    (first,) = app.recorder.select_events(like, limit=1)
    module, _, qualname = first.topic.partition(":")
    card_id = uuid4()
    app.recorder.insert_events(
        [
            type(first)(
                originator_id=card_id,
                originator_version=1,
                topic=first.topic if broken_json else f"{module}:{qualname}Retired",
                state=b'{"title": "planted", "meta' if broken_json else first.state,
            )
        ]
    )
    return card_id


@pytest.mark.parametrize("where", ["later-event", "first-event", "first-event-not-json"])
@pytest.mark.parametrize("credential", ["workspace", "user"])
def test_a_stranger_learns_nothing_of_another_workspaces_unreadable_card(
    app: AgentWorks, where: str, credential: str
) -> None:
    """A stranger naming another tenant's card that cannot be loaded got UNDECODABLE, its
    version and stored type (with a user token, whatever the event; with any token, when the
    card's first event was the unreadable one): that it exists, and what broke. They get what an
    id that exists nowhere gets; the card's members still learn it is UNDECODABLE."""
    scene = TwoTenants(app)
    if where == "later-event":
        plant_undecodable(app, scene.a1, then_good=False)
        card = scene.a1
    else:
        card = _plant_unreadable_card(app, scene.a1, broken_json=where == "first-event-not-json")
    stranger = scene.b.owner
    if credential == "user":
        stranger = Actor(user_id=stranger.user_id, workspace_id=USER_SCOPE)
    nowhere = uuid4()
    for named in (card, nowhere):
        with pytest.raises(NotFound) as refused:
            app.label_card(m.LabelCard(card_id=named, label="x"), stranger)
        assert refused.value.message == f"card {named} does not exist"
        assert error_extensions(refused.value) == {"code": "NOT_FOUND"}
    member = scene.a.owner
    if credential == "user":
        member = Actor(user_id=member.user_id, workspace_id=USER_SCOPE)
    if where == "first-event-not-json":
        # Nothing tells whose card it is: nobody is told more than that it does not exist.
        with pytest.raises(NotFound):
            app.label_card(m.LabelCard(card_id=card, label="x"), member)
    else:
        with pytest.raises(UndecodableEvent):
            app.label_card(m.LabelCard(card_id=card, label="x"), member)
