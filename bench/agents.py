"""Agent-run benchmark: orchestrator overhead next to calling the simulated adapter directly.

    PYTHONPATH=. python bench/agents.py [--runs 200] [--rounds 3] [--tokens-per-second 60]
                                        [--output-tokens 120] [--levels 1,10] [--waves 8]

Same provider settings on both sides, measured in the same run (a ratio, the machine is noisy).

The overhead per call (DESIGN.md's budget, ≤ 10 % of a direct adapter call): for each of
``levels`` runs in flight, ``waves`` waves of that many calls straight on the adapter, then as
many runs through the orchestrator; the added latency per call, p50 and p99, over the direct
call's. Then the capacity scenario, 200 runs at once on one orchestrator:

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


async def direct_calls(provider: SimulatedProvider, calls: int) -> list[float]:
    """``calls`` calls of the adapter at once, the prompt a first ``coder`` run gets; each one's
    seconds until its usage block."""
    messages = build_prompt(agent_named("coder"), title="Login page",
                            description="Users sign in.", earlier=[])  # fmt: skip

    async def one() -> float:
        t0 = time.monotonic()
        async for piece in provider.stream(ChatRequest("sim-1", messages, 2000)):
            if isinstance(piece, Usage):
                break
        return time.monotonic() - t0

    return list(await asyncio.gather(*(one() for _ in range(calls))))


async def direct(provider: SimulatedProvider, runs: int) -> dict[str, float]:
    t0 = time.monotonic()
    latencies = await direct_calls(provider, runs)
    wall = time.monotonic() - t0
    return {"wall_s": wall, "calls_per_s": runs / wall, "p50_s": pct(latencies, 0.5),
            "p99_s": pct(latencies, 0.99)}  # fmt: skip


class BenchRuns:
    """One fresh workspace with a card, and one in-process orchestrator on ``provider``."""

    def __init__(self, url: str, provider: SimulatedProvider, concurrency: int) -> None:
        self.write = build_write_side(url, pool_size=20)
        self.write.write_each_command_alone()  # as `agentworks orchestrator`'s write side
        ws = self.write.create_workspace(m.CreateWorkspace(name="bench"),
                                         Actor(user_id="b", workspace_id="*")).id  # fmt: skip
        self.owner = Actor(user_id="b", workspace_id=str(ws))
        project = self.write.create_project(
            m.CreateProject(workspace_id=ws, name="P", lanes=[m.LaneInput(name="Todo")]),
            self.owner,
        ).id
        card = m.CreateCard(project_id=project, title="Login page", description="Users sign in.")
        self.card = self.write.create_card(card, self.owner).id
        event_log = EventLog(self.write.recorder, self.write.mapper)  # type: ignore[arg-type]
        config = OrchestratorConfig(concurrency=concurrency, heartbeat_interval=5.0)
        self.orch = Orchestrator(
            self.write, event_log, {"simulated": provider}, config, listen_url=url
        )
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> BenchRuns:
        self.task = asyncio.create_task(self.orch.run())
        await asyncio.sleep(0.5)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.orch.stop()
        if self.task is not None:
            await self.task
        self.write.close()

    async def execute(self, runs: int, poll: float) -> list[Any]:
        """Request ``runs`` runs at once and wait until every one has ended."""

        def request() -> list[Any]:
            return [self.write.start_agent_run(m.StartAgentRun(card_id=self.card, agent="coder"),
                                               self.owner).id for _ in range(runs)]  # fmt: skip

        ids = await asyncio.to_thread(request)

        def finished() -> bool:
            return all(self.write.run_snapshot(i).status.terminal for i in ids)

        while not await asyncio.to_thread(finished):
            await asyncio.sleep(poll)
        return ids

    def measured(self, ids: list[Any]) -> dict[str, Any]:
        """Per run, the store's ``Requested`` → last event time; and token → stored line lag."""
        latencies, token_lag = [], []
        statuses: dict[str, int] = {}
        for run_id in ids:
            events = list(self.write.events.get(run_id))
            statuses[type(events[-1]).__name__] = statuses.get(type(events[-1]).__name__, 0) + 1
            first, last = events[0], events[-1]
            latencies.append((last.timestamp - first.timestamp).total_seconds())  # type: ignore[attr-defined]
            token_lag += [
                (e.timestamp - datetime.fromisoformat(line["at"])).total_seconds()
                for e in events
                if isinstance(e, AgentRun.LogChunkAppended)
                for line in e.lines
            ]
        return {"latencies": latencies, "statuses": statuses, "token_lag": token_lag}


async def orchestrated(url: str, provider: SimulatedProvider, runs: int) -> dict[str, Any]:
    async with BenchRuns(url, provider, runs) as bench:
        t0 = time.monotonic()
        ids = await bench.execute(runs, poll=0.2)
        wall = time.monotonic() - t0
        seen = bench.measured(ids)
    latencies, token_lag = seen["latencies"], seen["token_lag"]
    return {"wall_s": wall, "runs_per_s": runs / wall, "p50_s": pct(latencies, 0.5),
            "p99_s": pct(latencies, 0.99), "statuses": seen["statuses"],
            "token_to_stored_p50_ms": 1000 * pct(token_lag, 0.5),
            "token_to_stored_p99_ms": 1000 * pct(token_lag, 0.99)}  # fmt: skip


async def per_call(url: str, provider: SimulatedProvider, level: int, waves: int) -> dict[str, Any]:
    """The overhead one call pays: ``waves`` waves of ``level`` calls, each wave started when the
    last has ended, first straight on the adapter, then as runs through the orchestrator. A run's
    latency is the store's ``Requested`` → ``Succeeded`` (pickup from the log, claim, prompt, the
    call, log chunks, attempt + charge, output, finish); a direct call's is the call alone."""
    direct_latencies: list[float] = []
    for _ in range(waves):
        direct_latencies += await direct_calls(provider, level)
    run_latencies: list[float] = []
    statuses: dict[str, int] = {}
    async with BenchRuns(url, provider, level) as bench:
        for _ in range(waves):
            seen = bench.measured(await bench.execute(level, poll=0.02))
            run_latencies += seen["latencies"]
            for status, count in seen["statuses"].items():
                statuses[status] = statuses.get(status, 0) + count
    d50, d99 = pct(direct_latencies, 0.5), pct(direct_latencies, 0.99)
    r50, r99 = pct(run_latencies, 0.5), pct(run_latencies, 0.99)
    return {"level": level, "calls": level * waves, "direct_p50_s": d50, "direct_p99_s": d99,
            "run_p50_s": r50, "run_p99_s": r99, "added_p50_s": r50 - d50,
            "added_p99_s": r99 - d99, "overhead_p50_pct": 100 * (r50 - d50) / d50,
            "overhead_p99_pct": 100 * (r99 - d99) / d99, "statuses": statuses}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens-per-second", type=float, default=60.0)
    parser.add_argument("--output-tokens", type=int, default=120)
    parser.add_argument(
        "--levels", default="1,10", help="runs in flight for the per-call overhead, comma-separated"
    )
    parser.add_argument("--waves", type=int, default=8, help="waves of each level's runs per round")
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
        levels = [int(v) for v in args.levels.split(",") if v.strip()]
        rounds = []
        for number in range(1, args.rounds + 1):
            calls = [asyncio.run(per_call(url, provider, level, args.waves)) for level in levels]
            base = asyncio.run(direct(provider, args.runs))
            orch = asyncio.run(orchestrated(url, provider, args.runs))
            rounds.append({
                "direct": base, "orchestrated": orch,
                "throughput_ratio": orch["runs_per_s"] / base["calls_per_s"],
                "added_p50_s": orch["p50_s"] - base["p50_s"],
                "added_p99_s": orch["p99_s"] - base["p99_s"],
                "overhead_p50_pct": 100 * (orch["p50_s"] - base["p50_s"]) / base["p50_s"],
                "per_call": calls,
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
            "per_call": [
                {key: statistics.median(r["per_call"][i][key] for r in rounds)
                 for key in ("level", "calls", "direct_p50_s", "direct_p99_s", "run_p50_s",
                             "run_p99_s", "added_p50_s", "added_p99_s", "overhead_p50_pct",
                             "overhead_p99_pct")}
                | {"overhead_p50_pct_spread": [
                    min(r["per_call"][i]["overhead_p50_pct"] for r in rounds),
                    max(r["per_call"][i]["overhead_p50_pct"] for r in rounds)]}
                for i in range(len(levels))
            ],
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
