"""The GraphQL schema of API.md, with its protective extensions and error shaping."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import strawberry
from graphql import GraphQLError
from graphql.validation.rules import overlapping_fields_can_be_merged
from strawberry.extensions import (
    AddValidationRules,
    MaxAliasesLimiter,
    MaxTokensLimiter,
    ParserCache,
    QueryDepthLimiter,
    SchemaExtension,
)
from strawberry.schema.config import StrawberryConfig
from strawberry.tools import merge_types
from strawberry.types.execution import ExecutionContext

from read_api.access import AccessMutation
from read_api.errors import ErrorShaping, log_unexpected
from read_api.execution import LeafShortcutExecution
from read_api.input_checks import ExplicitOperation, StorableTextOnly
from read_api.limits import (
    MAX_CACHED_DOCUMENT_CHARS,
    BoundedValidation,
    CostLimiter,
    SubscriptionsOnlyOverWebSocket,
)
from read_api.mutation import Mutation
from read_api.operation_metrics import OperationMetrics
from read_api.query import Query
from read_api.scalars import SCALARS
from read_api.services import QueryLimits
from read_api.subscription import Subscription
from read_api.transport_ws import OperationStarts


class AgentWorksSchema(strawberry.Schema):
    """Logs refusals quietly and bugs loudly (the default logs every error with a trace)."""

    def process_errors(
        self, errors: list[GraphQLError], execution_context: ExecutionContext | None = None
    ) -> None:
        log_unexpected(errors, execution_context)


class DocumentCache(ParserCache):
    """Strawberry's parser cache, leaving a document that does not parse to strawberry's parser.

    ``ParserCache.on_parse`` parses outside the guard that turns a syntax error into a GraphQL
    error: over HTTP strawberry catches it later, but a subscription's stream raised it, and the
    client got a bare ``complete`` (and the log a traceback) instead of an ``error`` message.
    Strawberry's own parse, run next when no document is set, reports it as a pre-execution error
    like any validation error. Documents longer than :data:`MAX_CACHED_DOCUMENT_CHARS` are left
    to that parse too: the cache would keep them.
    """

    def on_parse(self) -> Iterator[None]:
        context = self.execution_context
        if len(context.query or "") > MAX_CACHED_DOCUMENT_CHARS:
            yield  # strawberry parses it, uncached (limits.MAX_CACHED_DOCUMENT_CHARS)
            return
        try:
            context.graphql_document = self.cached_parse_document(
                context.query, **context.parse_options
            )
        except GraphQLError:
            context.graphql_document = None
        yield


def build_schema(limits: QueryLimits | None = None) -> strawberry.Schema:
    """The schema with its limits; extensions are factories so each request gets fresh ones.

    The depth and alias rules are built once: a rule class made per request would defeat the
    validation cache, which keys on the rules (a board query then re-parses and re-validates on
    every request).
    """
    limits = limits or QueryLimits()
    overlapping_fields_can_be_merged.MAX_COMPLEXITY_BUDGET = limits.max_field_merge_work
    rules = [
        *QueryDepthLimiter(max_depth=limits.max_depth).validation_rules,
        *MaxAliasesLimiter(max_alias_count=limits.max_aliases).validation_rules,
    ]
    extensions: list[type[SchemaExtension] | Callable[[], SchemaExtension]] = [
        OperationMetrics,
        ErrorShaping,
        SubscriptionsOnlyOverWebSocket,
        ExplicitOperation,
        StorableTextOnly,
        lambda: AddValidationRules(rules),
        lambda: MaxTokensLimiter(max_token_count=limits.max_tokens),
        lambda: CostLimiter(max_cost=limits.max_cost, max_log_reads=limits.max_log_reads),
        lambda: DocumentCache(maxsize=512),
        # Refuses documents that expand past the bounds before validation walks them.
        lambda: BoundedValidation(maxsize=512, max_selections=limits.max_expanded_selections),
        # Last: its on_execute runs once every check above has passed (a WebSocket's refusals
        # before that are answered with the protocol's error message, read_api.transport_ws).
        OperationStarts,
    ]
    return AgentWorksSchema(
        query=Query,
        mutation=merge_types("Mutation", (Mutation, AccessMutation)),
        subscription=Subscription,
        extensions=extensions,
        config=StrawberryConfig(scalar_map=SCALARS),
        execution_context_class=LeafShortcutExecution,
    )


def schema_sdl() -> str:
    """The schema in SDL, for documentation and contract tests."""
    return build_schema().as_str()


__all__ = ["build_schema", "schema_sdl"]
