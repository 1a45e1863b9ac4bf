"""Billing months, statements and invoices: the pure rules and the ``Invoice`` aggregate.

A statement is a list of lines, each rounded up to the workspace's billing increment on its own
(``round_up_to_increment``), and its total is the sum of those rounded lines, so an invoice asks
for exactly what its lines show. A month is billed once it is closed (``MonthlySpend.Closed``):
usage recorded later for a closed month is billed in the next open month, and an invoice records
the lines it was drafted from before anything is sent, so a re-run sends those lines again and
never recomputes them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any, ClassVar, Final
from uuid import NAMESPACE_URL, UUID, uuid5

from domain.base import TenantAggregate
from domain.errors import InvalidTransition, ValidationFailed
from domain.meta import EventMeta
from domain.money import format_usd, round_up_to_increment
from domain.months import month_end, month_of, month_start, next_month, parse_month
from domain.usage import MonthlySpend, UsageCharge, spend_id_for

_INVOICES = uuid5(NAMESPACE_URL, "https://agentworks.dev/ns/invoice")
MICROS_PER_CENT: Final[int] = 10_000


# -- months -------------------------------------------------------------------------------------


def require_not_future(month: str, now: datetime) -> str:
    """``month`` unless it starts after ``now``: nothing can be billed or reconciled there yet."""
    if month_start(month) > now:
        raise ValidationFailed(f"month {month} is in the future")
    return month


def has_ended(month: str, now: datetime) -> bool:
    return month_end(month) <= now


def require_ended(month: str, now: datetime) -> str:
    """``month`` if it is over at ``now``; only an ended month can be closed and invoiced."""
    require_not_future(month, now)
    if not has_ended(month, now):
        raise ValidationFailed(
            f"month {month} has not ended yet; it can be invoiced from "
            f"{next_month(month)}-01 00:00 UTC"
        )
    return month


# -- statement lines ----------------------------------------------------------------------------


class LineKind(StrEnum):
    USAGE = "usage"
    CREDIT = "credit"


@dataclass(frozen=True, kw_only=True)
class Line:
    """One statement (and invoice) line: exact net amount and the amount billed for it.

    ``key`` is stable across re-runs (``usage:<project>``, ``credit:<credit id>``): it is what an
    invoice item is looked up by in Stripe's metadata.
    """

    key: str
    kind: LineKind
    ref_id: UUID
    description: str
    exact_micros: int
    billed_micros: int

    def as_payload(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "kind": self.kind.value,
            "ref_id": str(self.ref_id),
            "description": self.description,
            "exact_micros": self.exact_micros,
            "billed_micros": self.billed_micros,
        }

    @classmethod
    def from_payload(cls, data: Mapping[str, Any]) -> Line:
        return cls(
            key=str(data["key"]),
            kind=LineKind(data["kind"]),
            ref_id=UUID(str(data["ref_id"])),
            description=str(data["description"]),
            exact_micros=int(data["exact_micros"]),
            billed_micros=int(data["billed_micros"]),
        )


@dataclass(frozen=True, kw_only=True)
class Credit:
    credit_id: UUID
    amount_micros: int
    reason: str


def usage_line(
    project_id: UUID,
    exact_micros: int,
    *,
    month: str,
    project_name: str | None,
    increment_micros: int,
    late_micros: int = 0,
) -> Line:
    """A project's line; usage of an earlier, already closed month is named in it."""
    name = project_name if project_name is not None else f"project {project_id}"
    description = f"Agent usage, {month}: {name}"
    if late_micros:
        description += f" (includes {format_usd(late_micros)} of late usage from earlier months)"
    return Line(
        key=f"usage:{project_id}",
        kind=LineKind.USAGE,
        ref_id=project_id,
        description=description,
        exact_micros=exact_micros,
        billed_micros=round_up_to_increment(exact_micros, increment_micros),
    )


def credit_line(credit: Credit, *, increment_micros: int) -> Line:
    """A credit as a negative line, rounded by the same one rule as every other line."""
    return Line(
        key=f"credit:{credit.credit_id}",
        kind=LineKind.CREDIT,
        ref_id=credit.credit_id,
        description=f"Credit: {credit.reason}",
        exact_micros=-credit.amount_micros,
        billed_micros=round_up_to_increment(-credit.amount_micros, increment_micros),
    )


def statement_lines(
    usage_by_project: Mapping[UUID, int],
    credits: Sequence[Credit],
    *,
    month: str,
    increment_micros: int,
    project_names: Mapping[UUID, str] | None = None,
    late_by_project: Mapping[UUID, int] | None = None,
) -> list[Line]:
    """Every line of a month's statement: projects (by id), then credits, in a stable order."""
    names = project_names or {}
    late = late_by_project or {}
    lines = [
        usage_line(
            project,
            usage_by_project[project],
            month=month,
            project_name=names.get(project),
            increment_micros=increment_micros,
            late_micros=late.get(project, 0),
        )
        for project in sorted(usage_by_project, key=str)
    ]
    lines += [credit_line(c, increment_micros=increment_micros) for c in credits]
    return lines


def statement_total(lines: Sequence[Line]) -> int:
    return sum(line.billed_micros for line in lines)


def whole_cents(micros: int) -> int:
    """``micros`` in cents, for Stripe, which takes integer cents; refuses a fraction of a cent."""
    cents, rest = divmod(micros, MICROS_PER_CENT)
    if rest:
        raise ValidationFailed(
            f"{format_usd(micros)} is not a whole number of cents; the billing increment must be "
            "a multiple of $0.01 to be invoiced"
        )
    return cents


# -- the invoice aggregate ----------------------------------------------------------------------


def invoice_key(workspace_id: UUID, month: str) -> str:
    """What Stripe objects of one invoice carry in their metadata, to be found again."""
    return f"{workspace_id}:{month}"


@dataclass(frozen=True, kw_only=True)
class RemoteItem:
    """An invoice item as the payment provider holds it."""

    id: str
    line_key: str
    amount_cents: int
    invoice_key: str | None = None


@dataclass(frozen=True, kw_only=True)
class RemoteInvoice:
    """An invoice as the payment provider holds it, with its items."""

    id: str
    status: str
    items: list[RemoteItem]

    @property
    def total_cents(self) -> int:
        return sum(item.amount_cents for item in self.items)


def invoice_id_for(workspace_id: UUID, month: str) -> UUID:
    return uuid5(_INVOICES, f"{workspace_id}:{month}")


class InvoiceStatus(StrEnum):
    DRAFTED = "drafted"
    OPEN = "open"
    PAID = "paid"
    VOID = "void"


class _Settlement(TenantAggregate.Event):
    """What paying and voiding an invoice share: Stripe's word, which ``outcome`` each names (the
    aggregate's events are its nested classes, so this base stays outside)."""

    outcome: ClassVar[InvoiceStatus]
    stripe_event_id: str

    def apply(self, aggregate: Invoice) -> None:
        aggregate.status = self.outcome
        aggregate.stripe_events.add(self.stripe_event_id)


class Invoice(TenantAggregate):
    """One workspace's invoice for one month, and every Stripe object made for it.

    Each Stripe call's result is recorded as an event right after the call, and each call is
    preceded by a look-up of the object by its metadata, so a crash between two calls is healed
    by a re-run: what Stripe already holds is found and recorded, never created twice.
    """

    if TYPE_CHECKING:
        month: str
        lines: tuple[Line, ...]
        total_micros: int
        billing_increment_micros: int | None
        items: dict[str, str]
        stripe_invoice_id: str | None
        status: InvoiceStatus
        stripe_events: set[str]

    class Drafted(TenantAggregate.Created):
        """``billing_increment_micros``: the increment the lines were rounded to (the month's,
        whatever the plan says later); ``None`` in invoices drafted before it was recorded."""

        month: str
        lines: list[dict[str, Any]]
        total_micros: int
        billing_increment_micros: int | None = None

        def apply(self, aggregate: Invoice) -> None:
            aggregate.workspace_id = self.workspace_id
            aggregate.month = self.month
            aggregate.lines = tuple(Line.from_payload(line) for line in self.lines)
            aggregate.total_micros = self.total_micros
            aggregate.billing_increment_micros = self.billing_increment_micros
            aggregate.items = {}
            aggregate.stripe_invoice_id = None
            aggregate.status = InvoiceStatus.DRAFTED
            aggregate.stripe_events = set()

    class ItemSent(TenantAggregate.Event):
        line_key: str
        stripe_item_id: str

        def apply(self, aggregate: Invoice) -> None:
            aggregate.items[self.line_key] = self.stripe_item_id

    class Issued(TenantAggregate.Event):
        """InvoiceIssued: Stripe holds the invoice with every item of the drafted lines."""

        stripe_invoice_id: str
        total_cents: int

        def apply(self, aggregate: Invoice) -> None:
            aggregate.stripe_invoice_id = self.stripe_invoice_id
            aggregate.status = InvoiceStatus.OPEN

    class Paid(_Settlement):
        outcome = InvoiceStatus.PAID

    class Voided(_Settlement):
        outcome = InvoiceStatus.VOID

    @classmethod
    def draft(
        cls,
        *,
        workspace_id: UUID,
        month: str,
        lines: Sequence[Line],
        increment_micros: int,
        meta: EventMeta,
    ) -> Invoice:
        """The invoice of ``lines``, rounded to ``increment_micros``: the increment the month
        is billed at from now on (statements and reconciliation round its lines to it)."""
        for line in lines:
            whole_cents(line.billed_micros)
        return cls._create(
            cls.Drafted,
            id=invoice_id_for(workspace_id, month),
            workspace_id=workspace_id,
            month=parse_month(month),
            lines=[line.as_payload() for line in lines],
            total_micros=statement_total(lines),
            billing_increment_micros=increment_micros,
            meta=meta.as_dict(),
        )

    def billable_lines(self) -> tuple[Line, ...]:
        """Lines that become invoice items: a line rounded to zero asks for nothing."""
        return tuple(line for line in self.lines if line.billed_micros != 0)

    def item_sent(self, line_key: str, stripe_item_id: str, *, meta: EventMeta) -> None:
        if line_key in self.items:
            return
        if line_key not in {line.key for line in self.lines}:
            raise InvalidTransition(f"invoice {self.id} has no line {line_key!r}")
        self._record(self.ItemSent, meta, line_key=line_key, stripe_item_id=stripe_item_id)

    def issue(self, stripe_invoice_id: str, *, meta: EventMeta) -> None:
        if self.stripe_invoice_id is not None:
            return
        missing = [line.key for line in self.billable_lines() if line.key not in self.items]
        if missing:
            raise InvalidTransition(
                f"invoice {self.id} cannot be issued before its items {', '.join(missing)}"
            )
        self._record(
            self.Issued,
            meta,
            stripe_invoice_id=stripe_invoice_id,
            total_cents=whole_cents(self.total_micros),
        )

    def settle(self, outcome: InvoiceStatus, stripe_event_id: str, *, meta: EventMeta) -> bool:
        """Record Stripe's word that the invoice was paid or voided; ``False`` for a replay."""
        if stripe_event_id in self.stripe_events:
            return False
        if self.stripe_invoice_id is None:
            raise InvalidTransition(f"invoice {self.id} was never issued")
        event = {InvoiceStatus.PAID: self.Paid, InvoiceStatus.VOID: self.Voided}.get(outcome)
        if event is None:
            raise ValidationFailed(f"an invoice is settled as paid or void, not {outcome}")
        self._record(event, meta, stripe_event_id=stripe_event_id)
        return True


# -- the month as the event log tells it -----------------------------------------------------------


@dataclass
class WorkspaceMonth:
    """One workspace's month folded from the log: net billed per project, late part, credits."""

    usage: dict[UUID, int]
    late: dict[UUID, int]
    credits: list[Credit]


class MonthFold:
    """Folds ``UsageCharge`` and ``MonthlySpend`` events, in log order, into one month's figures
    for every workspace: the independent recomputation that statements and reconciliation rest on.

    A correction names no project, so it is filed under its charge's project (whatever month the
    charge was billed in), in the month the correction carries.
    """

    FOLDS: ClassVar[tuple[type[TenantAggregate.Event], ...]] = (
        UsageCharge.Charged,
        UsageCharge.Credited,
        UsageCharge.Refunded,
        MonthlySpend.CreditGranted,
    )
    """The events :meth:`add` folds: what every reader of the log selects for a month."""

    def __init__(self, month: str) -> None:
        self.month = parse_month(month)
        self.workspaces: dict[UUID, WorkspaceMonth] = {}
        self._project_of: dict[UUID, UUID] = {}
        self.events = 0
        """Events folded: every billing event of the log, or only the rows that can touch the
        month where the log is read filtered by month."""

    def _of(self, workspace_id: UUID) -> WorkspaceMonth:
        found = self.workspaces.get(workspace_id)
        if found is None:
            found = self.workspaces[workspace_id] = WorkspaceMonth({}, {}, [])
        return found

    def add(self, event: object) -> None:
        """Fold one event as the write side's mapper decodes it (any event: others only count).

        Each event's fields are read only where today's rule needs them, in this order, so a
        malformed event fails here exactly where it always did.
        """
        self.events += 1
        if isinstance(event, UsageCharge.Charged):
            self.charge(event.originator_id, event.project_id)
            if event.month == self.month:
                self.bill(
                    event.workspace_id,
                    event.project_id,
                    event.billed_micros,
                    late=month_of(event.timestamp) != event.month,
                )
        elif isinstance(event, UsageCharge.Credited | UsageCharge.Refunded):
            if event.month == self.month:
                self.correct(event.originator_id, event.meta, event.amount_micros)
        elif isinstance(event, MonthlySpend.CreditGranted):
            workspace_id = UUID(str(event.meta["workspace_id"]))
            if event.originator_id == spend_id_for(workspace_id, self.month):
                self._of(workspace_id).credits.append(
                    Credit(
                        credit_id=event.credit_id,
                        amount_micros=event.amount_micros,
                        reason=event.reason,
                    )
                )

    # The steps of ``add`` for usage charges, also taken by readers of the log that decode only
    # the fields the fold needs (``adapters.billing_log``); they do not count ``events``.

    def charge(self, charge_id: UUID, project_id: UUID) -> None:
        """A charge of any month: its project is where its corrections are filed."""
        self._project_of[charge_id] = project_id

    def knows_charge(self, charge_id: UUID) -> bool:
        return charge_id in self._project_of

    def bill(self, workspace_id: UUID, project_id: UUID, billed_micros: int, *, late: bool) -> None:
        """A charge of this month (``late``: recorded for a month that was closed by then)."""
        figures = self._of(workspace_id)
        figures.usage[project_id] = figures.usage.get(project_id, 0) + billed_micros
        if late:
            figures.late[project_id] = figures.late.get(project_id, 0) + billed_micros

    def correct(self, charge_id: UUID, meta: Mapping[str, object], amount_micros: int) -> None:
        """A credit or refund of this month of charge ``charge_id``, whose event's metadata is
        ``meta``: filed under the charge's project."""
        corrected = self._project_of.get(charge_id)
        if corrected is None:
            raise InvalidTransition(f"usage charge {charge_id} is corrected but never charged")
        workspace_id = UUID(str(meta["workspace_id"]))
        figures = self._of(workspace_id)
        figures.usage[corrected] = figures.usage.get(corrected, 0) - amount_micros

    def lines(
        self,
        workspace_id: UUID,
        *,
        increment_micros: int,
        project_names: Mapping[UUID, str] | None = None,
    ) -> list[Line]:
        figures = self.workspaces.get(workspace_id, WorkspaceMonth({}, {}, []))
        return statement_lines(
            figures.usage,
            figures.credits,
            month=self.month,
            increment_micros=increment_micros,
            project_names=project_names,
            late_by_project=figures.late,
        )


# -- reconciliation -------------------------------------------------------------------------------


class DiscrepancyKind(StrEnum):
    READ_MODEL_LINE = "readModelLine"
    """A statement line of the read model differs from the log's (exact amounts)."""
    INVOICE_LINE = "invoiceLine"
    """The lines an invoice was drafted with differ from the log's (the month changed after)."""
    STRIPE_ITEM = "stripeItem"
    """What Stripe bills for a line differs from the log's rounded line."""
    STRIPE_INVOICE = "stripeInvoice"
    """An issued invoice that Stripe does not hold (or holds under another id), or that one side
    holds void and the other not: amounts are what each side will collect (0 when void). Also
    an ended month with billable lines and no invoice issued (key: the invoice key)."""


@dataclass(frozen=True, kw_only=True)
class Discrepancy:
    kind: DiscrepancyKind
    key: str
    expected_micros: int
    """What the event log says."""
    actual_micros: int


@dataclass(frozen=True, kw_only=True)
class Reconciliation:
    """Totals are exact net amounts (to the micro), except ``invoiced_total_micros``: what
    Stripe's invoice asks for, the lines rounded up."""

    workspace_id: UUID
    month: str
    event_log_total_micros: int
    read_model_total_micros: int
    invoiced_total_micros: int | None
    discrepancies: list[Discrepancy]

    @property
    def ok(self) -> bool:
        return not self.discrepancies


def _differences(
    kind: DiscrepancyKind, expected: Mapping[str, int], actual: Mapping[str, int]
) -> list[Discrepancy]:
    return [
        Discrepancy(
            kind=kind,
            key=key,
            expected_micros=expected.get(key, 0),
            actual_micros=actual.get(key, 0),
        )
        for key in sorted(set(expected) | set(actual))
        if expected.get(key, 0) != actual.get(key, 0)
    ]


def reconcile(
    *,
    workspace_id: UUID,
    month: str,
    log_lines: Sequence[Line],
    read_model_lines: Sequence[Line],
    invoice_lines: Sequence[Line] | None,
    issued_invoice_id: str | None,
    remote: RemoteInvoice | None,
    recorded_status: InvoiceStatus | None = None,
    expect_invoice: bool = False,
) -> Reconciliation:
    """Every way the read model, our invoice record and Stripe disagree with the event log.

    Lines are compared by key: exact amounts against the read model and the drafted invoice,
    billed (rounded) amounts against Stripe's items, in micros (a cent is 10,000).
    ``recorded_status``: the issued invoice's status as our log holds it; a void on one side
    only (a webhook never delivered, a void never sent) means the money is, or is not,
    collected against what the other side says. ``expect_invoice``: Stripe is compared and
    the month has ended, so its billable lines should be on an issued invoice.
    """
    exact = {line.key: line.exact_micros for line in log_lines}
    billed = {line.key: line.billed_micros for line in log_lines if line.billed_micros}
    found = _differences(
        DiscrepancyKind.READ_MODEL_LINE,
        exact,
        {line.key: line.exact_micros for line in read_model_lines},
    )
    if invoice_lines is not None:
        found += _differences(
            DiscrepancyKind.INVOICE_LINE,
            exact,
            {line.key: line.exact_micros for line in invoice_lines},
        )
    invoiced: int | None = None
    if issued_invoice_id is None and expect_invoice and billed:
        found.append(
            Discrepancy(
                kind=DiscrepancyKind.STRIPE_INVOICE,
                key=invoice_key(workspace_id, month),
                expected_micros=statement_total(log_lines),
                actual_micros=0,
            )
        )
    if issued_invoice_id is not None:
        if remote is None:
            found.append(
                Discrepancy(
                    kind=DiscrepancyKind.STRIPE_INVOICE,
                    key=issued_invoice_id,
                    expected_micros=statement_total(log_lines),
                    actual_micros=0,
                )
            )
        else:
            invoiced = remote.total_cents * MICROS_PER_CENT
            held: dict[str, int] = {}
            for item in remote.items:
                # Items of another invoice (or none of ours) are never expected here.
                mine = item.invoice_key == invoice_key(workspace_id, month)
                line = item.line_key if mine else f"{item.invoice_key}/{item.line_key}"
                held[line] = held.get(line, 0) + item.amount_cents * MICROS_PER_CENT
            found += _differences(DiscrepancyKind.STRIPE_ITEM, billed, held)
            void_here = recorded_status is InvoiceStatus.VOID
            void_there = remote.status == InvoiceStatus.VOID.value
            if remote.id != issued_invoice_id or void_here != void_there:
                found.append(
                    Discrepancy(
                        kind=DiscrepancyKind.STRIPE_INVOICE,
                        key=issued_invoice_id,
                        expected_micros=0 if void_here else statement_total(log_lines),
                        actual_micros=0 if void_there else invoiced,
                    )
                )
    return Reconciliation(
        workspace_id=workspace_id,
        month=month,
        event_log_total_micros=sum(line.exact_micros for line in log_lines),
        read_model_total_micros=sum(line.exact_micros for line in read_model_lines),
        invoiced_total_micros=invoiced,
        discrepancies=found,
    )
