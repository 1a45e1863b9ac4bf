"""A fresh database per benchmark run, so figures never depend on what an earlier run left."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from uuid import uuid4

import psycopg


@contextmanager
def fresh_database(server: str) -> Iterator[str]:
    """The URL of a new empty database on ``server`` (a URL without a database), dropped when
    the run is done with it, whatever happened meanwhile."""
    name = f"aw_bench_{uuid4().hex[:10]}"
    admin = f"{server}/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{server}/{name}"
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
