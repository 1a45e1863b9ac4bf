"""AgentRun rules: the run state machine, log sequence numbers, LLM calls and the run budget."""

from __future__ import annotations

import copy
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from uuid import uuid4

import pytest
from aw_builders import collect, meta, request_run, state_of

from domain.agent_run import MAX_LOG_LINE_LENGTH, MAX_LOG_LINES_PER_CHUNK, AgentRun, RunStatus
from domain.errors import BudgetExceeded, Conflict, InvalidTransition, ValidationFailed
from domain.meta import EventMeta

NOW = datetime(2025, 3, 14, 9, 26, 53, tzinfo=UTC)


def make_run(*, max_cost: int | None = None) -> AgentRun:
    run = request_run(agent=" coder ", model=" gpt-x ", max_cost=max_cost)
    collect(run)
    return run


def m(run: AgentRun) -> EventMeta:
    return meta(run.workspace_id, actor="orchestrator")


def call(run: AgentRun, call_id: str = "c1", *, billed: int = 50, **overrides: int) -> None:
    values = {
        "input_tokens": 100,
        "output_tokens": 200,
        "latency_ms": 30,
        "provider_cost_micros": 10,
        "billed_micros": billed,
    }
    values.update(overrides)
    run.record_llm_call(
        call_id=call_id,
        charge_id=uuid4(),
        provider="openai",
        model="gpt-x",
        meta=m(run),
        **values,
    )


def lines(n: int, stream: str = "stdout") -> list[tuple[datetime, str, str]]:
    return [(NOW, stream, f"line {i}") for i in range(n)]


def in_status(status: RunStatus) -> AgentRun:
    run = make_run()
    if status is RunStatus.QUEUED:
        return run
    if status is RunStatus.CANCELLED:
        run.cancel("stop", meta=m(run))
        collect(run)
        return run
    run.start(worker="w1", meta=m(run))
    if status is RunStatus.SUCCEEDED:
        run.succeed(meta=m(run))
    elif status is RunStatus.FAILED:
        run.fail("boom", meta=m(run))
    elif status is RunStatus.TIMED_OUT:
        run.time_out(60, meta=m(run))
    collect(run)
    assert run.status is status
    return run


# -- request ----------------------------------------------------------------------------------


def test_requested_run_is_queued_with_nothing_spent() -> None:
    run = make_run()
    assert run.status is RunStatus.QUEUED
    assert (run.agent, run.provider, run.model) == ("coder", None, "gpt-x")
    assert (run.next_seq, run.billed_micros, run.call_ids, run.error) == (1, 0, set(), None)


@pytest.mark.parametrize("agent", ["", "   ", "a" * 101])
def test_blank_or_overlong_agent_is_refused(agent: str) -> None:
    with pytest.raises(ValidationFailed, match="agent"):
        request_run(agent=agent)


@pytest.mark.parametrize("max_cost", [0, -1])
def test_non_positive_run_budget_is_refused(max_cost: int) -> None:
    with pytest.raises(ValidationFailed, match="maxCost"):
        request_run(max_cost=max_cost)


@pytest.mark.parametrize(("what", "value"), [("provider", "  "), ("model", "m" * 101)])
def test_blank_or_overlong_provider_or_model_is_refused(what: str, value: str) -> None:
    with pytest.raises(ValidationFailed, match=what):
        request_run(**{what: value})


# -- the state machine --------------------------------------------------------------------------

TRANSITIONS: dict[str, Callable[[AgentRun], object]] = {
    "start": lambda run: run.start(worker="w2", meta=m(run)),
    "start_step": lambda run: run.start_step(1, "plan", meta=m(run)),
    "append_log": lambda run: run.append_log(lines(1), meta=m(run)),
    "record_llm_call": lambda run: call(run, "fresh-call"),
    "succeed": lambda run: run.succeed(meta=m(run)),
    "fail": lambda run: run.fail("boom", meta=m(run)),
    "time_out": lambda run: run.time_out(30, meta=m(run)),
    "cancel": lambda run: run.cancel("no longer needed", meta=m(run)),
}

ALLOWED: dict[RunStatus, dict[str, RunStatus]] = {
    RunStatus.QUEUED: {"start": RunStatus.RUNNING, "cancel": RunStatus.CANCELLED},
    RunStatus.RUNNING: {
        "start_step": RunStatus.RUNNING,
        "append_log": RunStatus.RUNNING,
        "record_llm_call": RunStatus.RUNNING,
        "succeed": RunStatus.SUCCEEDED,
        "fail": RunStatus.FAILED,
        "time_out": RunStatus.TIMED_OUT,
        "cancel": RunStatus.CANCELLED,
    },
    RunStatus.SUCCEEDED: {},
    RunStatus.FAILED: {},
    # A call cancelled mid-stream happened; it is still recorded and charged.
    RunStatus.CANCELLED: {"record_llm_call": RunStatus.CANCELLED},
    RunStatus.TIMED_OUT: {},
}

ALLOWED_CASES = [(s, a, t) for s, moves in ALLOWED.items() for a, t in moves.items()]
REFUSED_CASES = [(s, a) for s in RunStatus for a in TRANSITIONS if a not in ALLOWED[s]]


@pytest.mark.parametrize(("status", "action", "target"), ALLOWED_CASES)
def test_allowed_transition_records_one_event_and_reaches_its_status(
    status: RunStatus, action: str, target: RunStatus
) -> None:
    run = in_status(status)
    version = run.version
    TRANSITIONS[action](run)
    assert run.status is target
    assert len(collect(run)) == 1
    assert run.version == version + 1


@pytest.mark.parametrize(("status", "action"), REFUSED_CASES)
def test_refused_transition_names_the_run_and_changes_nothing(
    status: RunStatus, action: str
) -> None:
    run = in_status(status)
    before = copy.deepcopy(state_of(run))
    with pytest.raises(InvalidTransition, match=str(run.id)) as caught:
        TRANSITIONS[action](run)
    assert status.value in caught.value.message
    assert collect(run) == []
    assert state_of(run) == before


def test_every_status_has_been_covered_by_the_transition_table() -> None:
    assert len(ALLOWED_CASES) + len(REFUSED_CASES) == len(RunStatus) * len(TRANSITIONS)
    assert {s for s in RunStatus if s.terminal} == {
        RunStatus.SUCCEEDED,
        RunStatus.FAILED,
        RunStatus.CANCELLED,
        RunStatus.TIMED_OUT,
    }


def test_refusing_to_cancel_a_finished_run_says_which_states_can_be_cancelled() -> None:
    run = in_status(RunStatus.SUCCEEDED)
    with pytest.raises(InvalidTransition, match=r"already SUCCEEDED; only QUEUED or RUNNING"):
        run.cancel("late", meta=m(run))


def test_failure_records_the_trimmed_error_or_a_default() -> None:
    run = in_status(RunStatus.RUNNING)
    run.fail("   ", meta=m(run))
    assert run.error == "unknown error"
    other = in_status(RunStatus.RUNNING)
    other.fail(" provider 500 " + "x" * 3000, meta=m(other))
    assert other.error is not None
    assert other.error.startswith("provider 500")
    assert len(other.error) == 2000


def test_cancel_and_time_out_record_a_reason() -> None:
    run = make_run()
    run.cancel("  ", meta=m(run))
    assert run.error == "cancelled"
    timed = in_status(RunStatus.RUNNING)
    timed.time_out(90, meta=m(timed))
    assert timed.error == "timed out after 90s"


# -- log chunks -----------------------------------------------------------------------------------


def test_log_sequence_numbers_are_contiguous_across_chunks() -> None:
    run = in_status(RunStatus.RUNNING)
    assert run.append_log(lines(3), meta=m(run)) == (1, 3)
    assert run.append_log(lines(1, "stderr"), meta=m(run)) == (4, 4)
    assert run.append_log(lines(2, "system"), meta=m(run)) == (5, 6)
    chunks = collect(run)
    assert [c.first_seq for c in chunks] == [1, 4, 5]
    assert [line["seq"] for c in chunks for line in c.lines] == [1, 2, 3, 4, 5, 6]
    assert run.next_seq == 7


def test_log_lines_carry_iso_time_stream_and_capped_text() -> None:
    run = in_status(RunStatus.RUNNING)
    run.append_log([(NOW, "stderr", "e" * (MAX_LOG_LINE_LENGTH + 10))], meta=m(run))
    (chunk,) = collect(run)
    (line,) = chunk.lines
    assert line["at"] == NOW.isoformat()
    assert line["stream"] == "stderr"
    assert len(line["text"]) == MAX_LOG_LINE_LENGTH


def test_empty_log_chunk_is_refused() -> None:
    run = in_status(RunStatus.RUNNING)
    with pytest.raises(ValidationFailed, match=str(run.id)):
        run.append_log([], meta=m(run))


def test_oversized_log_chunk_is_refused() -> None:
    run = in_status(RunStatus.RUNNING)
    with pytest.raises(ValidationFailed, match=str(MAX_LOG_LINES_PER_CHUNK + 1)):
        run.append_log(lines(MAX_LOG_LINES_PER_CHUNK + 1), meta=m(run))


def test_unknown_log_stream_is_refused_and_consumes_no_sequence_numbers() -> None:
    run = in_status(RunStatus.RUNNING)
    run.append_log(lines(2), meta=m(run))
    with pytest.raises(ValidationFailed, match="'debug'"):
        run.append_log([(NOW, "stdout", "ok"), (NOW, "debug", "bad")], meta=m(run))
    assert run.next_seq == 3
    assert run.append_log(lines(1), meta=m(run)) == (3, 3)


def test_naive_log_time_is_refused() -> None:
    run = in_status(RunStatus.RUNNING)
    with pytest.raises(ValidationFailed, match="timezone-aware"):
        run.append_log([(datetime(2025, 1, 1), "stdout", "x")], meta=m(run))
    assert run.next_seq == 1


def test_log_times_with_an_offset_are_kept_unambiguous() -> None:
    run = in_status(RunStatus.RUNNING)
    at = NOW.astimezone(timezone(timedelta(hours=2)))
    run.append_log([(at, "stdout", "x")], meta=m(run))
    (chunk,) = collect(run)
    assert datetime.fromisoformat(chunk.lines[0]["at"]) == NOW


# -- LLM calls ------------------------------------------------------------------------------------


def test_llm_calls_accumulate_tokens_and_money() -> None:
    run = in_status(RunStatus.RUNNING)
    call(run, "c1", billed=50, input_tokens=1, output_tokens=2, provider_cost_micros=10)
    call(run, "c2", billed=7, input_tokens=3, output_tokens=4, provider_cost_micros=1)
    assert (run.input_tokens, run.output_tokens) == (4, 6)
    assert (run.provider_cost_micros, run.billed_micros) == (11, 57)
    assert run.call_ids == {"c1", "c2"}
    assert (run.provider, run.model) == ("openai", "gpt-x")


def test_duplicate_llm_call_id_is_refused() -> None:
    run = in_status(RunStatus.RUNNING)
    call(run, "c1", billed=50)
    collect(run)
    with pytest.raises(InvalidTransition, match="c1") as caught:
        call(run, "c1", billed=50)
    assert str(run.id) in caught.value.message
    assert run.billed_micros == 50
    assert collect(run) == []


@pytest.mark.parametrize(
    "field",
    ["input_tokens", "output_tokens", "latency_ms", "provider_cost_micros", "billed_micros"],
)
def test_negative_llm_call_figures_are_refused(field: str) -> None:
    run = in_status(RunStatus.RUNNING)
    with pytest.raises(ValidationFailed, match="c9"):
        call(run, "c9", **{field: -1})
    assert run.call_ids == set()


# -- run budget -----------------------------------------------------------------------------------


def test_run_without_budget_never_refuses_a_call() -> None:
    run = in_status(RunStatus.RUNNING)
    call(run, "c1", billed=10**12)
    run.check_budget(10**12)
    assert run.over_budget is False


def test_call_that_would_exceed_the_run_budget_is_refused() -> None:
    run = make_run(max_cost=100)
    run.start(worker="w", meta=m(run))
    call(run, "c1", billed=60)
    run.check_budget(40)  # exactly reaching the budget is fine
    with pytest.raises(BudgetExceeded, match=str(run.id)) as caught:
        run.check_budget(41)
    assert "0.000060" in caught.value.message
    assert "0.000100" in caught.value.message
    assert run.over_budget is False


def test_run_that_spent_its_budget_is_over_budget_and_still_records_calls() -> None:
    run = make_run(max_cost=100)
    run.start(worker="w", meta=m(run))
    call(run, "c1", billed=100)
    assert run.over_budget is True
    call(run, "c2", billed=500)  # a call that happened is always recorded
    assert run.billed_micros == 600


# -- calls left open when the run ended ---------------------------------------------------------

ENDINGS: dict[str, Callable[[AgentRun], object]] = {
    "succeeded": lambda run: run.succeed(meta=m(run)),
    "failed": lambda run: run.fail("boom", meta=m(run)),
    "timed out": lambda run: run.time_out(30, meta=m(run)),
    "cancelled": lambda run: run.cancel("enough", meta=m(run)),
}


def ended_with_a_call_open(ending: str, call_id: str = "c1") -> AgentRun:
    """A run w1 ended (or a user cancelled) while w1's call ``call_id`` was under way."""
    run = make_run()
    run.start(worker="w1", meta=m(run))
    run.start_call(
        call_id=call_id, worker="w1", provider="openai", model="gpt-x", input_tokens=100,
        prompt_cost_micros=10, price_table_version="v1", meta=m(run),
    )  # fmt: skip
    ENDINGS[ending](run)
    collect(run)
    return run


def attempt_of(run: AgentRun, call_id: str, worker: str) -> int:
    return run.record_attempt(
        provider="openai", model="gpt-x", status="ok", http_status=None, error=None,
        latency_ms=5, input_tokens=100, output_tokens=3, provider_cost_micros=12,
        estimated=False, meta=m(run), worker=worker, call_id=call_id,
    )  # fmt: skip


@pytest.mark.parametrize("ending", ENDINGS)
def test_a_call_started_before_its_run_ended_is_recorded_and_charged_by_its_worker_after(
    ending: str,
) -> None:
    """The provider bills a call whatever became of its run meanwhile: its worker's record
    (or the charge of its prompt, the worker dead) is taken after any ending, not only a
    cancel; before, a run that ended FAILED or TIMED_OUT refused it and the call stayed open
    for good."""
    run = ended_with_a_call_open(ending)
    status = run.status
    assert attempt_of(run, "c1", "w1") == 1
    run.record_llm_call(
        call_id="c1", charge_id=uuid4(), provider="openai", model="gpt-x", input_tokens=100,
        output_tokens=3, latency_ms=5, provider_cost_micros=12, billed_micros=60, meta=m(run),
        worker="w1",
    )  # fmt: skip
    assert (run.status, run.open_calls, run.billed_micros) == (status, {}, 60)
    assert len(collect(run)) == 2


@pytest.mark.parametrize("ending", ENDINGS)
def test_an_ended_run_refuses_a_call_nobody_started_or_another_worker_records(
    ending: str,
) -> None:
    """(A cancelled run's worker still records any call it had under way, as before.)"""
    run = ended_with_a_call_open(ending)
    if ending != "cancelled":
        with pytest.raises(InvalidTransition, match=str(run.id)):
            attempt_of(run, "never-started", "w1")
    with pytest.raises(Conflict, match="w9"):
        attempt_of(run, "c1", "w9")
    assert collect(run) == []
    assert set(run.open_calls) == {"c1"}


@pytest.mark.parametrize("status", list(RunStatus))
def test_only_an_ended_runs_open_calls_are_charged_without_a_takeover(status: RunStatus) -> None:
    run = in_status(status)
    if status.terminal:
        run.expect_ended()
    else:
        with pytest.raises(InvalidTransition, match=f"{run.id} is {status.value}"):
            run.expect_ended()
