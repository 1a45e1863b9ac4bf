"""Refusing documents too expensive to run: an estimate of how many objects a query resolves.

Depth, aliases and tokens are bounded by strawberry's own extensions; this adds the one bound
they miss, breadth: an estimate of the objects a document may resolve, each list counted at the
page size it asks for (``first``, or the field's default). The board a client would draw (lanes,
their cards, each card's runs, at the default page sizes) costs about 42,000; lanes x 200 cards
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


#: Fields that only wrap the items of a connection: they add no object of their own.
CONNECTION_WRAPPERS = frozenset({"edges", "node"})
#: Fields resolved once per connection, not once per item.
PER_CONNECTION = frozenset({"pageInfo"})


def _cost(
    selection_set: SelectionSetNode | None,
    fragments: Mapping[str, FragmentDefinitionNode],
    variables: Mapping[str, Any],
    *,
    multiplier: int,
    depth: int,
    connections: int | None = None,
) -> int:
    """Objects the selection may resolve when its parent stands for ``multiplier`` objects.

    A list multiplies what is under it by the page size asked (``first``, else the field's
    default); ``edges``/``node`` only wrap a connection's items and ``pageInfo`` comes once per
    connection (``connections`` of them), so a board with its lanes, cards and runs costs what
    it may return rather than a product of every nesting level. Scalars cost nothing of their
    own: the objects that hold them were counted.
    """
    if selection_set is None or depth > 50:
        return 0
    total = 0
    for selection in selection_set.selections:
        if isinstance(selection, FieldNode):
            if selection.selection_set is None:
                continue
            field = selection.name.value
            owner = multiplier
            if field in CONNECTION_WRAPPERS:
                total += _cost(
                    selection.selection_set, fragments, variables,
                    multiplier=multiplier, depth=depth + 1,
                )  # fmt: skip
                continue
            if field in PER_CONNECTION and connections is not None:
                owner = connections
            page = _page(selection, variables)
            if page is None and field in DEFAULT_PAGE:
                page = DEFAULT_PAGE[field]
            if page is None and field in UNPAGED_FIELDS:
                page = UNPAGED_LIST
            inner = owner * max(page if page is not None else 1, 1)
            total += inner
            total += _cost(
                selection.selection_set,
                fragments,
                variables,
                multiplier=inner,
                depth=depth + 1,
                connections=owner if page is not None else None,
            )
        elif isinstance(selection, InlineFragmentNode):
            total += _cost(
                selection.selection_set,
                fragments,
                variables,
                multiplier=multiplier,
                depth=depth + 1,
                connections=connections,
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
                    connections=connections,
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
