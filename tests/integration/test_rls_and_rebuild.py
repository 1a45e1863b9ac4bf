"""Tenancy at the database, and rebuilding read models without disturbing the live ones; the
read-model versions the response cache keys on (``projections.read_versions``): a projector
commit bumps the workspaces it applied events of and no others, a rebuild's swap bumps every
workspace, and the API role reads its own workspace's version."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING
from uuid import UUID

import pg
import psycopg
import pytest
from board_helpers import LANES, bootstrap_board
from psycopg.rows import dict_row

from adapters.postgres import API_ROLE, make_pool
from commands import models as m
from infra.bootstrap import build_read_side
from infra.settings import Settings
from projections.kanban import KanbanProjector
from projections.progress_queries import scope_reading_version
from projections.rebuild import SCRATCH_SUFFIX, rebuild
from streams.embedded import EmbeddedFanout

if TYPE_CHECKING:
    from collections.abc import Iterator

    from board_helpers import Board

    from commands.handlers import AgentWorks
    from infra.bootstrap import ReadSide

READ_MODELS = (
    "rm_workspaces",
    "rm_members",
    "rm_projects",
    "rm_lanes",
    "rm_cards",
    "rm_runs",
    "rm_log_lines",
    "rm_charges",
    "rm_ledger_entries",
    "rm_usage_daily",
    "rm_statement_lines",
    "rm_monthly_spend",
    "rm_activity",
    "rm_api_keys",
    "rm_invitations",
)


@pytest.fixture
def read_side(database_url: str) -> Iterator[ReadSide]:
    side = build_read_side(Settings.load(**pg.LOGIN_SETTINGS), database_url)
    try:
        yield side
    finally:
        side.close()


def _two_tenants(app: AgentWorks, read_side: ReadSide) -> tuple[str, str]:
    first = bootstrap_board(app, lanes=LANES)
    second = bootstrap_board(app, lanes=LANES)
    for board in (first, second):
        card = app.create_card(m.CreateCard(project_id=board.project_id, title="t"), board.owner)
        app.start_agent_run(m.StartAgentRun(card_id=card.id, agent="coder"), board.owner)
    EmbeddedFanout(read_side.event_log, read_side.runners).drain()
    return str(first.workspace_id), str(second.workspace_id)


def _visible(conn: psycopg.Connection[tuple[object, ...]], table: str) -> set[str]:
    rows = conn.execute(f"SELECT DISTINCT workspace_id::text FROM {table}").fetchall()
    return {str(row[0]) for row in rows}


def test_api_role_without_a_workspace_setting_sees_no_rows(
    database_url: str, read_side: ReadSide, write_side: AgentWorks
) -> None:
    _two_tenants(write_side, read_side)
    with psycopg.connect(pg.login_url_for(database_url, API_ROLE)) as conn:
        for table in READ_MODELS:
            assert _visible(conn, table) == set(), table


def test_api_role_sees_only_the_workspace_of_its_transaction(
    database_url: str, read_side: ReadSide, write_side: AgentWorks
) -> None:
    first, second = _two_tenants(write_side, read_side)
    with psycopg.connect(pg.login_url_for(database_url, API_ROLE)) as conn:
        populated = 0
        for table in READ_MODELS:
            with conn.transaction():
                conn.execute("SELECT set_config('agentworks.workspace_id', %s, true)", (second,))
                seen = _visible(conn, table)
            assert first not in seen, table
            populated += bool(seen)
        assert populated >= 5, "the workload should fill several read models"
        # The setting is transaction-local: it does not leak into the next transaction.
        assert _visible(conn, "rm_cards") == set()


def test_api_role_cannot_write_read_models(
    database_url: str, read_side: ReadSide, write_side: AgentWorks
) -> None:
    first, _ = _two_tenants(write_side, read_side)
    with psycopg.connect(pg.login_url_for(database_url, API_ROLE)) as conn:
        conn.execute("SELECT set_config('agentworks.workspace_id', %s, false)", (first,))
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("UPDATE rm_cards SET title = 'hacked'")


def _rows(database_url: str, table: str) -> list[tuple[object, ...]]:
    with psycopg.connect(database_url) as conn:
        return conn.execute(f"SELECT * FROM {table} ORDER BY 1, 2").fetchall()


def test_rebuild_swaps_in_tables_equal_to_the_incremental_ones(
    database_url: str, read_side: ReadSide, write_side: AgentWorks
) -> None:
    _two_tenants(write_side, read_side)
    before = {t: _rows(database_url, t) for t in KanbanProjector.tables}
    result = rebuild(KanbanProjector(), read_side.pool, read_side.event_log)
    assert result.swapped
    after = {t: _rows(database_url, t) for t in KanbanProjector.tables}
    assert after == before
    with psycopg.connect(database_url) as conn:
        leftovers = conn.execute(
            "SELECT tablename FROM pg_tables WHERE tablename LIKE %s", (f"%{SCRATCH_SUFFIX}",)
        ).fetchall()
        policies = conn.execute(
            "SELECT count(*) FROM pg_policies WHERE tablename = 'rm_cards'"
        ).fetchone()
    assert leftovers == []
    assert policies is not None
    assert policies[0] == 2, "the swapped-in table keeps its policies"


def test_interrupted_rebuild_leaves_the_live_tables_untouched(
    database_url: str, read_side: ReadSide, write_side: AgentWorks
) -> None:
    _two_tenants(write_side, read_side)
    before = _rows(database_url, "rm_cards")

    def crash(position: int, head: int) -> None:
        raise KeyboardInterrupt("operator pressed Ctrl-C")

    with pytest.raises(KeyboardInterrupt):
        rebuild(
            KanbanProjector(), read_side.pool, read_side.event_log, batch_size=3, progress=crash
        )
    assert _rows(database_url, "rm_cards") == before
    with psycopg.connect(database_url) as conn:
        live = conn.execute(
            "SELECT position FROM projection_positions WHERE projector = 'kanban'"
        ).fetchone()
    assert live is not None
    assert live[0] > 0


@pytest.mark.many_connections
@pytest.mark.slow
def test_reads_keep_answering_and_writes_keep_landing_during_a_rebuild(
    database_url: str, read_side: ReadSide, write_side: AgentWorks
) -> None:
    app = write_side
    board = bootstrap_board(app, lanes=LANES)
    for i in range(150):
        app.create_card(m.CreateCard(project_id=board.project_id, title=f"c{i}"), board.owner)
    fanout = EmbeddedFanout(read_side.event_log, read_side.runners, poll_interval=0.05)
    fanout.drain()
    fanout.start()
    api = make_pool(database_url, role=API_ROLE)
    stop = threading.Event()
    answers: list[int] = []
    failures: list[BaseException] = []

    def reader() -> None:
        while not stop.is_set():
            try:
                with api.connection() as conn, conn.transaction():
                    conn.execute(
                        "SELECT set_config('agentworks.workspace_id', %s, true)",
                        (str(board.workspace_id),),
                    )
                    row = conn.execute("SELECT count(*) AS n FROM rm_cards").fetchone()
                    answers.append(int(row["n"]) if row else -1)
            except BaseException as error:  # noqa: BLE001 - the test fails on any error a client would see
                failures.append(error)
                return

    def writer() -> None:
        for i in range(40):
            app.create_card(m.CreateCard(project_id=board.project_id, title=f"w{i}"), board.owner)

    threads = [threading.Thread(target=reader), threading.Thread(target=writer)]
    for thread in threads:
        thread.start()
    try:
        rebuild(KanbanProjector(), read_side.pool, read_side.event_log, batch_size=50)
        threads[1].join(60)
    finally:
        stop.set()
        threads[0].join(30)
        fanout.stop()
        api.close()
    assert failures == []
    assert answers, "the reader got answers during the rebuild"
    assert min(answers) >= 150
    fanout.drain()
    assert _rows(database_url, "rm_cards") == _rows_after_fresh_rebuild(read_side, database_url)
    assert len(_rows(database_url, "rm_cards")) == 190


def _rows_after_fresh_rebuild(read_side: ReadSide, database_url: str) -> list[tuple[object, ...]]:
    rebuild(KanbanProjector(), read_side.pool, read_side.event_log, swap=False)
    return _rows(database_url, "rm_cards" + SCRATCH_SUFFIX)


def _read_version(url: str, workspace: UUID) -> str:
    with psycopg.connect(url, row_factory=dict_row) as conn:
        return scope_reading_version(conn, workspace, statement_timeout_ms=10_000)


def _two_boards(app: AgentWorks, read_side: ReadSide) -> tuple[Board, Board]:
    first = bootstrap_board(app, lanes=LANES)
    second = bootstrap_board(app, lanes=LANES)
    for board in (first, second):
        app.create_card(m.CreateCard(project_id=board.project_id, title="t"), board.owner)
    EmbeddedFanout(read_side.event_log, read_side.runners).drain()
    return first, second


@pytest.mark.many_connections
def test_a_commit_bumps_the_workspaces_it_applied_and_no_other(
    database_url: str, read_side: ReadSide, write_side: AgentWorks
) -> None:
    first, second = _two_boards(write_side, read_side)
    before = {b.workspace_id: _read_version(database_url, b.workspace_id) for b in (first, second)}
    assert "kanban@" in before[first.workspace_id]
    write_side.create_card(m.CreateCard(project_id=first.project_id, title="u"), first.owner)
    EmbeddedFanout(read_side.event_log, read_side.runners).drain()
    assert _read_version(database_url, first.workspace_id) != before[first.workspace_id]
    assert _read_version(database_url, second.workspace_id) == before[second.workspace_id]


def test_the_api_role_reads_its_own_workspaces_version(
    database_url: str, read_side: ReadSide, write_side: AgentWorks
) -> None:
    first, second = _two_boards(write_side, read_side)
    write_side.create_card(m.CreateCard(project_id=first.project_id, title="u"), first.owner)
    EmbeddedFanout(read_side.event_log, read_side.runners).drain()
    api_url = pg.login_url_for(database_url, API_ROLE)
    seen = {b.workspace_id: _read_version(api_url, b.workspace_id) for b in (first, second)}
    # Row-level security hides other workspaces' counters, never the scope's own.
    assert seen == {w: _read_version(database_url, w) for w in seen}
    assert seen[first.workspace_id] != seen[second.workspace_id]


def test_a_rebuilds_swap_changes_every_workspaces_version(
    database_url: str, read_side: ReadSide, write_side: AgentWorks
) -> None:
    first, second = _two_boards(write_side, read_side)
    before = {b.workspace_id: _read_version(database_url, b.workspace_id) for b in (first, second)}
    rebuild(KanbanProjector(), read_side.pool, read_side.event_log, swap=False)
    assert {b: _read_version(database_url, b) for b in before} == before
    rebuild(KanbanProjector(), read_side.pool, read_side.event_log)
    for workspace, version in before.items():
        assert _read_version(database_url, workspace) != version
