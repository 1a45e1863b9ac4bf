"""Writes during ``bench.graphql``'s load (``--writes-per-second``): card renames at a steady
rate in the chosen workspaces, and the projectors (embedded fan-out, as ``agentworks dev`` runs
them) in this same process, so the API's cached answers are invalidated as a live system's are.

    python -m bench._graphql_writes --rate 20 --target WORKSPACE:USER [--target …]

Runs until SIGTERM, then prints one JSON line: the writes made, the seconds they took, and how
far the projectors got (``projected_through``, the lowest projector position, against the log's
``log_head``: equal when every write was applied before the end).
"""

from __future__ import annotations

import argparse
import json
import signal
import threading
import time
from types import FrameType
from uuid import UUID

import psycopg

from commands import models as m
from commands.handlers import Actor
from infra.bootstrap import build_read_side, build_write_side, component_url
from infra.settings import Settings
from streams.embedded import EmbeddedFanout


def _cards(database_url: str, workspace_id: UUID) -> list[UUID]:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT card_id FROM rm_cards WHERE workspace_id = %s ORDER BY card_id LIMIT 50",
            (workspace_id,),
        ).fetchall()
    if not rows:
        raise SystemExit(f"workspace {workspace_id} has no cards to rename")
    return [row[0] for row in rows]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench._graphql_writes")
    parser.add_argument("--rate", type=float, required=True, help="writes per second, per target")
    parser.add_argument(
        "--target", action="append", required=True, help="WORKSPACE_ID:USER_ID, repeatable"
    )
    args = parser.parse_args(argv)
    settings = Settings.load()
    url = settings.database_url
    if url is None:
        raise SystemExit("AGENTWORKS_DATABASE_URL is not set")
    stop = threading.Event()

    def on_term(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_term)
    read_side = build_read_side(settings, url)
    fanout = EmbeddedFanout(
        read_side.event_log,
        read_side.runners,
        listen_url=component_url(settings, url, "projector"),
        poll_interval=0.2,
    )
    fanout.start()
    write = build_write_side(url, pool_size=2)
    targets = []
    for target in args.target:
        workspace, user = target.split(":", 1)
        targets.append((Actor(user_id=user, workspace_id=workspace), _cards(url, UUID(workspace))))
    interval = 1.0 / (args.rate * len(targets))
    writes = 0
    started = due = time.monotonic()
    try:
        while not stop.is_set():
            actor, cards = targets[writes % len(targets)]
            card = cards[(writes // len(targets)) % len(cards)]
            write.update_card(m.UpdateCard(card_id=card, title=f"Card renamed {writes}"), actor)
            writes += 1
            due += interval
            stop.wait(max(0.0, due - time.monotonic()))
    finally:
        elapsed = time.monotonic() - started
        fanout.stop()
        write.close()
        read_side.close()
    with psycopg.connect(url) as conn:
        head = conn.execute("SELECT agentworks_log_head()").fetchone()
        applied = conn.execute("SELECT min(position) FROM projection_positions").fetchone()
    print(
        json.dumps(
            {
                "writes": writes,
                "seconds": round(elapsed, 2),
                "log_head": head[0] if head else None,
                "projected_through": applied[0] if applied else None,
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
