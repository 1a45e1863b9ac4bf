"""Recovery from a database restart: how long after PostgreSQL is back the product is too.

``python -m bench.recovery [--rounds 5] [--down 2.0]`` starts a PostgreSQL server of its own
(the shared one is never restarted), the API with the embedded fan-out on it, and one client
creating a card every 10 ms with a ``commandId``. Each round stops the server (``pg_ctl -m fast``,
what a service restart does), leaves it down ``--down`` seconds, starts it again, and measures,
from the moment it accepts connections again:

* the first successful write (the first ``createCard`` answered with its result);
* read models fresh again: every projector's position has reached that write's position;

next to the database's own restart: its stop, and its start until it accepts connections. Each
figure is the median over the rounds. The machine is shared: the 1-minute load average at the
start and the end goes into ``bench/results/recovery.json``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import statistics
import sys
import threading
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import psycopg

from bench._provenance import Provenance

ROOT = Path(__file__).resolve().parent.parent


def _helper(name: str) -> ModuleType:
    """A test helper module (no pytest in it), shared with tests/integration."""
    for path in (str(ROOT / "tests"), str(ROOT / "tests" / "integration")):
        if path not in sys.path:
            sys.path.insert(0, path)
    return importlib.import_module(name)


def _fresh_through(url: str) -> int:
    """The position every projector has reached (the lowest of them)."""
    with psycopg.connect(url, connect_timeout=2) as conn:
        row = conn.execute(
            "SELECT coalesce(min(position), 0) FROM projection_positions "
            "WHERE projector NOT LIKE '%#%'"
        ).fetchone()
    return int(row[0]) if row else 0


def _accepting_after(server: Any, started: float) -> float:
    """Poll a fresh connection every 5 ms from ``started``; when the server accepted one."""
    while True:
        try:
            with psycopg.connect(server.url(), connect_timeout=2):
                return time.monotonic()
        except psycopg.OperationalError:
            if time.monotonic() - started > 60:
                raise
            time.sleep(0.005)


def one_round(server: Any, url: str, writers: Any, down: float) -> dict[str, Any]:
    before = len(writers.answers)
    time.sleep(1.0)
    stop_began = time.monotonic()
    server.stop("fast")
    stopped = time.monotonic()
    time.sleep(down)
    start_began = time.monotonic()
    accepting: dict[str, float] = {}
    poller = threading.Thread(
        target=lambda: accepting.setdefault("at", _accepting_after(server, start_began))
    )
    poller.start()
    server.start()
    poller.join()
    back = accepting["at"]
    first = None
    deadline = back + 60
    while first is None and time.monotonic() < deadline:
        done = [a for a in writers.since(before) if a.kind == "done" and a.answered_at > back]
        if done:
            first = min(done, key=lambda a: a.answered_at)
        else:
            time.sleep(0.005)
    if first is None:
        raise RuntimeError("no write succeeded within 60 s of the database accepting connections")
    position = int(first.position)
    fresh_at = None
    while fresh_at is None and time.monotonic() < deadline:
        try:
            if _fresh_through(url) >= position:
                fresh_at = time.monotonic()
                break
        except psycopg.OperationalError:
            pass
        time.sleep(0.005)
    if fresh_at is None:
        raise RuntimeError("projectors did not catch up within 60 s")
    kinds = Counter(a.kind for a in writers.since(before))
    return {
        "db_stop_s": round(stopped - stop_began, 3),
        "db_start_to_accepting_s": round(back - start_began, 3),
        "db_restart_s": round((stopped - stop_began) + (back - start_began), 3),
        "first_write_after_accepting_s": round(first.answered_at - back, 3),
        "read_models_fresh_after_accepting_s": round(fresh_at - back, 3),
        "answers": dict(kinds),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--down", type=float, default=2.0, help="seconds the database stays down")
    parser.add_argument("--json", default="bench/results/recovery.json")
    args = parser.parse_args()
    provenance = Provenance.start()

    dedicated = _helper("dedicated_postgres")
    outage = _helper("outage_helpers")
    load_before = os.getloadavg()
    rounds = []
    with dedicated.dedicated_postgres() as server:
        url = server.create_database("agentworks")
        from infra.migrate import migrate

        # A fresh cluster: its component roles may log in only once migrate says so (any password
        # serves: the dedicated server trusts local connections).
        logins = {role: "bench" for role in ("agentworks_app", "agentworks_api")}
        logins |= {role: "bench" for role in ("agentworks_projector", "agentworks_relay")}
        migrate(url, app_role="agentworks_app", logins=logins)
        stack = outage.start_api_stack(url, pool_timeout=1.0, settle_seconds=5.0)
        try:
            token, projects = stack.boards(1)
            writers = outage.Writers(stack, token, projects, with_ids=1, interval=0.01)
            writers.start()
            try:
                for n in range(args.rounds):
                    result = one_round(server, url, writers, args.down)
                    rounds.append(result)
                    print(f"round {n + 1}: {json.dumps(result)}", flush=True)
            finally:
                writers.stop()
            others = [a.detail for a in writers.answers if a.kind == "other"]
        finally:
            stack.close()
    load_after = os.getloadavg()

    keys = [
        "db_stop_s",
        "db_start_to_accepting_s",
        "db_restart_s",
        "first_write_after_accepting_s",
        "read_models_fresh_after_accepting_s",
    ]
    medians = {key: round(statistics.median(r[key] for r in rounds), 3) for key in keys}
    summary = {
        "benchmark": "recovery",
        "command": "python -m bench.recovery " + " ".join(sys.argv[1:]),
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "load_average_1m": {"start": round(load_before[0], 2), "end": round(load_after[0], 2)},
        "note": "the machine is shared with other work while this runs; see load_average_1m",
        "down_seconds": args.down,
        "rounds": rounds,
        "medians": medians,
        "answers_neither_result_nor_unavailable": others[:5],
        "provenance": provenance.finish(),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({"medians": medians, "load_average_1m": summary["load_average_1m"]}))


if __name__ == "__main__":
    main()
