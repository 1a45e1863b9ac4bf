"""Calls cut short are charged: the provider bills a prompt it took, however the call ends.

A call cancelled (the run cancelled, its deadline) before any output came was recorded nowhere
and charged nothing, although the provider had the prompt and bills it. Charged now from the
moment the provider accepted the call: with the provider's count of the prompt where its wire
gives one before the text (Anthropic's ``message_start``), else our tokenizer's estimate,
marked ``estimated``; no output tokens.

So is the call a worker had under way when its run was taken over, its worker dead or only
silent: the call's start is recorded before the call, and the takeover charges every call
started and never recorded for its prompt, under the call's own id; the worker's own record,
should it come after all, is answered with that charge, so the call is charged once beside the
new worker's own calls.
"""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import pytest
from orchestrator_helpers import (
    card_on_board,
    events_of,
    finished,
    orchestrator_process,
    orchestrator_thread,
    start,
    wait_for,
)
from provider_servers import FakeProviderServer, Reply, anthropic_events, openai_events
from read_side_helpers import ReadSide

from adapters.providers.anthropic import AnthropicProvider
from adapters.providers.base import Accepted, ChatRequest, Piece, Provider
from adapters.providers.openai import OpenAIProvider
from adapters.tokenizer import count_message_tokens
from commands import models as m
from commands.handlers import Actor, AgentWorks
from commands.runs import ORPHANED_CALL, ORPHANED_CALL_OF_ENDED_RUN
from domain.agent_run import AgentRun, RunStatus
from domain.errors import Conflict
from domain.pricing import call_cost_micros
from domain.usage import UsageCharge, spend_id_for
from orchestrator.service import Orchestrator
from projections.billing import BillingProjector
from projections.runs import RunsProjector

pytestmark = pytest.mark.slow

#: Long enough that the call is still waiting for its first text when the test cuts it.
STALL = 60.0


class Watched:
    """A provider adapter whose calls tell the test (a thread away) when the provider accepted
    them: set in the same step the orchestrator receives the :class:`Accepted`, so a cut the
    test sends after it reaches the orchestrator after it too."""

    def __init__(self, provider: Provider, *, with_count: bool = False) -> None:
        self.inner = provider
        self.name = provider.name
        self.with_count = with_count
        self.accepted = threading.Event()

    async def stream(self, request: ChatRequest) -> AsyncIterator[Piece]:
        async for piece in self.inner.stream(request):
            if isinstance(piece, Accepted) and (piece.input_tokens or not self.with_count):
                self.accepted.set()
            yield piece

    async def aclose(self) -> None:
        await self.inner.aclose()


def stalled_after_acceptance(frames: list[str]) -> Reply:
    """The first frame (OpenAI's role chunk, Anthropic's message_start), then nothing for long."""
    return Reply(events=frames, event_delay=STALL)


def cancelled_once_accepted(
    app: AgentWorks, database_url: str, provider: Watched, model: str
) -> AgentRun:
    """A run pinned to ``provider``/``model`` on a new card, cancelled once its call was
    accepted; returned once the cancelled call's charge is written."""
    card = card_on_board(app)
    with orchestrator_thread(database_url, {provider.name: provider}):
        run_id = start(app, card, provider=provider.name, model=model)
        assert provider.accepted.wait(30), "the provider never accepted the call"
        app.cancel_agent_run(m.CancelAgentRun(run_id=run_id, reason="enough"), card.board.owner)
        run = wait_for(app, run_id, lambda r: r.attempts > 0 and r.billed_micros > 0)
    assert run.status is RunStatus.CANCELLED
    return run


def the_one_charged_attempt(app: AgentWorks, run: AgentRun) -> tuple[Any, Any]:
    """The run's one attempt and its charge (as charged), both checked to say no output."""
    [attempt] = events_of(app, run.id, AgentRun.AttemptRecorded)
    [call] = events_of(app, run.id, AgentRun.LlmCallCompleted)
    [charge] = events_of(app, call.charge_id, UsageCharge.Charged)
    assert (attempt.status, attempt.output_tokens, call.output_tokens) == ("failed", 0, 0)
    assert call.input_tokens == attempt.input_tokens == charge.input_tokens
    assert charge.billed_micros == run.billed_micros > 0
    return attempt, charge


def test_an_openai_call_cancelled_before_any_output_is_charged_its_estimated_prompt(
    write_side: AgentWorks, database_url: str
) -> None:
    frames = openai_events(["never sent"], prompt_tokens=999, completion_tokens=2)
    with FakeProviderServer([stalled_after_acceptance(frames)]) as server:
        provider = Watched(OpenAIProvider(api_key="k", base_url=server.url))
        run = cancelled_once_accepted(write_side, database_url, provider, "gpt-4o-mini")
    attempt, charge = the_one_charged_attempt(write_side, run)
    prompt = count_message_tokens(server.requests[0].body["messages"])
    assert (attempt.input_tokens, attempt.estimated, attempt.error) == (
        prompt, True, "stopped: cancelled",
    )  # fmt: skip
    price = write_side.prices.require("openai", "gpt-4o-mini", charge.timestamp)
    assert charge.provider_cost_micros == call_cost_micros(price, input_tokens=prompt,
                                                           output_tokens=0)  # fmt: skip
    assert charge.price_table_version == write_side.prices.version


def test_an_anthropic_call_cancelled_after_message_start_is_charged_the_providers_count(
    write_side: AgentWorks, database_url: str
) -> None:
    frames = anthropic_events(["never sent"], input_tokens=4321, output_tokens=2)
    with FakeProviderServer([stalled_after_acceptance(frames)]) as server:
        provider = Watched(AnthropicProvider(api_key="k", base_url=server.url), with_count=True)
        run = cancelled_once_accepted(write_side, database_url, provider,
                                      "claude-3-5-haiku-latest")  # fmt: skip
    attempt, charge = the_one_charged_attempt(write_side, run)
    # The provider's own figure, not our estimate of the prompt: nothing in it is estimated.
    assert (attempt.input_tokens, attempt.estimated) == (4321, False)
    price = write_side.prices.require("anthropic", "claude-3-5-haiku-latest", charge.timestamp)
    assert charge.provider_cost_micros == call_cost_micros(price, input_tokens=4321,
                                                           output_tokens=0)  # fmt: skip


def test_a_call_its_runs_deadline_cuts_before_any_output_is_charged_its_prompt(
    write_side: AgentWorks, database_url: str
) -> None:
    card = card_on_board(write_side)
    frames = openai_events(["never sent"], prompt_tokens=999, completion_tokens=2)
    with FakeProviderServer([stalled_after_acceptance(frames)]) as server:
        providers: dict[str, Provider] = {
            "openai": OpenAIProvider(api_key="k", base_url=server.url)
        }
        with orchestrator_thread(database_url, providers, run_timeout=3.0):
            run = wait_for(write_side, start(write_side, card, provider="openai"), finished)
    assert run.status is RunStatus.TIMED_OUT
    attempt, _ = the_one_charged_attempt(write_side, run)
    prompt = count_message_tokens(server.requests[0].body["messages"])
    # What cut it: the run's deadline, not a cancel (it said "stopped: cancelled").
    assert (attempt.input_tokens, attempt.estimated, attempt.error) == (
        prompt, True, "stopped: timed out",
    )  # fmt: skip


def test_a_call_whose_stream_times_out_before_any_output_is_charged_its_prompt(
    write_side: AgentWorks, database_url: str
) -> None:
    """A read timeout once the stream began broke it as a cut does (it was a plain transient
    error, and a call without text was charged nothing)."""
    card = card_on_board(write_side)
    release = threading.Event()
    frames = openai_events(["never sent"], prompt_tokens=999, completion_tokens=2)
    with FakeProviderServer([Reply(events=frames, hold=release)]) as server:
        quick = httpx.Timeout(1.0, connect=5.0)
        providers: dict[str, Provider] = {
            "openai": OpenAIProvider(api_key="k", base_url=server.url, timeout=quick)
        }
        try:
            with orchestrator_thread(database_url, providers, max_attempts=1):
                run = wait_for(write_side, start(write_side, card, provider="openai"), finished)
        finally:
            release.set()
    assert run.status is RunStatus.FAILED, run.status
    attempt, _ = the_one_charged_attempt(write_side, run)
    prompt = count_message_tokens(server.requests[0].body["messages"])
    assert (attempt.input_tokens, attempt.estimated) == (prompt, True)
    assert "timed out" in (attempt.error or "")


def charges_of(app: AgentWorks, run_id: UUID) -> dict[str, Any]:
    """Each call of the run by its id, with its one stored charge."""
    calls = events_of(app, run_id, AgentRun.LlmCallCompleted)
    charged = {}
    for call in calls:
        [charge] = events_of(app, call.charge_id, UsageCharge.Charged)
        charged[call.call_id] = charge
    assert len(charged) == len(calls), "a call was recorded twice"
    return charged


def gone_quiet(orchestrator: Orchestrator, *, timeout: float = 30.0) -> None:
    """Wait until ``orchestrator`` runs nothing (its last run's task ended)."""
    deadline = time.monotonic() + timeout
    while orchestrator.tasks:
        assert time.monotonic() < deadline, "the orchestrator still runs its run"
        time.sleep(0.05)


def test_the_call_under_way_when_its_run_was_taken_over_is_charged_once_by_the_takeover(
    write_side: AgentWorks, database_url: str
) -> None:
    """Worker A's call stalls (and A with it, silent) until worker B has taken the run over
    and finished it; then A's call completes. B's takeover charged A's call for its prompt (A
    could have been dead: only the call's start, recorded before it, said it was made); A's
    own record, late, is answered with that charge and bills nothing more. B's call is
    charged too; neither twice."""
    card = card_on_board(write_side)
    release = threading.Event()
    old = Reply(events=openai_events([], prompt_tokens=1111, completion_tokens=0), hold=release)
    new = Reply(events=openai_events(["done by B"], prompt_tokens=2222, completion_tokens=3))
    with FakeProviderServer([old, new]) as server:
        a = Watched(OpenAIProvider(api_key="k", base_url=server.url))
        b: dict[str, Provider] = {"openai": OpenAIProvider(api_key="k", base_url=server.url)}
        try:
            with orchestrator_thread(database_url, {"openai": a}, worker_id="A",
                                     heartbeat_interval=600.0,
                                     stale_after=600.0) as orchestrator_a:  # fmt: skip
                run_id = start(write_side, card, provider="openai")
                assert a.accepted.wait(30), "A's call was never accepted"
                with orchestrator_thread(database_url, b, worker_id="B", stale_after=1.0):
                    run = wait_for(write_side, run_id, finished)
                assert (run.status, run.worker, run.output) == (
                    RunStatus.SUCCEEDED, "B", "done by B",
                )  # fmt: skip
                release.set()
                gone_quiet(orchestrator_a)
        finally:
            release.set()
    run = write_side.run_snapshot(run_id)
    prompt = count_message_tokens(server.requests[0].body["messages"])
    charges = charges_of(write_side, run_id)
    assert sorted(c.input_tokens for c in charges.values()) == sorted([prompt, 2222])
    assert run.billed_micros == sum(c.billed_micros for c in charges.values())
    attempts = events_of(write_side, run_id, AgentRun.AttemptRecorded)
    assert [(a.input_tokens, a.status, a.estimated, a.error) for a in attempts] == [
        (prompt, "failed", True, ORPHANED_CALL), (2222, "ok", False, None),
    ]  # fmt: skip
    assert [a.attempt for a in attempts] == [1, 2]


def test_a_stalled_call_whose_run_is_taken_over_is_charged_once_as_its_worker_stops(
    write_side: AgentWorks, database_url: str
) -> None:
    """The takeover charges the call A has under way (its prompt, estimated); A learns of the
    takeover at its next heartbeat and stops its call, and its record of the cut call is
    answered with that charge."""
    card = card_on_board(write_side)
    release = threading.Event()
    frames = openai_events(["never sent"], prompt_tokens=999, completion_tokens=2)
    actor = Actor.service("orchestrator", card.board.workspace_id)
    with FakeProviderServer([Reply(events=frames, hold=release)]) as server:
        a = Watched(OpenAIProvider(api_key="k", base_url=server.url))
        try:
            with orchestrator_thread(database_url, {"openai": a}, worker_id="A") as orchestrator:
                run_id = start(write_side, card, provider="openai")
                assert a.accepted.wait(30), "A's call was never accepted"
                while True:  # a heartbeat of A's may slip in before the takeover
                    version = write_side.run_snapshot(run_id).version
                    takeover = m.ReclaimRun(run_id=run_id, worker="B", expected_version=version)
                    try:
                        taken = write_side.reclaim_run(takeover, actor)
                        break
                    except Conflict:
                        time.sleep(0.05)
                gone_quiet(orchestrator)
        finally:
            release.set()
    run = write_side.run_snapshot(run_id)
    assert (run.status, run.worker) == (RunStatus.RUNNING, "B")
    [(call_id, charge)] = charges_of(write_side, run_id).items()
    assert taken.extra["charged_calls"] == [call_id]
    [attempt] = events_of(write_side, run_id, AgentRun.AttemptRecorded)
    prompt = count_message_tokens(server.requests[0].body["messages"])
    assert (attempt.error, attempt.estimated, charge.input_tokens) == (
        ORPHANED_CALL, True, prompt,
    )  # fmt: skip
    assert run.billed_micros == charge.billed_micros > 0


def test_a_call_its_worker_was_killed_during_is_charged_once_by_the_takeover(
    write_side: AgentWorks, database_url: str, tmp_path: Path
) -> None:
    """An orchestrator process SIGKILLed while the provider had its call: nothing durable
    said the call was made, and nobody charged it. Its start, recorded before the call, is
    charged by the orchestrator that takes the run over, for the prompt the dead worker
    counted, marked estimated, once; a late record of the call by the dead worker (its process
    was only frozen, say) bills nothing more."""
    card = card_on_board(write_side)
    frames = openai_events(["never sent"], prompt_tokens=999, completion_tokens=2)
    done = openai_events(["done by the rescuer"], prompt_tokens=2222, completion_tokens=3)
    with FakeProviderServer([stalled_after_acceptance(frames), Reply(events=done)]) as server:
        with orchestrator_process(
            database_url, tmp_path, AGENTWORKS_OPENAI_API_KEY="k",
            AGENTWORKS_OPENAI_BASE_URL=server.url,
        ):  # fmt: skip
            run_id = start(write_side, card, provider="openai")
            # The call's start is recorded before the call: once the provider has it, so has
            # the store.
            wait_for(write_side, run_id, lambda _: bool(server.requests), timeout=60)
        dead = write_side.run_snapshot(run_id).worker
        providers: dict[str, Provider] = {
            "openai": OpenAIProvider(api_key="k", base_url=server.url)
        }
        with orchestrator_thread(database_url, providers, stale_after=1.5, worker_id="rescuer"):
            run = wait_for(write_side, run_id, finished, timeout=60)
    assert (run.status, run.worker, run.output) == (
        RunStatus.SUCCEEDED, "rescuer", "done by the rescuer",
    )  # fmt: skip
    charges = charges_of(write_side, run_id)
    prompt = count_message_tokens(server.requests[0].body["messages"])
    assert sorted(c.input_tokens for c in charges.values()) == sorted([prompt, 2222])
    [started, _] = events_of(write_side, run_id, AgentRun.CallStarted)
    assert started.worker == dead
    orphan = charges[started.call_id]
    assert (orphan.input_tokens, orphan.output_tokens) == (prompt, 0) == (started.input_tokens, 0)
    assert orphan.provider_cost_micros == started.prompt_cost_micros > 0
    [first, _] = events_of(write_side, run_id, AgentRun.AttemptRecorded)
    assert (first.call_id, first.estimated, first.error) == (started.call_id, True, ORPHANED_CALL)
    billed = run.billed_micros
    assert billed == sum(c.billed_micros for c in charges.values())

    late = write_side.record_provider_attempt(
        m.RecordProviderAttempt(
            run_id=run_id, worker=dead, call_id=started.call_id, provider="openai",
            model=started.model, status="ok", latency_ms=900, input_tokens=999,
            output_tokens=400, started_at=datetime.now(UTC),
        ),
        Actor.service("orchestrator", card.board.workspace_id),
    )  # fmt: skip

    assert (late.extra["billed"], late.extra["taken_over"]) == (orphan.billed_micros, True)
    assert write_side.run_snapshot(run_id).billed_micros == billed
    assert charges_of(write_side, run_id).keys() == charges.keys()
    assert len(events_of(write_side, run_id, AgentRun.AttemptRecorded)) == 2


def test_a_call_whose_start_was_being_written_as_its_worker_stopped_is_not_charged_after(
    write_side: AgentWorks, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An orchestrator stopped (its runs left for others to take over) while a call's start
    was being written: the call was never made, but the start landed. The worker records an
    attempt without tokens as it stops (saying so: it said "cancelled"), so the takeover
    charges nothing for it."""
    card = card_on_board(write_side)
    written, answered = threading.Event(), threading.Event()
    real_start, real_record = AgentWorks.start_provider_call, AgentWorks.record_provider_attempt

    def slow_start(self: AgentWorks, cmd: m.StartProviderCall, actor: Actor) -> Any:
        result = real_start(self, cmd, actor)
        if cmd.worker == "A":  # written; its answer waits until A has recorded the attempt
            written.set()
            answered.wait(30)
        return result

    def record(self: AgentWorks, cmd: m.RecordProviderAttempt, actor: Actor) -> Any:
        try:
            return real_record(self, cmd, actor)
        finally:
            if cmd.worker == "A":
                answered.set()

    monkeypatch.setattr(AgentWorks, "start_provider_call", slow_start)
    monkeypatch.setattr(AgentWorks, "record_provider_attempt", record)
    with orchestrator_thread(database_url, worker_id="A"):
        run_id = start(write_side, card)
        assert written.wait(30), "A never started its call"
    with orchestrator_thread(database_url, worker_id="B", stale_after=1.0):
        run = wait_for(write_side, run_id, finished)
    assert (run.status, run.worker) == (RunStatus.SUCCEEDED, "B")
    [by_a, by_b] = events_of(write_side, run_id, AgentRun.CallStarted)
    assert (by_a.worker, by_b.worker) == ("A", "B")
    [stopped, _] = events_of(write_side, run_id, AgentRun.AttemptRecorded)
    assert (stopped.call_id, stopped.input_tokens, stopped.error) == (
        by_a.call_id, 0, "stopped: worker shut down before the call was made",
    )  # fmt: skip
    assert list(charges_of(write_side, run_id)) == [by_b.call_id]


def begun_with_a_call_started(app: AgentWorks, card: Any, worker: str) -> tuple[UUID, Any]:
    """A run ``worker`` began and started a call of (its start recorded, the call never): the
    run's id and the call's start."""
    actor = Actor.service("orchestrator", card.board.workspace_id)
    run_id = start(app, card, provider="openai")
    app.begin_run(m.BeginRun(run_id=run_id, worker=worker), actor)
    price = app.prices.require("openai", "gpt-4o-mini", datetime.now(UTC))
    app.start_provider_call(
        m.StartProviderCall(
            run_id=run_id, worker=worker, call_id="call-under-way", provider="openai",
            model="gpt-4o-mini", input_tokens=1234,
            prompt_cost_micros=call_cost_micros(price, input_tokens=1234, output_tokens=0),
            price_table_version=app.prices.version,
        ),
        actor,
    )  # fmt: skip
    [started] = events_of(app, run_id, AgentRun.CallStarted)
    return run_id, started


def late_record(app: AgentWorks, card: Any, run_id: UUID, worker: str) -> Any:
    """``worker``'s own record of its call, with what the provider counted."""
    return app.record_provider_attempt(
        m.RecordProviderAttempt(
            run_id=run_id, worker=worker, call_id="call-under-way", provider="openai",
            model="gpt-4o-mini", status="failed", error="stopped: cancelled", latency_ms=900,
            input_tokens=1300, output_tokens=400, started_at=datetime.now(UTC),
        ),
        Actor.service("orchestrator", card.board.workspace_id),
    )  # fmt: skip


def test_a_call_whose_worker_died_before_its_run_was_cancelled_is_charged_once_by_the_sweep(
    side: ReadSide, database_url: str
) -> None:
    """A worker dies mid-call; before anybody takes its run over, a user cancels the run. Nobody
    ever took a cancelled run over, and its dead worker never records: the call the provider
    billed was charged nowhere. The orchestrators' sweep charges it once the worker's lease
    has expired (nothing written for ``stale_after``), as a takeover would: its prompt,
    estimated, under the call's id, in the month's spend and the billing read model; a sweep
    again charges nothing more, nor does the worker's own record, late."""
    app = side.app
    card = card_on_board(app)
    run_id, started = begun_with_a_call_started(app, card, "dead")
    time.sleep(1.2)  # the worker's lease (the sweeper's stale_after, 1 s) expires
    app.cancel_agent_run(m.CancelAgentRun(run_id=run_id, reason="stuck"), card.board.owner)
    assert app.run_snapshot(run_id).billed_micros == 0
    with orchestrator_thread(database_url, worker_id="sweeper", stale_after=1.0):
        run = wait_for(app, run_id, lambda r: not r.open_calls)
    assert (run.status, run.worker) == (RunStatus.CANCELLED, "dead")
    [(call_id, charge)] = charges_of(app, run_id).items()
    assert call_id == started.call_id
    [attempt] = events_of(app, run_id, AgentRun.AttemptRecorded)
    assert (attempt.error, attempt.estimated, attempt.input_tokens, attempt.output_tokens) == (
        ORPHANED_CALL_OF_ENDED_RUN, True, 1234, 0,
    )  # fmt: skip
    assert charge.provider_cost_micros == started.prompt_cost_micros > 0
    assert run.billed_micros == charge.billed_micros > 0
    spend = app.repository.get(spend_id_for(card.board.workspace_id, charge.month))
    assert spend.spent_micros == charge.billed_micros

    side.project(BillingProjector())
    side.project(RunsProjector())
    billed = side.row(
        "SELECT billed_micros FROM rm_charges WHERE charge_id = %s", (charge.originator_id,)
    )
    month = side.row(
        "SELECT billed_micros FROM rm_monthly_spend WHERE workspace_id = %s AND month = %s",
        (card.board.workspace_id, charge.month),
    )
    assert billed["billed_micros"] == month["billed_micros"] == charge.billed_micros
    read = side.row("SELECT status, billed_micros FROM rm_runs WHERE run_id = %s", (run_id,))
    assert read == {"status": "CANCELLED", "billed_micros": charge.billed_micros}

    with orchestrator_thread(database_url, worker_id="again", stale_after=1.0) as again:
        wait_for(app, run_id, lambda _: again.caught_up)
        time.sleep(1.5)  # a sweep or two
    version = app.run_snapshot(run_id).version
    resweep = app.charge_orphaned_calls(
        m.ChargeOrphanedCalls(run_id=run_id, expected_version=version),
        Actor.service("orchestrator", card.board.workspace_id),
    )
    assert resweep.extra["charged_calls"] == []
    late = late_record(app, card, run_id, "dead")
    assert (late.extra["billed"], late.extra["recorded_before"]) == (charge.billed_micros, True)
    run = app.run_snapshot(run_id)
    assert (run.billed_micros, run.version) == (charge.billed_micros, version)
    assert charges_of(app, run_id).keys() == {call_id}


def test_a_call_whose_run_was_cancelled_while_its_worker_lives_is_charged_what_it_used(
    side: ReadSide, database_url: str
) -> None:
    """Cancelled while its worker is alive (it wrote within ``stale_after``), the call is the
    worker's to record: neither the cancel nor the sweep charges it, and the worker's record,
    after the cancel, charges what the provider counted."""
    app = side.app
    card = card_on_board(app)
    run_id, _ = begun_with_a_call_started(app, card, "alive")
    before = app.run_snapshot(run_id).version
    app.cancel_agent_run(m.CancelAgentRun(run_id=run_id, reason="enough"), card.board.owner)
    cancelled = app.run_snapshot(run_id)
    assert (cancelled.version, cancelled.billed_micros) == (before + 1, 0)
    assert set(cancelled.open_calls) == {"call-under-way"}
    with orchestrator_thread(database_url, worker_id="sweeper", stale_after=10.0) as sweeper:
        wait_for(app, run_id, lambda _: sweeper.caught_up)
        time.sleep(1.5)  # a sweep or two
        assert app.run_snapshot(run_id).version == cancelled.version
        recorded = late_record(app, card, run_id, "alive")
    [(_, charge)] = charges_of(app, run_id).items()
    price = app.prices.require("openai", "gpt-4o-mini", charge.timestamp)
    assert (charge.input_tokens, charge.output_tokens) == (1300, 400)
    assert charge.provider_cost_micros == call_cost_micros(price, input_tokens=1300,
                                                           output_tokens=400)  # fmt: skip
    assert recorded.extra["billed"] == charge.billed_micros
    [attempt] = events_of(app, run_id, AgentRun.AttemptRecorded)
    assert (attempt.estimated, attempt.error) == (False, "stopped: cancelled")
    assert app.run_snapshot(run_id).billed_micros == charge.billed_micros


@pytest.mark.parametrize(
    ("family", "model"), [("openai", "gpt-4o-mini"), ("anthropic", "claude-3-5-haiku-latest")]
)
def test_a_call_whose_stream_brings_only_keep_alives_is_cut_charged_its_prompt_and_made_again(
    write_side: AgentWorks, database_url: str, family: str, model: str
) -> None:
    """Accepted, then SSE comments every 10 ms and nothing else: the read timeout never fired,
    and the call held its run until the run's deadline, producing nothing. Cut after the idle
    period as a broken stream is: charged its prompt (the provider's count where its wire gave
    one), and made again."""
    card = card_on_board(write_side)
    provider: Provider
    if family == "openai":
        stalled = openai_events([], prompt_tokens=999, completion_tokens=0)[:1]
        whole = openai_events(["done at last"], prompt_tokens=40, completion_tokens=3)
        provider = OpenAIProvider(api_key="k", base_url="", idle_timeout=0.5)
    else:
        stalled = anthropic_events([], input_tokens=4321, output_tokens=0)[:1]
        whole = anthropic_events(["done at last"], input_tokens=40, output_tokens=3)
        provider = AnthropicProvider(api_key="k", base_url="", idle_timeout=0.5)
    replies = [Reply(events=stalled, keep_alive=": keep-alive", event_delay=0.01),
               Reply(events=whole)]  # fmt: skip
    with FakeProviderServer(replies) as server:
        provider.base_url = server.url  # type: ignore[attr-defined]
        with orchestrator_thread(database_url, {family: provider}):
            run_id = start(write_side, card, provider=family, model=model)
            run = wait_for(write_side, run_id, finished)
    assert (run.status, run.output) == (RunStatus.SUCCEEDED, "done at last"), run.error
    cut, made = events_of(write_side, run_id, AgentRun.AttemptRecorded)
    assert (cut.status, cut.output_tokens, cut.error) == (
        "failed", 0, f"{family} stream stalled: no data for 0.5s (keep-alives aside)",
    )  # fmt: skip
    prompt = count_message_tokens(server.requests[0].body["messages"])
    expected = (prompt, True) if family == "openai" else (4321, False)
    assert (cut.input_tokens, cut.estimated) == expected
    assert (made.status, made.input_tokens, made.output_tokens) == ("ok", 40, 3)
    charges = charges_of(write_side, run_id)
    charge = charges[cut.call_id]
    price = write_side.prices.require(family, model, charge.timestamp)
    assert (charge.input_tokens, charge.output_tokens) == (expected[0], 0)
    assert charge.provider_cost_micros == call_cost_micros(price, input_tokens=expected[0],
                                                           output_tokens=0) > 0  # fmt: skip
    assert run.billed_micros == sum(c.billed_micros for c in charges.values())
