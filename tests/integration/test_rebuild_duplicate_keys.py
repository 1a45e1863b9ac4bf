"""One aggregate's events that clash on a key of a read model do not fail a rebuild.

A rebuild fills the tables a projector only inserts into (run logs, attempts, outputs, ledger
entries) without their keys, and builds the keys once the replay is done. Events that clash on
such a key (a run's output recorded twice, planted below the API as an older writer or a repair
could leave it) made that last step fail: the whole rebuild of the read model was given up,
for every tenant, and with it ``agentworks migrate`` when the model was due for one; live, the
same events only park their run. Now the rebuild of that read model is done again with its keys
in place from the start, so the clash parks the run there too.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING

from fanout_helpers import EmbeddedPath, Workload, parked, projector_side, rebuild_differences
from fanout_helpers import rows as read_rows

from domain.agent_run import AgentRun
from projections.rebuild import rebuild
from projections.runs import RunsProjector

if TYPE_CHECKING:
    from uuid import UUID

    from commands.handlers import AgentWorks


def plant_outputs(app: AgentWorks, run_id: UUID, *outputs: str) -> int:
    """``outputs`` as the run's next ``OutputRecorded`` events; the version of the first."""
    (stored,) = app.recorder.select_events(run_id, desc=True, limit=1)
    last = app.mapper.to_domain_event(stored)
    for i, output in enumerate(outputs, start=1):
        event = AgentRun.OutputRecorded(
            originator_id=run_id,
            originator_version=last.originator_version + i,
            timestamp=datetime.now(UTC),
            meta=dict(last.meta),  # type: ignore[attr-defined]
            output=output,
        )
        app.recorder.insert_events([app.mapper.to_stored_event(event)])
    return int(last.originator_version) + 1


def test_events_clashing_on_a_deferred_key_park_their_run_in_a_rebuild(
    database_url: str, app: AgentWorks
) -> None:
    work = Workload(app)
    clashing = work.tenant("clashing", projects=1)
    other = work.tenant("other", projects=1)
    run_id = work.running_run(clashing)
    first = plant_outputs(app, run_id, "the output", "the output again")
    others = work.running_run(other)
    path = EmbeddedPath(database_url)
    try:
        path.fanout.drain()
    finally:
        path.stop()
    live = [(p[0], p[1], p[2]) for p in parked(database_url)]
    assert live == [("runs", run_id, first + 1)]
    # The test of record: a rebuild from scratch builds what the live path built.
    assert rebuild_differences(database_url) == {}
    with projector_side(database_url) as (pool, log):
        result = rebuild(RunsProjector(), pool, log)
    assert result.swapped
    assert [(p[0], p[1], p[2]) for p in parked(database_url)] == live
    assert read_rows(database_url, "SELECT output FROM rm_run_outputs WHERE run_id = %s",
                     run_id) == [("the output",)]  # fmt: skip
    assert read_rows(database_url, "SELECT status FROM rm_runs WHERE run_id = %s",
                     others) == [("RUNNING",)]  # fmt: skip
