"""A projector's fold (``apply_batch``) does exactly what its events do one by one.

Every projector's fold turns many events into a few set-based statements; the event-by-event
handlers of ``projection_reference`` are the oracle. Fed the same deliveries (random batches,
repeats, late events healed from the store), the fold and the reference must leave the same rows
and publish the same changes in the same order.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any
from uuid import UUID, uuid4

from hypothesis import example, given
from hypothesis import strategies as st
from hypothesis_profiles import expensive_property
from projection_reference import reference_of
from read_side_helpers import ReadSide
from test_read_model_properties import (
    Script,
    deliver,
    run_operation,
    script_property,
    table_rows,
)

from domain.envelope import EventEnvelope
from projections.rebuild import SCRATCH_SUFFIX, prepare_scratch, scratch_tables, scratch_tracking
from projections.registry import all_projectors
from projections.runner import ProjectionRunner

if TYPE_CHECKING:
    from projections.base import Change


@script_property(dev=10, ci=15)
def test_batches_leave_the_rows_and_changes_single_events_do(
    side: ReadSide, ops: list[tuple[Any, ...]], seed: int
) -> None:
    script = Script(world=side.new_world(owner=f"batcher-{seed}"))
    for op in ops:
        run_operation(side, script, op)
    assert_fold_equals_reference(side, side.envelopes(), seed, late=True)


def assert_fold_equals_reference(
    side: ReadSide, envelopes: list[EventEnvelope], seed: int, *, late: bool
) -> None:
    """Every projector and its reference, fed ``envelopes`` alike, leave the same rows and
    publish the same changes."""
    for projector in all_projectors():
        outcomes: dict[bool, tuple[dict[str, list[tuple[Any, ...]]], list[Change]]] = {}
        for batched in (False, True):
            prepare_scratch(projector, side.pool)
            changes: list[Change] = []
            runner = ProjectionRunner(
                projector if batched else reference_of(projector),
                side.pool,
                side.log,
                tracking_name=scratch_tracking(projector),
                tables=scratch_tables(projector),
                on_commit=changes.extend,
            )
            deliver(runner, envelopes, random.Random(seed), late=late)
            tables = {t: table_rows(side, t + SCRATCH_SUFFIX) for t in projector.tables}
            outcomes[batched] = (tables, changes)
        one_by_one, at_once = outcomes[False], outcomes[True]
        for table in projector.tables:
            assert at_once[0][table] == one_by_one[0][table], f"{projector.name}: {table}"
        assert at_once[1] == one_by_one[1], f"{projector.name}: changes"


# -- events the command sequences above do not produce: invoices, credits, attempts, outputs,
# API keys and invitations

EPOCH = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)

invoice_steps = st.lists(
    st.sampled_from(["Issued", "Issued-again", "Paid", "Voided"]), min_size=0, max_size=3
)
# What a run does after its request; its output or its end comes once, last.
run_steps = st.tuples(
    st.lists(st.sampled_from(["Started", "AttemptRecorded", "Heartbeat"]), max_size=5),
    st.lists(st.sampled_from(["OutputRecorded", "Succeeded", "Failed"]), max_size=1),
).map(lambda steps: steps[0] + steps[1])
invitation_ends: dict[str, dict[str, Any]] = {"Accepted": {"user_id": "joiner"}, "Revoked": {}}
invitation_end = st.sampled_from(sorted(invitation_ends))
aggregates = st.lists(
    st.one_of(
        st.tuples(st.just("Invoice"), invoice_steps),
        st.tuples(st.just("MonthlySpend"), st.integers(1, 3)),
        st.tuples(st.just("AgentRun"), run_steps),
        st.tuples(st.just("ApiKey"), st.lists(st.just("Revoked"), max_size=1)),
        st.tuples(st.just("Invitation"), st.lists(invitation_end, max_size=1)),
    ),
    min_size=1,
    max_size=8,
)


Stream = list[tuple[str, str, dict[str, Any]]]
"""An aggregate's events as (aggregate, type, payload), in version order."""


def _created_then(
    aggregate: str, workspace_id: UUID, created: dict[str, Any], then: list[tuple[str, Any]]
) -> Stream:
    """An aggregate of ``workspace_id`` created with ``created``, then its ``then`` events."""
    return [
        (aggregate, f"{aggregate}.Created", {"workspace_id": str(workspace_id), **created}),
        *((aggregate, f"{aggregate}.{kind}", payload) for kind, payload in then),
    ]


def _event_streams(workspace_id: UUID, plan: list[tuple[str, Any]]) -> list[Stream]:
    streams: list[Stream] = []
    for i, (aggregate, steps) in enumerate(plan):
        month = f"2026-{i % 12 + 1:02d}"
        if aggregate == "Invoice":
            stream: Stream = [
                (
                    "Invoice",
                    "Invoice.Drafted",
                    {
                        "workspace_id": str(workspace_id),
                        "month": month,
                        "lines": [{"key": "usage", "amount_micros": 1_000 * (i + 1)}],
                        "total_micros": 1_000 * (i + 1),
                        # Invoices drafted before the increment was recorded lack it.
                        **({"billing_increment_micros": 250_000} if i % 2 else {}),
                    },
                )
            ]
            for n, step in enumerate(steps):
                if step.startswith("Issued"):
                    stream.append(
                        (
                            "Invoice",
                            "Invoice.Issued",
                            {"stripe_invoice_id": f"in_{i}_{n}", "total_cents": i},
                        )
                    )
                else:
                    stream.append(("Invoice", f"Invoice.{step}", {"stripe_event_id": f"evt_{n}"}))
        elif aggregate == "ApiKey":
            key = {"name": f"key {i}", "role": "MEMBER", "created_by": "tester"}
            stream = _created_then(
                "ApiKey", workspace_id, {**key, "secret_hash": f"{i:064x}"},
                [(step, {}) for step in steps],
            )  # fmt: skip
        elif aggregate == "Invitation":
            invitation = {
                "email": f"invitee{i}@example.test",
                "role": "VIEWER",
                "token_hash": f"{i:064x}",
                "expires_at": (EPOCH + timedelta(days=7)).isoformat(),
                "invited_by": "tester",
            }
            stream = _created_then(
                "Invitation", workspace_id, invitation,
                [(step, invitation_ends[step]) for step in steps],
            )  # fmt: skip
        elif aggregate == "MonthlySpend":
            stream = [
                (
                    "MonthlySpend",
                    "MonthlySpend.CreditGranted",
                    {
                        "credit_id": str(uuid4()),
                        "amount_micros": 500 * (n + 1),
                        "reason": f"goodwill {n}",
                        "month": month,
                    },
                )
                for n in range(steps)
            ]
        else:
            stream = [
                (
                    "AgentRun",
                    "AgentRun.Requested",
                    {
                        "workspace_id": str(workspace_id),
                        "project_id": str(uuid4()),
                        "card_id": str(uuid4()),
                        "agent": "coder",
                        "provider": "simulated",
                        "model": "sim-1",
                        "max_cost_micros": None,
                        "policy": "default",
                    },
                )
            ]
            attempts = 0
            for step in steps:
                if step == "AttemptRecorded":
                    attempts += 1
                    payload: dict[str, Any] = {
                        "attempt": attempts,
                        "provider": "simulated",
                        "model": "sim-1",
                        "status": "ok" if attempts % 2 else "failed",
                        "http_status": None if attempts % 2 else 503,
                        "error": None if attempts % 2 else "down",
                        "latency_ms": 7,
                        "input_tokens": 10 * attempts,
                        "output_tokens": 3,
                        "provider_cost_micros": 40 * attempts,
                        "estimated": attempts > 2,
                    }
                elif step == "OutputRecorded":
                    payload = {"output": f"output of run {i}"}
                elif step == "Failed":
                    payload = {"error": "gave up"}
                elif step == "Succeeded":
                    payload = {}
                else:
                    payload = {"worker": "worker-1"}
                stream.append(("AgentRun", f"AgentRun.{step}", payload))
        streams.append(stream)
    return streams


def _interleave(
    workspace_id: UUID, streams: list[Stream], rnd: random.Random
) -> list[EventEnvelope]:
    """The streams' events merged in a random order that keeps each aggregate's own."""
    ids = [uuid4() for _ in streams]
    cursors = [0] * len(streams)
    envelopes: list[EventEnvelope] = []
    while any(c < len(s) for c, s in zip(cursors, streams, strict=True)):
        k = rnd.choice([k for k, s in enumerate(streams) if cursors[k] < len(s)])
        aggregate, kind, payload = streams[k][cursors[k]]
        cursors[k] += 1
        position = len(envelopes) + 1
        envelopes.append(
            EventEnvelope(
                position=position,
                originator_id=ids[k],
                originator_version=cursors[k],
                aggregate=aggregate,
                type=kind,
                event_version=1,
                timestamp=EPOCH + timedelta(minutes=position),
                workspace_id=workspace_id,
                metadata={"actor": "tester"},
                payload=payload,
            )
        )
    return envelopes


@expensive_property(dev=10, ci=15)
@given(plan=aggregates, seed=st.integers(0, 2**32))
# Seed 2 delivers the draft alone, then its issue and payment together: the payment must keep
# the Stripe id the issue set in the same batch.
@example(plan=[("Invoice", ["Issued", "Paid"])], seed=2)
def test_folds_equal_the_reference_on_invoices_credits_attempts_outputs_keys_invitations(
    side: ReadSide, plan: list[tuple[str, Any]], seed: int
) -> None:
    workspace_id = uuid4()
    envelopes = _interleave(workspace_id, _event_streams(workspace_id, plan), random.Random(seed))
    assert_fold_equals_reference(side, envelopes, seed, late=False)
