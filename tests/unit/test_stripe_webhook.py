"""What a signed Stripe delivery is read as (``adapters.stripe.verify_webhook``)."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from typing import Any

import pytest

from adapters.stripe import WebhookRefused, verify_webhook

SECRET = "whsec_unit"


def signature(payload: bytes) -> str:
    """``Stripe-Signature`` as Stripe writes it: ``t=<unix time>,v1=<HMAC of "t.payload">``."""
    stamp = int(time.time())
    digest = hmac.new(SECRET.encode(), f"{stamp}.".encode() + payload, hashlib.sha256)
    return f"t={stamp},v1={digest.hexdigest()}"


def signed(event: Any) -> tuple[bytes, str]:
    payload = json.dumps(event).encode()
    return payload, signature(payload)


def paid(invoice: Any) -> dict[str, Any]:
    return {"id": "evt_1", "type": "invoice.paid", "data": {"object": invoice}}


@pytest.mark.parametrize(
    "event",
    [
        {"id": "evt_1", "type": "invoice.paid", "data": []},
        {"id": "evt_1", "type": "invoice.paid", "data": "in_1"},
        paid("in_1"),
        paid({"id": "in_1", "metadata": "x"}),
        paid({"id": "in_1", "lines": {"data": ["x"]}}),
        paid({"id": "in_1", "lines": ["x"]}),
        paid({"id": "in_1", "metadata": {"invoice_key": 7}}),
    ],
)
def test_a_signed_invoice_event_of_another_shape_is_none_of_ours(event: Any) -> None:
    """Stripe signed it, so it is answered 200 and not retried, but it names no invoice of ours
    (it was a 500: ``.get`` of a list, ``partition`` of a number)."""
    payload, signature = signed(event)
    found = verify_webhook(payload, signature, SECRET)
    assert found is None or found.invoice_key is None


def test_a_signed_invoice_event_names_our_invoice_by_its_or_its_lines_metadata() -> None:
    key = "8d3f0c6e-4f55-4a39-9d4b-0f6c9a1b2c3d:2026-02"
    on_invoice = paid({"id": "in_1", "metadata": {"invoice_key": key}})
    on_line = {
        "id": "evt_2",
        "type": "invoice.voided",
        "data": {
            "object": {
                "id": "in_2",
                "metadata": {},
                "lines": {"data": [{"metadata": {"invoice_key": key}}]},
            }
        },
    }
    for event, invoice in ((on_invoice, "in_1"), (on_line, "in_2")):
        found = verify_webhook(*signed(event), SECRET)
        assert found is not None
        assert (found.event_id, found.stripe_invoice_id, found.invoice_key) == (
            event["id"],
            invoice,
            key,
        )


def test_a_signed_body_nested_past_the_parser_is_refused_as_not_json() -> None:
    payload = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(WebhookRefused, match="not JSON"):
        verify_webhook(payload, signature(payload), SECRET)
