"""DataLoaders over the read models: every kind of object costs one query per batch.

A board of 200 cards with their last runs is read with a fixed number of statements whatever its
size: lanes for all projects asked for, one page of cards for every lane asked for (a LATERAL
join, each lane with its own cursor and page size), the runs of every card asked for, and so on.
Loaders belong to one :class:`~read_api.db.ReadScope` (one request and workspace) and are
created with it, never shared.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar
from uuid import UUID

from psycopg.rows import DictRow
from strawberry.dataloader import DataLoader

from domain.usage import month_of

if TYPE_CHECKING:
    from psycopg import Connection

    from read_api.db import ReadScope

Row = dict[str, Any]
K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True)
class LanePage:
    """Which page of a lane's cards: after ``(position, card id)``, at most ``limit`` rows."""

    project_id: UUID
    lane: str
    limit: int
    after_position: str | None = None
    after_card_id: UUID | None = None


@dataclass(frozen=True)
class RunPage:
    """Which page of a card's runs, newest first, after ``(requested_at, run id)``."""

    card_id: UUID
    limit: int
    after_requested_at: datetime | None = None
    after_run_id: UUID | None = None
    until: datetime | None = None
    """Only runs requested at or before this instant (a card's historical state)."""


_CARD_COLUMNS = (
    "workspace_id, card_id, project_id, title, description, lane, position, assignee, labels,"
    " blocked_reason, archived, version, created_at, updated_at, last_run_id, cost_micros"
)
_RUN_COLUMNS = (
    "workspace_id, run_id, project_id, card_id, agent, status, provider, model, max_cost_micros,"
    " input_tokens, output_tokens, provider_cost_micros, billed_micros, llm_calls, requested_at,"
    " started_at, finished_at, error, log_line_count, version"
)


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

    def __init__(self, scope: ReadScope) -> None:
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
        self.run: DataLoader[UUID, Row | None] = DataLoader(load_fn=self._runs)
        self.card_runs: DataLoader[RunPage, list[Row]] = DataLoader(load_fn=self._card_runs)
        self.run_output: DataLoader[UUID, Row | None] = DataLoader(load_fn=self._run_outputs)
        self.run_attempts: DataLoader[UUID, list[Row]] = DataLoader(load_fn=self._run_attempts)
        self.spend_this_month: DataLoader[UUID, int] = DataLoader(load_fn=self._spend_this_month)
        self.card_cost_until: DataLoader[tuple[UUID, datetime | None], int] = DataLoader(
            load_fn=self._card_cost_until
        )

    async def _query(self, sql: str, params: Sequence[Any]) -> list[DictRow]:
        def fetch(conn: Connection[DictRow]) -> list[DictRow]:
            return conn.execute(sql, params).fetchall()

        return await self._scope.run(fetch)

    # -- one row per key ---------------------------------------------------------------------

    async def _workspaces(self, ids: list[UUID]) -> list[Row | None]:
        rows = await self._query(
            "SELECT workspace_id, name, markup, billing_increment_micros, monthly_limit_micros,"
            " version, created_at, updated_at FROM rm_workspaces WHERE workspace_id = ANY(%s)",
            (ids,),
        )
        found = _by_key(rows, "workspace_id")
        return [found.get(i) for i in ids]

    async def _projects(self, ids: list[UUID]) -> list[Row | None]:
        rows = await self._query(
            "SELECT workspace_id, project_id, name, archived, version, created_at, updated_at"
            " FROM rm_projects WHERE project_id = ANY(%s)",
            (ids,),
        )
        found = _by_key(rows, "project_id")
        return [found.get(i) for i in ids]

    async def _cards(self, ids: list[UUID]) -> list[Row | None]:
        rows = await self._query(
            f"SELECT {_CARD_COLUMNS} FROM rm_cards WHERE card_id = ANY(%s)", (ids,)
        )
        found = _by_key(rows, "card_id")
        return [found.get(i) for i in ids]

    async def _runs(self, ids: list[UUID]) -> list[Row | None]:
        rows = await self._query(
            f"SELECT {_RUN_COLUMNS} FROM rm_runs WHERE run_id = ANY(%s)", (ids,)
        )
        found = _by_key(rows, "run_id")
        return [found.get(i) for i in ids]

    async def _run_outputs(self, ids: list[UUID]) -> list[Row | None]:
        rows = await self._query(
            "SELECT run_id, output FROM rm_run_outputs WHERE run_id = ANY(%s)", (ids,)
        )
        found = _by_key(rows, "run_id")
        return [found.get(i) for i in ids]

    async def _run_attempts(self, ids: list[UUID]) -> list[list[Row]]:
        rows = await self._query(
            "SELECT run_id, attempt, provider, model, status, http_status, error, latency_ms,"
            " input_tokens, output_tokens, provider_cost_micros, estimated"
            " FROM rm_run_attempts WHERE run_id = ANY(%s) ORDER BY run_id, attempt",
            (ids,),
        )
        groups = _grouped(rows, "run_id")
        return [groups.get(i, []) for i in ids]

    async def _spend_this_month(self, ids: list[UUID]) -> list[int]:
        month = month_of(datetime.now(UTC))
        rows = await self._query(
            "SELECT workspace_id, billed_micros FROM rm_monthly_spend"
            " WHERE workspace_id = ANY(%s) AND month = %s",
            (ids, month),
        )
        found = {row["workspace_id"]: int(row["billed_micros"]) for row in rows}
        return [found.get(i, 0) for i in ids]

    # -- lists per key -----------------------------------------------------------------------

    async def _members(self, ids: list[UUID]) -> list[list[Row]]:
        rows = await self._query(
            "SELECT workspace_id, user_id, role FROM rm_members WHERE workspace_id = ANY(%s)"
            " ORDER BY workspace_id, user_id",
            (ids,),
        )
        groups = _grouped(rows, "workspace_id")
        return [groups.get(i, []) for i in ids]

    async def _projects_of_workspace(self, ids: list[UUID]) -> list[list[Row]]:
        rows = await self._query(
            "SELECT workspace_id, project_id, name, archived, version, created_at, updated_at"
            " FROM rm_projects WHERE workspace_id = ANY(%s) ORDER BY created_at, project_id",
            (ids,),
        )
        groups = _grouped(rows, "workspace_id")
        return [groups.get(i, []) for i in ids]

    async def _lanes(self, ids: list[UUID]) -> list[list[Row]]:
        rows = await self._query(
            "SELECT project_id, name, ord, wip_limit, card_count FROM rm_lanes"
            " WHERE project_id = ANY(%s) ORDER BY project_id, ord",
            (ids,),
        )
        groups = _grouped(rows, "project_id")
        return [groups.get(i, []) for i in ids]

    async def _lane_cards(self, pages: list[LanePage]) -> list[list[Row]]:
        rows = await self._query(
            "SELECT k.ord AS page_index, c.* FROM unnest("
            "%s::uuid[], %s::text[], %s::text[], %s::uuid[], %s::int[]"
            ") WITH ORDINALITY AS k(project_id, lane, after_position, after_card_id, lim, ord)"
            " CROSS JOIN LATERAL ("
            f"  SELECT {_CARD_COLUMNS} FROM rm_cards AS c"
            "   WHERE c.project_id = k.project_id AND c.lane = k.lane AND NOT c.archived"
            "   AND (k.after_position IS NULL OR (c.position, c.card_id)"
            '        > (k.after_position COLLATE "C", k.after_card_id))'
            "   ORDER BY c.position, c.card_id LIMIT k.lim"
            " ) AS c ORDER BY k.ord, c.position, c.card_id",
            (
                [p.project_id for p in pages],
                [p.lane for p in pages],
                [p.after_position for p in pages],
                [p.after_card_id for p in pages],
                [p.limit for p in pages],
            ),
        )
        groups = _grouped(rows, "page_index")
        return [groups.get(i + 1, []) for i in range(len(pages))]

    async def _card_runs(self, pages: list[RunPage]) -> list[list[Row]]:
        rows = await self._query(
            "SELECT k.ord AS page_index, r.* FROM unnest("
            "%s::uuid[], %s::timestamptz[], %s::uuid[], %s::timestamptz[], %s::int[]"
            ") WITH ORDINALITY AS k(card_id, after_at, after_run_id, until, lim, ord)"
            " CROSS JOIN LATERAL ("
            f"  SELECT {_RUN_COLUMNS} FROM rm_runs AS r WHERE r.card_id = k.card_id"
            "   AND (k.after_at IS NULL"
            "        OR (r.requested_at, r.run_id) < (k.after_at, k.after_run_id))"
            "   AND (k.until IS NULL OR r.requested_at <= k.until)"
            "   ORDER BY r.requested_at DESC, r.run_id DESC LIMIT k.lim"
            " ) AS r ORDER BY k.ord, r.requested_at DESC, r.run_id DESC",
            (
                [p.card_id for p in pages],
                [p.after_requested_at for p in pages],
                [p.after_run_id for p in pages],
                [p.until for p in pages],
                [p.limit for p in pages],
            ),
        )
        groups = _grouped(rows, "page_index")
        return [groups.get(i + 1, []) for i in range(len(pages))]

    async def _card_cost_until(self, keys: list[tuple[UUID, datetime | None]]) -> list[int]:
        rows = await self._query(
            "SELECT k.ord, coalesce(sum(e.billed_micros), 0) AS billed"
            " FROM unnest(%s::uuid[], %s::timestamptz[]) WITH ORDINALITY AS k(card_id, until, ord)"
            " LEFT JOIN rm_ledger_entries AS e"
            "   ON e.card_id = k.card_id AND (k.until IS NULL OR e.at <= k.until)"
            " GROUP BY k.ord",
            ([card for card, _ in keys], [until for _, until in keys]),
        )
        found = {int(row["ord"]): int(row["billed"]) for row in rows}
        return [found.get(i + 1, 0) for i in range(len(keys))]
