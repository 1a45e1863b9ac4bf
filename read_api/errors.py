"""Turning every failure into a GraphQL error with a stable ``extensions.code``.

This is the one place where our exceptions become API error codes (STYLE.md 9)::

    AgentWorksError (domain.errors)       -> its ``code`` (NOT_FOUND, FORBIDDEN, ... RATE_LIMITED
                                             and UNAVAILABLE with ``retryAfter``; UNAVAILABLE
                                             with ``outcome`` and ``commandId`` when a write's
                                             fate is unknown; INT_OVERFLOW with ``field``,
                                             ``value``, ``max`` and ``instead``)
    pydantic.ValidationError (commands)   -> VALIDATION, naming the camelCase input fields
    GraphQL syntax / validation / variable
    coercion (no resolver ran)            -> VALIDATION, graphql-core's message
    anything else in a resolver            -> INTERNAL, a generic message; logged with its trace

Clients never see a stack trace or an exception's text unless it is one of ours.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import psycopg
import pydantic
import structlog
from eventsourcing.persistence import InterfaceError as StoreInterfaceError
from eventsourcing.persistence import OperationalError as StoreOperationalError
from graphql import GraphQLError
from graphql.execution import SubsequentIncrementalExecutionResult
from strawberry.exceptions import MissingQueryError
from strawberry.extensions import SchemaExtension
from strawberry.schema.exceptions import CannotGetOperationTypeError, InvalidOperationTypeError
from strawberry.types.execution import ExecutionContext, StreamExecutionResult

from domain.errors import AgentWorksError, RateLimited, Unavailable, UndecodableEvent
from read_api.scalars import IntOverflow

log = structlog.get_logger(__name__)

VALIDATION = "VALIDATION"
INTERNAL = "INTERNAL"
UNAUTHENTICATED = "UNAUTHENTICATED"
RATE_LIMITED = "RATE_LIMITED"
UNAVAILABLE = Unavailable.code

INTERNAL_MESSAGE = "internal error; the request id in X-Request-Id identifies it in our logs"

_REFUSED_BEFORE_RUNNING = (
    GraphQLError,
    ValueError,
    TypeError,
    # Strawberry's own refusals of a request with no operation to run (none named as asked, no
    # query, an operation of a type not allowed): over HTTP the endpoint answers them itself;
    # over a WebSocket they reach the shaping as the cause of the subscribe's error.
    CannotGetOperationTypeError,
    InvalidOperationTypeError,
    MissingQueryError,
)
"""Causes of an error before execution that are the request's fault (VALIDATION, their
message as it is), not ours."""


def camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def describe_validation_error(error: pydantic.ValidationError) -> str:
    """Pydantic's report as one line in the API's vocabulary (camelCase fields)."""
    problems = []
    for item in error.errors(include_url=False):
        where = ".".join(camel(str(part)) for part in item["loc"])
        message = str(item["msg"]).removeprefix("Value error, ")
        problems.append(f"{where}: {message}" if where else message)
    return "invalid input: " + "; ".join(problems)


def error_extensions(error: BaseException) -> dict[str, Any]:
    """``extensions`` for one of our exceptions (``code``, and what else its kind says: when to
    retry, which event, which field)."""
    if isinstance(error, RateLimited):
        return {"code": error.code, "retryAfter": max(1, round(error.retry_after_seconds))}
    if isinstance(error, Unavailable):
        extensions: dict[str, Any] = {
            "code": error.code,
            "retryAfter": max(1, round(error.retry_after_seconds)),
        }
        if error.outcome is not None:
            extensions["outcome"] = error.outcome
        if error.command_id is not None:
            extensions["commandId"] = error.command_id
        return extensions
    if isinstance(error, UndecodableEvent):
        return {"code": error.code, "version": error.version, "at": error.at}
    if isinstance(error, IntOverflow):
        return {"code": error.code, **error.extensions()}
    if isinstance(error, AgentWorksError):
        return {"code": error.code}
    return {"code": INTERNAL}


def _cause(error: GraphQLError) -> BaseException | None:
    cause: BaseException | None = error.original_error
    while isinstance(cause, GraphQLError) and cause.original_error is not None:
        cause = cause.original_error
    return cause


def outage_of(error: BaseException | None) -> Unavailable | None:
    """The UNAVAILABLE that a database failure which escaped translation stands for."""
    if isinstance(error, Unavailable):
        return error
    if isinstance(error, psycopg.OperationalError | StoreOperationalError | StoreInterfaceError):
        return Unavailable("the database is unavailable; retry shortly")
    return None


def shape_error(error: GraphQLError) -> GraphQLError:
    """The client-facing version of ``error``: our message and code, or a generic INTERNAL."""
    cause = _cause(error)
    outage = outage_of(cause)
    if outage is not None and outage is not cause:
        cause = outage
    extensions = dict(error.extensions or {})
    if isinstance(cause, GraphQLError) and cause is not error:
        extensions = {**dict(cause.extensions or {}), **extensions}
    if isinstance(cause, AgentWorksError):
        # Before execution (a scalar refusing a variable) graphql-core's message also says
        # which variable and field; from a resolver our own message is the whole story.
        message = error.message if error.path is None else cause.message
        return _rebuilt(error, message, {**extensions, **error_extensions(cause)})
    if isinstance(cause, pydantic.ValidationError):
        return _rebuilt(error, describe_validation_error(cause), {**extensions, "code": VALIDATION})
    if "code" in extensions and (cause is None or isinstance(cause, GraphQLError)):
        return _rebuilt(error, error.message, extensions)
    if cause is None or isinstance(cause, GraphQLError) or error.path is None:
        # Nothing ran yet: the document or its variables were refused (graphql-core's messages
        # name the problem and contain no server detail), or a scalar refused a value.
        if cause is not None and not isinstance(cause, _REFUSED_BEFORE_RUNNING):
            log.error("graphql.pre_execution_failure", exc_info=cause)
            return _rebuilt(error, INTERNAL_MESSAGE, {"code": INTERNAL})
        return _rebuilt(error, error.message, {**extensions, "code": VALIDATION})
    log.error("graphql.resolver_failed", path=".".join(str(p) for p in error.path), exc_info=cause)
    return _rebuilt(error, INTERNAL_MESSAGE, {"code": INTERNAL})


def _rebuilt(error: GraphQLError, message: str, extensions: dict[str, Any]) -> GraphQLError:
    return GraphQLError(
        message,
        nodes=error.nodes,
        source=error.source,
        positions=error.positions,
        path=error.path,
        original_error=None,
        extensions=extensions,
    )


def shape_errors(errors: Sequence[GraphQLError]) -> list[GraphQLError]:
    return [shape_error(error) for error in errors]


def retry_after(errors: Sequence[GraphQLError]) -> int | None:
    """Seconds to send as ``Retry-After`` when an error says a dependency is unavailable: the
    HTTP answer is then 503, so clients and proxies treat it as the outage it is."""
    waits = [
        int((error.extensions or {}).get("retryAfter") or 1)
        for error in errors
        if (error.extensions or {}).get("code") == Unavailable.code
    ]
    return max(waits) if waits else None


def error_body(message: str, code: str, **extensions: object) -> dict[str, Any]:
    """A GraphQL-shaped response body for failures outside execution (401, 413, 429, 400)."""
    return {"errors": [{"message": message, "extensions": {"code": code, **extensions}}]}


class ErrorShaping(SchemaExtension):
    """Applies :func:`shape_error` to every result, HTTP and WebSocket alike."""

    def on_operation(self) -> Iterator[None]:
        yield
        result = self.execution_context.result
        reported = getattr(self.execution_context.context, "reported", None)
        if result is not None and reported and hasattr(result, "errors"):
            result.errors = [*(result.errors or []), *reported]
            reported.clear()  # (a WebSocket's context serves more than one operation)
        errors = getattr(result, "errors", None)
        if result is not None and errors:
            result.errors = shape_errors(errors)

    def on_stream_result(self, result: StreamExecutionResult) -> Iterator[None]:
        # A subsequent incremental result carries no errors of its own.
        if not isinstance(result, SubsequentIncrementalExecutionResult) and result.errors:
            result.errors = shape_errors(result.errors)
        yield None


def log_unexpected(errors: Sequence[GraphQLError], context: ExecutionContext | None) -> None:
    """Schema.process_errors replacement: refusals are normal, only bugs are logged loudly."""
    for error in errors:
        cause = _cause(error)
        if cause is None or isinstance(cause, AgentWorksError | pydantic.ValidationError):
            log.debug("graphql.refused", message=error.message)
        elif outage_of(cause) is not None:
            # The pool reported the outage once (adapters.outages); not once per request.
            log.debug("graphql.unavailable", message=str(cause))
