"""Where a single writer's ``move_card`` spends its time: cProfile of the real command path.

    python -m bench.profile_move [--moves 1000] [--database-url postgresql://...]

Runs in-process against a fresh ``aw_bench_<hex>`` database (dropped afterwards): a board of
4 lanes and 20 cards, a warm-up, then

* plain timing (commands/s, client CPU per command),
* a cProfile of ``--moves`` moves (CPU clock), top functions by own time and by cumulative time,
* the cost of one ``deepcopy`` of each cached aggregate the command loads, and
* two what-ifs on this process only (nothing in the code base changes): the repository without
  ``deepcopy_from_cache``, and the three fast-forward SELECTs alone.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import io
import pstats
import random
import secrets
import statistics
import time
from typing import TYPE_CHECKING

import psycopg
from psycopg import sql

from bench._append_workloads import LANES, make_board
from commands import models as m
from commands.handlers import Actor
from infra.bootstrap import build_write_side
from infra.migrate import ensure_database, migrate
from infra.settings import Settings, db_logins

if TYPE_CHECKING:
    from uuid import UUID

    from commands.handlers import AgentWorks


def _moves(app: AgentWorks, actor: Actor, cards: list[UUID], n: int, rng: random.Random) -> None:
    for _ in range(n):
        app.move_card(m.MoveCard(card_id=rng.choice(cards), to_lane=rng.choice(LANES)), actor)


def _timed(app: AgentWorks, actor: Actor, cards: list[UUID], n: int) -> tuple[float, float]:
    rng = random.Random(7)
    wall, cpu = time.perf_counter(), time.process_time()
    _moves(app, actor, cards, n, rng)
    return n / (time.perf_counter() - wall), (time.process_time() - cpu) / n * 1000


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile_move", description=__doc__)
    p.add_argument("--moves", type=int, default=1000)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--database-url", default="postgresql://postgres@127.0.0.1:5432")
    args = p.parse_args(argv)
    base = args.database_url.rstrip("/")
    dbname = f"aw_bench_{secrets.token_hex(6)}"
    url = f"{base}/{dbname}"
    try:
        ensure_database(url)
        migrate(url, logins=db_logins(Settings.load()))
        app = build_write_side(url, pool_size=1)
        boot = Actor(user_id="alice", workspace_id="*")
        ws = app.create_workspace(m.CreateWorkspace(name="Profile"), boot)
        actor = Actor(user_id="alice", workspace_id=str(ws.id))
        project_id, cards = make_board(app, actor, "profiled board")
        _moves(app, actor, cards, 300, random.Random(1))

        rate, cpu = _timed(app, actor, cards, args.moves)
        print(f"move_card, 1 writer: {rate:,.0f} commands/s, client CPU {cpu:.3f} ms/command")

        profiler = cProfile.Profile(time.process_time)
        profiler.enable()
        _moves(app, actor, cards, args.moves, random.Random(2))
        profiler.disable()
        for order in ("tottime", "cumulative"):
            out = io.StringIO()
            pstats.Stats(profiler, stream=out).sort_stats(order).print_stats(args.top)
            print(f"\n--- cProfile (CPU clock, {args.moves} moves) by {order} ---")
            print(out.getvalue().split("\n\n", 1)[-1].strip())

        print("\n--- deepcopy of the cached aggregates a move loads (Repository.get) ---")
        cache = app.repository.cache
        assert cache is not None  # AGGREGATE_CACHE_MAXSIZE is set by infra.bootstrap
        for label, oid in (("Workspace", ws.id), ("Project", project_id), ("Card", cards[0])):
            aggregate = cache.get(oid)
            t = time.perf_counter()
            for _ in range(200):
                copy.deepcopy(aggregate)
            print(f"{label:10} {(time.perf_counter() - t) / 200 * 1e6:8.1f} us per deepcopy")

        print("\n--- what-ifs (this process only; A/B interleaved 5 times, medians) ---")
        runs: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
        for _ in range(5):
            for flag in (True, False):
                app.repository.deepcopy_from_cache = flag
                runs[flag].append(_timed(app, actor, cards, max(50, args.moves // 5)))
        app.repository.deepcopy_from_cache = True
        for flag, label in ((True, "as configured (deepcopy)"), (False, "no deepcopy_from_cache")):
            rate = statistics.median(r for r, _ in runs[flag])
            cpu = statistics.median(c for _, c in runs[flag])
            print(f"{label:26}: {rate:,.0f} commands/s, client CPU {cpu:.3f} ms/command")
        t = time.perf_counter()
        for _ in range(args.moves):
            for oid in (cards[0], ws.id, project_id):
                app.recorder.select_events(oid, gt=10**9)
        per = (time.perf_counter() - t) / args.moves * 1000
        print(f"the 3 fast-forward SELECTs alone (empty results): {per:.3f} ms per command")
        app.close()
    finally:
        with psycopg.connect(f"{base}/postgres", autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname))
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
