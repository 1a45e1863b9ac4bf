"""A unique clash the data causes is not retried as a write race over and over.

A unique violation in a read model is usually a race (another worker applied an overlapping
delivery first), which a retry resolves. One the events themselves cause (a run's output
recorded twice, planted below the API as an older writer or a repair could leave it) meets the
same key again on every retry: it was retried four times, each a whole batch's transaction,
before the runner looked for the event at fault, and four times more for that event before
parking its run. The same clash again after a retry is now taken for the data's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fanout_helpers import EmbeddedPath, Workload, parked
from structlog.testing import capture_logs
from test_rebuild_duplicate_keys import plant_outputs

if TYPE_CHECKING:
    from commands.handlers import AgentWorks


def test_a_clash_of_the_data_parks_its_run_after_at_most_one_retry(
    database_url: str, app: AgentWorks
) -> None:
    work = Workload(app)
    tenant = work.tenant("clashing", projects=1)
    run_id = work.running_run(tenant)
    first = plant_outputs(app, run_id, "the output", "the output again")
    path = EmbeddedPath(database_url)
    try:
        with capture_logs() as logs:
            path.fanout.drain()
    finally:
        path.stop()
    assert [(p[0], p[1], p[2]) for p in parked(database_url)] == [("runs", run_id, first + 1)]
    retries = [e for e in logs if e["event"] == "projection.batch_retry"]
    assert len(retries) <= 1, retries
