"""Two rebuilds of one read model at once take turns; neither corrupts what goes live.

Both would replay into the same scratch tables (``<table>__rebuild``) under the same scratch
tracking: the second's start dropped the first's tables with the events already replayed into
them, the first went on writing into the second's, and swapped that mix in, with tracking that
said every event was applied: rows went missing from the live read model for good. (Two
terminals, or a scheduled ``agentworks rebuild all`` meeting a manual one, are enough.) Now a
rebuild holds a lock per read model for as long as it runs, and a second one waits for it.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from fanout_helpers import Workload, rebuild_differences

from adapters.eventlog import EventLog
from adapters.postgres import PROJECTOR_ROLE, make_pool
from projections.kanban import KanbanProjector
from projections.rebuild import rebuild, rebuild_many
from projections.registry import all_projectors

if TYPE_CHECKING:
    from commands.handlers import AgentWorks


def test_a_second_rebuild_of_a_read_model_waits_for_the_first(
    database_url: str, write_side: AgentWorks
) -> None:
    work = Workload(write_side, seed=5)
    tenant = work.tenant("turns", projects=1)
    for index in range(30):
        work.card(tenant, f"card {index}")
    log = EventLog(write_side.recorder, write_side.mapper)  # type: ignore[arg-type]
    pool = make_pool(database_url, role=PROJECTOR_ROLE, max_size=6)
    rebuild_many(all_projectors(), pool, log)  # every read model live, as the log says
    errors: list[BaseException] = []
    second_started, first_done = threading.Event(), threading.Event()

    def second_progress(position: int, head: int) -> None:
        second_started.set()
        first_done.wait(30)

    def second() -> None:
        try:
            rebuild(KanbanProjector(), pool, log, batch_size=3, progress=second_progress)
        except BaseException as error:  # noqa: BLE001 - reported by the test
            errors.append(error)

    other = threading.Thread(target=second)

    def first_progress(position: int, head: int) -> None:
        if not other.is_alive() and not second_started.is_set() and not first_done.is_set():
            other.start()
            # The second rebuild gets as far as it may before this one goes on.
            second_started.wait(3)

    try:
        try:
            rebuild(KanbanProjector(), pool, log, batch_size=10, progress=first_progress)
        finally:
            first_done.set()
            other.join(60)
    finally:
        pool.close()
    assert errors == []
    assert rebuild_differences(database_url) == {}
