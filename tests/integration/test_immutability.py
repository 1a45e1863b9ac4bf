"""The database, not convention, keeps stored events immutable.

The application's role may only INSERT and SELECT the events table; a trigger refuses UPDATE,
DELETE and TRUNCATE even to the table's owner. The write side itself logs in as that role.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING
from uuid import uuid4

import pg
import psycopg
import pytest
from board_helpers import stored_rows
from eventsourcing.persistence import ProgrammingError

if TYPE_CHECKING:
    from collections.abc import Iterator

    from board_helpers import Board

    from commands.handlers import AgentWorks

APP_ROLE = "agentworks_app"

CHANGES = {
    "update": "UPDATE agentworks_events SET topic = 'rewritten'",
    "delete": "DELETE FROM agentworks_events",
    "truncate": "TRUNCATE agentworks_events",
}


@pytest.fixture
def as_app(database_url: str) -> Iterator[psycopg.Connection]:
    """A connection logged in as the application's role."""
    with psycopg.connect(pg.login_url_for(database_url, APP_ROLE), autocommit=True) as conn:
        yield conn


@pytest.fixture
def as_owner(database_url: str) -> Iterator[psycopg.Connection]:
    """A connection as the table's owner (the superuser that ran the migrations)."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        yield conn


def _insert(conn: psycopg.Connection) -> int:
    row = conn.execute(
        "INSERT INTO agentworks_events (originator_id, originator_version, topic, state) "
        "VALUES (%s, 1, 'inserted', '') RETURNING notification_id",
        (uuid4(),),
    ).fetchone()
    assert row is not None
    return int(row[0])


@contextlib.contextmanager
def events_unchanged(database_url: str) -> Iterator[None]:
    """The block leaves every stored event as it was."""
    before = stored_rows(database_url)
    yield
    assert stored_rows(database_url) == before


class TestApplicationRole:
    @pytest.mark.parametrize("change", sorted(CHANGES))
    def test_app_role_cannot_change_stored_events(
        self, board: Board, as_app: psycopg.Connection, database_url: str, change: str
    ) -> None:
        assert stored_rows(database_url)

        with (
            events_unchanged(database_url),
            pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied"),
        ):
            as_app.execute(CHANGES[change])

    @pytest.mark.parametrize(
        "statement",
        [
            "UPDATE agentworks_snapshots SET topic = topic",
            "DELETE FROM agentworks_snapshots",
            "UPDATE command_log SET result = result",
            "DELETE FROM command_log",
        ],
    )
    def test_app_role_cannot_change_snapshots_or_command_records(
        self, as_app: psycopg.Connection, statement: str
    ) -> None:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            as_app.execute(statement)

    def test_app_role_can_insert_and_select_events(
        self, as_app: psycopg.Connection, database_url: str
    ) -> None:
        notification_id = _insert(as_app)

        row = as_app.execute(
            "SELECT topic, current_user FROM agentworks_events WHERE notification_id = %s",
            (notification_id,),
        ).fetchone()
        assert row == ("inserted", APP_ROLE)

    def test_write_side_logs_in_as_app_role(self, write_side: AgentWorks) -> None:
        with write_side.factory.datastore.get_connection() as conn:  # type: ignore[attr-defined]
            row = conn.execute("SELECT current_user, session_user").fetchone()
        assert row == {"current_user": APP_ROLE, "session_user": APP_ROLE}

    def test_write_side_connections_cannot_change_events(
        self, write_side: AgentWorks, board: Board, database_url: str
    ) -> None:
        with events_unchanged(database_url):
            for statement in CHANGES.values():
                # The library's datastore translates psycopg's errors into its own.
                with (
                    pytest.raises(ProgrammingError, match="permission denied") as refused,
                    write_side.factory.datastore.get_connection() as conn,  # type: ignore[attr-defined]
                ):
                    conn.execute(statement)
                assert isinstance(refused.value.__cause__, psycopg.errors.InsufficientPrivilege)


class TestTableOwner:
    @pytest.mark.parametrize("change", sorted(CHANGES))
    def test_trigger_refuses_changes_even_to_the_owner(
        self, board: Board, as_owner: psycopg.Connection, database_url: str, change: str
    ) -> None:
        with (
            events_unchanged(database_url),
            pytest.raises(psycopg.errors.InsufficientPrivilege, match="immutable"),
        ):
            as_owner.execute(CHANGES[change])

    def test_owner_may_still_append(self, as_owner: psycopg.Connection) -> None:
        assert _insert(as_owner) >= 1
