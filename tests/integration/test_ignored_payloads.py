"""Projectors that ignore an event type do not decode its payloads.

The board (kanban) and the activity feed follow runs but only count their log chunks (the
largest events there are): a rebuild of them still parsed every chunk's stored state, and one
chunk that could not be decoded parked its run on the board and in the feed as well as in the
run logs, whose read model does show it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING

from fanout_helpers import EmbeddedPath, Workload, parked, projector_side
from structlog.testing import capture_logs

from commands import models as m
from domain.envelope import UNDECODABLE, UNREAD
from projections.activity import ActivityProjector
from projections.kanban import KanbanProjector
from projections.rebuild import rebuild_many
from projections.runs import RunsProjector

if TYPE_CHECKING:
    from uuid import UUID

    from commands.handlers import AgentWorks

CHUNK = "AgentRun.LogChunkAppended"


def plant_broken_chunk(app: AgentWorks, run_id: UUID) -> int:
    """A log chunk of ``run_id`` whose stored state is not JSON, as its next version (after a
    good chunk); returns that version."""
    (last,) = app.recorder.select_events(run_id, desc=True, limit=1)
    (chunk,) = [e for e in app.recorder.select_events(run_id) if "LogChunkAppended" in e.topic]
    broken = type(chunk)(
        originator_id=run_id,
        originator_version=last.originator_version + 1,
        topic=chunk.topic,
        state=b'{"lines": [{"seq": 1, "te',
    )
    app.recorder.insert_events([broken])
    return int(broken.originator_version)


def a_run_with_a_broken_chunk(app: AgentWorks) -> tuple[UUID, int]:
    work = Workload(app)
    tenant = work.tenant("logs", projects=1)
    run_id = work.running_run(tenant)
    line = m.LogLineInput(at=datetime.now(UTC), stream="stdout", text="compiling")
    app.append_run_log(m.AppendRunLog(run_id=run_id, lines=[line]), tenant.orchestrator)
    return run_id, plant_broken_chunk(app, run_id)


def test_an_undecodable_log_chunk_parks_its_run_only_where_chunks_are_read(
    database_url: str, app: AgentWorks
) -> None:
    run_id, version = a_run_with_a_broken_chunk(app)
    path = EmbeddedPath(database_url)
    try:
        path.fanout.drain()
    finally:
        path.stop()
    assert [(p[0], p[1], p[2], p[3]) for p in parked(database_url)] == [
        ("runs", run_id, version, CHUNK)
    ]


def test_a_rebuild_of_projectors_that_ignore_log_chunks_does_not_decode_them(
    database_url: str, app: AgentWorks
) -> None:
    run_id, version = a_run_with_a_broken_chunk(app)
    with projector_side(database_url) as (pool, log):
        with capture_logs() as logs:
            results = rebuild_many([KanbanProjector(), ActivityProjector()], pool, log)
        assert all(r.swapped for r in results)
        # Not decoded (the broken one would have been logged), nor parked anywhere.
        assert [e for e in logs if e["event"] == "eventlog.undecodable_event"] == []
        assert parked(database_url) == []
        # The chunks are read for where they are and what they are, without their payload.
        envelopes, *_ = log.read_following(0, 1000, {"AgentRun"}, unread={CHUNK})
        chunks = [e for e in envelopes if e.type == CHUNK]
        assert [e.originator_version for e in chunks] == [version - 1, version]
        assert all(UNREAD in e.metadata and not e.payload for e in chunks)
        # A rebuild that shows the chunks decodes them, and parks the run at the broken one.
        with capture_logs() as logs:
            rebuild_many([RunsProjector()], pool, log)
        assert [e["position"] for e in logs if e["event"] == "eventlog.undecodable_event"]
        read = log.read_following(0, 1000, {"AgentRun"})[0]
        assert [UNDECODABLE in e.metadata for e in read if e.type == CHUNK] == [False, True]
        assert [(p[0], p[1], p[2]) for p in parked(database_url)] == [("runs", run_id, version)]
