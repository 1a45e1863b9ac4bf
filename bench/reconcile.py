"""Reconciliation: recomputing a month's billing from the event log, next to a bare SQL SUM.

``python -m bench.reconcile [--events 1000000] [--workspaces 200] [--projects 5]`` creates its own
database and appends ``--events`` usage events of one month (charges, and a correction of every
20th one) through the application's recorder. Then, in the same run:

1. **reconcile**: ``commands.billing.fold_month`` with the log reader ``agentworks invoice`` and
   ``agentworks reconcile`` use (``adapters.billing_log``): the month's ``UsageCharge`` and
   credit events read back in log order, only the fields the fold uses read from the stored
   JSON, folded into exact per-project, per-workspace figures — then each workspace's statement
   lines;
2. **baseline**: one ``SELECT sum(...)`` over the same rows, the billed amounts pulled out of the
   stored JSON by PostgreSQL itself;
3. **mapper fold** (the first ``--reference-rounds`` rounds): the same fold with every event
   decoded by the write side's mapper, as before the fast reader: the reference it must equal.

Both totals must agree to the micro-dollar in every round, and the fast fold must equal the
mapper's, workspace by workspace (the script fails otherwise). The machine is shared: each round
records the load average, the results file the run's provenance.
Budget (DESIGN.md): reconciliation of 1M usage events in <= 10 s.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any
from uuid import uuid4

import psycopg
from eventsourcing.utils import get_topic

from adapters.billing_log import billing_log_for
from bench._database import fresh_database
from bench._provenance import Provenance
from commands.billing import BillingLog, fold_month
from domain.billing import statement_total
from domain.meta import EventMeta
from domain.usage import UsageCharge, month_of
from infra.bootstrap import build_write_side
from infra.migrate import migrate

if TYPE_CHECKING:
    from eventsourcing.persistence import StoredEvent

    from commands.handlers import AgentWorks
    from domain.billing import MonthFold

MONTH_START = datetime(2026, 10, 1, tzinfo=UTC)


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def generate(
    app: AgentWorks,
    events: int,
    workspaces: int,
    projects: int,
    seed: int = 7,
    month_start: datetime = MONTH_START,
) -> int:
    """Append about ``events`` usage events of one month; returns how many were appended."""
    rnd = random.Random(seed)
    tenants = [(uuid4(), [uuid4() for _ in range(projects)]) for _ in range(workspaces)]
    metas = {ws: EventMeta.for_command(workspace_id=ws, actor="bench") for ws, _ in tenants}
    to_stored = app.mapper.to_stored_event
    pending: list[StoredEvent] = []
    written = 0
    n = 0
    while written + len(pending) < events:
        n += 1
        workspace_id, project_ids = tenants[rnd.randrange(workspaces)]
        cost = rnd.randrange(1, 50_000)
        at = month_start + timedelta(seconds=rnd.randrange(28 * 86_400))
        charge = UsageCharge.charge(
            workspace_id=workspace_id,
            project_id=project_ids[rnd.randrange(projects)],
            card_id=workspace_id,
            run_id=uuid4(),
            call_id="c",
            provider="simulated",
            model="sim-1",
            input_tokens=rnd.randrange(10, 4000),
            output_tokens=rnd.randrange(10, 2000),
            provider_cost_micros=cost,
            markup=Decimal(5),
            billed_micros=cost * 5,
            price_table_version="bench",
            at=at,
            meta=metas[workspace_id],
        )
        if n % 20 == 0:
            charge.correct(cost, "bench correction", refund=False, at=at, meta=metas[workspace_id])
        pending.extend(to_stored(event) for event in charge.collect_events())
        if len(pending) >= 5_000:
            app.recorder.insert_events(pending)
            written += len(pending)
            pending = []
            if written % 100_000 < 5_000:
                _log(f"  {written:,} events appended")
    if pending:
        app.recorder.insert_events(pending)
        written += len(pending)
    return written


def _reconcile(app: AgentWorks, month: str, log: BillingLog | None) -> tuple[float, MonthFold]:
    """Seconds taken and the month's fold by the log (through ``log``, or the mapper)."""
    t0 = time.perf_counter()
    fold = fold_month(app, month, log=log)
    for workspace_id in fold.workspaces:
        statement_total(fold.lines(workspace_id, increment_micros=250_000))
    return time.perf_counter() - t0, fold


def _net(fold: MonthFold) -> int:
    return sum(sum(figures.usage.values()) for figures in fold.workspaces.values())


def _sql_sum(url: str, month: str | None) -> tuple[float, int, int]:
    """Seconds, rows and net total of the same events by one SQL aggregate (only ``month``'s,
    by the payload's month, when the log holds others)."""
    t0 = time.perf_counter()
    sql = (
        "SELECT count(*), sum(CASE WHEN topic = %(charged)s"
        " THEN (convert_from(state, 'UTF8')::jsonb ->> 'billed_micros')::bigint"
        " ELSE -(convert_from(state, 'UTF8')::jsonb ->> 'amount_micros')::bigint END)"
        " FROM agentworks_events WHERE topic = ANY(%(topics)s)"
    )
    if month is not None:
        sql += " AND convert_from(state, 'UTF8')::jsonb ->> 'month' = %(month)s"
    with psycopg.connect(url) as conn:
        row = conn.execute(
            sql,
            {
                "charged": get_topic(UsageCharge.Charged),
                "topics": [get_topic(UsageCharge.Charged), get_topic(UsageCharge.Credited)],
                "month": month,
            },
        ).fetchone()
    assert row is not None
    return time.perf_counter() - t0, int(row[0]), int(row[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--workspaces", type=int, default=200)
    parser.add_argument("--projects", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--reference-rounds",
        type=int,
        default=1,
        help="rounds that also time the mapper's fold and compare it with the fast one",
    )
    parser.add_argument(
        "--earlier-months",
        type=int,
        default=0,
        choices=range(10),
        help="also append --events usage events in each of this many months before the one "
        "reconciled (the fold reads only its month's rows; the SQL sum filters by month too)",
    )
    parser.add_argument("--server", default="postgresql://postgres@127.0.0.1:5432")
    parser.add_argument("--json", default="bench/results/reconcile.json")
    args = parser.parse_args()

    provenance = Provenance.start()
    month = month_of(MONTH_START)
    rounds: list[dict[str, Any]] = []
    with fresh_database(args.server) as url:
        migrate(url)
        app = build_write_side(url, pool_size=2)
        try:
            started = time.perf_counter()
            appended = 0
            for back in range(args.earlier_months, 0, -1):
                earlier = MONTH_START.replace(month=MONTH_START.month - back)
                appended += generate(
                    app, args.events, args.workspaces, args.projects, 7 + back, earlier
                )
            appended += generate(app, args.events, args.workspaces, args.projects)
            _log(f"appended {appended:,} events in {time.perf_counter() - started:.1f}s")
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("VACUUM ANALYZE agentworks_events")
            log = billing_log_for(app.recorder, app.mapper)
            if log is None or not log.fast:
                raise SystemExit("the bench's store is not one the fast reader reads")
            for number in range(1, args.rounds + 1):
                load = os.getloadavg()[0]
                seconds, fold = _reconcile(app, month, log)
                events, exact = fold.events, _net(fold)
                sql_seconds, rows, sql_total = _sql_sum(url, month if args.earlier_months else None)
                if rows != events or sql_total != exact:
                    raise SystemExit(
                        f"MISMATCH: the fold saw {events:,} events totalling {exact}, "
                        f"SQL {rows:,} rows totalling {sql_total}"
                    )
                rounds.append(
                    {
                        "events": events,
                        "exact_total_micros": exact,
                        "reconcile_seconds": round(seconds, 2),
                        "reconcile_events_per_second": round(events / seconds),
                        "sql_sum_seconds": round(sql_seconds, 2),
                        "sql_sum_rows_per_second": round(rows / sql_seconds),
                        "ratio_reconcile_over_sql": round(seconds / sql_seconds, 2),
                        "loadavg_1m_at_start": round(load, 2),
                    }
                )
                if number <= args.reference_rounds:
                    mapper_seconds, reference = _reconcile(app, month, None)
                    # The mapper's fold reads every event of the log, the fast one its month's.
                    if reference.workspaces != fold.workspaces or reference.events != appended:
                        raise SystemExit("MISMATCH: the fast fold differs from the mapper's")
                    rounds[-1] |= {
                        "mapper_fold_seconds": round(mapper_seconds, 2),
                        "mapper_fold_events_per_second": round(appended / mapper_seconds),
                        "speedup_over_mapper_fold": round(mapper_seconds / seconds, 2),
                        "fast_fold_equals_mapper_fold": True,
                    }
                _log(f"round {number}: {json.dumps(rounds[-1])}")
        finally:
            app.close()

    def median(key: str) -> float:
        return float(statistics.median(r[key] for r in rounds))

    result: dict[str, Any] = {
        "events": rounds[0]["events"],
        "log_events": appended,
        "earlier_months": args.earlier_months,
        "workspaces": args.workspaces,
        "projects_per_workspace": args.projects,
        "budget_seconds_per_million": 10.0,
        "medians": {
            key: median(key)
            for key in (
                "reconcile_seconds",
                "reconcile_events_per_second",
                "sql_sum_seconds",
                "sql_sum_rows_per_second",
                "ratio_reconcile_over_sql",
            )
        },
        "rounds": rounds,
        "provenance": provenance.finish(),
    }
    _log(json.dumps(result["medians"], indent=2))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
