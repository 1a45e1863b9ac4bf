"""Fixtures for integration tests of the write side against the real PostgreSQL.

* ``write_side``: the application as production builds it (``build_write_side``), on this test's
  own migrated database, closed afterwards so the database can be dropped.
* ``board``: a workspace owned by ``alice`` with one project whose lanes are
  Todo (no limit) / Doing (WIP 3) / Done (WIP 5).

Plain helpers (bootstrapping a board, folding an aggregate's stored events, reading the table
directly, the concurrent movers) live in ``board_helpers``, so that spawned worker processes,
which do not run pytest, can import them too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
from board_helpers import LANES, Board, bootstrap_board
from read_side_helpers import ReadSide, open_read_side

from infra.bootstrap import build_write_side

if TYPE_CHECKING:
    from collections.abc import Iterator

    from commands.handlers import AgentWorks


@pytest.fixture
def write_side(database_url: str) -> Iterator[AgentWorks]:
    app = build_write_side(database_url)
    try:
        yield app
    finally:
        app.close()


@pytest.fixture
def board(write_side: AgentWorks) -> Board:
    return bootstrap_board(write_side, lanes=LANES)


@pytest.fixture
def side(database_url: str) -> Iterator[ReadSide]:
    """A read side on this test's own database (modules that share one override it)."""
    with open_read_side(database_url) as read_side:
        yield read_side
