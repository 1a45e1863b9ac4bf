"""The composition root: builds the write side (and later everything else) from settings, once."""

from __future__ import annotations

from typing import TYPE_CHECKING

from psycopg.conninfo import conninfo_to_dict

from adapters.eventstore import DB_ROLE_ENV, PostgresCommandLog
from commands.handlers import AgentWorks

if TYPE_CHECKING:
    from infra.settings import Settings


def event_store_env(database_url: str, *, db_role: str, pool_size: int) -> dict[str, str]:
    """The eventsourcing library's configuration for our store, from a database URL.

    Tables come from migrations (``agentworks migrate``), never from the library: the application
    role may not create, alter, update or delete anything in the store.
    """
    parts = conninfo_to_dict(database_url)
    return {
        "PERSISTENCE_MODULE": "adapters.eventstore:Factory",
        "POSTGRES_DBNAME": str(parts.get("dbname") or ""),
        "POSTGRES_HOST": str(parts.get("host") or "127.0.0.1"),
        "POSTGRES_PORT": str(parts.get("port") or "5432"),
        "POSTGRES_USER": str(parts.get("user") or "postgres"),
        "POSTGRES_PASSWORD": str(parts.get("password") or ""),
        "POSTGRES_POOL_SIZE": str(pool_size),
        "POSTGRES_MAX_OVERFLOW": str(pool_size),
        "POSTGRES_CONN_MAX_AGE": "3600",
        "POSTGRES_PRE_PING": "n",
        "POSTGRES_IDLE_IN_TRANSACTION_SESSION_TIMEOUT": "10",
        "CREATE_TABLE": "n",
        "AGGREGATE_CACHE_MAXSIZE": "10000",
        "AGGREGATE_CACHE_FASTFORWARD": "y",
        DB_ROLE_ENV: db_role,
    }


def build_write_side(
    database_url: str, *, db_role: str = "agentworks_app", pool_size: int = 10, retries: int = 5
) -> AgentWorks:
    env = event_store_env(database_url, db_role=db_role, pool_size=pool_size)
    app = AgentWorks(env, retries=retries)
    app.command_log = PostgresCommandLog(app.factory.datastore)  # type: ignore[attr-defined]
    return app


def write_side_from(settings: Settings, database_url: str) -> AgentWorks:
    return build_write_side(
        database_url,
        db_role=settings.db_app_role,
        pool_size=settings.pool_size,
        retries=settings.command_retries,
    )
