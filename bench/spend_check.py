"""What a provider call's spend check costs: the usage read it always made, and the write model's
usage it now also reads when the workspace has a monthly limit.

One workspace under a limit, with ``--charges`` LLM calls charged to its month by one write side
(as the orchestrators' charges are). A second write side (the orchestrator's own, its aggregate
cache warm) then reads, per sample, what a call's check reads, while the first goes on charging
between samples, so that every write-model read has the latest charge to fast-forward over:

- baseline: the billing read model's usage (``ReadModelSpend``, the reading without Redis);
- new: the same and the write model's ``MonthlySpend`` (``WriteModelSpend``).

Reported: the median time of each per check, and the ratio, per round; rounds alternate the
order. Run: ``python -m bench.spend_check`` (about a minute).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID

from adapters.postgres import make_pool
from bench._database import fresh_database
from bench._provenance import Provenance
from commands import models as m
from commands.handlers import Actor, AgentWorks
from commands.service import WriteModelSpend
from domain.usage import month_of
from infra.bootstrap import build_write_side
from infra.migrate import migrate
from projections.spend import ReadModelSpend

SERVER = "postgresql://postgres@127.0.0.1:5432"


def _charge(app: AgentWorks, run_id: UUID, actor: Actor, number: int) -> None:
    app.record_llm_call(
        m.RecordLlmCall(
            run_id=run_id, call_id=f"call-{number}", provider="simulated", model="sim-1",
            input_tokens=80, output_tokens=120, latency_ms=900, provider_cost_micros=37,
            price_table_version=app.prices.version, at=datetime.now(UTC),
        ),
        actor,
    )  # fmt: skip


def _workspace_under_a_limit(app: AgentWorks) -> tuple[UUID, UUID, Actor]:
    """A workspace with a $1,000 monthly limit and a run begun on one of its cards."""
    created = app.create_workspace(
        m.CreateWorkspace(name="bench"), Actor(user_id="owner", workspace_id="*")
    )
    owner = Actor(user_id="owner", workspace_id=str(created.id))
    app.set_spend_limit(m.SetSpendLimit(workspace_id=created.id, monthly_limit="1000"), owner)
    project = app.create_project(m.CreateProject(workspace_id=created.id, name="P"), owner)
    card = app.create_card(m.CreateCard(project_id=project.id, title="C"), owner)
    run = app.start_agent_run(m.StartAgentRun(card_id=card.id, agent="coder"), owner)
    app.begin_run(m.BeginRun(run_id=run.id, worker="bench"), owner)
    return created.id, run.id, owner


def _sample(
    reads: list[Any], charging: AgentWorks, run_id: UUID, owner: Actor, start: int, count: int,
    workspace: UUID, month: str,
) -> float:  # fmt: skip
    """Median seconds of one check made of ``reads``, a new charge before each."""
    times = []
    for number in range(start, start + count):
        _charge(charging, run_id, owner, number)
        began = time.perf_counter()
        for reader in reads:
            reader.read(workspace, month)
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def _measure(
    args: argparse.Namespace, charging: AgentWorks, checking: AgentWorks, read_pool: Any
) -> dict[str, Any]:
    workspace, run_id, owner = _workspace_under_a_limit(charging)
    for number in range(args.charges):
        _charge(charging, run_id, owner, number)
    month = month_of(datetime.now(UTC))
    read_model, write_model = ReadModelSpend(read_pool), WriteModelSpend(checking)
    write_model.read(workspace, month)  # the orchestrator's cache holds the month already
    rounds = []
    number = args.charges
    for index in range(args.rounds):
        sides = {"baseline": [read_model], "new": [read_model, write_model]}
        order = ["baseline", "new"] if index % 2 == 0 else ["new", "baseline"]
        medians: dict[str, float] = {}
        for side in order:
            medians[side] = _sample(
                sides[side], charging, run_id, owner, number, args.samples, workspace, month
            )
            number += args.samples
        rounds.append({**medians, "ratio": medians["new"] / medians["baseline"]})
        print(
            f"round {index + 1}: baseline {medians['baseline'] * 1e3:.3f} ms, "
            f"new {medians['new'] * 1e3:.3f} ms, ratio {rounds[-1]['ratio']:.2f}",
            file=sys.stderr,
        )
    return {
        "charges_before": args.charges, "samples": args.samples, "rounds": rounds,
        "median_baseline_ms": 1e3 * statistics.median(r["baseline"] for r in rounds),
        "median_new_ms": 1e3 * statistics.median(r["new"] for r in rounds),
        "median_ratio": statistics.median(r["ratio"] for r in rounds),
        "charges_in_the_month": number,
    }  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--charges", type=int, default=2000, help="charges in the month first")
    parser.add_argument("--samples", type=int, default=200, help="checks timed per round and side")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", default="bench/results/spend_check.json")
    args = parser.parse_args()
    provenance = Provenance.start()
    with fresh_database(SERVER) as url:
        migrate(url, app_role="agentworks_app")
        charging = build_write_side(url, pool_size=2)
        checking = build_write_side(url, pool_size=2)
        read_pool = make_pool(url, role="agentworks_api", max_size=2)
        try:
            result = _measure(args, charging, checking, read_pool)
        finally:
            read_pool.close()
            checking.close()
            charging.close()
    result["provenance"] = provenance.finish()
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: v for k, v in result.items() if k != "provenance"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
