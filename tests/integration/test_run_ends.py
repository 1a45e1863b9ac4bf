"""How a run ends, as the customer paying for it is told: a run taken over keeps the limits it
began with (its timeout counts from its start, its attempts from its first call, not from the
takeover), and a run whose answer came ends SUCCEEDED with it, whatever cuts the record of that
answer (the run's deadline passing, or the orchestrator stopping, while the store is slow)."""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
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

from adapters.providers.base import ChatRequest, Piece, TransientProviderError
from commands import models as m
from commands.handlers import Actor, AgentWorks, CommandResult
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


def test_a_run_taken_over_makes_no_more_calls_than_its_attempts_allow(
    write_side: AgentWorks, database_url: str
) -> None:
    """Its worker made two calls, both failing, and went silent; at three attempts a run, the
    taker makes one more, not three. Before, each takeover began the count afresh: the run made
    (and was charged for) up to AGENTWORKS_PROVIDER_MAX_ATTEMPTS calls more per takeover."""
    card = card_on_board(write_side)
    run_id = start(write_side, card)
    actor = Actor.service("orchestrator", card.board.workspace_id)
    write_side.begin_run(m.BeginRun(run_id=run_id, worker="went-silent"), actor)
    for number in (1, 2):
        write_side.record_provider_attempt(
            m.RecordProviderAttempt(
                run_id=run_id, worker="went-silent", call_id=f"call-{number}",
                provider="simulated", model="sim-1", status="failed", http_status=503,
                error="simulated unavailable", latency_ms=5, input_tokens=0, output_tokens=0,
                started_at=datetime.now(UTC),
            ),
            actor,
        )  # fmt: skip
    with orchestrator_thread(
        database_url, {"simulated": Unavailable()}, worker_id="taker", stale_after=1.0,
        max_attempts=3,
    ):  # fmt: skip
        run = wait_for(write_side, run_id, finished, timeout=20.0)
    assert events_of(write_side, run_id, AgentRun.Reclaimed)
    assert run.status is RunStatus.FAILED
    assert "gave up after 3 attempts" in (run.error or ""), run.error
    attempts = events_of(write_side, run_id, AgentRun.AttemptRecorded)
    assert [a.attempt for a in attempts] == [1, 2, 3]


class Unavailable:
    """A provider every call of which fails at once, as one in an outage does (a 503)."""

    name = "simulated"

    async def aclose(self) -> None:
        return None

    def stream(self, request: ChatRequest) -> AsyncIterator[Piece]:
        return self._refused()

    async def _refused(self) -> AsyncIterator[Piece]:
        raise TransientProviderError("simulated unavailable", provider="simulated", http_status=503)
        yield ""  # pragma: no cover - makes this an async generator


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
