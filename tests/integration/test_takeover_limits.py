"""A run taken over keeps the limits it began with: its timeout counts from its start, not from
the takeover, so a customer's run ends when README says it does however often it changes hands."""

from __future__ import annotations

import pytest
from orchestrator_helpers import (
    card_on_board,
    events_of,
    finished,
    orchestrator_thread,
    start,
    wait_for,
)

from commands import models as m
from commands.handlers import Actor, AgentWorks
from domain.agent_run import AgentRun, RunStatus

pytestmark = pytest.mark.slow


def test_a_run_taken_over_after_its_deadline_times_out_without_another_call(
    write_side: AgentWorks, database_url: str
) -> None:
    """Its worker went silent and the run is taken over 2 s after its start, past its 1.5 s
    timeout: it ends TIMED_OUT at once. Before, the takeover began the timeout afresh, and the
    run was made (and charged) again from the start, up to a whole timeout more per takeover."""
    card = card_on_board(write_side)
    run_id = start(write_side, card)
    actor = Actor.service("orchestrator", card.board.workspace_id)
    write_side.begin_run(m.BeginRun(run_id=run_id, worker="went-silent"), actor)
    with orchestrator_thread(database_url, worker_id="taker", stale_after=2.0, run_timeout=1.5):
        run = wait_for(write_side, run_id, finished, timeout=20.0)
    [reclaimed] = events_of(write_side, run_id, AgentRun.Reclaimed)
    assert reclaimed.worker == "taker"
    assert run.status is RunStatus.TIMED_OUT, run.error
    assert not events_of(write_side, run_id, AgentRun.CallStarted)
    assert run.billed_micros == 0
    [timed_out] = events_of(write_side, run_id, AgentRun.TimedOut)
    assert timed_out.after_seconds >= 1
