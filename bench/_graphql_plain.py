"""The baseline of ``bench.graphql``: a plain FastAPI JSON endpoint that reads the same rows.

``POST /board`` with ``{"projectId": ...}`` and the same bearer token answers the same JSON
document as the benchmarked GraphQL board query (``data.board.lanes[].cards.edges[].node``),
byte for byte, and reads it the way the API does:

* the token is verified by the API's own ``read_api.auth.authenticate``;
* a connection of the API-role pool (``adapters.postgres.make_pool``, role ``agentworks_api``,
  the API's pool size), one transaction with ``agentworks.workspace_id`` set, so row-level
  security scopes every row, the membership check, then the statements the API's DataLoaders
  run (:data:`STATEMENTS`, checked by ``bench.graphql`` against what the API sends), then a
  rollback, as ``read_api.db.ReadScope`` does;
* the blocking part runs on a 32-thread executor, like the API's ``Offloader``; money is
  formatted by ``domain.money.format_usd``; the body is rendered by Starlette's ``JSONResponse``;
* it is served by ``infra.stack.serve_app``, the uvicorn configuration of ``agentworks serve``.

What it leaves out is exactly the GraphQL layer: parsing and validating the document, the
executor, resolvers, DataLoaders, one thread hop per statement instead of one per request.

Run as ``python -m bench._graphql_plain --port P`` with ``AGENTWORKS_DATABASE_URL`` and
``AGENTWORKS_JWT_SECRET`` set (``bench.graphql`` does this).
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any
from uuid import UUID

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from adapters.postgres import API_ROLE, make_pool
from domain.errors import Unauthenticated
from domain.money import format_usd
from projections.kanban_queries import (
    LANE_CARDS_SQL,
    LANES_SQL,
    MEMBER_SQL,
    PROJECTS_SQL,
    SCOPE_SQL,
)
from projections.runs_queries import RUNS_SQL
from read_api.auth import authenticate, workspace_uuid
from read_api.services import JwtVerification

if TYPE_CHECKING:
    from psycopg import Connection
    from psycopg.rows import DictRow
    from psycopg_pool import ConnectionPool

#: What one board read sends, in order: the API's own statements; ``bench.graphql`` checks the
#: API sends these, in this order.
STATEMENTS = (SCOPE_SQL, MEMBER_SQL, PROJECTS_SQL, LANES_SQL, LANE_CARDS_SQL, RUNS_SQL)

PAGE = 100  # cards(first: 100); the API reads one more row to know hasNextPage
STATEMENT_TIMEOUT_MS = "10000"  # ApiServices.statement_timeout_ms


def _error(message: str, code: str, status: int) -> JSONResponse:
    return JSONResponse({"errors": [{"message": message, "extensions": {"code": code}}]}, status)


def read_board(
    pool: ConnectionPool[Connection[DictRow]], workspace_id: UUID, user_id: str, project_id: UUID
) -> dict[str, Any] | None:
    """The board's JSON (``data.board`` of the GraphQL answer), read as ``ReadScope`` reads."""
    conn = pool.getconn()
    try:
        conn.execute(SCOPE_SQL, (str(workspace_id), STATEMENT_TIMEOUT_MS))
        if conn.execute(MEMBER_SQL, (workspace_id, user_id)).fetchone() is None:
            return None
        if not conn.execute(PROJECTS_SQL, ([project_id],)).fetchall():
            return None
        lanes = conn.execute(LANES_SQL, ([project_id],)).fetchall()
        n = len(lanes)
        rows = conn.execute(
            LANE_CARDS_SQL,
            ([project_id] * n, [lane["name"] for lane in lanes], [None] * n, [None] * n,
             [PAGE + 1] * n),
        ).fetchall()  # fmt: skip
        pages: dict[int, list[DictRow]] = defaultdict(list)
        for row in rows:
            pages[row["page_index"]].append(row)
        run_ids = [
            row["last_run_id"]
            for i in range(1, n + 1)
            for row in pages[i][:PAGE]
            if row["last_run_id"] is not None
        ]
        runs = {r["run_id"]: r for r in conn.execute(RUNS_SQL, (run_ids,)).fetchall()}
    finally:
        conn.rollback()
        pool.putconn(conn)

    def node(card: DictRow) -> dict[str, Any]:
        run = runs.get(card["last_run_id"]) if card["last_run_id"] is not None else None
        return {
            "id": str(card["card_id"]),
            "title": card["title"],
            "position": card["position"],
            "assignee": card["assignee"],
            "labels": list(card["labels"] or []),
            "lastRun": None if run is None else {"status": run["status"]},
            "cost": format_usd(int(card["cost_micros"])),
        }

    return {
        "lanes": [
            {
                "name": lane["name"],
                "wipLimit": lane["wip_limit"],
                "count": int(lane["card_count"]),
                "cards": {"edges": [{"node": node(c)} for c in pages[i + 1][:PAGE]]},
            }
            for i, lane in enumerate(lanes)
        ]
    }


def create_plain_app(database_url: str, secret: str, pool_size: int) -> FastAPI:
    pool = make_pool(database_url, role=API_ROLE, max_size=pool_size, name="plain")
    executor = ThreadPoolExecutor(max_workers=32, thread_name_prefix="plain-io")
    verification = JwtVerification(secret=secret)

    async def board(request: Request) -> Response:
        try:
            principal = authenticate(request.headers.get("authorization"), verification)
        except Unauthenticated as error:
            return _error(error.message, "UNAUTHENTICATED", 401)
        workspace_id = workspace_uuid(principal)
        try:
            project_id = UUID(str(json.loads(await request.body())["projectId"]))
        except (ValueError, KeyError, TypeError):
            return _error('send {"projectId": UUID}', "VALIDATION", 400)
        if workspace_id is None:
            return JSONResponse({"data": {"board": None}})
        data = await asyncio.get_running_loop().run_in_executor(
            executor, read_board, pool, workspace_id, principal.user_id, project_id
        )
        return JSONResponse({"data": {"board": data}})

    async def alive() -> Response:
        return JSONResponse({"status": "ok"})

    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    app.add_api_route("/board", board, methods=["POST"], include_in_schema=False)
    app.add_api_route("/healthz", alive, methods=["GET"], include_in_schema=False)
    return app


def main(argv: list[str] | None = None) -> int:
    from infra.settings import Settings, jwt_keys
    from infra.stack import serve_app

    parser = argparse.ArgumentParser(prog="python -m bench._graphql_plain")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    settings = Settings.load()
    if settings.database_url is None:
        raise SystemExit("AGENTWORKS_DATABASE_URL is not set")
    keys = jwt_keys(settings, data_dir=settings.data_dir)
    if keys.secret is None:
        raise SystemExit("the baseline verifies HS256 tokens; set AGENTWORKS_JWT_SECRET")
    app = create_plain_app(settings.database_url, keys.secret, settings.api_pool_size)
    serve_app(app, host=args.host, port=args.port)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
