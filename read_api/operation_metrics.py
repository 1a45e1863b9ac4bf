"""Times every query and mutation the schema runs, labelled so that an operator sees which
root field is slow or failing: ``agentworks_graphql_seconds``.

Labels come from the document only where the schema names them: a root field the schema does
not have is ``unknown``, so that a client cannot grow the series with made-up names (such a
document fails validation anyway).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from graphql import FieldNode, GraphQLError, GraphQLSchema, OperationDefinitionNode, OperationType
from graphql.utilities import get_operation_ast
from strawberry.extensions import SchemaExtension

from adapters.metrics import GRAPHQL_SECONDS

_INTROSPECTION = frozenset({"__schema", "__type", "__typename"})


class OperationMetrics(SchemaExtension):
    """Observes each operation's duration once its errors are shaped: listed first among the
    schema's extensions, its operation hook ends after every other one's."""

    def on_operation(self) -> Iterator[None]:
        started = time.perf_counter()
        yield
        operation = self._operation()
        if operation is not None and operation.operation is OperationType.SUBSCRIPTION:
            return  # lives as long as its client: no duration to speak of
        GRAPHQL_SECONDS.labels(
            "unknown" if operation is None else operation.operation.value,
            _root_field(self.execution_context.schema._schema, operation),
            _outcome(getattr(self.execution_context.result, "errors", None)),
        ).observe(time.perf_counter() - started)

    def _operation(self) -> OperationDefinitionNode | None:
        context = self.execution_context
        if context.graphql_document is None:
            return None
        return get_operation_ast(context.graphql_document, context.operation_name)


def _root_field(schema: GraphQLSchema, operation: OperationDefinitionNode | None) -> str:
    if operation is None:
        return "unknown"
    first = next(
        (node for node in operation.selection_set.selections if isinstance(node, FieldNode)), None
    )
    if first is None:
        return "fragment"
    name = first.name.value
    if name in _INTROSPECTION:
        return "introspection"
    root = schema.get_root_type(operation.operation)
    return name if root is not None and name in root.fields else "unknown"


def _outcome(errors: list[GraphQLError] | None) -> str:
    if not errors:
        return "ok"
    code = (errors[0].extensions or {}).get("code")
    return code if isinstance(code, str) else "INTERNAL"
