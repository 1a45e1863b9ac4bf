"""Read models built by an older revision of their projector are rebuilt at upgrade
(``projections/revisions.py``): ``agentworks migrate`` and ``dev`` at start.

The upgrade is the real one: a database migrated to 0025 whose kanban read model was built
without the API keys that migration's tables hold (as every deployment's was), then migrated
by the CLI to the end.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING
from uuid import UUID

import pg
import psycopg
import pytest
from board_helpers import whole_log
from test_cli import agentworks

from commands import models as m
from commands.access import CreateApiKey, create_api_key
from commands.handlers import Actor
from infra.bootstrap import ReadSide, build_read_side, build_write_side
from infra.migrate import discover, migrate
from infra.settings import Settings
from infra.stack import rebuild_stale_read_models
from projections.kanban import KanbanProjector
from projections.rebuild import rebuild_stale
from projections.registry import all_projectors

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from projections.base import Projector
    from projections.revisions import Revisions


@pytest.fixture
def empty_database(postgres: None) -> Iterator[str]:
    with pg.temporary_database(pg.random_name("aw_t_")) as url:
        yield url


def read_side_of(url: str, names: list[str] | None = None) -> ReadSide:
    return build_read_side(
        Settings(database_url=url, **pg.LOGIN_SETTINGS), url, projector_names=names
    )


def with_two_keys(url: str) -> UUID:
    """A workspace with two API keys, projected by the kanban projector; its id."""
    app = build_write_side(url)
    read_side = read_side_of(url, ["kanban"])
    try:
        owner = Actor(user_id="olga", workspace_id="*")
        workspace = app.create_workspace(m.CreateWorkspace(name="Keys"), owner).id
        actor = Actor(user_id="olga", workspace_id=str(workspace))
        for name in ("ci", "deploy"):
            create_api_key(
                app, CreateApiKey(workspace_id=workspace, name=name, role="MEMBER"), actor
            )
        read_side.runners[0].process(whole_log(read_side.event_log))
    finally:
        read_side.close()
        app.close()
    return workspace


def rows(url: str, query: str) -> list[tuple[object, ...]]:
    with psycopg.connect(url) as conn:
        return list(conn.execute(query.encode()).fetchall())


def keys(url: str) -> list[object]:
    return [name for (name,) in rows(url, "SELECT name FROM rm_api_keys ORDER BY name")]


def kanban_built_by(url: str, revision: int, *, losing_keys: str = "") -> None:
    """Record ``revision`` as the one that built the kanban read model, whose ``rm_api_keys``
    rows matching ``losing_keys`` (a LIKE pattern) go, as an older revision would lack them."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO projection_revisions (projector, revision) VALUES ('kanban', %s)"
            " ON CONFLICT (projector) DO UPDATE SET revision = EXCLUDED.revision",
            (revision,),
        )
        conn.execute("DELETE FROM rm_api_keys WHERE name LIKE %s", (losing_keys,))


def start_as_dev_does(url: str) -> tuple[list[Projector], Revisions]:
    """Rebuild what ``dev`` rebuilds at start; then what the revisions say."""
    read_side = read_side_of(url)
    try:
        rebuild_stale_read_models(read_side)
        return read_side.revisions()
    finally:
        read_side.close()


def revisions(url: str) -> dict[object, object]:
    return dict(rows(url, "SELECT projector, revision FROM projection_revisions"))


def test_an_upgrade_past_0025_rebuilds_the_kanban_read_model_once(
    empty_database: str, tmp_path: Path
) -> None:
    url = empty_database
    before = tmp_path / "to_0025"
    before.mkdir()
    for migration in discover():
        if migration.version <= "0025":
            (before / migration.filename).write_text(migration.sql)
    migrate(url, directory=before, logins=pg.LOGIN_PASSWORDS)
    with_two_keys(url)
    with psycopg.connect(url, autocommit=True) as conn:
        # What every kanban read model built before 0025 lacked: the keys' rows.
        conn.execute("DELETE FROM rm_api_keys")
        # A rebuild's own tracking row is no read model of its own.
        conn.execute(
            "INSERT INTO projection_positions (projector, position) VALUES ('kanban#rebuild', 5)"
        )
    env = {"AGENTWORKS_DATABASE_URL": url, "COLUMNS": "200", **pg.LOGIN_ENV}

    deferred = agentworks("migrate", "--no-rebuild", cwd=tmp_path, env=env, timeout=120)

    assert deferred.returncode == 0, deferred.stderr
    assert "0026" in deferred.stdout
    assert "read model kanban was built by revision 1" in deferred.stdout
    assert "rebuild kanban" in deferred.stdout
    assert keys(url) == []
    assert revisions(url) == {"kanban": 1} | {
        p.name: p.revision for p in all_projectors() if p.name != "kanban"
    }

    upgraded = agentworks("migrate", cwd=tmp_path, env=env, timeout=120)

    assert upgraded.returncode == 0, upgraded.stderr
    assert "rebuilding it" in upgraded.stdout
    assert "events replayed" in upgraded.stdout
    assert keys(url) == ["ci", "deploy"]
    assert revisions(url)["kanban"] == KanbanProjector.revision == 2

    again = agentworks("migrate", cwd=tmp_path, env=env, timeout=120)

    assert again.returncode == 0, again.stderr
    assert "up to date" in again.stdout
    assert "rebuild" not in again.stdout


def test_read_models_of_a_new_database_are_taken_as_built_by_the_running_code(
    database_url: str,
) -> None:
    read_side = read_side_of(database_url)
    try:
        stale, found = read_side.revisions()
    finally:
        read_side.close()

    assert stale == []
    assert (found.stale, found.newer) == ((), ())
    assert revisions(database_url) == {p.name: p.revision for p in all_projectors()}


def test_a_read_model_a_newer_deployment_built_is_left_alone(database_url: str) -> None:
    with_two_keys(database_url)
    kanban_built_by(database_url, 99, losing_keys="ci")

    stale, found = start_as_dev_does(database_url)

    assert stale == []
    assert found.newer == (("kanban", 99, KanbanProjector.revision),)
    assert "newer than this code's" in found.describe_newer()[0]
    assert keys(database_url) == ["deploy"]
    assert revisions(database_url)["kanban"] == 99


def test_dev_rebuilds_a_stale_read_model_before_serving(database_url: str) -> None:
    with_two_keys(database_url)
    kanban_built_by(database_url, 1, losing_keys="%")

    stale, _ = start_as_dev_does(database_url)

    assert stale == []

    assert keys(database_url) == ["ci", "deploy"]
    assert revisions(database_url)["kanban"] == KanbanProjector.revision


def test_two_deployments_upgrading_at_once_rebuild_a_read_model_once(database_url: str) -> None:
    with_two_keys(database_url)
    kanban_built_by(database_url, 1)
    sides = [read_side_of(database_url, ["kanban"]) for _ in range(2)]
    rebuilt: list[int] = []
    start = threading.Barrier(2)

    def upgrade(side: ReadSide) -> None:
        start.wait()
        stale = [runner.projector for runner in side.runners]
        rebuilt.append(len(rebuild_stale(stale, side.pool, side.event_log)))

    try:
        threads = [threading.Thread(target=upgrade, args=(side,)) for side in sides]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    finally:
        for side in sides:
            side.close()

    assert sorted(rebuilt) == [0, 1]
    assert revisions(database_url)["kanban"] == KanbanProjector.revision
    assert keys(database_url) == ["ci", "deploy"]
