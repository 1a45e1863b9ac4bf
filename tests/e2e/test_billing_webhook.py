"""The billing surface over HTTP: the statement of an invoiced month and Stripe's webhook.

Webhook deliveries are signed here the way Stripe (and localstripe) sign them:
``Stripe-Signature: t=<unix time>,v1=<hex HMAC-SHA256 of "t.payload">``. localstripe sends no
event when an invoice is voided, so the voided case is a delivery we sign ourselves.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any
from uuid import UUID

import httpx
import pytest
from api_client import wait_for
from stripe_fixtures import STRIPE_TEST_KEY, provision_customer
from users import user_id

from adapters.stripe import StripeBilling
from commands import models as m
from commands.billing import Billing, Outcome
from commands.handlers import Actor
from domain.billing import invoice_key
from domain.usage import month_of
from domain.workspace import Workspace

if TYPE_CHECKING:
    from e2e_stack import MakeStack, Stack

pytestmark = pytest.mark.slow

SECRET = "whsec_agentworks_test"
MONTH = month_of(datetime.now(UTC).replace(day=1) - timedelta(days=1))
IN_MONTH = datetime.fromisoformat(f"{MONTH}-10T08:00:00+00:00")
STATEMENT = (
    "query($ws: ID!, $m: String!) { statement(workspaceId: $ws, month: $m) {"
    " total invoiceId invoiceStatus lines { projectId kind billedExact billed } } }"
)


def signed(payload: bytes, *, secret: str = SECRET, at: int | None = None) -> dict[str, str]:
    stamp = int(time.time()) if at is None else at
    digest = hmac.new(secret.encode(), f"{stamp}.".encode() + payload, hashlib.sha256)
    return {"Stripe-Signature": f"t={stamp},v1={digest.hexdigest()}"}


def invoice_event(event_id: str, kind: str, stripe_invoice_id: str, key: str) -> bytes:
    return json.dumps(
        {
            "id": event_id,
            "type": kind,
            "data": {
                "object": {
                    "id": stripe_invoice_id,
                    "object": "invoice",
                    "metadata": {},
                    "lines": {"data": [{"metadata": {"invoice_key": key}}]},
                }
            },
        }
    ).encode()


def charged_workspace(stack: Stack, localstripe: str) -> tuple[Any, str]:
    """A workspace with last month's usage and a customer in localstripe; its owner's client."""
    alice, ws = stack.owner_with_workspace("alice", "Acme")
    project = alice.create_project(ws, "Rocket", [{"name": "Todo"}])["project"]["id"]
    card = alice.create_card(project, "c")["card"]["id"]
    service = Actor.service("orchestrator", ws)
    run = stack.write.start_agent_run(
        m.StartAgentRun(card_id=UUID(card), agent="coder"),
        Actor(user_id=user_id("alice"), workspace_id=ws),
    ).id
    stack.write.begin_run(m.BeginRun(run_id=run, worker="w"), service)
    stack.write.record_llm_call(
        m.RecordLlmCall(
            run_id=run, call_id="c1", provider="p", model="m", input_tokens=1, output_tokens=1,
            latency_ms=1, provider_cost_micros=210_000, price_table_version="v1", at=IN_MONTH,
        ),
        service,
    )  # fmt: skip
    provision_customer(localstripe, UUID(ws))
    return alice, ws


def invoiced_workspace(stack: Stack, localstripe: str) -> tuple[Any, str, str]:
    """A ``charged_workspace``, invoiced in localstripe; its owner's client."""
    alice, ws = charged_workspace(stack, localstripe)
    stripe = StripeBilling(api_key=STRIPE_TEST_KEY, api_base=localstripe)
    try:
        result = Billing(stack.write).invoice(stripe, UUID(ws), MONTH)
    finally:
        stripe.close()
    assert result.outcome is Outcome.ISSUED
    assert result.stripe_invoice_id is not None
    return alice, ws, result.stripe_invoice_id


@pytest.fixture
def invoiced(make_stack: MakeStack, localstripe: str) -> tuple[Stack, Any, str, str]:
    """A stack that takes Stripe's webhook, with a workspace from ``invoiced_workspace``."""
    stack = make_stack(stripe_webhook_secret=SECRET)
    return (stack, *invoiced_workspace(stack, localstripe))


def statement(alice: Any, ws: str) -> Any:
    return alice.data(STATEMENT, {"ws": ws, "m": MONTH})["statement"]


def test_an_invoiced_statement_shows_its_invoice_and_a_paid_webhook_marks_it_paid(
    invoiced: tuple[Stack, Any, str, str],
) -> None:
    stack, alice, ws, stripe_invoice = invoiced
    shown = wait_for(lambda: (s := statement(alice, ws))["invoiceId"] and s, timeout=15.0)
    assert shown["invoiceStatus"] == "open"
    assert shown["total"] == "1.250000"
    assert [(line["kind"], line["billedExact"], line["billed"]) for line in shown["lines"]] == [
        ("usage", "1.050000", "1.250000")
    ]
    assert shown["invoiceId"] == stripe_invoice

    key = invoice_key(UUID(ws), MONTH)
    paid = invoice_event("evt_paid_1", "invoice.paid", stripe_invoice, key)
    url = f"{stack.url}/webhooks/stripe"
    first = httpx.post(url, content=paid, headers=signed(paid))
    assert first.status_code == 200, first.text
    assert first.json() == {"received": True, "recorded": True}
    wait_for(lambda: statement(alice, ws)["invoiceStatus"] == "paid", timeout=15.0)
    # The same event again, freshly signed: acknowledged, nothing recorded.
    again = httpx.post(url, content=paid, headers=signed(paid))
    assert again.json() == {"received": True, "recorded": False}


def test_webhook_refuses_bad_signatures_and_old_deliveries(
    invoiced: tuple[Stack, Any, str, str],
) -> None:
    stack, alice, ws, stripe_invoice = invoiced
    voided = invoice_event(
        "evt_void_1", "invoice.voided", stripe_invoice, invoice_key(UUID(ws), MONTH)
    )
    url = f"{stack.url}/webhooks/stripe"
    for headers in (
        {},
        signed(voided, secret="whsec_someone_else"),
        signed(voided, at=int(time.time()) - 3600),  # a replay of an hour-old delivery
        signed(voided + b" "),
    ):
        refused = httpx.post(url, content=voided, headers=headers)
        assert refused.status_code == 400, (headers, refused.text)
        assert refused.json()["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"
    accepted = httpx.post(url, content=voided, headers=signed(voided))
    assert accepted.json() == {"received": True, "recorded": True}
    wait_for(lambda: statement(alice, ws)["invoiceStatus"] == "void", timeout=15.0)


class _StopsAfterCreatingTheInvoice(StripeBilling):
    """A run that dies right after Stripe made the invoice, before recording its issue."""

    def create_invoice(self, customer_id: str, key: str, description: str) -> str:
        super().create_invoice(customer_id, key, description)
        raise KeyboardInterrupt("stopped after create_invoice")


def test_a_payment_before_the_issue_is_recorded_is_asked_for_again(
    make_stack: MakeStack, localstripe: str
) -> None:
    stack = make_stack(stripe_webhook_secret=SECRET)
    alice, ws = charged_workspace(stack, localstripe)
    stopping = _StopsAfterCreatingTheInvoice(api_key=STRIPE_TEST_KEY, api_base=localstripe)
    stripe = StripeBilling(api_key=STRIPE_TEST_KEY, api_base=localstripe)
    try:
        with pytest.raises(KeyboardInterrupt):
            Billing(stack.write).invoice(stopping, UUID(ws), MONTH)
        key = invoice_key(UUID(ws), MONTH)
        customer = stack.write.aggregate(Workspace, UUID(ws)).stripe_customer_id
        found = stripe.find_invoice(str(customer), key)
        assert found is not None
        paid = invoice_event("evt_paid_early", "invoice.paid", found.id, key)
        url = f"{stack.url}/webhooks/stripe"
        early = httpx.post(url, content=paid, headers=signed(paid))
        assert early.status_code == 409, early.text  # not 2xx: Stripe delivers it again
        assert early.json()["errors"][0]["extensions"]["code"] == "CONFLICT"
        assert Billing(stack.write).invoice(stripe, UUID(ws), MONTH).outcome is Outcome.ISSUED
    finally:
        stopping.close()
        stripe.close()
    again = httpx.post(url, content=paid, headers=signed(paid))
    assert again.json() == {"received": True, "recorded": True}
    wait_for(lambda: statement(alice, ws)["invoiceStatus"] == "paid", timeout=15.0)


def test_without_a_secret_the_webhook_route_is_not_there(make_stack: MakeStack) -> None:
    stack = make_stack()
    payload = b"{}"
    answer = httpx.post(f"{stack.url}/webhooks/stripe", content=payload, headers=signed(payload))
    assert answer.status_code == 404
