"""GraphQL execution with a short way through plain leaf fields.

A board answer holds some 3,000 fields, and most of them are a card's scalar read straight off
its attribute (``title``, ``position``, ``cost``…). graphql-core treats each one like any other
field: it builds a resolve-info record, looks up arguments, calls strawberry's wrapper, checks for
an awaitable and walks the type wrappers to the scalar's serializer. That bookkeeping, not our
SQL, was most of a board query's CPU (see the GraphQL section of BENCHMARKS.md).

For a field that strawberry itself marks as basic (no resolver, no permission, no extension),
that takes no arguments, whose type is a scalar or enum (or a list of them) and when no
middleware wraps resolvers, the value is read and serialized directly. Anything unusual on the
way — a missing attribute, a null where the schema says non-null, a value the scalar refuses —
goes back to graphql-core's own path, so errors keep their exact message, location and path.

A value that a field typed ``Int`` cannot carry (past a signed 32 bits) is answered by
:class:`~read_api.scalars.IntOverflow` (``INT_OVERFLOW``, naming the field and its ``BigInt``
companion) instead of graphql-core's generic refusal (:class:`NamedIntOverflow`): the short way
leaves such a value to the general path, as every value its scalar refuses, and the general
path names it. The field stays a plain one (the short way, counting 1) for every value that fits.

It also counts what an operation executes, the guard behind the cost estimate
(:mod:`read_api.limits`): a field completed the short way counts 1, any other (an object, a
list, a resolver) :data:`FIELD_COST`, roughly in proportion to their CPU (bench/graphql_cost.py:
5-9 µs per counted field, a read of an empty page the dearest). Past ``QueryLimits.max_executed``
the fields not yet resolved are not: they are null, as after any field error, and the answer
carries one ``VALIDATION`` error. The estimate refuses most documents before they run; this
bounds the rest, whatever their lists hold (the estimate counts pages as full but cannot know
how full they are: 2,000 cards of 20 runs each, which the SPA's default page sizes admit,
would take some 3 s).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from operator import attrgetter
from typing import Any

from graphql import (
    GRAPHQL_MAX_INT,
    GRAPHQL_MIN_INT,
    ExecutionResult,
    ExperimentalIncrementalExecutionResults,
    GraphQLError,
    GraphQLInt,
    GraphQLLeafType,
    GraphQLList,
    GraphQLNonNull,
    GraphQLObjectType,
    GraphQLOutputType,
    Undefined,
    is_leaf_type,
)
from graphql.execution.collect_fields import DeferUsage, FieldDetailsList
from graphql.execution.incremental.incremental_executor import DeliveryGroup
from graphql.pyutils import AwaitableOrValue, Path
from graphql.pyutils.ref_map import RefMap
from strawberry.schema.schema import StrawberryGraphQLCoreExecutionContext
from strawberry.schema.schema_converter import GraphQLCoreConverter
from strawberry.types.field import StrawberryField

from read_api.scalars import INSTEAD, IntOverflow


@dataclass(frozen=True, slots=True)
class _PlainLeaf:
    """How to complete one plain leaf field without graphql-core's per-field machinery."""

    read: Callable[[Any], Any]
    leaf: GraphQLLeafType
    nullable: bool
    listed: bool
    items_nullable: bool


#: What a field executed other than the short way counts, a field completed the short way 1.
FIELD_COST = 4


class ExecutedTooMuch(GraphQLError):
    """The operation executed more fields than its limit allows."""


class NamedIntOverflow(StrawberryGraphQLCoreExecutionContext):
    """Strawberry's execution context, answering an ``Int`` field whose value does not fit
    with :class:`~read_api.scalars.IntOverflow` at that field's path.

    graphql-core refuses such a value with ``Int cannot represent non 32-bit signed integer
    value`` and no code of its own (shaped as ``VALIDATION``, as if the request were at fault);
    this says which field, the limit and, from the field's ``metadata``
    (:data:`~read_api.scalars.INSTEAD`), which field to read instead. Raised where the leaf is
    completed, the error is the field's, as graphql-core's own was: a non-null field's null
    climbs to its nearest nullable parent. The value is checked where graphql-core completes a
    leaf (not every object and list, nor the short way), and named only when it does not fit.
    """

    @staticmethod
    def complete_leaf_value(return_type: GraphQLLeafType, result: object) -> object:
        if (
            type(result) is int
            and return_type is GraphQLInt
            and not GRAPHQL_MIN_INT <= result <= GRAPHQL_MAX_INT
        ):
            raise _PastInt(result)
        return StrawberryGraphQLCoreExecutionContext.complete_leaf_value(return_type, result)

    def handle_field_error(
        self,
        raw_error: Exception,
        return_type: GraphQLOutputType,
        field_details_list: FieldDetailsList,
        path: Path,
    ) -> None:
        if isinstance(raw_error, _PastInt):
            raw_error = self._overflow(raw_error.value, field_details_list[0].node.name.value, path)
        super().handle_field_error(raw_error, return_type, field_details_list, path)

    def _overflow(self, value: int, name: str, path: Path) -> IntOverflow:
        """The error of field ``name`` at ``path`` (an item's, for a list) holding ``value``."""
        at: Path | None = path
        while at is not None and at.typename is None:  # a list item's path names no type
            at = at.prev
        parent = None if at is None else self.schema.get_type(at.typename or "")
        field = parent.fields.get(name) if isinstance(parent, GraphQLObjectType) else None
        definition = (
            None if field is None else field.extensions.get(GraphQLCoreConverter.DEFINITION_BACKREF)
        )
        named = (
            definition.metadata.get(INSTEAD) if isinstance(definition, StrawberryField) else None
        )
        owner = parent.name if parent is not None else "?"
        return IntOverflow(
            field=f"{owner}.{name}", value=value, instead=named if isinstance(named, str) else None
        )


class _PastInt(Exception):
    """A value completed as an ``Int`` that does not fit; its field is named where the error
    is located (:meth:`NamedIntOverflow.handle_field_error`, which knows the field)."""

    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value


class LeafShortcutExecution(NamedIntOverflow):
    """Strawberry's execution context, completing plain leaf fields directly, and counting."""

    executed = 0
    """What this operation executed so far, in leaf fields; a subscription's events each run
    on a copy of the executor that resolved its source, so each counts from there."""

    @functools.cached_property
    def _most(self) -> int | None:
        limits = getattr(getattr(self.context_value, "runtime", None), "services", None)
        most = getattr(getattr(limits, "query_limits", None), "max_executed", None)
        return most if isinstance(most, int) else None

    @functools.cached_property
    def _too_much(self) -> ExecutedTooMuch:
        """Raised at every field once over the limit: the answer carries it once."""
        return ExecutedTooMuch(
            f"query is too expensive: it executed more than {self._most} fields (objects and"
            f" lists counting {FIELD_COST}) and was stopped; ask for smaller pages (first),"
            " fewer lists or fewer fields",
            extensions={"code": "VALIDATION"},
        )

    def build_response(
        self, data: dict[str, Any] | None
    ) -> ExecutionResult | ExperimentalIncrementalExecutionResults:
        errors = self.collected_errors.errors
        stopped = [e for e in errors if isinstance(e.original_error, ExecutedTooMuch)]
        if len(stopped) > 1:
            errors[:] = [e for e in errors if e not in stopped[1:]]
        # What the request is charged against its caller's budgets (read_api.ratelimit).
        if isinstance(getattr(self.context_value, "executed", None), int):
            self.context_value.executed += self.executed
        return super().build_response(data)

    @functools.cached_property
    def _plain(self) -> dict[tuple[str, str], _PlainLeaf | None]:
        """Per field of a type: how to complete it directly, or ``None`` (the general path)."""
        return {}

    def execute_field(
        self,
        parent_type: GraphQLObjectType,
        source: object,
        field_details_list: FieldDetailsList,
        path: Path,
        position_context: RefMap[DeferUsage, DeliveryGroup] | None,
    ) -> AwaitableOrValue[Any]:
        node = field_details_list[0].node
        key = (parent_type.name, node.name.value)
        try:
            plain = self._plain[key]
        except KeyError:
            plain = self._plain[key] = self._plain_leaf(parent_type, node.name.value)
        if plain is not None and not node.arguments and not node.directives:
            completed = _complete(plain, source)
            if completed is not _FALL_BACK:
                self.executed += 1
                return completed
        self.executed += FIELD_COST
        most = self._most
        if most is not None and self.executed > most:
            raise self._too_much
        return super().execute_field(
            parent_type, source, field_details_list, path, position_context
        )

    def _plain_leaf(self, parent_type: GraphQLObjectType, name: str) -> _PlainLeaf | None:
        field = parent_type.fields.get(name)
        if field is None or field.args or not getattr(field.resolve, "_is_default", False):
            return None
        resolve = field.resolve
        if (
            self.middleware_manager is not None
            and self.middleware_manager.get_field_resolver(resolve) is not resolve
        ):
            return None
        definition = field.extensions.get(GraphQLCoreConverter.DEFINITION_BACKREF)
        if isinstance(definition, StrawberryField) and definition.default_resolver is getattr:
            # What strawberry's basic resolver does, minus its two calls per field.
            read: Callable[[Any], Any] = attrgetter(definition.python_name)
        else:
            read = partial(_resolve_plainly, resolve)
        kind = field.type
        nullable = not isinstance(kind, GraphQLNonNull)
        if not nullable:
            kind = kind.of_type
        listed = isinstance(kind, GraphQLList)
        items_nullable = True
        if listed:
            kind = kind.of_type
            items_nullable = not isinstance(kind, GraphQLNonNull)
            if not items_nullable:
                kind = kind.of_type
        if not is_leaf_type(kind):
            return None
        return _PlainLeaf(read, kind, nullable, listed, items_nullable)


_FALL_BACK = object()


def _resolve_plainly(resolve: Callable[..., object], source: object) -> object:
    return resolve(source, None)


def _complete(plain: _PlainLeaf, source: object) -> object:
    try:
        value = plain.read(source)
    except Exception:  # noqa: BLE001 — graphql-core's path raises it again, with its path
        return _FALL_BACK
    if value is None:
        return None if plain.nullable else _FALL_BACK
    if isinstance(value, Exception):
        return _FALL_BACK
    if not plain.listed:
        return _coerce(plain.leaf, value)
    if not isinstance(value, list | tuple):
        return _FALL_BACK
    out: list[Any] = []
    for item in value:
        if item is None:
            if not plain.items_nullable:
                return _FALL_BACK
            out.append(None)
            continue
        coerced = _coerce(plain.leaf, item)
        if coerced is _FALL_BACK:
            return _FALL_BACK
        out.append(coerced)
    return out


def _coerce(leaf: GraphQLLeafType, value: object) -> object:
    try:
        coerced = leaf.coerce_output_value(value)
    except Exception:  # noqa: BLE001 — graphql-core's path raises it again, with its path
        return _FALL_BACK
    if coerced is None or coerced is Undefined:
        return _FALL_BACK
    return coerced


__all__ = ["LeafShortcutExecution", "NamedIntOverflow"]
