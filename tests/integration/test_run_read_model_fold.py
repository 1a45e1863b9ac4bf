"""The runs read model is the write side's fold, whatever the delivery: after random run
lifecycles (takeovers by another worker, stale workers refused, cancels racing calls and
finishes, retried attempts) fed to the projector in random batches with redeliveries and late
events, every ``rm_runs`` row says what its ``AgentRun`` aggregate says, its log lines are
exactly the sequence numbers the aggregate gave out, and its attempts and output are the
aggregate's."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis_profiles import expensive_property
from read_side_helpers import ReadSide, World, append_log, create_card, llm_call, request_run
from test_read_model_properties import RULE_REFUSALS, deliver

from commands import models as m
from domain.agent_run import AgentRun
from projections.runs import RunsProjector

WORKERS = ("w1", "w2", "w3")

index = st.integers(min_value=0, max_value=20)
run_ops = st.one_of(
    st.tuples(st.just("request")),
    st.tuples(st.just("begin"), index, st.sampled_from(WORKERS)),
    st.tuples(st.just("reclaim"), index, st.sampled_from(WORKERS)),
    st.tuples(st.just("heartbeat"), index, st.booleans()),
    st.tuples(
        st.just("attempt"),
        index,
        st.sampled_from(["ok", "failed"]),
        st.integers(min_value=0, max_value=5_000),
        st.booleans(),
    ),
    st.tuples(st.just("llm"), index, st.integers(min_value=0, max_value=2_000_000)),
    st.tuples(st.just("log"), index, st.integers(min_value=1, max_value=5)),
    st.tuples(
        st.just("finish"),
        index,
        st.sampled_from(["SUCCEEDED", "FAILED", "TIMED_OUT"]),
        st.booleans(),
    ),
    st.tuples(st.just("cancel"), index),
)


@pytest.fixture
def side(shared_side: ReadSide) -> ReadSide:
    return shared_side


def _run(side: ReadSide, world: World, runs: list[UUID], i: int, status: str) -> AgentRun:
    """Run ``i`` among those in ``status`` (QUEUED or RUNNING); a new one when there is none."""
    fitting = [
        run
        for run in (side.app.aggregate(AgentRun, run_id) for run_id in runs)
        if run.status.value == status
    ]
    if fitting:
        return fitting[i % len(fitting)]
    run_id = request_run(side, world, create_card(side, world, title=f"card {len(runs)}"))
    runs.append(run_id)
    if status == "RUNNING":
        side.app.begin_run(m.BeginRun(run_id=run_id, worker="w1"), world.orchestrator)
    return side.app.aggregate(AgentRun, run_id)


def _apply(
    side: ReadSide, world: World, runs: list[UUID], calls: list[int], op: tuple[Any, ...]
) -> None:
    app, bot = side.app, world.orchestrator
    kind, *args = op
    if kind == "request":
        runs.append(request_run(side, world, create_card(side, world, title=f"card {len(runs)}")))
        return
    wanted = "QUEUED" if kind == "begin" or (kind == "cancel" and args[0] % 2) else "RUNNING"
    run = _run(side, world, runs, args[0], wanted)
    # A stale worker is one that no longer holds the run: its writes must be refused.
    current = run.worker or "w1"
    try:
        if kind == "begin":
            app.begin_run(m.BeginRun(run_id=run.id, worker=args[1]), bot)
        elif kind == "reclaim":
            app.reclaim_run(
                m.ReclaimRun(run_id=run.id, worker=args[1], expected_version=run.version), bot
            )
        elif kind == "heartbeat":
            worker = current if args[1] else "ghost"
            app.record_run_heartbeat(m.RecordRunHeartbeat(run_id=run.id, worker=worker), bot)
        elif kind == "attempt":
            status, tokens, stale = args[1:]
            app.record_provider_attempt(
                m.RecordProviderAttempt(
                    run_id=run.id, worker="ghost" if stale else current, provider="simulated",
                    model="sim-1", status=status, latency_ms=5, input_tokens=tokens,
                    output_tokens=tokens // 4, started_at=datetime.now(UTC),
                ),
                bot,
            )  # fmt: skip
        elif kind == "llm":
            calls[0] += 1
            llm_call(side, world, run.id, f"call-{calls[0]}", cost=args[1])
        elif kind == "log":
            append_log(side, world, run.id, [f"line {k}" for k in range(args[1])])
        elif kind == "finish":
            outcome, with_output = args[1:]
            app.finish_run(
                m.FinishRun(
                    run_id=run.id, outcome=outcome, error="boom", after_seconds=30,
                    worker=current, output="the answer" if with_output else None,
                ),
                bot,
            )  # fmt: skip
        elif kind == "cancel":
            app.cancel_agent_run(
                m.CancelAgentRun(run_id=run.id, reason="changed my mind"), world.owner
            )
    except RULE_REFUSALS:
        pass


def assert_runs_equal_their_aggregates(side: ReadSide, runs: list[UUID]) -> None:
    for run_id in runs:
        run = side.app.aggregate(AgentRun, run_id)
        row = side.row(
            "SELECT project_id, card_id, agent, status, provider, model, max_cost_micros,"
            " input_tokens, output_tokens, provider_cost_micros, billed_micros, llm_calls,"
            " error, log_line_count, version, started_at IS NOT NULL AS started,"
            " finished_at IS NOT NULL AS finished FROM rm_runs WHERE run_id = %s",
            (run_id,),
        )
        assert row == {
            "project_id": run.project_id,
            "card_id": run.card_id,
            "agent": run.agent,
            "status": run.status.value,
            "provider": run.provider,
            "model": run.model,
            "max_cost_micros": run.max_cost_micros,
            "input_tokens": run.input_tokens,
            "output_tokens": run.output_tokens,
            "provider_cost_micros": run.provider_cost_micros,
            "billed_micros": run.billed_micros,
            "llm_calls": len(run.call_ids),
            "error": run.error,
            "log_line_count": run.next_seq - 1,
            "version": run.version,
            "started": row["started"],
            "finished": run.status.terminal,
        }, f"run {run_id}"
        seqs = [
            r["seq"]
            for r in side.rows(
                "SELECT seq FROM rm_log_lines WHERE run_id = %s ORDER BY seq", (run_id,)
            )
        ]
        assert seqs == list(range(1, run.next_seq))
        attempts = side.rows(
            "SELECT attempt FROM rm_run_attempts WHERE run_id = %s ORDER BY attempt", (run_id,)
        )
        assert [a["attempt"] for a in attempts] == list(range(1, run.attempts + 1))
        outputs = side.rows("SELECT output FROM rm_run_outputs WHERE run_id = %s", (run_id,))
        assert outputs == ([] if run.output is None else [{"output": run.output}])


@expensive_property(dev=15, ci=30)
@given(ops=st.lists(run_ops, min_size=8, max_size=40), seed=st.integers(0, 2**32))
def test_the_runs_read_model_is_the_aggregates_fold_whatever_the_delivery(
    side: ReadSide, ops: list[tuple[Any, ...]], seed: int
) -> None:
    rnd = random.Random(seed)
    world = side.new_world(owner=f"runner-{seed}")
    runs: list[UUID] = []
    calls = [0]
    for op in ops:
        _apply(side, world, runs, calls, op)
    runner = side.runner(RunsProjector())
    deliver(runner, side.envelopes(after=runner.position()), rnd, late=True)
    assert_runs_equal_their_aggregates(side, runs)
