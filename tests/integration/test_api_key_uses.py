"""API keys' last uses in ``api_key_uses``, written by the API role (migration 0024).

The statement itself bounds writes across API processes: a key's row younger than the interval is
not rewritten, and the use already stored is answered so that the asking process waits an interval
from it.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from uuid import UUID, uuid4

import pg
import psycopg
import pytest
from psycopg.rows import dict_row

from adapters.postgres import API_ROLE
from projections.key_uses import KeyUse, key_last_used, record_key_uses

INTERVAL = timedelta(seconds=60)
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def _api(database_url: str) -> psycopg.Connection[dict[str, object]]:
    return psycopg.connect(pg.login_url_for(database_url, API_ROLE), row_factory=dict_row)


def _record(database_url: str, *uses: KeyUse) -> dict[UUID, datetime]:
    with _api(database_url) as conn, conn.transaction():
        return record_key_uses(conn, uses, interval=INTERVAL, statement_timeout_ms=5000)


def _stored(database_url: str, key_id: UUID) -> tuple[datetime, int] | None:
    """The key's stored use and its row version (``xmin``: a rewrite changes it)."""
    with psycopg.connect(database_url) as owner:
        row = owner.execute(
            "SELECT last_used_at, xmin::text::bigint FROM api_key_uses WHERE key_id = %s",
            (key_id,),
        ).fetchone()
    return None if row is None else (row[0], row[1])


def test_a_use_inside_the_interval_rewrites_nothing_and_is_answered_the_stored_one(
    database_url: str,
) -> None:
    key, workspace = uuid4(), uuid4()
    assert _record(database_url, KeyUse(key, workspace, T0)) == {key: T0}
    first = _stored(database_url, key)
    assert first is not None
    assert first[0] == T0

    # Another API process saw a use 59 s later: the row stays as it was, and that process is
    # told what is stored, so it waits until T0 + 60 s rather than until T0 + 119 s.
    later = T0 + INTERVAL - timedelta(seconds=1)
    assert _record(database_url, KeyUse(key, workspace, later)) == {key: T0}
    assert _stored(database_url, key) == first

    # A use an interval on is written.
    assert _record(database_url, KeyUse(key, workspace, T0 + INTERVAL)) == {key: T0 + INTERVAL}
    # Never backwards: a late-arriving older use changes nothing.
    assert _record(database_url, KeyUse(key, workspace, T0)) == {key: T0 + INTERVAL}
    stored = _stored(database_url, key)
    assert stored is not None
    assert stored[0] == T0 + INTERVAL


def test_the_api_role_reads_and_writes_uses_of_its_transactions_workspace_only(
    database_url: str,
) -> None:
    mine, theirs = uuid4(), uuid4()
    key = uuid4()
    _record(database_url, KeyUse(key, theirs, T0))
    before = _stored(database_url, key)
    with _api(database_url) as conn:
        with conn.transaction():
            conn.execute("SELECT set_config('agentworks.workspace_id', %s, true)", (str(mine),))
            assert key_last_used(conn, key) is None  # another workspace's key looks unused
        with conn.transaction():
            conn.execute("SELECT set_config('agentworks.workspace_id', %s, true)", (str(theirs),))
            assert key_last_used(conn, key) == T0
        with conn.transaction():
            conn.execute("SELECT set_config('agentworks.workspace_id', %s, true)", (str(mine),))
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(
                    "INSERT INTO api_key_uses (key_id, workspace_id, last_used_at)"
                    " VALUES (%s, %s, now())",
                    (uuid4(), theirs),
                )
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("DELETE FROM api_key_uses")
    assert _stored(database_url, key) == before
