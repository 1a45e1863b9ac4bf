"""Usage charges and the monthly spend they add up to.

Each LLM call becomes exactly one :class:`UsageCharge`, whose id is derived from the run and the
call so that recording the same call twice collides in the store instead of billing twice.
Corrections are new compensating events (credit, refund), never edits.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING
from uuid import NAMESPACE_URL, UUID, uuid5

from eventsourcing.domain import Aggregate

from domain.base import StampedEvent, TenantAggregate
from domain.errors import BudgetExceeded, InvalidTransition, ValidationFailed
from domain.meta import EventMeta
from domain.money import format_usd, positive_micros
from domain.months import month_of, month_start, parse_month

_CHARGES = uuid5(NAMESPACE_URL, "https://agentworks.dev/ns/usage-charge")
_SPEND = uuid5(NAMESPACE_URL, "https://agentworks.dev/ns/monthly-spend")

#: Percentages of the monthly limit recorded once per month each (activity ``budget.threshold``).
BUDGET_THRESHOLDS = (50, 80, 100)


def charge_id_for(run_id: UUID, call_id: str) -> UUID:
    return uuid5(_CHARGES, f"{run_id}:{call_id}")


def spend_id_for(workspace_id: UUID, month: str) -> UUID:
    return uuid5(_SPEND, f"{workspace_id}:{month}")


def _already_happened(at: datetime, what: str) -> None:
    """``at`` (a time a caller names: a call's start, a correction's) is no later than the
    decision recording it: a record never precedes what it records."""
    recorded = StampedEvent.create_timestamp()
    if at > recorded:
        raise ValidationFailed(
            f"{what} is dated {at.isoformat()}, after it is recorded "
            f"({recorded.isoformat()}): a time in the future"
        )


def _billed_month(at: datetime, billed_month: str | None, what: str) -> str:
    """The month ``what`` dated ``at`` is billed in: ``at``'s own, or a later open one when
    ``at``'s is closed (late usage); never an earlier one, whose statement ended before it."""
    own = month_of(at)
    if billed_month is None:
        return own
    if parse_month(billed_month) < own:
        raise InvalidTransition(
            f"{what} dated {at.isoformat()} cannot be billed in {billed_month}, "
            f"before its own month {own}"
        )
    return billed_month


class _Correction(TenantAggregate.Event):
    """What a charge's two corrections share; each names its own (the aggregate's events are
    its nested classes, so this base stays outside)."""

    amount_micros: int
    reason: str
    month: str

    def apply(self, aggregate: UsageCharge) -> None:
        aggregate.credited_micros += self.amount_micros


class UsageCharge(TenantAggregate):
    """What one LLM call cost us and what we bill for it, plus any later corrections."""

    if TYPE_CHECKING:
        run_id: UUID
        billed_micros: int
        credited_micros: int
        month: str

    class Charged(TenantAggregate.Created):
        project_id: UUID
        card_id: UUID
        run_id: UUID
        call_id: str
        provider: str
        model: str
        input_tokens: int
        output_tokens: int
        provider_cost_micros: int
        markup: str
        billed_micros: int
        price_table_version: str
        month: str

        def apply(self, aggregate: UsageCharge) -> None:
            aggregate.workspace_id = self.workspace_id
            aggregate.run_id = self.run_id
            aggregate.billed_micros = self.billed_micros
            aggregate.credited_micros = 0
            aggregate.month = self.month

    class Credited(_Correction):
        """A compensating credit: lowers what this charge bills, by an exact amount."""

    class Refunded(_Correction):
        """Money given back after invoicing; the amount leaves the workspace's balance."""

    @classmethod
    def charge(
        cls,
        *,
        workspace_id: UUID,
        project_id: UUID,
        card_id: UUID,
        run_id: UUID,
        call_id: str,
        provider: str,
        model: str,
        input_tokens: int,
        output_tokens: int,
        provider_cost_micros: int,
        markup: Decimal,
        billed_micros: int,
        price_table_version: str,
        at: datetime,
        meta: EventMeta,
        billed_month: str | None = None,
    ) -> UsageCharge:
        """``billed_month``: the open month the charge is billed in when ``at``'s is closed.
        ``at``, the call's start, is past (VALIDATION otherwise), and ``billed_month`` is not
        before its month."""
        call = f"the call {call_id} of run {run_id}"
        month = _billed_month(at, billed_month, call)
        _already_happened(at, call)
        return cls._create(
            cls.Charged,
            id=charge_id_for(run_id, call_id),
            workspace_id=workspace_id,
            project_id=project_id,
            card_id=card_id,
            run_id=run_id,
            call_id=call_id,
            provider=provider,
            model=model,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            provider_cost_micros=provider_cost_micros,
            markup=str(markup),
            billed_micros=billed_micros,
            price_table_version=price_table_version,
            month=month,
            timestamp=at,
            meta=meta.as_dict(),
        )

    @property
    def net_micros(self) -> int:
        return self.billed_micros - self.credited_micros

    def correct(
        self,
        amount_micros: int,
        reason: str,
        *,
        refund: bool,
        at: datetime,
        meta: EventMeta,
        billed_month: str | None = None,
    ) -> None:
        """Lower what this charge bills: a credit, or a ``refund`` once it was invoiced.
        ``billed_month``: the open month the correction lands in when ``at``'s is closed.

        A charge's events are in time order, as histories, exports and statements by month
        read them: a correction is dated no earlier than the charge's latest event (its call,
        or the correction before) nor later than now, and lands in no month before the one
        the charge is billed in (refused otherwise; nothing is moved to make it fit)."""
        positive_micros(amount_micros, "a correction")
        what = f"a correction of charge {self.id}"
        month = _billed_month(at, billed_month, what)
        if at < self.modified_on:
            raise InvalidTransition(
                f"{what} is dated {at.isoformat()}, before the charge's latest event "
                f"({self.modified_on.isoformat()}); a correction follows what it corrects"
            )
        _already_happened(at, what)
        if month < self.month:
            raise InvalidTransition(
                f"{what} cannot land in {month}: the charge is billed in {self.month}"
            )
        if amount_micros > self.net_micros:
            raise InvalidTransition(
                f"charge {self.id} has {format_usd(self.net_micros)} left to correct; "
                f"{format_usd(amount_micros)} is more"
            )
        if not reason.strip():
            raise ValidationFailed(f"a correction of charge {self.id} needs a reason")
        self._record(
            self.Refunded if refund else self.Credited,
            meta,
            amount_micros=amount_micros,
            reason=reason.strip(),
            month=month,
            timestamp=at,
        )


class MonthlySpend(TenantAggregate):
    """Month-to-date billed spend of one workspace: the write side's guard for spend limits.

    Saving it with every charge serialises a workspace's charges within a month, which is what
    makes a spend limit hold when runs finish calls concurrently.
    """

    if TYPE_CHECKING:
        month: str
        spent_micros: int
        thresholds: set[int]
        closed: bool

    class Opened(TenantAggregate.Created):
        month: str

        def apply(self, aggregate: MonthlySpend) -> None:
            aggregate.workspace_id = self.workspace_id
            aggregate.month = self.month
            aggregate.spent_micros = 0
            aggregate.thresholds = set()
            aggregate.closed = False

    class ThresholdCrossed(TenantAggregate.Event):
        """The month's spend reached ``threshold`` percent of the limit (once per threshold)."""

        threshold: int
        limit_micros: int
        spent_micros: int
        month: str

        def apply(self, aggregate: MonthlySpend) -> None:
            aggregate.thresholds.add(self.threshold)

    class Added(TenantAggregate.Event):
        charge_id: UUID
        billed_micros: int

        def apply(self, aggregate: MonthlySpend) -> None:
            aggregate.spent_micros += self.billed_micros

    class Closed(TenantAggregate.Event):
        """The month takes no more charges or credits: its statement is final and can be
        invoiced. Later usage of the month is billed in the next open month."""

        def apply(self, aggregate: MonthlySpend) -> None:
            aggregate.closed = True

    class CorrectionFiled(TenantAggregate.Event):
        """A credit or refund of one of the workspace's charges lands on this month's statement.
        It leaves ``spent_micros`` alone (usage counts charges); saved with the correction, it
        orders the correction before or after the month's close, as ``Added`` orders a charge."""

        charge_id: UUID
        amount_micros: int

    class CreditGranted(TenantAggregate.Event):
        """A credit to the workspace (not to one charge): a negative line on this month's
        statement. It does not lower ``spent_micros``, which counts usage for the spend limit."""

        credit_id: UUID
        amount_micros: int
        reason: str
        month: str

    @classmethod
    def open(cls, *, workspace_id: UUID, month: str, meta: EventMeta) -> MonthlySpend:
        _month_has_begun(month, "opening")
        return cls._create(
            cls.Opened,
            id=spend_id_for(workspace_id, month),
            workspace_id=workspace_id,
            month=month,
            meta=meta.as_dict(),
        )

    def _record(
        self, event_class: type[Aggregate.Event], meta: EventMeta, **payload: object
    ) -> None:
        _month_has_begun(self.month, event_class.__name__)
        super()._record(event_class, meta, **payload)

    def add(self, charge_id: UUID, billed_micros: int, *, meta: EventMeta) -> None:
        self._record(self.Added, meta, charge_id=charge_id, billed_micros=billed_micros)

    def note_thresholds(self, limit_micros: int | None, *, meta: EventMeta) -> list[int]:
        """Record each of 50, 80 and 100 % of the limit the spend has reached for the first
        time this month; returns the thresholds recorded now. A limit of 0 is a limit (spend
        reached it, as :func:`check_month_room` says), not the absence of one."""
        crossed: list[int] = []
        if limit_micros is None:
            return crossed
        for threshold in BUDGET_THRESHOLDS:
            if threshold in self.thresholds:
                continue
            if self.spent_micros * 100 >= threshold * limit_micros:
                self._record(
                    self.ThresholdCrossed, meta, threshold=threshold, limit_micros=limit_micros,
                    spent_micros=self.spent_micros, month=self.month,
                )  # fmt: skip
                crossed.append(threshold)
        return crossed

    def file_correction(self, charge_id: UUID, amount_micros: int, *, meta: EventMeta) -> None:
        if self.closed:
            raise InvalidTransition(f"{self.month} is closed; a correction goes to an open month")
        self._record(self.CorrectionFiled, meta, charge_id=charge_id, amount_micros=amount_micros)

    def close(self, *, meta: EventMeta) -> None:
        if not self.closed:
            self._record(self.Closed, meta)

    def grant_credit(
        self, credit_id: UUID, amount_micros: int, reason: str, *, meta: EventMeta
    ) -> None:
        if self.closed:
            raise InvalidTransition(f"{self.month} is closed; a credit goes to an open month")
        positive_micros(amount_micros, "a credit")
        if not reason.strip():
            raise ValidationFailed("a credit needs a reason")
        self._record(
            self.CreditGranted,
            meta,
            credit_id=credit_id,
            amount_micros=amount_micros,
            reason=reason.strip(),
            month=self.month,
        )

    def check_room(self, limit_micros: int | None, *, wanted_micros: int = 0) -> None:
        """Refuse new spending once the month has reached the workspace's limit."""
        check_month_room(
            self.workspace_id, self.month, self.spent_micros, limit_micros,
            wanted_micros=wanted_micros,
        )  # fmt: skip


def _month_has_begun(month: str, what: str) -> None:
    """A month's spend records nothing before the month begins (a charge or credit dated in a
    month to come): its events would precede the month they add up. After its end it still
    records late recordings of its usage, until it is closed."""
    recorded = StampedEvent.create_timestamp()
    if recorded < month_start(month):
        raise ValidationFailed(
            f"the spend of {month} cannot record {what} at {recorded.isoformat()}, "
            "before the month begins"
        )


def check_month_room(
    workspace_id: UUID,
    month: str,
    spent_micros: int,
    limit_micros: int | None,
    *,
    wanted_micros: int = 0,
) -> None:
    """Refuse new spending once ``spent_micros`` (the month's usage, as whoever read it saw it)
    has reached the workspace's limit."""
    if limit_micros is None:
        return
    if spent_micros >= limit_micros or spent_micros + wanted_micros > limit_micros:
        raise BudgetExceeded(
            f"workspace {workspace_id} has spent {format_usd(spent_micros)} in "
            f"{month} of its {format_usd(limit_micros)} monthly limit"
            + (f"; {format_usd(wanted_micros)} more would exceed it" if wanted_micros else "")
        )
