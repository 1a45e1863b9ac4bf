"""Refusing documents too expensive to run: an estimate of how many objects a query resolves.

Depth, aliases and tokens are bounded by strawberry's own extensions; this adds the one bound
they miss, breadth: each field costs one per parent object, and a paginated field multiplies its
children by its page size (``first``, or the field's default). A board of 200 lanes x 200 cards
x 200 runs is refused before a single row is read.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from graphql import (
    FieldNode,
    FragmentDefinitionNode,
    FragmentSpreadNode,
    GraphQLError,
    InlineFragmentNode,
    IntValueNode,
    OperationDefinitionNode,
    SelectionSetNode,
    VariableNode,
)
from strawberry.extensions import SchemaExtension
from strawberry.types.graphql import OperationType

#: Page size a list field has when the query does not say ``first``.
DEFAULT_PAGE: Mapping[str, int] = {
    "cards": 100,
    "runs": 20,
    "activity": 50,
    "agentRunLogs": 500,
    "searchLogs": 50,
}
#: Estimated length of lists without pagination (lanes, members, projects, events, lines).
UNPAGED_LIST = 20
UNPAGED_FIELDS = frozenset(
    {"lanes", "members", "projects", "events", "lines", "discrepancies", "usage"}
)


class CostLimiter(SchemaExtension):
    """Refuses an operation whose estimated cost exceeds ``max_cost`` (code VALIDATION)."""

    def __init__(self, *, max_cost: int) -> None:
        self.max_cost = max_cost

    def on_execute(self) -> Iterator[None]:
        context = self.execution_context
        document = context.graphql_document
        if document is not None:
            fragments = {
                d.name.value: d
                for d in document.definitions
                if isinstance(d, FragmentDefinitionNode)
            }
            operations = [d for d in document.definitions if isinstance(d, OperationDefinitionNode)]
            name = context.operation_name
            for operation in operations:
                if name is not None and (operation.name is None or operation.name.value != name):
                    continue
                cost = _cost(
                    operation.selection_set,
                    fragments,
                    context.variables or {},
                    multiplier=1,
                    depth=0,
                )
                if cost > self.max_cost:
                    raise GraphQLError(
                        f"query is too expensive: it may resolve about {cost} objects, more than "
                        f"{self.max_cost}; ask for smaller pages (first) or fewer fields",
                        extensions={"code": "VALIDATION"},
                    )
        yield


class SubscriptionsOnlyOverWebSocket(SchemaExtension):
    """Refuses queries and mutations sent over a WebSocket.

    A WebSocket connection has no request to end, so it keeps no read scope (transaction,
    DataLoader cache) between messages; queries and mutations are POSTed, where they get one.
    """

    def on_execute(self) -> Iterator[None]:
        context = self.execution_context
        if (
            getattr(context.context, "websocket", False)
            and context.operation_type is not OperationType.SUBSCRIPTION
        ):
            raise GraphQLError(
                "queries and mutations are POSTed to /graphql; the WebSocket carries "
                "subscriptions only",
                extensions={"code": "VALIDATION"},
            )
        yield


def _cost(
    selection_set: SelectionSetNode | None,
    fragments: Mapping[str, FragmentDefinitionNode],
    variables: Mapping[str, Any],
    *,
    multiplier: int,
    depth: int,
) -> int:
    if selection_set is None or depth > 50:
        return 0
    total = 0
    for selection in selection_set.selections:
        if isinstance(selection, FieldNode):
            total += multiplier
            field = selection.name.value
            page = _page(selection, variables)
            if page is None and field in DEFAULT_PAGE:
                page = DEFAULT_PAGE[field]
            if page is None and field in UNPAGED_FIELDS:
                page = UNPAGED_LIST
            inner = multiplier * max(page if page is not None else 1, 1)
            total += _cost(
                selection.selection_set, fragments, variables, multiplier=inner, depth=depth + 1
            )
        elif isinstance(selection, InlineFragmentNode):
            total += _cost(
                selection.selection_set,
                fragments,
                variables,
                multiplier=multiplier,
                depth=depth + 1,
            )
        elif isinstance(selection, FragmentSpreadNode):
            fragment = fragments.get(selection.name.value)
            if fragment is not None:
                total += _cost(
                    fragment.selection_set,
                    fragments,
                    variables,
                    multiplier=multiplier,
                    depth=depth + 1,
                )
    return total


def _page(field: FieldNode, variables: Mapping[str, Any]) -> int | None:
    for argument in field.arguments or ():
        if argument.name.value != "first":
            continue
        value = argument.value
        if isinstance(value, IntValueNode):
            return int(value.value)
        if isinstance(value, VariableNode):
            given = variables.get(value.name.value)
            if isinstance(given, int) and not isinstance(given, bool):
                return given
    return None
