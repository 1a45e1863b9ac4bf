"""DataLoaders over the read models: every kind of object costs one query per batch.

A board of 200 cards with their last runs is read with a fixed number of statements whatever its
size: lanes for all projects asked for, one page of cards for every lane asked for (a LATERAL
join, each lane with its own cursor and page size), the runs of every card asked for, and so on.
The statements live beside the tables they read (``projections.kanban_queries``,
``projections.runs_queries``, ``projections.queries``); here they are batched and their rows
grouped per key. Loaders belong to one :class:`~read_api.db.ReadScope` (one request and
workspace) and are created with it, never shared.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Callable, Hashable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol, TypeVar
from uuid import UUID

from psycopg.rows import DictRow
from strawberry.dataloader import DataLoader

from domain.months import month_of
from projections import kanban_queries as kanban
from projections import queries
from projections import runs_queries as runs
from projections.kanban_queries import AccessPage, LanePage
from projections.runs_queries import RunPage, RunSummary

if TYPE_CHECKING:
    from psycopg import Connection

Row = dict[str, Any]
K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


class Reader(Protocol):
    """Where loaders read: a :class:`~read_api.db.ReadScope` (one request and workspace)."""

    async def run(self, fn: Callable[[Connection[DictRow]], T]) -> T: ...


def forget(loader: DataLoader[K, Any], key: K) -> None:
    """Drop ``key`` from ``loader``'s cache (a write changed it); a no-op when not cached."""
    with contextlib.suppress(KeyError):
        loader.clear(key)


def _by_key(rows: Sequence[DictRow], column: str) -> dict[Any, Row]:
    return {row[column]: dict(row) for row in rows}


def _grouped(rows: Sequence[DictRow], column: str) -> dict[Any, list[Row]]:
    groups: dict[Any, list[Row]] = defaultdict(list)
    for row in rows:
        groups[row[column]].append(dict(row))
    return groups


class Loaders:
    """The DataLoaders of one read scope, created lazily on first use."""

    def __init__(self, scope: Reader) -> None:
        self._scope = scope
        self.workspace: DataLoader[UUID, Row | None] = DataLoader(load_fn=self._workspaces)
        self.members: DataLoader[UUID, list[Row]] = DataLoader(load_fn=self._members)
        self.projects_of_workspace: DataLoader[UUID, list[Row]] = DataLoader(
            load_fn=self._projects_of_workspace
        )
        self.project: DataLoader[UUID, Row | None] = DataLoader(load_fn=self._projects)
        self.lanes: DataLoader[UUID, list[Row]] = DataLoader(load_fn=self._lanes)
        self.lane_cards: DataLoader[LanePage, list[Row]] = DataLoader(load_fn=self._lane_cards)
        self.card: DataLoader[UUID, Row | None] = DataLoader(load_fn=self._cards)
        self.run: DataLoader[UUID, RunSummary | None] = DataLoader(load_fn=self._runs)
        self.card_runs: DataLoader[RunPage, list[RunSummary]] = DataLoader(load_fn=self._card_runs)
        self.run_output: DataLoader[UUID, Row | None] = DataLoader(load_fn=self._run_outputs)
        self.run_attempts: DataLoader[UUID, list[Row]] = DataLoader(load_fn=self._run_attempts)
        self.spend_this_month: DataLoader[UUID, int] = DataLoader(load_fn=self._spend_this_month)
        self.card_cost_until: DataLoader[tuple[UUID, datetime | None], int] = DataLoader(
            load_fn=self._card_cost_until
        )
        self.api_keys: DataLoader[AccessPage, list[Row]] = DataLoader(load_fn=self._api_keys)
        self.invitations: DataLoader[AccessPage, list[Row]] = DataLoader(load_fn=self._invitations)

    async def _query(
        self, query: Callable[[Connection[DictRow], Sequence[K]], list[DictRow]], keys: list[K]
    ) -> list[DictRow]:
        return await self._scope.run(lambda conn: query(conn, keys))

    async def _one_per_key(
        self,
        query: Callable[[Connection[DictRow], Sequence[UUID]], list[DictRow]],
        column: str,
        ids: list[UUID],
    ) -> list[Row | None]:
        found = _by_key(await self._query(query, ids), column)
        return [found.get(i) for i in ids]

    async def _list_per_key(
        self,
        query: Callable[[Connection[DictRow], Sequence[K]], list[DictRow]],
        column: str,
        keys: list[K],
    ) -> list[list[Row]]:
        groups = _grouped(await self._query(query, keys), column)
        return [groups.get(k, []) for k in keys]

    async def _pages(
        self, query: Callable[[Connection[DictRow], Sequence[K]], list[DictRow]], pages: list[K]
    ) -> list[list[Row]]:
        groups = _grouped(await self._query(query, pages), "page_index")
        return [groups.get(i + 1, []) for i in range(len(pages))]

    # -- one row per key ---------------------------------------------------------------------

    async def _workspaces(self, ids: list[UUID]) -> list[Row | None]:
        return await self._one_per_key(kanban.workspaces, "workspace_id", ids)

    async def _projects(self, ids: list[UUID]) -> list[Row | None]:
        return await self._one_per_key(kanban.projects, "project_id", ids)

    async def _cards(self, ids: list[UUID]) -> list[Row | None]:
        return await self._one_per_key(kanban.cards, "card_id", ids)

    async def _runs(self, ids: list[UUID]) -> list[RunSummary | None]:
        found = {
            row["run_id"]: RunSummary.from_row(row) for row in await self._query(runs.runs, ids)
        }
        return [found.get(i) for i in ids]

    async def _run_outputs(self, ids: list[UUID]) -> list[Row | None]:
        return await self._one_per_key(runs.run_outputs, "run_id", ids)

    async def _spend_this_month(self, ids: list[UUID]) -> list[int]:
        month = month_of(datetime.now(UTC))
        rows = await self._scope.run(lambda conn: queries.spend_of_month(conn, ids, month))
        found = {row["workspace_id"]: int(row["billed_micros"]) for row in rows}
        return [found.get(i, 0) for i in ids]

    async def _card_cost_until(self, keys: list[tuple[UUID, datetime | None]]) -> list[int]:
        rows = await self._query(queries.card_costs_until, keys)
        found = {int(row["ord"]): int(row["billed"]) for row in rows}
        return [found.get(i + 1, 0) for i in range(len(keys))]

    # -- lists per key -----------------------------------------------------------------------

    async def _members(self, ids: list[UUID]) -> list[list[Row]]:
        return await self._list_per_key(kanban.members, "workspace_id", ids)

    async def _projects_of_workspace(self, ids: list[UUID]) -> list[list[Row]]:
        return await self._list_per_key(kanban.projects_of_workspaces, "workspace_id", ids)

    async def _lanes(self, ids: list[UUID]) -> list[list[Row]]:
        return await self._list_per_key(kanban.lanes, "project_id", ids)

    async def _run_attempts(self, ids: list[UUID]) -> list[list[Row]]:
        return await self._list_per_key(runs.run_attempts, "run_id", ids)

    async def _lane_cards(self, pages: list[LanePage]) -> list[list[Row]]:
        return await self._pages(kanban.lane_cards, pages)

    async def _api_keys(self, pages: list[AccessPage]) -> list[list[Row]]:
        return await self._pages(kanban.api_key_pages, pages)

    async def _invitations(self, pages: list[AccessPage]) -> list[list[Row]]:
        return await self._pages(kanban.invitation_pages, pages)

    async def _card_runs(self, pages: list[RunPage]) -> list[list[RunSummary]]:
        return [
            [RunSummary.from_row(row) for row in page]
            for page in await self._pages(runs.card_runs, pages)
        ]


__all__ = ["AccessPage", "LanePage", "Loaders", "Reader", "Row", "RunPage", "forget"]
