"""Rebuild throughput: the whole event log into every read model, next to its baselines.

    python -m bench.rebuild [--events 1000000] [--database-url postgresql://...]

One run, one fresh database ``aw_bench_<hex>`` (dropped at the end unless ``--keep``):

1. **Log.** About ``--events`` real domain events (see ``bench/_rebuild_log.py``: workspaces,
   boards, cards moved many times, agent runs with log chunks of ~20 lines, LLM calls with their
   usage charges and month-to-date spend, credits and refunds), appended in bulk with the
   recorder, then ``VACUUM ANALYZE`` and a checkpoint so every measurement starts alike.
2. **Reading the log** (baseline: what any rebuild pays before projecting anything):
   ``recorder.select_notifications`` over the whole log; the same plus the library's decoding
   (mapper + ``envelope_from_event``, timed on a sample and scaled, it is slow); and
   ``EventLog.read_following``, the reader rebuilds use (rows and decoding).
3. **Rebuild all** (the measurement): ``rebuild_many(all projectors)``, i.e. ``agentworks
   rebuild all`` reading the log once, swapping each read model in. Then each projector rebuilt
   on its own with ``rebuild()`` (what ``agentworks rebuild NAME`` does, and what ``rebuild
   all`` did one projector after another until now): per-projector figures.
4. **COPY baseline**: every rebuilt read-model table copied out to memory (``COPY ... TO
   STDOUT (FORMAT BINARY)``) and back into empty copies (``COPY ... FROM STDIN``) with the
   rebuild's strategy (keys in place, secondary indexes built after): the cheapest way for
   PostgreSQL to take exactly those rows, no projecting at all.

Figures are events per second of the whole log (``--events``), so they compare with the budget
(DESIGN.md: ≥ 50,000 events/s from the store into all read models, 1M events under 20 s);
ratios are against baselines measured in the same run, since the machine is shared and noisy.
Results: stdout, ``bench/results/rebuild.json``, and the "Rebuild (issue: read models)" section
of ``BENCHMARKS.md`` (replaced if present, else appended; the file is re-read right before
writing).
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import platform
import secrets
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import sql

from bench._provenance import Provenance

if TYPE_CHECKING:
    from collections.abc import Iterator

    from bench._rebuild_log import LogGenerator
    from infra.bootstrap import ReadSide

RESULTS = Path(__file__).parent / "results" / "rebuild.json"
BENCHMARKS = Path(__file__).parent.parent / "BENCHMARKS.md"
SECTION = "## Rebuild (issue: read models)"

BUDGET_EVENTS_PER_SECOND = 50_000
BUDGET_SECONDS_PER_MILLION = 20.0
LIBRARY_DECODE_SAMPLE = 50_000


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- machine accounting ---------------------------------------------------------------------------


def _cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    with open("/proc/stat") as stat:
        fields = [int(x) for x in stat.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


@dataclass
class Timing:
    seconds: float = 0.0
    client_cpu: float = 0.0
    busy_cores: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "seconds": round(self.seconds, 3),
            "client_cpu_seconds": round(self.client_cpu, 3),
            "machine_busy_cores": round(self.busy_cores, 2),
            **self.extra,
        }


@contextmanager
def timed() -> Iterator[Timing]:
    timing = Timing()
    busy0, total0 = _cpu_jiffies()
    cpu0, t0 = time.process_time(), time.perf_counter()
    try:
        yield timing
    finally:
        timing.seconds = time.perf_counter() - t0
        timing.client_cpu = time.process_time() - cpu0
        busy1, total1 = _cpu_jiffies()
        cores = os.cpu_count() or 1
        timing.busy_cores = (busy1 - busy0) / max(total1 - total0, 1) * cores


# -- the database ---------------------------------------------------------------------------------


def admin(base: str) -> psycopg.Connection[Any]:
    return psycopg.connect(f"{base.rstrip('/')}/postgres", autocommit=True)


def create_database(base: str, name: str) -> str:
    with admin(base) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return f"{base.rstrip('/')}/{name}"


def drop_database(base: str, name: str) -> None:
    with admin(base) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


def server_settings(url: str) -> dict[str, str]:
    names = ("server_version", "shared_buffers", "fsync", "synchronous_commit", "wal_level",
             "max_wal_size", "maintenance_work_mem", "work_mem", "datcollate")  # fmt: skip
    out: dict[str, str] = {}
    with psycopg.connect(url) as conn:
        for name in names[:-1]:
            row = conn.execute(sql.SQL("SHOW {}").format(sql.Identifier(name))).fetchone()
            out[name] = str(row[0]) if row else ""
        row = conn.execute(
            "SELECT datcollate FROM pg_database WHERE datname = current_database()"
        ).fetchone()
        out["datcollate"] = str(row[0]) if row else ""
    return out


def generate_log(
    url: str, events: int, seed: int, generator: LogGenerator | None = None
) -> dict[str, Any]:
    from bench._rebuild_log import describe, generate
    from infra.bootstrap import build_write_side

    dbname = psycopg.conninfo.conninfo_to_dict(url)["dbname"]
    base = url.rsplit("/", 1)[0]
    # Generation is not measured: let its commits skip the disk flush (reset afterwards).
    with admin(base) as conn:
        conn.execute(
            sql.SQL("ALTER DATABASE {} SET synchronous_commit = off").format(
                sql.Identifier(str(dbname))
            )
        )
    app = build_write_side(url, pool_size=2)
    started = time.perf_counter()
    last = [started]

    def progress(done: int) -> None:
        now = time.perf_counter()
        if now - last[0] > 15:
            last[0] = now
            log(f"  generated {done:,} events ({done / (now - started):,.0f}/s)")

    try:
        stats = generate(app, events, seed=seed, progress=progress, generator=generator)
    finally:
        app.close()
    seconds = time.perf_counter() - started
    with admin(base) as conn:
        conn.execute(
            sql.SQL("ALTER DATABASE {} RESET synchronous_commit").format(
                sql.Identifier(str(dbname))
            )
        )
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE agentworks_events")
        conn.execute("CHECKPOINT")
        size = conn.execute("SELECT pg_total_relation_size('agentworks_events')").fetchone()
    described = describe(stats)
    described["generation_seconds"] = round(seconds, 1)
    described["events_table_mb"] = round(int(size[0]) / 1e6, 1) if size else None
    return described


# -- reading the log ------------------------------------------------------------------------------


def measure_reads(side: ReadSide, batch: int) -> dict[str, Any]:
    from domain.envelope import envelope_from_event

    recorder = side.event_log.recorder
    mapper = side.event_log.mapper
    out: dict[str, Any] = {}

    with timed() as t:
        position, count = 0, 0
        while True:
            notes = recorder.select_notifications(
                start=position, limit=batch, inclusive_of_start=False
            )
            if not notes:
                break
            position, count = notes[-1].id, count + len(notes)
    t.extra["events"] = count
    out["select_notifications"] = t.as_dict()
    log(f"  select_notifications: {count:,} events in {t.seconds:.1f}s")

    sample = recorder.select_notifications(
        start=0, limit=LIBRARY_DECODE_SAMPLE, inclusive_of_start=False
    )
    with timed() as t:
        for note in sample:
            envelope_from_event(note.id, mapper.to_domain_event(note))
    per_event = t.seconds / max(len(sample), 1)
    out["library_decode_sample"] = {
        **t.as_dict(),
        "events": len(sample),
        "us_per_event": round(per_event * 1e6, 1),
        "scaled_to_log_seconds": round(per_event * count, 1),
    }
    out["select_notifications_plus_library_decode_seconds"] = round(
        out["select_notifications"]["seconds"] + per_event * count, 1
    )
    log(f"  library decode: {per_event * 1e6:.1f} us/event (sample of {len(sample):,})")

    everything = frozenset({"Workspace", "Project", "Card", "AgentRun", "UsageCharge",
                            "MonthlySpend"})  # fmt: skip
    from projections.registry import all_projectors

    followed = frozenset().union(*(p.aggregates for p in all_projectors()))
    for key, aggregates in (("event_log_read_all", everything),
                            ("event_log_read_followed", followed)):  # fmt: skip
        # As the rebuild reads: without the cyclic garbage collector (see projections.rebuild).
        gc.disable()
        try:
            with timed() as t:
                position, count, decoded = 0, 0, 0
                while True:
                    envelopes, position, read, _ = side.event_log.read_following(
                        position, batch, aggregates
                    )
                    if not read:
                        break
                    count, decoded = count + read, decoded + len(envelopes)
        finally:
            gc.enable()
        t.extra.update(events=count, decoded=decoded)
        out[key] = t.as_dict()
        log(f"  {key}: {count:,} events ({decoded:,} decoded) in {t.seconds:.1f}s")
    return out


# -- rebuilding -----------------------------------------------------------------------------------


def table_digest(url: str, tables: list[str]) -> dict[str, list[int]]:
    """Row count and an order-independent checksum of every table."""
    out: dict[str, list[int]] = {}
    with psycopg.connect(url) as conn:
        for table in tables:
            row = conn.execute(
                sql.SQL(
                    "SELECT count(*), coalesce(sum(hashtext(t::text)::bigint), 0) FROM {} AS t"
                ).format(sql.Identifier(table))
            ).fetchone()
            assert row is not None
            out[table] = [int(row[0]), int(row[1])]
    return out


def measure_rebuild_all(
    side: ReadSide, url: str, batch: int, events: int, *, parallel: bool = True
) -> dict[str, Any]:
    from projections.rebuild import rebuild_many

    projectors = [runner.projector for runner in side.runners]
    started = time.perf_counter()
    marks: list[tuple[float, int]] = []

    def progress(position: int, head: int) -> None:
        marks.append((time.perf_counter() - started, position))
        if len(marks) % 20 == 0:
            log(f"  rebuild all: position {position:,} of {head:,}")

    with timed() as t:
        results = rebuild_many(
            projectors,
            side.pool,
            side.event_log,
            batch_size=batch,
            progress=progress,
            parallel=parallel,
        )
    replay = marks[-1][0] if marks else t.seconds
    t.extra.update(
        events=events,
        events_per_second=round(events / t.seconds),
        replay_seconds=round(replay, 2),
        finish_and_swap_seconds=round(t.seconds - replay, 2),
        swapped=[r.projector for r in results if r.swapped],
    )
    log(f"  rebuild all: {t.seconds:.1f}s ({events / t.seconds:,.0f} events/s)")
    return t.as_dict()


def measure_each(side: ReadSide, batch: int, events: int) -> dict[str, Any]:
    from projections.rebuild import rebuild

    out: dict[str, Any] = {}
    total = 0.0
    for runner in side.runners:
        with timed() as t:
            result = rebuild(runner.projector, side.pool, side.event_log, batch_size=batch)
        total += t.seconds
        t.extra.update(events=result.events, events_per_second=round(events / t.seconds))
        out[runner.name] = t.as_dict()
        log(f"  rebuild {runner.name}: {t.seconds:.1f}s ({events / t.seconds:,.0f} events/s)")
    out["sequential_total"] = {
        "seconds": round(total, 2),
        "events_per_second": round(events / total),
    }
    return out


# -- the COPY baseline ----------------------------------------------------------------------------


def measure_copy(url: str, tables: list[str]) -> dict[str, Any]:
    """Each table out to memory, then into an empty copy (keys in place, the other indexes
    built after the load, as the rebuild does)."""
    out: dict[str, Any] = {"tables": {}}
    copy_out = copy_in = index = 0.0
    rows_total = 0
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SET maintenance_work_mem = '256MB'")
        for table in tables:
            target = f"{table}__copybench"
            columns = [
                r[0]
                for r in conn.execute(
                    "SELECT column_name FROM information_schema.columns"
                    " WHERE table_name = %s AND is_generated = 'NEVER' ORDER BY ordinal_position",
                    (table,),
                ).fetchall()
            ]
            names = sql.SQL(", ").join(sql.Identifier(c) for c in columns)
            buffer = io.BytesIO()
            t0 = time.perf_counter()
            with conn.cursor().copy(
                sql.SQL("COPY {} ({}) TO STDOUT (FORMAT BINARY)").format(
                    sql.Identifier(table), names
                )
            ) as copy:
                for data in copy:
                    buffer.write(data)
            t1 = time.perf_counter()
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(target)))
            conn.execute(
                sql.SQL("CREATE TABLE {} (LIKE {} INCLUDING ALL)").format(
                    sql.Identifier(target), sql.Identifier(table)
                )
            )
            deferred = conn.execute(
                "SELECT i.indexrelid::regclass::text, pg_get_indexdef(i.indexrelid)"
                " FROM pg_index AS i WHERE i.indrelid = %s::regclass"
                " AND NOT i.indisunique AND NOT i.indisprimary",
                (target,),
            ).fetchall()
            for name, _ in deferred:
                conn.execute(sql.SQL("DROP INDEX ") + sql.SQL(name))
            t2 = time.perf_counter()
            with (
                conn.transaction(),
                conn.cursor().copy(
                    sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(
                        sql.Identifier(target), names
                    )
                ) as copy,
            ):
                copy.write(buffer.getvalue())
            t3 = time.perf_counter()
            for _, definition in deferred:
                conn.execute(sql.SQL(definition))
            t4 = time.perf_counter()
            rows = conn.execute(
                sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(target))
            ).fetchone()
            conn.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(target)))
            n = int(rows[0]) if rows else 0
            rows_total += n
            copy_out, copy_in, index = copy_out + t1 - t0, copy_in + t3 - t2, index + t4 - t3
            out["tables"][table] = {
                "rows": n,
                "mb": round(buffer.tell() / 1e6, 1),
                "copy_out_seconds": round(t1 - t0, 3),
                "copy_in_seconds": round(t3 - t2, 3),
                "index_seconds": round(t4 - t3, 3),
            }
            log(f"  COPY {table}: {n:,} rows in {t3 - t2:.1f}s (+{t4 - t3:.1f}s indexes)")
    out.update(
        rows=rows_total,
        copy_out_seconds=round(copy_out, 2),
        copy_in_seconds=round(copy_in, 2),
        index_seconds=round(index, 2),
        load_seconds=round(copy_in + index, 2),
    )
    return out


# -- report ---------------------------------------------------------------------------------------


def git_revision() -> str:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "projections", "streams"],
            capture_output=True, text=True, check=True, cwd=Path(__file__).parent.parent,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + (" + uncommitted projections/streams" if dirty else "")


def summarise(result: dict[str, Any]) -> dict[str, Any]:
    events = result["log"]["events"]
    rebuild = result["rebuild_all"]
    reads = result["reads"]
    copy = result["copy_baseline"]
    seconds = rebuild["seconds"]
    read_seconds = reads["event_log_read_followed"]["seconds"]
    floor = read_seconds + copy["load_seconds"]
    summary = {
        "events": events,
        "rebuild_all_seconds": seconds,
        "rebuild_all_events_per_second": round(events / seconds),
        "seconds_per_million": round(seconds / events * 1e6, 1),
        "budget_events_per_second": BUDGET_EVENTS_PER_SECOND,
        "share_of_budget": round(events / seconds / BUDGET_EVENTS_PER_SECOND, 2),
        "vs_copy_load": round(seconds / copy["load_seconds"], 2),
        "vs_read_and_decode": round(seconds / read_seconds, 2),
        "vs_read_plus_copy": round(seconds / floor, 2),
        "read_plus_copy_events_per_second": round(events / floor),
        "copy_load_events_per_second": round(events / copy["load_seconds"]),
        "read_and_decode_events_per_second": round(events / read_seconds),
    }
    each = result.get("rebuild_each")
    if each:
        summary["cli_style_sequential_seconds"] = each["sequential_total"]["seconds"]
        summary["rebuild_all_vs_sequential"] = round(
            each["sequential_total"]["seconds"] / seconds, 2
        )
    return summary


def markdown(result: dict[str, Any], command: str) -> str:
    s = result["summary"]
    log_ = result["log"]
    reads = result["reads"]
    copy = result["copy_baseline"]
    rebuild = result["rebuild_all"]
    each = result.get("rebuild_each", {})
    env = result["environment"]
    events = s["events"]

    def eps(seconds: float) -> str:
        return f"{events / seconds:,.0f}"

    lines = [
        SECTION,
        "",
        f"**Command** (from the repository root, venv active; took {result['wall_seconds']:.0f} s,"
        " most of it generating the log):",
        "",
        "```",
        command,
        "```",
        "",
        "Machine-readable results: `bench/results/rebuild.json`. The log comes from"
        " `bench/_rebuild_log.py` (real domain events decided by the aggregates, appended with"
        " `recorder.insert_events`, 5,000 per call).",
        "",
        f"**Machine.** {env['cpus']} vCPUs, PostgreSQL {env['postgres']['server_version']}"
        f" (`shared_buffers={env['postgres']['shared_buffers']}`,"
        f" `synchronous_commit={env['postgres']['synchronous_commit']}`,"
        f" collation `{env['postgres']['datcollate']}`), Python {env['python']}, git"
        f" `{env['git']}`. Busy cores during the rebuild: {rebuild['machine_busy_cores']} of"
        f" {env['cpus']} (ours and everyone else's: the machine was shared; load average"
        f" {env['loadavg_before']} before the run).",
        "",
        f"**The log.** {events:,} events ({log_['stored_mb']:,} MB of stored state,"
        f" {log_['events_table_mb']:,} MB table with indexes): {log_['workspaces']} workspaces,"
        f" {log_['projects']} projects, {log_['cards']:,} cards, {log_['runs']:,} agent runs,"
        f" {log_['log_chunks']:,} log chunks holding {log_['log_lines']:,} lines,"
        f" {log_['charges']:,} LLM calls and charges, {log_['corrections']:,} credits/refunds."
        " Largest event types: "
        + ", ".join(f"{k} {v:,}" for k, v in list(log_["by_type"].items())[:6])
        + ".",
        "",
        "### Figures",
        "",
        "| what | seconds | events/s | seconds ÷ rebuild all's |",
        "|---|--:|--:|--:|",
        f"| **rebuild all** (`rebuild_many`, log read once, 4 projectors in parallel, swap) |"
        f" **{rebuild['seconds']:.1f}** | **{eps(rebuild['seconds'])}** | 1.00 |",
    ]
    single = result.get("rebuild_all_one_thread")
    if single:
        lines.append(
            f"| rebuild all, the projectors applying one after another in one thread |"
            f" {single['seconds']:.1f} | {eps(single['seconds'])} |"
            f" {single['seconds'] / rebuild['seconds']:.2f} |"
        )
    if each:
        for name, figures in each.items():
            if name == "sequential_total":
                continue
            lines.append(
                f"| `rebuild({name})` alone (reads the whole log) | {figures['seconds']:.1f} |"
                f" {eps(figures['seconds'])} | {figures['seconds'] / rebuild['seconds']:.2f} |"
            )
        total = each["sequential_total"]["seconds"]
        lines.append(
            f"| the four one after another (what `agentworks rebuild all` did before `57b6f12`)"
            f" | {total:.1f} |"
            f" {eps(total)} | {total / rebuild['seconds']:.2f} |"
        )
    lines += [
        f"| baseline: `select_notifications` over the log (no decoding) |"
        f" {reads['select_notifications']['seconds']:.1f} |"
        f" {eps(reads['select_notifications']['seconds'])} |"
        f" {reads['select_notifications']['seconds'] / rebuild['seconds']:.2f} |",
        f"| baseline: the same + the library's decoding (mapper + `envelope_from_event`,"
        f" {reads['library_decode_sample']['us_per_event']} µs/event on a"
        f" {reads['library_decode_sample']['events']:,}-event sample, scaled) |"
        f" {reads['select_notifications_plus_library_decode_seconds']:.1f} |"
        f" {eps(reads['select_notifications_plus_library_decode_seconds'])} |"
        f" {reads['select_notifications_plus_library_decode_seconds'] / rebuild['seconds']:.2f} |",
        f"| baseline: `EventLog.read_following` (rows + fast decoding, followed aggregates) |"
        f" {reads['event_log_read_followed']['seconds']:.1f} |"
        f" {eps(reads['event_log_read_followed']['seconds'])} |"
        f" {reads['event_log_read_followed']['seconds'] / rebuild['seconds']:.2f} |",
        f"| baseline: COPY of the rebuilt rows into empty tables ({copy['rows']:,} rows;"
        f" {copy['copy_in_seconds']:.1f} s COPY + {copy['index_seconds']:.1f} s indexes) |"
        f" {copy['load_seconds']:.1f} | {eps(copy['load_seconds'])} |"
        f" {copy['load_seconds'] / rebuild['seconds']:.2f} |",
        f"| baseline: read + decode + COPY, one after the other |"
        f" {reads['event_log_read_followed']['seconds'] + copy['load_seconds']:.1f} |"
        f" {s['read_plus_copy_events_per_second']:,} | {1 / s['vs_read_plus_copy']:.2f} |",
        "",
        "Rows by table (COPY baseline): "
        + ", ".join(
            f"`{t}` {v['rows']:,} ({v['copy_in_seconds'] + v['index_seconds']:.1f} s)"
            for t, v in copy["tables"].items()
        )
        + ".",
        "",
        f"Rebuild all: {rebuild['replay_seconds']:.1f} s replaying the log, then"
        f" {rebuild['finish_and_swap_seconds']:.1f} s building the deferred indexes, securing"
        f" and swapping; client CPU {rebuild['client_cpu_seconds']:.1f} s"
        f" ({rebuild['client_cpu_seconds'] / events * 1e6:.1f} µs per event).",
        "",
    ]
    return "\n".join(lines)


def write_section(text: str, notes: str, section: str = SECTION) -> None:
    """Replace a benchmark's section of BENCHMARKS.md (or append it), re-reading the file
    right before writing: others append their sections too."""
    current = BENCHMARKS.read_text() if BENCHMARKS.exists() else "# Benchmarks\n"
    block = text.rstrip() + "\n\n" + notes.strip() + "\n"
    start = current.find(section)
    if start == -1:
        updated = current.rstrip() + "\n\n" + block
    else:
        following = current.find("\n## ", start + len(section))
        rest = current[following + 1 :] if following != -1 else ""
        updated = current[:start] + block + ("\n" + rest if rest else "")
    BENCHMARKS.write_text(updated)


NOTES_FILE = Path(__file__).parent / "results" / "rebuild_notes.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=None, help="rebuild batch size")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=3, help="rebuild-all runs (median kept)")
    parser.add_argument("--database-url", default="postgresql://postgres@127.0.0.1:5432")
    parser.add_argument("--skip-each", action="store_true",
                        help="skip rebuilding each projector on its own")  # fmt: skip
    parser.add_argument("--keep", action="store_true", help="keep the database")
    parser.add_argument("--use-database", help="an existing benchmark database (no generation)")
    parser.add_argument("--no-report", action="store_true",
                        help="do not write results/rebuild.json nor BENCHMARKS.md")  # fmt: skip
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite the BENCHMARKS.md section from results/rebuild.json",
    )
    args = parser.parse_args(argv)
    if args.report_only:
        saved = json.loads(RESULTS.read_text())
        notes = NOTES_FILE.read_text() if NOTES_FILE.exists() else ""
        write_section(markdown(saved, saved.get("command", "python -m bench.rebuild")), notes)
        return 0

    from infra.bootstrap import build_read_side
    from infra.migrate import migrate
    from infra.settings import Settings, db_logins
    from projections.rebuild import REBUILD_BATCH_SIZE

    batch = args.batch or REBUILD_BATCH_SIZE
    base = args.database_url.rstrip("/")
    started = time.perf_counter()
    provenance = Provenance.start()
    loadavg = " ".join(f"{x:.1f}" for x in os.getloadavg())
    name = args.use_database or f"aw_bench_{secrets.token_hex(4)}"
    url = f"{base}/{name}"
    owned = not args.use_database
    result: dict[str, Any] = {}
    try:
        if owned:
            log(f"database {name}: generating ~{args.events:,} events")
            create_database(base, name)
            migrate(url, logins=db_logins(Settings.load()))
            result["log"] = generate_log(url, args.events, args.seed)
        else:
            with psycopg.connect(url) as conn:
                head = conn.execute("SELECT max(notification_id) FROM agentworks_events").fetchone()
            result["log"] = {"events": int(head[0]) if head and head[0] else 0}
        events = result["log"]["events"]
        log(f"log: {events:,} events")
        side = build_read_side(Settings.load(), url)
        try:
            log("reading the log (baselines)")
            result["reads"] = measure_reads(side, batch)
            rounds = []
            for r in range(args.rounds):
                log(f"rebuild all, round {r + 1}/{args.rounds}")
                rounds.append(measure_rebuild_all(side, url, batch, events))
            # The median round stands for the run; every round is kept for the spread.
            result["rebuild_all"] = sorted(rounds, key=lambda m: m["seconds"])[len(rounds) // 2]
            result["rebuild_all_rounds"] = rounds
            log("rebuild all, applying in one thread")
            result["rebuild_all_one_thread"] = measure_rebuild_all(
                side, url, batch, events, parallel=False
            )
            tables = [t for runner in side.runners for t in runner.projector.tables]
            digest = table_digest(url, tables)
            if not args.skip_each:
                log("each projector on its own")
                result["rebuild_each"] = measure_each(side, batch, events)
                again = table_digest(url, tables)
                result["rebuilds_agree"] = again == digest
                log(f"  rebuild all and the single rebuilds agree row for row: {again == digest}")
            result["table_rows"] = {t: d[0] for t, d in digest.items()}
        finally:
            side.close()
        log("COPY baseline")
        result["copy_baseline"] = measure_copy(url, tables)
        result["environment"] = {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "postgres": server_settings(url),
            "git": git_revision(),
            "loadavg_before": loadavg,
            "loadavg_after": " ".join(f"{x:.1f}" for x in os.getloadavg()),
            "batch_size": batch,
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
        }
    finally:
        if owned and not args.keep:
            drop_database(base, name)
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    result["provenance"] = provenance.finish()
    result["summary"] = summarise(result)
    print(json.dumps(result["summary"], indent=2))
    if not args.no_report:
        command = "python -m bench.rebuild" + (
            f" --events {args.events}" if args.events != 1_000_000 else ""
        )
        result["command"] = command
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")
        notes = NOTES_FILE.read_text() if NOTES_FILE.exists() else ""
        write_section(markdown(result, command), notes)
        log(f"wrote {RESULTS} and the rebuild section of {BENCHMARKS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
