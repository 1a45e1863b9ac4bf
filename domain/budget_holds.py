"""The budget-hold decision: may a call start, and how much may it hold while it runs.

Pure, so that every store of holds (in-process, Redis) decides the same way; see
``orchestrator.holds`` for why calls hold budget at all. Also the shapes spend checks read and
the billing projector reports, shared by the stores, the readers and the projector.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Protocol
from uuid import UUID


@dataclass(frozen=True, kw_only=True)
class HoldRequest:
    """One call asking to hold budget before it starts (all amounts billed micro-USD).

    ``hold_id`` names the hold: the id the call's charge will have, so that whoever counts the
    charge (the billing projector) can tell which hold it replaces. ``spent`` is the month's
    usage as a spend reader saw it (a lower bound: usage only grows within a month), and
    ``counted`` the settled holds that reading already includes, which a store drops rather than
    count twice. ``written`` is the month's usage as the write side's ``MonthlySpend`` holds it
    (every charge written, counted or not; 0 when not read). ``limit`` is the workspace's
    monthly limit and ``run_room`` what the run's own ``maxCost`` leaves, ``None`` for no limit.
    ``floor`` is the least the call can cost (its prompt alone); ``want`` what it could cost at
    most.
    """

    workspace_id: UUID
    month: str
    hold_id: UUID
    want: int
    floor: int
    spent: int
    limit: int | None
    run_room: int | None
    counted: frozenset[UUID] = field(default_factory=frozenset)
    written: int = 0


@dataclass(frozen=True)
class Hold:
    """``granted``: micro-USD held for the call, ``None`` when it may not start; ``room``: what
    the call may spend before it must stop (``None``: no limit applies)."""

    granted: int | None
    room: int | None


def decide_hold(
    request: HoldRequest,
    held_elsewhere: int,
    *,
    spent: int | None = None,
    settled_elsewhere: int = 0,
) -> Hold:
    """Whether a call may start, and what it holds, given what other calls hold this month.

    ``spent``: the month's usage when a store knows more than the request's reading (a later
    one); the larger of the two is the truer, since usage only grows.

    ``settled_elsewhere``: the part of ``held_elsewhere`` that settled holds keep, for charges
    already written. The write model counts those charges too, so the month has spent at least
    ``request.written`` less them. That floor is what keeps the limit when the reading falls
    behind by longer than a settled hold lives (the billing projector stopped): its hold lapses
    uncounted, and the charge is still in ``written``. While the reading keeps up the floor is
    at most the reading and changes nothing, but for the moment between a charge being written
    and its hold being settled: the charge is then in the floor and in its hold both, which
    holds back one call's amount more for that moment, never less."""
    month_spent = request.spent if spent is None else max(spent, request.spent)
    month_spent = max(month_spent, request.written - settled_elsewhere)
    rooms: list[int] = []
    if request.limit is not None:
        rooms.append(request.limit - month_spent - held_elsewhere)
    if request.run_room is not None:
        rooms.append(request.run_room)
    if not rooms:
        return Hold(granted=request.want, room=None)
    room = min(rooms)
    if request.floor > room:
        return Hold(granted=None, room=room)
    return Hold(granted=min(request.want, room), room=room)


@dataclass(frozen=True)
class SpendReading:
    """A workspace-month's usage (billed micro-USD of its charges, never lowered by credits),
    and which of the asked-about charges it already includes."""

    spent: int
    counted: frozenset[UUID] = frozenset()


class SpendReader(Protocol):
    """Where spend checks read a month's usage: the Redis counter the billing projector feeds,
    the billing read model, or (a write side built without a read side) the write model.

    ``pending``: charges whose holds are still kept; the reading says which it counts."""

    def read(
        self, workspace_id: UUID, month: str, pending: Collection[UUID] = ()
    ) -> SpendReading: ...

    def close(self) -> None:
        """Release what the reader itself opened (a Redis connection); a pool it was given
        stays its owner's. The write side closes its reader when it closes."""


@dataclass(frozen=True)
class CountedSpend:
    """What one billing-projector commit made true of a workspace-month: its usage is now
    ``charged_micros`` (the absolute value, so feeding it twice or late changes nothing), and
    these charges are counted in it. ``charges`` pairs each charge id with the month its call
    started in, which is where its hold was taken."""

    workspace_id: UUID
    month: str
    charged_micros: int
    charges: tuple[tuple[str, UUID], ...] = ()
