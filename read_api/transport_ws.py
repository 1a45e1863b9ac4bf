"""Strawberry's graphql-transport-ws handler, with the subscription limits of
:mod:`read_api.subscription_limits`.

A ``subscribe`` takes a slot (per connection and per user) before its operation starts, and the
operation's task gives it back when it ends, however it ends: ``complete`` from the client, the
stream finishing, an error, or the connection going away (strawberry cancels every operation
task of a connection when it closes, a dropped TCP connection included). A refused ``subscribe``
gets the protocol's ``error`` message, with ``extensions.code`` ``RATE_LIMITED``; the connection
and its other operations are left as they were. A ``subscribe`` whose ``variables`` pass the
bounds of a POSTed request's (:func:`read_api.input_checks.variables_problem`) is refused so too,
with ``VALIDATION``, before anything walks them. Each ``subscribe`` is also counted against the
caller's request rate limits (per user and workspace), as a POSTed operation is: one connection
is no way around them.

A message that is not what the protocol says (not a JSON object; a ``subscribe`` or ``complete``
without a string ``id``; a ``subscribe`` whose payload is not an object with a string ``query``,
an object of ``variables`` and a string ``operationName``) closes the connection with 4400, as
the protocol asks, before strawberry reads it: strawberry would fail on it with an exception
(the connection dropped without a close code, a traceback logged) or an ``INTERNAL`` error.

A ``subscribe`` refused before its operation starts is answered with the protocol's ``error``
message (its errors shaped as any others, ``extensions.code`` ``VALIDATION`` and the like), and
nothing follows it: the id is free again. Strawberry does so for a document that does not parse
or validate, and for a refusal by the subscription's own resolver (the object is not found),
but a refusal raised by an ``on_execute`` check of the schema (:mod:`read_api.input_checks`:
several operations and no ``operationName``, text PostgreSQL cannot store; the cost estimate of
:mod:`read_api.limits`) came as ``next`` with the errors, then ``complete``, as if the
subscription had run. :class:`OperationStarts`, the schema's last extension, marks the
operation as started once every such check has passed; a first result that comes before it is
the refusal, sent as ``error``. Errors once the operation runs (an event's field failing, the
subscription ending because access was withdrawn) still come as ``next`` with errors.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Iterator, Mapping
from contextvars import ContextVar
from typing import TYPE_CHECKING

from strawberry.extensions import SchemaExtension
from strawberry.http.async_base_view import AsyncWebSocketAdapter
from strawberry.subscriptions.protocols.graphql_transport_ws.handlers import (
    BaseGraphQLTransportWSHandler,
)
from strawberry.subscriptions.protocols.graphql_transport_ws.types import (
    Message,
    SubscribeMessage,
)
from strawberry.types.execution import ExecutionResult, PreExecutionError

from domain.errors import RateLimited, ValidationFailed
from read_api.context import RequestContext
from read_api.errors import error_extensions
from read_api.input_checks import variables_problem
from read_api.ratelimit import limits_for

if TYPE_CHECKING:
    from strawberry.schema.schema import StreamResult
    from strawberry.subscriptions.protocols.graphql_transport_ws.handlers import Operation


class _Progress:
    """Whether the WebSocket operation being run has got past every check before execution."""

    __slots__ = ("started",)

    def __init__(self) -> None:
        self.started = False


_progress: ContextVar[_Progress | None] = ContextVar("ws_operation_progress", default=None)
"""The operation whose results this task is sending (each operation runs in a task of its own)."""


class OperationStarts(SchemaExtension):
    """Marks the WebSocket operation being run as started: listed last among the schema's
    extensions, its ``on_execute`` runs once every other one's has passed, just before
    graphql-core subscribes. Does nothing over HTTP."""

    def on_execute(self) -> Iterator[None]:
        progress = _progress.get()
        if progress is not None:
            progress.started = True
        yield


async def _refused_before_start(results: StreamResult, progress: _Progress) -> StreamResult:
    """``results``, the first as a :class:`PreExecutionError` when it came before the operation
    started: strawberry answers a check raising in ``on_execute`` with a plain result."""
    first = True
    async for result in results:
        if (
            first
            and not progress.started
            and isinstance(result, ExecutionResult)
            and not isinstance(result, PreExecutionError)
            and result.errors
        ):
            result = PreExecutionError(data=None, errors=result.errors)
        first = False
        yield result


def malformed(message: object) -> str | None:
    """Why ``message`` is not a graphql-transport-ws message strawberry can handle, or ``None``."""
    if not isinstance(message, dict):
        return "a message must be a JSON object"
    kind = message.get("type")
    if kind in ("subscribe", "complete") and not isinstance(message.get("id"), str):
        return f"a {kind} message needs a string id"
    if kind != "subscribe":
        return None
    payload = message.get("payload")
    if not isinstance(payload, dict) or not isinstance(payload.get("query"), str):
        return "a subscribe message needs a payload object with a query string"
    if not isinstance(payload.get("variables", None), dict | None):
        return "variables must be a JSON object"
    if not isinstance(payload.get("operationName", None), str | None):
        return "operationName must be a string"
    return None


def _require_takeable_variables(message: SubscribeMessage) -> None:
    """Refuse a ``subscribe`` whose ``variables`` a POSTed request could not bring either."""
    problem = variables_problem(message["payload"].get("variables"))
    if problem is not None:
        raise ValidationFailed(problem)


#: The most bytes a close frame's reason may hold (RFC 6455: 125 less the code's two).
_MOST_REASON_BYTES = 123


class _RefusalSaysWhy(AsyncWebSocketAdapter):
    """The connection's socket, whose close for a refused ``connection_init`` (4403) says why.

    Strawberry closes every refusal with the reason "Forbidden", whatever it was, so a client
    could not tell a token to refresh (``UNAUTHENTICATED``) from a limit to wait out
    (``RATE_LIMITED``). :meth:`read_api.app.SubscriptionRouter.on_ws_connect` keeps its refusal
    on the context; the close says its code, then as much of its message as a reason holds."""

    def __init__(self, socket: AsyncWebSocketAdapter, context: RequestContext) -> None:
        super().__init__(socket.view)
        self._socket = socket
        self._context = context

    def iter_json(self, *, ignore_parsing_errors: bool = False) -> AsyncGenerator[object, None]:
        return self._socket.iter_json(ignore_parsing_errors=ignore_parsing_errors)

    async def send_json(self, message: Mapping[str, object]) -> None:
        await self._socket.send_json(message)

    async def close(self, code: int, reason: str) -> None:
        refusal = self._context.refusal
        if code == 4403 and refusal is not None:
            said = f"{refusal.code}: {' '.join(refusal.message.split())}".encode()
            if len(said) > _MOST_REASON_BYTES:
                said = said[: _MOST_REASON_BYTES - 3] + b"..."
            reason = said.decode("utf-8", "ignore")
        await self._socket.close(code, reason)


class LimitedTransportWSHandler(BaseGraphQLTransportWSHandler[RequestContext, None]):
    _held: int = 0
    """Subscriptions this connection holds (an instance's own count from its first change)."""

    def on_request_accepted(self) -> None:
        self.websocket = _RefusalSaysWhy(self.websocket, self.context)
        super().on_request_accepted()

    async def shutdown(self) -> None:
        disconnect, self.context.disconnect = self.context.disconnect, None
        try:
            await super().shutdown()
        finally:
            if disconnect is not None:
                disconnect()

    async def _send_result_stream(
        self, operation: Operation[RequestContext, None], result_source: StreamResult
    ) -> None:
        # Strawberry's hook between the operation's stream and its messages: a first result
        # that is a PreExecutionError becomes the ``error`` message (and frees the id). The
        # stream runs no extension until it is iterated, here, in the operation's own task, so
        # the context variable names this operation alone.
        progress = _Progress()
        token = _progress.set(progress)
        try:
            results = _refused_before_start(result_source, progress)
            try:
                await super()._send_result_stream(operation, results)
            finally:
                await results.aclose()
        finally:
            _progress.reset(token)

    async def handle_message(self, message: Message) -> None:
        problem = malformed(message)
        if problem is not None:
            await self.handle_invalid_message(problem)
            return
        await super().handle_message(message)

    async def handle_subscribe(self, message: SubscribeMessage) -> None:
        if not self.connection_acknowledged or message["id"] in self.operations:
            # Protocol violations: strawberry closes the connection.
            await super().handle_subscribe(message)
            return
        runtime = self.context.runtime
        slots = runtime.subscriptions
        principal = self.context.who.principal
        user_id = principal.user_id
        try:
            await runtime.limiter.hit(
                limits_for(
                    runtime.services.rate_limits,
                    user_id=user_id,
                    workspace_id=(
                        None
                        if principal.is_bootstrap or principal.is_user
                        else principal.workspace_id
                    ),
                )
            )
            _require_takeable_variables(message)
            slots.take(user_id, held_by_connection=self._held)
        except (RateLimited, ValidationFailed) as error:
            await self.send_message(
                {
                    "id": message["id"],
                    "type": "error",
                    "payload": [{"message": error.message, "extensions": error_extensions(error)}],
                }
            )
            return
        self._held += 1

        def give_back(_: object = None) -> None:
            self._held -= 1
            slots.give_back(user_id)

        try:
            await super().handle_subscribe(message)
        finally:
            operation = self.operations.get(message["id"])
            task: asyncio.Task[None] | None = None if operation is None else operation.task
            if task is None:
                give_back()
            else:
                task.add_done_callback(give_back)
