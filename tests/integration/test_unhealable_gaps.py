"""A delivered event whose earlier versions the store does not hold parks its aggregate; the
projector goes on with every other one.

A delivery ahead of the tracked version is healed from the store. When the store lacks the
versions in between (a message from another deployment's store on a shared topic, or topics
that outlived a database restored to an earlier point), the runner raised "store is missing
versions", for the whole batch, and the worker retried that batch every second, for ever: no
event of any tenant in it, or after it, was applied. It is one aggregate's problem: now that
aggregate is parked at the first missing version, visible to an operator, and the rest applied.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from board_helpers import bootstrap_board, whole_log
from fanout_helpers import projector_side, rows

from commands import models as m
from projections.kanban import KanbanProjector
from projections.runner import ProjectionRunner

if TYPE_CHECKING:
    from commands.handlers import AgentWorks


def test_a_gap_the_store_cannot_fill_parks_that_aggregate_alone(
    database_url: str, app: AgentWorks
) -> None:
    a, b = bootstrap_board(app, owner="alice"), bootstrap_board(app, owner="bob")
    a1 = app.create_card(m.CreateCard(project_id=a.project_id, title="a1"), a.owner).id
    b1 = app.create_card(m.CreateCard(project_id=b.project_id, title="b1"), b.owner).id
    with projector_side(database_url) as (pool, log):
        runner = ProjectionRunner(KanbanProjector(), pool, log)
        runner.process(whole_log(log))
        app.label_card(m.LabelCard(card_id=a1, label="x"), a.owner)
        app.label_card(m.LabelCard(card_id=b1, label="fine"), b.owner)
        labelled = whole_log(log, runner.position())
        # a1's label as a store that went further would have it: two versions on.
        ahead = [
            env.model_copy(update={"originator_version": env.originator_version + 2})
            if env.originator_id == a1
            else env
            for env in labelled
        ]
        outcome = runner.process(ahead)
        # What the store holds is healed (the label itself); the first version it lacks parks.
        assert [(p.originator_id, p.originator_version) for p in outcome.parked] == [
            (a1, labelled[0].originator_version + 1)
        ]
        assert outcome.healed == 1
        # Delivered again (a worker's retry, a restart): held behind it, no error.
        assert runner.process(ahead).held == 1
        ((error,),) = rows(database_url, "SELECT error FROM projection_parked")
        assert "missing" in error
        # An operator's retry finds nothing more in the store: the card is live again (and
        # parked anew if such a delivery comes again).
        (retried,) = runner.retry_parked()
        assert (retried.applied, retried.parked) == (0, None)
        assert rows(database_url, "SELECT 1 FROM projection_parked") == []
    found = dict(rows(database_url, "SELECT card_id, labels FROM rm_cards"))
    assert (found[a1], found[b1]) == (["x"], ["fine"])
