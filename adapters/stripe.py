"""Stripe through the official ``stripe`` package: customers, invoice items, invoices.

Every object we create carries metadata naming what it is for (workspace, month, statement
line), and every create is preceded by a look-up of that metadata, because idempotency must not
rest on Stripe's ``Idempotency-Key`` (the test fake ignores it, and a key would not survive a
crash of the process holding it anyway). Stripe's exceptions become :class:`StripeUnavailable`
here, so callers handle one error of ours.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import stripe

from domain.billing import Line, RemoteInvoice, RemoteItem, whole_cents
from domain.errors import Unavailable, ValidationFailed

CURRENCY = "usd"


def _metadata(obj: Any) -> dict[str, str]:
    found = getattr(obj, "metadata", None)
    return {str(k): str(v) for k, v in found.to_dict().items()} if found else {}


def line_item_id(line: Any) -> str:
    """The id of the invoice item an invoice line bills, else the line's own id.

    API versions since 2025-03-31 (``basil``; this ``stripe`` package speaks a later one) name it
    at ``parent.invoice_item_details.invoice_item``; earlier ones, and localstripe, at
    ``invoice_item``. Read at the older place alone, a real Stripe answered the line's id
    (``il_…``), and a resumed invoice recorded those as its items."""
    parent = getattr(line, "parent", None)
    details = getattr(parent, "invoice_item_details", None) if parent else None
    item = getattr(details, "invoice_item", None) if details else None
    return str(item or getattr(line, "invoice_item", None) or line.id)


class StripeUnavailable(Unavailable):
    """Stripe could not be reached or refused a request; nothing about our input changed."""


class StripeBilling:
    """What invoicing needs from Stripe, each call one request (plus paging for look-ups)."""

    def __init__(self, *, api_key: str, api_base: str | None = None, timeout: float = 10.0) -> None:
        http_client = stripe.RequestsClient(timeout=timeout)
        self._client = stripe.StripeClient(
            api_key,
            base_addresses={"api": api_base} if api_base else None,
            max_network_retries=0,
            http_client=http_client,
        )
        self._http = http_client

    def close(self) -> None:
        self._http.close()  # type: ignore[no-untyped-call]

    def _call(self, what: str, request: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return request(*args, **kwargs)
        except stripe.StripeError as error:
            status = getattr(error, "http_status", None)
            detail = error.user_message or str(error) or type(error).__name__
            raise StripeUnavailable(
                f"Stripe {what} failed"
                + (f" (HTTP {status})" if status else "")
                + f": {' '.join(detail.split())}"
            ) from error

    def find_customer(self, workspace_id: UUID) -> str | None:
        customers = self._call("customer look-up", self._client.v1.customers.list, {"limit": 100})
        for customer in customers.auto_paging_iter():
            if _metadata(customer).get("workspace_id") == str(workspace_id):
                return str(customer.id)
        return None

    def create_customer(self, workspace_id: UUID, name: str) -> str:
        customer = self._call(
            "customer creation",
            self._client.v1.customers.create,
            {"name": name, "metadata": {"workspace_id": str(workspace_id)}},
        )
        return str(customer.id)

    def pending_items(self, customer_id: str) -> list[RemoteItem]:
        """The customer's invoice items not yet on an invoice (the next invoice sweeps them in)."""
        items = self._call(
            "invoice item look-up",
            self._client.v1.invoice_items.list,
            {"customer": customer_id, "limit": 100},
        )
        return [
            RemoteItem(
                id=str(item.id),
                line_key=_metadata(item).get("line_key") or str(item.id),
                amount_cents=int(item.amount),
                invoice_key=_metadata(item).get("invoice_key"),
            )
            for item in items.auto_paging_iter()
            if getattr(item, "invoice", None) is None
        ]

    def create_item(self, customer_id: str, key: str, line: Line) -> str:
        item = self._call(
            f"invoice item creation ({line.key})",
            self._client.v1.invoice_items.create,
            {
                "customer": customer_id,
                "amount": whole_cents(line.billed_micros),
                "currency": CURRENCY,
                "description": line.description,
                "metadata": {"invoice_key": key, "line_key": line.key},
            },
        )
        return str(item.id)

    def find_invoice(self, customer_id: str, key: str) -> RemoteInvoice | None:
        """The customer's invoice of ``key``: by its metadata, or by the items it holds.

        The items' metadata is what always survives (a fake may drop an invoice's), and an
        invoice that swept our pending items in is ours whatever its own metadata says.
        """
        invoices = self._call(
            "invoice look-up",
            self._client.v1.invoices.list,
            {"customer": customer_id, "limit": 100},
        )
        for invoice in invoices.auto_paging_iter():
            found = self._with_items(invoice)
            if _metadata(invoice).get("invoice_key") == key or any(
                item.invoice_key == key for item in found.items
            ):
                return found
        return None

    def _with_items(self, invoice: Any) -> RemoteInvoice:
        lines = self._call(
            "invoice lines look-up",
            self._client.v1.invoices.line_items.list,
            invoice.id,
            {"limit": 100},
        )
        items = [
            RemoteItem(
                id=line_item_id(line),
                line_key=str(_metadata(line).get("line_key") or line.id),
                amount_cents=int(line.amount),
                invoice_key=_metadata(line).get("invoice_key"),
            )
            for line in lines.auto_paging_iter()
        ]
        return RemoteInvoice(id=str(invoice.id), status=str(invoice.status), items=items)

    def create_invoice(self, customer_id: str, key: str, description: str) -> str:
        """The invoice, gathering the customer's pending items.

        ``pending_invoice_items_behavior=include``: Stripe's default (``exclude`` since API
        version 2022-08-01) would leave our items out of the invoice. ``auto_advance``: an
        invoice made through the API stays a draft (never finalized, sent or collected) unless
        asked to advance; Stripe then finalizes it after an hour and collects it.
        """
        invoice = self._call(
            "invoice creation",
            self._client.v1.invoices.create,
            {
                "customer": customer_id,
                "description": description,
                "metadata": {"invoice_key": key},
                "pending_invoice_items_behavior": "include",
                "auto_advance": True,
            },
        )
        return str(invoice.id)


class WebhookRefused(ValidationFailed):
    """A webhook delivery whose signature does not hold, or whose timestamp is too old."""


@dataclass(frozen=True, kw_only=True)
class InvoiceEvent:
    """What a Stripe invoice event tells us: which event, which invoice, which of ours."""

    event_id: str
    event_type: str
    stripe_invoice_id: str
    invoice_key: str | None


#: How old a signed delivery may be: older ones are replays (Stripe's own default).
WEBHOOK_TOLERANCE_SECONDS = 300


def verify_webhook(payload: bytes, signature: str | None, secret: str) -> InvoiceEvent | None:
    """A verified invoice event, ``None`` for a verified event of another kind.

    The signature (HMAC-SHA256 of ``timestamp.payload``) and its timestamp are checked by the
    ``stripe`` package; a delivery older than :data:`WEBHOOK_TOLERANCE_SECONDS` is refused.
    """
    if not signature:
        raise WebhookRefused("the Stripe-Signature header is missing")
    try:
        stripe.WebhookSignature.verify_header(
            payload.decode("utf-8"), signature, secret, WEBHOOK_TOLERANCE_SECONDS
        )
        event = json.loads(payload)
    except stripe.SignatureVerificationError as error:
        raise WebhookRefused(f"the Stripe signature does not hold: {error}") from error
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise WebhookRefused("the webhook body is not JSON") from error
    if not isinstance(event, dict) or not str(event.get("type", "")).startswith("invoice."):
        return None
    # Signed by Stripe, yet read with care: a shape other than an invoice's names none of ours.
    invoice = _mapping(_mapping(event.get("data")).get("object"))
    key = _key(invoice)
    lines = _mapping(invoice.get("lines")).get("data")
    for line in lines if isinstance(lines, list) else []:
        key = key or _key(_mapping(line))
    return InvoiceEvent(
        event_id=str(event.get("id")),
        event_type=str(event["type"]),
        stripe_invoice_id=str(invoice.get("id")),
        invoice_key=key,
    )


def _mapping(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _key(holder: dict[str, Any]) -> str | None:
    """The invoice key in ``holder``'s metadata, if it holds one."""
    key = _mapping(holder.get("metadata")).get("invoice_key")
    return key if isinstance(key, str) and key else None
