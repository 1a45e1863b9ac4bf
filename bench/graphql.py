"""GraphQL board query latency, next to a plain JSON endpoint reading the same rows, same run.

    python -m bench.graphql [--seconds 8] [--repeats 3] [--clients 1,10,50]
        [--writes-per-second N [--writes-in neighbour|same|both]]

What it does, in order (everything it creates is removed at the end):

1. a fresh database ``aw_bench_<hex>``, migrated, seeded through the real command handlers:
   a 200-card board (4 lanes, two with WIP limits; assignees, labels, 85 agent runs in every
   state, costs) and a neighbouring workspace so row-level security has rows to hide
   (``bench/_graphql_seed.py``);
2. read models filled by ``agentworks rebuild all`` (checked: every projector at the log head);
3. in-process evidence (``bench/_graphql_anatomy.py``): the SQL the board query sends (checked
   equal to the baseline's), CPU per request of ``schema.execute`` with and without strawberry's
   parser/validation caches, of parse/validate/JSON alone, of the baseline's read, and a cProfile
   of the executor's work per request;
4. two servers, each its own process, same uvicorn configuration (``infra.stack.serve_app``):
   ``agentworks serve`` (the API) and ``python -m bench._graphql_plain`` (the baseline: one
   FastAPI route, the same token check, pool role, RLS transaction, SQL and JSON document);
   their answers are checked identical before any load;
5. load from ``wrk`` (a separate process on loopback; httpx if wrk is missing) at each client
   count, GraphQL and plain back to back, ``--repeats`` rounds (order alternating per round);
   figures are medians over the rounds, ratios medians of per-round ratios; CPU per request
   of server, PostgreSQL backends and load generator comes from /proc;
6. py-spy of each server's event-loop thread under the largest client count.

With ``--writes-per-second N``, a third process (``bench/_graphql_writes.py``) renames cards at N
per second in the neighbouring workspace, the benchmarked one, or both (``--writes-in``), and runs
the projectors (embedded fan-out) for the whole load, both targets alike: the response cache then
answers under invalidation, and the report says how many lookups hit.

Results: a table on stdout and ``bench/results/graphql.json`` (with writes:
``bench/results/graphql_writes.json``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import secrets
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psycopg

from bench import _graphql_load as load
from bench._graphql_seed import (
    OTHER_OWNER,
    Seeded,
    admin_url,
    drop_database,
    new_database_name,
    seed,
)
from bench._provenance import ROOT, Provenance

RESULTS = ROOT / "bench" / "results" / "graphql.json"
RESULTS_WITH_WRITES = ROOT / "bench" / "results" / "graphql_writes.json"

BOARD_QUERY = (
    "query Board($id: ID!) { board(projectId: $id) { lanes { name wipLimit count"
    " cards(first: 100) { edges { node { id title position assignee labels"
    " lastRun { status } cost } } } } } }"
)
BUDGET_P95_MS = 15.0
BUDGET_CLIENTS = 1


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def child_env(database_url: str, secret: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTWORKS_")}
    env.update(
        AGENTWORKS_DATABASE_URL=database_url,
        AGENTWORKS_JWT_SECRET=secret,
        AGENTWORKS_RATE_LIMIT_PER_USER="0",
        AGENTWORKS_RATE_LIMIT_PER_WORKSPACE="0",
        AGENTWORKS_LOG_LEVEL="WARNING",
        AGENTWORKS_DATA_DIR=str(Path(os.environ.get("TMPDIR", "/tmp")) / "aw-bench-graphql"),
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
    )
    return env


def agentworks_cli() -> list[str]:
    script = Path(sys.executable).parent / "agentworks"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from infra.cli import main; main()"]


def wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url} exited with {proc.returncode} while starting")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer /healthz within {timeout:.0f}s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def start_writer(
    env: dict[str, str], seeded: Seeded, rate: float, where: str
) -> subprocess.Popen[bytes]:
    targets = {
        "neighbour": [(seeded.other_workspace_id, OTHER_OWNER)],
        "same": [(seeded.workspace_id, seeded.user_id)],
    }
    chosen = targets["neighbour"] + targets["same"] if where == "both" else targets[where]
    command = [sys.executable, "-m", "bench._graphql_writes", "--rate", str(rate)]
    for workspace, user in chosen:
        command += ["--target", f"{workspace}:{user}"]
    return subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE)


def stop_writer(writer: subprocess.Popen[bytes]) -> dict[str, Any]:
    """Stop the writer; what it wrote, and at what rate."""
    writer.terminate()
    out, _ = writer.communicate(timeout=30)
    if writer.returncode != 0 or not out.strip():
        raise RuntimeError(f"the writer exited with {writer.returncode}")
    done: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    done["per_second"] = round(done["writes"] / max(done["seconds"], 1e-9), 1)
    return done


def fill_read_models(database_url: str, env: dict[str, str]) -> dict[str, Any]:
    started = time.monotonic()
    done = subprocess.run(
        [*agentworks_cli(), "rebuild", "all"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"agentworks rebuild all failed:\n{done.stderr[-2000:]}")
    with psycopg.connect(database_url) as conn:
        head = conn.execute("SELECT max(notification_id) FROM agentworks_events").fetchone()
        rows = conn.execute("SELECT projector, position FROM projection_positions").fetchall()
    positions = {name: int(pos) for name, pos in rows}
    head_value = int(head[0]) if head and head[0] is not None else 0
    behind = {name: pos for name, pos in positions.items() if pos != head_value}
    if behind or not positions:
        raise RuntimeError(f"read models not at the log head {head_value}: {positions}")
    return {"head": head_value, "projectors": positions, "seconds": time.monotonic() - started}


def machine(database_url: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "load_generator": "wrk" if load.have_wrk() else "httpx",
    }
    from importlib.metadata import version

    for package in ("strawberry-graphql", "graphql-core", "fastapi", "uvicorn", "psycopg"):
        with contextlib.suppress(Exception):
            info[package] = version(package)
    with contextlib.suppress(Exception), psycopg.connect(database_url) as conn:
        row = conn.execute("SHOW server_version").fetchone()
        info["postgres"] = row[0] if row else None
    with contextlib.suppress(Exception):
        info["git"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
            cwd=ROOT,
        ).stdout.strip()
    return info


# -- phases ---------------------------------------------------------------------------------------


def in_process_evidence(
    url: str, write: Any, secret: str, token: str, seeded: Seeded, project: str
) -> dict[str, Any]:
    from bench import _graphql_anatomy as anatomy
    from bench._graphql_plain import STATEMENTS, read_board

    ip = anatomy.open_in_process(url, write, secret, token, BOARD_QUERY, {"id": project})
    loop = asyncio.new_event_loop()
    try:
        api_sql = anatomy.capture_statements(ip, loop)
        plain_sql = [anatomy.normalise(s) for s in STATEMENTS]
        timings = anatomy.anatomy(
            ip,
            loop,
            read_board=read_board,
            workspace_id=seeded.workspace_id,
            user_id=seeded.user_id,
            project_id=seeded.project_id,
        )
        counts = anatomy.call_counts(ip, loop)
        per_card = anatomy.micro(ip.services.pool, seeded.workspace_id, seeded.project_id)
    finally:
        anatomy.close_in_process(ip)
        loop.close()
    total = timings["execute_as_configured"]
    validation = total - timings["execute_with_caches_and_rules_built_once"]
    per_card_ms = sum(v for k, v in per_card.items() if k not in ("cards", "runs"))
    estimate = {
        "execute_total": total,
        "reading_rows_like_the_baseline (plain read_board)": timings["plain_read_board"],
        "parse_and_validation (saved by caches with rules built once)": validation,
        "per_card_python_in_Lane.cards (from_row, cursors, money)": per_card_ms,
        "remainder: graphql-core executor + strawberry per-field wrappers": total
        - timings["plain_read_board"]
        - validation
        - per_card_ms,
        "json_render (after execute)": timings["json_render"],
        "saved by read_api.execution's leaf shortcut": timings["execute_without_leaf_shortcut"]
        - total,
    }
    return {
        "sql": {"identical": api_sql == plain_sql, "api": api_sql, "baseline": plain_sql},
        "estimate_cpu_ms_per_request": {k: round(v, 2) for k, v in estimate.items()},
        "cpu_ms_per_request": {
            k: round(v, 3) if isinstance(v, float) else v for k, v in timings.items()
        },
        "cprofile": counts,
        "per_card_python_cpu_ms_per_board": {
            k: round(v, 3) if isinstance(v, float) else v for k, v in per_card.items()
        },
    }


def response_cache_lookups(url: str, timeout: float = 10) -> dict[str, int]:
    """The API's ``agentworks_graphql_response_cache_total`` by outcome (hit, miss): every
    request of the load is the same board, so this says how many were answered from the cache
    (``read_api.response_cache``), without a write in between, all but the first."""
    text = httpx.get(f"{url}/metrics", timeout=timeout).text
    found: dict[str, int] = {}
    for line in text.splitlines():
        if line.startswith("agentworks_graphql_response_cache_total{"):
            labels, value = line.rsplit(" ", 1)
            outcome = labels.split('outcome="', 1)[1].split('"', 1)[0]
            found[outcome] = int(float(value))
    return found


def check_answers(gql: load.Target, plain: load.Target) -> dict[str, Any]:
    headers = {"Authorization": gql.authorization, "Content-Type": "application/json"}
    a = httpx.post(gql.url, content=gql.body, headers=headers, timeout=30)
    b = httpx.post(plain.url, content=plain.body, headers=headers, timeout=30)
    if a.status_code != 200 or b.status_code != 200:
        raise RuntimeError(f"status {a.status_code}/{b.status_code}: {a.text[:300]} {b.text[:300]}")
    doc_a, doc_b = a.json(), b.json()
    if doc_a != doc_b:
        raise RuntimeError("the baseline's JSON differs from the GraphQL answer")
    lanes = doc_a["data"]["board"]["lanes"]
    cards = [e["node"] for lane in lanes for e in lane["cards"]["edges"]]
    return {
        "identical": True,
        "graphql_bytes": len(a.content),
        "plain_bytes": len(b.content),
        "lanes": [(lane["name"], lane["wipLimit"], lane["count"]) for lane in lanes],
        "cards": len(cards),
        "cards_with_last_run": sum(1 for c in cards if c["lastRun"] is not None),
    }


def summarise(runs: list[load.RunResult], clients: list[int]) -> dict[str, Any]:
    keys = (
        "rps",
        "p50_ms",
        "p95_ms",
        "p99_ms",
        "server_cpu_ms_per_req",
        "pg_cpu_ms_per_req",
        "loadgen_cpu_ms_per_req",
        "busy_cores",
        "other_cores",
    )
    summary: dict[str, Any] = {}
    for target in ("graphql", "plain"):
        summary[target] = {}
        for c in clients:
            mine = [r for r in runs if r.target == target and r.clients == c]
            summary[target][str(c)] = {
                k: {
                    "median": round(statistics.median(getattr(r, k) for r in mine), 3),
                    "min": round(min(getattr(r, k) for r in mine), 3),
                    "max": round(max(getattr(r, k) for r in mine), 3),
                }
                for k in keys
            } | {"errors": sum(r.errors for r in mine), "requests": sum(r.requests for r in mine)}
    ratios: dict[str, Any] = {}
    for c in clients:
        ratios[str(c)] = {}
        for k in ("p50_ms", "p95_ms", "p99_ms", "rps", "server_cpu_ms_per_req"):
            per_round = []
            for rnd in sorted({r.round for r in runs}):
                g = [r for r in runs if r.target == "graphql" and r.clients == c and r.round == rnd]
                p = [r for r in runs if r.target == "plain" and r.clients == c and r.round == rnd]
                if g and p and getattr(p[0], k) > 0:
                    per_round.append(getattr(g[0], k) / getattr(p[0], k))
            ratios[str(c)][k] = {
                "median": round(statistics.median(per_round), 2) if per_round else None,
                "per_round": [round(x, 2) for x in per_round],
            }
    return {"targets": summary, "ratios_graphql_over_plain": ratios}


def budget(summary: dict[str, Any], clients: list[int]) -> dict[str, Any]:
    """DESIGN.md's latency budget: the board's p95 for a single client, at most 15 ms.

    DESIGN.md judges larger client counts by ratios to the plain endpoint (issue 17's server CPU
    and throughput), because at 50 closed-loop clients a p95 of 15 ms is beyond this machine by
    Little's law; the ``at_most_clients`` part shows that arithmetic for the largest count run.
    """
    one = str(BUDGET_CLIENTS) if BUDGET_CLIENTS in clients else None
    c = str(max(clients))
    g = summary["targets"]["graphql"][c]
    p = summary["targets"]["plain"][c]
    cores = os.cpu_count() or 1

    def ceiling(t: dict[str, Any]) -> float:
        """Requests/s with the machine to ourselves: the 2 cores shared by server, backends and
        load generator, and at most one core for the server (one uvicorn process, one GIL)."""
        server = t["server_cpu_ms_per_req"]["median"]
        total = server + t["pg_cpu_ms_per_req"]["median"] + t["loadgen_cpu_ms_per_req"]["median"]
        return min(cores * 1000 / max(total, 1e-9), 1000 / max(server, 1e-9))

    g_ceiling, p_ceiling = ceiling(g), ceiling(p)
    single = None if one is None else summary["targets"]["graphql"][one]["p95_ms"]
    return {
        "clients": BUDGET_CLIENTS,
        "graphql_p95_ms": None if single is None else single["median"],
        "graphql_p95_ms_min": None if single is None else single["min"],
        "graphql_p95_ms_max": None if single is None else single["max"],
        "p95_budget_ms": BUDGET_P95_MS,
        "p95_met": single is not None and single["median"] <= BUDGET_P95_MS,
        "at_most_clients": {
            "clients": int(c),
            "graphql_p95_ms": g["p95_ms"]["median"],
            "ratio_p95": summary["ratios_graphql_over_plain"][c]["p95_ms"]["median"],
            "needed_rps_for_p95_of_budget": round(int(c) / (BUDGET_P95_MS / 1000)),
            "needed_cpu_ms_per_request": round(cores * BUDGET_P95_MS / int(c), 2),
            "cpu_ceiling_rps_graphql": round(g_ceiling),
            "cpu_ceiling_rps_plain": round(p_ceiling),
            "mean_latency_floor_ms_graphql": round(int(c) / g_ceiling * 1000, 1),
            "mean_latency_floor_ms_plain": round(int(c) / p_ceiling * 1000, 1),
            "note": (
                "closed loop: mean latency = clients / throughput (Little's law), and p95 is "
                "normally above the mean. The CPU ceiling is min(2 cores / (server + backend + "
                "load generator CPU per request), 1 core / server CPU per request): the machine "
                "to ourselves, one server process (one GIL). needed_cpu_ms_per_request: all CPU "
                "one request may cost for a p95 of the budget to be reachable at all"
            ),
        },
    }


def print_table(summary: dict[str, Any], clients: list[int]) -> None:
    print()
    header = (
        f"{'target':8} {'c':>3} {'req/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}"
        f" {'srv CPU':>8} {'pg CPU':>7} {'busy':>5} {'other':>6}"
    )
    print(header)
    print("-" * len(header))
    for c in clients:
        for target in ("graphql", "plain"):
            t = summary["targets"][target][str(c)]
            print(
                f"{target:8} {c:>3} {t['rps']['median']:>8.1f} {t['p50_ms']['median']:>8.1f}"
                f" {t['p95_ms']['median']:>8.1f} {t['p99_ms']['median']:>8.1f}"
                f" {t['server_cpu_ms_per_req']['median']:>8.2f}"
                f" {t['pg_cpu_ms_per_req']['median']:>7.2f} {t['busy_cores']['median']:>5.2f}"
                f" {t['other_cores']['median']:>6.2f}"
            )
        r = summary["ratios_graphql_over_plain"][str(c)]
        print(
            f"{'ratio':8} {c:>3} {r['rps']['median']:>8.2f} {r['p50_ms']['median']:>8.2f}"
            f" {r['p95_ms']['median']:>8.2f} {r['p99_ms']['median']:>8.2f}"
            f" {r['server_cpu_ms_per_req']['median']:>8.2f}"
        )
    print("(CPU columns: ms per request; busy/other: cores of the 2, other = not this benchmark)")


# -- main -----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.graphql", description=__doc__.split("\n")[0])
    p.add_argument(
        "--database-url",
        default="postgresql://postgres@127.0.0.1:5432",
        help="server to create the benchmark database on (no database name)",
    )
    p.add_argument("--seconds", type=float, default=8.0, help="length of one measured run")
    p.add_argument("--repeats", type=int, default=3, help="rounds (each runs every cell once)")
    p.add_argument("--clients", default="1,10,50", help="concurrent clients, comma-separated")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds of load before round 1")
    p.add_argument("--profile-seconds", type=float, default=12.0, help="0 skips the py-spy step")
    p.add_argument(
        "--writes-per-second",
        type=float,
        default=0.0,
        help="card renames per second (per workspace written) during the load, projectors running",
    )
    p.add_argument(
        "--writes-in",
        choices=("neighbour", "same", "both"),
        default="neighbour",
        help="where the writes go: the neighbouring workspace, the benchmarked one, or both",
    )
    p.add_argument("--output", type=Path, default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.output is None:
        args.output = RESULTS_WITH_WRITES if args.writes_per_second > 0 else RESULTS
    provenance = Provenance.start()
    clients = [int(x) for x in args.clients.split(",") if x.strip()]
    base = args.database_url.rstrip("/")
    dbname = new_database_name()
    url = f"{base}/{dbname}"
    started = time.monotonic()
    secret = secrets.token_urlsafe(48)
    env = child_env(url, secret)
    procs: list[subprocess.Popen[bytes]] = []
    report: dict[str, Any] = {
        "benchmark": "graphql board query",
        "command": "python -m bench.graphql "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "query": BOARD_QUERY,
        "config": {
            "seconds": args.seconds,
            "repeats": args.repeats,
            "clients": clients,
            "warmup": args.warmup,
            "database": dbname,
            "writes_per_second": args.writes_per_second,
            "writes_in": args.writes_in if args.writes_per_second > 0 else None,
        },
        "machine": machine(admin_url(base)),
    }
    write = None
    backends = None
    try:
        from adapters.tokens import issue_token
        from infra.bootstrap import build_write_side
        from infra.migrate import ensure_database, migrate
        from infra.settings import Settings, db_logins

        if not load.have_wrk():
            log(
                "wrk not found (apt-get install wrk): the load comes from httpx in this process, "
                "whose CPU per request at many clients makes it, not the servers, the bottleneck; "
                "its throughput and latency are not comparable with a wrk run's"
            )
        log(f"database {dbname}: migrate and seed")
        ensure_database(url)
        migrate(url, logins=db_logins(Settings.load()))
        write = build_write_side(url, pool_size=2)
        t0 = time.monotonic()
        seeded = seed(write)
        report["seed"] = {
            "cards": seeded.cards,
            "runs": seeded.runs,
            "commands": seeded.commands,
            "seconds": round(time.monotonic() - t0, 1),
        }
        log(f"seeded {seeded.cards} cards, {seeded.runs} runs ({seeded.commands} commands)")
        report["read_models"] = fill_read_models(url, env)
        log(f"read models rebuilt: {report['read_models']['projectors']}")

        project = str(seeded.project_id)
        token = issue_token(
            user_id=seeded.user_id,
            workspace_id=str(seeded.workspace_id),
            role="OWNER",
            ttl_seconds=3600,
            secret=secret,
        )
        log("in-process evidence: SQL capture, CPU per request, cProfile")
        report["in_process"] = in_process_evidence(url, write, secret, token, seeded, project)
        if not report["in_process"]["sql"]["identical"]:
            log("WARNING: the API's SQL differs from the baseline's; see in_process.sql")
        write.close()
        write = None

        api_port, plain_port = free_port(), free_port()
        api = subprocess.Popen(
            [*agentworks_cli(), "serve", "--port", str(api_port)], env=env, cwd=ROOT
        )
        procs.append(api)
        plain = subprocess.Popen(
            [sys.executable, "-m", "bench._graphql_plain", "--port", str(plain_port)],
            env=env,
            cwd=ROOT,
        )
        procs.append(plain)
        wait_healthy(f"http://127.0.0.1:{api_port}", api)
        wait_healthy(f"http://127.0.0.1:{plain_port}", plain)
        log(f"servers up: API pid {api.pid} :{api_port}, baseline pid {plain.pid} :{plain_port}")

        authorization = f"Bearer {token}"
        gql = load.Target(
            "graphql",
            f"http://127.0.0.1:{api_port}/graphql",
            json.dumps({"query": BOARD_QUERY, "variables": {"id": project}}),
            authorization,
            api.pid,
        )
        base_target = load.Target(
            "plain",
            f"http://127.0.0.1:{plain_port}/board",
            json.dumps({"projectId": project}),
            authorization,
            plain.pid,
        )
        report["answers"] = check_answers(gql, base_target)
        log(
            f"answers identical: {report['answers']['graphql_bytes']:,} bytes, "
            f"{report['answers']['cards']} cards"
        )

        backends = load.Backends(admin_url(base), dbname)
        writer = None
        if args.writes_per_second > 0:
            writer = start_writer(env, seeded, args.writes_per_second, args.writes_in)
            procs.append(writer)
            log(f"writer pid {writer.pid}: {args.writes_per_second:g}/s in {args.writes_in}")
        cache_before = response_cache_lookups(f"http://127.0.0.1:{api_port}")
        runs: list[load.RunResult] = []
        with load.workdir() as tmp:
            load.prepare_scripts([gql, base_target], tmp)
            for target in (gql, base_target):
                load.load(target, max(clients), args.warmup)
            for rnd in range(1, args.repeats + 1):
                for c in clients:
                    pair = (gql, base_target) if (rnd + c) % 2 else (base_target, gql)
                    for target in pair:
                        result = load.timed_run(target, c, args.seconds, rnd, backends)
                        runs.append(result)
                        log(
                            f"round {rnd} {target.name:7} c={c:<3} {result.rps:8.1f} req/s"
                            f"  p50 {result.p50_ms:7.1f}  p95 {result.p95_ms:7.1f}"
                            f"  p99 {result.p99_ms:7.1f} ms"
                            f"  server {result.server_cpu_ms_per_req:5.2f} ms CPU/req"
                            f"  errors {result.errors}"
                        )
            report["response_cache"] = {
                outcome: count - cache_before.get(outcome, 0)
                for outcome, count in response_cache_lookups(f"http://127.0.0.1:{api_port}").items()
            }
            log(f"response cache lookups during the load: {report['response_cache']}")
            if writer is not None:
                report["writes"] = stop_writer(writer)
                log(f"writes during the load: {report['writes']}")
            report["runs"] = [load.as_dict(r) for r in runs]
            report["summary"] = summarise(runs, clients)
            report["budget"] = budget(report["summary"], clients)
            if args.profile_seconds > 0:
                report["profiles"] = {}
                for target in (gql, base_target):
                    log(f"py-spy of {target.name} at {max(clients)} clients")
                    report["profiles"][target.name] = load.profile(
                        target, max(clients), args.profile_seconds, tmp
                    )
        print_table(report["summary"], clients)
        b = report["budget"]
        single = b["graphql_p95_ms"]
        print(
            "\nbudget: GraphQL p95 for a single client "
            + ("not run (add 1 to --clients)" if single is None else f"{single:.1f} ms")
            + f" (<= {BUDGET_P95_MS:g}: {'met' if b['p95_met'] else 'NOT met'})"
        )
    finally:
        for proc in procs:
            stop(proc)
        if backends is not None:
            backends.close()
        if write is not None:
            write.close()
        drop_database(base, dbname)
        report["elapsed_seconds"] = round(time.monotonic() - started, 1)
        report["provenance"] = provenance.finish()
        args.output.parent.mkdir(parents=True, exist_ok=True)
        if "summary" in report:
            args.output.write_text(json.dumps(report, indent=2, default=str) + "\n")
            log(f"wrote {args.output} in {report['elapsed_seconds']:.0f} s; {dbname} dropped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
