"""Audit and time travel: a board as of any instant, and the signed export.

``python -m bench.audit [--cards 200] [--events 1000] [--samples 200]`` creates its own database,
gives one board ``--cards`` cards of ``--events`` events each (edits saved ``--batch`` at a time,
round-robin over the cards, and a move every 100 events, which the project records too), rebuilds
the Kanban read model, then times:

* ``board_as_of`` at random instants across the whole history (p50/p99), next to reading the live
  board from the read model (lanes and their cards, what the ``board`` query reads);
* the audit export of the workspace (hash chain and signature, to a null sink) in events/s, next
  to a bare ``COPY`` of the same rows out of PostgreSQL.

``--card-snapshot-interval N`` snapshots cards every N events instead of the write side's
setting (``WriteSide.snapshotting_intervals``), to weigh a denser cadence: ``write_seconds`` is
its cost on the write side, ``board_as_of_ms`` its gain.

``--gc api`` times the reads with Python's cyclic garbage collector set up as the API server sets
it at start-up (``infra.stack.tune_garbage_collection``: the heap so far frozen, higher
thresholds); the default leaves CPython's defaults, under which a full collection of this
process (~50 ms on the 2-core machine) lands in a few of the timed boards.

Budget (issue 14): board as of an instant, 200 cards with 1,000 events each, p99 <= 100 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from datetime import datetime
from pathlib import Path

import psycopg
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from psycopg import IsolationLevel

from adapters.audit_signing import Signer
from adapters.eventlog import EventLog
from adapters.postgres import PROJECTOR_ROLE, make_pool
from bench._database import fresh_database
from bench._provenance import Provenance
from commands import models as m
from commands.handlers import Actor
from domain.card import Card
from domain.meta import EventMeta
from infra.bootstrap import build_write_side
from infra.migrate import migrate
from infra.stack import tune_garbage_collection
from projections.history import board_as_of
from projections.kanban import KanbanProjector
from projections.rebuild import rebuild
from streams.audit import export_lines, workspace_rows

LANES = ("Todo", "Doing", "Done")


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _summary(values: list[float]) -> dict[str, float]:
    return {
        "p50": round(statistics.median(values), 2),
        "p99": round(_percentile(values, 0.99), 2),
        "max": round(max(values), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cards", type=int, default=200)
    parser.add_argument("--events", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--batch", type=int, default=10, help="edits per save")
    parser.add_argument(
        "--card-snapshot-interval",
        type=int,
        default=None,
        help="snapshot cards every N events (default: the write side's setting)",
    )
    parser.add_argument(
        "--gc",
        choices=("default", "api"),
        default="default",
        help="the cyclic garbage collector as CPython sets it, or as the API server does",
    )
    parser.add_argument("--server", default="postgresql://postgres@127.0.0.1:5432")
    parser.add_argument("--json", default="bench/results/audit.json")
    args = parser.parse_args()
    provenance = Provenance.start()

    load_before = os.getloadavg()
    with fresh_database(args.server) as url:
        migrate(url)
        app = build_write_side(url)
        if args.card_snapshot_interval is not None:
            app.snapshotting_intervals = {Card: args.card_snapshot_interval}  # type: ignore[misc]
        snapshot_interval = app.snapshotting_intervals[Card]
        pool = make_pool(url, role=PROJECTOR_ROLE, max_size=2)
        try:
            owner = Actor(user_id="bench", workspace_id="*")
            ws = app.create_workspace(m.CreateWorkspace(name="bench"), owner)
            actor = Actor(user_id="bench", workspace_id=str(ws.id))
            project = app.create_project(
                m.CreateProject(
                    workspace_id=ws.id,
                    name="p",
                    lanes=[m.LaneInput(name=lane) for lane in LANES],
                ),
                actor,
            )
            meta = EventMeta.for_command(workspace_id=ws.id, actor="bench")
            started = time.perf_counter()
            cards = [
                app.create_card(m.CreateCard(project_id=project.id, title=f"c{i}"), actor).id
                for i in range(args.cards)
            ]
            first_instant = datetime.now().astimezone()
            # Round-robin over cards in saves of --batch edits (and a move every 100 events),
            # so a random instant finds every card part way between two snapshots.
            for rnd in range(max(1, args.events // args.batch)):
                for n, card_id in enumerate(cards):
                    card: Card = app.repository.get(card_id)
                    for i in range(args.batch):
                        card.edit(title=f"c{n} r{rnd} e{i}", description=None, meta=meta)
                    app.save(card)  # takes the snapshots due (multiples of the interval)
                    if (rnd + 1) * args.batch % 100 == 0:
                        lane = LANES[(rnd + n + 1) % len(LANES)]
                        app.move_card(m.MoveCard(card_id=card_id, to_lane=lane), actor)
            last_instant = datetime.now().astimezone()
            written = time.perf_counter() - started
            log = EventLog(app.recorder, app.mapper)  # type: ignore[arg-type]
            head = log.head()

            t0 = time.perf_counter()
            rebuild(KanbanProjector(), pool, log)
            rebuild_seconds = time.perf_counter() - t0

            span = (last_instant - first_instant).total_seconds()
            instants = [
                first_instant + (last_instant - first_instant) * random.random()
                for _ in range(args.samples)
            ]
            if args.gc == "api":
                tune_garbage_collection()
            as_of_ms = []
            with psycopg.connect(url) as conn:
                conn.autocommit = True
                for instant in instants:
                    t0 = time.perf_counter()
                    board = board_as_of(conn, app.mapper, project_id=project.id, as_of=instant)
                    as_of_ms.append((time.perf_counter() - t0) * 1000)
                    assert sum(lane.count for lane in board.lanes) == args.cards
                live_ms = []
                for _ in range(args.samples):
                    t0 = time.perf_counter()
                    conn.execute(
                        "SELECT name, ord, wip_limit, card_count FROM rm_lanes"
                        " WHERE project_id = %s ORDER BY ord",
                        (project.id,),
                    ).fetchall()
                    rows = conn.execute(
                        "SELECT * FROM rm_cards WHERE project_id = %s AND NOT archived"
                        " ORDER BY lane, position, card_id",
                        (project.id,),
                    ).fetchall()
                    live_ms.append((time.perf_counter() - t0) * 1000)
                    assert len(rows) == args.cards

            signer = Signer(Ed25519PrivateKey.generate())
            with psycopg.connect(url) as conn:
                conn.isolation_level = IsolationLevel.REPEATABLE_READ
                with conn.transaction():
                    t0 = time.perf_counter()
                    exported = 0
                    exported_bytes = 0
                    for line in export_lines(
                        workspace_rows(conn, workspace_id=ws.id, json_prefilter=True),
                        log.decode,
                        workspace_id=ws.id,
                        signer=signer,
                    ):
                        exported += 1
                        exported_bytes += len(line) + 1
                    export_seconds = time.perf_counter() - t0
            with psycopg.connect(url) as conn:
                t0 = time.perf_counter()
                copied = 0
                with conn.cursor().copy(
                    "COPY (SELECT notification_id, originator_id, originator_version, topic,"
                    " state FROM agentworks_events"
                    " WHERE convert_from(state, 'UTF8')::jsonb #>> '{meta,workspace_id}' = "
                    f"'{ws.id}' ORDER BY notification_id) TO STDOUT"
                ) as copy:
                    for block in copy:
                        copied += len(block)
                copy_seconds = time.perf_counter() - t0
        finally:
            pool.close()
            app.close()

    events = exported - 1
    result = {
        "cards": args.cards,
        "events_per_card": args.events,
        "log_events": head,
        "samples": args.samples,
        "edits_per_save": args.batch,
        "card_snapshot_interval": snapshot_interval,
        "write_seconds": round(written, 1),
        "history_span_seconds": round(span, 1),
        "kanban_rebuild_seconds": round(rebuild_seconds, 1),
        "gc": args.gc,
        "board_as_of_ms": _summary(as_of_ms),
        "live_board_ms": _summary(live_ms),
        "export": {
            "events": events,
            "seconds": round(export_seconds, 2),
            "events_per_second": round(events / export_seconds),
            "mb": round(exported_bytes / 1e6, 1),
        },
        "bare_copy": {
            "seconds": round(copy_seconds, 2),
            "events_per_second": round(events / copy_seconds),
            "mb": round(copied / 1e6, 1),
        },
        "load_average": {
            "before": [round(x, 2) for x in load_before],
            "after": [round(x, 2) for x in os.getloadavg()],
        },
        "cpus": os.cpu_count(),
        "provenance": provenance.finish(),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
