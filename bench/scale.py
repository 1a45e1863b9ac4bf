"""Scale: board, card history and log search on a 100,000-card workspace against a 200-card one,
same database, same API process, same run; and the API process's memory under 50 clients.

    python -m bench.scale [--cards 100000] [--events 5000000] [--seconds 5] [--rounds 3]

1. **Data.** A fresh database ``aw_bench_<hex>`` (dropped at the end unless ``--keep``) holding
   two workspaces generated in bulk by ``bench/_scale_log.py`` (real domain events decided by
   the aggregates, stored through the application's mapper, as ``bench.rebuild`` does): a SMALL
   one of 200 cards (``bench.graphql``'s board size) and a BIG one of ``--cards`` cards,
   continued until the log holds ``--events`` events. Each has a hot card with
   ``--hot-card-events`` edits spread over its part of the log, snapshotted every 100 versions
   as the application does. Read models come from ``rebuild_many`` (what ``agentworks rebuild
   all`` runs), then ``VACUUM ANALYZE`` (what autovacuum does after a bulk load); all three
   steps are timed.
2. **Load.** ``agentworks serve`` in its own process; ``wrk`` on loopback, closed loop, at 1 and
   50 clients, ``--rounds`` rounds, each round every (query, workspace) cell once with the big
   and small workspace back to back (order alternating). Queries: the board
   (``bench.graphql``'s query) as served, i.e. from the response cache after the first request;
   the board executed each time (every request carries a distinct unused variable, so each is a
   response-cache miss); ``cardHistory`` of the hot card; ``searchLogs`` (the API's search
   field) for a common word. Figures are medians over rounds; ratios big/small are medians of
   per-round ratios.
3. **Memory.** The API process's RSS (psutil) sampled every 0.2 s through the whole load;
   peak per round at 50 clients, and growth from the first round to the last.

``--use-database NAME`` measures an existing database that an earlier ``--keep`` run prepared
(its generation and rebuild figures are read back from the database, and marked as such).

Results: stdout and ``bench/results/scale.json``; ``bench.summary`` makes the summary row.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import psutil  # type: ignore[import-untyped]
import psycopg

from bench import _graphql_load as load
from bench._graphql_seed import admin_url, drop_database
from bench._provenance import ROOT, Provenance
from bench.graphql import (
    BOARD_QUERY,
    agentworks_cli,
    child_env,
    free_port,
    response_cache_lookups,
    stop,
    wait_healthy,
)
from bench.rebuild import (
    create_database,
    generate_log,
    log,
    measure_rebuild_all,
    write_section,
)
from bench.summary import TIMES
from projections.queries import SEARCH_CANDIDATES, SEARCH_STATEMENT

RESULTS = ROOT / "bench" / "results" / "scale.json"

SMALL_CARDS = 200
#: Allocation sites ``bench._traced_api`` reports per snapshot (by size).
TRACED_SITES = 400
LATENCY_RATIO_TARGET = 1.5
#: RSS is "bounded" when the last round's peak is within this share of the first round's.
RSS_GROWTH_TOLERANCE = 0.10
HISTORY_QUERY = (
    "query History($id: ID!) { cardHistory(cardId: $id) { version state { id title lane"
    " version } events { version type at actor } } }"
)
SEARCH_QUERY = (
    "query Search($ws: ID!, $q: String!) { searchLogs(workspaceId: $ws, query: $q, first: 50)"
    " { runId seq text } }"
)
SEARCH_TERM = "pytest"
SEARCH_PAGE = 50
QUERIES = ("board", "board_uncached", "history", "search")
WORKSPACES = ("big", "small")

#: Appended to ``bench._graphql_load``'s script for the uncached board: each request carries a
#: variable the operation does not use (GraphQL ignores it), distinct per thread and request, so
#: the response cache, whose key holds the variables, never answers it.
_DISTINCT_REQUESTS = """
local threads = 0
setup = function(thread)
  threads = threads + 1
  thread:set("tid", threads)
end
local sent = 0
request = function()
  sent = sent + 1
  local body = string.gsub(wrk.body, "@DISTINCT@", tostring(tid) .. "-" .. tostring(sent))
  return wrk.format(nil, nil, nil, body)
end
"""


# -- preparing the database -----------------------------------------------------------------------


def _meta_table(url: str, doc: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The preparation record, kept in the benchmark database for ``--use-database`` runs."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS bench_scale_meta (doc jsonb NOT NULL)")
        if doc is not None:
            conn.execute("DELETE FROM bench_scale_meta")
            conn.execute("INSERT INTO bench_scale_meta (doc) VALUES (%s)", (json.dumps(doc),))
            return doc
        row = conn.execute("SELECT doc FROM bench_scale_meta").fetchone()
    found: dict[str, Any] | None = row[0] if row else None
    return found


def _snapshot_hot_cards(url: str, cards: list[tuple[str, int]]) -> None:
    """Snapshots every 100 versions, as ``AgentWorks.save`` takes them."""
    from infra.bootstrap import build_write_side

    app = build_write_side(url, pool_size=1)
    try:
        for card, events in cards:
            for version in range(100, events + 1, 100):
                app.take_snapshot(UUID(card), version=version)
    finally:
        app.close()


def _sizes(url: str) -> dict[str, Any]:
    with psycopg.connect(url) as conn:
        db = conn.execute("SELECT pg_database_size(current_database())").fetchone()
        rows = conn.execute(
            "SELECT relname, n_live_tup, pg_total_relation_size(relid) FROM pg_stat_user_tables"
            " WHERE relname LIKE 'rm\\_%' OR relname = 'agentworks_events'"
            " ORDER BY pg_total_relation_size(relid) DESC LIMIT 12"
        ).fetchall()
    return {
        "database_mb": round(int(db[0]) / 1e6) if db else None,
        "largest_tables": {
            name: {"rows": int(n), "mb": round(int(b) / 1e6)} for name, n, b in rows
        },
    }


def prepare(url: str, args: argparse.Namespace) -> dict[str, Any]:
    from bench._scale_log import WorkspaceGenerator
    from infra.bootstrap import build_read_side
    from infra.migrate import migrate
    from infra.settings import Settings, db_logins
    from projections.rebuild import REBUILD_BATCH_SIZE

    migrate(url, logins=db_logins(Settings.load()))
    out: dict[str, Any] = {}
    for name, seed, cards, events in (
        ("small", args.seed + 1, SMALL_CARDS, 0),
        ("big", args.seed, args.cards, args.events),
    ):
        log(f"generating the {name} workspace: {cards:,} cards, >= {events:,} events")
        budget = args.generate_seconds if name == "big" else None
        generator = WorkspaceGenerator(
            seed,
            cards=cards,
            events=events,
            hot_card_events=args.hot_card_events,
            deadline=None if budget is None else time.monotonic() + budget,
        )
        generated = generate_log(url, 1 << 62, seed, generator=generator)
        generated.update(generator.describe())
        out[name] = generated
        log(f"  {generated['events']:,} events, {generated['cards']:,} cards in "
            f"{generated['generation_seconds']:.0f} s")  # fmt: skip
    _snapshot_hot_cards(url, [(out[w]["hot_card"], out[w]["hot_card_events"]) for w in WORKSPACES])
    events = out["small"]["events"] + out["big"]["events"]
    side = build_read_side(Settings.load(), url)
    try:
        log(f"rebuilding every read model from {events:,} events")
        out["rebuild"] = measure_rebuild_all(side, url, REBUILD_BATCH_SIZE, events)
    finally:
        side.close()
    log("VACUUM ANALYZE")
    started = time.perf_counter()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")
    out["vacuum_analyze_seconds"] = round(time.perf_counter() - started, 1)
    out["sizes"] = _sizes(url)
    out["prepared_at"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    _meta_table(url, out)
    return out


# -- load -----------------------------------------------------------------------------------------


class RssSampler:
    """The API process's resident set, sampled in a thread; ``label`` names the running cell."""

    def __init__(self, pid: int, every: float = 0.2) -> None:
        self._process = psutil.Process(pid)
        self._every = every
        self.label = "start"
        self.samples: list[tuple[float, str, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._started = time.monotonic()

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = self._process.memory_info().rss
            self.samples.append((time.monotonic() - self._started, self.label, rss))
            self._stop.wait(self._every)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def peak_mb(self, prefix: str) -> float:
        values = [rss for _, label, rss in self.samples if label.startswith(prefix)]
        return round(max(values) / 1e6, 1) if values else 0.0


def _body(query: str, variables: dict[str, str]) -> str:
    return json.dumps({"query": query, "variables": variables})


def targets(
    meta: dict[str, Any], api_url: str, pid: int, secret: str
) -> dict[tuple[str, str], load.Target]:
    from adapters.tokens import issue_token

    out: dict[tuple[str, str], load.Target] = {}
    for ws in WORKSPACES:
        info = meta[ws]
        token = issue_token(
            user_id=info["owner"],
            workspace_id=info["workspace_id"],
            role="OWNER",
            ttl_seconds=6 * 3600,
            secret=secret,
        )
        project = max(info["cards_per_project"].items(), key=lambda kv: kv[1])[0]
        bodies = {
            "board": _body(BOARD_QUERY, {"id": project}),
            "board_uncached": _body(BOARD_QUERY, {"id": project, "distinct": "@DISTINCT@"}),
            "history": _body(HISTORY_QUERY, {"id": info["hot_card"]}),
            "search": _body(SEARCH_QUERY, {"ws": info["workspace_id"], "q": SEARCH_TERM}),
        }
        for query, body in bodies.items():
            out[(query, ws)] = load.Target(
                f"{query}.{ws}", f"{api_url}/graphql", body, f"Bearer {token}", pid
            )
    return out


def write_scripts(all_targets: dict[tuple[str, str], load.Target], workdir: Path) -> None:
    load.prepare_scripts(list(all_targets.values()), workdir)
    for (query, _), target in all_targets.items():
        if query == "board_uncached":
            assert target.script is not None
            target.script.write_text(target.script.read_text() + _DISTINCT_REQUESTS)


def check_answers(all_targets: dict[tuple[str, str], load.Target]) -> dict[str, Any]:
    """Each request answered without errors, and what it answered (cards, events, hits)."""
    out: dict[str, Any] = {}
    for (query, ws), target in all_targets.items():
        body = target.body.replace("@DISTINCT@", "check")
        headers = {"Authorization": target.authorization, "Content-Type": "application/json"}
        started = time.perf_counter()
        response = httpx.post(target.url, content=body, headers=headers, timeout=300)
        seconds = time.perf_counter() - started
        doc = response.json()
        if response.status_code != 200 or doc.get("errors"):
            raise RuntimeError(f"{query}/{ws}: {response.status_code} {response.text[:500]}")
        data = doc["data"]
        if query.startswith("board"):
            lanes = data["board"]["lanes"]
            what = {
                "lanes": {lane["name"]: lane["count"] for lane in lanes},
                "cards_returned": sum(len(lane["cards"]["edges"]) for lane in lanes),
            }
        elif query == "history":
            what = {"version": data["cardHistory"]["version"],
                    "events": len(data["cardHistory"]["events"])}  # fmt: skip
        else:
            what = {"hits": len(data["searchLogs"])}
        out[f"{query}/{ws}"] = {
            **what,
            "bytes": len(response.content),
            "first_request_ms": round(seconds * 1000, 1),
        }
    return out


def settle(pid: int, backends: load.Backends, admin: str, dbname: str) -> float:
    """Wait until the API is done with the previous cell: its process and PostgreSQL backends
    idle (together under 10 % of a core over half a second) and none of its database sessions
    inside a transaction. wrk stops sending at the end of a cell, but requests it abandoned go
    on (under 50 clients some hold a transaction open for seconds, waiting their turn), and
    would land on the next cell. Returns the seconds waited (at most 120)."""

    def busy() -> float:
        return load.proc_cpu_seconds(pid) + sum(backends.snapshot().values())

    started = time.monotonic()
    with psycopg.connect(admin, autocommit=True) as conn:
        while time.monotonic() - started < 120:
            before = busy()
            time.sleep(0.5)
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND state <> 'idle'",
                (dbname,),
            ).fetchone()
            if busy() - before < 0.05 and row is not None and row[0] == 0:
                break
    return time.monotonic() - started


#: ``projections.queries.search_logs``'s statement, for EXPLAIN (parameters: the term, the
#: workspace, the window of newest matches it ranks, the page size).
SEARCH_SQL = SEARCH_STATEMENT
#: ``read_api.eventlog.card_log``'s statement.
HISTORY_SQL = (
    "SELECT originator_id, originator_version, topic, state, notification_id"
    " FROM agentworks_events WHERE originator_id = %s ORDER BY originator_version"
)


def explain(url: str, meta: dict[str, Any]) -> dict[str, Any]:
    """What bounds search and history in each workspace: EXPLAIN (ANALYZE, BUFFERS) of their
    statements right after the load (first run: what a request met) and again (second run,
    caches warm), and how many log lines the search term matches."""
    out: dict[str, Any] = {}
    with psycopg.connect(url, autocommit=True) as conn:
        for ws in WORKSPACES:
            info = meta[ws]
            row = conn.execute(
                "SELECT count(*), count(*) FILTER (WHERE tsv @@ websearch_to_tsquery('simple', %s))"
                " FROM rm_log_lines WHERE workspace_id = %s",
                (SEARCH_TERM, info["workspace_id"]),
            ).fetchone()
            entry: dict[str, Any] = {
                "log_lines": int(row[0]) if row else 0,
                "lines_matching_search_term": int(row[1]) if row else 0,
            }
            for name, statement, params in (
                (
                    "search",
                    SEARCH_SQL,
                    (SEARCH_TERM, info["workspace_id"], SEARCH_CANDIDATES, SEARCH_PAGE),
                ),
                ("history", HISTORY_SQL, (info["hot_card"],)),
            ):
                plans = [
                    [
                        str(r[0])
                        for r in conn.execute(
                            "EXPLAIN (ANALYZE, BUFFERS) " + statement,
                            params,
                        ).fetchall()
                    ]
                    for _ in range(2)
                ]
                entry[f"{name}_plan_first"], entry[f"{name}_plan"] = plans
            out[ws] = entry
    return out


def measure(url: str, meta: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    base, dbname = url.rsplit("/", 1)
    secret = secrets.token_urlsafe(48)
    env = child_env(url, secret)
    port = free_port()
    api_url = f"http://127.0.0.1:{port}"
    heap_dir: Path | None = None
    command = [*agentworks_cli(), "serve", "--port", str(port)]
    if args.memory_rounds:
        heap_dir = Path(tempfile.mkdtemp(prefix="aw-bench-heap-"))
        env["AW_BENCH_TRACEMALLOC_DIR"] = str(heap_dir)
        env["AW_BENCH_TRACEMALLOC_SITES"] = str(TRACED_SITES)
        command = [sys.executable, "-m", "bench._traced_api", "serve", "--port", str(port)]
    api = subprocess.Popen(command, env=env, cwd=ROOT)
    backends = None
    report: dict[str, Any] = {}
    try:
        wait_healthy(api_url, api)
        log(f"API up: pid {api.pid} on :{port}")
        all_targets = targets(meta, api_url, api.pid, secret)
        backends = load.Backends(admin_url(base), dbname)
        clients = [int(c) for c in args.clients.split(",")]
        runs: list[load.RunResult] = []
        settled: list[float] = []
        with RssSampler(api.pid) as rss, load.workdir() as tmp:
            write_scripts(all_targets, tmp)
            rss.label = "answers"
            report["answers"] = check_answers(all_targets)
            log(f"answers: {json.dumps(report['answers'])}")
            rss.label = "warmup"
            for target in all_targets.values():
                load.load(target, max(clients), args.warmup)
            report["rss_after_warmup_mb"] = round(rss.samples[-1][2] / 1e6, 1)
            cache_before = response_cache_lookups(api_url, timeout=120)
            for rnd in range(1, args.rounds + 1):
                for c in clients:
                    for query in QUERIES:
                        pair = WORKSPACES if (rnd + c) % 2 else WORKSPACES[::-1]
                        for ws in pair:
                            rss.label = f"round {rnd} c={c} {query}/{ws}"
                            target = all_targets[(query, ws)]
                            settled.append(settle(api.pid, backends, admin_url(base), dbname))
                            result = load.timed_run(target, c, args.seconds, rnd, backends)
                            runs.append(result)
                            log(
                                f"round {rnd} c={c:<3} {target.name:21} {result.rps:8.1f} req/s"
                                f"  p50 {result.p50_ms:8.1f}  p95 {result.p95_ms:8.1f}"
                                f"  p99 {result.p99_ms:8.1f} ms  server"
                                f" {result.server_cpu_ms_per_req:6.2f} ms CPU/req"
                                f"  errors {result.errors}"
                            )
            if heap_dir is not None:
                report["memory_rounds"] = memory_rounds(
                    args, all_targets, max(clients), heap_dir, rss,
                    lambda: settled.append(settle(api.pid, backends, admin_url(base), dbname)),
                    backends,
                )  # fmt: skip
            rss.label = "end"
            time.sleep(0.5)
            after = response_cache_lookups(api_url, timeout=120)
        report["response_cache_during_load"] = {
            k: v - cache_before.get(k, 0) for k, v in after.items()
        }
        report["settle_seconds_before_cells"] = {
            "total": round(sum(settled), 1),
            "max": round(max(settled), 1),
        }
        report["explain"] = explain(url, meta)
        report["runs"] = [load.as_dict(r) for r in runs]
        report["summary"] = summarise(runs, clients)
        report["rss"] = rss_report(rss, args.rounds, max(clients))
    finally:
        stop(api)
        if backends is not None:
            backends.close()
        if heap_dir is not None:
            shutil.rmtree(heap_dir, ignore_errors=True)
    return report


# -- memory rounds --------------------------------------------------------------------------------


def _ask_heap(heap_dir: Path, name: str, timeout: float = 600) -> dict[str, Any]:
    """Ask ``bench._traced_api`` in the API process for its heap by allocation site."""
    (heap_dir / name).write_text("")
    answer = heap_dir / f"{name}.json"
    deadline = time.monotonic() + timeout
    while not answer.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"the API did not answer {name} within {timeout:.0f} s")
        time.sleep(0.2)
    doc: dict[str, Any] = json.loads(answer.read_text())
    answer.unlink()
    return doc


def _growth(
    before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]], top: int
) -> list[dict[str, Any]]:
    keys = set(before) | set(after)
    rows = [
        {
            "site": key,
            "bytes": after.get(key, {}).get("bytes", 0),
            "growth_bytes": after.get(key, {}).get("bytes", 0)
            - before.get(key, {}).get("bytes", 0),
            "growth_blocks": after.get(key, {}).get("blocks", 0)
            - before.get(key, {}).get("blocks", 0),
        }
        for key in keys
    ]
    rows.sort(key=lambda r: -r["growth_bytes"])
    return rows[:top]


def memory_rounds(
    args: argparse.Namespace,
    all_targets: dict[tuple[str, str], load.Target],
    clients: int,
    heap_dir: Path,
    rss: RssSampler,
    settle_now: Any,
    backends: load.Backends,
) -> dict[str, Any]:
    """More rounds of every cell at ``clients``, with tracemalloc on in the API from their start:
    the Python heap after each round (settled), and which allocation sites it grew at from the
    first of these rounds to each later one. The measured rounds ran before tracing started."""
    (heap_dir / "start").write_text("")
    while not (heap_dir / "started").exists():
        time.sleep(0.2)
    rounds: list[dict[str, Any]] = []
    first: dict[str, Any] | None = None
    for rnd in range(1, args.memory_rounds + 1):
        started = time.monotonic()
        requests = 0
        for query in QUERIES:
            for ws in WORKSPACES if rnd % 2 else WORKSPACES[::-1]:
                rss.label = f"memory {rnd} {query}/{ws}"
                settle_now()
                result = load.timed_run(
                    all_targets[(query, ws)], clients, args.seconds, rnd, backends
                )
                requests += result.requests
        rss.label = f"memory {rnd} settled"
        settle_now()
        heap = _ask_heap(heap_dir, f"snap-{rnd}")
        entry: dict[str, Any] = {
            "round": rnd,
            "requests": requests,
            "seconds": round(time.monotonic() - started, 1),
            "rss_peak_mb": rss.peak_mb(f"memory {rnd} "),
            "rss_settled_mb": round(rss.samples[-1][2] / 1e6, 1),
            "traced_heap_mb": round(heap["traced_current_bytes"] / 1e6, 2),
            "traced_peak_mb": round(heap["traced_peak_bytes"] / 1e6, 2),
            "tracemalloc_own_mb": round(heap["tracemalloc_own_bytes"] / 1e6, 2),
            "gc_objects": heap["gc_objects"],
            "snapshot_seconds": heap["snapshot_seconds"],
        }
        if first is None:
            first = heap
        else:
            entry["growth_since_first_by_site"] = _growth(first["sites"], heap["sites"], 12)
            entry["growth_since_first_by_file"] = _growth(first["files"], heap["files"], 12)
        rounds.append(entry)
        log(
            f"memory round {rnd}: RSS peak {entry['rss_peak_mb']} MB, settled"
            f" {entry['rss_settled_mb']} MB, traced heap {entry['traced_heap_mb']} MB"
            f" (peak {entry['traced_peak_mb']}), tracemalloc's own"
            f" {entry['tracemalloc_own_mb']} MB"
        )
    heaps = [r["traced_heap_mb"] for r in rounds]
    trim = _ask_heap(heap_dir, "trim")
    log(
        f"malloc_trim: RSS {trim['rss_before_bytes'] / 1e6:.1f}"
        f" -> {trim['rss_after_bytes'] / 1e6:.1f} MB"
    )
    return {
        "clients": clients,
        "rounds": rounds,
        "api_allocator_environment": {
            k: v for k, v in os.environ.items() if k.startswith(("MALLOC_", "PYTHONMALLOC"))
        },
        "malloc_trim_after_last_round": {
            "rss_before_mb": round(trim["rss_before_bytes"] / 1e6, 1),
            "rss_after_mb": round(trim["rss_after_bytes"] / 1e6, 1),
        },
        "traced_heap_growth_first_to_last_mb": round(heaps[-1] - heaps[0], 2) if heaps else None,
        "note": "tracemalloc started after the measured rounds; the heap is what Python objects"
        " allocated since then hold after each round, with the API idle; sites are the innermost"
        f" frames of each allocation (top {TRACED_SITES} sites by size per snapshot, all files)",
    }


# -- figures --------------------------------------------------------------------------------------


KEYS = ("rps", "p50_ms", "p95_ms", "p99_ms", "server_cpu_ms_per_req", "pg_cpu_ms_per_req",
        "busy_cores", "other_cores")  # fmt: skip
RATIO_KEYS = ("p50_ms", "p95_ms", "p99_ms", "rps", "server_cpu_ms_per_req", "pg_cpu_ms_per_req")


def summarise(runs: list[load.RunResult], clients: list[int]) -> dict[str, Any]:
    cells: dict[str, Any] = {}
    ratios: dict[str, Any] = {}
    for query in QUERIES:
        for c in clients:
            for ws in WORKSPACES:
                mine = [r for r in runs if r.target == f"{query}.{ws}" and r.clients == c]
                cells[f"{query}/{ws}/{c}"] = {
                    k: {
                        "median": round(statistics.median(getattr(r, k) for r in mine), 3),
                        "min": round(min(getattr(r, k) for r in mine), 3),
                        "max": round(max(getattr(r, k) for r in mine), 3),
                    }
                    for k in KEYS
                } | {"requests": sum(r.requests for r in mine),
                     "errors": sum(r.errors for r in mine)}  # fmt: skip
            ratio: dict[str, Any] = {}
            for k in RATIO_KEYS:
                per_round = []
                for rnd in sorted({r.round for r in runs}):
                    big = [
                        r
                        for r in runs
                        if r.target == f"{query}.big" and r.clients == c and r.round == rnd
                    ]
                    small = [
                        r
                        for r in runs
                        if r.target == f"{query}.small" and r.clients == c and r.round == rnd
                    ]
                    if big and small and getattr(small[0], k) > 0:
                        per_round.append(getattr(big[0], k) / getattr(small[0], k))
                ratio[k] = {
                    "median": round(statistics.median(per_round), 2) if per_round else None,
                    "per_round": [round(v, 2) for v in per_round],
                }
            ratios[f"{query}/{c}"] = ratio
    met = {
        query: all(
            (ratios[f"{query}/{c}"]["p95_ms"]["median"] or 1e9) <= LATENCY_RATIO_TARGET
            for c in clients
        )
        for query in QUERIES
    }
    return {"cells": cells, "ratios_big_over_small": ratios, "p95_within_target": met}


def rss_report(rss: RssSampler, rounds: int, clients: int) -> dict[str, Any]:
    peaks = [rss.peak_mb(f"round {r} c={clients} ") for r in range(1, rounds + 1)]
    values = [v for _, _, v in rss.samples]
    first, last = peaks[0], peaks[-1]
    return {
        "samples": len(values),
        "start_mb": round(values[0] / 1e6, 1) if values else None,
        "peak_mb": round(max(values) / 1e6, 1) if values else None,
        "end_mb": round(values[-1] / 1e6, 1) if values else None,
        f"peak_per_round_at_{clients}_clients_mb": peaks,
        "growth_first_to_last_round_mb": round(last - first, 1),
        "bounded": last <= first * (1 + RSS_GROWTH_TOLERANCE),
        "rule": f"bounded = the last round's peak at {clients} clients within "
        f"{RSS_GROWTH_TOLERANCE:.0%} of the first round's",
    }


def print_table(summary: dict[str, Any], clients: list[int]) -> None:
    print(f"\n{'query':15} {'c':>3} {'ws':6} {'req/s':>8} {'p50 ms':>9} {'p95 ms':>9}"
          f" {'p99 ms':>9} {'srv CPU':>8} {'pg CPU':>8}")  # fmt: skip
    for query in QUERIES:
        for c in clients:
            for ws in WORKSPACES:
                t = summary["cells"][f"{query}/{ws}/{c}"]
                print(
                    f"{query:15} {c:>3} {ws:6} {t['rps']['median']:>8.1f}"
                    f" {t['p50_ms']['median']:>9.1f} {t['p95_ms']['median']:>9.1f}"
                    f" {t['p99_ms']['median']:>9.1f} {t['server_cpu_ms_per_req']['median']:>8.2f}"
                    f" {t['pg_cpu_ms_per_req']['median']:>8.2f}"
                )
            r = summary["ratios_big_over_small"][f"{query}/{c}"]
            cells = " ".join(
                f"{r[k]['median']:>8.2f}" if r[k]["median"] is not None else f"{'-':>8}"
                for k in ("rps", "p50_ms", "p95_ms", "p99_ms")
            )
            print(f"{query:15} {c:>3} {'ratio':6} {cells}")


# -- report ---------------------------------------------------------------------------------------

SECTION = "## Scale (issue 17)"
DIVIDE = "\u00f7"
NOTES = ROOT / "bench" / "results" / "scale_notes.md"
LABELS = {
    "board": "board (as served: response cache)",
    "board_uncached": "board, executed each time",
    "history": "`cardHistory` of the hot card",
    "search": f"`searchLogs` for `{SEARCH_TERM}`",
}


def markdown(report: dict[str, Any]) -> str:
    """The figures part of BENCHMARKS.md's Scale section, from a results file."""
    prepared, summary, prov = report["prepared"], report["summary"], report["provenance"]
    big, small, rebuild = prepared["big"], prepared["small"], prepared["rebuild"]
    config = report["config"]
    clients = [int(c) for c in str(config["clients"]).split(",")]
    rss = report["rss"]
    peaks = rss[f"peak_per_round_at_{max(clients)}_clients_mb"]
    lines = [
        SECTION,
        "",
        f"**Command:** `{report['command'].strip()}` (results: `bench/results/scale.json`;"
        f" commit `{prov['commit']}`{' plus uncommitted changes' if prov['dirty'] else ''},"
        f" {prov['started_at'][:16].replace('T', ' ')} UTC).",
        "",
        f"**Machine.** {prov['cpus']} vCPUs shared with other work: load average"
        f" {' / '.join(f'{v:.1f}' for v in prov['loadavg_at_start'])} at the start,"
        f" {' / '.join(f'{v:.1f}' for v in prov['loadavg_at_end'])} at the end; the whole machine"
        f" was busy {prov['machine_busy_cores']} of {prov['cpus']} cores over the run (ours and"
        " everyone else's).",
        "",
        f"**Data** (one database, generated by `bench/_scale_log.py`, real domain events through"
        f" the mapper): the big workspace has **{big['cards']:,} cards and {big['events']:,}"
        f" events** ({big['runs']:,} agent runs, {big['log_lines']:,} log lines,"
        f" {big['charges']:,} charges), generated in {big['generation_seconds']:,.0f} s"
        + (
            " — the preparing run's time budget (`--generate-seconds`) stopped it short of"
            " the target, see below"
            if big.get("stopped_by_time_budget")
            else ""
        )
        + f"; the small one {small['cards']:,} cards and {small['events']:,} events. Boards: the"
        f" big workspace's largest has {max(big['cards_per_project'].values()):,} cards, the"
        f" small one's {max(small['cards_per_project'].values()):,}. Hot cards: "
        f"{big['hot_card_events']} events each, spread over their workspace's log, snapshots"
        f" every 100. Read models: `rebuild_many` in {rebuild['seconds']:,.0f} s"
        f" ({rebuild['events_per_second']:,} events/s), then `VACUUM ANALYZE` in"
        f" {prepared['vacuum_analyze_seconds']:,.0f} s; database"
        f" {prepared['sizes']['database_mb']:,} MB.",
        "",
        "**Load.** `agentworks serve` in its own process, `wrk` closed loop,"
        f" {config['seconds']:g} s per cell, {config['rounds']} rounds, big and small back to back"
        " in alternating order; medians over rounds, ratios are medians of per-round ratios.",
        "",
        "| query | clients | big p50 / p95 / p99 ms | small p50 / p95 / p99 ms |"
        f" p95 big {DIVIDE} small (per round) | big {DIVIDE} small server CPU per request |",
        "|---|--:|--:|--:|--:|--:|",
    ]
    for query in QUERIES:
        for c in clients:
            b = summary["cells"][f"{query}/big/{c}"]
            m = summary["cells"][f"{query}/small/{c}"]
            r = summary["ratios_big_over_small"][f"{query}/{c}"]

            def lat(t: dict[str, Any]) -> str:
                return " / ".join(f"{t[k]['median']:,.1f}" for k in ("p50_ms", "p95_ms", "p99_ms"))

            p95 = r["p95_ms"]
            cpu = r["server_cpu_ms_per_req"]["median"]
            lines.append(
                f"| {LABELS[query]} | {c} | {lat(b)} | {lat(m)} |"
                f" **{p95['median']}** ({', '.join(str(v) for v in p95['per_round'])}) |"
                f" {cpu} |"
            )
    met = summary["p95_within_target"]
    lines += [
        "",
        f"p95 within 1.5{TIMES} of the small workspace at every client count: "
        + ", ".join(f"{LABELS[q]} **{'yes' if met[q] else 'no'}**" for q in QUERIES)
        + ".",
        "",
        f"**API memory (RSS)** under {max(clients)} clients: peak per round"
        f" {', '.join(f'{v:,.0f}' for v in peaks)} MB (growth from the first round to the last:"
        f" {rss['growth_first_to_last_round_mb']:+,.0f} MB: **"
        + ("bounded" if rss["bounded"] else "not shown bounded")
        + f"**); {rss['start_mb']:,.0f} MB at start, {report['rss_after_warmup_mb']:,.0f} MB after"
        f" the warm-up, {rss['peak_mb']:,.0f} MB at most, {rss['end_mb']:,.0f} MB at the end."
        f" Response cache during the load: {report['response_cache_during_load']}.",
        "",
    ]
    if report.get("memory_rounds"):
        lines += _memory_markdown(report["memory_rounds"])
    ex = report["explain"]
    lines += [
        "**Search, EXPLAIN (ANALYZE, BUFFERS)** of `projections.queries.search_logs` (second run):"
        f" the big workspace has {ex['big']['log_lines']:,} log lines,"
        f" {ex['big']['lines_matching_search_term']:,} matching `{SEARCH_TERM}`; the small one"
        f" {ex['small']['log_lines']:,} and {ex['small']['lines_matching_search_term']:,}.",
        "",
        "```",
        "-- big workspace",
        *ex["big"]["search_plan"],
        "-- small workspace",
        *ex["small"]["search_plan"],
        "```",
        "",
        "**Card history, EXPLAIN (ANALYZE, BUFFERS)** of `read_api.eventlog.card_log` for each hot"
        " card, first run right after the load (what a request meets), then again:",
        "",
        "```",
        *(
            line
            for ws in WORKSPACES
            for run in ("first", "second")
            for line in (
                f"-- {ws} workspace, {run} run",
                *ex[ws]["history_plan_first" if run == "first" else "history_plan"],
            )
        ),
        "```",
        "",
    ]
    return "\n".join(lines)


def _short_site(site: str, frames: int = 4) -> str:
    """An allocation site's innermost frames, paths relative to the package or repository."""
    out = []
    for frame in site.split(" <- ")[:frames]:
        for marker in ("site-packages/", "/lib/python3.11/", f"{ROOT}/"):
            if marker in frame:
                frame = frame.split(marker, 1)[1]
        out.append(frame)
    return " <- ".join(out)


def _memory_markdown(mem: dict[str, Any]) -> list[str]:
    rounds = mem["rounds"]
    lines = [
        f"**API heap by allocation site** ({len(rounds)} more rounds of every cell at"
        f" {mem['clients']} clients after the measured ones, `tracemalloc` on in the API from"
        " their start, `--memory-rounds`; heap read after each round with the API idle"
        + "".join(
            f"; `{k}={v}`" for k, v in sorted(mem.get("api_allocator_environment", {}).items())
        )
        + "):",
        "",
        "| round | requests | RSS peak / settled MB | traced Python heap MB (peak) |"
        " tracemalloc's own MB | gc objects |",
        "|--:|--:|--:|--:|--:|--:|",
        *(
            f"| {r['round']} | {r['requests']:,} | {r['rss_peak_mb']:,.0f} /"
            f" {r['rss_settled_mb']:,.0f} | {r['traced_heap_mb']:,.1f}"
            f" ({r['traced_peak_mb']:,.1f}) | {r['tracemalloc_own_mb']:,.1f} |"
            f" {r['gc_objects']:,} |"
            for r in rounds
        ),
        "",
    ]
    trim = mem.get("malloc_trim_after_last_round")
    if trim:
        lines += [
            f"After the last round, glibc's `malloc_trim(0)` in the API process took RSS from"
            f" {trim['rss_before_mb']:,.0f} MB to {trim['rss_after_mb']:,.0f} MB.",
            "",
        ]
    last = rounds[-1]
    if "growth_since_first_by_site" in last:
        lines += [
            f"Largest growth of the traced heap from round 1 to round {last['round']}, by"
            " allocation site (innermost frames first):",
            "",
            "```",
            *(
                f"{g['growth_bytes'] / 1e3:+10,.1f} kB {g['growth_blocks']:+8,} blocks "
                f" {_short_site(g['site'])}"
                for g in last["growth_since_first_by_site"][:8]
            ),
            "```",
            "",
        ]
    return lines


# -- main -----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n")[0])
    p.add_argument("--cards", type=int, default=100_000)
    p.add_argument("--events", type=int, default=5_000_000)
    p.add_argument("--hot-card-events", type=int, default=500)
    p.add_argument(
        "--generate-seconds",
        type=float,
        help="time budget for generating the big workspace: no card is started after it",
    )
    p.add_argument("--seconds", type=float, default=5.0, help="length of one measured cell")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--clients", default="1,50")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of load per cell, once")
    p.add_argument(
        "--memory-rounds",
        type=int,
        default=0,
        help="after the measured rounds, this many more at the largest client count with"
        " tracemalloc on in the API, its heap by allocation site after each",
    )
    p.add_argument("--seed", type=int, default=17)
    p.add_argument("--database-url", default="postgresql://postgres@127.0.0.1:5432")
    p.add_argument("--keep", action="store_true", help="keep the database")
    p.add_argument("--use-database", help="a database an earlier --keep run prepared")
    p.add_argument("--prepare-only", action="store_true", help="generate and rebuild only")
    p.add_argument("--output", type=Path, default=RESULTS)
    p.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite BENCHMARKS.md's Scale section from the results file (and scale_notes.md)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report_only:
        notes = NOTES.read_text() if NOTES.exists() else ""
        write_section(markdown(json.loads(args.output.read_text())), notes, SECTION)
        return 0
    provenance = Provenance.start()
    base = args.database_url.rstrip("/")
    name = args.use_database or f"aw_bench_{secrets.token_hex(5)}"
    url = f"{base}/{name}"
    owned = not args.use_database
    report: dict[str, Any] = {
        "benchmark": "scale: board, card history, search on a big and a small workspace",
        "command": "python -m bench.scale " + " ".join(argv if argv is not None else sys.argv[1:]),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "queries": {
            "board": BOARD_QUERY,
            "history": HISTORY_QUERY,
            "search": SEARCH_QUERY,
            "search_term": SEARCH_TERM,
        },
        "cpus": os.cpu_count(),
    }
    try:
        if owned:
            log(f"database {name}")
            create_database(base, name)
            report["prepared"] = prepare(url, args)
            report["prepared_in_this_run"] = True
        else:
            report["prepared"] = _meta_table(url)
            report["prepared_in_this_run"] = False
            if report["prepared"] is None:
                raise SystemExit(f"{name} was not prepared by bench.scale --keep")
        if args.prepare_only:
            print(json.dumps(report["prepared"], indent=2, default=str))
            return 0
        report.update(measure(url, report["prepared"], args))
        print_table(report["summary"], [int(c) for c in args.clients.split(",")])
        print(json.dumps(report["rss"], indent=2))
    finally:
        if owned and not args.keep:
            drop_database(base, name)
            log(f"{name} dropped")
    report["provenance"] = provenance.finish()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2, default=str) + "\n")
    log(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
