"""Benchmark machinery: a pool of writer processes, timed windows, latency and CPU accounting.

Why processes: a writer spends most of its client time in Python (pydantic, the eventsourcing
library, psycopg), which holds the GIL, so 16 *threads* in one interpreter would measure one
core's worth of Python, not the database. Each writer is therefore its own process (started with
``spawn``), running one thread with its own connection pool; the parent only coordinates.

Protocol (one duplex pipe per worker)::

    parent -> ("setup", "module:factory", params, index)   worker -> ("ready", info)
    parent -> ("go", measure_from, end_at)                  worker -> ("done", WorkerResult)
    parent -> ("stop",)

``factory(params, index)`` returns a :class:`Runner`; ``Runner.op()`` performs one operation
(a command, a save, a transaction, a batch) and returns how many events it stored (0 = the
operation failed, e.g. a command that lost all its retries). All workers start together on
"go", warm up until ``measure_from`` and then record every completed operation until
``end_at``; the parent cuts that record into equal windows, the repetitions.

API-shaped scenarios set ``params["threads"]`` (T > 1): the worker then builds T runners, one per
thread, which share what the workload shares within a process (the API runs commands in a thread
pool over one application), and drives them together; its result merges theirs, and its CPU is
the whole process's. ``params["thread_reuse"]`` gives each thread back what its runner's
``info["reuse"]`` asked to keep between rounds.
"""

from __future__ import annotations

import contextlib
import importlib
import multiprocessing as mp
import os
import statistics
import threading
import time
import traceback
from array import array
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import psycopg

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from multiprocessing.connection import Connection


class Runner(Protocol):
    info: dict[str, Any]

    def op(self) -> int: ...

    def counters(self) -> dict[str, int]: ...

    def close(self) -> None: ...


@dataclass
class WorkerResult:
    ends: bytes  # array('d') of completion times (time.monotonic), measured period only
    latencies: bytes  # array('d') of seconds, same order
    events: bytes  # array('l') of events stored per operation (0 = failed)
    cpu_seconds: float  # this process's CPU time during the measured period
    counters: dict[str, int]  # Runner.counters() difference over the measured period


def _resolve(target: str) -> Callable[[dict[str, Any], int], Runner]:
    module, _, name = target.partition(":")
    factory: Callable[[dict[str, Any], int], Runner] = getattr(
        importlib.import_module(module), name
    )
    return factory


def _drive(runner: Runner, measure_from: float, end_at: float) -> WorkerResult:
    ends, latencies, events = array("d"), array("d"), array("l")
    cpu0: float | None = None
    counters0: dict[str, int] = {}
    monotonic, op = time.monotonic, runner.op
    while True:
        t0 = monotonic()
        if t0 >= end_at:
            break
        if cpu0 is None and t0 >= measure_from:
            cpu0, counters0 = time.process_time(), runner.counters()
        stored = op()
        t1 = monotonic()
        if t1 >= measure_from:
            ends.append(t1)
            latencies.append(t1 - t0)
            events.append(stored)
    cpu1, counters1 = time.process_time(), runner.counters()
    if cpu0 is None:
        cpu0, counters0 = cpu1, counters1
    return WorkerResult(
        ends=ends.tobytes(),
        latencies=latencies.tobytes(),
        events=events.tobytes(),
        cpu_seconds=cpu1 - cpu0,
        counters={k: v - counters0.get(k, 0) for k, v in counters1.items()},
    )


class _Threads:
    """T runners of one worker process, each driven by its own thread."""

    def __init__(self, factory: Callable[[dict[str, Any], int], Runner], params: dict[str, Any],
                 index: int) -> None:  # fmt: skip
        threads = int(params["threads"])
        reuse: list[dict[str, Any]] = params.get("thread_reuse") or [{}] * threads
        self.runners = [
            factory({**params, **reuse[k]}, index * threads + k) for k in range(threads)
        ]
        self.info: dict[str, Any] = {
            "reuse": {"thread_reuse": [r.info.get("reuse", {}) for r in self.runners]}
        }

    def drive(self, measure_from: float, end_at: float) -> WorkerResult:
        results: list[WorkerResult | None] = [None] * len(self.runners)

        def run(k: int) -> None:
            results[k] = _drive(self.runners[k], measure_from, end_at)

        threads = [threading.Thread(target=run, args=(k,)) for k in range(len(self.runners))]
        for thread in threads:
            thread.start()
        # The process's CPU over the measured period, all threads together.
        time.sleep(max(0.0, measure_from - time.monotonic()))
        cpu0 = time.process_time()
        for thread in threads:
            thread.join()
        cpu1 = time.process_time()
        done = [r for r in results if r is not None]
        if len(done) != len(results):
            raise RuntimeError("a writer thread failed")
        ends, latencies, events = array("d"), array("d"), array("l")
        counters: Counter[str] = Counter()
        for r in done:
            ends.frombytes(r.ends)
            latencies.frombytes(r.latencies)
            events.frombytes(r.events)
            counters.update(r.counters)
        return WorkerResult(
            ends=ends.tobytes(),
            latencies=latencies.tobytes(),
            events=events.tobytes(),
            cpu_seconds=cpu1 - cpu0,
            counters=dict(counters),
        )

    def close(self) -> None:
        for runner in self.runners:
            runner.close()


def _serve(conn: Connection) -> None:
    """The body of a worker process."""
    runner: Runner | _Threads | None = None
    while True:
        try:
            message = conn.recv()
        except EOFError:
            break
        kind = message[0]
        try:
            if kind == "setup":
                _, target, params, index = message
                factory = _resolve(target)
                runner = (
                    _Threads(factory, params, index)
                    if int(params.get("threads", 1)) > 1
                    else factory(params, index)
                )
                conn.send(("ready", runner.info))
            elif kind == "go":
                _, measure_from, end_at = message
                assert runner is not None
                result = (
                    runner.drive(measure_from, end_at)
                    if isinstance(runner, _Threads)
                    else _drive(runner, measure_from, end_at)
                )
                runner.close()
                runner = None
                conn.send(("done", result))
            elif kind == "abort":
                if runner is not None:
                    with contextlib.suppress(Exception):
                        runner.close()
                runner = None
                conn.send(("aborted", None))
            elif kind == "stop":
                break
        except BaseException:  # noqa: BLE001 - the parent is told of any failure, then decides
            if runner is not None:
                with contextlib.suppress(Exception):
                    runner.close()
            runner = None
            conn.send(("error", traceback.format_exc()))
    if runner is not None:
        runner.close()


class WorkerError(RuntimeError):
    pass


class WorkerPool:
    """``size`` spawned processes, reused by every scenario (spawning 16 interpreters that import
    the whole write side costs seconds of CPU on two cores; it is paid once, not per scenario)."""

    def __init__(self, size: int) -> None:
        ctx = mp.get_context("spawn")
        self._conns: list[Connection] = []
        self._procs: list[mp.process.BaseProcess] = []
        for i in range(size):
            parent_end, child_end = ctx.Pipe()
            proc = ctx.Process(target=_serve, args=(child_end,), name=f"bench-writer-{i}")
            proc.daemon = True
            proc.start()
            child_end.close()
            self._conns.append(parent_end)
            self._procs.append(proc)

    @property
    def size(self) -> int:
        return len(self._procs)

    def _expect(self, conns: Sequence[Connection], kind: str) -> list[Any]:
        replies: list[Any] = []
        errors: list[str] = []
        for conn in conns:
            got, payload = conn.recv()
            if got == "error":
                errors.append(payload)
            elif got != kind:
                errors.append(f"unexpected reply {got!r}")
            else:
                replies.append(payload)
        if errors:
            raise WorkerError(errors[0])
        return replies

    def run(
        self,
        target: str,
        params_for: Callable[[int], dict[str, Any]],
        writers: int,
        *,
        warmup: float,
        measured: float,
        on_measure: Callable[[float, float], Any] | None = None,
    ) -> tuple[list[dict[str, Any]], list[WorkerResult], Any, float]:
        """Set up ``writers`` runners and run them together.

        Returns the runners' infos, their results, what ``on_measure(measure_from, end_at)``
        returned (it runs in the parent during the measured period) and ``measure_from``.
        """
        if writers > self.size:
            raise ValueError(f"{writers} writers but only {self.size} worker processes")
        conns = self._conns[:writers]
        for index, conn in enumerate(conns):
            conn.send(("setup", target, params_for(index), index))
        try:
            infos = self._expect(conns, "ready")
        except WorkerError:
            for conn in conns:
                conn.send(("abort",))
            for conn in conns:
                conn.recv()
            raise
        measure_from = time.monotonic() + warmup
        end_at = measure_from + measured
        for conn in conns:
            conn.send(("go", measure_from, end_at))
        observed = on_measure(measure_from, end_at) if on_measure else None
        results = self._expect(conns, "done")
        return infos, results, observed, measure_from

    def close(self) -> None:
        for conn in self._conns:
            with contextlib.suppress(OSError, BrokenPipeError):
                conn.send(("stop",))
        for proc in self._procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()


# -- what the machine and the database were doing -----------------------------------------------


def _cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs, from /proc/stat."""
    with open("/proc/stat", encoding="ascii") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user
    return total - idle, total


def _proc_cpu_ticks(pid: int) -> int | None:
    """utime + stime of a process, in clock ticks (None when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[11]) + int(fields[12])


@dataclass
class Observation:
    busy_cpu_seconds: float = 0.0  # the whole machine, every process
    server_cpu_seconds: float = 0.0  # the scenario's own PostgreSQL backends
    wall_seconds: float = 0.0
    waits: Counter[str] = field(default_factory=Counter)
    samples: int = 0


def observe(dbname: str, admin_url: str, measure_from: float, end_at: float) -> Observation:
    """Machine CPU over [measure_from, end_at] and a sampled profile of what the scenario's
    server backends were doing (pg_stat_activity every 20 ms)."""
    obs = Observation()
    stop = threading.Event()

    def sample() -> None:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            while not stop.is_set():
                rows = conn.execute(
                    "SELECT state, wait_event_type, wait_event FROM pg_stat_activity "
                    "WHERE datname = %s AND pid <> pg_backend_pid() AND backend_type = "
                    "'client backend'",
                    (dbname,),
                ).fetchall()
                for state, wtype, wevent in rows:
                    obs.waits[_wait_class(state, wtype, wevent)] += 1
                obs.samples += 1
                stop.wait(0.02)

    with psycopg.connect(admin_url, autocommit=True) as conn:
        pids = [
            int(row[0])
            for row in conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = %s AND backend_type = "
                "'client backend' AND pid <> pg_backend_pid()",
                (dbname,),
            )
        ]
    ticks = os.sysconf("SC_CLK_TCK")
    time.sleep(max(0.0, measure_from - time.monotonic()))
    sampler = threading.Thread(target=sample, daemon=True)
    busy0, _ = _cpu_jiffies()
    server0 = {pid: _proc_cpu_ticks(pid) for pid in pids}
    t0 = time.monotonic()
    sampler.start()
    time.sleep(max(0.0, end_at - time.monotonic()))
    busy1, _ = _cpu_jiffies()
    server1 = {pid: _proc_cpu_ticks(pid) for pid in pids}
    obs.wall_seconds = time.monotonic() - t0
    stop.set()
    sampler.join()
    obs.busy_cpu_seconds = (busy1 - busy0) / ticks
    obs.server_cpu_seconds = (
        sum(
            (server1[pid] or 0) - (server0[pid] or 0)
            for pid in pids
            if server0[pid] is not None and server1[pid] is not None
        )
        / ticks
    )
    return obs


def _wait_class(state: str | None, wtype: str | None, wevent: str | None) -> str:
    if state == "idle":
        return "idle (client side)"
    if state == "idle in transaction":
        return "idle in txn (client side)"
    if wtype is None:
        return "on CPU"
    if wtype == "Lock":
        return {"advisory": "Lock:advisory", "object": "Lock:object (NOTIFY queue)"}.get(
            wevent or "", f"Lock:{wevent}"
        )
    return f"{wtype}:{wevent}"


# -- statistics ---------------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[k]


def windows(
    results: Sequence[WorkerResult], measure_from: float, seconds: float, repeats: int
) -> list[dict[str, float]]:
    """Per-window throughput and latency over all workers' operations."""
    ends: list[float] = []
    lats: list[float] = []
    evs: list[int] = []
    for r in results:
        ends.extend(array("d", r.ends))
        lats.extend(array("d", r.latencies))
        evs.extend(array("l", r.events))
    out: list[dict[str, float]] = []
    for i in range(repeats):
        lo, hi = measure_from + i * seconds, measure_from + (i + 1) * seconds
        ok_lat = sorted(
            lat for end, lat, ev in zip(ends, lats, evs, strict=True) if lo <= end < hi and ev > 0
        )
        events = sum(ev for end, ev in zip(ends, evs, strict=True) if lo <= end < hi)
        failed = sum(1 for end, ev in zip(ends, evs, strict=True) if lo <= end < hi and ev == 0)
        out.append(
            {
                "ops_per_s": len(ok_lat) / seconds,
                "events_per_s": events / seconds,
                "failed_per_s": failed / seconds,
                "p50_ms": percentile(ok_lat, 0.50) * 1000,
                "p99_ms": percentile(ok_lat, 0.99) * 1000,
            }
        )
    return out


def medians(per_window: Sequence[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(w[key] for w in per_window) for key in per_window[0]}
