"""Budget holds: what calls in flight may still spend, shared by everyone who starts calls.

A call's cost is known only when its usage block arrives, so each call first *holds* what it
could cost (its prompt plus ``max_tokens`` of output, billed) against its workspace's month and
releases the hold once its charge is written. Concurrent calls then see each other's holds: the
month is never overshot by more than one call's estimate, however many calls run at once.

The decision is one pure function (``domain.budget_holds.decide_hold``); where the holds are
kept decides who shares them — :class:`LocalHolds` (one orchestrator process) or
``adapters.budget_holds``'s Redis store (every orchestrator that points at that Redis).
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Protocol
from uuid import UUID

from domain.budget_holds import Hold, HoldRequest, decide_hold

if TYPE_CHECKING:
    from collections.abc import Callable


class BudgetHolds(Protocol):
    """Where holds are kept. ``hold`` decides and records atomically, so two calls never both
    take the same room; a hold lapses after ``ttl`` seconds so a dead process's holds do not
    shrink the month for ever."""

    async def hold(self, request: HoldRequest, *, ttl: float) -> Hold: ...

    async def release(self, workspace_id: UUID, month: str, run_id: UUID) -> None: ...

    async def aclose(self) -> None: ...


class LocalHolds:
    """Holds of one process: right when a single orchestrator serves the workspace."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._held: dict[tuple[UUID, str], dict[UUID, tuple[int, float]]] = {}

    async def hold(self, request: HoldRequest, *, ttl: float) -> Hold:
        now = self._clock()
        with self._lock:
            month = self._held.setdefault((request.workspace_id, request.month), {})
            for run_id, (_, until) in list(month.items()):
                if until <= now:
                    del month[run_id]
            elsewhere = sum(
                amount for run_id, (amount, _) in month.items() if run_id != request.run_id
            )
            decided = decide_hold(request, elsewhere)
            if decided.granted is not None:
                month[request.run_id] = (decided.granted, now + ttl)
            return decided

    async def release(self, workspace_id: UUID, month: str, run_id: UUID) -> None:
        with self._lock:
            held = self._held.get((workspace_id, month))
            if held is not None:
                held.pop(run_id, None)
                if not held:
                    del self._held[(workspace_id, month)]

    def held(self, workspace_id: UUID, month: str) -> int:
        """What this process holds for the month now (for tests and metrics)."""
        now = self._clock()
        with self._lock:
            month_holds = self._held.get((workspace_id, month), {})
            return sum(amount for amount, until in month_holds.values() if until > now)

    async def aclose(self) -> None:
        return None
