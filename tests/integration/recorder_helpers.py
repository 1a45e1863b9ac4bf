"""Helpers for tests that drive the event store recorder (adapters/eventstore.py) directly.

A library datastore logged in as the application role, the recorder on the table our migration
creates, stored events and command records to append, a count of the advisory locks that
serialise appends and of the sessions waiting on another's transaction, and ``until`` to wait
for one of those states: ``test_event_store_recorder``, ``test_group_commit`` and
``test_idempotency`` use them.
"""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING
from uuid import UUID, uuid4

import pg
import psycopg
from eventsourcing.persistence import StoredEvent
from eventsourcing.postgres import PostgresDatastore
from psycopg.conninfo import conninfo_to_dict

from adapters.eventstore import EventStoreRecorder
from domain.idempotency import CommandRecord

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

EVENTS_TABLE = "agentworks_events"
APP_ROLE = "agentworks_app"


def make_datastore(
    database_url: str, *, pool_size: int = 2, max_overflow: int = 2, options: str = ""
) -> PostgresDatastore:
    """A library datastore on ``database_url`` whose connections log in as the application role."""
    parts = conninfo_to_dict(pg.login_url_for(database_url, APP_ROLE))
    datastore = PostgresDatastore(
        dbname=str(parts["dbname"]),
        host=str(parts.get("host") or "127.0.0.1"),
        port=str(parts.get("port") or "5432"),
        user=str(parts.get("user") or "postgres"),
        password=str(parts.get("password") or ""),
        pool_size=pool_size,
        max_overflow=max_overflow,
    )
    kwargs = datastore.pool.kwargs
    assert isinstance(kwargs, dict)
    if options:
        kwargs["options"] = options
    return datastore


def make_recorder(datastore: PostgresDatastore) -> EventStoreRecorder:
    # The table, its composite type and the grants come from the migration: the application
    # role may not create anything, so ``create_table()`` is never called.
    return EventStoreRecorder(datastore, events_table_name=EVENTS_TABLE)


@contextlib.contextmanager
def open_recorder(database_url: str) -> Iterator[EventStoreRecorder]:
    """A recorder on a datastore of its own, closed when the block ends."""
    datastore = make_datastore(database_url)
    try:
        yield make_recorder(datastore)
    finally:
        datastore.close()


def event(
    originator_id: UUID | str | None = None, version: int = 1, topic: str = "topic"
) -> StoredEvent:
    return StoredEvent(
        originator_id=originator_id or uuid4(),
        originator_version=version,
        topic=topic,
        state=b"{}",
    )


def command_record(command_id: str | None = None) -> CommandRecord:
    """The idempotency record of a command (a new command id of its own unless one is given)."""
    return CommandRecord(
        scope="ws",
        command_id=command_id or str(uuid4()),
        command_type="MoveCard",
        fingerprint="f",
        actor="alice",
        result={"kind": "card"},
    )


def advisory_locks(database_url: str, *, granted: bool) -> int:
    """How many advisory locks in this database are held (``granted``) or waited for."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted = %s "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            (granted,),
        ).fetchone()
    assert row is not None
    return int(row[0])


def transaction_waits(database_url: str) -> int:
    """How many sessions wait on another's transaction (a row or key it has not committed)."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'transactionid' AND NOT granted"
        ).fetchone()
    assert row is not None
    return int(row[0])


def until(check: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    """Wait until ``check()`` holds (a state other threads reach); fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.01)
