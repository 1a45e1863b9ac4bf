"""A run whose answer came, and was charged, ends SUCCEEDED with it, whatever cuts the record of
that answer: the run's deadline passing, or the orchestrator stopping, while the store is slow to
take the record."""

from __future__ import annotations

import threading
import time
from typing import Any

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
from commands.handlers import Actor, AgentWorks, CommandResult
from domain.agent_run import AgentRun, RunStatus

pytestmark = pytest.mark.slow


def slow_to_record_answers(monkeypatch: pytest.MonkeyPatch, seconds: float) -> threading.Event:
    """Make the write side take ``seconds`` over the record of a call that answered (as a store
    slow to commit does); the event is set when such a record begins."""
    recording = threading.Event()
    real = AgentWorks.record_provider_attempt

    def slow(self: AgentWorks, cmd: m.RecordProviderAttempt, actor: Actor) -> CommandResult:
        if cmd.status == "ok":
            recording.set()
            time.sleep(seconds)
        return real(self, cmd, actor)

    monkeypatch.setattr(AgentWorks, "record_provider_attempt", slow)
    return recording


@pytest.mark.parametrize("cut_by", ["deadline", "stop"])
def test_a_run_whose_answer_came_ends_succeeded_whatever_cuts_its_record(
    write_side: AgentWorks, database_url: str, monkeypatch: pytest.MonkeyPatch, cut_by: str
) -> None:
    """Before, the deadline made the run TIMED_OUT, its answer (charged whole) dropped; the
    orchestrator stopping left it RUNNING, for another to take over and run, and charge, again."""
    card = card_on_board(write_side)
    recording = slow_to_record_answers(monkeypatch, 2.0)
    config: dict[str, Any] = {"run_timeout": 1.5} if cut_by == "deadline" else {}
    with orchestrator_thread(database_url, **config):
        run_id = start(write_side, card)
        assert recording.wait(20.0)
        if cut_by == "deadline":
            wait_for(write_side, run_id, finished)
    run = wait_for(write_side, run_id, finished, timeout=5.0)
    assert run.status is RunStatus.SUCCEEDED, run.error
    assert run.output
    [attempt] = events_of(write_side, run_id, AgentRun.AttemptRecorded)
    assert attempt.status == "ok"
    assert len(events_of(write_side, run_id, AgentRun.LlmCallCompleted)) == 1
