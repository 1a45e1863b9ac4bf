"""Agent-run benchmark: orchestrator overhead next to calling the simulated adapter directly.

    PYTHONPATH=. python bench/agents.py [--runs 200] [--rounds 3] [--tokens-per-second 60]
                                        [--output-tokens 120]

Same provider settings on both sides, measured in the same run (a ratio, the machine is noisy):

* direct: ``runs`` concurrent calls of :class:`SimulatedProvider` (the adapter alone);
* orchestrated: ``runs`` runs requested at once and executed by one orchestrator with
  concurrency ``runs`` against a fresh database: claim, prompt, the same call, log chunks,
  attempt + charge, finish. Per-run latency is the store's ``Requested`` → ``Succeeded`` time.
* token → stored log line: for every line, its ``at`` (when the text arrived from the provider)
  to the timestamp of the log-chunk event that stored it (what a subscriber waits for before the
  projector publishes it; the projector → subscriber leg is measured by ``bench/freshness.py``).

Prints one JSON object; RSS is this process's peak (orchestrator in-process).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import secrets
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psycopg

from adapters.eventlog import EventLog
from adapters.providers.base import ChatRequest, Usage
from adapters.providers.simulated import SimulatedProvider
from bench._provenance import Provenance
from commands import models as m
from commands.handlers import Actor
from domain.agent_run import AgentRun
from domain.agents import agent_named, build_prompt
from infra.bootstrap import build_write_side
from infra.migrate import ensure_database, migrate
from orchestrator.service import Orchestrator, OrchestratorConfig

ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def direct(provider: SimulatedProvider, runs: int) -> dict[str, float]:
    messages = build_prompt(agent_named("coder"), title="Login page",
                            description="Users sign in.", earlier=[])  # fmt: skip

    async def one() -> float:
        t0 = time.monotonic()
        async for piece in provider.stream(ChatRequest("sim-1", messages, 2000)):
            if isinstance(piece, Usage):
                break
        return time.monotonic() - t0

    t0 = time.monotonic()
    latencies = await asyncio.gather(*(one() for _ in range(runs)))
    wall = time.monotonic() - t0
    return {"wall_s": wall, "calls_per_s": runs / wall, "p50_s": pct(latencies, 0.5),
            "p99_s": pct(latencies, 0.99)}  # fmt: skip


async def orchestrated(url: str, provider: SimulatedProvider, runs: int) -> dict[str, Any]:
    write = build_write_side(url, pool_size=20)
    try:
        ws = write.create_workspace(m.CreateWorkspace(name="bench"),
                                    Actor(user_id="b", workspace_id="*")).id  # fmt: skip
        owner = Actor(user_id="b", workspace_id=str(ws))
        project = write.create_project(
            m.CreateProject(workspace_id=ws, name="P", lanes=[m.LaneInput(name="Todo")]), owner
        ).id
        card = write.create_card(m.CreateCard(project_id=project, title="Login page",
                                              description="Users sign in."), owner).id  # fmt: skip
        event_log = EventLog(write.recorder, write.mapper)  # type: ignore[arg-type]
        config = OrchestratorConfig(concurrency=runs, heartbeat_interval=5.0)
        orch = Orchestrator(write, event_log, {"simulated": provider}, config)
        task = asyncio.create_task(orch.run())
        await asyncio.sleep(0.5)
        t0 = time.monotonic()

        def request() -> list[Any]:
            return [write.start_agent_run(m.StartAgentRun(card_id=card, agent="coder"), owner).id
                    for _ in range(runs)]  # fmt: skip

        ids = await asyncio.to_thread(request)

        def finished() -> bool:
            return all(write.run_snapshot(i).status.terminal for i in ids)

        while not await asyncio.to_thread(finished):
            await asyncio.sleep(0.2)
        wall = time.monotonic() - t0
        orch.stop()
        await task
        latencies, token_lag = [], []
        statuses: dict[str, int] = {}
        for run_id in ids:
            events = list(write.events.get(run_id))
            statuses[type(events[-1]).__name__] = statuses.get(type(events[-1]).__name__, 0) + 1
            first, last = events[0], events[-1]
            latencies.append((last.timestamp - first.timestamp).total_seconds())  # type: ignore[attr-defined]
            token_lag += [
                (e.timestamp - datetime.fromisoformat(line["at"])).total_seconds()
                for e in events
                if isinstance(e, AgentRun.LogChunkAppended)
                for line in e.lines
            ]
        return {"wall_s": wall, "runs_per_s": runs / wall, "p50_s": pct(latencies, 0.5),
                "p99_s": pct(latencies, 0.99), "statuses": statuses,
                "token_to_stored_p50_ms": 1000 * pct(token_lag, 0.5),
                "token_to_stored_p99_ms": 1000 * pct(token_lag, 0.99)}  # fmt: skip
    finally:
        write.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens-per-second", type=float, default=60.0)
    parser.add_argument("--output-tokens", type=int, default=120)
    parser.add_argument("--json", default="bench/results/agents.json")
    args = parser.parse_args()
    provenance = Provenance.start()
    name = "aw_bench_agents_" + secrets.token_hex(4)
    url = f"postgresql://postgres@127.0.0.1:5432/{name}"
    ensure_database(url)
    migrate(url, app_role="agentworks_app")
    try:
        provider = SimulatedProvider(tokens_per_second=args.tokens_per_second,
                                     output_tokens=args.output_tokens)  # fmt: skip
        rounds = []
        for number in range(1, args.rounds + 1):
            base = asyncio.run(direct(provider, args.runs))
            orch = asyncio.run(orchestrated(url, provider, args.runs))
            rounds.append({
                "direct": base, "orchestrated": orch,
                "throughput_ratio": orch["runs_per_s"] / base["calls_per_s"],
                "added_p50_s": orch["p50_s"] - base["p50_s"],
                "added_p99_s": orch["p99_s"] - base["p99_s"],
                "overhead_p50_pct": 100 * (orch["p50_s"] - base["p50_s"]) / base["p50_s"],
            })  # fmt: skip
            print(f"round {number}: ratio {rounds[-1]['throughput_ratio']:.3f}", file=sys.stderr)

        def median(key: str) -> float:
            return statistics.median(r[key] for r in rounds)

        result = {
            "runs": args.runs, "tokens_per_second": args.tokens_per_second,
            "output_tokens": args.output_tokens, "rounds": rounds,
            "medians": {key: median(key) for key in
                        ("throughput_ratio", "added_p50_s", "added_p99_s", "overhead_p50_pct")},
            "direct_calls_per_s": statistics.median(r["direct"]["calls_per_s"] for r in rounds),
            "orchestrated_runs_per_s": statistics.median(
                r["orchestrated"]["runs_per_s"] for r in rounds
            ),
            "token_to_stored_p99_ms": statistics.median(
                r["orchestrated"]["token_to_stored_p99_ms"] for r in rounds
            ),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "provenance": provenance.finish(),
        }  # fmt: skip
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
    finally:
        with psycopg.connect(ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    main()
