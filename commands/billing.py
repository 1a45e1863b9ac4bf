"""Billing commands: credits, closing a month, and the monthly invoicing routine.

Invoicing talks to Stripe between saves, so it cannot be one transaction. It is a sequence of
steps each of which first looks for its result (in our events, then in Stripe by metadata) and
only then acts, and records what it did as an event right after doing it. A crash between any
two steps leaves a state the next run recognises, so nothing is created twice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import TYPE_CHECKING, ClassVar, Protocol
from uuid import UUID, uuid4

from eventsourcing.utils import get_topic
from pydantic import Field

from commands import models as m
from commands.handlers import Actor, AgentWorks, CommandResult, Decision
from domain.base import decided_at
from domain.billing import (
    Invoice,
    InvoiceStatus,
    Line,
    MonthFold,
    Reconciliation,
    RemoteInvoice,
    RemoteItem,
    has_ended,
    invoice_id_for,
    invoice_key,
    reconcile,
    require_ended,
)
from domain.errors import Conflict, InvalidTransition, NotFound, Unavailable
from domain.meta import EventMeta
from domain.money import parse_usd
from domain.project import Project
from domain.roles import Role
from domain.usage import MonthlySpend, spend_id_for
from domain.workspace import Workspace

if TYPE_CHECKING:
    from eventsourcing.domain import Aggregate
    from eventsourcing.persistence import Notification

BILLING_ACTOR = "billing"
_BILLING_TOPICS = [get_topic(event) for event in MonthFold.FOLDS]
_WORKSPACE_CREATED = get_topic(Workspace.Created)
_SAVE_ATTEMPTS = 5


def _after_latest(aggregate: Aggregate) -> AbstractContextManager[None]:
    """Stamp what a billing step records on ``aggregate`` now, or at its latest event when
    this host's clock reads earlier (another host, ahead, wrote it: the invoicing run, a
    webhook on an API host). Billing steps run outside a command's decision, which stamps
    after what it read (``commands.service``); an aggregate's events stay in time order. Only
    the instant moves, by the clocks' skew; no amount does."""
    return decided_at(max(datetime.now(UTC), aggregate.modified_on))


class GrantCredit(m.Command):
    """A credit to a workspace: a compensating event, a negative line on the open statement."""

    workspace_id: UUID
    amount: str
    reason: str = Field(min_length=1, max_length=1000)
    at: datetime

    sent_at_fields: ClassVar[frozenset[str]] = frozenset({"at"})


class BillingPort(Protocol):
    """What invoicing needs from Stripe (``adapters.stripe.StripeBilling``)."""

    def find_customer(self, workspace_id: UUID) -> str | None: ...
    def create_customer(self, workspace_id: UUID, name: str) -> str: ...
    def pending_items(self, customer_id: str) -> list[RemoteItem]: ...
    def create_item(self, customer_id: str, key: str, line: Line) -> str: ...
    def find_invoice(self, customer_id: str, key: str) -> RemoteInvoice | None: ...
    def create_invoice(self, customer_id: str, key: str, description: str) -> str: ...


class Outcome(StrEnum):
    ISSUED = "issued"
    ALREADY_ISSUED = "already issued"
    NOTHING_TO_BILL = "nothing to bill"


@dataclass(frozen=True, kw_only=True)
class InvoiceResult:
    workspace_id: UUID
    outcome: Outcome
    stripe_invoice_id: str | None
    total_micros: int
    lines: int


def _notifications(app: AgentWorks, topics: Sequence[str]) -> Iterator[Notification]:
    """The log's notifications of these topics, in log order, read a page at a time."""
    start = 1
    while True:
        batch = app.recorder.select_notifications(start, 5000, topics=topics)
        if not batch:
            return
        yield from batch
        start = batch[-1].id + 1


def billing_events(app: AgentWorks) -> Iterable[object]:
    """Every usage-charge and monthly-spend event in log order, decoded by the write side."""
    for notification in _notifications(app, _BILLING_TOPICS):
        yield app.mapper.to_domain_event(notification)


class BillingLog(Protocol):
    """A reader of the log that folds the month's billing events itself, the same events in
    the same order as :func:`billing_events` (``adapters.billing_log.BillingLog``: it reads only
    the fields the fold uses, and only the month's events)."""

    def fold(self, fold: MonthFold) -> None: ...


def fold_month(app: AgentWorks, month: str, *, log: BillingLog | None = None) -> MonthFold:
    """``month``'s figures of every workspace, by the log: through ``log`` when given, else
    every billing event decoded by the write side's mapper (the reference ``log`` must equal)."""
    fold = MonthFold(month)
    if log is not None:
        log.fold(fold)
        return fold
    for event in billing_events(app):
        fold.add(event)
    return fold


class Billing:
    """Billing's application service over the write side (one ``save`` per recorded step)."""

    def __init__(self, app: AgentWorks, *, clock: Callable[[], datetime] | None = None) -> None:
        self.app = app
        self.clock = clock or (lambda: datetime.now(UTC))

    # -- credits ----------------------------------------------------------------------------------

    def grant_credit(self, cmd: GrantCredit, actor: Actor) -> CommandResult:
        app = self.app

        def decide(meta: EventMeta) -> Decision:
            workspace = app.workspace_for(actor, cmd.workspace_id, Role.OWNER, "credit")
            spend = app.spend_for(workspace, cmd.at, meta)
            credit_id = uuid4()
            spend.grant_credit(credit_id, parse_usd(cmd.amount), cmd.reason, meta=meta)
            return Decision(
                spend, "credit", [spend], {"credit_id": str(credit_id), "month": spend.month}
            )

        return app.execute(cmd, actor, cmd.workspace_id, decide)

    # -- months and invoices ----------------------------------------------------------------------

    def workspace(self, workspace_id: UUID) -> Workspace:
        return self.app.aggregate(Workspace, workspace_id)

    def close_month(self, workspace_id: UUID, month: str) -> None:
        """Close ``month`` (it must have ended): later usage goes to the next statement."""
        require_ended(month, self.clock())
        meta = self._meta(workspace_id)
        for _ in range(_SAVE_ATTEMPTS):
            try:
                spend = self.app.aggregate(MonthlySpend, spend_id_for(workspace_id, month))
            except NotFound:
                spend = MonthlySpend.open(workspace_id=workspace_id, month=month, meta=meta)
            if spend.closed:
                return
            with _after_latest(spend):
                spend.close(meta=meta)
            if self._saved(spend):
                return
        raise Conflict(f"closing {month} of workspace {workspace_id} kept racing with charges")

    def invoice(
        self,
        stripe: BillingPort,
        workspace_id: UUID,
        month: str,
        *,
        fold: MonthFold | None = None,
    ) -> InvoiceResult:
        """Issue ``month``'s invoice of one workspace, resuming wherever an earlier run stopped."""
        require_ended(month, self.clock())
        workspace = self.workspace(workspace_id)
        self.close_month(workspace_id, month)
        invoice = self._drafted(workspace, month, fold)
        key = invoice_key(workspace_id, month)
        billable = invoice.billable_lines()
        if invoice.stripe_invoice_id is not None:
            return self._result(invoice, Outcome.ALREADY_ISSUED)
        if not billable:
            return self._result(invoice, Outcome.NOTHING_TO_BILL)
        customer = self._customer(stripe, workspace)
        meta = self._meta(workspace_id)
        found = stripe.find_invoice(customer, key)
        if found is None:
            waiting = stripe.pending_items(customer)
            foreign = sorted({str(item.invoice_key) for item in waiting} - {key})
            if foreign:
                # Stripe would sweep them into this invoice; their own invoice must go first.
                raise InvalidTransition(
                    f"customer {customer} has pending invoice items of {', '.join(foreign)}; "
                    "invoice those (or remove the items in Stripe) before this month"
                )
            pending = {item.line_key: item.id for item in waiting}
            for line in billable:
                if line.key in invoice.items:
                    continue
                item_id = pending.get(line.key) or stripe.create_item(customer, key, line)
                with _after_latest(invoice):
                    invoice.item_sent(line.key, item_id, meta=meta)
                self._save(invoice)
            stripe_id = stripe.create_invoice(
                customer, key, f"AgentWorks usage {month} ({workspace.name})"
            )
        else:
            for item in found.items:
                if item.line_key in {line.key for line in billable}:
                    with _after_latest(invoice):
                        invoice.item_sent(item.line_key, item.id, meta=meta)
            stripe_id = found.id
        with _after_latest(invoice):
            invoice.issue(stripe_id, meta=meta)
        self._save(invoice)
        return self._result(invoice, Outcome.ISSUED)

    def settle(
        self, key: str, stripe_invoice_id: str, outcome: InvoiceStatus, stripe_event_id: str
    ) -> bool:
        """Record Stripe's word that an invoice of ours was paid or voided.

        ``False`` when this Stripe event was recorded before (a replayed delivery changes
        nothing); ``NotFound`` for an invoice that is not ours or not the one we issued;
        ``Conflict`` while our invoice is drafted but its issue not yet recorded (a run stopped
        after Stripe made the invoice, and its re-run records it): the delivery must come again.
        """
        workspace_text, _, month = key.partition(":")
        try:
            workspace_id = UUID(workspace_text)
        except ValueError:
            raise NotFound(f"no invoice of ours is keyed {key!r}") from None
        for _ in range(_SAVE_ATTEMPTS):
            invoice = self.app.aggregate(Invoice, invoice_id_for(workspace_id, month))
            if invoice.stripe_invoice_id is None:
                raise Conflict(
                    f"invoice {key} is not recorded as issued yet (an invoicing run stopped "
                    f"after Stripe made it; its re-run records it): {stripe_event_id} must be "
                    "delivered again"
                )
            if invoice.stripe_invoice_id != stripe_invoice_id:
                raise NotFound(
                    f"Stripe invoice {stripe_invoice_id} is not the one issued for {key}"
                )
            with _after_latest(invoice):
                settled = invoice.settle(outcome, stripe_event_id, meta=self._meta(workspace_id))
            if not settled:
                return False
            if self._saved(invoice):
                return True
        raise Conflict(f"invoice {key} kept changing while {stripe_event_id} was recorded")

    def reconcile(
        self,
        stripe: BillingPort | None,
        workspace_id: UUID,
        month: str,
        *,
        fold: MonthFold,
        read_model_lines: Sequence[Line],
    ) -> Reconciliation:
        """The month of one workspace by the log, against the read model, our invoice record and
        (when ``stripe`` is given) what Stripe holds."""
        workspace = self.workspace(workspace_id)
        try:
            invoice_id = invoice_id_for(workspace_id, month)
            invoice: Invoice | None = self.app.aggregate(Invoice, invoice_id)
        except NotFound:
            invoice = None
        # A drafted month is billed at the increment it was drafted with, whatever the plan
        # says since: what Stripe holds was rounded to it.
        increment = (
            invoice.billing_increment_micros
            if invoice is not None and invoice.billing_increment_micros is not None
            else workspace.billing_increment_micros
        )
        log_lines = fold.lines(workspace_id, increment_micros=increment)
        issued = invoice.stripe_invoice_id if invoice is not None else None
        remote = None
        if stripe is not None and issued is not None and workspace.stripe_customer_id:
            remote = stripe.find_invoice(
                workspace.stripe_customer_id, invoice_key(workspace_id, month)
            )
        return reconcile(
            workspace_id=workspace_id,
            month=month,
            log_lines=log_lines,
            read_model_lines=read_model_lines,
            invoice_lines=invoice.lines if invoice is not None else None,
            issued_invoice_id=issued if stripe is not None else None,
            remote=remote,
            recorded_status=invoice.status if invoice is not None else None,
            expect_invoice=stripe is not None and has_ended(month, self.clock()),
        )

    def workspace_ids(self) -> list[UUID]:
        """Every workspace, in creation order, as the log knows them."""
        return [
            UUID(str(notification.originator_id))
            for notification in _notifications(self.app, [_WORKSPACE_CREATED])
        ]

    def _drafted(self, workspace: Workspace, month: str, fold: MonthFold | None) -> Invoice:
        """The invoice as first drafted; its lines are recorded once and never recomputed."""
        invoice_id = invoice_id_for(workspace.id, month)
        try:
            return self.app.aggregate(Invoice, invoice_id)
        except NotFound:
            pass
        # The month is closed: from now on the log holds every figure of it.
        fold = fold_month(self.app, month) if fold is None else fold
        figures = fold.workspaces.get(workspace.id)
        names = {
            project: name
            for project in (figures.usage if figures else {})
            if (name := self._project_name(project)) is not None
        }
        lines = fold.lines(
            workspace.id,
            increment_micros=workspace.billing_increment_micros,
            project_names=names,
        )
        invoice = Invoice.draft(
            workspace_id=workspace.id,
            month=month,
            lines=lines,
            increment_micros=workspace.billing_increment_micros,
            meta=self._meta(workspace.id),
        )
        if self._saved(invoice):
            return invoice
        # Drafted by a concurrent run (found now), or not written at all (drafted again).
        return self._drafted(workspace, month, fold)

    def _project_name(self, project_id: UUID) -> str | None:
        try:
            return self.app.aggregate(Project, project_id, copy=False).name
        except NotFound:
            return None

    def _customer(self, stripe: BillingPort, workspace: Workspace) -> str:
        if workspace.stripe_customer_id is not None:
            return workspace.stripe_customer_id
        customer = stripe.find_customer(workspace.id) or stripe.create_customer(
            workspace.id, workspace.name
        )
        with _after_latest(workspace):
            workspace.link_stripe_customer(customer, meta=self._meta(workspace.id))
        self._save(workspace)
        return customer

    def _result(self, invoice: Invoice, outcome: Outcome) -> InvoiceResult:
        return InvoiceResult(
            workspace_id=invoice.workspace_id,
            outcome=outcome,
            stripe_invoice_id=invoice.stripe_invoice_id,
            total_micros=invoice.total_micros,
            lines=len(invoice.lines),
        )

    def _meta(self, workspace_id: UUID) -> EventMeta:
        return EventMeta.for_command(workspace_id=workspace_id, actor=BILLING_ACTOR)

    def _saved(self, aggregate: Aggregate) -> bool:
        """Save; ``False`` when nothing was written (a concurrent write got there first, or an
        interrupted commit did not land): the caller reloads and decides again.

        A connection lost during COMMIT is settled as the write side settles its own writes
        (``WriteSide.commit_settled``): the store is asked whether the transaction committed.
        It is raised on as UNAVAILABLE (``outcome="unknown"``) only when the store cannot tell:
        answered as a failure, a month closed or an invoice issued was done again or left
        half-recorded by the operator's next run."""
        try:
            self.app.save(aggregate)
        except Conflict:
            return False
        except Unavailable as unknown:
            settled = (
                self.app.commit_settled(unknown, [aggregate])
                if unknown.outcome == "unknown"
                else None
            )
            if settled is None:
                raise
            return settled
        return True

    def _save(self, aggregate: Aggregate) -> None:
        if not self._saved(aggregate):
            raise Conflict(
                f"{type(aggregate).__name__} {aggregate.id} changed while it was being invoiced;"
                " run the command again"
            )
