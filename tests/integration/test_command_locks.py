"""Turns of the executions of one commandId (adapters/command_locks.py), on the real database.

Two ``CommandLocks`` on one database stand for two API replicas. What must hold: an id held by
one waits the other's execution of it until it ends (and no longer than ``wait_seconds``); other
ids, and other scopes' same id, never wait; a turn is given back however its execution ends; a
lock session that broke neither holds its ids nor fails the next execution.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING
from uuid import uuid4

import psycopg
import pytest
from recorder_helpers import advisory_locks, until

from adapters.command_locks import NAMESPACE, CommandLocks, literal
from adapters.postgres import ResilientPool
from domain.errors import Unavailable
from infra.bootstrap import StoredAgentWorks, build_write_side

if TYPE_CHECKING:
    from collections.abc import Iterator

NOTHING = "SELECT NULL"
"""A look-up for tests that look nothing up."""
WAIT = 20.0
"""Long enough never to be reached by a test that expects no wait: reaching it fails it."""


@pytest.fixture
def app(database_url: str) -> Iterator[StoredAgentWorks]:
    with contextlib.closing(build_write_side(database_url, pool_size=2)) as write_side:
        yield write_side


def locks_of(
    app: StoredAgentWorks, *, wait_seconds: float = WAIT
) -> contextlib.closing[CommandLocks]:
    pool = app.store.datastore.pool
    assert isinstance(pool, ResilientPool)
    return contextlib.closing(CommandLocks.beside(pool, wait_seconds=wait_seconds))


def test_another_replica_waits_for_the_id_until_its_run_ends_and_then_sees_its_record(
    app: StoredAgentWorks, database_url: str
) -> None:
    """The second execution's look-up runs once it holds the lock: it sees what the first
    committed before letting go."""
    command_id = str(uuid4())
    look_up = f"SELECT count(*) FROM command_log WHERE command_id = {literal(command_id)}"
    with locks_of(app) as one, locks_of(app) as two, ThreadPoolExecutor(1) as pool:

        def second() -> object:
            with two.one_at_a_time("ws", command_id, look_up) as row:
                return row

        with one.one_at_a_time("ws", command_id, look_up) as before:
            waiting = pool.submit(second)
            until(lambda: two.waiting == 1, "the second execution waits")
            with psycopg.connect(database_url) as conn:
                conn.execute(
                    "INSERT INTO command_log (scope, command_id, command_type, fingerprint,"
                    " actor, result) VALUES ('ws', %s, 'AssignCard', 'f', 'test', '{}')",
                    (command_id,),
                )
        assert before == (0,)
        assert waiting.result(timeout=60) == (1,)


def test_other_ids_other_scopes_and_this_process_do_not_wait(
    app: StoredAgentWorks, database_url: str
) -> None:
    """While one replica runs an id: another id, the same id in another scope, on either
    replica, get their turns at once (each would wait ``WAIT`` and fail otherwise)."""
    command_id = str(uuid4())
    with locks_of(app) as one, locks_of(app) as two, one.one_at_a_time("ws", command_id, NOTHING):
        for locks in (one, two):
            with locks.one_at_a_time("ws", str(uuid4()), NOTHING):
                pass
            with locks.one_at_a_time("other ws", command_id, NOTHING):
                pass
        assert one.waiting == two.waiting == 0
        until(lambda: advisory_locks(database_url, granted=True) == 1, "the others let go")
    until(lambda: advisory_locks(database_url, granted=True) == 0, "every lock is let go")


def test_the_wait_for_another_replicas_run_is_bounded(app: StoredAgentWorks) -> None:
    command_id = str(uuid4())
    with (
        locks_of(app) as one,
        locks_of(app, wait_seconds=0.2) as two,
        one.one_at_a_time("ws", command_id, NOTHING),
        pytest.raises(Unavailable, match=f"commandId {command_id} is still running"),
        two.one_at_a_time("ws", command_id, NOTHING),
    ):
        pass


def test_a_run_that_raises_gives_its_turn_back(app: StoredAgentWorks, database_url: str) -> None:
    command_id = str(uuid4())
    with locks_of(app) as one, locks_of(app) as two:
        with pytest.raises(RuntimeError), one.one_at_a_time("ws", command_id, NOTHING):
            raise RuntimeError("refused")
        with two.one_at_a_time("ws", command_id, NOTHING):
            pass
        with one.one_at_a_time("ws", command_id, NOTHING):
            pass
    assert advisory_locks(database_url, granted=True) == 0


def test_a_broken_lock_session_lets_go_and_the_next_run_gets_a_new_one(
    app: StoredAgentWorks, database_url: str
) -> None:
    """The shared session killed under a held id (a database restart, an idle timeout): the
    server let go of its locks; the run ends without error, and the next takes a new session."""
    command_id = str(uuid4())
    with locks_of(app) as one, locks_of(app, wait_seconds=0.2) as two:
        with one.one_at_a_time("ws", command_id, NOTHING):
            with psycopg.connect(database_url, autocommit=True) as admin:
                admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_locks "
                    "WHERE locktype = 'advisory' AND classid = %s",
                    (NAMESPACE,),
                )
            until(lambda: advisory_locks(database_url, granted=True) == 0, "the session ended")
            with two.one_at_a_time("ws", command_id, NOTHING):
                pass
        with one.one_at_a_time("ws", command_id, NOTHING):
            until(lambda: advisory_locks(database_url, granted=True) == 1, "only this one holds")
    assert advisory_locks(database_url, granted=True) == 0


def test_the_server_probes_lock_sessions_so_a_dead_hosts_ids_are_let_go(
    app: StoredAgentWorks,
) -> None:
    """A replica whose host dies leaves its lock session open on the server until TCP says it is
    gone; the server's keepalive probes on the session bound that to about a minute."""
    probes = (
        "SELECT current_setting('tcp_keepalives_idle'), current_setting('tcp_keepalives_count')"
    )
    with locks_of(app) as one, one.one_at_a_time("ws", str(uuid4()), probes) as row:
        assert row is not None
        assert tuple(row) == ("30", "3")


def test_text_is_quoted_as_one_literal(app: StoredAgentWorks) -> None:
    """The look-up's text goes in as literals: quotes and backslashes in a scope stay text."""
    scope = "user:o'brien\\'; SELECT 1; --"
    with locks_of(app) as locks, locks.one_at_a_time(scope, "x", f"SELECT {literal(scope)}") as row:
        assert row == (scope,)
