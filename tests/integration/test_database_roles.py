"""Least privilege at the database: every component logs in as a role of its own.

Each test logs in exactly as a process does (the role's own login, never ``SET ROLE`` from a more
powerful user), so ``RESET ROLE`` has nothing to go back to. Two tenants' boards, projected, give
every role something it must not see or touch.
"""

from __future__ import annotations

import shutil
import threading
from typing import TYPE_CHECKING
from uuid import UUID, uuid4

import pg
import psycopg
import pytest
from board_helpers import LANES, bootstrap_board
from psycopg import sql

from adapters.postgres import API_ROLE, PROJECTOR_ROLE, RELAY_ROLE
from commands import models as m
from infra.bootstrap import build_read_side, component_url, write_side_from
from infra.migrate import DEFAULT_APP_ROLE, MigrationError, default_directory, migrate
from infra.settings import Settings
from streams.embedded import EmbeddedFanout

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from commands.handlers import AgentWorks

WRITER_ROLE = DEFAULT_APP_ROLE
ROLES = (WRITER_ROLE, API_ROLE, PROJECTOR_ROLE, RELAY_ROLE)

READ_MODELS = (
    "rm_workspaces", "rm_members", "rm_projects", "rm_lanes", "rm_cards", "rm_runs",
    "rm_log_lines", "rm_charges", "rm_ledger_entries", "rm_usage_daily", "rm_statement_lines",
    "rm_monthly_spend", "rm_activity",
)  # fmt: skip

CHANGES = {
    "update": "UPDATE agentworks_events SET topic = 'rewritten'",
    "delete": "DELETE FROM agentworks_events",
    "truncate": "TRUNCATE agentworks_events",
}

_INSERT_EVENT = (
    "INSERT INTO agentworks_events (originator_id, originator_version, topic, state)"
    " VALUES (%s, 1, 'planted', '{}')"
)


@pytest.fixture
def tenants(database_url: str, write_side: AgentWorks, tmp_path: Path) -> tuple[UUID, UUID]:
    """Two workspaces, each with a card and a run, projected into every read model."""
    settings = Settings.load(data_dir=tmp_path, **pg.LOGIN_SETTINGS)
    read_side = build_read_side(settings, database_url)
    try:
        boards = [bootstrap_board(write_side, owner=owner, lanes=LANES) for owner in ("al", "bo")]
        for board in boards:
            card = write_side.create_card(
                m.CreateCard(project_id=board.project_id, title="t"), board.owner
            )
            write_side.start_agent_run(m.StartAgentRun(card_id=card.id, agent="coder"), board.owner)
        EmbeddedFanout(read_side.event_log, read_side.runners).drain()
    finally:
        read_side.close()
    return boards[0].workspace_id, boards[1].workspace_id


@pytest.fixture(params=ROLES)
def as_role(request: pytest.FixtureRequest, database_url: str) -> Iterator[psycopg.Connection]:
    """A connection logged in as each component's role in turn (autocommit)."""
    with psycopg.connect(pg.login_url_for(database_url, request.param), autocommit=True) as conn:
        yield conn


def _connect(database_url: str, role: str) -> psycopg.Connection:
    return psycopg.connect(pg.login_url_for(database_url, role), autocommit=True)


def _count(conn: psycopg.Connection, table: str, where: str = "true") -> int:
    row = conn.execute(
        sql.SQL("SELECT count(*) FROM {} WHERE ").format(sql.Identifier(table)) + sql.SQL(where)
    ).fetchone()
    assert row is not None
    return int(row[0])


def _event_workspaces(database_url: str) -> dict[UUID | None, int]:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT workspace_id, count(*) FROM agentworks_events GROUP BY 1"
        ).fetchall()
    return {row[0]: int(row[1]) for row in rows}


class TestLogin:
    def test_each_role_logs_in_as_itself_without_superuser_powers(
        self, as_role: psycopg.Connection
    ) -> None:
        row = as_role.execute(
            "SELECT session_user::text, current_user::text, rolsuper, rolbypassrls, rolcreaterole,"
            " rolcreatedb, rolreplication FROM pg_roles WHERE rolname = session_user"
        ).fetchone()
        assert row is not None
        session_user, current_user, *powers = row
        assert session_user == current_user
        assert session_user in ROLES
        assert powers == [False] * 5
        member_of = as_role.execute(
            "SELECT count(*) FROM pg_auth_members WHERE member = session_user::regrole"
        ).fetchone()
        assert member_of == (0,)

    def test_reset_role_gains_nothing(self, as_role: psycopg.Connection) -> None:
        (role,) = as_role.execute("SELECT session_user::text").fetchone() or ("",)
        as_role.execute("RESET ROLE")
        assert as_role.execute("SELECT current_user::text").fetchone() == (role,)
        for other in ("postgres", *(r for r in ROLES if r != role)):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                as_role.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(other)))

    @pytest.mark.parametrize("change", sorted(CHANGES))
    def test_no_role_may_change_stored_events(
        self, tenants: tuple[UUID, UUID], as_role: psycopg.Connection, database_url: str,
        change: str,
    ) -> None:  # fmt: skip
        before = _event_workspaces(database_url)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            as_role.execute(CHANGES[change])
        assert _event_workspaces(database_url) == before


class TestApiRole:
    def test_without_a_workspace_it_reads_no_event_and_no_read_model_row(
        self, tenants: tuple[UUID, UUID], database_url: str
    ) -> None:
        assert sum(_event_workspaces(database_url).values()) > 0
        with _connect(database_url, API_ROLE) as conn:
            conn.execute("RESET ROLE")
            assert _count(conn, "agentworks_events") == 0
            for table in READ_MODELS:
                assert _count(conn, table) == 0, table

    def test_with_a_workspace_it_reads_exactly_that_workspace_s_events(
        self, tenants: tuple[UUID, UUID], database_url: str
    ) -> None:
        first, second = tenants
        by_workspace = _event_workspaces(database_url)
        assert by_workspace.get(first, 0) > 0
        assert by_workspace.get(second, 0) > 0
        with _connect(database_url, API_ROLE) as conn, conn.transaction():
            conn.execute("SELECT set_config('agentworks.workspace_id', %s, true)", (str(first),))
            seen = conn.execute(
                "SELECT workspace_id, count(*) FROM agentworks_events GROUP BY 1"
            ).fetchall()
            assert {row[0]: int(row[1]) for row in seen} == {first: by_workspace[first]}
            # The recorder filled the column from each event's own metadata.
            states = conn.execute("SELECT convert_from(state, 'UTF8') FROM agentworks_events")
            assert all(str(first) in row[0] for row in states.fetchall())

    def test_it_may_read_the_log_head_but_not_write(
        self, tenants: tuple[UUID, UUID], database_url: str
    ) -> None:
        with _connect(database_url, API_ROLE) as conn:
            (head,) = conn.execute("SELECT agentworks_log_head()").fetchone() or (0,)
            assert head == sum(_event_workspaces(database_url).values())
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(_INSERT_EVENT, (uuid4(),))
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("DELETE FROM rm_cards")


class TestWriterRole:
    def test_it_reads_and_appends_every_workspace_s_events(
        self, tenants: tuple[UUID, UUID], database_url: str
    ) -> None:
        total = sum(_event_workspaces(database_url).values())
        with _connect(database_url, WRITER_ROLE) as conn:
            assert _count(conn, "agentworks_events") == total
            conn.execute(_INSERT_EVENT, (uuid4(),))
        assert _event_workspaces(database_url)[None] == 1

    @pytest.mark.parametrize(
        "statement",
        [
            "INSERT INTO rm_cards (workspace_id, card_id, project_id, title, description, lane,"
            " position, version, created_at, updated_at) SELECT workspace_id, gen_random_uuid(),"
            " project_id, 'x', '', lane, position, 1, now(), now() FROM rm_cards LIMIT 1",
            "UPDATE rm_cards SET title = 'hacked'",
            "DELETE FROM rm_workspaces",
            "UPDATE projection_positions SET position = 0",
            "UPDATE relay_positions SET position = 0",
        ],
    )
    def test_it_cannot_write_read_models_or_positions(
        self, tenants: tuple[UUID, UUID], database_url: str, statement: str
    ) -> None:
        with (
            _connect(database_url, WRITER_ROLE) as conn,
            pytest.raises(psycopg.errors.InsufficientPrivilege),
        ):
            conn.execute(statement)


class TestReaderRoles:
    @pytest.mark.parametrize("role", [PROJECTOR_ROLE, RELAY_ROLE])
    def test_projector_and_relay_read_the_whole_log_but_cannot_append(
        self, tenants: tuple[UUID, UUID], database_url: str, role: str
    ) -> None:
        before = _event_workspaces(database_url)
        with _connect(database_url, role) as conn:
            assert _count(conn, "agentworks_events") == sum(before.values())
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(_INSERT_EVENT, (uuid4(),))
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(
                    "INSERT INTO command_log (scope, command_id, command_type, fingerprint, actor,"
                    " result) VALUES ('*', gen_random_uuid(), 't', 'f', 'a', '{}')"
                )
        assert _event_workspaces(database_url) == before

    def test_the_relay_cannot_touch_read_models(
        self, tenants: tuple[UUID, UUID], database_url: str
    ) -> None:
        with _connect(database_url, RELAY_ROLE) as conn:
            for statement in ("SELECT count(*) FROM rm_cards", "DELETE FROM rm_cards"):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    conn.execute(statement)
            conn.execute("INSERT INTO relay_positions (relay, position) VALUES ('r', 1)")


class TestComposition:
    def test_every_component_built_from_settings_logs_in_as_its_role(
        self, database_url: str, tmp_path: Path
    ) -> None:
        from infra.stack import api_services
        from read_api.broadcast import LocalBroadcaster

        settings = Settings.load(data_dir=tmp_path, jwt_secret="s" * 40, **pg.LOGIN_SETTINGS)
        write = write_side_from(settings, database_url)
        read_side = build_read_side(settings, database_url)
        services = api_services(
            settings, database_url, write=write, broadcaster=LocalBroadcaster(), data_dir=tmp_path
        )
        try:
            with write.factory.datastore.get_connection() as conn:  # type: ignore[attr-defined]
                assert conn.execute("SELECT session_user::text AS u").fetchone()["u"] == WRITER_ROLE
            log_store = read_side.event_log.recorder.datastore
            with log_store.get_connection() as conn:
                assert conn.execute("SELECT session_user::text AS u").fetchone()["u"] == (
                    PROJECTOR_ROLE
                )
            for pool, role in ((read_side.pool, PROJECTOR_ROLE), (services.pool, API_ROLE)):
                with pool.connection() as conn:
                    row = conn.execute("SELECT session_user::text AS u").fetchone()
                    assert row is not None
                    assert row["u"] == role
            # /metrics reads lag as the API role: every gauge is there (a refused grant would
            # make the collector yield nothing at all).
            assert services.lag_collector is not None
            gauges = {family.name for family in services.lag_collector.collect()}
            assert {
                "agentworks_log_head_position",
                "agentworks_projector_lag_events",
                "agentworks_projector_parked_aggregates",
            } <= gauges
            relay_url = component_url(settings, database_url, "relay")
            with psycopg.connect(relay_url) as conn:
                assert conn.execute("SELECT session_user::text").fetchone() == (RELAY_ROLE,)
        finally:
            services.pool.close()
            read_side.close()
            write.close()


class TestMigrate:
    def test_existing_events_get_their_workspace_when_the_column_arrives(
        self, tmp_path: Path
    ) -> None:
        earlier = tmp_path / "earlier"
        earlier.mkdir()
        for migration in default_directory().iterdir():
            if migration.name.endswith(".sql") and migration.name < "0009":
                (earlier / migration.name).write_text(migration.read_text(encoding="utf-8"))
        name = pg.random_name("aw_t_roles_")
        url = pg.create_database(name)
        try:
            migrate(url, directory=earlier)
            workspace = uuid4()
            states = {
                uuid4(): (f'{{"meta": {{"workspace_id": "{workspace}"}}, "x": 1}}'.encode(), True),
                uuid4(): (b'{"meta": {"actor": "a"}}', False),
                uuid4(): (b"\xff\xfe not json", False),
            }
            with psycopg.connect(url) as conn:
                for originator, (state, _) in states.items():
                    conn.execute(
                        "INSERT INTO agentworks_events (originator_id, originator_version, topic,"
                        " state) VALUES (%s, 1, 't', %s)",
                        (originator, state),
                    )
            migrate(url, logins=pg.LOGIN_PASSWORDS)
            with psycopg.connect(url) as conn:
                rows: dict[UUID, UUID | None] = dict(
                    conn.execute("SELECT originator_id, workspace_id FROM agentworks_events")
                )
                (left_alone,) = conn.execute(
                    "SELECT count(*) FROM agentworks_events WHERE topic = 't'"
                ).fetchone() or (0,)
            assert rows == {o: (workspace if named else None) for o, (_, named) in states.items()}
            assert left_alone == 3
            with (
                psycopg.connect(url, autocommit=True) as owner,
                pytest.raises(psycopg.errors.InsufficientPrivilege, match="immutable"),
            ):
                owner.execute("UPDATE agentworks_events SET workspace_id = NULL")
        finally:
            pg.drop_database(name)
            shutil.rmtree(earlier, ignore_errors=True)

    @pytest.fixture
    def role(self, database_url: str) -> Iterator[str]:
        """A login role name no other test uses; the role is dropped at the end if it exists."""
        name = pg.random_name("aw_t_login_")
        yield name
        with pg.admin_connection() as admin:
            admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))

    def test_a_login_role_that_is_a_member_of_another_is_refused(
        self, database_url: str, role: str
    ) -> None:
        with pg.admin_connection() as admin:
            admin.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(role)))
            admin.execute(sql.SQL("GRANT agentworks_app TO {}").format(sql.Identifier(role)))
        with pytest.raises(MigrationError, match="member of agentworks_app"):
            migrate(database_url, logins={role: "pw"})

    def test_a_missing_login_role_is_created_with_a_hashed_password_reset_each_run(
        self, database_url: str, role: str
    ) -> None:
        query = "SELECT rolcanlogin, rolsuper, rolpassword FROM pg_authid WHERE rolname = %s"
        migrate(database_url, logins={role: "first"})
        with pg.admin_connection() as admin:
            first = admin.execute(query, (role,)).fetchone()
        migrate(database_url, logins={role: "second"})
        with pg.admin_connection() as admin:
            second = admin.execute(query, (role,)).fetchone()
        assert first is not None
        assert second is not None
        assert first[:2] == second[:2] == (True, False)
        assert first[2].startswith("SCRAM-SHA-256$")
        assert "first" not in first[2]
        assert second[2] != first[2]

    def test_sessions_migrating_their_own_databases_at_once_all_set_up_the_logins(
        self, postgres: None
    ) -> None:
        # Roles belong to the cluster: parallel test sessions (or deployments sharing a server)
        # create and alter the same ones at the same moment.
        names = [pg.random_name("aw_t_roles_") for _ in range(4)]
        urls = [pg.create_database(name) for name in names]
        errors: list[BaseException] = []

        def run(url: str) -> None:
            try:
                migrate(url, logins=pg.LOGIN_PASSWORDS)
            except BaseException as error:  # noqa: BLE001 - any error, reported below
                errors.append(error)

        threads = [threading.Thread(target=run, args=(url,)) for url in urls]
        try:
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(120)
            assert errors == []
            for url in urls:
                with psycopg.connect(pg.login_url_for(url, RELAY_ROLE)) as conn:
                    assert conn.execute("SELECT agentworks_log_head()").fetchone() == (0,)
        finally:
            for name in names:
                pg.drop_database(name)
