"""The SQL migrations runner (infra/migrate.py) against the real PostgreSQL."""

from __future__ import annotations

import hashlib
import threading
from typing import TYPE_CHECKING

import pg
import psycopg
import pytest
import structlog

from infra.migrate import (
    LOCK_TIMEOUT_SECONDS,
    MigrationError,
    applied_versions,
    discover,
    ensure_database,
    migrate,
)

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path


@pytest.fixture
def empty_database(postgres: None) -> Iterator[str]:
    """A database with nothing in it (no migrations), dropped afterwards."""
    with pg.temporary_database(pg.random_name("aw_t_")) as url:
        yield url


def _write(directory: Path, files: dict[str, str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name).write_text(text)
    return directory


def _rows(url: str, query: str) -> list[tuple[object, ...]]:
    with psycopg.connect(url) as conn:
        return list(conn.execute(query.encode()).fetchall())


class TestApplying:
    def test_applies_files_in_version_order_each_recorded(
        self, empty_database: str, tmp_path: Path
    ) -> None:
        # Named so that directory order and version order differ; each depends on the one before.
        directory = _write(
            tmp_path / "m",
            {
                "0003_add_rows.sql": "INSERT INTO log (step) VALUES (3);",
                "0001_create.sql": "CREATE TABLE log (step int NOT NULL);\n"
                "INSERT INTO log (step) VALUES (1);",
                "0002_more.sql": "ALTER TABLE log ADD COLUMN note text;\n"
                "INSERT INTO log (step, note) VALUES (2, 'two; with a semicolon');",
                "README.txt": "not a migration",
            },
        )

        applied = migrate(empty_database, directory=directory)

        assert applied == ["0001", "0002", "0003"]
        assert _rows(empty_database, "SELECT step FROM log ORDER BY step") == [(1,), (2,), (3,)]
        assert applied_versions(empty_database) == ["0001", "0002", "0003"]
        stamps = _rows(empty_database, "SELECT applied_at IS NOT NULL FROM schema_migrations")
        assert stamps == [(True,)] * 3

    def test_running_again_applies_nothing(self, empty_database: str, tmp_path: Path) -> None:
        directory = _write(
            tmp_path / "m", {"0001_create.sql": "CREATE TABLE once (id int PRIMARY KEY);"}
        )
        migrate(empty_database, directory=directory)

        assert migrate(empty_database, directory=directory) == []
        assert applied_versions(empty_database) == ["0001"]

    def test_only_new_files_are_applied_later(self, empty_database: str, tmp_path: Path) -> None:
        directory = _write(tmp_path / "m", {"0001_create.sql": "CREATE TABLE t (id int);"})
        migrate(empty_database, directory=directory)
        _write(directory, {"0002_index.sql": "CREATE INDEX t_id ON t (id);"})

        assert migrate(empty_database, directory=directory) == ["0002"]

    def test_a_failing_file_is_rolled_back_and_later_files_wait(
        self, empty_database: str, tmp_path: Path
    ) -> None:
        directory = _write(
            tmp_path / "m",
            {
                "0001_ok.sql": "CREATE TABLE a (id int);",
                "0002_broken.sql": "CREATE TABLE b (id int);\nSELECT * FROM no_such_table;",
                "0003_after.sql": "CREATE TABLE c (id int);",
            },
        )

        with pytest.raises(MigrationError, match=r"0002_broken\.sql"):
            migrate(empty_database, directory=directory)

        assert applied_versions(empty_database) == ["0001"]
        tables = _rows(
            empty_database,
            "SELECT tablename FROM pg_tables WHERE tablename IN ('a', 'b', 'c') ORDER BY 1",
        )
        assert tables == [("a",)]

    def test_app_role_setting_is_visible_to_migration_sql(
        self, empty_database: str, tmp_path: Path
    ) -> None:
        directory = _write(
            tmp_path / "m",
            {
                "0001_role.sql": "CREATE TABLE r AS "
                "SELECT current_setting('agentworks.app_role') AS role;"
            },
        )

        migrate(empty_database, directory=directory, app_role="custom_app_role")

        assert _rows(empty_database, "SELECT role FROM r") == [("custom_app_role",)]

    def test_packaged_migrations_apply_cleanly_and_idempotently(self, empty_database: str) -> None:
        shipped = [m.version for m in discover()]

        assert migrate(empty_database) == shipped
        assert migrate(empty_database) == []


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _checksums(url: str) -> list[tuple[object, ...]]:
    return _rows(url, "SELECT version, checksum FROM schema_migrations ORDER BY version")


TABLE_T = "CREATE TABLE t (id int);"


def _applied_t(url: str, tmp_path: Path) -> Path:
    """A migrations directory holding ``0001_t.sql`` (:data:`TABLE_T`), applied to ``url``."""
    directory = _write(tmp_path / "m", {"0001_t.sql": TABLE_T})
    migrate(url, directory=directory)
    return directory


class TestChecksums:
    def test_each_applied_file_is_recorded_with_the_sha256_of_its_text(
        self, empty_database: str, tmp_path: Path
    ) -> None:
        first, second = TABLE_T, "CREATE INDEX t_id ON t (id);\n"
        directory = _write(tmp_path / "m", {"0001_t.sql": first, "0002_index.sql": second})

        migrate(empty_database, directory=directory)

        assert _checksums(empty_database) == [("0001", _sha256(first)), ("0002", _sha256(second))]

    def test_an_applied_file_changed_later_is_refused_by_name_and_nothing_runs(
        self, empty_database: str, tmp_path: Path
    ) -> None:
        directory = _applied_t(empty_database, tmp_path)
        edited = "CREATE TABLE t (id bigint);"
        _write(directory, {"0001_t.sql": edited, "0002_u.sql": "CREATE TABLE u (id int);"})

        with pytest.raises(MigrationError) as refused:
            migrate(empty_database, directory=directory)

        message = str(refused.value)
        assert "0001_t.sql" in message
        assert _sha256(TABLE_T) in message
        assert _sha256(edited) in message
        assert applied_versions(empty_database) == ["0001"]  # 0002 waits for the file's fix
        assert _rows(empty_database, "SELECT to_regclass('u') IS NULL") == [(True,)]

    def test_rows_from_before_checksums_get_the_files_checksum_and_the_log_says_so(
        self, empty_database: str, tmp_path: Path
    ) -> None:
        # A database migrated by the runner from before checksums: its table had no such column.
        text = TABLE_T
        with psycopg.connect(empty_database, autocommit=True) as conn:
            conn.execute(
                "CREATE TABLE schema_migrations ("
                " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            conn.execute(text)
            conn.execute("INSERT INTO schema_migrations (version) VALUES ('0001')")
        directory = _write(tmp_path / "m", {"0001_t.sql": text})

        with structlog.testing.capture_logs() as logs:
            assert migrate(empty_database, directory=directory) == []

        assert _checksums(empty_database) == [("0001", _sha256(text))]
        recorded = [entry for entry in logs if entry["event"] == "migration.checksums_recorded"]
        assert len(recorded) == 1
        assert recorded[0]["versions"] == ["0001"]
        assert "trusting" in recorded[0]["note"]
        # From now on the file is held to that checksum.
        _write(directory, {"0001_t.sql": "CREATE TABLE t (id bigint);"})
        with pytest.raises(MigrationError, match=r"0001_t\.sql"):
            migrate(empty_database, directory=directory)

    def test_a_cleared_checksum_trusts_the_file_again(
        self, empty_database: str, tmp_path: Path
    ) -> None:
        directory = _applied_t(empty_database, tmp_path)
        edited = f"-- a comment only\n{TABLE_T}"
        _write(directory, {"0001_t.sql": edited})
        with psycopg.connect(empty_database, autocommit=True) as conn:
            conn.execute("UPDATE schema_migrations SET checksum = NULL WHERE version = '0001'")

        assert migrate(empty_database, directory=directory) == []
        assert _checksums(empty_database) == [("0001", _sha256(edited))]

    def test_a_runner_from_before_checksums_still_works_on_the_new_table(
        self, empty_database: str, tmp_path: Path
    ) -> None:
        # Old replicas may still be running during a rollout: the column is nullable.
        directory = _applied_t(empty_database, tmp_path)
        with psycopg.connect(empty_database, autocommit=True) as conn:
            conn.execute("INSERT INTO schema_migrations (version) VALUES ('0002')")

        _write(directory, {"0002_u.sql": "CREATE TABLE u (id int);"})
        assert migrate(empty_database, directory=directory) == []
        assert _checksums(empty_database)[1] == ("0002", _sha256("CREATE TABLE u (id int);"))


class TestLockTimeout:
    def test_migration_statements_run_with_the_lock_timeout(
        self, empty_database: str, tmp_path: Path
    ) -> None:
        seen = "CREATE TABLE seen AS SELECT current_setting('lock_timeout') AS v;"
        directory = _write(tmp_path / "m", {"0001_seen.sql": seen})

        migrate(empty_database, directory=directory)

        assert _rows(empty_database, "SELECT v FROM seen") == [(f"{LOCK_TIMEOUT_SECONDS:g}s",)]

    def test_a_migration_behind_a_long_read_gives_up_and_can_be_retried(
        self, empty_database: str, tmp_path: Path
    ) -> None:
        directory = _applied_t(empty_database, tmp_path)
        _write(directory, {"0002_alter.sql": "ALTER TABLE t ADD COLUMN note text;"})

        with psycopg.connect(empty_database) as reader:
            # A read still running (its transaction open) holds ACCESS SHARE on t.
            reader.execute("SELECT * FROM t").fetchall()
            with pytest.raises(MigrationError) as gave_up:
                migrate(empty_database, directory=directory, lock_timeout=0.2)
            reader.rollback()

        message = str(gave_up.value)
        assert "0002_alter.sql" in message
        assert "lock" in message
        assert "retried" in message
        assert applied_versions(empty_database) == ["0001"]
        assert migrate(empty_database, directory=directory, lock_timeout=0.2) == ["0002"]


class TestConcurrency:
    @pytest.mark.slow
    def test_concurrent_runs_apply_each_migration_exactly_once(
        self, empty_database: str, tmp_path: Path
    ) -> None:
        # pg_sleep makes the first runner hold the lock while the others queue behind it;
        # without the lock, a second runner would fail on CREATE TABLE or insert twice.
        directory = _write(
            tmp_path / "m",
            {
                "0001_slow.sql": "SELECT pg_sleep(0.5); CREATE TABLE counted (n int);",
                "0002_count.sql": "INSERT INTO counted VALUES (1);",
            },
        )
        results: list[list[str]] = []
        errors: list[BaseException] = []
        start = threading.Barrier(4)

        def run() -> None:
            start.wait()
            try:
                results.append(migrate(empty_database, directory=directory))
            except BaseException as exc:  # noqa: BLE001 - any error, reported below
                errors.append(exc)

        threads = [threading.Thread(target=run) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)

        assert errors == []
        assert sorted(results, key=len) == [[], [], [], ["0001", "0002"]]
        assert _rows(empty_database, "SELECT count(*) FROM counted") == [(1,)]
        assert applied_versions(empty_database) == ["0001", "0002"]


class TestDiscovery:
    def test_misnamed_sql_file_is_refused(self, tmp_path: Path) -> None:
        directory = _write(tmp_path / "m", {"1_short.sql": "SELECT 1;"})

        with pytest.raises(MigrationError, match="NNNN_description"):
            discover(directory)

    def test_duplicate_versions_are_refused(self, tmp_path: Path) -> None:
        directory = _write(tmp_path / "m", {"0001_a.sql": "", "0001_b.sql": ""})

        with pytest.raises(MigrationError, match="share version 0001"):
            discover(directory)

    def test_missing_explicit_directory_is_refused(self, tmp_path: Path) -> None:
        with pytest.raises(MigrationError, match="does not exist"):
            discover(tmp_path / "nowhere")

    def test_packaged_migrations_are_found(self) -> None:
        versions = [m.version for m in discover()]

        assert versions == sorted(versions)
        assert all(len(v) == 4 and v.isdigit() for v in versions)


class TestEnsureDatabase:
    def test_creates_a_missing_database_and_leaves_an_existing_one(self, postgres: None) -> None:
        name = pg.random_name("aw_t_")
        url = pg.url_for(name)
        try:
            ensure_database(url)
            assert pg.database_exists(name)
            with psycopg.connect(url) as conn:
                conn.execute("CREATE TABLE kept (id int)")

            ensure_database(url)

            assert _rows(url, "SELECT count(*) FROM kept") == [(0,)]
        finally:
            pg.drop_database(name)

    def test_unreachable_server_is_a_migration_error(self) -> None:
        with pytest.raises(MigrationError, match="cannot connect"):
            migrate("postgresql://postgres@127.0.0.1:1/nothing", connect_timeout=2)


def test_database_url_fixture_is_a_migrated_private_database(
    database_url: str, migrated_template: str
) -> None:
    # A copy of the session's template (whose migrations were those on disk at session start).
    assert applied_versions(database_url) == applied_versions(pg.url_for(migrated_template))
    assert applied_versions(database_url) != []
    assert database_url.rsplit("/", 1)[1].startswith(f"{pg.SESSION_PREFIX}t_")
    assert migrated_template.startswith(f"{pg.SESSION_PREFIX}tmpl_")
