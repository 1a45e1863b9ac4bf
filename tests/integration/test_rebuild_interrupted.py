"""``agentworks rebuild all`` interrupted by a real signal, as an operator's Ctrl-C or a
supervisor's SIGTERM reaches it: a subprocess, signalled while it replays the log into its
scratch tables.

What a swap did is read from the database, not from the command's own account: each live
table's identity (its oid: a swap renames the scratch table in, so the live name then points at
another table) and a marker (a live row edited by hand, which only a swap can undo, since the
rebuild writes the row as the log says).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import TYPE_CHECKING, Any

import pytest
from fanout_helpers import (
    Workload,
    connect,
    primary_key,
    rebuild_differences,
    table_rows,
    wait_until,
)

from infra.bootstrap import build_write_side
from projections.rebuild import SCRATCH_SUFFIX
from projections.registry import all_projectors

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path
    from uuid import UUID

pytestmark = pytest.mark.slow

#: Log chunks appended in bulk: enough that replaying them takes seconds, not milliseconds.
BACKLOG = 12_000
LIVE_TABLES = sorted(table for projector in all_projectors() for table in projector.tables)


def rebuild_all(database_url: str, cwd: Path) -> subprocess.Popen[str]:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("AGENTWORKS_")},
        "AGENTWORKS_DATABASE_URL": database_url,
        "AGENTWORKS_LOG_LEVEL": "WARNING",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "infra.cli", "rebuild", "all"],
        env=env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def finish(process: subprocess.Popen[str], timeout: float = 300) -> tuple[int, str]:
    output, _ = process.communicate(timeout=timeout)
    return process.returncode, output


def identities(database_url: str) -> dict[str, int]:
    """Each live table's oid: what its name points at now."""
    with connect(database_url) as conn:
        found = {
            table: conn.execute("SELECT %s::regclass::oid", (table,)).fetchone()
            for table in LIVE_TABLES
        }
    return {table: int(row[0]) for table, row in found.items() if row is not None}


def snapshot(database_url: str) -> dict[str, list[tuple[Any, ...]]]:
    with connect(database_url) as conn:
        return {table: table_rows(conn, table, primary_key(conn, table)) for table in LIVE_TABLES}


def scratch_tables(database_url: str) -> set[str]:
    with connect(database_url) as conn:
        rows = conn.execute(
            "SELECT tablename FROM pg_tables WHERE tablename LIKE %s", (f"%{SCRATCH_SUFFIX}",)
        ).fetchall()
    return {str(row[0]) for row in rows}


def title(database_url: str, card: UUID) -> str:
    with connect(database_url) as conn:
        row = conn.execute("SELECT title FROM rm_cards WHERE card_id = %s", (card,)).fetchone()
    return str(row[0]) if row else ""


@pytest.fixture
def sigint_reaches_children() -> Iterator[None]:
    """A suite started from a background job (``./.ci/run &``) inherits SIGINT ignored, and so
    would the rebuild it starts: Python then installs no KeyboardInterrupt handler and Ctrl-C's
    signal never arrives. A handler of our own is reset to the default in the child at exec, so
    the child interrupts as it would under a terminal."""
    earlier = signal.getsignal(signal.SIGINT)
    if earlier == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, earlier)


@pytest.fixture
def rebuilt_once(database_url: str, tmp_path: Path) -> UUID:
    """A log with a backlog, read models built by a complete ``rebuild all``; yields a card."""
    app = build_write_side(database_url, pool_size=2)
    try:
        work = Workload(app, seed=31)
        tenant = work.tenant("interrupted", projects=1)
        work.mixed(tenant, 40)
        card = work.card(tenant, "as the log says")
        work.bulk_log_chunks(tenant, BACKLOG)
    finally:
        app.close()
    code, output = finish(rebuild_all(database_url, tmp_path))
    assert code == 0, output
    return card


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.usefixtures("sigint_reaches_children")
def test_a_rebuild_interrupted_by_a_signal_swaps_nothing_and_the_next_one_swaps_all(
    database_url: str, tmp_path: Path, rebuilt_once: UUID, signum: signal.Signals
) -> None:
    card = rebuilt_once
    with connect(database_url) as conn:
        conn.execute("UPDATE rm_cards SET title = 'marker' WHERE card_id = %s", (card,))
    before, tables_before = snapshot(database_url), identities(database_url)
    expected_scratch = {table + SCRATCH_SUFFIX for table in LIVE_TABLES}

    process = rebuild_all(database_url, tmp_path)
    try:
        wait_until(
            lambda: expected_scratch <= scratch_tables(database_url) or process.poll() is not None,
            timeout=120,
            what="the rebuild replaying into its scratch tables",
            poll=0.05,
        )
        assert process.poll() is None, "the rebuild ended before it could be interrupted"
        process.send_signal(signum)  # the replay into the scratch tables has begun
        code, output = finish(process)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)

    # Every command ends on SIGTERM (and SIGHUP) the way it ends on Ctrl-C: cleaned up, exit 130.
    assert code == 130, output
    assert identities(database_url) == tables_before, "a live table was swapped"
    assert title(database_url, card) == "marker"
    assert snapshot(database_url) == before

    # The next rebuild starts over (whatever scratch tables were left) and swaps every table.
    code, output = finish(rebuild_all(database_url, tmp_path))
    assert code == 0, output
    swapped = identities(database_url)
    assert all(swapped[table] != tables_before[table] for table in LIVE_TABLES), swapped
    assert title(database_url, card) == "as the log says"
    assert not scratch_tables(database_url)
    # Intact: equal to what a rebuild from scratch makes, and to what was there before
    # (the marker aside).
    assert rebuild_differences(database_url) == {}
    after = snapshot(database_url)
    assert {t: rows for t, rows in after.items() if t != "rm_cards"} == {
        t: rows for t, rows in before.items() if t != "rm_cards"
    }
    assert len(after["rm_cards"]) == len(before["rm_cards"])
