"""Helpers for the parked-aggregate tests: events planted below the API, and "the fix".

A bad upgrade, a manual repair or an older writer can leave events in the log that today's
projectors cannot apply; the tests plant such events straight through the recorder (the API
would refuse them, or cannot produce them at all), as that would.

:func:`install_fix` stands for the deployed fix: an upcaster in the kanban projector that turns
the planted payload into one it can apply. Subprocesses (``agentworks parked retry``) install it
through :data:`FIXED_CLI`. No pytest in here: subprocesses import this module.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from uuid import UUID

import psycopg
from board_helpers import bootstrap_board

from commands import models as m
from domain.card import Card
from projections.kanban import KanbanProjector

if TYPE_CHECKING:
    from collections.abc import Sequence

    from board_helpers import Board
    from read_side_helpers import ReadSide, World

    from commands.handlers import AgentWorks
    from domain.envelope import EventEnvelope
    from projections.base import BatchContext
    from projections.runner import ProjectionRunner

#: What the planted move carries as its position: not the text a board position is.
BAD_POSITION: dict[str, Any] = {"fractional": [1, 2]}

#: ``python -c`` code running the CLI with :func:`install_fix` in place (the arguments follow).
FIXED_CLI = (
    "import sys, parking_helpers; parking_helpers.install_fix();"
    " from infra.cli import run; sys.exit(run(sys.argv[1:]))"
)


def new_card(app: AgentWorks, board: Board, title: str) -> UUID:
    return app.create_card(m.CreateCard(project_id=board.project_id, title=title), board.owner).id


def parked_card(
    side: ReadSide, event_type: str, title: str = "parked"
) -> tuple[World, UUID, ProjectionRunner]:
    """A new card the kanban runner has applied, then parked by hand at its next version (as an
    event of ``event_type`` it failed to apply would park it): its world, id and runner."""
    world = side.new_world()
    card_id = side.app.create_card(
        m.CreateCard(project_id=world.project_id, title=title), world.owner
    ).id
    runner = side.runner(KanbanProjector())
    runner.process(side.envelopes())
    version = side.row("SELECT version FROM rm_cards WHERE card_id = %s", (card_id,))["version"]
    with psycopg.connect(side.database_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO projection_parked (projector, originator_id, originator_version,"
            " position, event_type, workspace_id, error) VALUES ('kanban', %s, %s, 0, %s, %s,"
            " 'planted')",
            (card_id, version + 1, event_type, world.workspace_id),
        )
    return world, card_id, runner


class TwoTenants:
    """Two workspaces (alice's, bob's) and three cards: ``a1`` gets what a test plants (titled
    ``planted_title``), ``a2`` shares its workspace, ``b1`` is another tenant's."""

    planted_title = "planted"

    def __init__(self, app: AgentWorks) -> None:
        self.app = app
        self.a = bootstrap_board(app, owner="alice")
        self.b = bootstrap_board(app, owner="bob")
        self.a1 = new_card(app, self.a, self.planted_title)
        self.a2 = new_card(app, self.a, "same workspace")
        self.b1 = new_card(app, self.b, "other workspace")
        self.bad_version = 0


def _last_meta(app: AgentWorks, card_id: UUID) -> tuple[int, dict[str, str]]:
    (stored,) = app.recorder.select_events(card_id, desc=True, limit=1)
    last = app.mapper.to_domain_event(stored)
    return last.originator_version, dict(last.meta)  # type: ignore[attr-defined]


def plant(app: AgentWorks, event: Any) -> None:
    """Append ``event`` to the store below the API (no command, no aggregate rule)."""
    app.recorder.insert_events([app.mapper.to_stored_event(event)])


def _plant_next(app: AgentWorks, card_id: UUID, event_class: Any, **fields: Any) -> int:
    """An ``event_class`` event with ``fields``, planted as the card's next version with its
    last event's metadata; that version."""
    version, meta = _last_meta(app, card_id)
    plant(
        app,
        event_class(
            originator_id=card_id,
            originator_version=version + 1,
            timestamp=datetime.now(UTC),
            meta=meta,
            **fields,
        ),
    )
    return version + 1


def plant_unprojectable_move(app: AgentWorks, card_id: UUID) -> int:
    """A ``Card.Moved`` whose position the kanban projector cannot store; its version."""
    return _plant_next(
        app, card_id, Card.Moved, from_lane="Todo", to_lane="Doing", position=BAD_POSITION
    )


def plant_block(app: AgentWorks, card_id: UUID, reason: str) -> int:
    """A ``Card.Blocked`` with ``reason`` as given (NUL and all); its version."""
    return _plant_next(app, card_id, Card.Blocked, reason=reason)


FIXED_POSITION = "V"


def _upcast(envelope: EventEnvelope) -> EventEnvelope:
    if envelope.type == "Card.Moved" and not isinstance(envelope.payload.get("position"), str):
        return envelope.model_copy(
            update={"payload": {**envelope.payload, "position": FIXED_POSITION}}
        )
    return envelope


def install_fix() -> None:
    """Teach the kanban projector's fold the planted payload."""
    apply_batch = KanbanProjector.apply_batch

    def fixed_apply_batch(
        self: KanbanProjector, ctx: BatchContext, envelopes: Sequence[EventEnvelope]
    ) -> None:
        apply_batch(self, ctx, [_upcast(env) for env in envelopes])

    KanbanProjector.apply_batch = fixed_apply_batch  # type: ignore[method-assign]
