"""Invoicing, credits and reconciliation end to end: real PostgreSQL, localstripe, the CLI.

localstripe (see tests/stripe_fixtures.py) ignores ``Idempotency-Key``, so every "nothing twice"
here holds by our own look-ups and recorded events alone.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any
from uuid import UUID, uuid4

import psycopg
import pytest
from fanout_helpers import rebuild_differences
from read_side_helpers import ReadSide, World, llm_call, running_run
from stripe_fixtures import STRIPE_TEST_KEY, provision_customer, stripe_client, subscribe
from test_cli import agentworks, assert_one_line_error
from undecodable import plant_renamed

from adapters.stripe import StripeBilling
from commands import models as m
from commands.billing import Billing, GrantCredit, Outcome, fold_month
from commands.handlers import Actor
from domain.billing import (
    Discrepancy,
    DiscrepancyKind,
    Invoice,
    InvoiceStatus,
    Line,
    RemoteInvoice,
    invoice_id_for,
    invoice_key,
    next_month,
)
from domain.meta import EventMeta
from domain.usage import MonthlySpend, month_of, spend_id_for
from domain.workspace import Workspace
from projections.queries import statement, statement_as_lines
from projections.registry import all_projectors

if TYPE_CHECKING:
    from pathlib import Path

    from projections.queries import Statement

pytestmark = pytest.mark.slow

NOW = datetime.now(UTC)
MONTH = month_of(NOW.replace(day=1) - timedelta(days=1))
IN_MONTH = datetime.fromisoformat(f"{MONTH}-15T12:00:00+00:00")


def env(database_url: str, base: str) -> dict[str, str]:
    return {
        "AGENTWORKS_DATABASE_URL": database_url,
        "AGENTWORKS_STRIPE_API_KEY": STRIPE_TEST_KEY,
        "AGENTWORKS_STRIPE_API_BASE": base,
        "AGENTWORKS_LOG_LEVEL": "WARNING",
    }


def world_with_usage(side: ReadSide) -> World:
    """A new world with last month's usage of its project: $5.80 exact, billed $6.00."""
    world = side.new_world()
    run_id = running_run(side, world)
    llm_call(side, world, run_id, "a", cost=100_000, at=IN_MONTH)
    llm_call(side, world, run_id, "b", cost=50_000, at=IN_MONTH)
    llm_call(side, world, run_id, "c", cost=1_010_000, at=IN_MONTH)
    return world


def invoices_of(base: str) -> list[Any]:
    return list(stripe_client(base).v1.invoices.list({"limit": 100}).auto_paging_iter())


def ours(base: str) -> list[Any]:
    """Invoices holding our items (not the subscriptions' own $0 ones)."""
    return [
        invoice
        for invoice in invoices_of(base)
        if any(line.metadata.to_dict().get("invoice_key") for line in lines_of(base, invoice.id))
    ]


def lines_of(base: str, invoice_id: str) -> list[Any]:
    client = stripe_client(base)
    return list(client.v1.invoices.line_items.list(invoice_id, {"limit": 100}).auto_paging_iter())


def project_all(side: ReadSide) -> None:
    for projector in all_projectors():
        side.project(projector)


def test_invoice_command_issues_one_invoice_and_a_rerun_creates_nothing(
    side: ReadSide, localstripe: str, tmp_path: Path
) -> None:
    world = world_with_usage(side)
    provision_customer(localstripe, world.workspace_id)
    first = agentworks(
        "invoice", "--month", MONTH, cwd=tmp_path, env=env(side.database_url, localstripe)
    )
    assert first.returncode == 0, first.stdout + first.stderr
    assert "1 issued, 0 already issued, 0 nothing to bill, 0 failed" in first.stdout
    (invoice,) = ours(localstripe)
    (line,) = [line for line in lines_of(localstripe, invoice.id) if line.amount]
    # 1,160,000 micros of provider cost x 5 = $5.80 exact, rounded up to $6.00.
    assert line.amount == 600
    assert line.metadata["line_key"] == f"usage:{world.project_id}"
    again = agentworks(
        "invoice", "--month", MONTH, cwd=tmp_path, env=env(side.database_url, localstripe)
    )
    assert again.returncode == 0, again.stderr
    assert "0 issued, 1 already issued, 0 nothing to bill, 0 failed" in again.stdout
    assert len(ours(localstripe)) == 1
    customers = list(stripe_client(localstripe).v1.customers.list().auto_paging_iter())
    assert len(customers) == 1

    project_all(side)
    with side.pool.connection() as conn:
        shown = statement(conn, world.workspace_id, MONTH)
    assert (shown.invoice_id, shown.invoice_status) == (invoice.id, "open")
    assert shown.total_micros == 6_000_000


def test_an_invoice_run_while_another_is_running_refuses_and_touches_nothing(
    side: ReadSide, localstripe: str, tmp_path: Path
) -> None:
    """Two runs at once would each create an item for a line before either recorded it, and
    the invoice would sweep both in: while one runs, another stops before Stripe."""
    from infra.billing_cli import INVOICE_LOCK_KEY

    world = world_with_usage(side)
    provision_customer(localstripe, world.workspace_id)
    with psycopg.connect(side.database_url, autocommit=True) as running:
        running.execute("SELECT pg_advisory_lock(%s)", (INVOICE_LOCK_KEY,))
        refused = agentworks(
            "invoice", "--month", MONTH, cwd=tmp_path, env=env(side.database_url, localstripe)
        )
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert "another 'agentworks invoice' is running" in refused.stderr
        assert ours(localstripe) == []
        assert list(stripe_client(localstripe).v1.invoice_items.list().auto_paging_iter()) == []
    after = agentworks(
        "invoice", "--month", MONTH, cwd=tmp_path, env=env(side.database_url, localstripe)
    )
    assert after.returncode == 0, after.stdout + after.stderr
    assert "1 issued, 0 already issued, 0 nothing to bill, 0 failed" in after.stdout
    assert len(ours(localstripe)) == 1


class CrashAfter(StripeBilling):
    """Dies (as a killed process would) right after one Stripe call succeeded."""

    def __init__(self, step: str, *, api_base: str) -> None:
        super().__init__(api_key=STRIPE_TEST_KEY, api_base=api_base)
        self.step = step
        self.base = api_base

    def create_customer(self, workspace_id: UUID, name: str) -> str:
        found = super().create_customer(workspace_id, name)
        subscribe(self.base, found)  # for localstripe's sake, see provision_customer
        self._maybe_crash("create_customer")
        return found

    def create_item(self, customer_id: str, key: str, line: Line) -> str:
        found = super().create_item(customer_id, key, line)
        self._maybe_crash("create_item")
        return found

    def create_invoice(self, customer_id: str, key: str, description: str) -> str:
        found = super().create_invoice(customer_id, key, description)
        self._maybe_crash("create_invoice")
        return found

    def _maybe_crash(self, step: str) -> None:
        if step == self.step:
            raise KeyboardInterrupt(f"crashed after {step}")


@pytest.mark.parametrize("step", ["create_customer", "create_item", "create_invoice"])
def test_a_crash_between_stripe_calls_then_a_rerun_duplicates_nothing(
    side: ReadSide, localstripe: str, step: str
) -> None:
    world = world_with_usage(side)
    second = side.new_world(owner="bob")
    run_id = running_run(side, second)
    llm_call(side, second, run_id, "x", cost=12_345, at=IN_MONTH)
    billing = Billing(side.app)
    provision_customer(localstripe, second.workspace_id)
    crashing = CrashAfter(step, api_base=localstripe)
    try:
        with pytest.raises(KeyboardInterrupt):
            billing.invoice(crashing, world.workspace_id, MONTH)
    finally:
        crashing.close()
    stripe = StripeBilling(api_key=STRIPE_TEST_KEY, api_base=localstripe)
    try:
        assert billing.invoice(stripe, world.workspace_id, MONTH).outcome is Outcome.ISSUED
        assert billing.invoice(stripe, second.workspace_id, MONTH).outcome is Outcome.ISSUED
    finally:
        stripe.close()
    invoices = ours(localstripe)
    assert len(invoices) == 2
    keys = [
        line.metadata["line_key"]
        for invoice in invoices
        for line in lines_of(localstripe, invoice.id)
        if line.amount
    ]
    assert sorted(keys) == sorted({f"usage:{world.project_id}", f"usage:{second.project_id}"})
    customers = list(stripe_client(localstripe).v1.customers.list().auto_paging_iter())
    assert len(customers) == 2
    recorded: Invoice = side.app.repository.get(invoice_id_for(world.workspace_id, MONTH))
    assert recorded.stripe_invoice_id in {invoice.id for invoice in invoices}


def test_stripe_unreachable_fails_the_workspace_with_exit_1_and_records_no_stripe_step(
    side: ReadSide, tmp_path: Path
) -> None:
    world = world_with_usage(side)
    closed_port = "http://127.0.0.1:9"
    result = agentworks(
        "invoice", "--month", MONTH, cwd=tmp_path, env=env(side.database_url, closed_port)
    )
    assert result.returncode == 1
    (failure,) = [line for line in result.stderr.splitlines() if line.startswith("workspace ")]
    assert failure.startswith(f"workspace {world.workspace_id} failed: Stripe customer look-up")
    recorded: Invoice = side.app.repository.get(invoice_id_for(world.workspace_id, MONTH))
    assert (recorded.items, recorded.stripe_invoice_id) == ({}, None)
    with psycopg.connect(side.database_url) as conn:
        topics = [
            row[0]
            for row in conn.execute(
                "SELECT topic FROM agentworks_events WHERE topic LIKE %s", ("%Invoice.%",)
            )
        ]
    assert [topic.rsplit(".", 1)[1] for topic in topics] == ["Drafted"]


def test_bad_input_exits_2_with_one_line(side: ReadSide, localstripe: str, tmp_path: Path) -> None:
    environment = env(side.database_url, localstripe)
    for args, message in [
        (("invoice", "--month", "2026-1"), "YYYY-MM"),
        (("invoice", "--month", next_month(month_of(NOW))), "future"),
        (("invoice", "--month", month_of(NOW)), "not ended"),
        (("reconcile", "--month", "13-2026"), "YYYY-MM"),
        (
            ("invoice", "--month", MONTH, "--workspace", "00000000-0000-0000-0000-000000000001"),
            "does not exist",
        ),
        (
            (
                "credit",
                "--workspace",
                "00000000-0000-0000-0000-000000000001",
                "--amount",
                "1",
                "--reason",
                "x",
            ),
            "does not exist",
        ),
        (("credit", "--workspace", "nope", "--amount", "1", "--reason", "x"), "UUID"),
    ]:
        line = assert_one_line_error(agentworks(*args, cwd=tmp_path, env=environment))
        assert message in line, (args, line)


def test_a_credit_option_refused_exits_2_with_one_line_naming_it(
    side: ReadSide, tmp_path: Path
) -> None:
    """An empty or over-long --reason, a --command-id that is no UUID (named '--command_id',
    an option there is none of, before)."""
    world = side.new_world()
    environment = {"AGENTWORKS_DATABASE_URL": side.database_url, "AGENTWORKS_LOG_LEVEL": "WARNING"}
    for option, value in (("--reason", ""), ("--reason", "x" * 1001), ("--command-id", "zz")):
        given = {"--reason": "goodwill", option: value}
        args = ("credit", "--workspace", str(world.workspace_id), "--amount", "1")
        line = assert_one_line_error(
            agentworks(*args, *itertools.chain(*given.items()), cwd=tmp_path, env=environment)
        )
        assert f"{option}:" in line, line


def test_a_credit_sent_again_with_its_command_id_is_granted_once(
    side: ReadSide, tmp_path: Path
) -> None:
    """A re-run after a failure whose outcome is unknown (the answer lost, say) credits nothing
    twice; a new id is a new credit."""
    world = world_with_usage(side)
    environment = {"AGENTWORKS_DATABASE_URL": side.database_url, "AGENTWORKS_LOG_LEVEL": "WARNING"}

    def credit(command_id: str) -> str:
        result = agentworks(
            "credit", "--workspace", str(world.workspace_id), "--amount", "2.50", "--reason",
            "outage", "--command-id", command_id, cwd=tmp_path, env=environment,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        return result.stdout

    first_id, second_id = str(uuid4()), str(uuid4())
    first = credit(first_id)
    assert credit(first_id) == first
    assert credit(second_id) != first
    project_all(side)
    with side.pool.connection() as conn:
        current = statement(conn, world.workspace_id, month_of(NOW))
    assert current.total_micros == -5_000_000


def test_credit_shows_as_a_negative_line_and_reconcile_finds_planted_discrepancies(
    side: ReadSide, localstripe: str, tmp_path: Path
) -> None:
    world = world_with_usage(side)
    provision_customer(localstripe, world.workspace_id)
    environment = env(side.database_url, localstripe)
    credit = agentworks(
        "credit", "--workspace", str(world.workspace_id), "--amount", "10.00", "--reason", "outage",
        cwd=tmp_path, env=environment,
    )  # fmt: skip
    assert credit.returncode == 0, credit.stderr
    project_all(side)
    with side.pool.connection() as conn:
        current = statement(conn, world.workspace_id, month_of(NOW))
    (line,) = current.lines
    assert (line.kind, line.billed_exact_micros, line.billed_micros) == (
        "credit",
        -10_000_000,
        -10_000_000,
    )
    assert current.total_micros == -10_000_000

    assert agentworks("invoice", "--month", MONTH, cwd=tmp_path, env=environment).returncode == 0
    project_all(side)
    clean = agentworks("reconcile", "--month", MONTH, "--json", cwd=tmp_path, env=environment)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    report = json.loads(clean.stdout)
    assert report["ok"] is True
    (mine,) = [w for w in report["workspaces"] if w["workspaceId"] == str(world.workspace_id)]
    assert (mine["eventLogTotal"], mine["readModelTotal"], mine["invoicedTotal"]) == (
        "5.800000",
        "5.800000",
        "6.000000",
    )

    with psycopg.connect(side.database_url) as conn:
        conn.execute(
            "UPDATE rm_statement_lines SET billed_exact_micros = billed_exact_micros - 1"
            " WHERE workspace_id = %s AND month = %s",
            (world.workspace_id, MONTH),
        )
    planted = agentworks(
        "reconcile", "--month", MONTH, "--workspace", str(world.workspace_id), "--json",
        cwd=tmp_path, env=environment,
    )  # fmt: skip
    assert planted.returncode == 1
    (found,) = json.loads(planted.stdout)["workspaces"][0]["discrepancies"]
    assert found == {
        "kind": "readModelLine",
        "key": f"usage:{world.project_id}",
        "expected": "5.800000",
        "actual": "5.799999",
    }


def test_reconcile_finds_an_item_added_in_stripe_by_hand(
    side: ReadSide, localstripe: str, tmp_path: Path
) -> None:
    world = world_with_usage(side)
    environment = env(side.database_url, localstripe)
    billing = Billing(side.app)
    stripe = StripeBilling(api_key=STRIPE_TEST_KEY, api_base=localstripe)
    try:
        customer = provision_customer(localstripe, world.workspace_id)
        stripe_client(localstripe).v1.invoice_items.create(
            {
                "customer": customer,
                "amount": 199,
                "currency": "usd",
                "metadata": {
                    "invoice_key": invoice_key(world.workspace_id, MONTH),
                    "line_key": "manual",
                },
            }
        )
        assert billing.invoice(stripe, world.workspace_id, MONTH).outcome is Outcome.ISSUED
    finally:
        stripe.close()
    project_all(side)
    result = agentworks("reconcile", "--month", MONTH, "--json", cwd=tmp_path, env=environment)
    assert result.returncode == 1
    (found,) = json.loads(result.stdout)["workspaces"][0]["discrepancies"]
    assert found == {
        "kind": "stripeItem",
        "key": "manual",
        "expected": "0.000000",
        "actual": "1.990000",
    }


def test_the_invoice_request_asks_stripe_to_include_pending_items_and_advance(
    localstripe: str,
) -> None:
    """localstripe always sweeps pending items into a new invoice and never advances one; real
    Stripe does so only when asked (``pending_invoice_items_behavior=include``; an invoice made
    through its API stays a draft, never finalized nor collected, without ``auto_advance``), so
    this checks the request we send."""
    sent: list[dict[str, Any]] = []

    class Recording(StripeBilling):
        def _call(self, what: str, request: Any, *args: Any, **kwargs: Any) -> Any:
            sent.append({"what": what, "params": args[-1] if args else None})
            return super()._call(what, request, *args, **kwargs)

    stripe = Recording(api_key=STRIPE_TEST_KEY, api_base=localstripe)
    try:
        customer = provision_customer(localstripe, UUID(int=1))
        stripe_client(localstripe).v1.invoice_items.create(
            {"customer": customer, "amount": 100, "currency": "usd"}
        )
        stripe.create_invoice(customer, "k", "usage")
    finally:
        stripe.close()
    (params,) = [s["params"] for s in sent if s["what"] == "invoice creation"]
    assert params["pending_invoice_items_behavior"] == "include"
    assert params["auto_advance"] is True
    assert params["metadata"] == {"invoice_key": "k"}


def test_credits_and_invoices_rebuild_into_the_same_rows(
    side: ReadSide, localstripe: str, tmp_path: Path
) -> None:
    world = world_with_usage(side)
    provision_customer(localstripe, world.workspace_id)
    billing = Billing(side.app)
    billing.grant_credit(
        GrantCredit(workspace_id=world.workspace_id, amount="2.00", reason="outage", at=NOW),
        Actor.service("billing", world.workspace_id),
    )
    stripe = StripeBilling(api_key=STRIPE_TEST_KEY, api_base=localstripe)
    try:
        issued = billing.invoice(stripe, world.workspace_id, MONTH)
    finally:
        stripe.close()
    assert issued.stripe_invoice_id is not None
    key = invoice_key(world.workspace_id, MONTH)
    assert billing.settle(key, issued.stripe_invoice_id, InvoiceStatus.PAID, "evt_1") is True
    assert billing.settle(key, issued.stripe_invoice_id, InvoiceStatus.PAID, "evt_1") is False
    project_all(side)
    with side.pool.connection() as conn:
        invoiced = statement(conn, world.workspace_id, MONTH)
        current = statement(conn, world.workspace_id, month_of(NOW))
    assert (invoiced.invoice_id, invoiced.invoice_status) == (issued.stripe_invoice_id, "paid")
    assert [line.kind for line in current.lines] == ["credit"]
    assert rebuild_differences(side.database_url) == {}


def test_stripe_refusing_fails_the_workspace_and_a_rerun_after_the_fix_resumes(
    side: ReadSide, localstripe: str, tmp_path: Path
) -> None:
    """localstripe refuses (404) to invoice a customer without a subscription: a refusal in the
    middle of the routine, after the items were created."""
    world = world_with_usage(side)
    client = stripe_client(localstripe)
    customer = client.v1.customers.create({"metadata": {"workspace_id": str(world.workspace_id)}})
    environment = env(side.database_url, localstripe)
    refused = agentworks("invoice", "--month", MONTH, cwd=tmp_path, env=environment)
    assert refused.returncode == 1
    (failure,) = [line for line in refused.stderr.splitlines() if line.startswith("workspace ")]
    assert failure.startswith(f"workspace {world.workspace_id} failed: Stripe invoice creation")
    assert "HTTP 404" in failure
    recorded: Invoice = side.app.repository.get(invoice_id_for(world.workspace_id, MONTH))
    pending = list(client.v1.invoice_items.list({"customer": customer.id}).auto_paging_iter())
    assert set(recorded.items.values()) == {item.id for item in pending}
    assert recorded.stripe_invoice_id is None

    # The fix: a card and a subscription. Stripe (and localstripe) sweep the pending items into
    # the subscription's first invoice; the re-run finds our items there and records that one.
    token = client.v1.tokens.create(
        {"card": {"number": "4242424242424242", "exp_month": 12, "exp_year": 2030, "cvc": "123"}}
    )
    client.v1.customers.payment_sources.create(customer.id, {"source": token.id})
    subscribe(localstripe, customer.id)
    resumed = agentworks("invoice", "--month", MONTH, cwd=tmp_path, env=environment)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    (invoice,) = ours(localstripe)
    billed = [line for line in lines_of(localstripe, invoice.id) if line.amount]
    assert [line.metadata["line_key"] for line in billed] == [f"usage:{world.project_id}"]


def call_then_statements(
    side: ReadSide, world: World, call_id: str, *, cost: int, at: datetime
) -> tuple[Statement, Statement]:
    """One more call of a new run, projected: the statements of ``MONTH`` and of this month."""
    run_id = running_run(side, world)
    llm_call(side, world, run_id, call_id, cost=cost, at=at)
    project_all(side)
    with side.pool.connection() as conn:
        return (
            statement(conn, world.workspace_id, MONTH),
            statement(conn, world.workspace_id, month_of(NOW)),
        )


def test_late_usage_of_a_closed_month_shows_on_the_next_statement_and_reconciles(
    side: ReadSide,
) -> None:
    world = world_with_usage(side)
    billing = Billing(side.app)
    billing.close_month(world.workspace_id, MONTH)
    closed, current = call_then_statements(side, world, "late", cost=30_000, at=IN_MONTH)
    assert closed.total_micros == 6_000_000
    (line,) = current.lines
    assert (line.billed_exact_micros, line.billed_micros) == (150_000, 250_000)
    assert "includes 0.150000 of late usage" in line.description
    fold = fold_month(side.app, month_of(NOW))
    log_lines = fold.lines(world.workspace_id, increment_micros=250_000, project_names=None)
    assert [(x.key, x.exact_micros) for x in log_lines] == [(f"usage:{world.project_id}", 150_000)]
    assert "late usage" in log_lines[0].description


def test_a_plan_change_after_invoicing_keeps_the_invoiced_rounding(
    side: ReadSide, localstripe: str, tmp_path: Path
) -> None:
    """A month's lines are rounded at the increment it was invoiced with: a later ``setPlan``
    neither rewrites the invoiced statement nor makes reconciliation see Stripe disagree."""
    world = world_with_usage(side)
    provision_customer(localstripe, world.workspace_id)
    environment = env(side.database_url, localstripe)
    assert agentworks("invoice", "--month", MONTH, cwd=tmp_path, env=environment).returncode == 0
    side.app.set_plan(
        m.SetPlan(workspace_id=world.workspace_id, markup="5", billing_increment="0.10"),
        world.operator,
    )
    invoiced, current = call_then_statements(side, world, "now", cost=10_000, at=NOW)
    (line,) = invoiced.lines
    assert (line.billed_exact_micros, line.billed_micros) == (5_800_000, 6_000_000)
    assert (invoiced.total_micros, invoiced.billing_increment_micros) == (6_000_000, 250_000)
    (now_line,) = current.lines
    assert (now_line.billed_micros, current.billing_increment_micros) == (100_000, 100_000)

    result = agentworks(
        "reconcile", "--month", MONTH, "--workspace", str(world.workspace_id), "--json",
        cwd=tmp_path, env=environment,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    (mine,) = json.loads(result.stdout)["workspaces"]
    assert (mine["discrepancies"], mine["invoicedTotal"]) == ([], "6.000000")


class VoidedInStripe(StripeBilling):
    """localstripe voids only an invoice with a payment intent, which an invoice it has not
    finalized (it has no ``/finalize``) lacks: the invoice as it holds it, said to be void."""

    def find_invoice(self, customer_id: str, key: str) -> RemoteInvoice | None:
        found = super().find_invoice(customer_id, key)
        return None if found is None else replace(found, status="void")


def test_reconcile_finds_an_invoice_voided_in_stripe_that_the_log_holds_open(
    side: ReadSide, localstripe: str, tmp_path: Path
) -> None:
    """A void no webhook told (no secret configured, deliveries given up) leaves the month's
    money uncollected: reconcile says so until the void is recorded, and not after."""
    world = world_with_usage(side)
    provision_customer(localstripe, world.workspace_id)
    environment = env(side.database_url, localstripe)
    assert agentworks("invoice", "--month", MONTH, cwd=tmp_path, env=environment).returncode == 0
    (invoice,) = ours(localstripe)
    project_all(side)
    billing = Billing(side.app)

    def reconciled() -> list[Discrepancy]:
        with side.pool.connection() as conn:
            read_model = statement_as_lines(statement(conn, world.workspace_id, MONTH))
        stripe = VoidedInStripe(api_key=STRIPE_TEST_KEY, api_base=localstripe)
        try:
            return billing.reconcile(
                stripe,
                world.workspace_id,
                MONTH,
                fold=fold_month(side.app, MONTH),
                read_model_lines=read_model,
            ).discrepancies
        finally:
            stripe.close()

    assert reconciled() == [
        Discrepancy(
            kind=DiscrepancyKind.STRIPE_INVOICE,
            key=invoice.id,
            expected_micros=6_000_000,
            actual_micros=0,
        )
    ]
    key = invoice_key(world.workspace_id, MONTH)
    assert billing.settle(key, invoice.id, InvoiceStatus.VOID, "evt_void")
    assert reconciled() == []


def test_a_correction_racing_the_close_of_its_month_lands_in_the_next_statement(
    side: ReadSide, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The month is closed (its invoice then drafted from the log) between a correction's
    choice of month and its save: the correction must not land in the closed month, which no
    statement bills any more, but in the next one. Decided on the store's state (a retry, or a
    first attempt that found nothing cached), no check of what was read covers the month."""
    world = side.new_world()
    run_id = running_run(side, world)
    charge = llm_call(side, world, run_id, "a", cost=100_000, at=IN_MONTH).extra["charge_id"]
    chosen = side.app.spend_for

    def chosen_then_closed(workspace: Workspace, at: datetime, meta: EventMeta) -> MonthlySpend:
        spend = chosen(workspace, at, meta)
        if spend.month == MONTH and not spend.closed:
            Billing(side.app).close_month(world.workspace_id, MONTH)
        return spend

    monkeypatch.setattr(side.app, "spend_for", chosen_then_closed)
    monkeypatch.setattr(side.app, "cached_reads", False)
    side.app.credit_charge(
        m.CreditCharge(charge_id=UUID(charge), amount="0.10", reason="slow", at=IN_MONTH),
        world.owner,
    )
    monkeypatch.undo()
    closed = fold_month(side.app, MONTH).lines(world.workspace_id, increment_micros=250_000)
    current = fold_month(side.app, month_of(NOW)).lines(
        world.workspace_id, increment_micros=250_000
    )
    assert [line.exact_micros for line in closed] == [500_000]
    assert [line.exact_micros for line in current] == [-100_000]


def test_reconcile_finds_an_ended_month_whose_billable_lines_no_invoice_holds(
    side: ReadSide, localstripe: str, tmp_path: Path
) -> None:
    """A month skipped by invoicing (a run for one workspace only, or one that failed) is
    money the log bills and Stripe never will: reconcile says so until it is invoiced."""
    world = world_with_usage(side)
    provision_customer(localstripe, world.workspace_id)
    environment = env(side.database_url, localstripe)
    project_all(side)
    workspace = ("--workspace", str(world.workspace_id), "--json")
    skipped = agentworks("reconcile", "--month", MONTH, *workspace, cwd=tmp_path, env=environment)
    assert skipped.returncode == 1, skipped.stdout + skipped.stderr
    (found,) = json.loads(skipped.stdout)["workspaces"][0]["discrepancies"]
    assert found == {
        "kind": "stripeInvoice",
        "key": invoice_key(world.workspace_id, MONTH),
        "expected": "6.000000",
        "actual": "0.000000",
    }
    current = agentworks(
        "reconcile", "--month", month_of(NOW), *workspace, cwd=tmp_path, env=environment
    )
    assert current.returncode == 0, current.stdout + current.stderr

    assert agentworks("invoice", "--month", MONTH, cwd=tmp_path, env=environment).returncode == 0
    project_all(side)
    invoiced = agentworks("reconcile", "--month", MONTH, *workspace, cwd=tmp_path, env=environment)
    assert invoiced.returncode == 0, invoiced.stdout + invoiced.stderr


def test_a_workspace_whose_month_cannot_be_closed_fails_alone(
    side: ReadSide, localstripe: str, tmp_path: Path
) -> None:
    """The invoicing run closed every workspace's month before its loop that names a failing
    workspace and goes on: one month it could not close (its record unreadable here; racing
    charges five times over in production) stopped the run, and no workspace was invoiced."""
    healthy, broken = world_with_usage(side), world_with_usage(side)
    customer = provision_customer(localstripe, healthy.workspace_id)
    provision_customer(localstripe, broken.workspace_id)
    plant_renamed(side.app, spend_id_for(broken.workspace_id, MONTH))
    environment = env(side.database_url, localstripe)
    result = agentworks("invoice", "--month", MONTH, cwd=tmp_path, env=environment)
    assert result.returncode == 1, result.stdout + result.stderr
    (failure,) = [line for line in result.stderr.splitlines() if line.startswith("workspace ")]
    assert failure.startswith(f"workspace {broken.workspace_id} failed:"), failure
    assert "1 issued, 0 already issued, 0 nothing to bill, 1 failed" in result.stdout
    (invoice,) = ours(localstripe)
    assert invoice.customer == customer
