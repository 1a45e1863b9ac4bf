"""The event store's connections honour every parameter of the database URL, not only the
five the ``eventsourcing`` library takes (host, port, database, user, password).

``sslmode=verify-full`` with its ``sslrootcert``, ``target_session_attrs``, ``options``: an
operator's URL carries them for every process, and the write side, the projectors' and the
relay's log readers (built on the library's pool) dropped them: a connection that should have
verified the server's certificate fell back to libpq's ``prefer``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from psycopg.conninfo import conninfo_to_dict

from adapters.eventstore import Factory
from infra.bootstrap import event_store_env


def _with_query(url: str, query: str) -> str:
    return url + ("&" if "?" in url else "?") + query


def test_the_event_store_connects_with_the_url_s_other_parameters(database_url: str) -> None:
    url = _with_query(
        database_url, "application_name=aw-store-probe&options=-c%20statement_timeout%3D4321"
    )
    factory = Factory(event_store_env(url, db_role=None, pool_size=1))
    try:
        with factory.datastore.get_connection() as conn:
            name = conn.execute("SHOW application_name").fetchone()
            timeout = conn.execute("SHOW statement_timeout").fetchone()
    finally:
        factory.close()

    assert name is not None
    assert name["application_name"] == "aw-store-probe"
    assert timeout is not None
    assert timeout["statement_timeout"] == "4321ms"


def test_a_role_s_login_keeps_the_url_s_parameters(database_url: str) -> None:
    url = _with_query(database_url, "sslmode=verify-full&sslrootcert=/etc/ca.pem")

    env = event_store_env(url, db_role="agentworks_app", db_password="pw", pool_size=1)
    kwargs = Factory(env).datastore.pool.kwargs

    assert kwargs["sslmode"] == "verify-full"
    assert kwargs["sslrootcert"] == "/etc/ca.pem"
    assert kwargs["user"] == "agentworks_app"


def test_a_url_without_a_host_reaches_the_store_over_the_unix_socket(database_url: str) -> None:
    if not Path("/var/run/postgresql/.s.PGSQL.5432").exists():
        pytest.skip("no PostgreSQL socket in libpq's default directory")
    dbname = conninfo_to_dict(database_url)["dbname"]
    factory = Factory(
        event_store_env(f"postgresql://postgres@/{dbname}", db_role=None, pool_size=1)
    )
    try:
        with factory.datastore.get_connection() as conn:
            row = conn.execute("SELECT inet_server_addr() AS address").fetchone()
    finally:
        factory.close()

    assert row is not None
    assert row["address"] is None  # a socket, not TCP to 127.0.0.1
