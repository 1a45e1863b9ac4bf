"""An event whose values exceed a limit of PostgreSQL parks its aggregate, like any event its
projector cannot apply.

A card's position is a fractional-index key, and keys grow with every insertion into one gap
(``domain.positions``: "which no scheme can avoid"): after enough moves to one spot a key no
longer fits a btree index entry (about 2.7 kB), and PostgreSQL refuses the row of
``rm_cards_board_idx`` with ``program_limit_exceeded`` (SQLSTATE 54000). psycopg raises that as
an ``OperationalError``, which the runner took for a failure of the database: it raised instead
of parking, and the fan-out tried the same batch again and again, so no board of any tenant
changed after it. The limit is the data's fault: now that card is parked and the rest goes on.
The long key is planted below the API (thousands of moves would make it the same way).
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

from board_helpers import bootstrap_board, to_the_head
from fanout_helpers import EmbeddedPath, rows
from parking_helpers import _plant_next

from commands import models as m
from domain.card import Card

if TYPE_CHECKING:
    from commands.handlers import AgentWorks

#: As a key grows, its fraction's digits: no run that compression would fold.
LONG_KEY = "V1" + "".join(hashlib.sha256(str(i).encode()).hexdigest() for i in range(100)) + "1"


def test_a_position_too_long_for_the_board_index_parks_its_card_alone(
    database_url: str, write_side: AgentWorks
) -> None:
    app = write_side
    a, b = bootstrap_board(app, owner="alice"), bootstrap_board(app, owner="bob")
    a1 = app.create_card(m.CreateCard(project_id=a.project_id, title="long key"), a.owner).id
    b1 = app.create_card(m.CreateCard(project_id=b.project_id, title="other"), b.owner).id
    path = EmbeddedPath(database_url)
    try:
        path.fanout.drain()
        version = _plant_next(
            app, a1, Card.Moved, from_lane="Todo", to_lane="Doing", position=LONG_KEY
        )
        app.move_card(m.MoveCard(card_id=b1, to_lane="Doing"), b.owner)
        path.fanout.drain()
        ((lane,),) = rows(database_url, "SELECT lane FROM rm_cards WHERE card_id = %s", b1)
        assert lane == "Doing"
        ((projector, originator, parked_version, error),) = rows(
            database_url,
            "SELECT projector, originator_id, originator_version, error FROM projection_parked",
        )
        assert (projector, originator, parked_version) == ("kanban", a1, version)
        assert "index row" in error
        head = to_the_head(
            path.fanout.drain, lambda: min(path.fanout.positions().values()), path.log
        )
        assert set(path.fanout.positions().values()) == {head}
    finally:
        path.stop()
