"""Append throughput of the write side, next to its baselines, measured in the same run.

    python -m bench.append [--seconds 10] [--writers 1,16] [--database-url postgresql://...]

Scenarios (each in its own fresh database ``aw_bench_<hex>``, dropped afterwards):

(a) ``ours.move``    AgentWorks ``move_card`` through the real command handlers; a move saves the
                     card and the project (2 events, one transaction). One board per writer
                     (4 lanes, 20 cards, no WIP limits), so the store is measured, not the board.
    ``ours.move.shared`` the same with every writer on ONE board: conflicts and retries.
    ``ours.assign``  ``assign_card``: a single-event command (the DESIGN budget's unit).
    ``ours.assign.id`` the same, each command with a ``commandId`` of its own (what an id costs:
                     its look-up and one execution of it at a time, across processes).
(b) ``es.save``      a plain ``eventsourcing`` Application with the library's stock PostgreSQL
                     persistence (tables created by the library), ``save(card, board)`` of two
                     aggregates with one event each, shaped and sized like ours.
    ``ours.save``    the same bare application on OUR recorder and schema (isolates the recorder
                     from the command handlers).
(c) ``raw.insert``   psycopg: BEGIN, INSERT two rows of the sampled event sizes, COMMIT, one round
                     trip, into a plain table with the same columns and indexes.
    ``raw.insert+notify`` the same plus ``NOTIFY`` in the transaction, as both recorders do.
(e) API-shaped (``--api-shapes``, e.g. ``2x8``: 2 processes of 8 threads each, the threads of a
    process sharing one application as the API's thread pool does): ``ours.move/2x8``,
    ``ours.assign/2x8``, ``ours.save/2x8`` and the bare library's ``es.save/2x8`` in the same
    shape. Only here can the event store's group commit form groups (commands of one process
    arriving while one is being written); the counters report its transactions and the appends
    they held.
(d) ``ours.runlog``  ``append_run_log`` with many lines per command (one event per command).
    ``ours.batch``   ``app.recorder.insert_events`` of 1000 stored events per call.
    ``raw.copy`` / ``raw.multirow`` the same rows by ``COPY ... FROM STDIN (FORMAT BINARY)`` and
                     by one ``INSERT ... SELECT FROM unnest(...)``.

Writers are worker processes (spawn), one thread and one connection each (the API-shaped
scenarios aside) (see bench/_harness.py
for why). Repetitions are interleaved: round r runs every scenario once (warm-up, then one
window of ``--seconds``), so a slow drift in the machine's background load hits all scenarios
alike; round 1 builds each scenario's database and fixtures, later rounds reuse them. Figures
are medians over the rounds; ratios are medians of per-round ratios. CPU is accounted per
scenario: the writers' own CPU time, the CPU of the scenario's PostgreSQL backends (from
/proc), and whatever else kept the machine busy ("other"). Results: rich tables on stdout and
``bench/results/append.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import secrets
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from rich.console import Console
from rich.table import Table

from bench import _harness as h
from bench._provenance import Provenance

WORKLOADS = "bench._append_workloads"
RESULTS = Path(__file__).parent / "results" / "append.json"

# DESIGN.md, "Performance budgets".
BUDGET_COMMANDS_16 = 3_000
BUDGET_VS_LIBRARY = 2.0
BUDGET_BULK_EVENTS = 50_000

# Used only when no AgentWorks scenario ran before the raw ones (see --only).
FALLBACK_TOPICS = ["domain.card:Card.Moved", "domain.project:Project.CardMoved"]
FALLBACK_SIZES = [416, 492]

# Wide enough for the results table when stdout is a file or a pipe.
console = Console(width=None if sys.stdout.isatty() else 200)


@dataclass
class Scenario:
    key: str
    group: str
    what: str
    target: str
    writers: int
    schema: str  # "migrated" | "library" | "raw"
    unit: str  # what one operation is
    params: dict[str, Any] = field(default_factory=dict)
    shared_board: bool = False
    threads: int = 1  # per writer process; > 1: API-shaped, one application per process


def plan(args: argparse.Namespace) -> list[Scenario]:
    writers: list[int] = args.writers
    top = max(writers)
    out: list[Scenario] = []
    for w in writers:
        out.append(
            Scenario(f"ours.move/{w}", "a", "move_card via handlers (2 events)",
                     f"{WORKLOADS}:MoveCards", w, "migrated", "command")
        )  # fmt: skip
    out.append(
        Scenario(f"ours.move.shared/{top}", "a", "move_card, all writers on ONE board",
                 f"{WORKLOADS}:MoveCards", top, "migrated", "command", shared_board=True)
    )  # fmt: skip
    out.append(
        Scenario(f"ours.assign/{top}", "a", "assign_card via handlers (1 event)",
                 f"{WORKLOADS}:AssignCards", top, "migrated", "command")
    )  # fmt: skip
    out.append(
        Scenario(f"ours.assign.id/{top}", "a", "assign_card, each with a commandId of its own",
                 f"{WORKLOADS}:AssignCards", top, "migrated", "command", {"command_ids": True})
    )  # fmt: skip
    for w in writers:
        out.append(
            Scenario(f"es.save/{w}", "b", "bare eventsourcing save(card, board), library recorder",
                     f"{WORKLOADS}:BareSaves", w, "library", "save", {"recorder": "library"})
        )  # fmt: skip
    for w in writers:
        out.append(
            Scenario(f"ours.save/{w}", "b", "bare save(card, board) on OUR recorder",
                     f"{WORKLOADS}:BareSaves", w, "migrated", "save", {"recorder": "ours"})
        )  # fmt: skip
    for w in writers:
        out.append(
            Scenario(f"raw.insert/{w}", "c", "psycopg INSERT 2 rows + COMMIT",
                     f"{WORKLOADS}:RawInserts", w, "raw", "txn", {"notify": False})
        )  # fmt: skip
    for w in writers:
        out.append(
            Scenario(f"raw.insert+notify/{w}", "c", "psycopg NOTIFY + INSERT 2 rows + COMMIT",
                     f"{WORKLOADS}:RawInserts", w, "raw", "txn", {"notify": True})
        )  # fmt: skip
    for w in args.bulk_writers:
        out += [
            Scenario(f"ours.runlog/{w}", "d",
                     f"append_run_log, {args.log_lines} lines/command (1 event)",
                     f"{WORKLOADS}:AppendRunLog", w, "migrated", "command",
                     {"lines": args.log_lines}),
            Scenario(f"ours.batch/{w}", "d",
                     f"recorder.insert_events, {args.batch} events/call",
                     f"{WORKLOADS}:RecorderBatches", w, "migrated", "call",
                     {"batch": args.batch}),
            Scenario(f"raw.copy/{w}", "d", f"psycopg COPY BINARY, {args.batch} rows/txn",
                     f"{WORKLOADS}:RawBatches", w, "raw", "txn",
                     {"batch": args.batch, "mode": "copy"}),
            Scenario(f"raw.multirow/{w}", "d", f"psycopg INSERT unnest, {args.batch} rows/txn",
                     f"{WORKLOADS}:RawBatches", w, "raw", "txn",
                     {"batch": args.batch, "mode": "multirow"}),
        ]  # fmt: skip
    for processes, threads in args.api_shapes:
        shape = f"{processes}x{threads}"
        api = {"threads": threads}
        out += [
            Scenario(f"ours.move/{shape}", "e", f"move_card, {shape} threads sharing an app",
                     f"{WORKLOADS}:MoveCards", processes, "migrated", "command", api,
                     threads=threads),
            Scenario(f"ours.assign/{shape}", "e", f"assign_card, {shape} threads sharing an app",
                     f"{WORKLOADS}:AssignCards", processes, "migrated", "command", api,
                     threads=threads),
            Scenario(f"ours.assign.id/{shape}", "e", f"assign_card with commandIds, {shape}",
                     f"{WORKLOADS}:AssignCards", processes, "migrated", "command",
                     {**api, "command_ids": True}, threads=threads),
            Scenario(f"es.save/{shape}", "e", f"bare eventsourcing save(card, board), {shape}",
                     f"{WORKLOADS}:BareSaves", processes, "library", "save",
                     {**api, "recorder": "library"}, threads=threads),
            Scenario(f"ours.save/{shape}", "e", f"bare save(card, board) on OUR recorder, {shape}",
                     f"{WORKLOADS}:BareSaves", processes, "migrated", "save",
                     {**api, "recorder": "ours"}, threads=threads),
        ]  # fmt: skip
    if args.only:
        wanted = [p.strip() for p in args.only.split(",") if p.strip()]
        out = [s for s in out if any(s.key.startswith(p) for p in wanted)]
    return out


# -- databases ----------------------------------------------------------------------------------


def admin_url(base: str) -> str:
    return f"{base.rstrip('/')}/postgres"


def drop_database(base: str, dbname: str) -> None:
    with psycopg.connect(admin_url(base), autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname))
        )


def prepare(scenario: Scenario, url: str, sample: dict[str, Any]) -> dict[str, Any]:
    """Create the scenario's schema and shared fixtures; return params common to all writers."""
    from infra.migrate import ensure_database, migrate
    from infra.settings import Settings, db_logins

    ensure_database(url)
    common: dict[str, Any] = {"url": url, **scenario.params}
    if scenario.schema == "migrated":
        migrate(url, logins=db_logins(Settings.load()))
        from commands import models as m
        from commands.handlers import Actor
        from infra.bootstrap import build_write_side

        app = build_write_side(url, pool_size=1)
        try:
            boot = Actor(user_id="alice", workspace_id="*")
            ws = app.create_workspace(m.CreateWorkspace(name="Bench"), boot)
            common.update(user="alice", workspace_id=str(ws.id))
            if scenario.shared_board:
                from bench._append_workloads import make_board

                actor = Actor(user_id="alice", workspace_id=str(ws.id))
                project_id, cards = make_board(app, actor, "shared board")
                common.update(project_id=str(project_id), cards=[str(c) for c in cards])
        finally:
            app.close()
    elif scenario.schema == "library":
        from bench._append_workloads import bare_app

        bare_app(url, recorder="library", create_table=True).close()
    else:
        from bench._append_workloads import RAW_TABLE_DDL

        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(RAW_TABLE_DDL.encode())
    common.update(payloads=sample["payloads"], topics=sample["topics"])
    return common


def events_table(url: str) -> str | None:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public' "
            "AND table_name IN ('agentworks_events', 'bareapp_events', 'bench_raw') "
            "ORDER BY table_name LIMIT 1"
        ).fetchone()
    return None if row is None else str(row[0])


def stored_stats(url: str) -> dict[str, Any]:
    table = events_table(url)
    if table is None:
        return {}
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            sql.SQL("SELECT topic, count(*), avg(length(state))::int FROM {} GROUP BY topic "
                    "ORDER BY count(*) DESC LIMIT 4").format(sql.Identifier(table))
        ).fetchall()  # fmt: skip
    return {
        "table": table,
        "by_topic": [{"topic": t, "rows": n, "avg_bytes": b} for t, n, b in rows],
    }


def take_sample(url: str) -> dict[str, Any] | None:
    """One real stored Card.Moved and Project.CardMoved: the payloads raw and bulk rows copy."""
    topics = ["domain.card:Card.Moved", "domain.project:Project.CardMoved"]
    payloads: list[bytes] = []
    with psycopg.connect(url) as conn:
        for topic in topics:
            row = conn.execute(
                "SELECT state FROM agentworks_events WHERE topic = %s "
                "ORDER BY notification_id DESC LIMIT 1",
                (topic,),
            ).fetchone()
            if row is None:
                return None
            payloads.append(bytes(row[0]))
    return {"topics": topics, "payloads": payloads, "source": "stored AgentWorks move events"}


def fallback_sample() -> dict[str, Any]:
    payloads = [b'{"pad":"' + b"x" * (n - 10) + b'"}' for n in FALLBACK_SIZES]
    return {"topics": FALLBACK_TOPICS, "payloads": payloads, "source": "synthetic"}


# -- running ------------------------------------------------------------------------------------


@dataclass
class State:
    """A scenario across rounds: its database, fixtures and each round's measurements."""

    scenario: Scenario
    dbname: str
    url: str
    common: dict[str, Any] | None = None
    reuse: list[dict[str, Any]] = field(default_factory=list)
    windows: list[dict[str, float]] = field(default_factory=list)
    results: list[h.WorkerResult] = field(default_factory=list)
    observations: list[h.Observation] = field(default_factory=list)
    setup_seconds: float = 0.0
    error: str | None = None


def run_round(
    pool: h.WorkerPool, st: State, args: argparse.Namespace, sample: dict[str, Any]
) -> None:
    """One window of one scenario: set up the writers (reusing round 1's fixtures), run them."""
    if st.common is None:
        started = time.monotonic()
        st.common = prepare(st.scenario, st.url, sample)
        st.setup_seconds += time.monotonic() - started
    common = st.common

    def params_for(index: int) -> dict[str, Any]:
        return {**common, **(st.reuse[index] if index < len(st.reuse) else {})}

    started = time.monotonic()
    infos, results, obs, measure_from = pool.run(
        st.scenario.target,
        params_for,
        st.scenario.writers,
        warmup=args.warmup,
        measured=args.seconds,
        on_measure=lambda a, b: h.observe(st.dbname, admin_url(args.database_url), a, b),
    )
    st.setup_seconds += time.monotonic() - started - args.warmup - args.seconds
    if not st.reuse:
        st.reuse = [info.get("reuse", {}) for info in infos]
    st.windows += h.windows(results, measure_from, args.seconds, 1)
    st.results += results
    st.observations.append(obs)


def summarise(st: State, args: argparse.Namespace, stats: dict[str, Any]) -> dict[str, Any]:
    scenario = st.scenario
    base: dict[str, Any] = {
        "key": scenario.key,
        "group": scenario.group,
        "what": scenario.what,
        "writers": scenario.writers,
        "threads": scenario.threads,
        "unit": scenario.unit,
    }
    if st.error is not None or not st.windows:
        return {**base, "error": st.error or "no measurements"}
    per_window = st.windows
    med = h.medians(per_window)
    attempts = sum(w["ops_per_s"] + w["failed_per_s"] for w in per_window) * args.seconds
    counters: dict[str, int] = {}
    for r in st.results:
        for k, v in r.counters.items():
            counters[k] = counters.get(k, 0) + v
    client_cpu = sum(r.cpu_seconds for r in st.results)
    server_cpu = sum(o.server_cpu_seconds for o in st.observations)
    busy_cpu = sum(o.busy_cpu_seconds for o in st.observations)
    wall = sum(o.wall_seconds for o in st.observations)
    waits: Counter[str] = Counter()
    for o in st.observations:
        waits.update(o.waits)
    total_waits = sum(waits.values()) or 1

    def per_op(seconds: float) -> float | None:
        return round(seconds / attempts * 1000, 3) if attempts else None

    own_ms = (client_cpu + server_cpu) / attempts * 1000 if attempts else 0.0
    out: dict[str, Any] = {
        **base,
        "windows": [{k: round(v, 3) for k, v in w.items()} for w in per_window],
        "median": {k: round(v, 3) for k, v in med.items()},
        "ops_range": [
            round(min(w["ops_per_s"] for w in per_window), 1),
            round(max(w["ops_per_s"] for w in per_window), 1),
        ],
        "counters": counters,
        "client_cpu_ms_per_op": per_op(client_cpu),
        "server_cpu_ms_per_op": per_op(server_cpu),
        "machine_cpu_ms_per_op": per_op(busy_cpu),
        # What all the machine's cores could do if this scenario had them to itself and were
        # CPU-bound: cores / (writer + backend CPU per operation). Robust to background load.
        "cpu_ceiling_ops_per_s": round((os.cpu_count() or 1) * 1000 / own_ms) if own_ms else None,
        "machine_busy_cores": round(busy_cpu / wall, 2) if wall else None,
        # Busy cores not accounted for by this scenario's writers and backends: WAL writer,
        # checkpointer, and anything else running on the machine (noise).
        "other_busy_cores": round((busy_cpu - server_cpu - client_cpu) / wall, 2) if wall else None,
        "backend_states": {k: round(v / total_waits, 3) for k, v in waits.most_common(6)},
        "stored": stats,
        "setup_seconds": round(st.setup_seconds, 1),
    }
    if counters.get("group_transactions"):
        out["mean_group_size"] = round(
            counters["grouped_appends"] / counters["group_transactions"], 2
        )
    if scenario.key.startswith("ours.runlog"):
        out["median"]["lines_per_s"] = round(med["ops_per_s"] * args.log_lines, 1)
    return out


# -- reporting ----------------------------------------------------------------------------------


# Scenarios compared at the same number of writers: (numerator, denominator) kinds.
WRITER_RATIOS = (
    ("ours.move", "es.save"),
    ("ours.move", "raw.insert"),
    ("ours.save", "es.save"),
    ("ours.save", "raw.insert"),
    ("es.save", "raw.insert"),
    ("raw.insert+notify", "raw.insert"),
)
BULK_RATIOS = (("ours.batch", "raw.copy"), ("ours.batch", "raw.multirow"))


def ratio_pairs(
    writers: list[int], bulk: list[int], shapes: list[tuple[int, int]] | None = None
) -> list[tuple[str, str, str]]:
    """(numerator, denominator, metric) pairs reported as ratios."""
    ops: list[tuple[str, str]] = []
    for processes, threads in shapes or []:
        shape, flat = f"{processes}x{threads}", processes * threads
        ops += [(f"ours.{cmd}/{shape}", f"es.save/{shape}") for cmd in ("move", "assign", "save")]
        # Against the library in the usual shape (one thread per process), too.
        ops += [(f"ours.{cmd}/{shape}", f"es.save/{flat}") for cmd in ("move", "assign")]
        ops += [(f"{kind}/{shape}", f"{kind}/{flat}") for kind in ("ours.move", "es.save")]
        ops.append((f"ours.assign.id/{shape}", f"ours.assign/{shape}"))
    ops += [(f"{num}/{w}", f"{den}/{w}") for w in writers for num, den in WRITER_RATIOS]
    # What sending a commandId costs (its look-up, and running one execution of it at a time).
    ops.append((f"ours.assign.id/{max(writers)}", f"ours.assign/{max(writers)}"))
    events = [(f"{num}/{w}", f"{den}/{w}") for w in bulk for num, den in BULK_RATIOS]
    return [(num, den, "ops_per_s") for num, den in ops] + [
        (num, den, "events_per_s") for num, den in events
    ]


def ratios(
    rows: dict[str, dict[str, Any]],
    writers: list[int],
    bulk: list[int],
    shapes: list[tuple[int, int]] | None = None,
) -> dict[str, Any]:
    """Median over rounds of the per-round ratio: both sides of a ratio ran minutes apart at
    most, so slow drifts of the machine's background load cancel out within a round."""
    out: dict[str, Any] = {}
    for num, den, metric in ratio_pairs(writers, bulk, shapes):
        a, b = rows.get(num, {}).get("windows"), rows.get(den, {}).get("windows")
        if not a or not b:
            continue
        per_round = [x[metric] / y[metric] for x, y in zip(a, b, strict=False) if y[metric]]
        if per_round:
            name = f"{num} ÷ {den}" + (" (events/s)" if metric == "events_per_s" else "")
            out[name] = {
                "median": round(statistics.median(per_round), 3),
                "per_round": [round(x, 3) for x in per_round],
            }
    return out


def budgets(
    rows: dict[str, dict[str, Any]],
    ratio_rows: dict[str, Any],
    writers: list[int],
    bulk: list[int],
    shapes: list[tuple[int, int]] | None = None,
) -> list[dict[str, Any]]:
    top = max(writers)
    out: list[dict[str, Any]] = []

    def med(key: str, what: str = "ops_per_s") -> float | None:
        row = rows.get(key)
        return None if row is None or "median" not in row else row["median"][what]

    def add(budget: str, measure: str, value: float, goal: float) -> None:
        out.append({"budget": budget, "measure": measure, "value": value, "met": value >= goal})

    for key, label in (
        (f"ours.assign/{top}", f"single-event commands/s at {top} writers (assign_card)"),
        (f"ours.move/{top}", f"2-event commands/s at {top} writers (move_card)"),
    ):
        value = med(key)
        if value is not None:
            add(">= 3,000 commands/s", label, round(value), BUDGET_COMMANDS_16)
    for key, note in ((f"ours.move/{top}", "commands"), (f"ours.save/{top}", "recorder only")):
        name = f"{key} ÷ es.save/{top}"
        if name in ratio_rows:
            add(">= 2x bare eventsourcing", f"{name} ({note})", ratio_rows[name]["median"],
                BUDGET_VS_LIBRARY)  # fmt: skip
    for processes, threads in shapes or []:
        shape = f"{processes}x{threads}"
        value = med(f"ours.assign/{shape}")
        if value is not None:
            add(">= 1,000 single-event commands/s (issue 17)",
                f"ours.assign/{shape} (API-shaped, group commit)", round(value), 1_000)  # fmt: skip
        name = f"ours.move/{shape} ÷ es.save/{shape}"
        if name in ratio_rows:
            add(">= 1.5x bare eventsourcing (issue 17)", f"{name} (commands, API-shaped)",
                ratio_rows[name]["median"], 1.5)  # fmt: skip
    best = max((med(f"ours.batch/{w}", "events_per_s") or 0.0 for w in bulk), default=0.0)
    if best:
        add(">= 50,000 events/s bulk", f"ours.batch (writers {bulk}, best)", round(best),
            BUDGET_BULK_EVENTS)  # fmt: skip
    return out


def render(report: dict[str, Any]) -> None:
    table = Table(title="Append throughput (medians over interleaved rounds)", show_lines=False)
    for col, justify in (
        ("scenario", "left"), ("w", "right"), ("ops/s", "right"), ("min-max", "right"),
        ("events/s", "right"), ("p50 ms", "right"), ("p99 ms", "right"),
        ("client CPU ms/op", "right"), ("server CPU ms/op", "right"),
        ("CPU ceiling ops/s", "right"), ("busy cores (other)", "right"),
        ("retries / failed", "right"),
    ):  # fmt: skip
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for row in report["scenarios"]:
        if "error" in row:
            table.add_row(row["key"], _writers(row), "[red]error[/red]", *[""] * 9)
            continue
        med = row["median"]
        c = row["counters"]
        retries = (
            f"{c.get('conflict_retries', 0)} / {c.get('failed_commands', 0)}"
            if "conflict_retries" in c
            else ""
        )
        if row.get("mean_group_size"):
            retries += f" (group {row['mean_group_size']:.1f})"
        table.add_row(
            row["key"],
            _writers(row),
            f"{med['ops_per_s']:,.0f}",
            f"{row['ops_range'][0]:,.0f}-{row['ops_range'][1]:,.0f}",
            f"{med['events_per_s']:,.0f}",
            f"{med['p50_ms']:.2f}",
            f"{med['p99_ms']:.2f}",
            _fmt(row["client_cpu_ms_per_op"]),
            _fmt(row["server_cpu_ms_per_op"]),
            f"{row['cpu_ceiling_ops_per_s']:,}" if row["cpu_ceiling_ops_per_s"] else "",
            f"{_fmt(row['machine_busy_cores'])} ({_fmt(row['other_busy_cores'])})",
            retries,
        )
    console.print(table)
    legend = Table(title="Scenarios", show_header=False)
    for row in report["scenarios"]:
        if "what" in row:
            legend.add_row(row["key"], row["what"])
    console.print(legend)
    rt = Table(title="Ratios (same run; median of per-round ratios)")
    rt.add_column("ratio")
    rt.add_column("median", justify="right")
    rt.add_column("per round", justify="right")
    for k, v in report["ratios"].items():
        rt.add_row(k, f"{v['median']:.2f}", ", ".join(f"{x:.2f}" for x in v["per_round"]))
    console.print(rt)
    bt = Table(title="DESIGN budgets")
    for col in ("budget", "measure", "value", "met"):
        bt.add_column(col)
    for b in report["budgets"]:
        bt.add_row(b["budget"], b["measure"], f"{b['value']:,}",
                   "[green]yes[/green]" if b["met"] else "[red]no[/red]")  # fmt: skip
    console.print(bt)
    wt = Table(title="Where the scenario's server backends were (sampled every 20 ms)")
    wt.add_column("scenario")
    wt.add_column("top states (share of samples)")
    for row in report["scenarios"]:
        if "backend_states" in row:
            wt.add_row(
                row["key"], ", ".join(f"{k} {v:.0%}" for k, v in row["backend_states"].items())
            )
    console.print(wt)


def _writers(row: dict[str, Any]) -> str:
    threads = int(row.get("threads") or 1)
    return f"{row['writers']}x{threads}" if threads > 1 else str(row["writers"])


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def machine(database_url: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_at_start": os.getloadavg(),
    }
    with contextlib.suppress(Exception):
        from importlib.metadata import version

        info["eventsourcing"] = version("eventsourcing")
        info["psycopg"] = version("psycopg")
    with psycopg.connect(admin_url(database_url)) as conn:
        for setting in ("server_version", "fsync", "synchronous_commit", "wal_sync_method",
                        "commit_delay", "shared_buffers", "max_connections"):  # fmt: skip
            row = conn.execute(sql.SQL("SHOW {}").format(sql.Identifier(setting))).fetchone()
            info[f"pg_{setting}"] = None if row is None else row[0]
    with contextlib.suppress(Exception):
        info["git_head"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, check=False, cwd=Path(__file__).parent,
        ).stdout.strip()  # fmt: skip
    return info


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    def ints(text: str) -> list[int]:
        return [int(x) for x in text.split(",") if x.strip()]

    def shapes(text: str) -> list[tuple[int, int]]:
        pairs = [x.strip().split("x") for x in text.split(",") if x.strip()]
        return [(int(p), int(t)) for p, t in pairs]

    p = argparse.ArgumentParser(prog="python -m bench.append", description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=10.0, help="seconds per window (default 10)")
    p.add_argument("--repeats", type=int, default=3, help="rounds (windows per scenario)")
    p.add_argument("--warmup", type=float, default=0.5, help="seconds before each window")
    p.add_argument("--writers", type=ints, default=[1, 16], help='writer counts, default "1,16"')
    p.add_argument("--bulk-writers", type=ints, default=[1], help='bulk writer counts ("1")')
    p.add_argument(
        "--api-shapes",
        type=shapes,
        default=[(2, 8)],
        help='API-shaped scenarios, processes x threads sharing one app ("2x8"; "" for none)',
    )
    p.add_argument("--batch", type=int, default=1000, help="events per bulk call (1000)")
    p.add_argument("--log-lines", type=int, default=100, help="lines per append_run_log (100)")
    p.add_argument(
        "--database-url",
        default="postgresql://postgres@127.0.0.1:5432",
        help="server URL without database; scenario databases are created under it",
    )
    p.add_argument("--only", default="", help="comma list of scenario key prefixes to run")
    p.add_argument("--json", type=Path, default=RESULTS, help="where to write the JSON results")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    scenarios = plan(args)
    started = time.monotonic()
    provenance = Provenance.start()
    report: dict[str, Any] = {
        "command": "python -m bench.append " + " ".join(sys.argv[1:] if argv is None else argv),
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(args.database_url),
        "settings": {
            "seconds": args.seconds, "repeats": args.repeats, "warmup": args.warmup,
            "writers": args.writers, "bulk_writers": args.bulk_writers, "batch": args.batch,
            "api_shapes": [f"{p}x{t}" for p, t in args.api_shapes],
            "log_lines": args.log_lines,
            "concurrency": "one spawned process per writer, one thread, one connection; "
            "API-shaped PxT: P processes of T threads sharing one application",
            "rounds": "repetitions interleaved: round r runs every scenario once, in order",
        },
    }  # fmt: skip
    sample = fallback_sample()
    states = {
        sc.key: State(sc, name, f"{args.database_url.rstrip('/')}/{name}")
        for sc in scenarios
        for name in [f"aw_bench_{secrets.token_hex(6)}"]
    }
    pool = h.WorkerPool(max(s.writers for s in scenarios) if scenarios else 1)
    stats: dict[str, dict[str, Any]] = {}
    try:
        for r in range(args.repeats):
            for i, st in enumerate(states.values(), 1):
                if st.error is not None:
                    continue
                key = st.scenario.key
                try:
                    run_round(pool, st, args, sample)
                except Exception as exc:  # noqa: BLE001 - a broken scenario must not lose the others' figures
                    st.error = str(exc)[-3000:]
                    console.log(f"[red]{key} failed[/red]: {st.error}")
                    continue
                w = st.windows[-1]
                console.log(
                    f"round {r + 1}/{args.repeats} [{i}/{len(states)}] {key}: "
                    f"{w['ops_per_s']:,.0f} {st.scenario.unit}/s, {w['events_per_s']:,.0f} "
                    f"events/s, p50 {w['p50_ms']:.2f} ms, p99 {w['p99_ms']:.2f} ms"
                )
                if sample["source"] == "synthetic" and key.startswith("ours.move"):
                    sample = take_sample(st.url) or sample
    finally:
        pool.close()
        for key, st in states.items():
            with contextlib.suppress(psycopg.Error):
                if st.common is not None and st.error is None:
                    stats[key] = stored_stats(st.url)
            with contextlib.suppress(psycopg.Error):
                drop_database(args.database_url, st.dbname)
    rows = {key: summarise(st, args, stats.get(key, {})) for key, st in states.items()}
    report["scenarios"] = list(rows.values())
    report["payload_sample"] = {
        "source": sample["source"],
        "topics": sample["topics"],
        "bytes": [len(p) for p in sample["payloads"]],
    }
    report["ratios"] = ratios(rows, args.writers, args.bulk_writers, args.api_shapes)
    report["budgets"] = budgets(
        rows, report["ratios"], args.writers, args.bulk_writers, args.api_shapes
    )
    report["total_seconds"] = round(time.monotonic() - started, 1)
    report["provenance"] = provenance.finish()
    render(report)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    console.log(f"wrote {args.json} in {report['total_seconds']} s")
    return 1 if any("error" in row for row in rows.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
