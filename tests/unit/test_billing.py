"""Statements, month closing, credits, invoicing steps and reconciliation, on the in-memory store.

The Stripe side here is a fake implementing our own ``BillingPort`` (it can "crash" after any
call); the same routine runs against localstripe in tests/integration/test_billing_stripe.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from uuid import UUID, uuid4

import pytest
from aw_builders import World, meta
from eventsourcing.application import AggregateNotFoundError
from hypothesis import given
from hypothesis import strategies as st

from commands import models as m
from commands.billing import Billing, GrantCredit, Outcome, fold_month
from commands.handlers import Actor
from domain.base import decided_at
from domain.billing import (
    MICROS_PER_CENT,
    Credit,
    DiscrepancyKind,
    Invoice,
    InvoiceStatus,
    Line,
    Reconciliation,
    RemoteInvoice,
    RemoteItem,
    has_ended,
    invoice_id_for,
    invoice_key,
    next_month,
    parse_month,
    reconcile,
    require_ended,
    require_not_future,
    statement_lines,
    statement_total,
)
from domain.errors import Conflict, InvalidTransition, NotFound, ValidationFailed
from domain.usage import MonthlySpend, UsageCharge, month_of, spend_id_for

NOW = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
FEB = datetime(2026, 2, 14, 9, 0, tzinfo=UTC)

# -- rounding --------------------------------------------------------------------------------------

increments = st.integers(min_value=1, max_value=10_000).map(lambda cents: cents * MICROS_PER_CENT)
amounts = st.integers(min_value=-(10**12), max_value=10**12)


@given(
    usage=st.lists(amounts, max_size=20),
    credits=st.lists(st.integers(min_value=1, max_value=10**10), max_size=5),
    increment=increments,
)
def test_lines_round_up_by_less_than_one_increment_and_the_total_is_their_sum(
    usage: list[int], credits: list[int], increment: int
) -> None:
    lines = statement_lines(
        {uuid4(): amount for amount in usage},
        [Credit(credit_id=uuid4(), amount_micros=c, reason="sorry") for c in credits],
        month="2026-02",
        increment_micros=increment,
    )
    assert len(lines) == len(usage) + len(credits)
    for line in lines:
        assert line.billed_micros >= line.exact_micros
        assert line.billed_micros - line.exact_micros < increment
        assert line.billed_micros % increment == 0
    assert statement_total(lines) == sum(line.billed_micros for line in lines)
    assert [line.exact_micros for line in lines if line.key.startswith("credit:")] == [
        -c for c in credits
    ]


def test_a_credit_line_is_negative_and_a_usage_line_names_its_project() -> None:
    project = uuid4()
    lines = statement_lines(
        {project: 1_100_000},
        [Credit(credit_id=uuid4(), amount_micros=10_000_000, reason="outage")],
        month="2026-02",
        increment_micros=250_000,
        project_names={project: "Rocket"},
    )
    assert [(line.exact_micros, line.billed_micros) for line in lines] == [
        (1_100_000, 1_250_000),
        (-10_000_000, -10_000_000),
    ]
    assert lines[0].description == "Agent usage, 2026-02: Rocket"
    assert lines[1].description == "Credit: outage"


# -- months ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["2026-13", "2026-1", "26-01", "2026-00", "2026/01", " 2026-01"])
def test_a_malformed_month_is_refused_naming_it(text: str) -> None:
    with pytest.raises(ValidationFailed, match="YYYY-MM"):
        parse_month(text)


def test_year_zero_is_no_month_to_bill_or_reconcile() -> None:
    """``datetime`` has no year 0: the month passed the pattern and then raised ValueError
    (``agentworks reconcile --month 0000-01`` ended in a traceback)."""
    with pytest.raises(ValidationFailed, match="month 0000-01 is outside the billing months"):
        parse_month("0000-01")
    assert parse_month("0001-01") == "0001-01"
    with pytest.raises(ValidationFailed):
        require_not_future(parse_month("0000-12"), NOW)


def test_the_last_billing_month_is_the_last_whose_end_a_datetime_holds() -> None:
    """9999-12 ends at 10000-01-01, which no ``datetime`` holds: whether it has ended could not
    be asked (``has_ended`` raised ValueError)."""
    assert has_ended(parse_month("9999-11"), NOW) is False
    with pytest.raises(ValidationFailed, match="month 9999-12 is outside the billing months"):
        parse_month("9999-12")


def test_future_and_unfinished_months_are_refused() -> None:
    with pytest.raises(ValidationFailed, match="future"):
        require_not_future("2026-04", NOW)
    with pytest.raises(ValidationFailed, match="not ended"):
        require_ended("2026-03", NOW)
    assert require_ended("2026-02", NOW) == "2026-02"
    assert next_month("2026-12") == "2027-01"


# -- closing, late usage, credits ------------------------------------------------------------------


def billing(world: World) -> Billing:
    return Billing(world.app, clock=lambda: NOW)


def test_usage_of_a_closed_month_is_billed_in_the_next_one_and_says_so() -> None:
    world = World.build()
    run_id = world.run(begin=True)
    world.llm_call(run_id, cost=100_000, at=FEB)
    billing(world).close_month(world.workspace_id, "2026-02")
    late = world.llm_call(run_id, cost=20_000, at=FEB + timedelta(days=1))
    charge: UsageCharge = world.get(UUID(late.extra["charge_id"]))
    assert charge.billed_micros == 100_000
    feb, mar = fold_month(world.app, "2026-02"), fold_month(world.app, "2026-03")
    assert feb.lines(world.workspace_id, increment_micros=250_000)[0].exact_micros == 500_000
    (line,) = mar.lines(world.workspace_id, increment_micros=250_000)
    assert line.exact_micros == 100_000
    assert "late usage" in line.description
    spend: MonthlySpend = world.get(spend_id_for(world.workspace_id, "2026-03"))
    assert spend.spent_micros == 100_000


def test_closing_twice_records_one_event_and_an_unfinished_month_cannot_close() -> None:
    world = World.build()
    billing(world).close_month(world.workspace_id, "2026-02")
    billing(world).close_month(world.workspace_id, "2026-02")
    spend: MonthlySpend = world.get(spend_id_for(world.workspace_id, "2026-02"))
    assert (spend.closed, spend.version) == (True, 2)
    with pytest.raises(ValidationFailed, match="not ended"):
        billing(world).close_month(world.workspace_id, "2026-03")


def test_a_credit_is_a_negative_line_on_the_open_months_statement() -> None:
    world = World.build()
    result = billing(world).grant_credit(
        GrantCredit(workspace_id=world.workspace_id, amount="10.00", reason="outage", at=NOW),
        Actor.service("billing", world.workspace_id),
    )
    assert result.extra["month"] == month_of(NOW)
    (line,) = fold_month(world.app, "2026-03").lines(world.workspace_id, increment_micros=250_000)
    assert (line.exact_micros, line.billed_micros) == (-10_000_000, -10_000_000)
    assert line.key == f"credit:{result.extra['credit_id']}"


def test_a_credit_needs_a_positive_amount_an_owner_and_a_known_workspace() -> None:
    world = World.build()
    service = Actor.service("billing", world.workspace_id)
    with pytest.raises(ValidationFailed):
        billing(world).grant_credit(
            GrantCredit(workspace_id=world.workspace_id, amount="-1", reason="x", at=NOW), service
        )
    other = uuid4()
    with pytest.raises(NotFound):
        billing(world).grant_credit(
            GrantCredit(workspace_id=other, amount="1", reason="x", at=NOW),
            Actor.service("billing", other),
        )
    with pytest.raises(AggregateNotFoundError):
        world.get(spend_id_for(world.workspace_id, month_of(NOW)))


# -- invoicing against a fake that can crash -------------------------------------------------------


class Crash(Exception):
    """The process died right after a Stripe call succeeded, before recording it."""


@dataclass
class FakeStripe:
    """An in-memory payment provider with Stripe's shape (pending items, metadata look-ups)."""

    crash_after: str | None = None
    customers: dict[str, str] = field(default_factory=dict)
    items: dict[str, tuple[str, str, str, int, str | None]] = field(default_factory=dict)
    invoices: dict[str, tuple[str, str]] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)

    def _after(self, call: str) -> None:
        self.calls.append(call)
        if self.crash_after == call:
            self.crash_after = None
            raise Crash(call)

    def find_customer(self, workspace_id: UUID) -> str | None:
        return next((c for c, w in self.customers.items() if w == str(workspace_id)), None)

    def create_customer(self, workspace_id: UUID, name: str) -> str:
        customer = f"cus_{len(self.customers)}"
        self.customers[customer] = str(workspace_id)
        self._after("create_customer")
        return customer

    def pending_items(self, customer_id: str) -> list[RemoteItem]:
        return [
            RemoteItem(id=item, line_key=line, amount_cents=cents, invoice_key=k)
            for item, (cus, k, line, cents, invoice) in self.items.items()
            if cus == customer_id and invoice is None
        ]

    def create_item(self, customer_id: str, key: str, line: Line) -> str:
        item = f"ii_{len(self.items)}"
        cents = line.billed_micros // MICROS_PER_CENT
        self.items[item] = (customer_id, key, line.key, cents, None)
        self._after("create_item")
        return item

    def find_invoice(self, customer_id: str, key: str) -> RemoteInvoice | None:
        for invoice, (cus, k) in self.invoices.items():
            if cus == customer_id and k == key:
                return RemoteInvoice(
                    id=invoice,
                    status="draft",
                    items=[
                        RemoteItem(id=item, line_key=line, amount_cents=cents, invoice_key=k)
                        for item, (_, k, line, cents, on) in self.items.items()
                        if on == invoice
                    ],
                )
        return None

    def create_invoice(self, customer_id: str, key: str, description: str) -> str:
        invoice = f"in_{len(self.invoices)}"
        self.invoices[invoice] = (customer_id, key)
        for item, (cus, k, line, cents, on) in list(self.items.items()):
            if cus == customer_id and on is None:
                self.items[item] = (cus, k, line, cents, invoice)
        self._after("create_invoice")
        return invoice


def world_with_february_usage() -> World:
    world = World.build()
    run_id = world.run(begin=True)
    world.llm_call(run_id, cost=100_000, at=FEB)
    world.llm_call(run_id, cost=33_333, at=FEB)
    billing(world).grant_credit(
        GrantCredit(workspace_id=world.workspace_id, amount="0.10", reason="goodwill", at=FEB),
        Actor.service("billing", world.workspace_id),
    )
    return world


def test_invoicing_sends_one_item_per_line_and_records_the_invoice() -> None:
    world = world_with_february_usage()
    stripe = FakeStripe()
    result = billing(world).invoice(stripe, world.workspace_id, "2026-02")
    assert result.outcome is Outcome.ISSUED
    invoice: Invoice = world.get(invoice_id_for(world.workspace_id, "2026-02"))
    assert [line.billed_micros for line in invoice.lines] == [750_000, 0]
    assert sorted(c for (_, _, _, c, _) in stripe.items.values()) == [75]
    assert invoice.stripe_invoice_id == "in_0"
    again = billing(world).invoice(stripe, world.workspace_id, "2026-02")
    assert again.outcome is Outcome.ALREADY_ISSUED
    assert len(stripe.invoices) == 1


@pytest.mark.parametrize("step", ["create_customer", "create_item", "create_invoice"])
def test_a_crash_after_any_stripe_call_then_a_rerun_creates_nothing_twice(step: str) -> None:
    world = world_with_february_usage()
    run_id = world.run(begin=True)
    world.llm_call(run_id, cost=1_000_000, at=FEB)
    stripe = FakeStripe(crash_after=step)
    with pytest.raises(Crash):
        billing(world).invoice(stripe, world.workspace_id, "2026-02")
    result = billing(world).invoice(stripe, world.workspace_id, "2026-02")
    assert result.outcome is Outcome.ISSUED
    assert len(stripe.customers) == 1
    assert len(stripe.invoices) == 1
    line_keys = [line for (_, _, line, _, _) in stripe.items.values()]
    assert len(line_keys) == len(set(line_keys)) == 1
    invoice: Invoice = world.get(invoice_id_for(world.workspace_id, "2026-02"))
    assert invoice.stripe_invoice_id in stripe.invoices
    assert set(invoice.items.values()) == set(stripe.items)


def test_stripes_word_on_an_invoice_not_yet_recorded_as_issued_is_asked_for_again() -> None:
    """A run stopped right after Stripe made the invoice: a payment event arriving before the
    re-run records the issue must be delivered again (a 2xx would drop it for good)."""
    world = world_with_february_usage()
    stripe = FakeStripe(crash_after="create_invoice")
    with pytest.raises(Crash):
        billing(world).invoice(stripe, world.workspace_id, "2026-02")
    key = invoice_key(world.workspace_id, "2026-02")
    (stripe_id,) = stripe.invoices
    with pytest.raises(Conflict):
        billing(world).settle(key, stripe_id, InvoiceStatus.PAID, "evt_paid")
    assert billing(world).invoice(stripe, world.workspace_id, "2026-02").outcome is Outcome.ISSUED
    assert billing(world).settle(key, stripe_id, InvoiceStatus.PAID, "evt_paid") is True
    invoice: Invoice = world.get(invoice_id_for(world.workspace_id, "2026-02"))
    assert invoice.status is InvoiceStatus.PAID
    with pytest.raises(NotFound):
        billing(world).settle(key, "in_someone_elses", InvoiceStatus.PAID, "evt_other")


def test_pending_items_of_another_month_stop_the_invoice_before_stripe_sweeps_them_in() -> None:
    world = world_with_february_usage()
    stripe = FakeStripe(crash_after="create_item")
    with pytest.raises(Crash):
        billing(world).invoice(stripe, world.workspace_id, "2026-02")
    # Make the item left pending look like January's, as a crashed January run would leave it.
    item, (customer, _, line, cents, _) = next(iter(stripe.items.items()))
    stripe.items[item] = (customer, f"{world.workspace_id}:2026-01", line, cents, None)
    with pytest.raises(InvalidTransition, match="2026-01"):
        billing(world).invoice(stripe, world.workspace_id, "2026-02")
    assert stripe.invoices == {}


def test_an_invoice_keeps_its_drafted_lines_when_late_usage_arrives() -> None:
    world = world_with_february_usage()
    billing(world).invoice(FakeStripe(), world.workspace_id, "2026-02")
    run_id = world.run(begin=True)
    world.llm_call(run_id, cost=1_000_000, at=FEB)
    invoice: Invoice = world.get(invoice_id_for(world.workspace_id, "2026-02"))
    assert invoice.total_micros == 750_000
    feb = fold_month(world.app, "2026-02").lines(world.workspace_id, increment_micros=250_000)
    assert statement_total(feb) == 750_000


def test_an_invoice_is_not_issued_before_its_items() -> None:
    workspace_id = uuid4()
    line = statement_lines({uuid4(): 1_000_000}, [], month="2026-02", increment_micros=250_000)
    invoice = Invoice.draft(
        workspace_id=workspace_id,
        month="2026-02",
        lines=line,
        increment_micros=250_000,
        meta=meta(workspace_id),
    )
    with pytest.raises(InvalidTransition, match="items"):
        invoice.issue("in_1", meta=meta(workspace_id))


# -- reconciliation --------------------------------------------------------------------------------


def _reconciled(
    workspace_id: UUID,
    log: list[Line],
    items: list[RemoteItem],
    *,
    read_model: list[Line] | None = None,
    status: str = "open",
    recorded: InvoiceStatus | None = InvoiceStatus.OPEN,
) -> Reconciliation:
    """``log``'s month (2026-02), invoiced as ``in_1``, against Stripe holding ``items``."""
    return reconcile(
        workspace_id=workspace_id,
        month="2026-02",
        log_lines=log,
        read_model_lines=log if read_model is None else read_model,
        invoice_lines=log,
        issued_invoice_id="in_1",
        remote=RemoteInvoice(id="in_1", status=status, items=items),
        recorded_status=recorded,
    )


def test_reconcile_lists_each_disagreement_by_kind_and_key() -> None:
    project, workspace_id = uuid4(), uuid4()
    log = statement_lines({project: 1_100_000}, [], month="2026-02", increment_micros=250_000)
    key = log[0].key
    ours = invoice_key(workspace_id, "2026-02")
    clean = _reconciled(
        workspace_id, log, [RemoteItem(id="ii", line_key=key, amount_cents=125, invoice_key=ours)]
    )
    assert clean.ok
    assert clean.invoiced_total_micros == 1_250_000
    planted = _reconciled(
        workspace_id,
        log,
        [
            RemoteItem(id="ii", line_key=key, amount_cents=100, invoice_key=ours),
            RemoteItem(id="ij", line_key=key, amount_cents=50, invoice_key="other:2026-01"),
        ],
        read_model=statement_lines(
            {project: 1_000_000}, [], month="2026-02", increment_micros=250_000
        ),
    )
    assert [(d.kind, d.key, d.expected_micros, d.actual_micros) for d in planted.discrepancies] == [
        (DiscrepancyKind.READ_MODEL_LINE, key, 1_100_000, 1_000_000),
        (DiscrepancyKind.STRIPE_ITEM, f"other:2026-01/{key}", 0, 500_000),
        (DiscrepancyKind.STRIPE_ITEM, key, 1_250_000, 1_000_000),
    ]


@pytest.mark.parametrize(
    ("recorded", "remote", "found"),
    [
        (InvoiceStatus.OPEN, "void", [(1_250_000, 0)]),
        (InvoiceStatus.PAID, "void", [(1_250_000, 0)]),
        (InvoiceStatus.VOID, "open", [(0, 1_250_000)]),
        (InvoiceStatus.VOID, "void", []),
        (InvoiceStatus.OPEN, "paid", []),
    ],
)
def test_reconcile_finds_a_void_on_one_side_only(
    recorded: InvoiceStatus, remote: str, found: list[tuple[int, int]]
) -> None:
    """What each side will collect: a void recorded here and not in Stripe, or the reverse."""
    project, workspace_id = uuid4(), uuid4()
    log = statement_lines({project: 1_100_000}, [], month="2026-02", increment_micros=250_000)
    item = RemoteItem(
        id="ii",
        line_key=log[0].key,
        amount_cents=125,
        invoice_key=invoice_key(workspace_id, "2026-02"),
    )
    result = _reconciled(workspace_id, log, [item], status=remote, recorded=recorded)
    assert [(d.kind, d.key, d.expected_micros, d.actual_micros) for d in result.discrepancies] == [
        (DiscrepancyKind.STRIPE_INVOICE, "in_1", *amounts) for amounts in found
    ]


def test_a_correction_dated_in_a_closed_month_lands_in_the_next_statement() -> None:
    world = World.build()
    run_id = world.run(begin=True)
    charge_id = UUID(world.llm_call(run_id, cost=100_000, at=FEB).extra["charge_id"])
    billing(world).close_month(world.workspace_id, "2026-02")
    world.app.credit_charge(
        m.CreditCharge(charge_id=charge_id, amount="0.10", reason="slow answer", at=FEB),
        world.owner,
    )
    feb = fold_month(world.app, "2026-02").lines(world.workspace_id, increment_micros=250_000)
    mar = fold_month(world.app, "2026-03").lines(world.workspace_id, increment_micros=250_000)
    assert [line.exact_micros for line in feb] == [500_000]
    assert [line.exact_micros for line in mar] == [-100_000]


def test_billing_steps_are_dated_after_what_they_change_whatever_this_clock_says() -> None:
    """Stripe's word that an invoice was paid (a webhook, on an API host) was stamped by that
    host's clock: behind the invoicing host's, the invoice's history said it was paid before
    it was issued. Each billing step is dated no earlier than the latest event of what it
    changes (an instant, not an amount: nothing billed moves)."""
    world = world_with_february_usage()
    stripe = FakeStripe()
    ahead = datetime.now(UTC) + timedelta(hours=1)
    with decided_at(ahead):  # the invoicing host's clock is an hour ahead of this one
        billing(world).invoice(stripe, world.workspace_id, "2026-02")
    key = invoice_key(world.workspace_id, "2026-02")
    assert billing(world).settle(key, "in_0", InvoiceStatus.PAID, "evt_1")
    invoice_id = invoice_id_for(world.workspace_id, "2026-02")
    times = [
        world.app.mapper.to_domain_event(stored).timestamp
        for stored in world.app.recorder.select_events(invoice_id)
    ]
    assert times == sorted(times)
    assert times[-1] == ahead
