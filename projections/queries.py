"""Read-side queries: what the API asks of the read models, as plain values.

Every function takes a connection that is already inside a transaction scoped to the caller's
workspace (``SET LOCAL agentworks.workspace_id``), so row-level security confines it to that
workspace; the functions filter by workspace too, which is what lets the indexes serve them.
Money is integer micro-USD; turning it into the API's ``Money`` string is the API's business.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any
from uuid import UUID

from psycopg.rows import dict_row

from domain.billing import (
    Credit,
    Line,
    LineKind,
    credit_line,
    statement_total,
    usage_line,
)
from domain.errors import NotFound, ValidationFailed
from domain.months import month_of, parse_month
from projections.billing import LedgerKind, UsageDimension
from projections.columns import RUN_SELECT
from projections.runs_queries import RunSummary

if TYPE_CHECKING:
    from collections.abc import Sequence

    from psycopg import Connection
    from psycopg.rows import DictRow

MAX_LOG_PAGE = 10_000
MAX_SEARCH_HITS = 500
#: How many of the newest matching lines a search ranks (``search_logs``).
SEARCH_CANDIDATES = 1_000
MAX_ACTIVITY_PAGE = 500


# -- values ----------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class UsageRow:
    key: str
    calls: int
    input_tokens: int
    output_tokens: int
    provider_cost_micros: int
    billed_micros: int


@dataclass(frozen=True, kw_only=True)
class StatementLine:
    project_id: UUID
    description: str
    billed_exact_micros: int
    billed_micros: int
    """``billed_exact_micros`` rounded up to the workspace's billing increment."""
    kind: str = "usage"
    """``usage`` (``project_id`` is the project) or ``credit`` (it is the credit's id)."""


@dataclass(frozen=True, kw_only=True)
class Statement:
    workspace_id: UUID
    month: str
    billing_increment_micros: int
    lines: list[StatementLine]
    total_micros: int
    """The sum of the rounded lines: what the invoice asks for."""
    invoice_id: str | None = None
    invoice_status: str | None = None


@dataclass(frozen=True, kw_only=True)
class LogLine:
    """One line of a run's log, as a page of the log and a search both return it."""

    run_id: UUID
    seq: int
    at: datetime
    stream: str
    text: str


@dataclass(frozen=True, kw_only=True)
class ActivityItem:
    position: int
    at: datetime
    actor: str
    kind: str
    summary: str
    card_id: UUID | None
    project_id: UUID | None


@dataclass(frozen=True, kw_only=True)
class ActivityPage:
    items: list[ActivityItem]
    has_next_page: bool
    end_position: int | None
    """Position of the last item: pass it as ``after_position`` for the next page."""


# -- usage and billing -----------------------------------------------------------------------------


def usage(
    conn: Connection[Any],
    workspace_id: UUID,
    *,
    from_: datetime,
    to: datetime,
    group_by: UsageDimension | str,
) -> list[UsageRow]:
    """Usage between ``from_`` and ``to`` grouped by one dimension, ordered by key.

    Usage is kept per UTC day, so the window counts every day it touches: a day is in when it
    overlaps ``[from_, to)``. With midnight bounds that is exactly the days in ``[from_, to)``.
    Corrections lower ``billed`` only; calls, tokens and provider cost are what was used.
    """
    dimension = _dimension(group_by)
    days = _days(from_, to)
    if days is None:
        return []
    first_day, end_day = days
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            "SELECT key, sum(calls) AS calls, sum(input_tokens) AS input_tokens,"
            " sum(output_tokens) AS output_tokens,"
            " sum(provider_cost_micros) AS provider_cost_micros,"
            " sum(billed_micros) AS billed_micros"
            " FROM rm_usage_daily"
            " WHERE workspace_id = %s AND dimension = %s AND day >= %s AND day < %s"
            " GROUP BY key ORDER BY key",
            (workspace_id, dimension.value, first_day, end_day),
        )
        rows = cur.fetchall()
    return [
        UsageRow(
            key=row["key"],
            calls=int(row["calls"]),
            input_tokens=int(row["input_tokens"]),
            output_tokens=int(row["output_tokens"]),
            provider_cost_micros=int(row["provider_cost_micros"]),
            billed_micros=int(row["billed_micros"]),
        )
        for row in rows
    ]


def statement(conn: Connection[Any], workspace_id: UUID, month: str) -> Statement:
    """The month's statement: one line per project, each rounded up to the billing increment.

    Rounding is per line (``round_up_to_increment``), and the total is the sum of the rounded
    lines, so the invoice equals what its lines show. Credits follow the projects as negative
    lines; usage billed late (its call was in an earlier, closed month) is named in its line.
    """
    month = parse_month(month)
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            "SELECT billing_increment_micros FROM rm_workspaces WHERE workspace_id = %s",
            (workspace_id,),
        )
        workspace = cur.fetchone()
        if workspace is None:
            raise NotFound(f"workspace {workspace_id} does not exist")
        cur.execute(
            "SELECT stripe_invoice_id, status, billing_increment_micros FROM rm_invoices"
            " WHERE workspace_id = %s AND month = %s",
            (workspace_id, month),
        )
        invoice = cur.fetchone()
        # A drafted month is billed at the increment it was drafted with, whatever the plan
        # says since; an open month at the plan's.
        drafted_at = invoice["billing_increment_micros"] if invoice else None
        increment = int(workspace["billing_increment_micros"] if drafted_at is None else drafted_at)
        cur.execute(
            "SELECT s.project_id, s.billed_exact_micros, p.name"
            " FROM rm_statement_lines AS s"
            " LEFT JOIN rm_projects AS p ON p.project_id = s.project_id"
            " WHERE s.workspace_id = %s AND s.month = %s"
            " ORDER BY p.name, s.project_id",
            (workspace_id, month),
        )
        rows = cur.fetchall()
        cur.execute(
            "SELECT project_id, sum(billed_micros) AS late FROM rm_charges"
            " WHERE workspace_id = %s AND month = %s"
            " AND to_char(occurred_at AT TIME ZONE 'UTC', 'YYYY-MM') <> month"
            " GROUP BY project_id",
            (workspace_id, month),
        )
        late = {row["project_id"]: int(row["late"]) for row in cur.fetchall()}
        cur.execute(
            "SELECT credit_id, amount_micros, reason FROM rm_billing_credits"
            " WHERE workspace_id = %s AND month = %s ORDER BY at, credit_id",
            (workspace_id, month),
        )
        credits = [
            Credit(
                credit_id=row["credit_id"],
                amount_micros=int(row["amount_micros"]),
                reason=row["reason"],
            )
            for row in cur.fetchall()
        ]
    figures = [
        usage_line(
            row["project_id"],
            int(row["billed_exact_micros"]),
            month=month,
            project_name=row["name"],
            increment_micros=increment,
            late_micros=late.get(row["project_id"], 0),
        )
        for row in rows
    ] + [credit_line(credit, increment_micros=increment) for credit in credits]
    lines = [
        StatementLine(
            project_id=line.ref_id,
            description=line.description,
            billed_exact_micros=line.exact_micros,
            billed_micros=line.billed_micros,
            kind=line.kind.value,
        )
        for line in figures
    ]
    return Statement(
        workspace_id=workspace_id,
        month=month,
        billing_increment_micros=increment,
        lines=lines,
        total_micros=statement_total(figures),
        invoice_id=invoice["stripe_invoice_id"] if invoice else None,
        invoice_status=invoice["status"] if invoice and invoice["stripe_invoice_id"] else None,
    )


def statement_as_lines(statement: Statement) -> list[Line]:
    """A read-model statement as the domain's lines, keyed as the log's are (for reconciling)."""
    return [
        Line(
            key=f"{line.kind}:{line.project_id}",
            kind=LineKind(line.kind),
            ref_id=line.project_id,
            description=line.description,
            exact_micros=line.billed_exact_micros,
            billed_micros=line.billed_micros,
        )
        for line in statement.lines
    ]


def month_to_date_spend(
    conn: Connection[Any], workspace_id: UUID, *, month: str | None = None
) -> int:
    """Net billed micro-USD of ``month`` (default: the current UTC month): charges less their
    credits and refunds; a workspace credit (``agentworks credit``) is a statement line only."""
    month = parse_month(month) if month is not None else month_of(datetime.now(UTC))
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            "SELECT billed_micros FROM rm_monthly_spend WHERE workspace_id = %s AND month = %s",
            (workspace_id, month),
        )
        row = cur.fetchone()
    return int(row["billed_micros"]) if row else 0


def spend_of_month(
    conn: Connection[DictRow], workspace_ids: Sequence[UUID], month: str
) -> list[DictRow]:
    """``workspace_id`` and net ``billed_micros`` of ``month`` for each workspace that spent."""
    return conn.execute(
        "SELECT workspace_id, billed_micros FROM rm_monthly_spend"
        " WHERE workspace_id = ANY(%s) AND month = %s",
        (workspace_ids, month),
    ).fetchall()


def card_costs_until(
    conn: Connection[DictRow], keys: Sequence[tuple[UUID, datetime | None]]
) -> list[DictRow]:
    """Billed micro-USD of each ``(card, until)`` (``None``: so far), as ``ord`` (the key's
    place, from 1) and ``billed``; a card without charges has a row with 0.

    Charges only, as the live card's ``cost`` (the kanban projector's sum of its calls) and its
    runs' ``billed`` count them: credits and refunds correct the statement, not what the card's
    runs billed, so a card answers the same cost live and as of now.
    """
    return conn.execute(
        "SELECT k.ord, coalesce(sum(e.billed_micros), 0) AS billed"
        " FROM unnest(%s::uuid[], %s::timestamptz[]) WITH ORDINALITY AS k(card_id, until, ord)"
        " LEFT JOIN rm_ledger_entries AS e"
        "   ON e.card_id = k.card_id AND e.kind = %s AND (k.until IS NULL OR e.at <= k.until)"
        " GROUP BY k.ord",
        ([card for card, _ in keys], [until for _, until in keys], LedgerKind.CHARGE.value),
    ).fetchall()


# -- runs and their logs ---------------------------------------------------------------------------


def agent_run(conn: Connection[Any], run_id: UUID) -> RunSummary | None:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(f"SELECT {RUN_SELECT} FROM rm_runs WHERE run_id = %s", (run_id,))
        row = cur.fetchone()
    return RunSummary(**row) if row else None


def run_logs(
    conn: Connection[Any], run_id: UUID, *, after_seq: int | None = None, first: int = 500
) -> list[LogLine]:
    """Up to ``first`` lines of a run after ``after_seq`` (from the start when None), in order."""
    _page_size(first, MAX_LOG_PAGE)
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            "SELECT run_id, seq, at, stream, text FROM rm_log_lines"
            " WHERE run_id = %s AND seq > %s ORDER BY seq LIMIT %s",
            (run_id, after_seq or 0, first),
        )
        return [LogLine(**row) for row in cur.fetchall()]


#: ``search_logs``' statement; parameters: the query, the workspace, the window, the page size.
SEARCH_STATEMENT = (
    "SELECT c.run_id, c.seq, c.at, c.stream, c.text FROM ("
    "  SELECT l.run_id, l.seq, l.at, l.stream, l.text, ts_rank(l.tsv, q) AS rank"
    "  FROM rm_log_lines AS l, websearch_to_tsquery('simple', %s) AS q"
    "  WHERE l.workspace_id = %s AND l.tsv @@ q"
    "  ORDER BY l.at DESC, l.run_id DESC, l.seq DESC LIMIT %s"
    ") AS c ORDER BY c.rank DESC, c.run_id, c.seq LIMIT %s"
)


def search_logs(
    conn: Connection[Any], workspace_id: UUID, *, query: str, first: int = 50
) -> list[LogLine]:
    """Log lines matching a web-search style query (``"exact phrase" -not or``), best first
    among the newest ``SEARCH_CANDIDATES`` matches.

    Words are matched whole and unstemmed (the ``simple`` configuration): logs are full of
    identifiers and paths that a language's stemmer would mangle.

    Ranking every match made a search's work grow with the log (a common word matches a fixed
    share of every line ever written); ranking a window of the newest matches bounds it by the
    window, a constant above the largest page. A workspace with no more matches than the window
    gets the exact ranking of all of them; the window does not depend on ``first``, so a smaller
    page is always a prefix of a larger one.
    """
    _page_size(first, MAX_SEARCH_HITS)
    if not query.strip() or first == 0:
        return []
    with conn.cursor(row_factory=dict_row) as cur:
        # Never prepared: the right plan depends on how common the words are (a rare one through
        # the text index, a common one through the time-ordered index, stopping early), and a
        # generic plan would fix one of them for every word.
        cur.execute(
            SEARCH_STATEMENT, (query, workspace_id, SEARCH_CANDIDATES, first), prepare=False
        )
        return [LogLine(**row) for row in cur.fetchall()]


# -- activity --------------------------------------------------------------------------------------


def activity_page(
    conn: Connection[Any],
    workspace_id: UUID,
    *,
    first: int = 50,
    after_position: int | None = None,
) -> ActivityPage:
    """The workspace's activity, newest first, ``first`` items after the cursor position."""
    _page_size(first, MAX_ACTIVITY_PAGE)
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            "SELECT position, at, actor, kind, summary, card_id, project_id FROM rm_activity"
            " WHERE workspace_id = %s AND (%s::bigint IS NULL OR position < %s::bigint)"
            " ORDER BY position DESC LIMIT %s",
            (workspace_id, after_position, after_position, first + 1),
        )
        rows = cur.fetchall()
    items = [ActivityItem(**row) for row in rows[:first]]
    return ActivityPage(
        items=items,
        has_next_page=len(rows) > first,
        end_position=items[-1].position if items else None,
    )


# -- argument checks -------------------------------------------------------------------------------


def _dimension(group_by: UsageDimension | str) -> UsageDimension:
    try:
        return UsageDimension(group_by)
    except ValueError:
        valid = ", ".join(d.value for d in UsageDimension)
        raise ValidationFailed(f"cannot group usage by {group_by!r}; use one of {valid}") from None


def _days(from_: datetime, to: datetime) -> tuple[date, date] | None:
    """The first UTC day touched by ``[from_, to)`` and the day after the last one (None when
    the window is empty)."""
    for name, value in (("from", from_), ("to", to)):
        if value.tzinfo is None:
            raise ValidationFailed(f"{name} must be a timezone-aware UTC time, got {value}")
    try:
        start, end = from_.astimezone(UTC), to.astimezone(UTC)
    except OverflowError:
        raise ValidationFailed(f"the window {from_} .. {to} is out of range") from None
    if end < start:
        raise ValidationFailed(f"from ({from_.isoformat()}) is after to ({to.isoformat()})")
    if end == start:
        return None
    last = (end - timedelta(microseconds=1)).date()
    return start.date(), last + timedelta(days=1) if last < date.max else last


def _page_size(first: int, most: int) -> None:
    if not 0 <= first <= most:
        raise ValidationFailed(f"first must be between 0 and {most}, got {first}")
