"""The read-model versions the response cache keys on (``projections.read_versions``): a
projector commit bumps the workspaces it applied events of and no others, a rebuild's swap bumps
every workspace, and the API role reads its own workspace's version."""

from __future__ import annotations

from typing import TYPE_CHECKING
from uuid import UUID

import pg
import psycopg
import pytest
from board_helpers import LANES, bootstrap_board
from psycopg.rows import dict_row

from adapters.postgres import API_ROLE
from commands import models as m
from infra.bootstrap import build_read_side
from infra.settings import Settings
from projections.kanban import KanbanProjector
from projections.progress_queries import scope_reading_version
from projections.rebuild import rebuild
from streams.embedded import EmbeddedFanout

if TYPE_CHECKING:
    from collections.abc import Iterator

    from board_helpers import Board

    from commands.handlers import AgentWorks
    from infra.bootstrap import ReadSide


@pytest.fixture
def read_side(database_url: str) -> Iterator[ReadSide]:
    side = build_read_side(Settings.load(**pg.LOGIN_SETTINGS), database_url)
    try:
        yield side
    finally:
        side.close()


def _version(url: str, workspace: UUID) -> str:
    with psycopg.connect(url, row_factory=dict_row) as conn:
        return scope_reading_version(conn, workspace, statement_timeout_ms=10_000)


def _tenants(app: AgentWorks, read_side: ReadSide) -> tuple[Board, Board]:
    first = bootstrap_board(app, lanes=LANES)
    second = bootstrap_board(app, lanes=LANES)
    for board in (first, second):
        app.create_card(m.CreateCard(project_id=board.project_id, title="t"), board.owner)
    EmbeddedFanout(read_side.event_log, read_side.runners).drain()
    return first, second


def test_a_commit_bumps_the_workspaces_it_applied_and_no_other(
    database_url: str, read_side: ReadSide, write_side: AgentWorks
) -> None:
    first, second = _tenants(write_side, read_side)
    before = {b.workspace_id: _version(database_url, b.workspace_id) for b in (first, second)}
    assert "kanban@" in before[first.workspace_id]
    write_side.create_card(m.CreateCard(project_id=first.project_id, title="u"), first.owner)
    EmbeddedFanout(read_side.event_log, read_side.runners).drain()
    assert _version(database_url, first.workspace_id) != before[first.workspace_id]
    assert _version(database_url, second.workspace_id) == before[second.workspace_id]


def test_the_api_role_reads_its_own_workspaces_version(
    database_url: str, read_side: ReadSide, write_side: AgentWorks
) -> None:
    first, second = _tenants(write_side, read_side)
    write_side.create_card(m.CreateCard(project_id=first.project_id, title="u"), first.owner)
    EmbeddedFanout(read_side.event_log, read_side.runners).drain()
    api_url = pg.login_url_for(database_url, API_ROLE)
    for board in (first, second):
        # Row-level security hides other workspaces' counters, never the scope's own.
        assert _version(api_url, board.workspace_id) == _version(database_url, board.workspace_id)
    assert _version(api_url, first.workspace_id) != _version(api_url, second.workspace_id)


def test_a_rebuilds_swap_changes_every_workspaces_version(
    database_url: str, read_side: ReadSide, write_side: AgentWorks
) -> None:
    first, second = _tenants(write_side, read_side)
    before = {b.workspace_id: _version(database_url, b.workspace_id) for b in (first, second)}
    rebuild(KanbanProjector(), read_side.pool, read_side.event_log, swap=False)
    assert {b: _version(database_url, b) for b in before} == before
    rebuild(KanbanProjector(), read_side.pool, read_side.event_log)
    for workspace, version in before.items():
        assert _version(database_url, workspace) != version
