"""The in-process fan-out the API stacks of the e2e and outage tests run beside their server."""

from __future__ import annotations

from typing import TYPE_CHECKING

from adapters.eventlog import EventLog
from projections.registry import ALL_PROJECTORS
from projections.runner import ProjectionRunner
from streams.embedded import EmbeddedFanout

if TYPE_CHECKING:
    from psycopg import Connection
    from psycopg.rows import DictRow
    from psycopg_pool import ConnectionPool

    from commands.handlers import AgentWorks
    from read_api.broadcast import Broadcaster


def start_embedded_fanout(
    write: AgentWorks,
    projector_pool: ConnectionPool[Connection[DictRow]],
    database_url: str,
    hub: Broadcaster,
) -> EmbeddedFanout:
    """Every projector applying ``write``'s log through ``projector_pool`` and publishing its
    changes to ``hub``, woken by the log's notifications on ``database_url``; started."""
    log = EventLog(write.recorder, write.mapper)  # type: ignore[arg-type]
    runners = [
        ProjectionRunner(projector(), projector_pool, log, on_commit=hub.publish_changes)
        for projector in ALL_PROJECTORS
    ]
    fanout = EmbeddedFanout(log, runners, listen_url=database_url, poll_interval=0.2)
    fanout.start()
    return fanout
