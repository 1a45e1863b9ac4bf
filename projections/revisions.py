"""Which revision of its projector built each read model, so that a change needing a replay
gets one without an operator having to know.

A projector's :attr:`~projections.base.Projector.revision` is bumped by a change to its fold or
its tables after which rows built by older code are wrong or missing: a new table filled from
events older than it, a column computed differently. ``agentworks migrate`` (and ``dev`` at
start) then rebuilds each read model whose recorded revision is lower than its projector's,
as ``agentworks rebuild`` would (the API keeps answering from the live tables meanwhile), and
every rebuild records the revision that built it.

A read model with no recorded revision is taken to be built by the running code: either
nothing is built yet, or it was built since revisions are recorded (migration 0026 recorded
revision 1 for every read model built before it). A recorded revision *higher* than the code's
means a newer deployment built it; it is left alone (a rebuild by older code would undo what
the newer one fixed) and said.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from psycopg.rows import tuple_row

if TYPE_CHECKING:
    from psycopg import Connection

    from projections.base import Projector


@dataclass(frozen=True)
class Revisions:
    """What the recorded revisions say of some projectors' read models."""

    stale: tuple[tuple[str, int, int], ...] = ()
    """``(projector, recorded, code's)`` of each read model older code built: to rebuild."""
    newer: tuple[tuple[str, int, int], ...] = ()
    """``(projector, recorded, code's)`` of each read model a newer deployment built."""

    @property
    def stale_names(self) -> frozenset[str]:
        return frozenset(name for name, _, _ in self.stale)

    def describe_stale(self, *, then: str = "rebuilding it") -> list[str]:
        """A line per stale read model, saying what is done about it (``then``, where the
        read model's name is ``{name}``)."""
        return [
            f"read model {name} was built by revision {built} of its projector, this code is "
            f"at {code}: {then.format(name=name)}"
            for name, built, code in self.stale
        ]

    def describe_newer(self) -> list[str]:
        return [
            f"read model {name} was built by revision {built} of its projector, newer than this "
            f"code's {code}: left as it is (is an older version running?)"
            for name, built, code in self.newer
        ]


def check_revisions(conn: Connection[Any], projectors: Sequence[Projector]) -> Revisions:
    """Compare each projector's revision with its read model's, recording the code's revision
    for read models that have none (see the module docstring)."""
    names = [p.name for p in projectors]
    with conn.transaction():
        conn.execute(
            "INSERT INTO projection_revisions (projector, revision)"
            " SELECT * FROM unnest(%s::text[], %s::int[]) ON CONFLICT (projector) DO NOTHING",
            (names, [p.revision for p in projectors]),
        )
        with conn.cursor(row_factory=tuple_row) as cur:
            rows = cur.execute(
                "SELECT projector, revision FROM projection_revisions WHERE projector = ANY(%s)",
                (names,),
            ).fetchall()
    recorded: dict[str, int] = dict(rows)
    stale, newer = [], []
    for projector in projectors:
        built = recorded[projector.name]
        if built < projector.revision:
            stale.append((projector.name, built, projector.revision))
        elif built > projector.revision:
            newer.append((projector.name, built, projector.revision))
    return Revisions(tuple(stale), tuple(newer))


def record_revision(conn: Connection[Any], projector: Projector) -> None:
    """Say that ``projector``'s read model is now what its code builds (a rebuild's swap)."""
    conn.execute(
        "INSERT INTO projection_revisions (projector, revision) VALUES (%s, %s)"
        " ON CONFLICT (projector) DO UPDATE SET revision = EXCLUDED.revision,"
        " recorded_at = clock_timestamp()",
        (projector.name, projector.revision),
    )
