"""Usage charges, their corrections, and the monthly spend that guards the spend limit."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any
from uuid import UUID, uuid4

import pytest
from aw_builders import collect, meta

from domain.errors import AgentWorksError, BudgetExceeded, InvalidTransition, ValidationFailed
from domain.meta import EventMeta
from domain.usage import MonthlySpend, UsageCharge, charge_id_for, month_of, spend_id_for

AT = datetime(2025, 3, 14, 9, 0, tzinfo=UTC)


def new_charge(
    billed: int = 1_000,
    *,
    at: datetime = AT,
    run_id: UUID | None = None,
    call_id: str = "call-1",
    markup: Decimal = Decimal(5),
) -> UsageCharge:
    """A charge for one call of a fresh workspace's run, with its events still pending."""
    workspace_id = uuid4()
    return UsageCharge.charge(
        workspace_id=workspace_id,
        project_id=uuid4(),
        card_id=uuid4(),
        run_id=run_id or uuid4(),
        call_id=call_id,
        provider="openai",
        model="gpt-x",
        input_tokens=10,
        output_tokens=20,
        provider_cost_micros=billed // 5,
        markup=markup,
        billed_micros=billed,
        price_table_version="2025-01",
        at=at,
        meta=meta(workspace_id),
    )


def make_charge(billed: int = 1_000, *, at: datetime = AT) -> UsageCharge:
    charge = new_charge(billed, at=at)
    collect(charge)
    return charge


def m(aggregate: UsageCharge | MonthlySpend) -> EventMeta:
    return meta(aggregate.workspace_id, actor="finance")


# -- ids and months -------------------------------------------------------------------------------


def test_charge_id_is_derived_from_run_and_call() -> None:
    run_id = uuid4()
    assert charge_id_for(run_id, "c1") == charge_id_for(run_id, "c1")
    assert charge_id_for(run_id, "c1") != charge_id_for(run_id, "c2")
    assert charge_id_for(run_id, "c1") != charge_id_for(uuid4(), "c1")


def test_spend_id_is_one_per_workspace_and_month() -> None:
    workspace_id = uuid4()
    assert spend_id_for(workspace_id, "2025-03") == spend_id_for(workspace_id, "2025-03")
    assert spend_id_for(workspace_id, "2025-03") != spend_id_for(workspace_id, "2025-04")
    assert spend_id_for(workspace_id, "2025-03") != spend_id_for(uuid4(), "2025-03")


@pytest.mark.parametrize(
    ("at", "month"),
    [
        (datetime(2025, 1, 1, tzinfo=UTC), "2025-01"),
        (datetime(2025, 12, 31, 23, 59, 59, tzinfo=UTC), "2025-12"),
        (datetime(999, 7, 4, tzinfo=UTC), "0999-07"),
    ],
)
def test_month_of_is_year_and_month_in_utc(at: datetime, month: str) -> None:
    assert month_of(at) == month


def test_month_of_refuses_a_naive_time() -> None:
    with pytest.raises(ValidationFailed, match="timezone-aware"):
        month_of(datetime(2025, 1, 1))


@pytest.mark.parametrize(
    ("utc", "offset_hours", "month"),
    [
        (datetime(2026, 12, 1, 1, 30, tzinfo=UTC), -2, "2026-12"),  # local: Nov 30th
        (datetime(2026, 11, 30, 23, 30, tzinfo=UTC), 5, "2026-11"),  # local: Dec 1st
        (datetime(2026, 1, 1, 0, 0, tzinfo=UTC), -1, "2026-01"),  # local: last year
    ],
)
def test_month_of_is_the_utc_month_whatever_the_offset(
    utc: datetime, offset_hours: int, month: str
) -> None:
    assert month_of(utc.astimezone(timezone(timedelta(hours=offset_hours)))) == month


# -- charges --------------------------------------------------------------------------------------


def test_charge_records_billing_facts_with_markup_as_text_and_the_call_time() -> None:
    run_id = uuid4()
    charge = new_charge(5, run_id=run_id, call_id="c7", markup=Decimal("1.5"))
    (event,) = collect(charge)
    assert charge.id == charge_id_for(run_id, "c7")
    assert (event.markup, event.billed_micros, event.month) == ("1.5", 5, "2025-03")
    assert event.timestamp == AT
    assert (charge.billed_micros, charge.credited_micros, charge.net_micros) == (5, 0, 5)


def test_credit_lowers_the_net_amount() -> None:
    charge = make_charge(1_000)
    charge.correct(300, "goodwill", refund=False, at=AT, meta=m(charge))
    (event,) = collect(charge)
    assert isinstance(event, UsageCharge.Credited)
    assert (event.amount_micros, event.reason, event.month) == (300, "goodwill", "2025-03")
    assert charge.net_micros == 700


def test_refund_lowers_the_net_amount_too() -> None:
    charge = make_charge(1_000)
    charge.correct(1_000, " outage ", refund=True, at=AT + timedelta(days=40), meta=m(charge))
    (event,) = collect(charge)
    assert isinstance(event, UsageCharge.Refunded)
    assert (event.reason, event.month) == ("outage", "2025-04")
    assert charge.net_micros == 0


def test_corrections_cannot_exceed_the_net_amount() -> None:
    charge = make_charge(1_000)
    charge.correct(600, "first", refund=False, at=AT, meta=m(charge))
    collect(charge)
    with pytest.raises(InvalidTransition, match=str(charge.id)) as caught:
        charge.correct(401, "second", refund=True, at=AT, meta=m(charge))
    assert "0.000400" in caught.value.message
    assert "0.000401" in caught.value.message
    assert charge.net_micros == 400
    assert collect(charge) == []
    charge.correct(400, "exactly the rest", refund=True, at=AT, meta=m(charge))
    assert charge.net_micros == 0


def test_a_fully_corrected_charge_refuses_any_further_correction() -> None:
    charge = make_charge(10)
    charge.correct(10, "all", refund=False, at=AT, meta=m(charge))
    with pytest.raises(InvalidTransition, match=str(charge.id)):
        charge.correct(1, "more", refund=False, at=AT, meta=m(charge))


@pytest.mark.parametrize("amount", [0, -5])
def test_non_positive_correction_is_refused(amount: int) -> None:
    charge = make_charge()
    with pytest.raises(ValidationFailed, match="must be positive"):
        charge.correct(amount, "x", refund=False, at=AT, meta=m(charge))
    assert charge.net_micros == 1_000


def test_correction_without_a_reason_is_refused() -> None:
    charge = make_charge()
    with pytest.raises(ValidationFailed, match=str(charge.id)):
        charge.correct(1, "   ", refund=False, at=AT, meta=m(charge))
    assert collect(charge) == []


def test_correction_at_a_naive_time_is_refused() -> None:
    charge = make_charge()
    with pytest.raises(ValidationFailed, match="timezone-aware"):
        charge.correct(1, "x", refund=False, at=datetime(2025, 3, 1), meta=m(charge))
    assert charge.net_micros == 1_000


def _correct(charge: UsageCharge, at: datetime, billed_month: str | None = None) -> None:
    charge.correct(1, "x", refund=True, at=at, meta=m(charge), billed_month=billed_month)


@pytest.mark.parametrize(
    ("correction", "refusal"),
    [
        (lambda c: _correct(c, AT - timedelta(microseconds=1)), "before the charge's latest"),
        (lambda c: _correct(c, AT, "2025-02"), "before its own month 2025-03"),
        (lambda c: _correct(c, datetime.now(UTC) + timedelta(minutes=1)), "in the future"),
        (lambda c: (_correct(c, AT + timedelta(days=1)), _correct(c, AT)), "latest event"),
    ],
    ids=["before the charge", "an earlier month", "future", "before the last correction"],
)
def test_a_correction_out_of_time_order_is_refused(
    correction: Callable[[UsageCharge], object], refusal: str
) -> None:
    """A refund dated before its charge (or a correction before the one before it) made the
    charge's history run backwards, and could land on a statement before the charge's."""
    charge = make_charge()
    with pytest.raises(AgentWorksError, match=refusal):
        correction(charge)
    assert charge.version <= 2


def test_a_late_charge_s_correction_lands_in_no_month_before_the_charge_s() -> None:
    charge = new_charge(at=AT)
    late = UsageCharge.charge(
        **{**_charge_fields(charge), "billed_month": "2025-04"}, meta=m(charge)
    )
    with pytest.raises(InvalidTransition, match="billed in 2025-04"):
        late.correct(1, "x", refund=False, at=AT, meta=m(late))


@pytest.mark.parametrize(
    ("at", "billed_month", "refusal"),
    [
        (lambda: AT, "2025-02", "before its own month 2025-03"),
        (lambda: datetime.now(UTC) + timedelta(minutes=1), None, "in the future"),
    ],
    ids=["billed before its month", "future"],
)
def test_a_charge_billed_before_its_month_or_dated_in_the_future_is_refused(
    at: Callable[[], datetime], billed_month: str | None, refusal: str
) -> None:
    charge = new_charge(at=AT)
    with pytest.raises(AgentWorksError, match=refusal):
        UsageCharge.charge(
            **{**_charge_fields(charge), "at": at(), "billed_month": billed_month}, meta=m(charge)
        )


def _charge_fields(charge: UsageCharge) -> dict[str, Any]:
    (event,) = [e for e in charge.pending_events if isinstance(e, UsageCharge.Charged)]
    names = ["workspace_id", "project_id", "card_id", "run_id", "call_id", "provider", "model",
             "input_tokens", "output_tokens", "provider_cost_micros", "billed_micros",
             "price_table_version"]  # fmt: skip
    return {name: getattr(event, name) for name in names} | {
        "markup": Decimal(event.markup), "at": event.timestamp,
    }  # fmt: skip


def test_a_month_s_spend_records_nothing_before_the_month_begins() -> None:
    """A charge or credit dated in a month to come opened that month's spend and added to it
    before the month began."""
    workspace_id = uuid4()
    coming = month_of(datetime.now(UTC) + timedelta(days=32))
    with pytest.raises(ValidationFailed, match=f"spend of {coming} .* before the month begins"):
        MonthlySpend.open(workspace_id=workspace_id, month=coming, meta=meta(workspace_id))


# -- monthly spend --------------------------------------------------------------------------------


def make_spend(spent: int = 0) -> MonthlySpend:
    workspace_id = uuid4()
    spend = MonthlySpend.open(workspace_id=workspace_id, month="2025-03", meta=meta(workspace_id))
    if spent:
        spend.add(uuid4(), spent, meta=m(spend))
    collect(spend)
    return spend


def test_monthly_spend_opens_empty_under_its_derived_id() -> None:
    spend = make_spend()
    assert spend.id == spend_id_for(spend.workspace_id, "2025-03")
    assert (spend.month, spend.spent_micros) == ("2025-03", 0)


def test_monthly_spend_adds_charges_exactly() -> None:
    spend = make_spend()
    for amount in (1, 250_000, 999_999):
        spend.add(uuid4(), amount, meta=m(spend))
    assert spend.spent_micros == 1_250_000


def test_check_room_without_a_limit_always_passes() -> None:
    make_spend(10**15).check_room(None, wanted_micros=10**15)


def test_check_room_passes_below_the_limit() -> None:
    spend = make_spend(999)
    spend.check_room(1_000)
    spend.check_room(1_000, wanted_micros=1)


def test_check_room_refuses_once_the_limit_is_reached() -> None:
    spend = make_spend(1_000)
    with pytest.raises(BudgetExceeded, match=str(spend.workspace_id)) as caught:
        spend.check_room(1_000)
    assert "2025-03" in caught.value.message
    assert "0.001000" in caught.value.message
    assert "more would exceed" not in caught.value.message


def test_check_room_refuses_a_wanted_amount_that_would_pass_the_limit() -> None:
    spend = make_spend(900)
    with pytest.raises(BudgetExceeded, match=r"0\.000101 more would exceed"):
        spend.check_room(1_000, wanted_micros=101)
    spend.check_room(1_000, wanted_micros=100)


def test_zero_limit_refuses_even_an_empty_month() -> None:
    with pytest.raises(BudgetExceeded):
        make_spend().check_room(0)
