"""The HTTP face of AgentWorks: GraphQL at ``/graphql``, health at ``/healthz`` and ``/readyz``,
Prometheus metrics at ``/metrics``.

``POST /graphql`` runs queries and mutations; ``GET /graphql`` upgraded to a WebSocket with the
``graphql-transport-ws`` subprotocol runs subscriptions. Before a POST runs: the body size is
checked (413), the bearer token verified (401), the caller's rate limits counted (429), the body
parsed (400), and with ``X-Consistency-Token`` the read models awaited. Every refusal is a
GraphQL-shaped body ``{"errors": [{"message", "extensions": {"code"}}]}``; a 500 only ever comes
from a bug and says nothing about it but the request id.

Observability: every GraphQL request runs in a span that continues the caller's ``traceparent``
(the commands it sends carry that trace into the events, the relay and the projectors), with
``request_id``/``correlation_id`` bound to every log line it causes; every HTTP response is
counted by status (``agentworks_http_responses_total``).

Build it with :func:`create_app`; run it with uvicorn (``read_api.testing`` for tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import json
import re
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractContextManager
from datetime import timedelta
from http import HTTPStatus
from typing import Any

import structlog
from fastapi import FastAPI
from fastapi.routing import APIWebSocketRoute
from graphql import GraphQLError
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import HTTPConnection, Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starlette.websockets import WebSocket
from strawberry import Schema
from strawberry.exceptions import ConnectionRejectionError, MissingQueryError
from strawberry.fastapi import GraphQLRouter
from strawberry.schema.exceptions import (
    CannotGetOperationTypeError,
    InvalidOperationTypeError,
)
from strawberry.subscriptions import GRAPHQL_TRANSPORT_WS_PROTOCOL
from strawberry.types.execution import ExecutionResult, PreExecutionError
from strawberry.types.graphql import OperationType
from strawberry.types.unset import UnsetType
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from adapters.metrics import HTTP_RESPONSES, Exposition
from adapters.outages import is_database_error
from adapters.telemetry import continue_trace, current_traceparent
from adapters.tokens import Principal
from domain.errors import (
    AgentWorksError,
    RateLimited,
    Unauthenticated,
    Unavailable,
    ValidationFailed,
)
from domain.text import text_problem
from projections import progress_queries
from read_api.access import api_key_principal, is_api_key
from read_api.auth import (
    authenticate,
    bearer_token,
    request_id,
    token_from_connection_params,
    traceparent,
)
from read_api.consistency import ConsistencyToken
from read_api.context import RequestContext
from read_api.errors import (
    INTERNAL_MESSAGE,
    RATE_LIMITED,
    UNAUTHENTICATED,
    UNAVAILABLE,
    VALIDATION,
    error_body,
    error_extensions,
    outage_of,
    retry_after,
    shape_errors,
)
from read_api.identity import add_auth_routes
from read_api.input_checks import (
    BodyTooSlow,
    NotJson,
    body_within,
    closing,
    require_json,
    variables_problem,
)
from read_api.membership import member_workspace_of
from read_api.ratelimit import address_limits, cost_limits_for, limits_for
from read_api.response_cache import Entry, Key, ResponseCache, render
from read_api.runtime import ApiRuntime
from read_api.schema import build_schema
from read_api.services import ApiServices, RequestStats
from read_api.subscription_limits import UnsignedSocketsPerAddress, signed_in
from read_api.transport_ws import LimitedTransportWSHandler
from read_api.webhooks import STRIPE_WEBHOOK_PATH, StripeWebhook

log = structlog.get_logger(__name__)

GRAPHQL_PATH = "/graphql"
METRICS_PATH = "/metrics"
_HTTP_OPERATIONS = frozenset({OperationType.QUERY, OperationType.MUTATION})
_HEALTH_TIMEOUT = 2.0
_UVICORN_WS_MAX_SIZE = 16 * 1024 * 1024


def create_app(services: ApiServices) -> FastAPI:
    """The API application over ``services``.

    On shutdown the app closes what lives in its event loop: the broadcaster and the
    ``services.redis`` client (asyncio clients belong to the loop that used them), and its worker
    threads. The write side and the pool are the composition root's to close.
    """
    runtime = ApiRuntime.build(services)
    schema = build_schema(services.query_limits)
    cache = ResponseCache(
        schema._schema,
        max_entries=services.response_cache_entries,
        max_bytes=services.response_cache_bytes,
    )

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await runtime.key_uses.aclose()
            with contextlib.suppress(RedisError, OSError):
                await services.broadcaster.aclose()
            if services.redis is not None:
                with contextlib.suppress(RedisError, OSError):
                    await services.redis.aclose()
            runtime.offloader.shutdown()

    app = _AgentWorksApi(
        title="AgentWorks API",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.runtime = runtime
    app.state.response_cache = cache
    if services.cors_origins or services.cors_origin_regex:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(services.cors_origins),
            allow_origin_regex=services.cors_origin_regex,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_credentials=True,  # the aw_refresh cookie of /auth/refresh
            allow_headers=[
                "Authorization",
                "Content-Type",
                "X-Consistency-Token",
                "X-Request-Id",
                "traceparent",
            ],
            expose_headers=["Retry-After", "X-Request-Id"],
            max_age=600,
        )

    if services.max_unsigned_websockets_per_address is not None:
        app.add_middleware(
            UnsignedSocketsPerAddress, most=services.max_unsigned_websockets_per_address
        )
    if services.trusted_proxies:
        # Only these proxies may say who the client is (rate limits count per client address).
        app.add_middleware(ProxyHeadersMiddleware, trusted_hosts=list(services.trusted_proxies))

    endpoint = GraphQLEndpoint(runtime, schema, cache)
    app.add_api_route(GRAPHQL_PATH, endpoint.post, methods=["POST"], include_in_schema=False)
    app.add_api_route(GRAPHQL_PATH, endpoint.get, methods=["GET"], include_in_schema=False)
    app.include_router(SubscriptionRouter(runtime, schema))
    if services.auth is not None:
        add_auth_routes(app, runtime, services.auth)

    health = Health(runtime)
    app.add_api_route("/healthz", health.alive, methods=["GET"], include_in_schema=False)
    app.add_api_route("/readyz", health.ready, methods=["GET"], include_in_schema=False)
    metrics = Metrics(runtime)
    app.add_api_route(METRICS_PATH, metrics.scrape, methods=["GET"], include_in_schema=False)
    stripe_webhook = StripeWebhook(runtime)
    app.add_api_route(
        STRIPE_WEBHOOK_PATH, stripe_webhook.receive, methods=["POST"], include_in_schema=False
    )

    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
    return app


def max_websocket_message_bytes(app: FastAPI) -> int:
    """The largest WebSocket message the server may take in for ``app`` (uvicorn's
    ``ws_max_size``): its request body limit, as for a POST. uvicorn's default, 16 MiB, is read
    in whole (and its variables parsed) before the app could judge it."""
    runtime = getattr(app.state, "runtime", None)
    if isinstance(runtime, ApiRuntime):
        return runtime.services.max_body_bytes
    return _UVICORN_WS_MAX_SIZE


async def _authenticate(
    runtime: ApiRuntime, authorization: str | None, connection: HTTPConnection | None
) -> Principal:
    """The caller of a request; a request that fails counts against its address's limit, so
    guessing tokens ends in 429s (``RATE_LIMITED``) rather than an endless stream of 401s.

    An API key is looked up in the event store, so an address past its limit is refused before
    that (as a refresh is): a made-up key cost a read of the store however many were refused."""
    client = connection.client if connection is not None else None
    address = client.host if client is not None else None
    limits = address_limits(runtime.services.rate_limits, address)
    try:
        token = bearer_token(authorization)
        oidc = runtime.services.oidc
        if token is not None and oidc is not None and oidc.issued_here(token):
            return await runtime.offloader.run(oidc.principal, token)
        if token is not None and is_api_key(token):
            await runtime.limiter.check(limits)
            principal = await runtime.offloader.run(
                api_key_principal, runtime.services.write, token
            )
            runtime.key_uses.used(principal)
            return principal
        return authenticate(authorization, runtime.services.jwt)
    except Unauthenticated:
        await runtime.limiter.hit(limits)
        raise


# -- POST /graphql --------------------------------------------------------------------------------


class BadRequest(ValidationFailed):
    """A request the endpoint cannot read as one GraphQL operation (answered before any
    execution, with its own HTTP status: 400, 413 or 415)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class GraphQLEndpoint:
    """Queries and mutations over HTTP."""

    def __init__(self, runtime: ApiRuntime, schema: Schema, cache: ResponseCache) -> None:
        self.runtime = runtime
        self.services = runtime.services
        self.schema = schema
        self.cache = cache

    async def get(self, request: Request) -> Response:
        rid = request_id(request.headers.get("x-request-id"))
        if self.services.graphiql and "text/html" in request.headers.get("accept", ""):
            from strawberry.http.ides import get_graphql_ide_html

            return HTMLResponse(get_graphql_ide_html("graphiql"))
        return _json(
            error_body(
                "queries and mutations are POSTed as JSON; GET is for WebSocket subscriptions "
                "(subprotocol graphql-transport-ws)",
                VALIDATION,
            ),
            405,
            rid,
            extra_headers={"Allow": "POST"},
        )

    async def post(self, request: Request) -> Response:
        started = time.perf_counter()
        rid = request_id(request.headers.get("x-request-id"))
        # Every log line this request causes, here or in the threads it offloads to, says which
        # request it belongs to; the span puts it in the caller's trace.
        with (
            structlog.contextvars.bound_contextvars(request_id=rid, correlation_id=rid),
            _request_span(request) as span,
        ):
            response = await self._answer(request, rid, started, span)
            span.set_attribute("http.response.status_code", response.status_code)
            log.debug(
                "graphql.request",
                operation=getattr(request.state, "operation_name", None),
                status=response.status_code,
                duration_ms=round((time.perf_counter() - started) * 1000, 2),
            )
            return response

    async def _answer(self, request: Request, rid: str, started: float, span: Span) -> Response:
        body_read = False
        try:
            _check_declared_size(request, self.services.max_body_bytes)
            principal = await _authenticate(
                self.runtime, request.headers.get("authorization"), request
            )
            user_id, workspace_id = _counted_as(principal)
            rates = self.services.rate_limits
            await self.runtime.limiter.hit(
                limits_for(rates, user_id=user_id, workspace_id=workspace_id)
            )
            budgets = cost_limits_for(rates, user_id=user_id, workspace_id=workspace_id)
            await self.runtime.limiter.check(budgets)
            body = await _read_body(
                request, self.services.max_body_bytes, self.services.request_body_timeout_seconds
            )
            body_read = True
            query, variables, operation_name = _parse_request(
                body, request.headers.get("content-type")
            )
            request.state.operation_name = operation_name
            if operation_name:
                span.update_name(f"graphql {operation_name}")
                span.set_attribute("graphql.operation.name", operation_name)
            consistency = request.headers.get("x-consistency-token")
            token = ConsistencyToken.parse(consistency) if consistency else None
        except BadRequest as error:
            return _json(
                error_body(error.message, error.code),
                error.status,
                rid,
                extra_headers=closing({}, request, read=body_read),
            )
        except Unauthenticated as error:
            return _json(
                error_body(error.message, UNAUTHENTICATED),
                401,
                rid,
                extra_headers=closing(
                    {"WWW-Authenticate": 'Bearer realm="agentworks"'}, request, read=body_read
                ),
            )
        except RateLimited as error:
            retry = max(1, round(error.retry_after_seconds))
            return _json(
                error_body(error.message, RATE_LIMITED, retryAfter=retry),
                429,
                rid,
                extra_headers=closing({"Retry-After": str(retry)}, request, read=body_read),
            )
        except ValidationFailed as error:
            return _json(
                error_body(error.message, VALIDATION),
                400,
                rid,
                extra_headers=closing({}, request, read=body_read),
            )

        context = RequestContext(
            self.runtime,
            request_id=rid,
            # The request's span: commands sent by this request are its children.
            traceparent=current_traceparent(),
        )
        context.request = request
        context.authenticate(principal)
        hit: Entry | None = None
        try:
            waited_in = context.who.workspace_id
            if token is not None and waited_in is None and principal.is_user:
                waited_in = await self.runtime.offloader.run(
                    member_workspace_of, self.services.write, token.aggregate_id, principal.user_id
                )
            if token is not None and not await self.runtime.waiter.wait_for_token(token, waited_in):
                context.stale = True
            # After the wait: the version read next is then one that includes the token's write.
            key = self.cache.key(
                principal, context.who.workspace_id, query, variables, operation_name
            )
            version = None if key is None else await context.read_model_version()
            execute = functools.partial(
                self.schema.execute,
                query,
                variable_values=variables,
                context_value=context,
                operation_name=operation_name,
                allowed_operation_types=_HTTP_OPERATIONS,
            )
            if key is None or version is None:
                result = await execute()
            else:
                answer = await self.cache.serve(
                    key, version, execute, functools.partial(self._keep, key, version)
                )
                if isinstance(answer, Entry):
                    hit = answer
                else:
                    result = answer
        except InvalidOperationTypeError:
            return _json(
                error_body(
                    "subscriptions run over a WebSocket (GET /graphql, graphql-transport-ws)",
                    VALIDATION,
                ),
                400,
                rid,
            )
        except CannotGetOperationTypeError as error:
            return _json(error_body(error.as_http_error_reason(), VALIDATION), 400, rid)
        except MissingQueryError:
            return _json(error_body("the request has no query", VALIDATION), 400, rid)
        finally:
            await context.close()
            self._report(rid, operation_name, context, started)
            await self.runtime.limiter.charge(budgets, context.executed)

        if hit is not None:
            return _cached_response(hit, context.stale, rid)
        payload: dict[str, Any] = {}
        if not isinstance(result, PreExecutionError):
            payload["data"] = result.data
        wait = None
        if result.errors:
            shaped = shape_errors(result.errors)
            payload["errors"] = [error.formatted for error in shaped]
            # 503 when what was asked for is missing because of the outage; a mutation that
            # went through but whose payload object could not be read back stays a 200 (its
            # consistencyToken is the truth: the write happened).
            wait = retry_after([e for e in shaped if _lost_root(e, result.data)])
        extensions = dict(result.extensions or {})
        if context.stale:
            extensions["stale"] = True
        if extensions:
            payload["extensions"] = extensions
        if result.errors:
            span.set_attribute("graphql.error_count", len(result.errors))
        if wait is not None:
            # A dependency is down (or the pool full): an outage, answered as one.
            return _json(payload, 503, rid, extra_headers={"Retry-After": str(wait)})
        return _json(payload, 200, rid)

    def _keep(
        self, key: Key, version: str, result: ExecutionResult | PreExecutionError
    ) -> Entry | None:
        if not _cacheable_result(result):
            return None
        return self.cache.put(key, version, result.data, result.extensions or {})

    def _report(
        self, rid: str, operation: str | None, context: RequestContext, started: float
    ) -> None:
        hook = self.services.stats_hook
        if hook is None:
            return
        try:
            hook(
                RequestStats(
                    request_id=rid,
                    operation_name=operation,
                    statements=context.counter.count,
                    duration_ms=(time.perf_counter() - started) * 1000,
                    executed=context.executed,
                )
            )
        except Exception:
            log.exception("api.stats_hook_failed")


def _cacheable_result(result: ExecutionResult | PreExecutionError) -> bool:
    """Only complete answers are kept: errors (refusals, outages) are produced afresh."""
    return not isinstance(result, PreExecutionError) and not result.errors and bool(result.data)


def _cached_response(entry: Entry, stale: bool, rid: str) -> Response:
    """The answer an execution would render (same bytes as :func:`_json` of its payload)."""
    extensions = dict(entry.extensions)
    if stale:
        extensions["stale"] = True
    body = b'{"data":' + entry.data
    if extensions:
        body += b',"extensions":' + render(extensions)
    return Response(
        body + b"}", status_code=200, media_type="application/json", headers={"X-Request-Id": rid}
    )


def _lost_root(error: GraphQLError, data: dict[str, Any] | None) -> bool:
    """Whether ``error`` took the root field it belongs to (or the whole result) with it."""
    if not data or not error.path:
        return True
    return data.get(str(error.path[0])) is None


def _request_span(request: Request) -> AbstractContextManager[Span]:
    """The span of one GraphQL request.

    It is the request's server span, continuing the caller's ``traceparent``, unless the
    framework already opened one (FastAPI's own telemetry does once an SDK tracer provider is
    installed): then it hangs below that span rather than start a second server span. Without an
    SDK it records nothing, yet still carries the caller's ``traceparent`` on to the commands.
    """
    attributes = {"http.request.method": "POST", "url.path": GRAPHQL_PATH}
    if trace.get_current_span().get_span_context().is_valid:
        return continue_trace("graphql", None, attributes=attributes)
    return continue_trace(
        "graphql",
        traceparent(request.headers.get("traceparent")) or None,
        kind=SpanKind.SERVER,
        attributes=attributes,
    )


def _check_declared_size(request: Request, limit: int) -> None:
    declared = request.headers.get("content-length")
    if declared is None:
        return
    try:
        size = int(declared)
    except ValueError:
        raise BadRequest("Content-Length is not a number") from None
    if size > limit:
        raise BadRequest(f"request body exceeds {limit} bytes", status=413)


async def _read_body(request: Request, limit: int, seconds: float) -> bytes:
    try:
        body = await body_within(request, limit, seconds=seconds)
    except BodyTooSlow as slow:
        raise BadRequest(slow.message, status=408) from None
    if body is None:
        raise BadRequest(f"request body exceeds {limit} bytes", status=413)
    return body


def _parse_request(
    body: bytes, content_type: str | None
) -> tuple[str, dict[str, Any] | None, str | None]:
    try:
        require_json(content_type)
    except NotJson as error:
        raise BadRequest(error.message, status=415) from None
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        raise BadRequest("the request body is not valid JSON") from None
    if isinstance(data, list):
        raise BadRequest("batched requests are not supported; send one operation per request")
    if not isinstance(data, dict):
        raise BadRequest("the request body must be a JSON object with a 'query'")
    query = data.get("query")
    if not isinstance(query, str) or not query.strip():
        raise BadRequest("the request needs a 'query' string")
    variables = data.get("variables")
    if variables is not None and not isinstance(variables, dict):
        raise BadRequest("'variables' must be a JSON object")
    if (problem := variables_problem(variables)) is not None:
        raise BadRequest(problem)
    operation_name = data.get("operationName")
    if operation_name is not None and not isinstance(operation_name, str):
        raise BadRequest("'operationName' must be a string")
    if operation_name is not None and (problem := text_problem(operation_name)) is not None:
        # graphql-core would echo it in "Unknown operation named ..." and a lone surrogate
        # cannot be encoded into the response.
        raise BadRequest(f"'operationName' {problem}")
    return query, variables, operation_name


def _json(
    payload: Mapping[str, Any],
    status: int,
    rid: str,
    *,
    extra_headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    headers = {"X-Request-Id": rid, **(extra_headers or {})}
    return JSONResponse(dict(payload), status_code=status, headers=headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own refusals (no such route, a method a route does not take), in the error
    shape of where they were sent: ``{"error": ...}`` under /auth, as API.md has sign-in
    answer, else GraphQL's. Their messages say which method and path, and what it takes."""
    status = exc.status_code if isinstance(exc, StarletteHTTPException) else 500
    detail = str(exc.detail) if isinstance(exc, StarletteHTTPException) else "error"
    headers = dict(getattr(exc, "headers", None) or {})
    code = {401: UNAUTHENTICATED, 404: "NOT_FOUND", 429: RATE_LIMITED}.get(status, VALIDATION)
    asked = f"{request.method} {request.url.path[:200]}"
    if status == 404 and detail == HTTPStatus.NOT_FOUND.phrase:
        detail = f"{asked}: this API has no such route"
    elif status == 405 and detail == HTTPStatus.METHOD_NOT_ALLOWED.phrase and "Allow" in headers:
        detail = f"{asked}: this route takes {headers['Allow']}"
    if request.url.path.startswith("/auth/"):
        body: dict[str, Any] = {"error": {"code": code, "message": detail}}
    else:
        body = error_body(detail, code)
    return _json(
        body, status, request_id(request.headers.get("x-request-id")), extra_headers=headers
    )


def unavailable_response(error: Unavailable, rid: str) -> JSONResponse:
    """HTTP 503 with ``Retry-After``: how every outage is answered outside GraphQL execution."""
    extensions = error_extensions(error)
    body = error_body(
        error.message, UNAVAILABLE, **{k: v for k, v in extensions.items() if k != "code"}
    )
    return _json(body, 503, rid, extra_headers={"Retry-After": str(extensions["retryAfter"])})


async def _unexpected(request: Request, exc: Exception) -> Response:
    rid = request_id(request.headers.get("x-request-id"))
    outage = outage_of(exc)
    if outage is not None:
        # Said once by the pool that saw it go (adapters.outages), not once per request.
        log.debug("api.unavailable", request_id=rid, error=str(exc))
        return unavailable_response(outage, rid)
    log.error("api.unexpected", request_id=rid, exc_info=exc)
    return _json(error_body(INTERNAL_MESSAGE, "INTERNAL"), 500, rid)


# -- metrics --------------------------------------------------------------------------------------


class _AgentWorksApi(FastAPI):
    """FastAPI with :class:`CountResponses` outside its whole middleware stack.

    Outermost, so that responses sent by Starlette's server-error middleware (the 500 and 503 of
    the catch-all handler) are counted too.
    """

    def build_middleware_stack(self) -> ASGIApp:
        return CountResponses(super().build_middleware_stack())


class CountResponses:
    """ASGI middleware counting every HTTP response by status code."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                HTTP_RESPONSES.labels(str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)


class Metrics:
    """``GET /metrics``: Prometheus text exposition; behind a bearer token when the deployment
    set one (the health checks stay open: a load balancer probes them without credentials).

    Process-wide metrics (command latency, events appended, HTTP statuses) and, when the
    composition root gave one, the lag collector of this deployment's database.
    """

    def __init__(self, runtime: ApiRuntime) -> None:
        self.runtime = runtime
        collector = runtime.services.lag_collector
        self.exposition = Exposition() if collector is None else Exposition(collector)
        token = runtime.services.metrics_token
        self.expected = None if token is None else f"Bearer {token}".encode()
        self._rendering: asyncio.Future[bytes] | None = None
        """The exposition rendered in flight, which every scrape arriving meanwhile shares."""

    async def scrape(self, request: Request) -> Response:
        given = request.headers.get("authorization", "").encode("latin-1")
        if self.expected is not None and not hmac.compare_digest(given, self.expected):
            return Response(
                "metrics need the deployment's metrics token\n",
                status_code=401,
                media_type="text/plain",
                headers={"WWW-Authenticate": 'Bearer realm="metrics"'},
            )
        body = await asyncio.shield(self._shared_render())
        return Response(body, media_type=self.exposition.content_type)

    def _shared_render(self) -> asyncio.Future[bytes]:
        """One render at a time, however many scrapes ask: the route answers anyone without a
        metrics token, and each render takes a worker thread (the lag collector connects to
        Postgres), so a flood of scrapes took every thread the API's reads run on. Not a
        cache: a scrape arriving after a render finished starts a new one."""
        if self._rendering is None or self._rendering.done():
            self._rendering = asyncio.ensure_future(
                self.runtime.offloader.run(self.exposition.render)
            )
            # Retrieved here as well, for a render whose every scrape went away.
            self._rendering.add_done_callback(lambda done: done.cancelled() or done.exception())
        return self._rendering


# -- WebSocket subscriptions ----------------------------------------------------------------------


class SubscriptionRouter(GraphQLRouter[RequestContext, None]):
    """Strawberry's graphql-transport-ws handling, with our authentication on connection_init.

    Only its WebSocket route is mounted; queries and mutations go through :class:`GraphQLEndpoint`.
    The token comes from the ``connection_init`` payload (``{"Authorization": "Bearer …"}``) or,
    for clients that can set it, the handshake's ``Authorization`` header. How many subscriptions
    a caller may keep open is :class:`LimitedTransportWSHandler`'s to decide.
    """

    graphql_transport_ws_handler_class = LimitedTransportWSHandler

    def __init__(self, runtime: ApiRuntime, schema: Schema) -> None:
        self.runtime = runtime

        async def context(connection: HTTPConnection) -> RequestContext:
            return RequestContext(
                runtime,
                request_id=request_id(connection.headers.get("x-request-id")),
                traceparent=traceparent(connection.headers.get("traceparent")),
                websocket=True,
            )

        super().__init__(
            schema,
            path=GRAPHQL_PATH,
            graphql_ide=None,
            allow_queries_via_get=False,
            context_getter=context,
            subscription_protocols=(GRAPHQL_TRANSPORT_WS_PROTOCOL,),
            connection_init_wait_timeout=timedelta(seconds=10),
            max_subscriptions_per_connection=None,
            allowed_origins=runtime.services.cors_origins,
            include_in_schema=False,
        )
        self.routes = [route for route in self.routes if isinstance(route, APIWebSocketRoute)]

    def is_websocket_origin_allowed(self, request: WebSocket, origin: str) -> bool:
        # The origins CORS lets POST (cors_origins, and cors_origin_regex: in development any
        # localhost port) may subscribe too; strawberry alone knows only the list.
        if super().is_websocket_origin_allowed(request, origin):
            return True
        pattern = self.runtime.services.cors_origin_regex
        return pattern is not None and re.fullmatch(pattern, origin) is not None

    def decode_json(self, data: str | bytes) -> object:
        try:
            return super().decode_json(data)
        except RecursionError:
            # Arrays or objects nested thousands deep: not JSON this API reads. As a decoding
            # error, strawberry closes the connection with 4400 instead of failing on it.
            raise json.JSONDecodeError("JSON nested too deeply", "", 0) from None

    async def on_ws_connect(self, context: RequestContext) -> UnsetType | dict[str, object] | None:
        services = self.runtime.services
        headers = context.request.headers if context.request is not None else {}
        authorization = token_from_connection_params(context.connection_params) or headers.get(
            "authorization"
        )
        try:
            principal = await _authenticate(self.runtime, authorization, context.request)
            user_id, workspace_id = _counted_as(principal)
            await self.runtime.limiter.hit(
                limits_for(services.rate_limits, user_id=user_id, workspace_id=workspace_id)
            )
            self.runtime.subscriptions.connections.take(principal.user_id)
        except AgentWorksError as error:
            # Not only UNAUTHENTICATED and RATE_LIMITED: signing in with a provider's token can
            # be refused (VALIDATION) or unavailable; any of them escaping drops the socket.
            # The close says which (read_api.transport_ws).
            context.refusal = error
            raise ConnectionRejectionError(
                {"message": error.message, "extensions": {"code": error.code}}
            ) from error
        context.disconnect = functools.partial(
            self.runtime.subscriptions.connections.give_back, principal.user_id
        )
        if context.request is not None:
            signed_in(context.request.scope)
        context.authenticate(principal)
        return {"requestId": context.request_id}


def _counted_as(principal: Principal) -> tuple[str, str | None]:
    """Whose limits a request counts against: its user's, and its workspace's when its
    token names one (a user token acts in several; a bootstrap token in none yet)."""
    workspace = None if principal.is_bootstrap or principal.is_user else principal.workspace_id
    return principal.user_id, workspace


# -- health ---------------------------------------------------------------------------------------


_Read = tuple[int, dict[str, int], dict[str, int], str | None]
"""What one readiness read finds (:meth:`Health._positions`)."""


class Health:
    """Liveness (the process answers) and readiness (it can serve: database, Redis, lag).

    Aggregates a projector parked are shown (per projector, and which projectors have any) but
    do not make the instance unready (see the comment in :meth:`ready`).
    """

    def __init__(self, runtime: ApiRuntime) -> None:
        self.runtime = runtime
        self._behind_since: dict[str, tuple[int, float]] = {}
        """Per projector seen behind the head: its position then and since when it sits there."""
        self._reading: asyncio.Future[_Read] | None = None
        """The positions read in flight, which every readiness check arriving meanwhile shares."""

    async def alive(self) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(self) -> Response:
        services = self.runtime.services
        checks: dict[str, Any] = {}
        ready = True
        try:
            head, positions, parked, writes = await asyncio.wait_for(
                asyncio.shield(self._shared_positions()), _HEALTH_TIMEOUT
            )
            checks["database"] = "ok"
            if writes is not None:
                checks["writes"] = writes
                ready = ready and writes == "ok"
            lags: dict[str, dict[str, Any]] = {}
            for projector in services.projectors:
                position = positions.get(projector.name, 0)
                lags[projector.name] = {
                    "position": position,
                    "lag": max(0, head - position),
                    "parked": parked.get(projector.name, 0),
                }
                if services.max_projector_lag is not None and (
                    head - position > services.max_projector_lag
                ):
                    ready = False
                stalled = self._stalled_seconds(projector.name, position, head)
                if stalled is not None:
                    lags[projector.name]["stalledSeconds"] = round(stalled, 1)
                    ready = False
            checks["head"] = head
            checks["projectors"] = lags
            # Shown, not a reason to be unready: everything else is served (and fresh), and
            # taking every instance out of the load balancer for one bad aggregate would turn
            # it into the outage that parking exists to prevent.
            checks["parked"] = {name: count for name, count in parked.items() if count}
        except Exception as error:
            if not (is_database_error(error) or isinstance(error, TimeoutError | OSError)):
                raise
            checks["database"] = f"unavailable ({type(error).__name__})"
            ready = False
        if services.fanout_readiness is not None:
            fanout = dict(services.fanout_readiness())
            checks["fanout"] = fanout
            if any(status != "ok" for status in fanout.values()):
                ready = False
        if services.redis is None:
            checks["redis"] = "not configured"
        else:
            try:
                await asyncio.wait_for(services.redis.ping(), _HEALTH_TIMEOUT)
                checks["redis"] = "ok"
            except (RedisError, OSError, TimeoutError) as error:
                checks["redis"] = f"unavailable ({type(error).__name__})"
                ready = False
        checks["status"] = "ready" if ready else "not ready"
        if ready:
            return JSONResponse(checks)
        return JSONResponse(checks, status_code=503, headers={"Retry-After": "1"})

    def _stalled_seconds(self, name: str, position: int, head: int) -> float | None:
        """How long ``name`` has been behind without moving, once that exceeds the limit.

        A lag that does not shrink means nothing consumes the log (``serve`` alone, every
        worker down): writes would read stale forever while the lag alone looks harmless.
        """
        limit = self.runtime.services.projector_stall_seconds
        if limit is None or position >= head:
            self._behind_since.pop(name, None)
            return None
        now = time.monotonic()
        seen = self._behind_since.get(name)
        if seen is None or seen[0] != position:
            self._behind_since[name] = (position, now)
            return None
        waited = now - seen[1]
        return waited if waited >= limit else None

    def _shared_positions(self) -> asyncio.Future[_Read]:
        """One read of the positions at a time, however many checks ask: ``/readyz`` answers
        anyone, and a flood of it must not take the pool's connections from the API's readers.
        Not a cache: a check arriving after a read finished starts a new one."""
        if self._reading is None or self._reading.done():
            self._reading = asyncio.ensure_future(self.runtime.offloader.run(self._positions))
            # Retrieved here as well, for a read whose every waiter timed out.
            self._reading.add_done_callback(lambda done: done.cancelled() or done.exception())
        return self._reading

    def _positions(self) -> tuple[int, dict[str, int], dict[str, int], str | None]:
        """Log head, projector positions, how many aggregates each projector parked, and
        whether the write side reaches its database (``None``: not checked)."""
        services = self.runtime.services
        with services.pool.connection(timeout=_HEALTH_TIMEOUT) as conn:
            found = progress_queries.progress(conn)
        writes = None
        if services.write_reachable is not None:
            try:
                services.write_reachable(_HEALTH_TIMEOUT / 4)
                writes = "ok"
            except Exception as error:
                if not (is_database_error(error) or isinstance(error, OSError)):
                    raise
                writes = f"unavailable ({type(error).__name__})"
        return found.head, found.positions, found.parked, writes


__all__ = ["ApiServices", "create_app", "max_websocket_message_bytes"]
