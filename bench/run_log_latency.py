"""Agent-run live log: provider token → subscriber latency, as ``agentworks dev`` runs it.

    python -m bench.run_log_latency [--runs 20] [--rounds 3] [--tokens-per-second 60]
                                    [--output-tokens 240] [--broadcaster local|redis]

One process holds the whole stack, as ``agentworks dev`` does: the write side, every projector
fed by the embedded fan-out, the API under uvicorn, one orchestrator on the simulated provider,
and one GraphQL WebSocket subscriber (``agentRunLog``) per run. ``--runs`` runs start at once,
each on a card of its own, in each of ``--rounds`` rounds.

The provider is the simulated one with a tag appended to every line it produces (`` #<n>``, a
word of its own), recorded with the moment the line's last piece left the provider. A
subscriber stamps each ``stdout`` line when its message arrives; the tag pairs the two stamps on
one monotonic clock. Legs, per line:

* token → stored: the line's provider stamp to the commit of the log-chunk event that holds it
  (the event's timestamp, wall clock, taken just before commit);
* token → subscriber: the provider stamp to the WebSocket message (what a user sees).

The log batcher flushes every 200 ms or 100 lines (``log_interval``, DESIGN.md), so about 100 ms
of the median is that wait by design; the figure is reported next to the batching interval and
next to token → stored from the same run, whose difference is what the read path (projection,
broadcast, WebSocket) adds.

Results: ``bench/results/run_log_latency.json`` and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "tests", ROOT / "tests" / "e2e", ROOT / "tests" / "integration"):
    sys.path.insert(0, str(_path))

import pg  # noqa: E402
from api_client import subscribe  # noqa: E402
from e2e_stack import Stack, StackBuilder  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from adapters.eventlog import EventLog  # noqa: E402
from adapters.providers.base import ChatRequest, Piece  # noqa: E402
from adapters.providers.simulated import SimulatedProvider  # noqa: E402
from bench._provenance import Provenance  # noqa: E402
from domain.agent_run import AgentRun  # noqa: E402
from infra.bootstrap import build_write_side  # noqa: E402
from infra.migrate import migrate  # noqa: E402
from orchestrator.service import Orchestrator, OrchestratorConfig, OrchestratorThread  # noqa: E402

RUN_LOG = "subscription($id: ID!) { agentRunLog(runId: $id) { seq stream text } }"
START = "mutation($input: StartAgentRunInput!) { startAgentRun(input: $input) { run { id } } }"
TAG = re.compile(r" #(\d+)\.?$")
LOG_INTERVAL_MS = 200.0


class TaggedProvider(SimulatedProvider):
    """The simulated provider, each line tagged and stamped as it leaves the provider."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.emitted: dict[int, float] = {}
        self._next = 0
        self._lock = threading.Lock()

    async def stream(self, request: ChatRequest) -> AsyncIterator[Piece]:
        async for piece in super().stream(request):
            if isinstance(piece, str) and piece.endswith("\n"):
                with self._lock:
                    self._next += 1
                    tag = self._next
                piece = piece[:-1].rstrip(".") + f" #{tag}.\n"
                self.emitted[tag] = time.monotonic()
            yield piece


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@contextmanager
def orchestrator(stack: Stack, provider: SimulatedProvider, runs: int) -> Iterator[None]:
    write = build_write_side(stack.database_url, pool_size=8)
    write.write_each_command_alone()  # as `agentworks orchestrator`'s write side
    orch = Orchestrator(
        write,
        EventLog(write.recorder, write.mapper),  # type: ignore[arg-type]
        {"simulated": provider},
        OrchestratorConfig(concurrency=runs, heartbeat_interval=5.0),
        listen_url=stack.database_url,
    )
    thread = OrchestratorThread(orch)
    thread.start()
    try:
        yield
    finally:
        thread.stop()
        write.close()


def follow(stack: Stack, token: str, run_id: str, received: dict[int, float]) -> None:
    """One subscriber: stamps every tagged stdout line until the run's last system line."""
    with subscribe(stack.ws_url, token, RUN_LOG, {"id": run_id}) as sub:
        while True:
            try:
                message = sub.next_message(timeout=30)
            except TimeoutError:
                return
            if message.get("type") != "next":  # the run ended: the server completes
                return
            line = message["payload"]["data"]["agentRunLog"]
            now = time.monotonic()
            if line["stream"] == "stdout":
                found = TAG.search(line["text"].rstrip())
                if found:
                    received[int(found.group(1))] = now
            elif line["stream"] == "system" and "calling" not in line["text"]:
                return


def one_round(stack: Stack, provider: TaggedProvider, runs: int) -> dict[str, Any]:
    alice, ws = stack.owner_with_workspace()
    project = alice.create_project(ws, "Bench", [{"name": "Todo"}])["project"]["id"]
    cards = [alice.create_card(project, f"Card {i}")["card"]["id"] for i in range(runs)]
    received: dict[int, float] = {}
    run_ids: list[str] = []
    with orchestrator(stack, provider, runs):
        followers = []
        for card in cards:
            body = alice.post(START, {"input": {"cardId": card, "agent": "coder"}}).body
            run_id = body["data"]["startAgentRun"]["run"]["id"]
            run_ids.append(run_id)
            follower = threading.Thread(
                target=follow, args=(stack, alice.token, run_id, received), daemon=True
            )
            follower.start()
            followers.append(follower)
        for follower in followers:
            follower.join(120)
    stored = stored_lags(stack, run_ids, provider)
    emitted = provider.emitted
    lags = [1000 * (received[tag] - emitted[tag]) for tag in received if tag in emitted]
    return {
        "lines": len(lags),
        "lines_emitted": len(provider.emitted),
        "token_to_subscriber_ms": {"p50": pct(lags, 0.5), "p99": pct(lags, 0.99), "max": max(lags)},
        "token_to_stored_ms": {"p50": pct(stored, 0.5), "p99": pct(stored, 0.99)},
    }


def stored_lags(stack: Stack, run_ids: list[str], provider: TaggedProvider) -> list[float]:
    """Each tagged line's log-chunk commit time, less its provider stamp (wall clock for both:
    the provider's monotonic stamp is moved onto the wall clock once)."""
    offset = time.time() - time.monotonic()
    lags = []
    for run_id in run_ids:
        for event in stack.write.events.get(UUID(run_id)):
            if not isinstance(event, AgentRun.LogChunkAppended):
                continue
            committed = event.timestamp.timestamp()  # type: ignore[attr-defined]
            for line in event.lines:
                found = TAG.search(str(line["text"]).rstrip())
                if found and int(found.group(1)) in provider.emitted:
                    lags.append(1000 * (committed - provider.emitted[int(found.group(1))] - offset))
    return lags


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens-per-second", type=float, default=60.0)
    parser.add_argument("--output-tokens", type=int, default=240)
    parser.add_argument("--broadcaster", choices=["local", "redis"], default="local")
    parser.add_argument("--json", default=str(ROOT / "bench/results/run_log_latency.json"))
    args = parser.parse_args()
    provenance = Provenance.start()
    pg.ensure_postgres()
    name = pg.random_name("aw_bench_runlog_")
    url = pg.create_database(name)
    redis_index = pg.claim_redis_db(name)
    stacks = StackBuilder(f"redis://{pg.REDIS_HOST}:{pg.REDIS_PORT}/{redis_index}")
    rounds = []
    try:
        migrate(url, logins=pg.LOGIN_PASSWORDS)
        stack = stacks.build(url, broadcaster=args.broadcaster)
        for number in range(1, args.rounds + 1):
            provider = TaggedProvider(
                tokens_per_second=args.tokens_per_second, output_tokens=args.output_tokens
            )
            result = one_round(stack, provider, args.runs)
            rounds.append(result)
            print(f"round {number}: {json.dumps(result)}", file=sys.stderr)
    finally:
        stacks.close()
        pg.drop_database(name)
        pg.release_redis_db(redis_index, name)
    p99s = [r["token_to_subscriber_ms"]["p99"] for r in rounds]
    p50s = [r["token_to_subscriber_ms"]["p50"] for r in rounds]
    stored_p99s = [r["token_to_stored_ms"]["p99"] for r in rounds]
    summary = {
        "bench": "run_log_latency",
        "runs": args.runs, "rounds": args.rounds, "broadcaster": args.broadcaster,
        "tokens_per_second": args.tokens_per_second, "output_tokens": args.output_tokens,
        "log_interval_ms": LOG_INTERVAL_MS,
        "token_to_subscriber_p99_ms": statistics.median(p99s),
        "token_to_subscriber_p99_ms_spread": [min(p99s), max(p99s)],
        "token_to_subscriber_p50_ms": statistics.median(p50s),
        "token_to_stored_p99_ms": statistics.median(stored_p99s),
        "read_path_share_of_p99": 1 - statistics.median(stored_p99s) / statistics.median(p99s),
        "rounds_detail": rounds,
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "provenance": provenance.finish(),
    }  # fmt: skip
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    table = Table(title="agent-run log: provider token → subscriber (ms; median of rounds)")
    for column in ("leg", "p50", "p99", "p99 spread over rounds"):
        table.add_column(column)
    table.add_row("token → subscriber", f"{summary['token_to_subscriber_p50_ms']:.0f}",
                  f"{summary['token_to_subscriber_p99_ms']:.0f}",
                  f"{min(p99s):.0f} to {max(p99s):.0f}")  # fmt: skip
    table.add_row("token → stored (same run)", "",
                  f"{summary['token_to_stored_p99_ms']:.0f}",
                  f"{min(stored_p99s):.0f} to {max(stored_p99s):.0f}")  # fmt: skip
    table.add_row("log batching interval (design)", "", f"{LOG_INTERVAL_MS:.0f}", "")
    Console().print(table)


if __name__ == "__main__":
    main()
