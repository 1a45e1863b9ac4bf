"""Card history: reconstructing a card with many events at any version.

``python -m bench.history [--events 10000] [--samples 200]`` creates its own database, gives one
card ``--events`` events, then times ``card_at(card, version=v)`` for random versions with
snapshots (every 100 events, as the application runs) next to a full replay from version 1 of
the same events (the library's repository without snapshots), in the same run.
Budget (DESIGN.md): a card with 10,000 events reconstructed at any version in <= 50 ms.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any
from uuid import UUID

from bench._database import fresh_database
from bench._provenance import Provenance
from commands import models as m
from commands.handlers import Actor
from domain.meta import EventMeta
from infra.bootstrap import build_write_side
from infra.migrate import migrate
from infra.settings import Settings, db_logins


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _round(app: Any, card_id: UUID, actor: Actor, *, events: int, samples: int) -> dict[str, Any]:
    """One round: ``samples`` random versions with snapshots, a tenth of them (at least 20) by
    replaying every event from version 1 with the same repository."""
    versions = [random.randint(1, events) for _ in range(samples)]
    with_snapshots = []
    for version in versions:
        t0 = time.perf_counter()
        got = app.card_at(card_id, actor, version=version)
        with_snapshots.append((time.perf_counter() - t0) * 1000)
        assert got.version == version
    replay = []
    snapshots = app.repository.snapshot_store
    app.repository.snapshot_store = None  # the same repository, replaying every event
    try:
        for version in versions[: max(20, samples // 10)]:
            t0 = time.perf_counter()
            got = app.repository.get(card_id, version=version)
            replay.append((time.perf_counter() - t0) * 1000)
            assert got.version == version
    finally:
        app.repository.snapshot_store = snapshots
    return {
        "snapshots_ms": {
            "p50": round(statistics.median(with_snapshots), 2),
            "p99": round(_percentile(with_snapshots, 0.99), 2),
            "max": round(max(with_snapshots), 2),
        },
        "full_replay_ms": {
            "p50": round(statistics.median(replay), 2),
            "p99": round(_percentile(replay, 0.99), 2),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--samples", type=int, default=200, help="versions timed per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--server", default="postgresql://postgres@127.0.0.1:5432")
    parser.add_argument("--json", default="bench/results/history.json")
    args = parser.parse_args()
    provenance = Provenance.start()

    with fresh_database(args.server) as url:
        migrate(url, logins=db_logins(Settings.load()))
        app = build_write_side(url)
        try:
            owner = Actor(user_id="bench", workspace_id="*")
            ws = app.create_workspace(m.CreateWorkspace(name="bench"), owner)
            actor = Actor(user_id="bench", workspace_id=str(ws.id))
            project = app.create_project(m.CreateProject(workspace_id=ws.id, name="p"), actor)
            created = app.create_card(m.CreateCard(project_id=project.id, title="c"), actor)
            started = time.perf_counter()
            card: Any = app.repository.get(created.id)
            meta = EventMeta.for_command(workspace_id=ws.id, actor="bench")
            for i in range(args.events - 1):
                card.edit(title=f"title {i}", description=None, meta=meta)
                if len(card.pending_events) >= 500:
                    app.save(card)  # also takes the snapshots due at multiples of 100
            app.save(card)
            written = time.perf_counter() - started
            rounds = [
                _round(app, created.id, actor, events=args.events, samples=args.samples)
                for _ in range(args.rounds)
            ]
        finally:
            app.close()

    def over_rounds(kind: str, stat: str) -> float:
        return round(float(statistics.median(r[kind][stat] for r in rounds)), 2)

    result: dict[str, Any] = {
        "command": "python -m bench.history " + " ".join(sys.argv[1:]),
        "events": args.events,
        "samples": args.samples,
        "write_seconds": round(written, 2),
        # Medians over the rounds; each round's own figures are under "rounds".
        "snapshots_ms": {stat: over_rounds("snapshots_ms", stat) for stat in ("p50", "p99", "max")},
        "full_replay_ms": {stat: over_rounds("full_replay_ms", stat) for stat in ("p50", "p99")},
        "rounds": rounds,
    }
    result["speedup_p50"] = round(
        result["full_replay_ms"]["p50"] / result["snapshots_ms"]["p50"], 1
    )
    result["provenance"] = provenance.finish()
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
