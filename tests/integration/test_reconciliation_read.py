"""The API's reconciliation reads the log's figures through the write side's own month fold.

``reconciliation`` (GraphQL) reads the events through the API role, where row-level security
keeps other workspaces out, and folds them with :class:`domain.billing.MonthFold`: the log's
figure must be the one ``agentworks billing reconcile`` and the statements compute, with
corrections of an earlier month's charge, refunds and workspace credits.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from read_side_helpers import (
    ReadSide,
    World,
    api_connection,
    correct,
    create_card,
    llm_call,
    running_run,
)

from commands.billing import Billing, GrantCredit, fold_month
from projections.registry import all_projectors
from read_api import eventlog

MARCH = datetime(2025, 3, 10, tzinfo=UTC)
APRIL = datetime(2025, 4, 10, tzinfo=UTC)


@pytest.fixture
def side(shared_side: ReadSide) -> ReadSide:
    return shared_side


def _charge_id(side: ReadSide, world: World, call: str, cost: int, at: datetime) -> str:
    card = create_card(side, world, f"card {call}")
    run = running_run(side, world, card)
    return str(llm_call(side, world, run, call, cost=cost, at=at).extra["charge_id"])


def test_the_api_figure_is_the_month_fold_of_the_workspace(side: ReadSide) -> None:
    mine, theirs = side.new_world("alice"), side.new_world("bob")
    march_charge = _charge_id(side, mine, "m1", 10_000, MARCH)
    april_charge = _charge_id(side, mine, "a1", 20_000, APRIL)
    _charge_id(side, mine, "a2", 7_000, APRIL + timedelta(days=1))
    _charge_id(side, theirs, "b1", 50_000, APRIL)
    correct(side, mine, march_charge, "0.004", at=APRIL)  # an earlier month's charge, credited
    correct(side, mine, april_charge, "0.002", refund=True, at=APRIL)
    Billing(side.app).grant_credit(
        GrantCredit(workspace_id=mine.workspace_id, amount="0.01", reason="outage", at=APRIL),
        mine.owner,
    )
    for projector in all_projectors():
        side.project(projector)

    with api_connection(side.database_url, mine.workspace_id) as conn:
        comparison = eventlog.reconcile(
            conn, side.app.mapper, workspace_id=mine.workspace_id, month="2025-04",
            prefilter_json=True,
        )  # fmt: skip

    folded = fold_month(side.app, "2025-04").workspaces[mine.workspace_id]
    assert comparison.event_log_by_project == folded.usage
    assert comparison.event_log_credits == {c.credit_id: c.amount_micros for c in folded.credits}
    assert len(comparison.event_log_credits) == 1
    net = sum(folded.usage.values()) - sum(c.amount_micros for c in folded.credits)
    assert comparison.event_log_total == net
    # The read model agrees with the log, credit and corrections included.
    assert comparison.ledger_by_project == comparison.event_log_by_project
    assert comparison.read_model_credits == comparison.event_log_credits
    assert comparison.read_model_total == comparison.event_log_total


def test_a_month_without_billing_events_folds_to_nothing(side: ReadSide) -> None:
    world = side.new_world("carol")
    _charge_id(side, world, "c1", 10_000, MARCH)
    with api_connection(side.database_url, world.workspace_id) as conn:
        comparison = eventlog.reconcile(
            conn, side.app.mapper, workspace_id=world.workspace_id, month="2025-05",
            prefilter_json=False,
        )  # fmt: skip
    assert comparison.event_log_by_project == {}
    assert comparison.event_log_credits == {}
    assert comparison.event_log_total == 0
