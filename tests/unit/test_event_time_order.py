"""Charges, their corrections and the month's spend carry times callers name (a call's start,
a correction's ``at``, a credit's): whatever times arrive, what is accepted keeps each
aggregate's events in time order and each month's records in or after their month.

Histories, audit exports, ``asOf`` reads and statements by month read events by time: a refund
dated before its charge, a charge dated after it was recorded or billed in a month before its
own, or a month's spend recording a charge before the month began, each misplaced money in them.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import suppress
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from aw_builders import World
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from commands import models as m
from commands.billing import Billing, GrantCredit
from commands.handlers import Actor
from domain.errors import AgentWorksError
from domain.months import month_of, month_start
from domain.usage import MonthlySpend, UsageCharge

#: Offsets from now, in minutes: up to ~4 months back, and some in the future.
_OFFSETS = st.integers(-60 * 24 * 45, 60 * 24 * 120)

operations = st.lists(
    st.one_of(
        st.tuples(st.just("call"), _OFFSETS),
        st.tuples(st.just("correct"), st.integers(0, 50), _OFFSETS, st.booleans()),
        st.tuples(st.just("credit"), _OFFSETS),
        st.tuples(st.just("close"), st.integers(1, 4)),
    ),
    max_size=12,
)


def _ago(minutes: int) -> datetime:
    return datetime.now(UTC) - timedelta(minutes=minutes)


class _Tenant:
    """A workspace whose operations are sent as commands; refusals write nothing."""

    def __init__(self) -> None:
        self.world = World.build()
        self.run_id = self.world.run(begin=True)
        self.charges: list[UUID] = []
        self.billing = Billing(self.world.app)

    def call(self, minutes: int) -> None:
        result = self.world.llm_call(self.run_id, cost=10_000, at=_ago(minutes))
        self.charges.append(UUID(result.extra["charge_id"]))

    def correct(self, which: int, minutes: int, refund: bool) -> None:
        if self.charges:
            cmd = m.CreditCharge(
                charge_id=self.charges[which % len(self.charges)],
                amount="0.001",
                reason="goodwill",
                refund=refund,
                at=_ago(minutes),
            )
            self.world.app.credit_charge(cmd, self.world.owner)

    def credit(self, minutes: int) -> None:
        cmd = GrantCredit(
            workspace_id=self.world.workspace_id, amount="0.01", reason="outage", at=_ago(minutes)
        )
        self.billing.grant_credit(cmd, Actor.service("billing", self.world.workspace_id))

    def close(self, months_back: int) -> None:
        start = month_start(month_of(datetime.now(UTC)))
        for _ in range(months_back):
            start = month_start(month_of(start - timedelta(days=1)))
        self.billing.close_month(self.world.workspace_id, month_of(start))

    def apply(self, operation: tuple[Any, ...]) -> None:
        with suppress(AgentWorksError):  # refused: nothing written
            getattr(self, operation[0])(*operation[1:])

    def events(self) -> dict[UUID, list[Any]]:
        """Every stored event, by aggregate, in version order."""
        app = self.world.app
        found: dict[UUID, list[Any]] = defaultdict(list)
        for notification in app.recorder.select_notifications(start=1, limit=100_000):
            event = app.mapper.to_domain_event(notification)
            found[event.originator_id].append(event)
        for events in found.values():
            events.sort(key=lambda event: event.originator_version)
        return found


@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow])
@given(operations)
def test_accepted_times_keep_every_aggregate_in_time_order(ops: list[tuple[Any, ...]]) -> None:
    tenant = _Tenant()
    for operation in ops:
        tenant.apply(operation)
    done = datetime.now(UTC)
    charge_month: dict[UUID, str] = {}
    for events in tenant.events().values():
        times = [event.timestamp for event in events]
        assert times == sorted(times), [type(event).__qualname__ for event in events]
        assert times[-1] <= done  # nothing is dated after it was recorded
        first = events[0]
        if isinstance(first, MonthlySpend.Opened):
            assert times[0] >= month_start(first.month)  # nothing before the month begins
        for event in events:
            if isinstance(event, UsageCharge.Charged | UsageCharge.Credited | UsageCharge.Refunded):
                # Billed in its own month, or a later one (late usage), never an earlier one.
                assert event.month >= month_of(event.timestamp)
                assert event.month >= charge_month.setdefault(event.originator_id, event.month)
