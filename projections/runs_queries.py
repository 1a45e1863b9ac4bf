"""What the API reads of the runs read model (``rm_runs``, ``rm_run_outputs``,
``rm_run_attempts``), a batch of keys per statement.

Every read takes a connection inside a transaction scoped to the caller's workspace, so
row-level security confines it there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any
from uuid import UUID

from projections.batch import columns_of
from projections.billing import LedgerKind
from projections.columns import RUN_COLUMNS, RUN_SELECT
from projections.history import STATE_TIME_SQL
from projections.kanban_queries import batch_read

if TYPE_CHECKING:
    from psycopg import Connection
    from psycopg.rows import DictRow


@dataclass(frozen=True, kw_only=True)
class RunSummary:
    """One ``rm_runs`` row: the run as the read model keeps it (money in micro-USD)."""

    run_id: UUID
    workspace_id: UUID
    project_id: UUID
    card_id: UUID
    agent: str
    status: str
    provider: str | None
    model: str | None
    max_cost_micros: int | None
    input_tokens: int
    output_tokens: int
    provider_cost_micros: int
    billed_micros: int
    llm_calls: int
    requested_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    error: str | None
    log_line_count: int
    version: int

    @classmethod
    def from_row(cls, row: DictRow | dict[str, Any]) -> RunSummary:
        """The summary in a row that may carry more (a page's ``page_index``)."""
        return cls(**{name: row[name] for name in _FIELDS})


_FIELDS = tuple(RunSummary.__dataclass_fields__)


@dataclass(frozen=True)
class RunPage:
    """Which page of a card's runs, newest first, after ``(requested_at, run id)``."""

    card_id: UUID
    limit: int
    after_requested_at: datetime | None = None
    after_run_id: UUID | None = None
    until: datetime | None = None
    """Only runs requested at or before this instant (a card's historical state)."""


RUNS_SQL = f"SELECT {RUN_SELECT} FROM rm_runs WHERE run_id = ANY(%s)"
runs = batch_read(RUNS_SQL)


#: A run of a page ``until`` an instant that had not ended by then (``k``: the page, ``r``:
#: the run's row).
_GOING = "(k.until IS NOT NULL AND (r.finished_at IS NULL OR r.finished_at > k.until))"

#: What a run was at its page's ``until`` where it differs from its row: a run that had not
#: ended by then is RUNNING (or QUEUED), with no end, error or output yet, and only the calls
#: charged, the log lines written and the versions stored by then. The row of one that had
#: ended is what it was then (what follows its end, an orphaned call's charge, is the run's
#: record of that call, made late).
_THEN = {
    "status": "CASE WHEN r.started_at <= k.until THEN 'RUNNING' ELSE 'QUEUED' END",
    "started_at": "CASE WHEN r.started_at <= k.until THEN r.started_at END",
    "finished_at": "NULL::timestamptz",
    "error": "NULL::text",
    "input_tokens": "c.input_tokens",
    "output_tokens": "c.output_tokens",
    "provider_cost_micros": "c.provider_cost_micros",
    "billed_micros": "c.billed_micros",
    "llm_calls": "c.calls",
    "log_line_count": (
        "(SELECT count(*) FROM rm_log_lines AS l WHERE l.run_id = r.run_id AND l.at <= k.until)"
    ),
    # A state whose time PostgreSQL cannot read (a cipher's) leaves the row's version.
    "version": (
        "coalesce((SELECT max(e.originator_version) FROM agentworks_events AS e"
        f" WHERE e.originator_id = r.run_id AND {STATE_TIME_SQL} <= k.until), r.version)"
    ),
}
_RUN_THEN = ", ".join(
    f"CASE WHEN {_GOING} THEN {_THEN[name]} ELSE r.{name} END AS {name}"
    if name in _THEN
    else f"r.{name}"
    for name, _ in RUN_COLUMNS
)
#: The charges of a run not ended by its page's ``until``, made by then.
_CHARGED_THEN = (
    " LEFT JOIN LATERAL (SELECT count(*) AS calls,"
    " coalesce(sum(x.input_tokens), 0) AS input_tokens,"
    " coalesce(sum(x.output_tokens), 0) AS output_tokens,"
    " coalesce(sum(x.provider_cost_micros), 0) AS provider_cost_micros,"
    " coalesce(sum(x.billed_micros), 0) AS billed_micros"
    " FROM rm_ledger_entries AS x WHERE " + _GOING + " AND x.workspace_id = r.workspace_id"
    f" AND x.run_id = r.run_id AND x.kind = '{LedgerKind.CHARGE.value}' AND x.at <= k.until)"
    " AS c ON true"
)


def card_runs(conn: Connection[DictRow], pages: Sequence[RunPage]) -> list[DictRow]:
    """One page of runs per card page asked for, newest first; ``page_index`` (from 1) says
    which page a row answers. A page ``until`` an instant holds the runs requested by then, each
    as it was then (:data:`_THEN`)."""
    rows = [(p.card_id, p.after_requested_at, p.after_run_id, p.until, p.limit) for p in pages]
    return conn.execute(
        "SELECT k.ord AS page_index, r.* FROM unnest("
        "%s::uuid[], %s::timestamptz[], %s::uuid[], %s::timestamptz[], %s::int[]"
        ") WITH ORDINALITY AS k(card_id, after_at, after_run_id, until, lim, ord)"
        " CROSS JOIN LATERAL ("
        f"  SELECT {_RUN_THEN} FROM rm_runs AS r{_CHARGED_THEN} WHERE r.card_id = k.card_id"
        "   AND (k.after_at IS NULL"
        "        OR (r.requested_at, r.run_id) < (k.after_at, k.after_run_id))"
        "   AND (k.until IS NULL OR r.requested_at <= k.until)"
        "   ORDER BY r.requested_at DESC, r.run_id DESC LIMIT k.lim"
        " ) AS r ORDER BY k.ord, r.requested_at DESC, r.run_id DESC",
        columns_of(rows, 5),
    ).fetchall()


run_outputs = batch_read("SELECT run_id, output FROM rm_run_outputs WHERE run_id = ANY(%s)")
run_attempts = batch_read(
    "SELECT run_id, attempt, at, provider, model, status, http_status, error, latency_ms,"
    " input_tokens, output_tokens, provider_cost_micros, estimated"
    " FROM rm_run_attempts WHERE run_id = ANY(%s) ORDER BY run_id, attempt"
)
