"""A Kafka worker's decoding of a delivered batch: the board's worker, with and without taking
the events its projector ignores from their headers.

``python -m bench.worker_decode [--batches 200] [--lines 50] [--rounds 7] [--json F]`` builds
batches of 500 messages as the relay publishes them (envelope JSON and headers), one run's
events in the mix a working agent makes: per step started, a log chunk of ``--lines`` lines of
100 characters and a heartbeat, among card moves. Each round times, on the same messages:

1. **headers**: ``streams.worker.decode_batch`` with the kanban projector's ignored types, as
   the worker calls it: ignored events are built from their headers, the rest decoded;
2. **baseline**: the same call without them, every message decoded (the worker before).

No broker and no database: this is the worker's own CPU per batch, what a run's log costs the
board's and the activity feed's workers. Reports the median per batch of each and their ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path
from uuid import uuid4

from bench._provenance import Provenance
from domain.envelope import EventEnvelope
from projections.base import unread_by
from projections.kanban import KanbanProjector
from streams.relay import headers_for
from streams.worker import BATCH_SIZE, decode_batch

AT = datetime(2026, 12, 7, tzinfo=UTC)


def _envelope(position: int, event_type: str, payload: dict[str, object]) -> EventEnvelope:
    return EventEnvelope(
        position=position,
        originator_id=uuid4(),
        originator_version=position,
        aggregate=event_type.split(".", 1)[0],
        type=event_type,
        event_version=1,
        timestamp=AT,
        workspace_id=uuid4(),
        metadata={"traceparent": ""},
        payload=payload,
    )


def _batch(start: int, lines: int) -> list[EventEnvelope]:
    """One delivered batch: steps, log chunks and heartbeats of a run among card moves."""
    chunk = [{"seq": n, "at": AT.isoformat(), "stream": "stdout", "text": "x" * 100}
             for n in range(lines)]  # fmt: skip
    kinds = [
        ("AgentRun.StepStarted", {"step": 1, "name": "plan"}),
        ("AgentRun.LogChunkAppended", {"first_seq": 0, "lines": chunk}),
        ("AgentRun.Heartbeat", {"worker": "w1"}),
        ("Card.Moved", {"from_lane": "todo", "to_lane": "doing", "position": "a0"}),
    ]
    return [_envelope(start + n, *kinds[n % len(kinds)]) for n in range(BATCH_SIZE)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--batches", type=int, default=200, help="batches timed per round")
    parser.add_argument("--lines", type=int, default=50, help="lines per log chunk")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", type=Path, default=Path("bench/results/worker_decode.json"))
    args = parser.parse_args()

    provenance = Provenance.start()
    unread = unread_by([KanbanProjector()])
    batches = [_batch(n * BATCH_SIZE + 1, args.lines) for n in range(args.batches)]
    delivered = [
        ([env.to_bytes() for env in batch], [dict(headers_for(env)) for env in batch])
        for batch in batches
    ]
    rounds = []
    for _ in range(args.rounds):
        timed = {}
        for name, skip in [("headers", unread), ("baseline", frozenset[str]())]:
            began = time.perf_counter()
            for values, headers in delivered:
                decode_batch(values, headers=headers, unread=skip)
            timed[name] = (time.perf_counter() - began) / len(delivered) * 1000
        rounds.append(timed)
        print(
            f"headers {timed['headers']:.2f} ms/batch, baseline {timed['baseline']:.2f} ms/batch,"
            f" {timed['baseline'] / timed['headers']:.2f}x",
            flush=True,
        )
    ours = statistics.median(r["headers"] for r in rounds)
    base = statistics.median(r["baseline"] for r in rounds)
    ratios = [r["baseline"] / r["headers"] for r in rounds]
    results = {
        "batch_messages": BATCH_SIZE,
        "log_chunk_lines": args.lines,
        "batches_per_round": args.batches,
        "rounds": rounds,
        "median_ms_per_batch": {"headers": round(ours, 3), "baseline": round(base, 3)},
        "median_ratio": round(statistics.median(ratios), 2),
        "provenance": provenance.finish(),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(
        f"median: headers {ours:.2f} ms, baseline {base:.2f} ms per {BATCH_SIZE} messages;"
        f" baseline / headers {statistics.median(ratios):.2f}x -> {args.json}"
    )


if __name__ == "__main__":
    main()
