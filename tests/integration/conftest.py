"""Fixtures for integration tests of the write side against the real PostgreSQL.

* ``write_side``: the application as production builds it (``build_write_side``), on this test's
  own migrated database, closed afterwards so the database can be dropped.
* ``app``: the same with a pool of two connections, for tests that run projectors or a relay
  beside it (within the suite's connection budget).
* ``board``: a workspace owned by ``alice`` with one project whose lanes are
  Todo (no limit) / Doing (WIP 3) / Done (WIP 5).

Plain helpers (bootstrapping a board, folding an aggregate's stored events, reading the table
directly, the concurrent movers) live in ``board_helpers``, so that spawned worker processes,
which do not run pytest, can import them too.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import pg
import pytest
from board_helpers import LANES, Board, bootstrap_board
from cli_process import Agentworks, stop_postgres_under
from read_side_helpers import ReadSide, World, open_read_side, shared_read_side

from infra.bootstrap import build_write_side

if TYPE_CHECKING:
    from collections.abc import Iterator

    from commands.handlers import AgentWorks


@pytest.fixture
def write_side(database_url: str) -> Iterator[AgentWorks]:
    with contextlib.closing(build_write_side(database_url)) as app:
        yield app


@pytest.fixture
def app(database_url: str) -> Iterator[AgentWorks]:
    with contextlib.closing(build_write_side(database_url, pool_size=2)) as write_side:
        yield write_side


@pytest.fixture
def board(write_side: AgentWorks) -> Board:
    return bootstrap_board(write_side, lanes=LANES)


@pytest.fixture
def side(database_url: str) -> Iterator[ReadSide]:
    """A read side on this test's own database (modules that share one override it with
    ``shared_side``)."""
    with open_read_side(database_url) as read_side:
        yield read_side


@pytest.fixture(scope="module")
def shared_side(clones: pg.Clones) -> Iterator[ReadSide]:
    """A read side on one database for all of a module's tests, which keep apart by workspace."""
    with shared_read_side(clones) as read_side:
        yield read_side


@pytest.fixture
def world(side: ReadSide) -> World:
    """A new workspace with a board on ``side``."""
    return side.new_world()


@pytest.fixture
def running() -> Iterator[list[Agentworks]]:
    """``agentworks`` processes a test started: killed (with their process group) at its end."""
    started: list[Agentworks] = []
    yield started
    for process in started:
        process.kill()


@pytest.fixture
def embedded_dir() -> Iterator[Path]:
    """An empty folder for embedded PostgreSQL data dirs, outside pytest's base temp dir.

    Run as root, the embedded server runs as another user who must reach its data dir, and any
    pytest session starting meanwhile (a shared machine) resets ``/tmp/pytest-of-root`` to mode
    0700, which locked the server out. Whatever a failed test left running there is stopped.
    """
    with tempfile.TemporaryDirectory(prefix="aw-embedded-", ignore_cleanup_errors=True) as top:
        yield Path(top)
        stop_postgres_under(Path(top))


@pytest.fixture
def data_dir(embedded_dir: Path) -> Path:
    """An empty data dir that does not exist yet."""
    return embedded_dir / "data"
