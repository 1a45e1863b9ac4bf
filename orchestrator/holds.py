"""Budget holds: what calls in flight, and charges not yet counted, may still spend.

A call's cost is known only when its usage block arrives, so each call first *holds* what it
could cost (its prompt plus ``max_tokens`` of output, billed) against its workspace's month.
Spend checks read the month's usage from the Redis counter or the billing read model, both fed
by the billing projector and so behind the log: once the call's charge is written, its hold is
*settled* to the amount billed and kept until the usage that checks read counts the charge.
The billing projector's Redis script drops the holds of the charges it counts, in the same step
that raises the counter; in-process holds are dropped by the first reading that includes their
charge. A hold is released at once only when its call charged nothing. So whatever a check
reads, every charge is counted once (in the usage or as a hold), and concurrent calls never
together overshoot the month by more than one call's estimate.

A settled hold still lapses, so that one no reader ever counts does not shrink the month for
ever. Its charge stays counted all the same: each request also carries the write model's usage
(``MonthlySpend``, which counts every charge written), and the month counts as spent at least
that much, less what settled holds keep for the same charges.

The decision is one pure function (``domain.budget_holds.decide_hold``); where the holds are
kept decides who shares them — :class:`LocalHolds` (one orchestrator process) or
``adapters.budget_holds``'s Redis store (every orchestrator that points at that Redis).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol
from uuid import UUID

from domain.budget_holds import Hold, HoldRequest, decide_hold

if TYPE_CHECKING:
    from collections.abc import Callable


class BudgetHolds(Protocol):
    """Where holds are kept. ``hold`` decides and records atomically, so two calls never both
    take the same room; a hold lapses after ``ttl`` seconds so a dead process's holds (or a
    charge no reader ever counts) do not shrink the month for ever."""

    async def hold(self, request: HoldRequest, *, ttl: float) -> Hold: ...

    async def settle(
        self, workspace_id: UUID, month: str, hold_id: UUID, *, billed: int, ttl: float
    ) -> None:
        """The hold's charge is written, billed ``billed``: hold that much until the charge is
        counted (a hold already dropped as counted stays dropped)."""
        ...

    async def release(self, workspace_id: UUID, month: str, hold_id: UUID) -> None:
        """The hold's call charged nothing."""
        ...

    async def aclose(self) -> None: ...


@dataclass
class _Held:
    amount: int
    until: float
    settled: bool = False


class LocalHolds:
    """Holds of one process: right when a single orchestrator serves the workspace.

    A settled hold is dropped by the first request whose reading counts its charge. Readings
    are taken before the lock, so two requests may bring them out of order; the month's usage
    only grows, so the highest reading seen is kept and used, and a hold dropped by a newer
    reading is never missing from an older one's decision."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._held: dict[tuple[UUID, str], dict[UUID, _Held]] = {}
        self._seen: dict[tuple[UUID, str], int] = {}

    async def hold(self, request: HoldRequest, *, ttl: float) -> Hold:
        now = self._clock()
        key = (request.workspace_id, request.month)
        with self._lock:
            month = self._held.setdefault(key, {})
            for hold_id, held in list(month.items()):
                if held.until <= now or (held.settled and hold_id in request.counted):
                    del month[hold_id]
            spent = max(self._seen.get(key, 0), request.spent)
            self._seen[key] = spent
            others = [held for hold_id, held in month.items() if hold_id != request.hold_id]
            decided = decide_hold(
                request,
                sum(held.amount for held in others),
                spent=spent,
                settled_elsewhere=sum(held.amount for held in others if held.settled),
            )
            if decided.granted is not None:
                month[request.hold_id] = _Held(decided.granted, now + ttl)
            elif not month:
                del self._held[key]
            return decided

    async def settle(
        self, workspace_id: UUID, month: str, hold_id: UUID, *, billed: int, ttl: float
    ) -> None:
        with self._lock:
            held = self._held.get((workspace_id, month), {}).get(hold_id)
            if held is not None:
                held.amount, held.until, held.settled = billed, self._clock() + ttl, True

    async def release(self, workspace_id: UUID, month: str, hold_id: UUID) -> None:
        with self._lock:
            held = self._held.get((workspace_id, month))
            if held is not None:
                held.pop(hold_id, None)
                if not held:
                    del self._held[(workspace_id, month)]

    def settled(self, workspace_id: UUID, month: str) -> frozenset[UUID]:
        """The holds of the month whose charges are written but not yet seen counted: what a
        spend reading is asked about."""
        with self._lock:
            month_holds = self._held.get((workspace_id, month), {})
            return frozenset(hold_id for hold_id, held in month_holds.items() if held.settled)

    def outstanding(
        self, workspace_id: UUID, month: str, counted: frozenset[UUID]
    ) -> tuple[int, int]:
        """What this process holds for the month that a reading with ``counted`` does not
        count: calls under way, and charges written but not among ``counted``; and of that, what
        the written charges hold. What a shared store, which never saw these holds, must leave
        aside (the charges also out of the write model's usage it is told)."""
        now = self._clock()
        with self._lock:
            month_holds = self._held.get((workspace_id, month), {})
            kept = [
                held
                for hold_id, held in month_holds.items()
                if held.until > now and not (held.settled and hold_id in counted)
            ]
            return sum(held.amount for held in kept), sum(h.amount for h in kept if h.settled)

    def held(self, workspace_id: UUID, month: str) -> int:
        """What this process holds for the month now (for tests and metrics)."""
        now = self._clock()
        with self._lock:
            month_holds = self._held.get((workspace_id, month), {})
            return sum(held.amount for held in month_holds.values() if held.until > now)

    async def aclose(self) -> None:
        return None
