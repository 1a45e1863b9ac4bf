"""A command on an aggregate holding a stored event that decodes but that today's ``apply``
refuses is refused with UNDECODABLE naming the aggregate, the version and the event's type,
writes nothing, and leaves every other aggregate's commands alone.

Such an event (a role or a lane today's code no longer knows, an attribute an older writer left
out) reached the aggregate's ``apply`` while the repository folded it, whose error (a
``ValueError``, ``KeyError``, ``AttributeError``) escaped: the command answered INTERNAL. The
projectors read such an event from its payload, never through ``apply``: each one applies it as
its payload says, or parks its aggregate (``agentworks parked list``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from uuid import uuid4

import pytest
from board_helpers import stored_head, whole_log
from eventsourcing.utils import get_topic
from fanout_helpers import parked, projector_side, rows
from parking_helpers import TwoTenants
from pg import log_head
from undecodable import plant_unappliable

from commands import models as m
from commands.access import RevokeInvitation, revoke_invitation
from domain.access import Invitation
from domain.card import Card
from domain.errors import NotFound, UndecodableEvent
from domain.project import Project
from domain.workspace import Workspace
from infra.bootstrap import build_write_side
from projections.registry import all_projectors
from projections.runner import ProjectionRunner
from read_api.errors import error_extensions

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from uuid import UUID

    from commands.handlers import AgentWorks


@dataclass(frozen=True)
class Unappliable:
    """A planted event today's ``apply`` refuses, and a command of tenant ``a`` that must load
    the aggregate it was planted on."""

    kind: str
    target: Callable[[TwoTenants], UUID]
    event_class: Any
    fields: dict[str, Any]
    drop: str
    command: Callable[[AgentWorks, TwoTenants], object]

    @property
    def stored_type(self) -> str:
        return str(self.event_class.__qualname__)


UNAPPLIABLE = {
    "unknown-role": Unappliable(
        "workspace",
        lambda s: s.a.workspace_id,
        Workspace.MemberAdded,
        {"user_id": "zed", "role": "SUPERUSER"},
        "",
        lambda app, s: app.add_member(
            m.AddMember(workspace_id=s.a.workspace_id, user_id="vera", role="VIEWER"), s.a.owner
        ),
    ),
    "unknown-lane": Unappliable(
        "project",
        lambda s: s.a.project_id,
        Project.LanesReordered,
        {"order": ["Gone"]},
        "",
        lambda app, s: app.create_card(
            m.CreateCard(project_id=s.a.project_id, title="new"), s.a.owner
        ),
    ),
    "missing-attribute": Unappliable(
        "card",
        lambda s: s.a1,
        Card.Labelled,
        {"label": "planted"},
        "label",
        lambda app, s: app.label_card(m.LabelCard(card_id=s.a1, label="x"), s.a.owner),
    ),
}


@contextlib.contextmanager
def write_side(database_url: str, app: AgentWorks, *, cached: bool) -> Iterator[AgentWorks]:
    """``app``, which has every aggregate of the scene cached (the library fast-forwards a
    cached aggregate through the new events), or a new write side that folds each from its
    events."""
    if cached:
        yield app
        return
    with contextlib.closing(build_write_side(database_url, pool_size=2)) as fresh:
        yield fresh


@pytest.mark.parametrize("cached", [True, False], ids=["cached", "folded"])
@pytest.mark.parametrize("planted", UNAPPLIABLE.values(), ids=UNAPPLIABLE.keys())
def test_a_command_on_an_aggregate_whose_stored_event_cannot_be_applied_is_undecodable(
    database_url: str, app: AgentWorks, planted: Unappliable, cached: bool
) -> None:
    scene = TwoTenants(app)
    target = planted.target(scene)
    bad = plant_unappliable(app, target, planted.event_class, drop=planted.drop, **planted.fields)
    head = log_head(database_url)
    with write_side(database_url, app, cached=cached) as write:
        for _ in range(2):  # the second after what the first attempt left in the cache
            with pytest.raises(UndecodableEvent) as refused:
                planted.command(write, scene)
            error = refused.value
            assert error.code == "UNDECODABLE"
            assert f"{planted.kind} {target}" in error.message
            assert f"version {bad} ({planted.stored_type})" in error.message
            assert "could not be applied" in error.message
            extensions = error_extensions(error)
            assert (extensions["code"], extensions["version"]) == ("UNDECODABLE", bad)
            assert extensions["at"] is not None
        assert log_head(database_url) == head
        # Another tenant still learns nothing of the card; its own commands go on.
        with pytest.raises(NotFound):
            write.label_card(m.LabelCard(card_id=scene.a1, label="x"), scene.b.owner)
        write.label_card(m.LabelCard(card_id=scene.b1, label="fine"), scene.b.owner)
        write.create_card(m.CreateCard(project_id=scene.b.project_id, title="new"), scene.b.owner)
        if planted.kind == "card":  # the aggregates of the same workspace too
            write.label_card(m.LabelCard(card_id=scene.a2, label="fine"), scene.a.owner)


def test_a_command_on_an_invitation_created_with_a_malformed_time_is_undecodable(
    database_url: str, app: AgentWorks
) -> None:
    """Its first event is the one that cannot be applied: there is no version before it to
    learn its workspace from, so that event's own metadata tells it; its workspace's members
    are told UNDECODABLE, a stranger NOT_FOUND (as for an undecodable first event)."""
    scene = TwoTenants(app)
    invitation = uuid4()
    plant_unappliable(
        app,
        invitation,
        Invitation.Created,
        like=scene.a.workspace_id,
        originator_topic=get_topic(Invitation),
        workspace_id=scene.a.workspace_id,
        email="vera@example.com",
        role="MEMBER",
        token_hash="0" * 64,
        expires_at="next Tuesday",
        invited_by=scene.a.owner.user_id,
    )
    head = log_head(database_url)
    with pytest.raises(UndecodableEvent) as refused:
        revoke_invitation(app, RevokeInvitation(invitation_id=invitation), scene.a.owner)
    assert f"invitation {invitation}" in refused.value.message
    assert "version 1 (Invitation.Created) could not be applied" in refused.value.message
    assert refused.value.version == 1
    with pytest.raises(NotFound):
        revoke_invitation(app, RevokeInvitation(invitation_id=invitation), scene.b.owner)
    assert log_head(database_url) == head


def test_the_projectors_apply_such_events_from_their_payload_or_park_their_aggregate(
    database_url: str, app: AgentWorks
) -> None:
    """Projectors never fold an aggregate: each goes on past every planted event, storing what
    its payload says (a member of a role unknown to the code, a lane order naming no lane) or,
    for the label event without a label (a payload they cannot read), parking that card alone;
    every other event is projected."""
    scene = TwoTenants(app)
    versions = {
        planted.kind: plant_unappliable(
            app, planted.target(scene), planted.event_class, drop=planted.drop, **planted.fields
        )
        for planted in UNAPPLIABLE.values()
    }
    app.label_card(m.LabelCard(card_id=scene.b1, label="after"), scene.b.owner)
    with projector_side(database_url) as (pool, log):
        for projector in all_projectors():
            runner = ProjectionRunner(projector, pool, log)
            runner.process(whole_log(log))
            assert runner.position() == stored_head(log)
    assert parked(database_url) == [
        (name, scene.a1, versions["card"], "Card.Labelled") for name in ("activity", "kanban")
    ]
    member = "SELECT role FROM rm_members WHERE workspace_id = %s AND user_id = 'zed'"
    assert rows(database_url, member, scene.a.workspace_id) == [("SUPERUSER",)]
    ((labels,),) = rows(database_url, "SELECT labels FROM rm_cards WHERE card_id = %s", scene.b1)
    assert "after" in labels
