"""One workspace of a given size for ``bench.scale``: the rebuild benchmark's log (real domain
events decided by the aggregates, stored through the application's mapper), but every card in
one workspace, plus one "hot" card whose many edits are spread over the whole log.

At 100,000 cards a board holds tens of thousands of cards per lane, and ``Project`` finds a
card's position by sorting its lane on every placement and move (``Project.cards_in``): fine
for the product, where one command loads one board, but quadratic over a generated log of
hundreds of thousands of moves. :func:`index_lanes` gives each generated board a per-lane sorted
index, kept by the board's own event ``apply`` methods, that answers "the last position of
this lane" in O(log n); it decides exactly the positions ``Project`` would (``verify=True``
checks every one against the aggregate's own method, which the unit test runs).
"""

from __future__ import annotations

import time
from bisect import bisect_left, insort
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from uuid import UUID

from bench._rebuild_log import LogGenerator, _Tenant
from domain.card import Card
from domain.positions import position_between
from domain.project import Placed, Placement, Project

if TYPE_CHECKING:
    from eventsourcing.domain import Aggregate

    from domain.meta import EventMeta


class _LaneIndex(dict[UUID, Placement]):
    """A board's placements that also keep each lane's ``(position, card)`` pairs sorted."""

    def __init__(self) -> None:
        super().__init__()
        self.lanes: dict[str, list[tuple[str, UUID]]] = {}

    def __setitem__(self, card: UUID, placement: Placement) -> None:
        if card in self:
            self._drop(card)
        super().__setitem__(card, placement)
        insort(self.lanes.setdefault(placement.lane, []), (placement.position, card))

    def __delitem__(self, card: UUID) -> None:
        self._drop(card)
        super().__delitem__(card)

    def _drop(self, card: UUID) -> None:
        old = self[card]
        order = self.lanes[old.lane]
        i = bisect_left(order, (old.position, card))
        assert order[i] == (old.position, card)
        del order[i]


def index_lanes(project: Project, *, verify: bool = False) -> None:
    """Give a board created empty a lane index, and answer "put it at the end of the lane"
    from it instead of sorting the lane (anything else is left to ``Project``)."""
    assert not project.placements, "index a board before its first card"
    index = _LaneIndex()
    project.placements = index
    slow = Project._position_in

    def position_in(
        lane: str,
        card_id: UUID,
        after: UUID | None,
        before: UUID | None,
        *,
        fixed: Collection[UUID],
        meta: EventMeta,
    ) -> Placed:
        if after is not None or before is not None:
            return slow(project, lane, card_id, after, before, fixed=fixed, meta=meta)
        order = index.lanes.get(lane, [])
        last = len(order) - 1
        if last >= 0 and order[last][1] == card_id:
            last -= 1
        # Appending steps to the next integer: a few characters, never a re-spread.
        placed = Placed(position_between(order[last][0] if last >= 0 else None, None))
        if verify:
            assert placed == slow(project, lane, card_id, None, None, fixed=fixed, meta=meta)
        return placed

    project.__dict__["_position_in"] = position_in


@dataclass
class HotCard:
    card: Card
    events: int


class WorkspaceGenerator(LogGenerator):
    """One workspace: ``cards`` card lives (a few hundred at a time, as ``LogGenerator``
    interleaves them), continued until the log also holds ``events`` events, and a hot card
    with ``hot_card_events`` events whose edits are spread evenly over the expected log. Past
    ``deadline`` (``time.monotonic()``) no card is started: the size is then what fitted."""

    def __init__(
        self,
        seed: int,
        *,
        cards: int,
        events: int,
        hot_card_events: int,
        projects: int = 3,
        verify: bool = False,
        deadline: float | None = None,
    ) -> None:
        super().__init__(seed)
        self.projects_per_tenant = projects
        self.cards_target = cards
        self.events_target = events
        self.hot_card_events = hot_card_events
        self.verify = verify
        self.deadline = deadline
        self.stopped_by_deadline = False
        self.emitted = 0
        self.hot: HotCard | None = None

    def _user_id(self, number: int) -> str:
        """Tokens carry user ids as UUIDs (``bench._graphql_seed``)."""
        return str(UUID(int=self.rnd.getrandbits(128), version=4))

    def _created(self, tenant: _Tenant) -> None:
        for project in tenant.projects:
            index_lanes(project, verify=self.verify)

    @property
    def tenant(self) -> _Tenant:
        return self.tenants[0]

    def _counted(self, group: list[Aggregate]) -> list[Aggregate]:
        self.emitted += sum(len(a.pending_events) for a in group)
        return group

    def _hot_edit(self) -> list[Aggregate]:
        assert self.hot is not None
        card = self.hot.card
        card.edit(
            title=f"Hot card, edit {self.hot.events}",
            description=None,
            meta=self._meta(self.tenant, self.tenant.users[0]),
        )
        self.hot.events += 1
        return self._counted([card])

    def _hot_card(self) -> list[Aggregate]:
        tenant = self.tenant
        project = tenant.projects[0]
        meta = self._meta(tenant, tenant.users[0])
        card_id = self._uuid()
        card = Card.create(
            card_id=card_id,
            workspace_id=tenant.workspace.id,
            project_id=project.id,
            title="Hot card",
            description="edited all through the log",
            lane="Backlog",
            position=project.place_card(card_id, "Backlog", meta=meta).position,
            meta=meta,
        )
        self.hot = HotCard(card, 1)
        self.stats.cards += 1
        return self._counted([card, project])

    def groups(self, cards_per_tenant: int = 0) -> Iterator[list[Aggregate]]:
        """Finite: the workspace, its hot card, then card lives until both targets are met
        (the lives under way then run to their end)."""
        for group in self._new_tenant():
            yield self._counted(group)
        yield self._hot_card()
        expected = max(self.events_target, self.cards_target * 50)
        step = max(1, expected // max(self.hot_card_events, 1))
        live: list[Iterator[list[Aggregate]]] = []
        started = 0
        assert self.hot is not None
        while True:
            if self.hot.events < self.hot_card_events and self.emitted >= self.hot.events * step:
                yield self._hot_edit()
            while len(live) < self.concurrent_cards and self._wants_more(started):
                live.append(self._card_life(self.tenant))
                started += 1
            if not live:
                break
            i = self.rnd.randrange(len(live))
            try:
                yield self._counted(next(live[i]))
            except StopIteration:
                live[i] = live[-1]
                live.pop()
        while self.hot.events < self.hot_card_events:
            yield self._hot_edit()

    def _wants_more(self, started: int) -> bool:
        """Whether to start another card: until both targets are met, or the time is up."""
        if started >= self.cards_target and self.emitted >= self.events_target:
            return False
        if self.deadline is not None and time.monotonic() >= self.deadline:
            self.stopped_by_deadline = True
            return False
        return True

    def describe(self) -> dict[str, Any]:
        assert self.hot is not None
        tenant = self.tenant
        return {
            "workspace_id": str(tenant.workspace.id),
            "owner": tenant.users[0],
            "projects": [str(p.id) for p in tenant.projects],
            "cards_per_project": {str(p.id): len(p.placements) for p in tenant.projects},
            "hot_card": str(self.hot.card.id),
            "hot_card_events": self.hot.events,
            "stopped_by_time_budget": self.stopped_by_deadline,
        }
