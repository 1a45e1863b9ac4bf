"""The read models' versions that ``read_api.response_cache`` keys answers on: a counter per
(workspace, projector) in ``rm_workspace_versions`` and one global ``read_model_epoch``
(migration 0020).

Why per workspace: a cached answer reads rows of its caller's workspace only (row-level
security), so only a commit that changed that workspace's rows can make it stale. A projector
batch bumps, in its own transaction, the counter of every workspace whose events it applied; a
commit that changes rows of no single workspace (a rebuild's swap, an event without one) bumps the
epoch, which every key includes. An unchanged (counters, epoch) pair therefore means no commit
changed what the answer read.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING
from uuid import UUID

if TYPE_CHECKING:
    from psycopg import Connection, Cursor
    from psycopg.rows import DictRow

    from domain.envelope import EventEnvelope

#: Events of this aggregate may carry no workspace in their metadata: the aggregate *is* one.
_WORKSPACE_AGGREGATE = "Workspace"

_BUMP_WORKSPACES = (
    "INSERT INTO rm_workspace_versions AS v (workspace_id, projector, version)"
    " SELECT id, %s, 1 FROM unnest(%s::uuid[]) AS id ORDER BY id"
    " ON CONFLICT (workspace_id, projector) DO UPDATE SET version = v.version + 1"
)
_BUMP_EPOCH = "UPDATE read_model_epoch SET epoch = epoch + 1"


def touched(envelopes: Iterable[EventEnvelope]) -> tuple[list[UUID], bool]:
    """The workspaces whose read-model rows applying ``envelopes`` may change (sorted, so
    concurrent batches lock their counters in one order), and whether one of them belongs to no
    workspace (then only the epoch covers it)."""
    workspaces: set[UUID] = set()
    unowned = False
    for env in envelopes:
        if env.workspace_id is not None:
            workspaces.add(env.workspace_id)
        if env.aggregate == _WORKSPACE_AGGREGATE:
            workspaces.add(env.originator_id)
        elif env.workspace_id is None:
            unowned = True
    return sorted(workspaces), unowned


def bump(cur: Cursor[DictRow], projector: str, envelopes: Iterable[EventEnvelope]) -> None:
    """Record, in the transaction applying ``envelopes``, that the read models they touch
    changed."""
    workspaces, unowned = touched(envelopes)
    if workspaces:
        cur.execute(_BUMP_WORKSPACES, (projector, workspaces))
    if unowned:
        cur.execute(_BUMP_EPOCH)


def bump_epoch(conn: Connection[DictRow]) -> None:
    """Every workspace's read models changed at once (a rebuild's swap)."""
    conn.execute(_BUMP_EPOCH)


__all__ = ["bump", "bump_epoch", "touched"]
