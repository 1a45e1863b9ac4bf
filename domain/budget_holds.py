"""The budget-hold decision: may a call start, and how much may it hold while it runs.

Pure, so that every store of holds (in-process, Redis) decides the same way; see
``orchestrator.holds`` for why calls hold budget at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from uuid import UUID


@dataclass(frozen=True, kw_only=True)
class HoldRequest:
    """One call asking to hold budget before it starts (all amounts billed micro-USD).

    ``spent`` is the month's spend as the write model holds it (exact: charges update it in
    their own transaction); ``limit`` is the workspace's monthly limit and ``run_room`` what the
    run's own ``maxCost`` leaves, ``None`` for no limit. ``floor`` is the least the call can
    cost (its prompt alone); ``want`` what it could cost at most.
    """

    workspace_id: UUID
    month: str
    run_id: UUID
    want: int
    floor: int
    spent: int
    limit: int | None
    run_room: int | None


@dataclass(frozen=True)
class Hold:
    """``granted``: micro-USD held for the call, ``None`` when it may not start; ``room``: what
    the call may spend before it must stop (``None``: no limit applies)."""

    granted: int | None
    room: int | None


def decide_hold(request: HoldRequest, held_elsewhere: int) -> Hold:
    """Whether a call may start, and what it holds, given what other calls hold this month."""
    rooms: list[int] = []
    if request.limit is not None:
        rooms.append(request.limit - request.spent - held_elsewhere)
    if request.run_room is not None:
        rooms.append(request.run_room)
    if not rooms:
        return Hold(granted=request.want, room=None)
    room = min(rooms)
    if request.floor > room:
        return Hold(granted=None, room=room)
    return Hold(granted=min(request.want, room), room=room)
