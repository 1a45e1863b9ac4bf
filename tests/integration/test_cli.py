"""The ``agentworks`` command line, run as a user runs it: a separate process."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import jwt
import pg
import psycopg
import pytest
from board_helpers import whole_log
from credentials import rsa_pem_pair

from adapters.tokens import verify_token
from domain.roles import Role
from infra.cli import BOOTSTRAP_USER
from infra.migrate import applied_versions, discover
from projections.registry import projector_names

if TYPE_CHECKING:
    from collections.abc import Iterator

REPO = Path(__file__).resolve().parents[2]
SECRET = "cli-test-secret-" + "z" * 40
WS = "6b0c2a4e-3f4d-4c2b-9a51-0d5e8f7a1c01"
USER = "0f3e9d2c-5b6a-4e1f-8c7d-2a9b4e6f8d02"


def agentworks(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m infra.cli ARGS`` with no AGENTWORKS_* variables but those in ``env``."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AGENTWORKS_")}
    clean["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), clean.get("PYTHONPATH")]))
    clean.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "infra.cli", *args],
        cwd=cwd,
        env=clean,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int = 2) -> str:
    assert result.returncode == code, result
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("agentworks: error: ")
    return lines[0]


def assert_error_last(result: subprocess.CompletedProcess[str], code: int) -> str:
    """:func:`assert_one_line_error` for a command that may log (JSON lines) before it fails:
    the error is one line, the last."""
    assert result.returncode == code, result
    assert "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("agentworks: error: "), result.stderr
    return line


def single_token(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    assert lines[0].count(".") == 2
    return lines[0]


class TestToken:
    def test_bootstrap_token_uses_and_keeps_the_dev_secret(self, tmp_path: Path) -> None:
        data_dir = tmp_path / "data"

        token = single_token(
            agentworks("token", "--bootstrap", "--data-dir", str(data_dir), cwd=tmp_path)
        )

        secret_file = data_dir / "jwt_secret"
        assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
        principal = verify_token(token, secret=secret_file.read_text().strip())
        assert principal.is_bootstrap
        assert principal.workspace_id == "*"
        assert principal.role is Role.OWNER
        assert principal.user_id == BOOTSTRAP_USER

    def test_later_runs_reuse_the_kept_dev_secret(self, tmp_path: Path) -> None:
        data_dir = str(tmp_path / "data")
        first = single_token(
            agentworks("token", "--bootstrap", "--data-dir", data_dir, cwd=tmp_path)
        )
        kept = (tmp_path / "data" / "jwt_secret").read_text()

        second = single_token(
            agentworks(
                "token", "--workspace", WS, "--user", USER, "--role", "viewer",
                "--data-dir", data_dir, cwd=tmp_path,
            )
        )  # fmt: skip

        assert (tmp_path / "data" / "jwt_secret").read_text() == kept
        assert verify_token(first, secret=kept.strip()).is_bootstrap
        assert verify_token(second, secret=kept.strip()).role is Role.VIEWER

    def test_default_data_dir_comes_from_settings(self, tmp_path: Path) -> None:
        token = single_token(
            agentworks(
                "token", "--bootstrap", "--user", USER, cwd=tmp_path,
                env={"AGENTWORKS_DATA_DIR": str(tmp_path / "configured")},
            )
        )  # fmt: skip

        secret = (tmp_path / "configured" / "jwt_secret").read_text().strip()
        assert verify_token(token, secret=secret).user_id == USER

    def test_workspace_token_with_configured_secret_and_ttl(self, tmp_path: Path) -> None:
        token = single_token(
            agentworks(
                "token", "--workspace", WS, "--user", USER, "--role", "member",
                "--ttl", "120", cwd=tmp_path, env={"AGENTWORKS_JWT_SECRET": SECRET},
            )
        )  # fmt: skip

        principal = verify_token(token, secret=SECRET)
        assert (principal.workspace_id, principal.user_id, principal.role) == (
            WS,
            USER,
            Role.MEMBER,
        )
        claims = jwt.decode(token, options={"verify_signature": False})
        assert claims["exp"] - claims["iat"] == 120
        assert not (tmp_path / ".agentworks").exists()

    def test_rs256_private_key_from_the_environment(self, tmp_path: Path) -> None:
        private, public = rsa_pem_pair()
        # As docker and CI often pass it: one line with literal "\n" escapes.
        escaped = private.strip().replace("\n", "\\n")

        token = single_token(
            agentworks(
                "token", "--workspace", WS, "--user", USER, "--role", "ADMIN", cwd=tmp_path,
                env={"AGENTWORKS_JWT_PRIVATE_KEY": escaped},
            )
        )  # fmt: skip

        assert jwt.get_unverified_header(token)["alg"] == "RS256"
        assert verify_token(token, public_key=public).role is Role.ADMIN

    @pytest.mark.parametrize(
        ("args", "message"),
        [
            (["token"], "missing --workspace, --user, --role"),
            (["token", "--workspace", "w", "--role", "OWNER"], "missing --user"),
            (["token", "--workspace", WS, "--user", USER, "--role", "KING"], "unknown role"),
            (
                ["token", "--workspace", WS, "--user", "bob", "--role", "OWNER"],
                "--user must be a UUID",
            ),
            (
                ["token", "--workspace", "w", "--user", USER, "--role", "OWNER"],
                "--workspace must be a UUID",
            ),
            (["token", "--bootstrap", "--user", "a\x01b"], "--user must be a UUID"),
            (["token", "--bootstrap", "--workspace", "w"], "exclude each other"),
            (["token", "--bootstrap", "--role", "VIEWER"], "always OWNER"),
            (["token", "--workspace", "*", "--user", "u", "--role", "OWNER"], "--bootstrap"),
            (["token", "--bootstrap", "--ttl", "0"], "--ttl"),
            (["token", "--bootstrap", "--ttl", "soon"], "--ttl"),
            (["token", "--bootstrap", "--frobnicate"], "No such option"),
            (["frobnicate"], "No such command"),
        ],
    )
    def test_bad_input_is_one_line_on_stderr_with_exit_2(
        self, tmp_path: Path, args: list[str], message: str
    ) -> None:
        line = assert_one_line_error(agentworks(*args, cwd=tmp_path))

        assert message in line

    @pytest.mark.parametrize("ttl", ["99999999999999", "999999999999999999999999"])
    def test_a_ttl_past_any_date_is_one_line_and_exit_2(self, tmp_path: Path, ttl: str) -> None:
        result = agentworks("token", "--bootstrap", "--ttl", ttl, cwd=tmp_path)

        assert "--ttl" in assert_one_line_error(result)

    def test_weak_secret_is_refused_in_production(self, tmp_path: Path) -> None:
        result = agentworks(
            "token", "--bootstrap", cwd=tmp_path,
            env={"AGENTWORKS_ENV": "prod", "AGENTWORKS_JWT_SECRET": "changethis"},
        )  # fmt: skip

        assert "AGENTWORKS_JWT_SECRET" in assert_one_line_error(result)

    def test_production_never_falls_back_to_a_dev_secret(self, tmp_path: Path) -> None:
        result = agentworks("token", "--bootstrap", cwd=tmp_path, env={"AGENTWORKS_ENV": "prod"})

        assert "no JWT key configured" in assert_one_line_error(result)
        assert not (tmp_path / ".agentworks").exists()

    def test_public_key_alone_cannot_sign(self, tmp_path: Path) -> None:
        _, public = rsa_pem_pair()

        result = agentworks(
            "token", "--bootstrap", cwd=tmp_path, env={"AGENTWORKS_JWT_PUBLIC_KEY": public}
        )

        assert "AGENTWORKS_JWT_PRIVATE_KEY" in assert_one_line_error(result)


class TestMigrate:
    @pytest.fixture
    def fresh_database_name(self, postgres: None) -> Iterator[str]:
        """A database name that does not exist yet; dropped afterwards if it was created."""
        name = pg.random_name("aw_t_")
        try:
            yield name
        finally:
            pg.drop_database(name)

    def test_creates_and_migrates_the_database_then_finds_nothing_to_do(
        self, tmp_path: Path, fresh_database_name: str
    ) -> None:
        url = pg.url_for(fresh_database_name)
        env = {"AGENTWORKS_DATABASE_URL": url, "AGENTWORKS_LOG_LEVEL": "WARNING"}
        shipped = discover()

        first = agentworks("migrate", cwd=tmp_path, env=env)
        second = agentworks("migrate", cwd=tmp_path, env=env)

        assert first.returncode == 0, first.stderr
        for migration in shipped:
            assert migration.version in first.stdout
            assert migration.name in first.stdout
        assert applied_versions(url) == [m.version for m in shipped]
        assert second.returncode == 0, second.stderr
        assert "up to date" in second.stdout

    def test_database_url_option_overrides_the_environment(
        self, tmp_path: Path, fresh_database_name: str
    ) -> None:
        url = pg.url_for(fresh_database_name)

        result = agentworks(
            "migrate", "--database-url", url, cwd=tmp_path,
            env={"AGENTWORKS_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/elsewhere"},
        )  # fmt: skip

        assert result.returncode == 0, result.stderr
        assert applied_versions(url) == [m.version for m in discover()]

    def test_logs_are_json_lines_on_stderr(self, tmp_path: Path, fresh_database_name: str) -> None:
        result = agentworks(
            "migrate",
            cwd=tmp_path,
            env={"AGENTWORKS_DATABASE_URL": pg.url_for(fresh_database_name)},
        )

        assert result.returncode == 0, result.stderr
        assert '"event": "database.created"' in result.stderr
        assert "database.created" not in result.stdout

    def test_without_a_database_url_in_production_is_a_usage_error(self, tmp_path: Path) -> None:
        line = assert_one_line_error(
            agentworks("migrate", cwd=tmp_path, env={"AGENTWORKS_ENV": "prod"})
        )

        assert "AGENTWORKS_DATABASE_URL" in line
        assert not (tmp_path / ".agentworks").exists()

    def test_dev_in_production_without_a_database_url_starts_no_embedded_database(
        self, tmp_path: Path
    ) -> None:
        env = {"AGENTWORKS_ENV": "prod", "AGENTWORKS_JWT_SECRET": SECRET}
        env |= {
            f"AGENTWORKS_DB_{c}_PASSWORD": "pw" for c in ("WRITER", "API", "PROJECTOR", "RELAY")
        }

        line = assert_one_line_error(
            agentworks("dev", "--port", "1", cwd=tmp_path, env=env, timeout=30)
        )

        assert "AGENTWORKS_DATABASE_URL" in line
        assert not (tmp_path / ".agentworks").exists()

    def test_a_misspelt_setting_is_a_usage_error_before_any_embedded_database_starts(
        self, tmp_path: Path
    ) -> None:
        # Ignored before: migrate went on to the data dir's embedded database.
        result = agentworks(
            "migrate", cwd=tmp_path, env={"AGENTWORKS_DATABSE_URL": "postgresql://db/x"}
        )

        line = assert_one_line_error(result)
        assert "AGENTWORKS_DATABSE_URL (did you mean AGENTWORKS_DATABASE_URL?)" in line
        assert not (tmp_path / ".agentworks").exists()

    def test_a_non_postgres_url_is_a_usage_error(self, tmp_path: Path) -> None:
        result = agentworks(
            "migrate", cwd=tmp_path, env={"AGENTWORKS_DATABASE_URL": "mysql://root@localhost/x"}
        )

        assert "postgresql://" in assert_one_line_error(result)

    @pytest.mark.parametrize("given", ["", "  "])
    def test_an_empty_database_url_option_is_refused_not_taken_for_the_embedded_database(
        self, tmp_path: Path, given: str
    ) -> None:
        # Taken before for no URL at all (say '--database-url "$DB_URL"' with the variable
        # unset): the configured database was left alone, an embedded one was created in the
        # working directory and migrated instead, exit 0.
        result = agentworks(
            "migrate", "--database-url", given, cwd=tmp_path,
            env={"AGENTWORKS_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/configured"},
        )  # fmt: skip

        assert "--database-url" in assert_one_line_error(result)
        assert not (tmp_path / ".agentworks").exists()

    def test_a_database_url_option_that_is_no_postgres_url_is_named_as_the_option(
        self, tmp_path: Path
    ) -> None:
        # It was named as AGENTWORKS_DATABASE_URL, which the operator may not have set at all.
        line = assert_one_line_error(
            agentworks("migrate", "--database-url", "mysql://root@localhost/x", cwd=tmp_path)
        )

        assert "--database-url" in line
        assert "postgresql://" in line
        assert "AGENTWORKS_DATABASE_URL" not in line

    def test_an_applied_migration_whose_file_changed_fails_with_exit_1_naming_it(
        self, tmp_path: Path, database_url: str
    ) -> None:
        # As if 0001's file had been edited since: the stored checksum is not the file's.
        stored = "0" * 64
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(
                "UPDATE schema_migrations SET checksum = %s WHERE version = '0001'", (stored,)
            )
        first = discover()[0]

        result = agentworks("migrate", "--database-url", database_url, cwd=tmp_path)

        line = assert_error_last(result, 1)
        assert first.filename in line
        assert stored in line
        assert first.checksum in line

    def test_unreachable_database_fails_with_exit_1(self, tmp_path: Path) -> None:
        result = agentworks(
            "migrate", "--no-create-database", cwd=tmp_path,
            env={"AGENTWORKS_DATABASE_URL": "postgresql://postgres@127.0.0.1:1/none"},
        )  # fmt: skip

        assert "cannot connect" in assert_one_line_error(result, code=1)


@pytest.mark.parametrize(
    "command",
    [
        ["status"],
        ["parked", "list"],
        ["rebuild", "all"],
        ["replay", "card", WS],
    ],
    ids=lambda command: " ".join(command[:2]),
)
def test_every_command_reports_an_unreachable_database_in_one_line_with_exit_1(
    tmp_path: Path, command: list[str]
) -> None:
    result = agentworks(
        *command, cwd=tmp_path,
        env={"AGENTWORKS_DATABASE_URL": "postgresql://postgres:hush-hush@127.0.0.1:1/none"},
    )  # fmt: skip

    # Logs may come before it (JSON lines); the error itself is one line, the last.
    line = assert_error_last(result, 1)
    assert "127.0.0.1" in line
    assert "hush-hush" not in result.stderr


@pytest.mark.parametrize("command", [["status"], ["parked", "list"], ["rebuild", "all"]])
def test_a_database_never_migrated_is_named_in_one_line_with_exit_1(
    tmp_path: Path, command: list[str], postgres: None
) -> None:
    with pg.temporary_database(pg.random_name("aw_t_")) as url:
        result = agentworks(*command, cwd=tmp_path, env={"AGENTWORKS_DATABASE_URL": url})

    line = assert_error_last(result, 1)
    assert "agentworks migrate" in line


@pytest.mark.parametrize("command", ["serve", "dev"])
@pytest.mark.parametrize("port", ["70000", "65536", "0"])
def test_a_port_outside_1_to_65535_is_refused_before_anything_starts(
    tmp_path: Path, command: str, port: str
) -> None:
    # getaddrinfo took 70000 modulo 65536: the server listened on 4464 and announced 70000.
    result = agentworks(
        command, "--port", port, cwd=tmp_path,
        env={"AGENTWORKS_DATABASE_URL": "postgresql://postgres@127.0.0.1:1/none"},
    )  # fmt: skip

    assert "--port" in assert_one_line_error(result, code=2)


def test_a_data_dir_that_is_a_file_is_one_line_and_exit_2(tmp_path: Path) -> None:
    (tmp_path / "not-a-dir").write_text("")

    line = assert_one_line_error(agentworks("status", "--data-dir", "not-a-dir", cwd=tmp_path))

    assert "not-a-dir" in line


@pytest.mark.parametrize(
    "command",
    [
        ["token", "--bootstrap"],
        ["status"],
        ["replay", "card", WS],
        ["audit", "public-key"],
        ["audit", "export", "--workspace", WS],
        ["credit", "--workspace", WS, "--amount", "1", "--reason", "x"],
    ],
    ids=lambda command: " ".join(command[:2]),
)
def test_an_empty_data_dir_option_is_refused_not_taken_for_the_working_directory(
    tmp_path: Path, command: list[str]
) -> None:
    # Path('') is '.': the working directory was the data dir, its secrets (and an embedded
    # PostgreSQL, for a command that reads the store) written beside whatever else is there.
    line = assert_one_line_error(agentworks(*command, "--data-dir", "", cwd=tmp_path))

    assert "--data-dir" in line
    assert list(tmp_path.iterdir()) == []


def test_an_empty_data_dir_variable_is_the_default_data_dir(tmp_path: Path) -> None:
    # As an empty AGENTWORKS_DATABASE_URL or _KAFKA_BOOTSTRAP is unset; it was the working dir.
    single_token(agentworks("token", "--bootstrap", cwd=tmp_path, env={"AGENTWORKS_DATA_DIR": ""}))

    assert [path.name for path in tmp_path.iterdir()] == [".agentworks"]


def test_an_unreachable_kafka_is_one_line_with_exit_1(tmp_path: Path) -> None:
    result = agentworks(
        "relay", cwd=tmp_path,
        env={
            "AGENTWORKS_DATABASE_URL": "postgresql://postgres@127.0.0.1:1/none",
            "AGENTWORKS_KAFKA_BOOTSTRAP": "127.0.0.1:1",
        },
    )  # fmt: skip

    line = assert_error_last(result, 1)
    assert "Kafka" in line


def test_a_worker_for_no_projector_is_refused_before_kafka_is_asked(tmp_path: Path) -> None:
    # The name was first checked once the topics were made: a typo read as Kafka's failure
    # (exit 1) while Kafka was away, and waited for it otherwise.
    result = agentworks(
        "worker", "--projector", "kanabn", cwd=tmp_path,
        env={
            "AGENTWORKS_DATABASE_URL": "postgresql://postgres@127.0.0.1:1/none",
            "AGENTWORKS_KAFKA_BOOTSTRAP": "127.0.0.1:1",
        },
    )  # fmt: skip

    line = assert_one_line_error(result)
    assert "'kanabn'" in line
    assert "kanban" in line


def test_no_subcommand_names_the_commands_and_exits_2(tmp_path: Path) -> None:
    line = assert_one_line_error(agentworks(cwd=tmp_path))

    assert "migrate" in line
    assert "token" in line


def test_help_exits_0(tmp_path: Path) -> None:
    result = agentworks("token", "--help", cwd=tmp_path)

    assert result.returncode == 0
    assert "--bootstrap" in result.stdout


def test_console_script_is_installed(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "agentworks"
    if not script.exists():
        pytest.skip("the package is not installed (pip install -e .); python -m infra.cli works")

    result = subprocess.run(
        [str(script), "token", "--bootstrap", "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={k: v for k, v in os.environ.items() if not k.startswith("AGENTWORKS_")},
    )

    single_token(result)


def test_status_shows_lag_and_sweep_watermarks(database_url: str, tmp_path: Path) -> None:
    import psycopg

    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("INSERT INTO relay_positions (relay, position) VALUES ('relay', 0)")
        conn.execute(
            "INSERT INTO projection_positions (projector, position, swept_through)"
            " VALUES ('kanban', 9, 7)"
        )

    result = agentworks(
        "status",
        cwd=tmp_path,
        env={"AGENTWORKS_DATABASE_URL": database_url, "COLUMNS": "200"},
    )

    assert result.returncode == 0, result.stderr
    assert "event log head: 0" in result.stdout
    assert "swept through" in result.stdout

    def cells(component: str) -> list[str]:
        (line,) = [line for line in result.stdout.splitlines() if component in line]
        return [cell.strip() for cell in line.split("│") if cell.strip()]

    assert cells("projector kanban") == ["projector kanban", "9", "-9", "7", "0"]
    assert cells("relay relay") == ["relay relay", "0", "0"]
    # The projectors that never ran (no position recorded) are listed, at position 0: left
    # out, the table showed nothing wrong with a read model nobody had ever built.
    for name in projector_names():
        if name != "kanban":
            assert cells(f"projector {name}") == [f"projector {name}", "0", "0", "0", "0"]


def test_status_lists_the_relay_of_a_kafka_deployment_before_it_ever_ran(
    database_url: str, tmp_path: Path
) -> None:
    """Left out until it had run once, a relay never started showed nothing wrong, and its lag
    series was missing. Embedded, there is no relay to list."""

    def status(**env: str) -> list[str]:
        result = agentworks(
            "status", cwd=tmp_path,
            env={"AGENTWORKS_DATABASE_URL": database_url, "COLUMNS": "200", **env},
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        return [line for line in result.stdout.splitlines() if "relay" in line]

    (relay,) = status(AGENTWORKS_KAFKA_BOOTSTRAP="127.0.0.1:9")
    assert [cell.strip() for cell in relay.split("│") if cell.strip()] == ["relay relay", "0", "0"]
    assert status() == []


def test_sweep_applies_what_a_projector_never_received(database_url: str, tmp_path: Path) -> None:
    from commands import models as m
    from commands.handlers import Actor
    from infra.bootstrap import build_read_side, build_write_side
    from infra.settings import Settings

    settings = Settings(database_url=database_url, **pg.LOGIN_SETTINGS)
    read_side = build_read_side(settings, database_url, projector_names=["activity"])
    app = build_write_side(database_url)
    try:
        olga = Actor(user_id="olga", workspace_id="*")
        created = app.create_workspace(m.CreateWorkspace(name="Swept"), olga)
        app.rename_workspace(
            m.RenameWorkspace(workspace_id=created.id, name="Swept again"),
            Actor(user_id="olga", workspace_id=str(created.id)),
        )
        events = whole_log(read_side.event_log)
        read_side.runners[0].process(events[:-1])  # the rename never arrived
    finally:
        app.close()
        read_side.close()

    result = agentworks("sweep", "all", cwd=tmp_path, env={"AGENTWORKS_DATABASE_URL": database_url})

    assert result.returncode == 0, result.stderr
    assert f"activity: swept through {events[-1].position:,}, 1 missing events applied" in (
        result.stderr
    )
    assert "kanban: swept through" in result.stderr
    again = agentworks(
        "sweep", "activity", cwd=tmp_path, env={"AGENTWORKS_DATABASE_URL": database_url}
    )
    assert f"activity: swept through {events[-1].position:,}, 0 missing events" in again.stderr
    # Past the head, the bar and the verdict say the head (the bar showed the position asked).
    far = agentworks(
        "sweep", "activity", "--through", "1000000000", cwd=tmp_path,
        env={"AGENTWORKS_DATABASE_URL": database_url},
    )  # fmt: skip
    assert far.returncode == 0, far.stderr
    assert f"past the log's head: sweeping to {events[-1].position:,}" in far.stderr
    assert "1000000000/1000000000" not in far.stderr.replace(",", "")


@pytest.mark.parametrize("through", ["-5", "-1", str(2**63), "99999999999999999999999"])
def test_sweep_through_a_position_no_log_can_hold_is_refused(
    database_url: str, tmp_path: Path, through: str
) -> None:
    # -5 "swept through 0" and exited 0; a position past bigint swept to the head.
    result = agentworks(
        "sweep", "all", "--through", through, cwd=tmp_path,
        env={"AGENTWORKS_DATABASE_URL": database_url},
    )  # fmt: skip

    assert "--through" in assert_one_line_error(result, code=2)
