"""The orchestrator on a real event store: runs complete, fall back, stop on cancel, budgets and
timeouts, several orchestrators share a backlog without running a run twice, and the runs of an
orchestrator process SIGKILLed mid-run are taken over by another, never charged twice."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import pytest
from orchestrator_helpers import (
    card_on_board,
    events_of,
    fast_simulated,
    finished,
    orchestrator_process,
    orchestrator_thread,
    running_with_lines,
    start,
    stored,
    wait_for,
)
from prometheus_client import REGISTRY
from provider_servers import FakeProviderServer, Reply, anthropic_events, openai_events

from adapters.providers.anthropic import AnthropicProvider
from adapters.providers.base import Accepted, ChatRequest, Piece, Provider, Usage
from adapters.providers.openai import OpenAIProvider
from adapters.providers.simulated import SimulatedProvider
from commands import models as m
from commands.handlers import Actor, AgentWorks
from domain.agent_run import AgentRun, RunStatus
from domain.agents import EARLIER_RUNS
from domain.errors import InvalidTransition, Unavailable
from domain.pricing import call_cost_micros
from domain.usage import UsageCharge
from orchestrator.logbatch import MAX_RUN_LOG_LINES

pytestmark = pytest.mark.slow


def openai_at(server: FakeProviderServer, *, then_simulated: bool = False) -> dict[str, Provider]:
    """The orchestrator's providers: OpenAI at ``server`` (then the simulated one, to fall back
    to, if ``then_simulated``)."""
    providers: dict[str, Provider] = {"openai": OpenAIProvider(api_key="k", base_url=server.url)}
    if then_simulated:
        providers["simulated"] = fast_simulated()
    return providers


def run_on_fake_openai(
    app: AgentWorks,
    database_url: str,
    replies: list[Reply],
    *,
    pinned: bool = True,
    then_simulated: bool = False,
    **config: Any,
) -> AgentRun:
    """One run on a new card, finished by an orchestrator (``config``) whose OpenAI is a fake
    server giving ``replies``: pinned to OpenAI, or unpinned, with the simulated provider to fall
    back to if ``then_simulated``."""
    card = card_on_board(app)
    fields = {"provider": "openai"} if pinned else {}
    with (
        FakeProviderServer(replies) as server,
        orchestrator_thread(
            database_url, openai_at(server, then_simulated=then_simulated), **config
        ),
    ):
        return wait_for(app, start(app, card, **fields), finished)


def run_into_an_open_circuit(app: AgentWorks, database_url: str) -> AgentRun:
    """A run pinned to an OpenAI that answers 503: its third failure opens the circuit, whose
    trial would come long after the run's deadline."""
    unavailable = [Reply(status=503, body=b"unavailable")]
    return run_on_fake_openai(
        app, database_url, unavailable, max_attempts=4, breaker_threshold=3,
        breaker_cooldown=600, run_timeout=20,
    )  # fmt: skip


def log_lines(app: AgentWorks, run_id: UUID) -> list[str]:
    """The text of every line of a run's log, in order."""
    return [ln["text"] for c in events_of(app, run_id, AgentRun.LogChunkAppended) for ln in c.lines]


def test_a_run_completes_on_the_simulated_provider_with_output_log_and_one_charge(
    write_side: AgentWorks, database_url: str
) -> None:
    card = card_on_board(write_side)
    run_id = start(write_side, card)
    with orchestrator_thread(database_url):
        run = wait_for(write_side, run_id, finished)
    assert run.status is RunStatus.SUCCEEDED, run.error
    assert run.output
    assert run.attempts == 1
    chunks = events_of(write_side, run_id, AgentRun.LogChunkAppended)
    assert chunks
    assert all(len(c.lines) <= 100 for c in chunks)
    logged = "\n".join(
        line["text"] for c in chunks for line in c.lines if line["stream"] == "stdout"
    )
    assert logged.strip() == run.output.strip()
    [call] = events_of(write_side, run_id, AgentRun.LlmCallCompleted)
    charge: UsageCharge = write_side.repository.get(call.charge_id)
    price = write_side.prices.require("simulated", "sim-1", run.modified_on)
    expected = call_cost_micros(price, input_tokens=run.input_tokens,
                                output_tokens=run.output_tokens)  # fmt: skip
    assert run.provider_cost_micros == expected
    assert charge.billed_micros == run.billed_micros == expected * 5
    assert len(events_of(write_side, run_id, AgentRun.Started)) == 1


def test_a_requested_run_wakes_a_listening_orchestrator_before_its_next_poll(
    write_side: AgentWorks, database_url: str
) -> None:
    card = card_on_board(write_side)
    with orchestrator_thread(database_url, listen_url=database_url, poll_interval=60.0) as orch:
        deadline = time.monotonic() + 20
        while not orch.caught_up:
            assert time.monotonic() < deadline, "the orchestrator never caught up with the log"
            time.sleep(0.05)
        time.sleep(0.3)  # it has read the log and now waits out its 60-s poll
        run_id = start(write_side, card)
        run = wait_for(write_side, run_id, finished, timeout=10.0)
    assert run.status is RunStatus.SUCCEEDED, run.error


def test_a_later_agent_sees_the_earlier_runs_output_in_its_prompt(
    write_side: AgentWorks, database_url: str
) -> None:
    card = card_on_board(write_side)
    design = openai_events(["design: use JWT"], prompt_tokens=9, completion_tokens=4)
    with (
        FakeProviderServer([Reply(events=design)]) as server,
        orchestrator_thread(database_url, openai_at(server)),
    ):
        first = start(write_side, card, agent="architect", provider="openai")
        wait_for(write_side, first, finished)
        second = start(write_side, card, agent="coder", provider="openai")
        run = wait_for(write_side, second, finished)
    assert run.status is RunStatus.SUCCEEDED
    prompt = server.requests[-1].body["messages"][1]["content"]
    assert "design: use JWT" in prompt
    assert "Login page" in prompt


def test_a_prompt_carries_the_latest_earlier_outputs_of_its_card_and_no_more(
    write_side: AgentWorks, database_url: str
) -> None:
    """Every earlier output of a card went into each new prompt (and stayed in the
    orchestrator's memory for good): a busy card's prompts grew until the model refused them."""
    card = card_on_board(write_side)
    replies = [
        Reply(events=openai_events([f"output of run {n}"], prompt_tokens=9, completion_tokens=4))
        for n in range(1, 6)
    ]
    with (
        FakeProviderServer(replies) as server,
        orchestrator_thread(database_url, openai_at(server)) as orchestrator,
    ):
        for _ in range(5):
            run = wait_for(write_side, start(write_side, card, provider="openai"), finished)
            assert run.status is RunStatus.SUCCEEDED, run.error
        kept = list(orchestrator.outputs[card.card_id])
    prompt = server.requests[-1].body["messages"][1]["content"]
    shown = [n for n in range(1, 6) if f"output of run {n}" in prompt]
    assert shown == list(range(5 - EARLIER_RUNS, 5))
    assert len(kept) <= EARLIER_RUNS + 1
    # Which runs, not their outputs: the orchestrator reads the whole log and keeps this for
    # every card ever run (four outputs of up to a few thousand characters each, for good,
    # were gigabytes on a log of 100,000 cards); the outputs are read when a prompt is built.
    assert all(isinstance(run_id, UUID) for run_id in kept), kept


def test_openai_compatible_server_given_by_settings_runs_and_is_charged_from_its_usage(
    write_side: AgentWorks, database_url: str
) -> None:
    from infra.orchestration import build_providers
    from infra.settings import Settings

    card = card_on_board(write_side)
    events = openai_events(["Hello", " from", " a", " fake\n", "server"], prompt_tokens=1234,
                           completion_tokens=567)  # fmt: skip
    with FakeProviderServer([Reply(events=events, event_delay=0.01)]) as server:
        settings = Settings(openai_api_key="sk-local", openai_base_url=server.url + "/v1")
        providers = build_providers(settings)
        assert set(providers) == {"simulated", "openai"}
        with orchestrator_thread(database_url, providers):
            run_id = start(write_side, card, provider="openai", model="gpt-4o-mini")
            run = wait_for(write_side, run_id, finished)
    assert run.status is RunStatus.SUCCEEDED, run.error
    assert run.output == "Hello from a fake\nserver"
    assert (run.input_tokens, run.output_tokens) == (1234, 567)
    price = write_side.prices.require("openai", "gpt-4o-mini", run.modified_on)
    assert run.provider_cost_micros == call_cost_micros(price, input_tokens=1234,
                                                        output_tokens=567)  # fmt: skip
    assert server.requests[0].path == "/v1/chat/completions"


def test_anthropic_run_is_charged_from_message_start_and_message_delta(
    write_side: AgentWorks, database_url: str
) -> None:
    card = card_on_board(write_side)
    events = anthropic_events(["Plan:", " ship it"], input_tokens=321, output_tokens=45)
    with FakeProviderServer([Reply(events=events)]) as server:
        providers: dict[str, Provider] = {
            "anthropic": AnthropicProvider(api_key="ak", base_url=server.url)
        }
        with orchestrator_thread(database_url, providers):
            run_id = start(write_side, card, provider="anthropic",
                           model="claude-3-5-haiku-latest")  # fmt: skip
            run = wait_for(write_side, run_id, finished)
    assert run.status is RunStatus.SUCCEEDED, run.error
    assert run.output == "Plan: ship it"
    assert (run.input_tokens, run.output_tokens) == (321, 45)
    price = write_side.prices.require("anthropic", "claude-3-5-haiku-latest", run.modified_on)
    assert run.provider_cost_micros == call_cost_micros(price, input_tokens=321, output_tokens=45)
    assert server.requests[0].body["model"] == "claude-3-5-haiku-latest"


def test_a_run_stops_at_its_budget_by_the_providers_count_of_the_prompt(
    write_side: AgentWorks, database_url: str
) -> None:
    """Anthropic says at message_start that the prompt is 2,000 tokens, where our tokenizer
    counted about 80 (another tokenizer, or a system prompt it adds). The budget checks during
    the stream priced the output next to our count, while the charge is the provider's: the run
    stopped at about 730 output tokens and was billed $0.0227 of its $0.015. Now the checks use
    the provider's count once it is known, and the run stops at its budget."""
    card = card_on_board(write_side)
    events = anthropic_events([" go"] * 1000, input_tokens=2000, output_tokens=1000)
    with FakeProviderServer([Reply(events=events)]) as server:
        providers: dict[str, Provider] = {
            "anthropic": AnthropicProvider(api_key="ak", base_url=server.url)
        }
        with orchestrator_thread(database_url, providers):
            run_id = start(write_side, card, provider="anthropic",
                           model="claude-3-5-haiku-latest", max_cost="0.015")  # fmt: skip
            run = wait_for(write_side, run_id, finished)
    assert run.status is RunStatus.FAILED
    assert "budget" in (run.error or "")
    assert run.input_tokens == 2000
    # The prompt bills $0.008 of the $0.015 (x5 markup): the rest buys 350 output tokens, and
    # the stream stops at the piece that reaches it.
    assert 14_900 <= run.billed_micros <= 15_000 + 20


def test_a_whole_answer_whose_usage_holds_no_count_is_made_and_charged_once(
    write_side: AgentWorks, database_url: str
) -> None:
    """A usage block with a count that is no count (here null) broke the whole answer off as
    unreadable: charged as a broken stream and made again, charged again, until the run gave
    up. It is one call, charged once from our counts."""
    events = openai_events(["all ", "of it"], prompt_tokens=1, completion_tokens=1)
    block = next(i for i, f in enumerate(events) if '"usage"' in f)
    events[block] = (
        'data: {"id": "c1", "choices": [], "usage": {"prompt_tokens": null, '
        '"completion_tokens": "3.5"}}'
    )
    card = card_on_board(write_side)
    with (
        FakeProviderServer([Reply(events=events)]) as server,
        orchestrator_thread(database_url, openai_at(server)),
    ):
        run = wait_for(write_side, start(write_side, card, provider="openai"), finished)
        requests = len(server.requests)
    assert run.status is RunStatus.SUCCEEDED, run.error
    assert run.output == "all of it"
    assert requests == 1
    attempts = events_of(write_side, run.id, AgentRun.AttemptRecorded)
    assert [(a.status, a.estimated) for a in attempts] == [("ok", True)]
    assert len(events_of(write_side, run.id, AgentRun.LlmCallCompleted)) == 1
    assert run.input_tokens > 0
    assert run.billed_micros > 0


def test_one_workspaces_backlog_does_not_hold_every_slot_from_another_workspace(
    write_side: AgentWorks, database_url: str
) -> None:
    """Runs were claimed first come, first served: a workspace that queued a backlog held every
    slot until all of it had run, and another tenant's run, requested a moment later, waited
    behind all of it. Workspaces take turns for free slots."""
    busy, other = card_on_board(write_side), card_on_board(write_side, title="Other tenant")
    assert busy.board.workspace_id != other.board.workspace_id
    backlog = [start(write_side, busy) for _ in range(4)]
    late = start(write_side, other)
    slow = fast_simulated(tokens_per_second=300, output_tokens=30)
    with orchestrator_thread(database_url, {"simulated": slow}, concurrency=1):
        runs = [wait_for(write_side, run_id, finished) for run_id in [*backlog, late]]
    assert all(run.status is RunStatus.SUCCEEDED for run in runs), [r.error for r in runs]

    def started(run_id: UUID) -> Any:
        return events_of(write_side, run_id, AgentRun.Started)[0].timestamp

    order = sorted([*backlog, late], key=started)
    assert order.index(late) == 1, "the other workspace's run waited behind the whole backlog"


class _Watching(SimulatedProvider):
    """The simulated provider, noting the longest wait between two of its pieces: how long the
    orchestrator's event loop, which every run shares, was held by something else."""

    longest = 0.0

    async def stream(self, request: ChatRequest) -> AsyncIterator[Piece]:
        loop = asyncio.get_running_loop()
        last = loop.time()
        async for piece in super().stream(request):
            now = loop.time()
            self.longest, last = max(self.longest, now - last), now
            yield piece


def test_a_providers_huge_piece_does_not_hold_every_other_run(
    write_side: AgentWorks, database_url: str
) -> None:
    """A piece of text of 4 MB (one event-stream line, within its bound) was token-counted on
    the event loop every run of the orchestrator waits on, and again to charge it: seconds at a
    time, for each attempt of the call, while other runs' streams, heartbeats and cancels
    waited. No more is counted than where the call is cut, and a long piece off the loop."""
    huge = {"id": "c1", "choices": [{"index": 0, "delta": {"content": "x" * 4_000_000}}]}
    events = openai_events(["a"], prompt_tokens=10, completion_tokens=1)
    events.insert(1, "data: " + json.dumps(huge))
    watching = _Watching(tokens_per_second=60, output_tokens=300)
    card = card_on_board(write_side)
    with FakeProviderServer([Reply(events=events, first_byte_delay=0.3)]) as server:
        providers = {"simulated": watching, **openai_at(server)}
        with orchestrator_thread(database_url, providers, concurrency=2, max_attempts=2):
            watched = start(write_side, card, provider="simulated")
            wait_for(write_side, watched, running_with_lines)
            hostile = wait_for(write_side, start(write_side, card, provider="openai"), finished)
            assert wait_for(write_side, watched, finished).status is RunStatus.SUCCEEDED
            requests = len(server.requests)
    assert hostile.status is RunStatus.FAILED
    assert requests == 2
    attempts = events_of(write_side, hostile.id, AgentRun.AttemptRecorded)
    assert [a.output_tokens for a in attempts] == [2000, 2000]  # the coder's cap, charged
    assert watching.longest < 1.0, f"the event loop was held {watching.longest:.2f}s at once"


def test_a_429_with_a_retry_after_date_past_any_calendar_is_not_charged(
    write_side: AgentWorks, database_url: str
) -> None:
    """Reading such a ``Retry-After`` raised, and the refused call was charged its prompt as a
    broken stream."""
    refused = Reply(status=429, headers={"retry-after": "Mon, 01 Jan 99999999999 00:00:00 GMT"},
                    body=b'{"error": "slow down"}')  # fmt: skip
    ok = Reply(events=openai_events(["fine"], prompt_tokens=10, completion_tokens=1))
    run = run_on_fake_openai(write_side, database_url, [refused, ok])
    assert run.status is RunStatus.SUCCEEDED, run.error
    attempts = events_of(write_side, run.id, AgentRun.AttemptRecorded)
    first = attempts[0]
    assert (first.http_status, first.input_tokens, first.provider_cost_micros) == (429, 0, 0)
    assert len(events_of(write_side, run.id, AgentRun.LlmCallCompleted)) == 1


def test_a_flood_of_blank_lines_from_a_provider_is_not_written_line_by_line(
    write_side: AgentWorks, database_url: str
) -> None:
    """One piece of a million newlines (2 MB on the wire, and an honest model's 2,000 tokens
    are up to 64,000 of them) became a million log lines of the run, ten thousand events of 100
    written one after another into the store every workspace shares, before the run could
    end. A run's log keeps at most MAX_RUN_LOG_LINES of the model's lines, and says so."""
    flood = {"id": "c1", "choices": [{"index": 0, "delta": {"content": "\n" * 1_000_000}}]}
    events = openai_events(["a"], prompt_tokens=10, completion_tokens=1)
    events.insert(1, "data: " + json.dumps(flood))
    card = card_on_board(write_side)
    began = time.monotonic()
    with (
        FakeProviderServer([Reply(events=events)]) as server,
        orchestrator_thread(database_url, openai_at(server), max_attempts=1),
    ):
        run = wait_for(write_side, start(write_side, card, provider="openai"), finished)
    took = time.monotonic() - began
    assert run.status is RunStatus.FAILED
    lines = log_lines(write_side, run.id)
    assert MAX_RUN_LOG_LINES <= len(lines) <= MAX_RUN_LOG_LINES + 10
    assert any(f"after {MAX_RUN_LOG_LINES} lines" in line for line in lines)
    assert took < 30


def test_unpinned_run_falls_back_after_a_500_and_records_both_attempts(
    write_side: AgentWorks, database_url: str
) -> None:
    down = [Reply(status=500, body=b"down")]
    run = run_on_fake_openai(write_side, database_url, down, pinned=False, then_simulated=True)
    assert run.status is RunStatus.SUCCEEDED, run.error
    attempts = events_of(write_side, run.id, AgentRun.AttemptRecorded)
    assert [(a.provider, a.status, a.http_status) for a in attempts] == [
        ("openai", "failed", 500),
        ("simulated", "ok", None),
    ]
    assert attempts[0].provider_cost_micros == 0
    lines = log_lines(write_side, run.id)
    assert any("falling back from openai/gpt-4o-mini to simulated/sim-1" in t for t in lines)


def test_pinned_run_retries_the_same_provider_after_retry_after(
    write_side: AgentWorks, database_url: str
) -> None:
    ok = openai_events(["fine"], prompt_tokens=10, completion_tokens=1)
    replies = [Reply(status=429, headers={"retry-after": "1"}, body=b"{}"), Reply(events=ok)]
    run = run_on_fake_openai(write_side, database_url, replies, then_simulated=True)
    assert run.status is RunStatus.SUCCEEDED
    attempts = events_of(write_side, run.id, AgentRun.AttemptRecorded)
    assert [(a.provider, a.http_status) for a in attempts] == [("openai", 429), ("openai", None)]
    gap = attempts[1].timestamp - attempts[0].timestamp
    assert gap.total_seconds() >= 0.9  # the retry waited for retry-after


def test_a_stream_cut_midway_is_charged_from_estimates_never_zero(
    write_side: AgentWorks, database_url: str
) -> None:
    events = openai_events(["partial ", "answer ", "lost"], prompt_tokens=50, completion_tokens=3)
    cut = [Reply(events=events, cut_after=3)]
    run = run_on_fake_openai(write_side, database_url, cut, max_attempts=2)
    assert run.status is RunStatus.FAILED
    attempts = events_of(write_side, run.id, AgentRun.AttemptRecorded)
    assert len(attempts) == 2
    for attempt in attempts:
        assert attempt.estimated
        assert attempt.input_tokens > 0
        assert attempt.output_tokens > 0
        assert attempt.provider_cost_micros > 0
    assert run.provider_cost_micros == sum(a.provider_cost_micros for a in attempts)


def test_cancel_stops_the_running_call_within_a_second(
    write_side: AgentWorks, database_url: str
) -> None:
    card = card_on_board(write_side)
    slow = fast_simulated(tokens_per_second=20, output_tokens=2000)
    with orchestrator_thread(database_url, {"simulated": slow}) as orchestrator:
        run_id = start(write_side, card)
        wait_for(write_side, run_id, running_with_lines)
        cancelled_at = time.monotonic()
        write_side.cancel_agent_run(m.CancelAgentRun(run_id=run_id, reason="enough"),
                                    card.board.owner)  # fmt: skip
        while run_id in orchestrator.tasks and time.monotonic() - cancelled_at < 5:
            time.sleep(0.01)
        stopped_after = time.monotonic() - cancelled_at
        assert run_id not in orchestrator.tasks
        count = len(stored(write_side, run_id))
        time.sleep(1.0)
        assert len(stored(write_side, run_id)) == count  # nothing written after the stop
    print(f"cancel -> call stopped: {stopped_after * 1000:.0f} ms")
    run = write_side.run_snapshot(run_id)
    assert run.status is RunStatus.CANCELLED
    # What streamed before the cancel was produced: charged from estimates, never zero.
    [attempt] = events_of(write_side, run_id, AgentRun.AttemptRecorded)
    assert (attempt.status, attempt.error, attempt.estimated) == (
        "failed", "stopped: cancelled", True,
    )  # fmt: skip
    assert attempt.output_tokens > 0
    assert run.billed_micros > 0


def test_run_budget_reached_mid_stream_fails_with_budget_and_charges_what_was_used(
    write_side: AgentWorks, database_url: str
) -> None:
    card = card_on_board(write_side)
    # The prompt (~80 tokens) fits in $0.0005 at sim-1 x 5; 200 output tokens do not.
    slow = fast_simulated(tokens_per_second=400, output_tokens=400)
    with orchestrator_thread(database_url, {"simulated": slow}):
        run_id = start(write_side, card, max_cost="0.0005")
        run = wait_for(write_side, run_id, finished)
    assert run.status is RunStatus.FAILED
    assert "budget" in (run.error or "")
    assert run.billed_micros > 0
    # Stopped at the first piece that reached the limit: at most one piece over.
    assert run.billed_micros <= 500 + 5 * 2 * 10
    [attempt] = events_of(write_side, run_id, AgentRun.AttemptRecorded)
    assert attempt.estimated


def test_run_timeout_ends_timed_out(write_side: AgentWorks, database_url: str) -> None:
    card = card_on_board(write_side)
    slow = fast_simulated(tokens_per_second=10, output_tokens=2000)
    with orchestrator_thread(database_url, {"simulated": slow}, run_timeout=1.0):
        run_id = start(write_side, card)
        run = wait_for(write_side, run_id, finished)
    assert run.status is RunStatus.TIMED_OUT
    [attempt] = events_of(write_side, run_id, AgentRun.AttemptRecorded)
    assert attempt.estimated
    assert run.billed_micros > 0


def test_two_orchestrators_share_a_backlog_and_never_run_a_run_twice(
    write_side: AgentWorks, database_url: str
) -> None:
    card = card_on_board(write_side)
    run_ids = [start(write_side, card) for _ in range(12)]
    providers_a: dict[str, Provider] = {"simulated": fast_simulated(tokens_per_second=300)}
    providers_b: dict[str, Provider] = {"simulated": fast_simulated(tokens_per_second=300)}
    with (
        orchestrator_thread(database_url, providers_a, concurrency=3, worker_id="A"),
        orchestrator_thread(database_url, providers_b, concurrency=3, worker_id="B"),
    ):
        runs = [wait_for(write_side, r, finished, timeout=60) for r in run_ids]
    assert all(r.status is RunStatus.SUCCEEDED for r in runs)
    workers: Counter[str] = Counter()
    for run_id in run_ids:
        started = events_of(write_side, run_id, AgentRun.Started)
        assert len(started) == 1
        assert not events_of(write_side, run_id, AgentRun.Reclaimed)
        assert len(events_of(write_side, run_id, AgentRun.LlmCallCompleted)) == 1
        workers[started[0].worker] += 1
    assert set(workers) == {"A", "B"}, workers


def test_a_failing_provider_opens_its_circuit_and_the_run_log_says_so(
    write_side: AgentWorks, database_url: str
) -> None:
    """Once its circuit opened, a run pinned to the provider called it all the same, as if
    there were no circuit; it waits for the circuit's trial instead, and gives up at once when
    that comes after its deadline."""
    run = run_into_an_open_circuit(write_side, database_url)
    assert run.status is RunStatus.FAILED
    assert "circuit for openai is open" in (run.error or "")
    assert "after the run's deadline" in (run.error or "")
    attempts = events_of(write_side, run.id, AgentRun.AttemptRecorded)
    assert [a.http_status for a in attempts] == [503, 503, 503]
    said = log_lines(write_side, run.id)
    assert sum(t.startswith("circuit for openai is open") for t in said) == 1


def test_a_run_with_no_candidate_the_circuits_let_through_waits_for_the_trial(
    write_side: AgentWorks, database_url: str
) -> None:
    """Pinned to a provider whose circuit opened during the run, the run waits out the
    cooldown (its log says for how long) and makes the trial call, which succeeds."""
    replies = [Reply(status=503, body=b"unavailable")] * 3 + [
        Reply(events=openai_events(["fine"], prompt_tokens=10, completion_tokens=1))
    ]
    with (
        FakeProviderServer(replies) as server,
        orchestrator_thread(
            database_url,
            openai_at(server),
            max_attempts=4,
            breaker_threshold=3,
            breaker_cooldown=1.0,
        ),  # fmt: skip
    ):
        run = wait_for(write_side, start(write_side, card_on_board(write_side),
                                         provider="openai"), finished)  # fmt: skip
        asked = len(server.requests)
    assert run.status is RunStatus.SUCCEEDED, run.error
    assert run.output == "fine"
    assert asked == 4
    waits = [t for t in log_lines(write_side, run.id) if t.startswith("waiting")]
    assert len(waits) == 1
    assert "for the circuit of openai" in waits[0]


# -- an orchestrator process killed mid-run --------------------------------------------------------


def test_a_killed_orchestrators_runs_are_taken_over_and_never_charged_twice(
    write_side: AgentWorks, database_url: str, tmp_path: Path
) -> None:
    card = card_on_board(write_side)
    first = start(write_side, card)
    with orchestrator_process(
        database_url, tmp_path, AGENTWORKS_SIMULATED_TOKENS_PER_SECOND="30",
        AGENTWORKS_SIMULATED_OUTPUT_TOKENS="400",
    ):  # fmt: skip
        # A second run the dead process had finished one call of would show a double charge.
        wait_for(write_side, first, running_with_lines, timeout=60)
    killed_worker = write_side.run_snapshot(first).worker
    lines_before = write_side.run_snapshot(first).next_seq
    second = start(write_side, card, agent="reviewer")
    with orchestrator_thread(database_url, {"simulated": fast_simulated()}, stale_after=1.5,
                             worker_id="rescuer"):  # fmt: skip
        runs = [wait_for(write_side, r, finished, timeout=60) for r in (first, second)]
    assert [r.status for r in runs] == [RunStatus.SUCCEEDED, RunStatus.SUCCEEDED]
    rescued = runs[0]
    [reclaimed] = events_of(write_side, first, AgentRun.Reclaimed)
    assert (reclaimed.previous_worker, reclaimed.worker) == (killed_worker, "rescuer")
    assert rescued.next_seq > lines_before  # the log went on after the takeover
    for run in runs:
        calls = events_of(write_side, run.id, AgentRun.LlmCallCompleted)
        ids = Counter(c.call_id for c in calls)
        assert all(n == 1 for n in ids.values()), ids
        charges: list[UsageCharge] = [write_side.repository.get(c.charge_id) for c in calls]
        assert all(isinstance(c, UsageCharge) for c in charges)
        assert run.billed_micros == sum(c.billed_micros for c in charges)


_CONTENT_AS_PARTS = {
    "choices": [{"index": 0, "delta": {"content": [{"type": "text", "text": "x"}]}}]
}


@pytest.mark.parametrize(
    "chunk",
    [pytest.param([1], id="a-list-for-an-object"), pytest.param(_CONTENT_AS_PARTS, id="parts")],
)
def test_an_unreadable_event_mid_stream_is_retried_and_what_streamed_is_charged(
    write_side: AgentWorks, database_url: str, chunk: object
) -> None:
    """A chunk of the wrong shape breaks the call like a cut stream: retried, and the text it
    streamed charged from estimates; the run did not crash with nothing charged. Answer text
    that is no string (content as a list of parts, as some OpenAI-compatible servers stream it)
    reached the run as a piece of text: the run ended FAILED "internal error" and the call,
    accepted and streaming, was not recorded."""
    bad = openai_events(["partial ", "answer\n"], prompt_tokens=50, completion_tokens=3)
    bad.insert(3, "data: " + json.dumps(chunk))
    ok = openai_events(["fine"], prompt_tokens=10, completion_tokens=1)
    run = run_on_fake_openai(write_side, database_url, [Reply(events=bad), Reply(events=ok)])
    assert run.status is RunStatus.SUCCEEDED, run.error
    assert run.output == "fine"
    attempts = events_of(write_side, run.id, AgentRun.AttemptRecorded)
    assert [(a.status, a.estimated) for a in attempts] == [("failed", True), ("ok", False)]
    assert attempts[0].output_tokens > 0
    assert attempts[0].provider_cost_micros > 0
    assert run.provider_cost_micros == sum(a.provider_cost_micros for a in attempts)


@pytest.mark.parametrize(("before", "charged"), [([], False), (["partial answer\n"], True)])
def test_an_openai_error_chunk_is_charged_only_after_text_as_an_anthropic_error_event(
    write_side: AgentWorks, database_url: str, before: list[str], charged: bool
) -> None:
    """An error the provider streams (OpenAI's ``{"error": …}`` chunk, Anthropic's ``error``
    event) is its own failure: before any text it billed nothing, and neither do we, as for
    Anthropic's. OpenAI's was taken for a broken stream and charged our estimate of the prompt."""
    failing = openai_events(before, prompt_tokens=50, completion_tokens=3, usage=False)[:-2]
    error = {"error": {"message": "The server had an error", "type": "server_error"}}
    failing.append("data: " + json.dumps(error))
    ok = openai_events(["fine"], prompt_tokens=10, completion_tokens=1)
    run = run_on_fake_openai(write_side, database_url, [Reply(events=failing), Reply(events=ok)])
    assert run.status is RunStatus.SUCCEEDED, run.error
    first, second = events_of(write_side, run.id, AgentRun.AttemptRecorded)
    assert first.status == "failed"
    assert "server had an error" in (first.error or "")
    assert (first.provider_cost_micros > 0) is charged
    assert (first.input_tokens > 0) is charged
    assert second.status == "ok"


def test_model_output_and_provider_errors_holding_nul_or_lone_surrogates_are_kept_replaced(
    write_side: AgentWorks, database_url: str
) -> None:
    """NUL and lone surrogates (JSON's \\u0000 and \\ud800 escapes) cannot be stored as text: a
    run's output and an attempt's error keep them as U+FFFD, as its log lines do. Both commands
    refused them instead: a run whose call had succeeded (and was charged) ended FAILED
    "internal error", and an error body holding NUL failed the run rather than be retried."""
    broken = Reply(status=500, body=b"bad\x00gateway")
    ok = openai_events(["nul \x00 and \ud800 here"], prompt_tokens=10, completion_tokens=5)
    card = card_on_board(write_side)
    with (
        FakeProviderServer([broken, Reply(events=ok)]) as server,
        orchestrator_thread(database_url, openai_at(server)),
    ):
        run = wait_for(write_side, start(write_side, card, provider="openai"), finished,
                       timeout=10.0)  # fmt: skip
    assert run.status is RunStatus.SUCCEEDED, run.error
    assert run.output == "nul \ufffd and \ufffd here"
    attempts = events_of(write_side, run.id, AgentRun.AttemptRecorded)
    assert [(a.http_status, a.status) for a in attempts] == [(500, "failed"), (None, "ok")]
    assert "bad\ufffdgateway" in (attempts[0].error or "")


def test_a_retry_after_beyond_the_runs_deadline_fails_the_run_at_once_with_the_429(
    write_side: AgentWorks, database_url: str
) -> None:
    """A pinned run told to come back after its deadline cannot retry within it: it fails at
    once, saying so, rather than hold its slot idle until its timeout and end TIMED_OUT."""
    limited = [Reply(status=429, headers={"retry-after": "3600"}, body=b'{"error": "quota"}')]
    began = time.monotonic()
    run = run_on_fake_openai(write_side, database_url, limited, run_timeout=8.0)
    took = time.monotonic() - began
    assert run.status is RunStatus.FAILED, run.status
    assert "deadline" in (run.error or ""), run.error
    assert "429" in (run.error or ""), run.error
    assert took < 6.0, took
    [attempt] = events_of(write_side, run.id, AgentRun.AttemptRecorded)
    assert attempt.http_status == 429


def test_a_run_its_own_orchestrator_let_go_of_is_taken_over_by_that_orchestrator(
    write_side: AgentWorks, database_url: str
) -> None:
    """A run stays RUNNING under a worker that no longer runs it without that worker dying: its
    claim committed while the store could not say so, or its finish could not be written (the
    database was down), and the worker let the run go. Only a takeover frees it, and the worker
    itself was refused one ("already run by"): with one orchestrator it stayed RUNNING for good."""
    card = card_on_board(write_side)
    run_id = start(write_side, card)
    actor = Actor.service("orchestrator", card.board.workspace_id)
    write_side.begin_run(m.BeginRun(run_id=run_id, worker="solo"), actor)
    with orchestrator_thread(database_url, worker_id="solo", stale_after=1.0):
        run = wait_for(write_side, run_id, finished, timeout=15.0)
    assert run.status is RunStatus.SUCCEEDED, run.error
    [reclaimed] = events_of(write_side, run_id, AgentRun.Reclaimed)
    assert (reclaimed.previous_worker, reclaimed.worker) == ("solo", "solo")


def failing_once(monkeypatch: pytest.MonkeyPatch, command: str) -> list[int]:
    """Make the write side's ``command`` answer UNAVAILABLE (nothing written) the first time, as
    it does while the database restarts; returns the count of calls."""
    calls: list[int] = []
    real = getattr(AgentWorks, command)

    def once(self: AgentWorks, cmd: Any, actor: Actor) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise Unavailable("the database is restarting", retry_after_seconds=0.1)
        return real(self, cmd, actor)

    monkeypatch.setattr(AgentWorks, command, once)
    return calls


def run_through_one_refusal(
    write_side: AgentWorks,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
    command: str,
    *,
    linger: float = 0.0,
    **orchestrator: Any,
) -> tuple[AgentRun, int]:
    """A run whose ``command`` the store refuses once as UNAVAILABLE; it succeeds all the same.
    The orchestrator stays up ``linger`` seconds after the run ends. Returns the run and how
    often ``command`` was sent."""
    card = card_on_board(write_side)
    calls = failing_once(monkeypatch, command)
    with orchestrator_thread(database_url, **orchestrator):
        run = wait_for(write_side, start(write_side, card), finished, timeout=15.0)
        time.sleep(linger)
    assert run.status is RunStatus.SUCCEEDED, run.error
    return run, len(calls)


def test_a_claim_the_store_could_not_take_is_tried_again(
    write_side: AgentWorks, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A BeginRun refused as UNAVAILABLE wrote nothing; the run was taken off the queue all the
    same, and stayed QUEUED until the orchestrator restarted."""
    _, sent = run_through_one_refusal(write_side, database_url, monkeypatch, "begin_run")
    assert sent == 2


def test_a_finish_the_store_could_not_take_is_tried_again_not_run_a_second_time(
    write_side: AgentWorks, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A FinishRun refused as UNAVAILABLE left the run RUNNING with its call charged; the stale
    sweep took it over and ran (and charged) the call a second time."""
    # A takeover, if there were one, would come within the 2 s lingered.
    run, sent = run_through_one_refusal(
        write_side, database_url, monkeypatch, "finish_run", linger=2.0, stale_after=1.5
    )
    assert sent == 2
    assert not events_of(write_side, run.id, AgentRun.Reclaimed)
    assert len(events_of(write_side, run.id, AgentRun.LlmCallCompleted)) == 1


def test_a_log_chunk_the_store_could_not_take_is_written_again_and_the_run_goes_on(
    write_side: AgentWorks, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chunk refused as UNAVAILABLE (nothing written) stopped the run's log writer for good:
    no line of the run was written after it, and the run, its call done and charged, ended
    FAILED "internal error"."""
    run, sent = run_through_one_refusal(write_side, database_url, monkeypatch, "append_run_log")
    assert sent >= 2
    lines = [ln for c in events_of(write_side, run.id, AgentRun.LogChunkAppended) for ln in c.lines]
    assert [ln["seq"] for ln in lines] == list(range(1, len(lines) + 1))
    logged = "\n".join(ln["text"] for ln in lines if ln["stream"] == "stdout")
    assert logged.strip() == (run.output or "").strip()


def test_a_charge_the_store_could_not_take_is_written_again_not_lost(
    write_side: AgentWorks, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An attempt (and its charge) refused as UNAVAILABLE with nothing written was not written
    again: the call the provider had answered, and billed, was never charged, and the run ended
    FAILED "internal error"."""
    run, sent = run_through_one_refusal(
        write_side, database_url, monkeypatch, "record_provider_attempt"
    )
    assert sent == 2
    [attempt] = events_of(write_side, run.id, AgentRun.AttemptRecorded)
    assert attempt.status == "ok"
    assert run.billed_micros > 0


@pytest.mark.parametrize("committed", [True, False], ids=["committed", "not committed"])
def test_a_charge_whose_commit_answer_was_lost_is_sent_again_and_charged_once(
    write_side: AgentWorks, database_url: str, monkeypatch: pytest.MonkeyPatch, committed: bool
) -> None:
    """The write side answers UNAVAILABLE, outcome unknown, when the connection broke at the
    charge's COMMIT and it could not learn whether the commit landed. The orchestrator did not
    send it again (a second record of the call would have been refused, taken for the run
    lost), and the run ended FAILED "internal error": its charge lost if the commit was. Sent
    again now, it is recorded (not committed) or answered with the first record (committed):
    charged once either way, and the run goes on."""
    card = card_on_board(write_side)
    calls: list[int] = []
    real = AgentWorks.record_provider_attempt

    def answer_lost_once(self: AgentWorks, cmd: Any, actor: Actor) -> Any:
        calls.append(1)
        if len(calls) == 1:
            if committed:
                real(self, cmd, actor)
            raise Unavailable(
                "the database connection was lost while this write was committing",
                retry_after_seconds=0.1, outcome="unknown",
            )  # fmt: skip
        return real(self, cmd, actor)

    monkeypatch.setattr(AgentWorks, "record_provider_attempt", answer_lost_once)
    with orchestrator_thread(database_url):
        run = wait_for(write_side, start(write_side, card), finished, timeout=15.0)
    assert run.status is RunStatus.SUCCEEDED, run.error
    assert len(calls) == 2
    [attempt] = events_of(write_side, run.id, AgentRun.AttemptRecorded)
    [call] = events_of(write_side, run.id, AgentRun.LlmCallCompleted)
    [charge] = events_of(write_side, call.charge_id, UsageCharge.Charged)
    assert (attempt.status, attempt.call_id) == ("ok", call.call_id)
    assert run.billed_micros == charge.billed_micros > 0


def test_requests_a_provider_refuses_as_bad_do_not_open_its_circuit_for_everyone(
    write_side: AgentWorks, database_url: str
) -> None:
    """A 400 says the request was bad, not that the provider is down. Three of them (one
    tenant's runs with a prompt too long, say) opened the provider's circuit, and every other
    run the router placed went elsewhere while the provider answered well."""
    bad = Reply(status=400, body=b'{"error": {"code": "context_length_exceeded"}}')
    ok = openai_events(["fine"], prompt_tokens=10, completion_tokens=1)
    refused_card, card = card_on_board(write_side), card_on_board(write_side)
    with (
        FakeProviderServer([bad, bad, bad, Reply(events=ok)]) as server,
        orchestrator_thread(
            database_url, openai_at(server, then_simulated=True), breaker_threshold=3
        ),  # fmt: skip
    ):
        for _ in range(3):
            refused = wait_for(write_side, start(write_side, refused_card, provider="openai"),
                               finished)  # fmt: skip
            assert refused.status is RunStatus.FAILED
        run = wait_for(write_side, start(write_side, card), finished)
    assert run.status is RunStatus.SUCCEEDED, run.error
    assert (run.provider, run.output) == ("openai", "fine")
    assert not any("circuit" in t for t in log_lines(write_side, run.id))


@contextmanager
def openai_failing_then_fine(
    database_url: str, failures: int, **config: Any
) -> Iterator[FakeProviderServer]:
    """An orchestrator (``config``) whose OpenAI answers 503 ``failures`` times, then well, with
    the simulated provider to fall back to and circuits that open after three failures."""
    replies = [Reply(status=503, body=b"unavailable")] * failures + [
        Reply(events=openai_events(["fine"], prompt_tokens=10, completion_tokens=1))
    ]
    with (
        FakeProviderServer(replies) as server,
        orchestrator_thread(
            database_url, openai_at(server, then_simulated=True), breaker_threshold=3, **config
        ),
    ):
        yield server


def test_one_workspaces_failing_calls_do_not_turn_another_workspaces_runs_away(
    write_side: AgentWorks, database_url: str
) -> None:
    """Three failures in a row of one tenant's calls (here 503s; its prompts timing out, say)
    opened OpenAI's circuit for every tenant: another tenant's run, placed by the router, went to
    the fallback while OpenAI answered it well. They open that tenant's own circuit."""
    failing_card, card = card_on_board(write_side), card_on_board(write_side)
    with openai_failing_then_fine(database_url, 3, max_attempts=3):
        failed = wait_for(write_side, start(write_side, failing_card, provider="openai"),
                          finished)  # fmt: skip
        run = wait_for(write_side, start(write_side, card), finished)
    assert run.status is RunStatus.SUCCEEDED, run.error
    assert (run.provider, run.output) == ("openai", "fine")
    assert not any("circuit" in t for t in log_lines(write_side, run.id))
    assert failed.status is RunStatus.FAILED
    said = [t for t in log_lines(write_side, failed.id) if "circuit" in t]
    assert said == ["circuit for openai is open for this workspace"]


def test_failing_calls_of_two_workspaces_open_the_providers_circuit_for_all(
    write_side: AgentWorks, database_url: str
) -> None:
    """What an outage looks like: failures in a row seen by two tenants. A third tenant's run,
    placed by the router, goes to the fallback; the run that opened it calls OpenAI no more
    (its trial would come after its deadline)."""
    first, second, third = (card_on_board(write_side) for _ in range(3))
    with openai_failing_then_fine(
        database_url, 4, max_attempts=2, breaker_cooldown=600, run_timeout=20
    ) as server:
        a = wait_for(write_side, start(write_side, first, provider="openai"), finished)
        b = wait_for(write_side, start(write_side, second, provider="openai"), finished)
        c = wait_for(write_side, start(write_side, third), finished)
        asked = len(server.requests)
    assert (a.status, b.status) == (RunStatus.FAILED, RunStatus.FAILED)
    assert [t for t in log_lines(write_side, a.id) if "circuit" in t] == []
    assert "circuit for openai is open" in log_lines(write_side, b.id)
    assert c.status is RunStatus.SUCCEEDED, c.error
    assert c.provider == "simulated"
    assert asked == 3  # neither the second run once the circuit opened, nor the third


@pytest.mark.parametrize(
    ("status", "code", "calls"),
    [
        (400, "context_length_exceeded", 2),
        (401, "invalid_api_key", 1),
        (402, "billing_error", 1),
        (307, "context_length_exceeded", 1),
        # OpenAI's answer to an account out of credit: a 429 no wait ends.
        (429, "insufficient_quota", 1),
    ],
)
def test_an_unpinned_run_asks_no_model_again_that_refused_its_request(
    write_side: AgentWorks, database_url: str, status: int, code: str, calls: int
) -> None:
    """An unpinned run whose request a model refused (400: a prompt too long) asked it again,
    the same request, as if the refusal were an outage: its only model up to ``max_attempts``
    times, or the chain round to it again. Each model is asked once (a refused key, 401, our
    account unpaid, 402 (Anthropic's ``billing_error``) or OpenAI's 429 ``insufficient_quota``,
    or a redirect away from its base URL: no model of that provider), and the run fails once
    none is left."""
    card = card_on_board(write_side)
    refused = Reply(status=status, body=json.dumps({"error": {"code": code}}).encode())
    with (
        FakeProviderServer([refused]) as server,
        orchestrator_thread(database_url, openai_at(server), max_attempts=4),
    ):
        run = wait_for(write_side, start(write_side, card), finished)
        asked = [r.body["model"] for r in server.requests]
    assert run.status is RunStatus.FAILED
    assert "refused" in (run.error or "")
    assert len(asked) == len(set(asked)) == calls


def test_a_provider_streaming_past_the_calls_max_tokens_is_cut_and_charged_no_more(
    write_side: AgentWorks, database_url: str
) -> None:
    """A provider that ignores ``max_tokens`` streamed into the run's log until its deadline,
    and the call was charged every token received; cut well past the cap (our tokenizer is not
    the provider's), it is charged the cap at most, as a broken stream."""
    words = [" word"] * 2500
    endless = openai_events(words, prompt_tokens=1, completion_tokens=1, usage=False)[:-2]
    card = card_on_board(write_side)
    with (
        FakeProviderServer([Reply(events=endless)]) as server,
        orchestrator_thread(database_url, openai_at(server), max_attempts=1),
    ):
        run = wait_for(write_side, start(write_side, card, agent="reviewer", provider="openai"),
                       finished)  # fmt: skip
    [attempt] = events_of(write_side, run.id, AgentRun.AttemptRecorded)
    assert run.status is RunStatus.FAILED
    assert attempt.estimated
    assert 0 < attempt.output_tokens <= 800
    assert "streamed past" in (attempt.error or "")


def test_a_run_event_that_cannot_be_decoded_does_not_stop_every_other_run(
    write_side: AgentWorks, database_url: str
) -> None:
    """A stored AgentRun event that today's code cannot read (its state not JSON, as a bad
    upgrade may leave one) is passed over, as the read side passes over it: the orchestrator
    read the log in batches and failed the whole batch on it, again and again, so no run of any
    workspace was claimed (or cancelled) any more."""
    card = card_on_board(write_side)
    template = start(write_side, card)
    write_side.cancel_agent_run(m.CancelAgentRun(run_id=template, reason="template"),
                                card.board.owner)  # fmt: skip
    (requested,) = write_side.recorder.select_events(template, limit=1)
    broken = type(requested)(
        originator_id=uuid4(), originator_version=1, topic=requested.topic,
        state=b'{"card_id": "planted", "timest',
    )  # fmt: skip
    write_side.recorder.insert_events([broken])
    run_id = start(write_side, card)
    with orchestrator_thread(database_url):
        run = wait_for(write_side, run_id, finished)
    assert run.status is RunStatus.SUCCEEDED, run.error


def _heartbeats_refused_slowly(
    monkeypatch: pytest.MonkeyPatch, orchestrators: list[Any], first: Callable[[], object]
) -> None:
    """A heartbeat refused (the run no longer RUNNING) answers only once the log's cancel has
    reached the run's task, holding the run's lock meanwhile; ``first`` runs as it is refused."""
    real = AgentWorks.record_run_heartbeat

    def refused_once_the_cancel_is_seen(self: AgentWorks, cmd: Any, actor: Actor) -> Any:
        try:
            return real(self, cmd, actor)
        except InvalidTransition:
            first()
            deadline = time.monotonic() + 5
            while cmd.run_id not in orchestrators[0].cancelled and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.3)
            raise

    monkeypatch.setattr(AgentWorks, "record_run_heartbeat", refused_once_the_cancel_is_seen)


def _cancel_then_await_the_attempt(
    write_side: AgentWorks, card: Any, run_id: UUID, deadline: float
) -> None:
    write_side.cancel_agent_run(m.CancelAgentRun(run_id=run_id, reason="enough"),
                                card.board.owner)  # fmt: skip
    while not events_of(write_side, run_id, AgentRun.AttemptRecorded):
        assert time.monotonic() < deadline, "the cancelled call was never recorded"
        time.sleep(0.05)


class _AnswersTwoLinesThenWaits:
    """The simulated provider's name, a call it accepts, two lines of text, then its usage once
    ``told`` is set (never, without one)."""

    name = "simulated"

    def __init__(self, told: threading.Event | None = None) -> None:
        self.told = told

    async def aclose(self) -> None:
        return None

    async def stream(self, request: ChatRequest) -> AsyncIterator[Piece]:
        yield Accepted(50)
        yield "a first line of the answer\n"
        yield "and a second\n"
        while self.told is None or not self.told.is_set():
            await asyncio.sleep(0.01)
        yield Usage(50, 12)


def test_a_cancel_that_reaches_the_run_twice_does_not_cut_the_record_of_its_call(
    write_side: AgentWorks, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run's cancel reaches its task twice: the log brings it, and a heartbeat of the run
    under way at the cancel is refused (the run is no longer RUNNING) and cancels the task too.
    The second cancel cut the record of the call the first one was writing (waiting for the
    run's lock the heartbeat held): the call, accepted and streaming, was left unrecorded, to be
    charged its prompt alone by the sweep of open calls once the worker looked dead."""
    card = card_on_board(write_side)
    orchestrators: list[Any] = []
    # The cancelled task then waits for the run's lock to record its call.
    _heartbeats_refused_slowly(monkeypatch, orchestrators, lambda: None)
    thinking = {"simulated": _AnswersTwoLinesThenWaits()}
    # Heartbeats often, the log read once a second: the heartbeat meets the cancel first.
    with orchestrator_thread(
        database_url, thinking, heartbeat_interval=0.05, poll_interval=1.0
    ) as orchestrator:
        orchestrators.append(orchestrator)
        run_id = start(write_side, card)
        wait_for(write_side, run_id, running_with_lines)
        _cancel_then_await_the_attempt(write_side, card, run_id, time.monotonic() + 10)
    [attempt] = events_of(write_side, run_id, AgentRun.AttemptRecorded)
    assert (attempt.status, attempt.error) == ("failed", "stopped: cancelled")
    assert attempt.output_tokens > 0
    assert write_side.run_snapshot(run_id).billed_micros > 0


def test_a_cancel_while_a_finished_calls_charge_waits_does_not_cut_the_charge(
    write_side: AgentWorks, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A call the provider finished (its usage came) waits for the run's lock to be recorded,
    a heartbeat of the run holding it, when the run's cancel comes: the cancel cut the record,
    and the call, whole and billed by the provider, was left for the sweep of open calls to
    charge its prompt alone. So would a run's timeout or the orchestrator stopping have cut it.
    The record is written, then the cancel goes on."""
    card = card_on_board(write_side)
    orchestrators: list[Any] = []
    answer = threading.Event()
    # The usage comes while the refusal holds the run's lock.
    _heartbeats_refused_slowly(monkeypatch, orchestrators, answer.set)
    # Heartbeats often, the log read every 2 s: the cancel comes once the charge waits.
    with orchestrator_thread(
        database_url, {"simulated": _AnswersTwoLinesThenWaits(answer)}, heartbeat_interval=0.05,
        poll_interval=2.0,
    ) as orchestrator:  # fmt: skip
        orchestrators.append(orchestrator)
        run_id = start(write_side, card)
        wait_for(write_side, run_id, running_with_lines)
        deadline = time.monotonic() + 10
        _cancel_then_await_the_attempt(write_side, card, run_id, deadline)
        while run_id in orchestrator.tasks:
            assert time.monotonic() < deadline, "the cancelled run's task never ended"
            time.sleep(0.05)
    [attempt] = events_of(write_side, run_id, AgentRun.AttemptRecorded)
    assert attempt.output_tokens > 0
    run = write_side.run_snapshot(run_id)
    assert run.status is RunStatus.CANCELLED
    assert run.billed_micros > 0


@pytest.mark.parametrize("refused_write", ["finish_run", "append_run_log"])
def test_an_orchestrator_stopping_while_a_run_closes_still_finishes_it(
    write_side: AgentWorks, database_url: str, monkeypatch: pytest.MonkeyPatch, refused_write: str
) -> None:
    """An orchestrator stopped (a deploy's SIGTERM) while a run's finish, or its last log lines,
    waited to be sent again (the store had refused them as unavailable, nothing written) cut
    them: the run, its work done and its call charged, stayed RUNNING, and the orchestrator that
    took it over ran it, and charged it, a second time. They are written before the task stops."""
    card = card_on_board(write_side)
    real = getattr(AgentWorks, refused_write)
    refused: list[int] = []

    def refused_once_after_the_charge(self: AgentWorks, cmd: Any, actor: Actor) -> Any:
        if not refused and self.run_snapshot(cmd.run_id).call_ids:
            refused.append(1)
            raise Unavailable("the database is restarting", retry_after_seconds=0.1)
        return real(self, cmd, actor)

    monkeypatch.setattr(AgentWorks, refused_write, refused_once_after_the_charge)
    # Sent again after backoff_base: the orchestrator stops meanwhile.
    with orchestrator_thread(database_url, backoff_base=2.0):
        run_id = start(write_side, card)
        deadline = time.monotonic() + 15
        while not refused:
            assert time.monotonic() < deadline, f"no {refused_write} came after the charge"
            time.sleep(0.01)
    # A takeover, if the run were left RUNNING, would come within the 3 s lingered.
    with orchestrator_thread(database_url, stale_after=1.0):
        time.sleep(3.0)
    run = write_side.run_snapshot(run_id)
    assert run.status is RunStatus.SUCCEEDED, run.status
    assert not events_of(write_side, run_id, AgentRun.Reclaimed)
    assert len(events_of(write_side, run_id, AgentRun.LlmCallCompleted)) == 1


# -- what the orchestrator tells /metrics -------------------------------------------------------


class MetricsDelta:
    """The change of ``/metrics`` samples (the process-wide registry the orchestrator records
    into) over a block: ``delta(name, **labels)`` once it has run."""

    def __init__(self) -> None:
        self._before = self._read()

    @staticmethod
    def _read() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in REGISTRY.collect()
            if family.name.startswith("agentworks_")
            for sample in family.samples
        }

    def delta(self, name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return self._read().get(key, 0.0) - self._before.get(key, 0.0)


def test_a_runs_call_tokens_bill_and_duration_are_counted_in_the_metrics(
    write_side: AgentWorks, database_url: str
) -> None:
    metrics = MetricsDelta()
    card = card_on_board(write_side)
    with orchestrator_thread(database_url):
        run = wait_for(write_side, start(write_side, card), finished)
        wait_for_gauge(metrics, "agentworks_agent_runs_in_flight", 0.0)
    assert run.status is RunStatus.SUCCEEDED, run.error
    assert metrics.delta("agentworks_llm_calls_total", provider="simulated", model="sim-1",
                         outcome="ok") == 1  # fmt: skip
    tokens = "agentworks_llm_tokens_total"
    assert metrics.delta(tokens, provider="simulated", direction="input") == run.input_tokens > 0
    assert metrics.delta(tokens, provider="simulated", direction="output") == run.output_tokens
    billed = "agentworks_llm_billed_micro_usd_total"
    assert metrics.delta(billed, provider="simulated") == run.billed_micros > 0
    assert metrics.delta("agentworks_llm_call_seconds_count", provider="simulated") == 1
    assert metrics.delta("agentworks_llm_first_token_seconds_count", provider="simulated") == 1
    assert metrics.delta("agentworks_agent_runs_finished_total", outcome="SUCCEEDED") == 1
    assert metrics.delta("agentworks_agent_run_seconds_count", outcome="SUCCEEDED") == 1


def wait_for_gauge(metrics: MetricsDelta, name: str, change: float) -> None:
    """The run's task leaves its slot a moment after its finish is stored."""
    deadline = time.monotonic() + 5
    while metrics.delta(name) != change and time.monotonic() < deadline:
        time.sleep(0.02)
    assert metrics.delta(name) == change


_FINE = Reply(events=openai_events(["fine"], prompt_tokens=10, completion_tokens=1))
_BROKEN = openai_events(["partial ", "answer\n"], prompt_tokens=50, completion_tokens=3)
_BROKEN.insert(3, "data: " + json.dumps({"choices": "not a list"}))


@pytest.mark.parametrize(
    ("replies", "pinned", "outcomes", "finished_as"),
    [
        ([Reply(status=429, headers={"retry-after": "0"}, body=b"{}"), _FINE], True,
         {("openai", "rate_limited"): 1, ("openai", "ok"): 1}, "SUCCEEDED"),
        ([Reply(status=500, body=b"down")], False,
         {("openai", "unavailable"): 1, ("simulated", "ok"): 1}, "SUCCEEDED"),
        ([Reply(status=400, body=b'{"error": {"code": "context_length_exceeded"}}')], True,
         {("openai", "refused"): 1}, "FAILED"),
        ([Reply(events=_BROKEN), _FINE], True,
         {("openai", "broken"): 1, ("openai", "ok"): 1}, "SUCCEEDED"),
    ],
    ids=["rate-limited", "unavailable", "refused", "broken"],
)  # fmt: skip
def test_each_calls_outcome_is_counted_by_provider_model_and_outcome(
    write_side: AgentWorks,
    database_url: str,
    replies: list[Reply],
    pinned: bool,
    outcomes: dict[tuple[str, str], int],
    finished_as: str,
) -> None:
    metrics = MetricsDelta()
    run = run_on_fake_openai(write_side, database_url, replies, pinned=pinned,
                             then_simulated=True)  # fmt: skip
    assert run.status.value == finished_as, run.error
    models = {"openai": "gpt-4o-mini", "simulated": "sim-1"}
    counted = {
        (provider, outcome): metrics.delta(
            "agentworks_llm_calls_total",
            provider=provider,
            model=models[provider],
            outcome=outcome,
        )
        for provider in models
        for outcome in ("ok", "budget", "cut", "rate_limited", "unavailable", "refused", "broken")
    }
    assert {key: n for key, n in counted.items() if n} == outcomes
    assert metrics.delta("agentworks_agent_runs_finished_total", outcome=finished_as) == 1


def test_a_call_stopped_at_the_budget_and_a_circuit_opening_are_counted(
    write_side: AgentWorks, database_url: str
) -> None:
    metrics = MetricsDelta()
    card = card_on_board(write_side)
    slow = fast_simulated(tokens_per_second=400, output_tokens=400)
    with orchestrator_thread(database_url, {"simulated": slow}):
        run = wait_for(write_side, start(write_side, card, max_cost="0.0005"), finished)
    assert run.status is RunStatus.FAILED
    assert metrics.delta("agentworks_llm_calls_total", provider="simulated", model="sim-1",
                         outcome="budget") == 1  # fmt: skip
    assert metrics.delta("agentworks_llm_billed_micro_usd_total", provider="simulated") == (
        run.billed_micros
    )
    run = run_into_an_open_circuit(write_side, database_url)
    assert run.status is RunStatus.FAILED
    opened = "agentworks_provider_circuit_opened_total"
    assert metrics.delta(opened, provider="openai", scope="workspace") == 1
    assert metrics.delta(opened, provider="openai", scope="provider") == 0
    assert metrics.delta("agentworks_llm_calls_total", provider="openai", model="gpt-4o-mini",
                         outcome="unavailable") == 3  # fmt: skip
    assert metrics.delta("agentworks_agent_runs_finished_total", outcome="FAILED") == 2


# -- waits hold no slot --------------------------------------------------------------------------


def test_a_run_waiting_out_a_retry_after_holds_no_slot_meanwhile(
    write_side: AgentWorks, database_url: str
) -> None:
    """A run waiting out its provider's ``retry-after`` held one of the orchestrator's slots: a
    provider's rate limit left every other run (another provider's, another tenant's) queued
    behind runs that were only sleeping."""
    limited = Reply(status=429, headers={"retry-after": "5"}, body=b"slow down")
    fine = Reply(events=openai_events(["fine"], prompt_tokens=10, completion_tokens=1))
    waiting_card, other_card = card_on_board(write_side), card_on_board(write_side)
    with (
        FakeProviderServer([limited, fine]) as server,
        orchestrator_thread(database_url, openai_at(server, then_simulated=True), concurrency=1),
    ):
        waiting = start(write_side, waiting_card, provider="openai")
        wait_for(write_side, waiting, lambda r: r.attempts == 1)
        other = wait_for(write_side, start(write_side, other_card, provider="simulated"),
                         finished)  # fmt: skip
        assert write_side.run_snapshot(waiting).status is RunStatus.RUNNING
        waited = wait_for(write_side, waiting, finished)
    assert other.status is RunStatus.SUCCEEDED, other.error
    assert waited.status is RunStatus.SUCCEEDED, waited.error
    assert len(server.requests) == 2


#: One OpenAI call answered unavailable, then one answered well: with :data:`_BARRED_BY_ONE`
#: the second call is the trial of the circuit the first opened.
_ONE_FAILURE_THEN_FINE = [
    Reply(status=503, body=b"unavailable"),
    Reply(events=openai_events(["fine"], prompt_tokens=10, completion_tokens=1)),
]
_BARRED_BY_ONE = {"max_attempts": 1, "breaker_threshold": 1}


def test_a_run_pinned_to_a_provider_its_circuit_bars_stays_queued_and_others_run(
    write_side: AgentWorks, database_url: str
) -> None:
    """While its workspace's circuit for OpenAI is open, a run pinned to OpenAI is not claimed
    (its timeout has not begun, and it holds no slot): the run behind it, on another provider,
    runs first. Once the cooldown is over the pinned run makes the trial call."""
    card = card_on_board(write_side)
    config = {"concurrency": 1, "breaker_cooldown": 4.0, **_BARRED_BY_ONE}
    with (
        FakeProviderServer(_ONE_FAILURE_THEN_FINE) as server,
        orchestrator_thread(database_url, openai_at(server, then_simulated=True), **config),
    ):
        failed = wait_for(write_side, start(write_side, card, provider="openai"), finished)
        pinned = start(write_side, card, provider="openai")
        other = wait_for(write_side, start(write_side, card, provider="simulated"), finished)
        assert write_side.run_snapshot(pinned).status is RunStatus.QUEUED
        trial = wait_for(write_side, pinned, finished)
    assert failed.status is RunStatus.FAILED
    assert other.status is RunStatus.SUCCEEDED, other.error
    assert trial.status is RunStatus.SUCCEEDED, trial.error
    assert len(server.requests) == 2


def test_an_unpinned_run_every_provider_of_which_is_barred_stays_queued_until_a_trial(
    write_side: AgentWorks, database_url: str
) -> None:
    """The same for an unpinned run while every provider it could be routed to is barred (here
    OpenAI, the only one)."""
    card = card_on_board(write_side)
    with (
        FakeProviderServer(_ONE_FAILURE_THEN_FINE) as server,
        orchestrator_thread(
            database_url, openai_at(server), breaker_cooldown=3.0, **_BARRED_BY_ONE
        ),  # fmt: skip
    ):
        failed = wait_for(write_side, start(write_side, card), finished)
        queued = start(write_side, card)
        time.sleep(1.0)
        assert write_side.run_snapshot(queued).status is RunStatus.QUEUED
        trial = wait_for(write_side, queued, finished)
    assert failed.status is RunStatus.FAILED
    assert trial.status is RunStatus.SUCCEEDED, trial.error
    assert len(server.requests) == 2
