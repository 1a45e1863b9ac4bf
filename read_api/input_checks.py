"""Checks of what a GraphQL request brings in, before any resolver runs.

* :class:`ExplicitOperation`: a document with several operations names the one to run
  (``operationName``), as the GraphQL spec requires; nothing is guessed.
* :class:`StorableTextOnly`: one gate for every text an operation brings in, variables and the
  document's literals.

Arguments of queries, mutations and subscriptions alike (names, labels, search queries, cursors,
ids) pass here before any resolver runs, so no argument added later can let text through that
PostgreSQL cannot hold (:mod:`domain.text`). The refusal is ``VALIDATION`` and names the variable
or the field and argument that held it. Commands check again (``commands.models.Input``), and
aggregates once more before recording, for callers that are not GraphQL.

:func:`body_within` reads any route's body no further than its limit.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Iterator

from graphql import (
    ArgumentNode,
    DocumentNode,
    FieldNode,
    GraphQLError,
    ObjectFieldNode,
    OperationDefinitionNode,
    StringValueNode,
    Visitor,
    visit,
)
from starlette.requests import Request
from strawberry.extensions import SchemaExtension

from domain.errors import ValidationFailed
from domain.text import find_unstorable, text_problem

MAX_VARIABLE_NESTING = 32
"""How deep a request's ``variables`` may nest (objects and arrays): the deepest input of the
schema nests a few levels; JSON a thousand levels deep is read by the parser yet overflows the
stack of every recursive walk after it (the text check, the cache key, the error log)."""

MAX_VARIABLE_VALUES = 1_000
"""How many values (objects, arrays and scalars together) a request's ``variables`` may hold:
the largest input of the schema holds a few hundred (a project's 50 lanes, a card's 50 labels).
A body within its size limit holds hundreds of thousands, and every step after the parser (the
walks of the checks here, coercion, the command's model) goes through each of them on the event
loop, where every other request waits."""


def shape_problem(value: object, *, depth: int, values: int) -> str | None:
    """What makes ``value`` (decoded JSON) too large to take further: objects and arrays nested
    more than ``depth`` levels, or more than ``values`` values in all (``None``: neither).

    Walked without recursion, so any depth is measured, and each object or array is counted
    whole before any of its items is looked at, so the walk stops within ``values`` items
    whatever ``value`` holds."""
    pending: list[tuple[object, int]] = [(value, 0)]
    seen = 0
    while pending:
        item, level = pending.pop()
        if isinstance(item, dict):
            children: Collection[object] = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if level >= depth:
            return f"nest deeper than {depth} levels"
        seen += len(children)
        if seen > values:
            return f"hold more than {values} values"
        pending.extend((child, level + 1) for child in children)
    return None


def variables_problem(variables: dict[str, object] | None) -> str | None:
    """What makes a request's ``variables`` too large to take further (:func:`shape_problem`
    with the bounds above), named as the request's field; ``None``: nothing. Over HTTP and the
    WebSocket alike, before any other check walks them."""
    if variables is None:
        return None
    problem = shape_problem(variables, depth=MAX_VARIABLE_NESTING, values=MAX_VARIABLE_VALUES)
    return None if problem is None else f"'variables' {problem}"


def closing(headers: dict[str, str], request: Request, *, read: bool) -> dict[str, str] | None:
    """``headers``, with ``Connection: close`` when the request's body was not read whole (a
    refusal before it, one past its size or time): its client could go on sending the body it
    announced for as long as it liked, each byte parsed and thrown away, and the connection
    could carry no further request anyway. ``None`` for no headers at all."""
    length = request.headers.get("content-length", "0").strip()
    announced = "transfer-encoding" in request.headers or length != "0"
    if not read and announced:
        headers = {**headers, "Connection": "close"}
    return headers or None


class NotJson(ValidationFailed):
    """A request body declared as something other than JSON (HTTP 415)."""


def require_json(content_type: str | None) -> None:
    """Refuse a body declared as anything but JSON (one declared as nothing is taken as JSON).

    Another site's HTML form sends ``text/plain``, urlencoded or multipart bodies without asking
    CORS first, and a ``text/plain`` one can be laid out to parse as a JSON object: read as
    JSON, it acted as the form's visitor (a login that stored the session cookie). JSON needs a
    preflight the API answers only for the origins it trusts."""
    media = (content_type or "application/json").split(";", 1)[0].strip().lower()
    if media not in ("application/json", "application/graphql-response+json"):
        raise NotJson(f"send the request as application/json, not {media[:60]}")


class BodyTooSlow(ValidationFailed):
    """The request's body did not arrive in the time allowed (HTTP 408, connection closed)."""


async def body_within(request: Request, limit: int, *, seconds: float) -> bytes | None:
    """The request's body, or ``None`` as soon as it passes ``limit`` bytes, read no further: a
    body read whole before its size is checked can be as large as its sender likes, and
    ``Content-Length`` is only a claim (a chunked body has none).

    Raises :class:`BodyTooSlow` once ``seconds`` pass before it is whole: nothing else bounds
    how long a sender may take, and a body trickling in a byte at a time held its request and
    its socket for days (every route reads a body, two of them from anyone)."""
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(seconds):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    return None
                chunks.append(chunk)
    except TimeoutError:
        raise BodyTooSlow(f"the request body did not arrive within {seconds:g} s") from None
    return b"".join(chunks)


class ExplicitOperation(SchemaExtension):
    """Refuses a document of several operations that does not say which one to run.

    Strawberry would otherwise run the first one, so a client's mistake silently runs a
    different operation than it meant (``VALIDATION``).
    """

    def on_execute(self) -> Iterator[None]:
        context = self.execution_context
        document = context.graphql_document
        if document is not None and context._provided_operation_name is None:
            operations = [d for d in document.definitions if isinstance(d, OperationDefinitionNode)]
            if len(operations) > 1:
                raise GraphQLError(
                    f"the document holds {len(operations)} operations; name the one to run "
                    "in operationName",
                    extensions={"code": "VALIDATION"},
                )
        yield


class StorableTextOnly(SchemaExtension):
    """Refuses an operation whose variables or literals hold text PostgreSQL cannot store."""

    def on_execute(self) -> Iterator[None]:
        context = self.execution_context
        for name, value in (context.variables or {}).items():
            problem = text_problem(name)
            if problem is not None:
                raise GraphQLError(
                    f"variable name {name!r} {problem}", extensions={"code": "VALIDATION"}
                )
            found = find_unstorable(value, name)
            if found is not None:
                path, problem = found
                raise GraphQLError(f"variable ${path} {problem}", extensions={"code": "VALIDATION"})
        query = context.query or ""
        # Literals can only hide such text behind an escape (\u0000) or hold it raw; a document
        # with neither, as nearly every real one is, needs no walk.
        document = context.graphql_document
        if document is not None and ("\\" in query or text_problem(query) is not None):
            literal = _unstorable_literal(document)
            if literal is not None:
                where, problem, node = literal
                raise GraphQLError(
                    f"{where} {problem}", nodes=[node], extensions={"code": "VALIDATION"}
                )
        yield


def _unstorable_literal(document: DocumentNode) -> tuple[str, str, StringValueNode] | None:
    finder = _LiteralFinder()
    visit(document, finder)
    return finder.found


class _LiteralFinder(Visitor):
    """Finds the first string literal that cannot be stored, with the names leading to it."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []
        self.found: tuple[str, str, StringValueNode] | None = None

    def enter_field(self, node: FieldNode, *_: object) -> None:
        self.names.append(node.name.value)

    def leave_field(self, node: FieldNode, *_: object) -> None:
        self.names.pop()

    def enter_argument(self, node: ArgumentNode, *_: object) -> None:
        self.names.append(node.name.value)

    def leave_argument(self, node: ArgumentNode, *_: object) -> None:
        self.names.pop()

    def enter_object_field(self, node: ObjectFieldNode, *_: object) -> None:
        self.names.append(node.name.value)

    def leave_object_field(self, node: ObjectFieldNode, *_: object) -> None:
        self.names.pop()

    def enter_string_value(self, node: StringValueNode, *_: object) -> object:
        problem = text_problem(node.value)
        if problem is not None and self.found is None:
            where = ".".join(self.names) or "a string literal"
            self.found = (where, problem, node)
            return self.BREAK
        return None
