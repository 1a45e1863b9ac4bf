"""What the costliest documents the cost limit admits cost the API, next to the SPA's board.

    python -m bench.graphql_cost [--repeats 3] [--output bench/results/graphql_cost.json]

A fresh database ``aw_bench_<hex>``, migrated and seeded through the real command handlers: the
200-card board of ``bench.graphql`` (the baseline) and a second workspace a hostile tenant may
build: 20 projects (the most the estimate takes a workspace to have without counting them) of 50
lanes (the most a project may have), 8 cards in every lane (seeding takes a minute or two).
Read models by ``agentworks rebuild all``; the API is ``agentworks serve`` in its own process.
Each document is POSTed ``--repeats`` times, one at a time (an undeclared variable changes per
request so the response cache never answers), and the server process's CPU (``/proc``) and the
wall time are measured per request. Every document is first shown to the limiter as configured
in this worktree: its estimate and whether that admits it before it runs ("up front"); refused
documents are still POSTed (to show the refusal and what it costs), their figures then being
those of the refusal (which may come while it runs: lists longer than estimated, or more fields
executed than allowed).
"""

from __future__ import annotations

import argparse
import json
import secrets
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx

from bench import _graphql_load as load
from bench._graphql_seed import drop_database, new_database_name, seed
from bench._provenance import ROOT
from bench.graphql import (
    agentworks_cli,
    child_env,
    fill_read_models,
    free_port,
    log,
    stop,
    wait_healthy,
)

SPA_BOARD = """query Board($id: ID!) { board(projectId: $id) { lanes { name wipLimit count
 cards { pageInfo { hasNextPage endCursor } edges { cursor node {
  id title description lane position assignee labels version updatedAt cost
  lastRun { id status }
  runs { pageInfo { hasNextPage endCursor }
   edges { node { id agent status model inputTokens outputTokens billed startedAt } }
 } } } } } } }"""

PROJECTS = 20
LANES = 50
CARDS_PER_LANE = 8


def _every_lane(inner: str) -> str:
    return (
        "query($ws: ID!) { workspace(id: $ws) { projects { board { lanes { " + inner + " } } } } }"
    )


def _aliases(count: int, field: str, body: str, prefix: str) -> str:
    return " ".join(f"{prefix}{i}: {field} {body}" for i in range(count))


#: Documents a hostile tenant may send about its own workspace (``seed_hostile``): as many list
#: resolutions as the estimate, the alias limit (30) and the token limit (4000) let through.
HOSTILE = {
    # Every lane of every project, its first card thirty times over (aliases).
    "lanes x 30 cards(first: 1)": _every_lane(
        _aliases(30, "cards(first: 1)", "{ edges { node { id } } }", "c")
    ),
    # ...the first of them 29 times over, then each card's runs 29 times over.
    "lanes x cards(first: 1) x 29 runs(first: 1)": _every_lane(
        "cards(first: 1) { edges { node { id "
        + _aliases(29, "runs(first: 1)", "{ edges { node { id } } }", "r")
        + " } } }"
    ),
    # Pages of 8 cards (as many as the estimate lets the 29 aliases below multiply)...
    "lanes x cards(first: 8) x 29 runs(first: 1)": _every_lane(
        "cards(first: 8) { edges { node { id "
        + _aliases(29, "runs(first: 1)", "{ edges { node { id } } }", "r")
        + " } } }"
    ),
    # Objects rather than reads: every card of every lane, 16 fields each.
    "lanes x cards(first: 100), 16 fields": _every_lane(
        "name count cards(first: 100) { pageInfo { hasNextPage endCursor } edges { cursor node {"
        " id projectId title description lane position assignee labels archived version"
        " createdAt updatedAt cost lastRun { id status } } } }"
    ),
    # Empty pages: resolutions without objects.
    "lanes x 30 cards(first: 0)": _every_lane(
        _aliases(30, "cards(first: 0)", "{ pageInfo { hasNextPage } }", "c")
    ),
    # ...as many as both bounds admit (11,000 reads of 9 executed fields each, under 100,000).
    "lanes x 11 cards(first: 0)": _every_lane(
        _aliases(11, "cards(first: 0)", "{ pageInfo { hasNextPage } }", "c")
    ),
}
#: Objects rather than resolutions, on the 200-card board: what one card costs.
CARDS_OF_THE_BOARD = {
    "board { version } (a request's own cost)": (
        "query($id: ID!) { board(projectId: $id) { version } }"
    ),
    "board x cards(first: 200) { id }": (
        "query($id: ID!) { board(projectId: $id) { lanes { cards(first: 200) {"
        " edges { node { id } } } } } }"
    ),
    "board x cards(first: 200), 16 fields": (
        "query($id: ID!) { board(projectId: $id) { lanes { name count cards(first: 200) {"
        " pageInfo { hasNextPage endCursor } edges { cursor node { id projectId title"
        " description lane position assignee labels archived version createdAt updatedAt cost"
        " lastRun { id status } } } } } } }"
    ),
}


def seed_hostile(write: Any) -> tuple[UUID, str]:
    """A workspace of ``PROJECTS`` projects of ``LANES`` lanes, ``CARDS_PER_LANE`` cards each."""
    from commands import models as m
    from commands.handlers import Actor

    owner_id = "5d7c0b1e-6a55-4f0e-9a41-3a8a0c9a1b02"
    ws = write.create_workspace(
        m.CreateWorkspace(name="Hostile"), Actor(user_id=owner_id, workspace_id="*")
    )
    owner = Actor(user_id=owner_id, workspace_id=str(ws.id))
    lanes = [m.LaneInput(name=f"L{i:02d}") for i in range(LANES)]
    for p in range(PROJECTS):
        project = write.create_project(
            m.CreateProject(workspace_id=ws.id, name=f"P{p}", lanes=lanes), owner
        )
        for lane in lanes * CARDS_PER_LANE:
            write.create_card(m.CreateCard(project_id=project.id, title="c", lane=lane.name), owner)
    return ws.id, owner_id


def estimate(document: str, variables: dict[str, Any]) -> tuple[int, bool]:
    """The limiter's estimate of ``document`` in this worktree, and whether it admits it."""
    from graphql import OperationDefinitionNode, parse

    from read_api import limits
    from read_api.services import QueryLimits

    operation = next(
        d for d in parse(document).definitions if isinstance(d, OperationDefinitionNode)
    )
    if hasattr(limits, "estimate"):
        cost = limits.estimate(operation, {}, variables).total
    else:  # the estimate before list reads were counted, to measure against
        cost = limits._cost(operation.selection_set, {}, variables, multiplier=1, depth=0)
    return cost, cost <= QueryLimits().max_cost


def measure(
    client: httpx.Client, url: str, token: str, pid: int, document: str,
    variables: dict[str, Any], repeats: int,
) -> dict[str, Any]:  # fmt: skip
    """Wall and server CPU per request, medians over ``repeats`` (sums over at least a second's
    worth of requests for quick ones: /proc counts CPU in 10 ms ticks); the answer's errors."""
    walls: list[float] = []
    cpus: list[float] = []
    errors: Any = None
    batch = 1
    for i in range(repeats + 1):
        body = {"query": document, "variables": {**variables, "nonce": secrets.token_hex(8)}}
        cpu0, t0 = load.proc_cpu_seconds(pid), time.monotonic()
        for _ in range(batch):
            answer = client.post(url, json=body, headers={"Authorization": f"Bearer {token}"})
            body["variables"]["nonce"] = secrets.token_hex(8)
        wall = (time.monotonic() - t0) / batch
        cpu = (load.proc_cpu_seconds(pid) - cpu0) / batch
        if i == 0:
            errors = answer.json().get("errors")
            batch = max(1, min(200, round(1.0 / max(wall, 1e-3))))
            continue  # the first warms the caches of the parser and validation
        walls.append(wall)
        cpus.append(cpu)
    return {
        "wall_ms": round(statistics.median(walls) * 1000, 2),
        "server_cpu_ms": round(statistics.median(cpus) * 1000, 2),
        "requests_per_figure": batch,
        "errors": [e.get("extensions", {}).get("code") for e in errors or []],
        "message": (errors or [{}])[0].get("message"),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.graphql_cost")
    p.add_argument("--database-url", default="postgresql://postgres@127.0.0.1:5432")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--output", type=Path, default=ROOT / "bench/results/graphql_cost.json")
    args = p.parse_args(argv)
    base = args.database_url.rstrip("/")
    dbname = new_database_name()
    url = f"{base}/{dbname}"
    secret = secrets.token_urlsafe(48)
    env = child_env(url, secret)
    api = None
    write = None
    report: dict[str, Any] = {"command": "python -m bench.graphql_cost " + " ".join(argv or [])}
    try:
        from adapters.tokens import issue_token
        from infra.bootstrap import build_write_side
        from infra.migrate import ensure_database, migrate
        from infra.settings import Settings, db_logins

        log(f"database {dbname}: migrate and seed")
        ensure_database(url)
        migrate(url, logins=db_logins(Settings.load()))
        write = build_write_side(url, pool_size=2)
        seeded = seed(write)
        hostile_ws, hostile_owner = seed_hostile(write)
        write.close()
        write = None
        fill_read_models(url, env)
        port = free_port()
        api = subprocess.Popen([*agentworks_cli(), "serve", "--port", str(port)], env=env, cwd=ROOT)
        wait_healthy(f"http://127.0.0.1:{port}", api)

        def token(user: str, workspace: UUID) -> str:
            return issue_token(user_id=user, workspace_id=str(workspace), role="OWNER",
                               ttl_seconds=3600, secret=secret)  # fmt: skip

        cases: list[tuple[str, str, str, dict[str, Any]]] = [
            ("SPA board (baseline, 200 cards)", SPA_BOARD,
             token(seeded.user_id, seeded.workspace_id), {"id": str(seeded.project_id)}),
        ]  # fmt: skip
        hostile_token = token(hostile_owner, hostile_ws)
        board_token = cases[0][2]
        cases += [
            (n, d, board_token, {"id": str(seeded.project_id)})
            for n, d in CARDS_OF_THE_BOARD.items()
        ]
        cases += [(n, d, hostile_token, {"ws": str(hostile_ws)}) for n, d in HOSTILE.items()]
        endpoint = f"http://127.0.0.1:{port}/graphql"
        results = []
        with httpx.Client(timeout=300) as client:
            for name, document, bearer, variables in cases:
                cost, admitted = estimate(document, variables)
                row: dict[str, Any] = {"document": name, "estimate": cost, "admitted": admitted}
                row |= measure(client, endpoint, bearer, api.pid, document, variables,
                               args.repeats)  # fmt: skip
                results.append(row)
                log(json.dumps(row))
        report["results"] = results
        print(f"\n{'document':50} {'estimate':>9} {'up front':>8} {'wall ms':>9} {'CPU ms':>9}")
        for r in results:
            print(
                f"{r['document']:50} {r['estimate']:>9} {r['admitted']!s:>8}"
                f" {r.get('wall_ms', '-'):>9} {r.get('server_cpu_ms', '-'):>9}"
                f"  {' '.join(c or '?' for c in r.get('errors', []))}"
            )
    finally:
        if api is not None:
            stop(api)
        if write is not None:
            write.close()
        drop_database(base, dbname)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
