"""In the embedded fan-out, a projector that keeps failing holds only itself back.

The fan-out reads the log once per round, from the position of the projector furthest behind.
A projector whose batches fail on a cause no event is to blame for (its table missing or not
granted after a half-done deployment: the runner raises, it parks nothing) stays where it is,
so every round read the same batch from its position: the other projectors, done with that
batch, got nothing more to apply. A broken activity feed stopped the boards, the ledger and the
run logs of every tenant, 500 events on. Now a failing projector is fed from its own position,
apart, and the others go on to the head of the log.
"""

from __future__ import annotations

import contextlib
import zlib
from typing import TYPE_CHECKING, Any

import psycopg
import pytest
from board_helpers import stored_head
from fanout_helpers import EmbeddedPath, Workload, rows, wait_until

from projections.activity import ActivityProjector

if TYPE_CHECKING:
    from collections.abc import Iterator

    from commands.handlers import AgentWorks


def test_a_projector_that_keeps_failing_does_not_hold_the_others_back(
    database_url: str, write_side: AgentWorks, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = Workload(write_side)
    tenant = work.tenant("isolated", projects=1)
    path = EmbeddedPath(database_url)
    try:
        path.fanout.drain()

        def broken(self: Any, ctx: Any, envelopes: Any) -> None:
            raise psycopg.errors.UndefinedTable('relation "rm_activity" does not exist')

        monkeypatch.setattr(ActivityProjector, "apply_batch", broken)
        work.card(tenant, "while the feed is broken")
        work.bulk_log_chunks(tenant, 3 * path.fanout.batch_size)
        for _ in range(10):
            with contextlib.suppress(psycopg.errors.UndefinedTable):
                path.fanout.drain()
        head = stored_head(path.log)
        positions = path.fanout.positions()
        assert positions.pop("activity") < head
        assert positions == dict.fromkeys(positions, head)
    finally:
        path.stop()


@contextlib.contextmanager
def _run_logs_held(database_url: str) -> Iterator[None]:
    """The run-log projector held on its lock, as a rebuild's swap holds it, for the block."""
    with psycopg.connect(database_url, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (zlib.crc32(b"projector:runs") & 0x7FFFFFFF,))
        yield


def test_a_projector_that_is_held_up_does_not_hold_the_others_back(
    database_url: str, write_side: AgentWorks
) -> None:
    """A projector whose batch takes long (a tenant's flood of large log chunks for the run
    logs, or a rebuild's swap holding its lock) kept every other projector waiting: a round
    handed a batch to each projector and read the next only once all had committed, so no
    tenant's board changed until the run logs were done. Here the run-log projector is held
    on its lock (as a rebuild's swap holds it) while another tenant creates a card."""
    work = Workload(write_side)
    flooding = work.tenant("flooding", projects=1)
    other = work.tenant("other", projects=1)
    path = EmbeddedPath(database_url)
    try:
        path.fanout.drain()
        path.start()
        with _run_logs_held(database_url):
            work.bulk_log_chunks(flooding, 10)
            card_id = work.card(other, "while the run logs are held up")
            wait_until(
                lambda: bool(
                    rows(database_url, "SELECT 1 FROM rm_cards WHERE card_id = %s", card_id)
                ),
                timeout=30,
                what="another tenant's card reaches its board while the run logs are held up",
            )
            lines = "SELECT count(*) FROM rm_log_lines WHERE workspace_id = %s"
            assert rows(database_url, lines, flooding.workspace_id) == [(0,)]
        head = stored_head(path.log)
        wait_until(
            lambda: min(path.fanout.positions().values()) >= head,
            timeout=30,
            what="every projector reaches the head once the run logs go on",
        )
        assert path.dead() == []
    finally:
        path.stop()


def test_a_projector_that_keeps_failing_does_not_pace_the_running_fanout(
    database_url: str, write_side: AgentWorks, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Running, the fan-out slept its poll interval after every failed batch: a projector that
    failed at once each time (a table missing after a half-done deployment) had every other
    projector wait out that sleep between any two of their batches. Now the failing projector
    alone waits before it is tried again. (A long poll interval here makes the difference
    plain: the loop still wakes at once on the log's NOTIFY.)"""
    work = Workload(write_side)
    tenant = work.tenant("paced", projects=1)
    path = EmbeddedPath(database_url)
    path.fanout.poll_interval = 60.0
    try:
        path.fanout.drain()

        def broken(self: Any, ctx: Any, envelopes: Any) -> None:
            raise psycopg.errors.UndefinedTable('relation "rm_activity" does not exist')

        monkeypatch.setattr(ActivityProjector, "apply_batch", broken)
        path.start()
        for title in ("first while the feed is broken", "second while the feed is broken"):
            card_id = work.card(tenant, title)
            wait_until(
                lambda card_id=card_id: bool(
                    rows(database_url, "SELECT 1 FROM rm_cards WHERE card_id = %s", card_id)
                ),
                timeout=20,
                what=f"{title!r} reaches its board",
            )
        assert path.dead() == []
    finally:
        path.stop()


def test_the_reads_kept_for_projectors_behind_are_bounded_in_bytes(
    database_url: str, write_side: AgentWorks
) -> None:
    """The fan-out keeps its last reads for the projectors behind the one it read them for, so
    that they share them. Kept by count alone (eight), a flood of large log chunks had it hold
    eight batches of up to ``max_batch_bytes`` each (16 MiB of stored state, several times that
    decoded) while one projector was held up; the kept reads now hold at most twice one batch's
    bytes. Small batches here make eight of them plainly more than two."""
    work = Workload(write_side)
    flooding = work.tenant("flooding", projects=1)
    path = EmbeddedPath(database_url)
    path.fanout.batch_size, path.fanout.max_batch_bytes = 50, 4096
    try:
        path.fanout.drain()
        path.start()
        with _run_logs_held(database_url):
            work.bulk_log_chunks(flooding, 300)
            head = stored_head(path.log)
            others = [r.name for r in path.fanout.runners if r.name != "runs"]
            wait_until(
                lambda: min(path.fanout.positions()[name] for name in others) >= head,
                timeout=60,
                what="the projectors not held up reach the head",
            )
            kept = [
                e.position for read in list(path.fanout._reads.values()) for e in read.envelopes
            ]
            stored = rows(
                database_url,
                "SELECT coalesce(sum(octet_length(state)), 0) FROM agentworks_events"
                " WHERE notification_id = ANY(%s)",
                kept,
            )
            assert stored[0][0] <= 2 * path.fanout.max_batch_bytes, (len(kept), stored)
        assert path.dead() == []
    finally:
        path.stop()
