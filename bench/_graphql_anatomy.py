"""In-process evidence for ``bench.graphql``: which SQL the board query sends, and where one
request's time goes when nothing else competes for the event loop.

Everything here runs in the benchmark's own process against the seeded database, with the API's
own objects (``ApiRuntime``, ``RequestContext``, ``build_schema``, the DataLoaders), sequentially:

* :func:`capture_statements` records the SQL text of every statement one board query runs
  (by wrapping ``read_api.db.CountingCursor.execute`` in this process only);
* :func:`anatomy` times ``schema.execute`` of the board query as configured, next to the same
  schema with strawberry's ``ParserCache``/``ValidationCache`` (as-is and with validation rules
  that stay the same class across requests, so the cache can hit), parse + validate alone,
  the ``selects()`` helper ``Lane.cards`` calls, JSON rendering, and the plain baseline's
  ``read_board`` (same rows, no GraphQL).
"""

from __future__ import annotations

import asyncio
import gc
import json
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from uuid import UUID

import strawberry
from graphql import parse, validate
from strawberry.extensions import (
    AddValidationRules,
    MaxAliasesLimiter,
    MaxTokensLimiter,
    ParserCache,
    QueryDepthLimiter,
    ValidationCache,
)
from strawberry.schema.config import StrawberryConfig
from strawberry.schema.schema import StrawberryGraphQLCoreExecutionContext
from strawberry.types.graphql import OperationType

from adapters.postgres import API_ROLE, make_pool
from read_api import types as api_types
from read_api.auth import authenticate
from read_api.broadcast import LocalBroadcaster
from read_api.context import RequestContext
from read_api.db import CountingCursor
from read_api.errors import ErrorShaping
from read_api.execution import LeafShortcutExecution
from read_api.limits import CostLimiter, SubscriptionsOnlyOverWebSocket
from read_api.mutation import Mutation
from read_api.query import Query
from read_api.runtime import ApiRuntime
from read_api.scalars import SCALARS
from read_api.schema import AgentWorksSchema, build_schema
from read_api.services import ApiServices, JwtVerification, QueryLimits, RateLimits
from read_api.subscription import Subscription

if TYPE_CHECKING:
    from commands.handlers import AgentWorks

_HTTP = frozenset({OperationType.QUERY, OperationType.MUTATION})


def normalise(sql: str) -> str:
    return re.sub(r"\s+", " ", sql).strip()


@dataclass
class InProcess:
    services: ApiServices
    runtime: ApiRuntime
    principal: Any
    query: str
    variables: dict[str, Any]

    async def execute(self, schema: strawberry.Schema) -> Any:
        context = RequestContext(self.runtime, request_id="anatomy", traceparent="")
        context.authenticate(self.principal)
        try:
            result = await schema.execute(
                self.query,
                variable_values=self.variables,
                context_value=context,
                allowed_operation_types=_HTTP,
            )
        finally:
            await context.close()
        if result.errors:
            raise RuntimeError(f"board query failed in-process: {result.errors}")
        return result


def open_in_process(
    url: str, write: AgentWorks, secret: str, token: str, query: str, variables: dict[str, Any]
) -> InProcess:
    services = ApiServices(
        write=write,
        pool=make_pool(url, role=API_ROLE, max_size=4, name="bench-anatomy"),
        jwt=JwtVerification(secret=secret),
        broadcaster=LocalBroadcaster(),
        rate_limits=RateLimits(per_user_per_minute=None, per_workspace_per_minute=None),
    )
    runtime = ApiRuntime.build(services)
    principal = authenticate(f"Bearer {token}", services.jwt)
    return InProcess(services, runtime, principal, query, variables)


def close_in_process(ip: InProcess) -> None:
    ip.runtime.offloader.shutdown()
    ip.services.pool.close()


def capture_statements(ip: InProcess, loop: asyncio.AbstractEventLoop) -> list[str]:
    """The SQL the API runs for one board query, in order (this process only)."""
    seen: list[str] = []
    original = CountingCursor.execute

    def recording(self: CountingCursor, *args: Any, **kwargs: Any) -> CountingCursor:
        seen.append(normalise(str(args[0] if args else kwargs.get("query"))))
        return original(self, *args, **kwargs)

    CountingCursor.execute = recording  # type: ignore[method-assign]
    try:
        loop.run_until_complete(ip.execute(build_schema(ip.services.query_limits)))
    finally:
        CountingCursor.execute = original  # type: ignore[method-assign]
    return seen


def _schema_variant(limits: QueryLimits, *, caches: bool, stable_rules: bool) -> strawberry.Schema:
    """``read_api.schema.build_schema``'s schema, plus parser/validation caches (bench only).

    ``QueryDepthLimiter`` and ``MaxAliasesLimiter`` make a new validation-rule *class* each time
    they are constructed, i.e. on every request with the factories ``build_schema`` uses, and
    ``ValidationCache`` keys on the rules, so it only hits when the rules are built once
    (``stable_rules``) and each request gets an ``AddValidationRules`` of those same classes.
    """
    rules = (
        *QueryDepthLimiter(max_depth=limits.max_depth).validation_rules,
        *MaxAliasesLimiter(max_alias_count=limits.max_aliases).validation_rules,
    )
    limiters: list[Any] = (
        [lambda: AddValidationRules(list(rules))]
        if stable_rules
        else [
            lambda: QueryDepthLimiter(max_depth=limits.max_depth),
            lambda: MaxAliasesLimiter(max_alias_count=limits.max_aliases),
        ]
    )
    extensions: list[Any] = [
        ErrorShaping,
        SubscriptionsOnlyOverWebSocket,
        *limiters,
        lambda: MaxTokensLimiter(max_token_count=limits.max_tokens),
        lambda: CostLimiter(max_cost=limits.max_cost),
    ]
    if caches:
        extensions += [lambda: ParserCache(maxsize=128), lambda: ValidationCache(maxsize=128)]
    return AgentWorksSchema(
        query=Query,
        mutation=Mutation,
        subscription=Subscription,
        extensions=extensions,
        config=StrawberryConfig(scalar_map=SCALARS),
        execution_context_class=LeafShortcutExecution,
    )


def _without_leaf_shortcut(limits: QueryLimits) -> strawberry.Schema:
    """The configured schema executed by strawberry's own execution context."""
    schema = build_schema(limits)
    schema.execution_context_class = StrawberryGraphQLCoreExecutionContext
    return schema


def validation_cache_info() -> dict[str, int]:
    from strawberry.extensions.validation_cache import _get_validate_cache

    info = _get_validate_cache(128).cache_info()
    return {"hits": info.hits, "misses": info.misses}


def _per_call_ms(fn: Callable[[], Any], n: int) -> float:
    """CPU milliseconds per call, all threads of this process (the DataLoaders' queries run on
    the API's worker threads); CPU rather than wall time, since other work shares the machine.

    The collector starts each block empty-handed: otherwise a block pays for the garbage of the
    variant measured before it, and whichever variant comes last in the rotation looks slower."""
    gc.collect()
    t0 = time.process_time()
    for _ in range(n):
        fn()
    return (time.process_time() - t0) / n * 1000


def anatomy(
    ip: InProcess,
    loop: asyncio.AbstractEventLoop,
    *,
    read_board: Callable[..., Any],
    workspace_id: UUID,
    user_id: str,
    project_id: UUID,
    blocks: int = 6,
    per_block: int = 10,
) -> dict[str, Any]:
    """Sequential in-process CPU ms per board request (medians of interleaved blocks)."""
    limits = ip.services.query_limits
    variants = {
        "execute_as_configured": build_schema(limits),
        "execute_with_parser_and_validation_cache": _schema_variant(
            limits, caches=True, stable_rules=False
        ),
        "execute_with_caches_and_rules_built_once": _schema_variant(
            limits, caches=True, stable_rules=True
        ),
        "execute_without_leaf_shortcut": _without_leaf_shortcut(limits),
    }
    plain_pool = ip.services.pool

    def plain() -> Any:
        return read_board(plain_pool, workspace_id, user_id, project_id)

    def run(schema: strawberry.Schema) -> Any:
        return loop.run_until_complete(ip.execute(schema))

    for schema in variants.values():  # warm up: pools, caches, lazily built things
        for _ in range(3):
            run(schema)
    for _ in range(3):
        plain()

    samples: dict[str, list[float]] = {name: [] for name in variants}
    samples["plain_read_board"] = []
    selects_ms: list[float] = []
    original_selects = api_types.selects
    spent = [0.0]

    def timed_selects(info: Any, path: tuple[str, ...]) -> bool:
        t0 = time.thread_time()
        try:
            return original_selects(info, path)
        finally:
            spent[0] += time.thread_time() - t0

    cache_use: dict[str, dict[str, int]] = {name: {"hits": 0, "misses": 0} for name in variants}
    for _ in range(blocks):
        for name, schema in variants.items():
            before = validation_cache_info()
            samples[name].append(_per_call_ms(lambda schema=schema: run(schema), per_block))
            after = validation_cache_info()
            for key in ("hits", "misses"):
                cache_use[name][key] += after[key] - before[key]
        samples["plain_read_board"].append(_per_call_ms(plain, per_block))
        api_types.selects = timed_selects  # Lane.cards looks it up in read_api.types
        try:
            spent[0] = 0.0
            run(variants["execute_as_configured"])
            selects_ms.append(spent[0] * 1000)
        finally:
            api_types.selects = original_selects

    result = run(variants["execute_as_configured"])
    payload = {"data": result.data}
    graphql_schema = variants["execute_as_configured"]._schema  # type: ignore[attr-defined]
    document = parse(ip.query)
    out: dict[str, Any] = {name: statistics.median(v) for name, v in samples.items()}
    out["parse_only"] = _per_call_ms(lambda: parse(ip.query), 50)
    out["validate_only_standard_rules"] = _per_call_ms(
        lambda: validate(graphql_schema, document), 50
    )
    out["selects_in_lane_cards"] = statistics.median(selects_ms)
    out["json_render"] = _per_call_ms(
        lambda: json.dumps(
            payload, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":")
        ),
        50,
    )
    out["validation_cache_use"] = cache_use
    out["blocks"] = blocks
    out["per_block"] = per_block
    return out


#: (label, file fragment, function name) of the functions whose calls per request tell how much
#: work the executor does for one board.
_COUNTED = (
    ("graphql-core Executor.execute_field (one per field of every object)",
     "graphql/execution/executor.py", "execute_field"),
    ("graphql-core Executor.complete_value (one per value, lists and objects included)",
     "graphql/execution/executor.py", "complete_value"),
    ("strawberry build_resolve_info (an Info per field)", "strawberry/schema/schema.py",
     "build_resolve_info"),
    ("strawberry StrawberryField.get_result (field resolver wrapper)", "strawberry/types/field.py",
     "get_result"),
    ("read_api Card.from_row", "read_api/types.py", "from_row"),
    ("read_api AgentRun.from_summary", "read_api/types.py", "from_summary"),
)  # fmt: skip


#: (category, path fragments) for the in-process profile's self time, first match wins.
_FILE_CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("GraphQL validation and query limits",
     ("graphql/validation/", "graphql/utilities/type_info.py", "graphql/language/visitor.py",
      "strawberry/extensions/", "read_api/limits.py")),
    ("GraphQL parsing", ("graphql/language/",)),
    ("our resolvers, loaders, scalars (read_api/, domain/)",
     ("read_api/", "domain/", "strawberry/dataloader.py", "/uuid.py", "/json/", "/base64.py")),
    ("GraphQL execution (graphql-core executor, strawberry field wrappers)",
     ("graphql/", "strawberry/")),
    ("psycopg (on the event-loop thread)", ("psycopg",)),
    ("asyncio event loop, thread hand-offs", ("asyncio/", "concurrent/", "threading.py",
                                               "selectors.py")),
)  # fmt: skip


def _category(path: str) -> str:
    for category, fragments in _FILE_CATEGORIES:
        if any(fragment in path for fragment in fragments):
            return category
    return "other"


def call_counts(ip: InProcess, loop: asyncio.AbstractEventLoop, n: int = 10) -> dict[str, Any]:
    """cProfile (CPU clock) of ``n`` board queries in-process, event-loop thread only: how many
    calls of the executor's per-field functions one board costs, and the self time by category
    (built-ins such as ``isinstance`` charged to their callers). cProfile's per-call overhead
    inflates code made of many tiny calls (the executor) more than the rest: read the shares as
    a second opinion next to py-spy's, not as milliseconds."""
    import cProfile
    import pstats

    schema = build_schema(ip.services.query_limits)
    for _ in range(2):
        loop.run_until_complete(ip.execute(schema))
    profiler = cProfile.Profile(time.process_time)
    profiler.enable()
    for _ in range(n):
        loop.run_until_complete(ip.execute(schema))
    profiler.disable()
    raw: dict[Any, Any] = pstats.Stats(profiler).stats  # type: ignore[attr-defined]

    def calls(fragment: str, name: str) -> int:
        return sum(
            nc
            for (path, _line, func), (_cc, nc, _tt, _ct, _callers) in raw.items()
            if func == name and fragment in path
        )

    by_category: dict[str, float] = {}
    total = 0.0
    for (path, _line, _func), (_cc, _nc, tt, _ct, callers) in raw.items():
        total += tt
        if path == "~" and callers:  # a built-in: charge its callers, pro rata
            spent = sum(v[2] for v in callers.values()) or 1.0
            for (caller_path, _l, _f), v in callers.items():
                category = _category(caller_path)
                by_category[category] = by_category.get(category, 0.0) + tt * v[2] / spent
        else:
            category = _category(path)
            by_category[category] = by_category.get(category, 0.0) + tt
    shares = sorted(by_category.items(), key=lambda kv: -kv[1])
    return {
        "requests": n,
        "calls_per_request": {
            label: round(calls(fragment, name) / n) for label, fragment, name in _COUNTED
        },
        "self_time_pct_by_category": [[k, round(v / max(total, 1e-9) * 100, 1)] for k, v in shares],
    }


def micro(pool: Any, workspace_id: UUID, project_id: UUID, n: int = 20) -> dict[str, float]:
    """CPU ms per board of the per-card Python work ``Lane.cards`` does, on the real rows."""
    from domain.money import format_usd
    from projections.columns import CARD_SELECT, RUN_SELECT
    from projections.runs_queries import RunSummary
    from read_api import cursors

    with pool.connection() as conn:
        conn.execute("SELECT set_config('agentworks.workspace_id', %s, true)", (str(workspace_id),))
        cards = [dict(r) for r in conn.execute(
            f"SELECT {CARD_SELECT} FROM rm_cards WHERE project_id = %s", (project_id,)
        ).fetchall()]  # fmt: skip
        ids = [c["last_run_id"] for c in cards if c["last_run_id"] is not None]
        runs = [dict(r) for r in conn.execute(
            f"SELECT {RUN_SELECT} FROM rm_runs WHERE run_id = ANY(%s)", (ids,)
        ).fetchall()]  # fmt: skip
        conn.rollback()
    return {
        "cards": len(cards),
        "runs": len(runs),
        "Card.from_row_all_cards": _per_call_ms(
            lambda: [api_types.Card.from_row(c, None) for c in cards],  # type: ignore[arg-type]
            n,
        ),
        "AgentRun.from_summary_all_last_runs": _per_call_ms(
            lambda: [api_types.AgentRun.from_summary(RunSummary.from_row(r)) for r in runs], n
        ),
        "card_cursor_all_cards": _per_call_ms(
            lambda: [cursors.card_cursor(c["position"], c["card_id"]) for c in cards], n
        ),
        "format_usd_all_cards": _per_call_ms(
            lambda: [format_usd(int(c["cost_micros"])) for c in cards], n
        ),
    }
