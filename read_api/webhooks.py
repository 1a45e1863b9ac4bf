"""``POST /webhooks/stripe``: Stripe tells us an invoice was paid or voided.

The signature is checked with ``AGENTWORKS_STRIPE_WEBHOOK_SECRET`` before anything is read; a
delivery signed more than five minutes ago is refused (a replay), and an event id already
recorded is acknowledged without effect, so a replay within the window changes nothing either.
An event of an invoice of ours whose issue is not recorded yet (an invoicing run stopped after
Stripe made it) is answered 409, so that Stripe delivers it again once the re-run recorded it.
Without a configured secret the route answers 404: unsigned billing events are never trusted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import structlog
from fastapi import Request
from fastapi.responses import JSONResponse

from adapters.stripe import WebhookRefused, verify_webhook
from commands.billing import Billing
from domain.billing import InvoiceStatus
from domain.errors import Conflict, NotFound
from read_api.errors import error_body
from read_api.input_checks import BodyTooSlow, body_within

if TYPE_CHECKING:
    from read_api.runtime import ApiRuntime

log = structlog.get_logger(__name__)

STRIPE_WEBHOOK_PATH = "/webhooks/stripe"
_OUTCOMES = {
    "invoice.paid": InvoiceStatus.PAID,
    "invoice.payment_succeeded": InvoiceStatus.PAID,
    "invoice.voided": InvoiceStatus.VOID,
}


class StripeWebhook:
    def __init__(self, runtime: ApiRuntime) -> None:
        self.runtime = runtime

    async def receive(self, request: Request) -> JSONResponse:
        services = self.runtime.services
        secret = services.stripe_webhook_secret
        if secret is None:
            return JSONResponse(error_body("no Stripe webhook is configured", "NOT_FOUND"), 404)
        # Read no further than the limit: the signature can only be checked on the whole body.
        try:
            payload = await body_within(
                request, services.max_body_bytes, seconds=services.request_body_timeout_seconds
            )
        except BodyTooSlow as slow:
            return JSONResponse(
                error_body(slow.message, slow.code), 408, headers={"Connection": "close"}
            )
        if payload is None:
            return JSONResponse(error_body("the webhook body is too large", "VALIDATION"), 413)
        try:
            event = verify_webhook(payload, request.headers.get("stripe-signature"), secret)
        except WebhookRefused as refused:
            log.warning("stripe.webhook_refused", reason=str(refused))
            return JSONResponse(error_body(str(refused), "UNAUTHENTICATED"), 400)
        outcome = _OUTCOMES.get(event.event_type) if event is not None else None
        if event is None or outcome is None or event.invoice_key is None:
            return JSONResponse({"received": True, "recorded": False})
        billing = Billing(services.write)
        try:
            recorded = await self.runtime.offloader.run(
                billing.settle, event.invoice_key, event.stripe_invoice_id, outcome, event.event_id
            )
        except NotFound as missing:
            log.warning(
                "stripe.webhook_unknown_invoice", event_id=event.event_id, error=str(missing)
            )
            return JSONResponse({"received": True, "recorded": False})
        except Conflict as busy:
            # Not recorded, and it must be: any answer but a 2xx has Stripe deliver it again.
            log.warning("stripe.webhook_not_yet", event_id=event.event_id, error=str(busy))
            return JSONResponse(error_body(str(busy), busy.code), 409)
        log.info(
            "stripe.webhook_recorded" if recorded else "stripe.webhook_duplicate",
            event_id=event.event_id,
            invoice=event.stripe_invoice_id,
            outcome=outcome.value,
        )
        return JSONResponse({"received": True, "recorded": recorded})
