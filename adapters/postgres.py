"""PostgreSQL connection pools for the read side, each running as its own database role."""

from __future__ import annotations

from psycopg import Connection
from psycopg.rows import DictRow, dict_row
from psycopg_pool import ConnectionPool

PROJECTOR_ROLE = "agentworks_projector"
API_ROLE = "agentworks_api"


def make_pool(
    database_url: str,
    *,
    role: str,
    min_size: int = 1,
    max_size: int = 4,
    name: str = "agentworks",
) -> ConnectionPool[Connection[DictRow]]:
    """A pool whose sessions ``SET ROLE`` to ``role`` at connect time.

    Privileges and row-level security then apply to everything the component does, not only to
    the queries someone remembered to scope.
    """
    pool: ConnectionPool[Connection[DictRow]] = ConnectionPool(
        database_url,
        min_size=min_size,
        max_size=max_size,
        kwargs={"options": f"-c role={role}", "row_factory": dict_row},
        connection_class=Connection[DictRow],
        name=name,
        open=False,
    )
    pool.open(wait=True, timeout=30)
    return pool
