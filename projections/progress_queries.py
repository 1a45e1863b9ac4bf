"""What the API reads of the projectors' own bookkeeping (``projection_positions``,
``projection_versions``, ``projection_parked``): how far each read model is, for
read-your-writes waits and readiness."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING
from uuid import UUID

if TYPE_CHECKING:
    from psycopg import Connection
    from psycopg.rows import DictRow


@dataclass(frozen=True)
class Progress:
    head: int
    """The event log's last committed position."""
    positions: dict[str, int]
    """Projector name -> the log position it has applied up to."""
    parked: dict[str, int]
    """Projector name -> aggregates it parked (dead-lettered)."""


class Reach(Enum):
    """How far the projectors a read waits for are from the write it names."""

    REACHED = "reached"
    WAITING = "waiting"
    PARKED = "parked"
    """A projector parked the aggregate at or before the write: no wait can see it until an
    operator retries (``agentworks parked retry``)."""


def include(
    conn: Connection[DictRow], projectors: Sequence[str], *, aggregate_id: UUID, position: int,
    version: int,
) -> Reach:  # fmt: skip
    """Whether every one of ``projectors`` has applied the log up to ``position`` and
    ``aggregate_id`` up to ``version`` (a projector never seen counts as at 0); if not, whether
    one of them parked the aggregate at or before that version."""
    (reach,) = include_each(conn, [(projectors, aggregate_id, position, version)])
    return reach


Wanted = tuple[Sequence[str], UUID, int, int]
"""Projectors, and the aggregate, version and position they must all have applied."""


def include_each(conn: Connection[DictRow], wanted: Sequence[Wanted]) -> list[Reach]:
    """:func:`include` for each of ``wanted``, in one statement however many there are."""
    rows = [
        (index, name, aggregate_id, position, version)
        for index, (projectors, aggregate_id, position, version) in enumerate(wanted)
        for name in projectors
    ]
    found = {
        int(row["i"]): (
            Reach.REACHED if row["reached"] else Reach.PARKED if row["parked"] else Reach.WAITING
        )
        for row in conn.execute(
            "SELECT w.i, bool_and(coalesce(p.position, 0) >= w.position"
            " AND coalesce(v.version, 0) >= w.version) AS reached,"
            " bool_or(k.originator_version <= w.version) AS parked"
            " FROM unnest(%s::int[], %s::text[], %s::uuid[], %s::bigint[], %s::bigint[])"
            "   AS w(i, projector, aggregate_id, position, version)"
            " LEFT JOIN projection_positions AS p ON p.projector = w.projector"
            " LEFT JOIN projection_versions AS v"
            "   ON v.projector = w.projector AND v.originator_id = w.aggregate_id"
            " LEFT JOIN projection_parked AS k"
            "   ON k.projector = w.projector AND k.originator_id = w.aggregate_id"
            " GROUP BY w.i",
            [list(column) for column in zip(*rows, strict=True)] if rows else [[]] * 5,
        ).fetchall()
    }
    return [found.get(index, Reach.REACHED) for index in range(len(wanted))]


def progress(conn: Connection[DictRow]) -> Progress:
    # Row-level security hides every event from the API role; the head function does not.
    head_row = conn.execute("SELECT agentworks_log_head() AS head").fetchone()
    rows = conn.execute("SELECT projector, position FROM projection_positions").fetchall()
    parked = conn.execute(
        "SELECT projector, count(*) AS parked FROM projection_parked GROUP BY projector"
    ).fetchall()
    return Progress(
        head=int(head_row["head"]) if head_row else 0,
        positions={row["projector"]: int(row["position"]) for row in rows},
        parked={row["projector"]: int(row["parked"]) for row in parked},
    )


def scope_reading_version(
    conn: Connection[DictRow], workspace_id: UUID, *, statement_timeout_ms: int
) -> str:
    """``kanban_queries.scope_to_workspace`` with a timeout, and in the same statement the
    version of the workspace's read models (``read_api.response_cache`` keys answers on it): the
    global epoch and the workspace's counters (``projections.read_versions``).

    The counters are read after the scope is set (the subquery depends on the value that
    ``set_config`` returns), so row-level security, which the counters are under like every read
    model, shows this workspace's.
    """
    row = conn.execute(
        "SELECT (SELECT epoch FROM read_model_epoch)::text || ':' || coalesce("
        "  (SELECT string_agg(v.projector || '@' || v.version::text, ',' ORDER BY v.projector)"
        "   FROM rm_workspace_versions AS v WHERE v.workspace_id = s.workspace_id), '')"
        " AS version FROM (SELECT set_config('agentworks.workspace_id', %s, true)::uuid"
        "  AS workspace_id, set_config('statement_timeout', %s, true)) AS s",
        (str(workspace_id), str(statement_timeout_ms)),
    ).fetchone()
    return str(row["version"]) if row is not None else ""
