"""The commands the orchestrator sends: attempts and their charges, takeovers, output, refusals."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from aw_builders import World, assert_refused, stored_events
from hypothesis import given, settings
from hypothesis import strategies as st

from commands import models as m
from commands.billing import Billing, fold_month
from commands.handlers import CommandResult
from commands.runs import ORPHANED_CALL_OF_ENDED_RUN
from domain.agent_run import AgentRun, RunStatus
from domain.errors import (
    AgentWorksError,
    BudgetExceeded,
    Conflict,
    InvalidTransition,
    ValidationFailed,
)
from domain.pricing import call_cost_micros
from domain.usage import MonthlySpend, UsageCharge, charge_id_for, month_of, spend_id_for

NOW = datetime.now(UTC)


def attempt(run_id: object, *, worker: str = "w1", status: str = "ok", tin: int = 100,
            tout: int = 50, estimated: bool = False, at: datetime = NOW,
            call_id: str | None = None) -> m.RecordProviderAttempt:  # fmt: skip
    return m.RecordProviderAttempt(
        run_id=run_id, worker=worker, provider="simulated", model="sim-1", status=status,
        latency_ms=12, input_tokens=tin, output_tokens=tout, estimated=estimated,
        started_at=at, call_id=call_id,
    )  # fmt: skip


def test_an_attempt_with_tokens_is_charged_at_the_price_in_force_times_markup() -> None:
    world = World.build()
    run_id = world.run(begin=True)
    result = world.app.record_provider_attempt(attempt(run_id), world.service())
    price = world.app.prices.require("simulated", "sim-1", NOW)
    cost = call_cost_micros(price, input_tokens=100, output_tokens=50)
    charge: UsageCharge = world.get(charge_id_for(run_id, "attempt-1"))
    assert charge.billed_micros == result.extra["billed"] == cost * 5
    run: AgentRun = world.get(run_id)
    assert (run.attempts, run.input_tokens, run.output_tokens) == (1, 100, 50)
    assert (run.provider_cost_micros, run.billed_micros) == (cost, cost * 5)
    spend: MonthlySpend = world.get(spend_id_for(world.workspace_id, month_of(NOW)))
    assert spend.spent_micros == cost * 5


def test_an_attempt_of_a_closed_month_is_billed_in_the_open_month_whose_spend_it_adds_to() -> None:
    world = World.build()
    run_id = world.run(begin=True)
    feb = datetime(2026, 2, 14, 9, 0, tzinfo=UTC)
    Billing(world.app, clock=lambda: datetime(2026, 3, 10, tzinfo=UTC)).close_month(
        world.workspace_id, "2026-02"
    )
    result = world.app.record_provider_attempt(attempt(run_id, at=feb), world.service())
    events = stored_events(world.app)
    (charged,) = [e for e in events if isinstance(e, UsageCharge.Charged)]
    (added,) = [e for e in events if isinstance(e, MonthlySpend.Added)]
    spend: MonthlySpend = world.get(added.originator_id)
    assert added.charge_id == charged.originator_id == charge_id_for(run_id, "attempt-1")
    assert (spend.month, spend.spent_micros) == ("2026-03", result.extra["billed"])
    assert charged.month == spend.month
    assert fold_month(world.app, "2026-02").lines(world.workspace_id, increment_micros=1) == []


def test_a_failed_attempt_without_tokens_is_recorded_and_not_charged() -> None:
    world = World.build()
    run_id = world.run(begin=True)
    cmd = m.RecordProviderAttempt(
        run_id=run_id, worker="w1", provider="openai", model="gpt-4o-mini", status="failed",
        http_status=429, error="slow down", latency_ms=3, input_tokens=0, output_tokens=0,
        started_at=NOW,
    )  # fmt: skip
    result = world.app.record_provider_attempt(cmd, world.service())
    assert result.extra == {"attempt": 1, "billed": 0, "taken_over": False}
    run: AgentRun = world.get(run_id)
    assert (run.attempts, run.billed_micros, run.call_ids) == (1, 0, set())


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 10**6)), min_size=1, max_size=6))
def test_run_totals_equal_the_sum_of_their_charges(calls: list[tuple[int, int]]) -> None:
    world = World.build()
    run_id = world.run(begin=True)
    billed = []
    for tin, tout in calls:
        result = world.app.record_provider_attempt(attempt(run_id, tin=tin, tout=tout),
                                                   world.service())  # fmt: skip
        billed.append(result.extra["billed"])
    run: AgentRun = world.get(run_id)
    charges = [
        world.get(charge_id_for(run_id, f"attempt-{n}"))
        for n in range(1, len(calls) + 1)
        if calls[n - 1] != (0, 0)
    ]
    assert run.billed_micros == sum(billed) == sum(c.billed_micros for c in charges)
    assert run.input_tokens == sum(t for t, _ in calls)
    price = world.app.prices.require("simulated", "sim-1", NOW)
    assert run.provider_cost_micros == sum(
        call_cost_micros(price, input_tokens=i, output_tokens=o) for i, o in calls
    )
    assert all(c.billed_micros == c.net_micros for c in charges)
    assert Decimal(run.billed_micros) == Decimal(run.provider_cost_micros) * 5


def taken_over(world: World) -> object:
    """A run begun by w1 and taken over by w2."""
    run_id = world.run(begin=True)
    version = world.get(run_id).version
    world.app.reclaim_run(m.ReclaimRun(run_id=run_id, worker="w2", expected_version=version),
                          world.service())  # fmt: skip
    return run_id


def test_a_taken_over_run_refuses_its_old_workers_progress() -> None:
    world = World.build()
    run_id = taken_over(world)
    for send in (
        lambda: world.app.finish_run(
            m.FinishRun(run_id=run_id, outcome="SUCCEEDED", worker="w1"), world.service()
        ),
        lambda: world.app.append_run_log(
            m.AppendRunLog(run_id=run_id, worker="w1", lines=[m.LogLineInput(at=NOW, text="x")]),
            world.service(),
        ),
    ):
        assert_refused(world.app, Conflict, send)
    world.app.record_provider_attempt(attempt(run_id, worker="w2"), world.service())
    assert world.get(run_id).reclaims == 1


@pytest.mark.parametrize("finished", [False, True], ids=["running", "finished by w2"])
def test_the_call_its_old_worker_had_under_way_is_charged_and_it_is_told_it_lost_the_run(
    finished: bool,
) -> None:
    """The provider bills the call w1 made before the takeover: it was refused ("taken
    over") and charged nowhere. Its charge counts on the run and the month, whatever w2 has
    done with the run since."""
    world = World.build()
    run_id = taken_over(world)
    if finished:
        world.app.finish_run(m.FinishRun(run_id=run_id, outcome="SUCCEEDED", worker="w2"),
                             world.service())  # fmt: skip
    result = world.app.record_provider_attempt(
        attempt(run_id, worker="w1", status="failed", tout=0, call_id="w1-call"), world.service()
    )
    assert result.extra["taken_over"] is True
    charge: UsageCharge = world.get(charge_id_for(run_id, "w1-call"))
    run: AgentRun = world.get(run_id)
    assert charge.billed_micros == run.billed_micros == result.extra["billed"] > 0
    spend: MonthlySpend = world.get(spend_id_for(world.workspace_id, month_of(NOW)))
    assert spend.spent_micros == charge.billed_micros
    assert run.worker == "w2"


def test_a_worker_that_never_ran_the_run_records_no_call_of_it() -> None:
    world = World.build()
    run_id = taken_over(world)
    assert_refused(
        world.app, Conflict,
        lambda: world.app.record_provider_attempt(attempt(run_id, worker="w3"), world.service()),
    )  # fmt: skip


def test_a_call_is_charged_once_whoever_records_it_and_however_often() -> None:
    """Recorded again (a resend whose first answer was lost, a late record of a call the
    takeover charged), a call id is answered as the first time and nothing is written; it was
    refused, which the orchestrator took for a lost run and, after a lost answer, never sent."""
    world = World.build()
    run_id = taken_over(world)
    first = world.app.record_provider_attempt(attempt(run_id, worker="w1", call_id="c"),
                                              world.service())  # fmt: skip
    run: AgentRun = world.get(run_id)
    billed, version = run.billed_micros, run.version
    for worker, tin in (("w1", 100), ("w1", 999), ("w2", 5)):
        again = world.app.record_provider_attempt(
            attempt(run_id, worker=worker, call_id="c", tin=tin), world.service()
        )
        assert again.extra == first.extra | {
            "recorded_before": True, "taken_over": worker == "w1",
        }  # fmt: skip
    run = world.get(run_id)
    assert (run.billed_micros, run.attempts, run.version) == (billed, 1, version)
    assert_refused(
        world.app, Conflict,
        lambda: world.app.record_provider_attempt(attempt(run_id, worker="w3", call_id="c"),
                                                  world.service()),
    )  # fmt: skip


def start_call(world: World, run_id: object, *, worker: str = "w1", call_id: str = "c",
               tin: int = 1234) -> CommandResult:  # fmt: skip
    return world.app.start_provider_call(
        m.StartProviderCall(
            run_id=run_id, worker=worker, call_id=call_id, provider="simulated", model="sim-1",
            input_tokens=tin, prompt_cost_micros=777, price_table_version="v-old",
        ),
        world.service(),
    )  # fmt: skip


def reclaim(world: World, run_id: object, worker: str) -> CommandResult:
    version = world.get(run_id).version
    return world.app.reclaim_run(
        m.ReclaimRun(run_id=run_id, worker=worker, expected_version=version), world.service()
    )


def the_prompt_charge(world: World, run_id: object) -> Any:
    """The one charge stored: call ``c``'s, for its prompt as its start estimated it."""
    [charge] = [e for e in stored_events(world.app) if isinstance(e, UsageCharge.Charged)]
    assert charge.originator_id == charge_id_for(run_id, "c")
    figures = (charge.input_tokens, charge.output_tokens, charge.provider_cost_micros)
    assert figures == (1234, 0, 777)
    return charge


def test_a_call_its_worker_started_and_never_recorded_is_charged_its_prompt_at_takeover() -> None:
    """A worker that died during a call left nothing saying the call was made: the provider
    billed it, nobody charged it. Its start is recorded before the call; the takeover charges
    it for the prompt its worker estimated, at the prices it named, once."""
    world = World.build()
    run_id = world.run(begin=True)
    start_call(world, run_id)
    start_call(world, run_id)  # a resend: one start
    result = reclaim(world, run_id, "w2")
    assert result.extra["charged_calls"] == ["c"]
    charge = the_prompt_charge(world, run_id)
    assert (charge.billed_micros, charge.price_table_version) == (777 * 5, "v-old")
    run: AgentRun = world.get(run_id)
    assert (run.billed_micros, run.open_calls, run.worker) == (777 * 5, {}, "w2")
    [started] = [e for e in stored_events(world.app) if isinstance(e, AgentRun.CallStarted)]
    [orphan] = [e for e in stored_events(world.app) if isinstance(e, AgentRun.AttemptRecorded)]
    assert (orphan.call_id, orphan.estimated, orphan.status) == ("c", True, "failed")
    assert started.worker == "w1"
    # The dead worker's record, late after all: answered with the takeover's charge.
    late = world.app.record_provider_attempt(
        attempt(run_id, worker="w1", call_id="c", tin=1300, tout=400), world.service()
    )
    assert (late.extra["billed"], late.extra["taken_over"]) == (777 * 5, True)
    assert world.get(run_id).billed_micros == 777 * 5
    # A later takeover finds nothing more to charge.
    assert reclaim(world, run_id, "w3").extra["charged_calls"] == []
    assert world.get(run_id).billed_micros == 777 * 5


def test_a_call_recorded_or_recorded_uncharged_is_not_charged_again_at_takeover() -> None:
    world = World.build()
    run_id = world.run(begin=True)
    start_call(world, run_id, call_id="ok")
    world.app.record_provider_attempt(attempt(run_id, call_id="ok"), world.service())
    start_call(world, run_id, call_id="refused")
    world.app.record_provider_attempt(
        attempt(run_id, call_id="refused", status="failed", tin=0, tout=0), world.service()
    )
    billed = world.get(run_id).billed_micros
    assert reclaim(world, run_id, "w2").extra["charged_calls"] == []
    assert world.get(run_id).billed_micros == billed


def test_a_start_landing_after_its_calls_attempt_leaves_no_call_open() -> None:
    """A worker stopped while its call's start was being written records an attempt without
    tokens; the start, landing after it, records nothing, so no takeover charges the call."""
    world = World.build()
    run_id = world.run(begin=True)
    world.app.record_provider_attempt(
        attempt(run_id, call_id="c", status="failed", tin=0, tout=0), world.service()
    )
    start_call(world, run_id)
    assert world.get(run_id).open_calls == {}
    assert reclaim(world, run_id, "w2").extra["charged_calls"] == []


def test_a_worker_the_run_was_taken_from_may_not_start_a_call() -> None:
    world = World.build()
    run_id = taken_over(world)
    assert_refused(world.app, Conflict, lambda: start_call(world, run_id, worker="w1"))
    assert world.get(run_id).open_calls == {}


def test_a_takeover_judged_on_an_old_version_conflicts() -> None:
    world = World.build()
    run_id = world.run(begin=True)
    version = world.get(run_id).version
    world.app.record_run_heartbeat(m.RecordRunHeartbeat(run_id=run_id, worker="w1"),
                                   world.service())  # fmt: skip
    cmd = m.ReclaimRun(run_id=run_id, worker="w2", expected_version=version)
    world.refuses(Conflict, world.app.reclaim_run, cmd, world.service())
    assert world.get(run_id).worker == "w1"


def end(world: World, run_id: object, ending: str) -> None:
    """End w1's run: as a user cancels it, or as w1 finishes it."""
    if ending == "CANCELLED":
        world.app.cancel_agent_run(m.CancelAgentRun(run_id=run_id, reason="enough"), world.owner)
    else:
        finish = m.FinishRun(
            run_id=run_id, outcome=ending, worker="w1", error="boom", after_seconds=9
        )
        world.app.finish_run(finish, world.service())


def charge_orphans(world: World, run_id: object, version: int | None = None) -> CommandResult:
    judged = world.get(run_id).version if version is None else version
    return world.app.charge_orphaned_calls(
        m.ChargeOrphanedCalls(run_id=run_id, expected_version=judged), world.service()
    )


@pytest.mark.parametrize("ending", ["CANCELLED", "FAILED", "TIMED_OUT", "SUCCEEDED"])
def test_a_call_left_open_when_its_run_ended_is_charged_its_prompt_once(ending: str) -> None:
    """Cancelled by a user while its worker was dead mid-call (or ended by a worker that never
    recorded its call), the run was nobody's to take over, and the call the provider billed
    was charged nowhere. Charged now as a takeover charges it: its prompt, estimated, under
    its id, once; the worker's record, late, bills nothing more."""
    world = World.build()
    run_id = world.run(begin=True)
    start_call(world, run_id)
    end(world, run_id, ending)
    result = charge_orphans(world, run_id)
    assert result.extra["charged_calls"] == ["c"]
    assert the_prompt_charge(world, run_id).billed_micros == 777 * 5
    [orphan] = [e for e in stored_events(world.app) if isinstance(e, AgentRun.AttemptRecorded)]
    assert (orphan.call_id, orphan.estimated, orphan.status, orphan.error) == (
        "c", True, "failed", ORPHANED_CALL_OF_ENDED_RUN,
    )  # fmt: skip
    run: AgentRun = world.get(run_id)
    assert (run.status.value, run.open_calls, run.billed_micros) == (ending, {}, 777 * 5)
    spend: MonthlySpend = world.get(spend_id_for(world.workspace_id, month_of(NOW)))
    assert spend.spent_micros == 777 * 5
    version = run.version
    assert charge_orphans(world, run_id).extra["charged_calls"] == []
    late = world.app.record_provider_attempt(
        attempt(run_id, worker="w1", call_id="c", tin=1300, tout=400), world.service()
    )
    assert (late.extra["billed"], late.extra["recorded_before"]) == (777 * 5, True)
    run = world.get(run_id)
    assert (run.billed_micros, run.version) == (777 * 5, version)


def test_a_running_runs_open_calls_are_charged_only_by_a_takeover() -> None:
    world = World.build()
    run_id = world.run(begin=True)
    start_call(world, run_id)
    assert_refused(world.app, InvalidTransition, lambda: charge_orphans(world, run_id))
    assert set(world.get(run_id).open_calls) == {"c"}


def test_a_cancelled_runs_live_worker_records_its_call_and_the_charge_judged_before_conflicts() -> (
    None
):
    """Cancelled while its worker is alive, the call is the worker's to record, with what the
    provider counted: the cancel charges nothing, and a charge of the call judged before that
    record (the worker looked dead) conflicts rather than charge it twice."""
    world = World.build()
    run_id = world.run(begin=True)
    start_call(world, run_id)
    end(world, run_id, "CANCELLED")
    judged = world.get(run_id).version
    assert world.get(run_id).billed_micros == 0
    recorded = world.app.record_provider_attempt(
        attempt(run_id, worker="w1", call_id="c", status="failed", tin=1300, tout=40),
        world.service(),
    )
    price = world.app.prices.require("simulated", "sim-1", NOW)
    assert recorded.extra["billed"] == call_cost_micros(price, input_tokens=1300,
                                                        output_tokens=40) * 5  # fmt: skip
    assert_refused(world.app, Conflict, lambda: charge_orphans(world, run_id, judged))
    assert charge_orphans(world, run_id).extra["charged_calls"] == []
    assert world.get(run_id).billed_micros == recorded.extra["billed"]


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.sampled_from(["open", "recorded", "refused"]), min_size=1, max_size=5),
    st.sampled_from(["CANCELLED", "FAILED", "TIMED_OUT", "SUCCEEDED"]),
)
def test_every_call_of_an_ended_run_is_charged_once_whether_recorded_or_left_open(
    fates: list[str], ending: str
) -> None:
    """Whatever calls the worker recorded (with tokens or without) and left open before the run
    ended, charging the open ones (twice) leaves each call with tokens charged exactly once,
    and the run's and the month's totals the sum of the charges."""
    world = World.build()
    run_id = world.run(begin=True)
    for n, fate in enumerate(fates):
        start_call(world, run_id, call_id=f"c{n}", tin=100 + n)
        if fate != "open":
            tin, tout = (100 + n, 7) if fate == "recorded" else (0, 0)
            world.app.record_provider_attempt(
                attempt(run_id, call_id=f"c{n}", tin=tin, tout=tout), world.service()
            )
    end(world, run_id, ending)
    for _ in range(2):
        charge_orphans(world, run_id)
    charges = [e for e in stored_events(world.app) if isinstance(e, UsageCharge.Charged)]
    assert sorted(c.call_id for c in charges) == sorted(
        f"c{n}" for n, fate in enumerate(fates) if fate != "refused"
    )
    run: AgentRun = world.get(run_id)
    spend_id = spend_id_for(world.workspace_id, month_of(NOW))
    spent = world.get(spend_id).spent_micros if charges else 0  # no charge, no spend yet
    assert run.open_calls == {}
    assert run.billed_micros == spent == sum(c.billed_micros for c in charges)
    assert run.attempts == len(fates)


def test_finishing_with_output_keeps_it_on_the_run() -> None:
    world = World.build()
    run_id = world.run(begin=True)
    world.app.finish_run(m.FinishRun(run_id=run_id, outcome="SUCCEEDED", worker="w1",
                                     output="done."), world.service())  # fmt: skip
    run: AgentRun = world.get(run_id)
    assert (run.status, run.output) == (RunStatus.SUCCEEDED, "done.")


@pytest.mark.parametrize(
    ("fields", "error", "match"),
    [
        ({"agent": "poet"}, ValidationFailed, "agent 'poet'"),
        ({"agent": "coder", "provider": "acme"}, ValidationFailed, "provider 'acme'"),
        ({"agent": "coder", "provider": "openai", "model": "gpt-9"}, ValidationFailed, "gpt-9"),
        ({"agent": "coder", "policy": "random"}, ValidationFailed, "policy"),
        ({"agent": "coder", "max_cost": "0.000001"}, BudgetExceeded, "budget|prompt"),
    ],
)
def test_start_agent_run_refuses_bad_choices_up_front(
    fields: dict[str, str], error: type[AgentWorksError], match: str
) -> None:
    world = World.build()
    cmd = m.StartAgentRun(card_id=world.card_id, **fields)
    refused = world.refuses(error, world.app.start_agent_run, cmd)
    assert refused is not None


def test_archived_card_refuses_runs_before_looking_at_the_agent() -> None:
    world = World.build()
    world.app.archive_card(m.ArchiveCard(card_id=world.card_id), world.owner)
    cmd = m.StartAgentRun(card_id=world.card_id, agent="poet")
    world.refuses(InvalidTransition, world.app.start_agent_run, cmd)  # fmt: skip


def test_budget_thresholds_are_recorded_once_per_month_each() -> None:
    world = World.build()
    world.app.set_spend_limit(
        m.SetSpendLimit(workspace_id=world.workspace_id, monthly_limit="0.010000"), world.owner
    )
    run_id = world.run(begin=True)
    crossed: list[int] = []
    # sim-1 x5: 1,000 input tokens = $0.0025 billed a call; 4 calls = 100 %.
    for _ in range(5):
        world.app.record_provider_attempt(attempt(run_id, tin=1000, tout=0), world.service())
        spend: MonthlySpend = world.get(spend_id_for(world.workspace_id, month_of(NOW)))
        crossed.append(len(spend.thresholds))
    assert crossed == [0, 1, 1, 3, 3]
    events = [
        e for e in world.app.events.get(spend.id) if isinstance(e, MonthlySpend.ThresholdCrossed)
    ]
    assert [e.threshold for e in events] == [50, 80, 100]


def test_spending_under_a_zero_limit_crosses_every_threshold_once() -> None:
    """A $0 limit is a limit (no run may start), not "no limit": a call already under way when
    it was set is still charged, and that spend is past 100 % of it. The thresholds were never
    noted for a $0 limit, so the activity feed did not say the limit had been passed, while a
    $0.01 limit said so."""
    world = World.build()
    run_id = world.run(begin=True)
    world.app.set_spend_limit(
        m.SetSpendLimit(workspace_id=world.workspace_id, monthly_limit="0"), world.owner
    )
    for _ in range(2):
        world.app.record_provider_attempt(attempt(run_id, tin=1000, tout=0), world.service())
    spend: MonthlySpend = world.get(spend_id_for(world.workspace_id, month_of(NOW)))
    assert spend.spent_micros > 0
    events = [
        e for e in world.app.events.get(spend.id) if isinstance(e, MonthlySpend.ThresholdCrossed)
    ]
    assert [(e.threshold, e.limit_micros) for e in events] == [(50, 0), (80, 0), (100, 0)]
