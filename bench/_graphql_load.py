"""Load, CPU accounting and profiles for ``bench.graphql``.

Load comes from ``wrk`` (C, closed loop: each connection sends its next request when the
previous answer arrived) driven by a generated Lua script whose ``done`` hook prints the run's
figures as one JSON line; without ``wrk``, an httpx asyncio client does the same, with more CPU.
CPU per request comes from ``/proc``: the server process, the PostgreSQL backends of the
benchmark database, the load generator, and the whole machine (so the report can say how much of
the two cores other work took). Profiles come from ``py-spy record --threads`` attached to the
server, keeping the samples of the event-loop thread, where GraphQL parses, validates, executes
and renders. (``--gil`` and py-spy's idle detection misattributed on this machine: worker threads
waiting for work were sampled as busy, and ``--gil`` shares disagreed with CPU-clock timings.)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg

CLK_TCK = os.sysconf("SC_CLK_TCK")

_LUA = """
wrk.method = "POST"
wrk.body = {body}
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = {authorization}

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{{"requests":%d,"duration_us":%d,"bytes":%d,"connect_errors":%d,"read_errors":%d,' ..
    '"write_errors":%d,"non_2xx":%d,"timeouts":%d,"p50_us":%d,"p90_us":%d,"p95_us":%d,' ..
    '"p99_us":%d,"max_us":%d,"mean_us":%.1f}}\\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(90), latency:percentile(95),
    latency:percentile(99), latency.max, latency.mean))
end
"""


def _lua_string(text: str) -> str:
    return "[==[" + text + "]==]"


@dataclass
class Target:
    name: str
    url: str
    body: str
    authorization: str
    pid: int
    script: Path | None = None


@dataclass
class RunResult:
    target: str
    clients: int
    round: int
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float
    errors: int
    server_cpu_ms_per_req: float
    pg_cpu_ms_per_req: float
    loadgen_cpu_ms_per_req: float
    busy_cores: float
    other_cores: float
    """Cores busy with work that was none of: server, its PostgreSQL backends, load generator."""


def have_wrk() -> bool:
    return shutil.which("wrk") is not None


def prepare_scripts(targets: list[Target], workdir: Path) -> None:
    for target in targets:
        script = workdir / f"{target.name}.lua"
        script.write_text(
            _LUA.format(
                body=_lua_string(target.body), authorization=_lua_string(target.authorization)
            )
        )
        target.script = script


# -- CPU accounting -------------------------------------------------------------------------------


def proc_cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14, 15)


def machine_busy_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot."""
    parts = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    values = [int(v) for v in parts[:8]]
    idle = values[3] + values[4]  # idle + iowait
    total = sum(values)
    return (total - idle) / CLK_TCK, total / CLK_TCK


class Backends:
    """CPU of the PostgreSQL backends serving one database (sampled via pg_stat_activity)."""

    def __init__(self, admin_url: str, dbname: str) -> None:
        self._conn = psycopg.connect(admin_url, autocommit=True)
        self._dbname = dbname

    def snapshot(self) -> dict[int, float]:
        rows = self._conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s", (self._dbname,)
        ).fetchall()
        return {pid: proc_cpu_seconds(pid) for (pid,) in rows}

    def close(self) -> None:
        self._conn.close()


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# -- one timed run --------------------------------------------------------------------------------


def _wrk(target: Target, clients: int, seconds: float) -> dict[str, Any]:
    assert target.script is not None
    threads = 1 if clients < 4 else 2
    cmd = [
        "wrk", f"-t{threads}", f"-c{clients}", f"-d{seconds:g}s", "--timeout", "60s",
        "-s", str(target.script), target.url,
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith('{"requests"')]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr or done.stdout}")
    figures: dict[str, Any] = json.loads(lines[-1])
    return figures


async def _httpx_load(target: Target, clients: int, seconds: float) -> dict[str, Any]:
    latencies: list[float] = []
    errors = 0
    nbytes = 0
    headers = {"Content-Type": "application/json", "Authorization": target.authorization}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:
        started = time.perf_counter()
        end = started + seconds

        async def one_client() -> None:
            nonlocal errors, nbytes
            while time.perf_counter() < end:
                t0 = time.perf_counter()
                try:
                    response = await client.post(target.url, content=target.body, headers=headers)
                except httpx.HTTPError:
                    # A connection the server dropped under overload is an error of the run
                    # (as wrk counts it), not the end of the benchmark.
                    latencies.append(time.perf_counter() - t0)
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - t0)
                nbytes += len(response.content)
                if response.status_code != 200:
                    errors += 1

        await asyncio.gather(*(one_client() for _ in range(clients)))
        elapsed = time.perf_counter() - started
    latencies.sort()

    def pct(p: float) -> int:
        return int(latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))] * 1e6)

    return {
        "requests": len(latencies), "duration_us": int(elapsed * 1e6), "bytes": nbytes,
        "connect_errors": 0, "read_errors": 0, "write_errors": 0, "non_2xx": errors,
        "timeouts": 0, "p50_us": pct(50), "p90_us": pct(90), "p95_us": pct(95), "p99_us": pct(99),
        "max_us": int(latencies[-1] * 1e6), "mean_us": statistics.fmean(latencies) * 1e6,
    }  # fmt: skip


def load(target: Target, clients: int, seconds: float) -> dict[str, Any]:
    if have_wrk():
        return _wrk(target, clients, seconds)
    return asyncio.run(_httpx_load(target, clients, seconds))


def timed_run(
    target: Target, clients: int, seconds: float, round_: int, backends: Backends
) -> RunResult:
    server0 = proc_cpu_seconds(target.pid)
    pg0 = backends.snapshot()
    busy0, total0 = machine_busy_seconds()
    gen0 = _children_cpu() + time.process_time()
    figures = load(target, clients, seconds)
    gen1 = _children_cpu() + time.process_time()
    busy1, total1 = machine_busy_seconds()
    pg1 = backends.snapshot()
    server1 = proc_cpu_seconds(target.pid)

    requests = max(int(figures["requests"]), 1)
    wall = figures["duration_us"] / 1e6
    cores = os.cpu_count() or 1
    busy_cores = (busy1 - busy0) / max(total1 - total0, 1e-9) * cores
    server = server1 - server0
    pg = sum(cpu - pg0.get(pid, 0.0) for pid, cpu in pg1.items())
    generator = gen1 - gen0
    errors = sum(
        int(figures[k])
        for k in ("connect_errors", "read_errors", "write_errors", "non_2xx", "timeouts")
    )
    return RunResult(
        target=target.name,
        clients=clients,
        round=round_,
        requests=int(figures["requests"]),
        seconds=wall,
        rps=figures["requests"] / wall,
        p50_ms=figures["p50_us"] / 1000,
        p90_ms=figures["p90_us"] / 1000,
        p95_ms=figures["p95_us"] / 1000,
        p99_ms=figures["p99_us"] / 1000,
        max_ms=figures["max_us"] / 1000,
        mean_ms=float(figures["mean_us"]) / 1000,
        errors=errors,
        server_cpu_ms_per_req=server / requests * 1000,
        pg_cpu_ms_per_req=pg / requests * 1000,
        loadgen_cpu_ms_per_req=generator / requests * 1000,
        busy_cores=busy_cores,
        other_cores=max(0.0, busy_cores - (server + pg + generator) / max(wall, 1e-9)),
    )


def as_dict(result: RunResult) -> dict[str, Any]:
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in asdict(result).items()}


# -- profiles -------------------------------------------------------------------------------------

#: (category, markers): a sample goes to the first category with a marker in its stack.
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("JSON rendering of the response", ("JSONResponse.render", "render (starlette/responses")),
    ("GraphQL validation and query limits",
     ("graphql/validation/", "_run_validation", "read_api/limits.py")),
    ("GraphQL parsing", ("graphql/language/parser.py", "graphql/language/lexer.py")),
    ("our resolvers, loaders, scalars (read_api/, domain/)",
     ("read_api/types.py", "read_api/loaders.py", "read_api/db.py", "read_api/cursors.py",
      "read_api/scalars.py", "read_api/query.py", "domain/", "strawberry/dataloader.py")),
    ("baseline endpoint code (bench/_graphql_plain.py)",
     ("board (bench/_graphql_plain.py", "read_board (bench/_graphql_plain.py")),
    ("GraphQL execution (graphql-core executor, strawberry field wrappers)",
     ("graphql/execution/", "strawberry/")),
    ("HTTP/ASGI (uvicorn, Starlette, FastAPI), auth", ("uvicorn/", "starlette/", "fastapi/",
                                                       "read_api/app.py", "read_api/auth.py",
                                                       "adapters/tokens.py", "jwt/")),
    ("asyncio event loop", ("asyncio/",)),
)  # fmt: skip


def _function(frame: str) -> str:
    """``name (path:line)`` -> ``name (path)``."""
    head, sep, rest = frame.partition(" (")
    if not sep:
        return frame
    return f"{head} ({rest.rsplit(':', 1)[0].rstrip(')')})"


#: A frame every stack of the event-loop thread has (uvicorn runs the loop with asyncio.run).
EVENT_LOOP_THREAD = "Runner.run (asyncio/runners.py"
WORKER = "_worker (concurrent/futures/thread.py"
#: Leaves of worker-thread stacks that wait (for work, a lock, the database), not compute.
WAITS = ("_worker (concurrent/futures/thread.py:81)", "wait (threading.py", "Connection.wait (")


def summarise_profile(raw: Path, top: int = 20) -> dict[str, Any]:
    """Event-loop thread samples: shares by category, by function (self), and inclusive."""
    total = 0
    other_threads = 0
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    categories: Counter[str] = Counter()
    worker_busy: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        if EVENT_LOOP_THREAD not in stack:
            other_threads += count
            leaf = stack.rsplit(";", 1)[-1]
            if WORKER in stack and not any(w in leaf for w in WAITS):
                worker_busy[_function(leaf)] += count
            continue
        total += count
        frames = stack.split(";")
        self_time[_function(frames[-1])] += count
        for name in {_function(f) for f in frames}:
            inclusive[name] += count
        for category, markers in CATEGORIES:
            if any(marker in frame for frame in frames for marker in markers):
                categories[category] += count
                break
        else:
            categories["other"] += count

    def share(counter: Counter[str], n: int) -> list[list[Any]]:
        return [[name, round(c / max(total, 1) * 100, 1)] for name, c in counter.most_common(n)]

    return {
        "event_loop_thread_samples": total,
        "other_thread_samples_ignored": other_threads,
        "worker_thread_busy_samples": sum(worker_busy.values()),
        "worker_thread_busy_leaves": [[name, c] for name, c in worker_busy.most_common(8)],
        "categories_pct": share(categories, len(categories)),
        "self_pct": share(self_time, top),
        "inclusive_pct": share(inclusive, top * 3),
    }


def profile(
    target: Target, clients: int, seconds: float, workdir: Path, rate: int = 200
) -> dict[str, Any]:
    """py-spy of ``target``'s server (event-loop thread) during ``seconds`` of load."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        return {"error": "py-spy not installed (pip install py-spy)"}
    raw = workdir / f"{target.name}.pyspy.txt"
    loader = subprocess.Popen(  # load for longer than the profile lasts
        ["wrk", "-t2", f"-c{clients}", f"-d{seconds + 3:g}s", "--timeout", "60s",
         "-s", str(target.script), target.url],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    ) if have_wrk() else None  # fmt: skip
    try:
        time.sleep(1.0)
        done = subprocess.run(
            [py_spy, "record", "--pid", str(target.pid), "--duration", f"{seconds:g}",
             "--rate", str(rate), "--threads", "--format", "raw", "--output", str(raw)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
    finally:
        if loader is not None:
            loader.wait(timeout=seconds + 30)
    if done.returncode != 0 or not raw.exists():
        return {"error": (done.stderr or done.stdout).strip()[-500:]}
    summary = summarise_profile(raw)
    summary["clients"] = clients
    summary["seconds"] = seconds
    summary["rate_hz"] = rate
    return summary


@contextlib.contextmanager
def workdir() -> Any:
    with tempfile.TemporaryDirectory(prefix="aw-bench-graphql-") as path:
        yield Path(path)
