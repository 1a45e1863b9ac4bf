"""Refusing documents too expensive to run: an estimate of what a query resolves and reads.

Depth, aliases and tokens are bounded by strawberry's own extensions; this adds the one bound
they miss, breadth: an estimate of the objects a document may resolve, each list counted at the
page size it asks for (``first``, or the field's default), plus :data:`READ_COST` (3) for every
read it may make: every root field, and every resolution of a list or field that runs a query
(a board's lanes, a lane's cards, a card's runs, a run's output...), however few objects it
returns. Measured (bench/graphql_cost.py, this 2-core machine, shared): a bare card costs the
API about 30 µs of CPU, one read 55-85 µs whatever its page holds. Counted by objects alone,
the first card of every lane 30 times over cost 12,400 of the 100,000 allowed and 3-4 s of CPU,
8-card pages of every lane with 29 aliased one-run pages under each card 96,400 and 13-17 s,
every other tenant of that process waiting. Counted with their reads they cost 121,000 and
376,000 and are refused, the second before a row is read. The board a client draws (lanes,
their cards, each card's runs, at the default page sizes) costs about 52,000 (46,000 objects,
2,000 reads); lanes x 200 cards x 200 runs is refused before a single row is read.

Two bounds follow from it: fields that fold the event log (whose work is what the log holds,
not what they return) are counted apart, and lists without pages that a workspace makes longer
than estimated (its projects, a project's up to 50 lanes) are estimated again with their real
length when read, a lane's live cards then capping its pages. What the estimate cannot know
(how full the pages it counts will be: 20 lanes of 100 cards of 20 runs each, the board above
realized in full, would take some 3 s) is bounded while the operation runs:
``QueryLimits.max_executed`` (:mod:`read_api.execution`) stops it past 100,000 executed fields,
about 1 s of CPU at the dearest measured (a read, ~8 µs per field it counts; objects 5-6 µs).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import cache, lru_cache
from types import MappingProxyType
from typing import Any

from graphql import (
    ASTValidationRule,
    DocumentNode,
    FieldNode,
    FragmentDefinitionNode,
    FragmentSpreadNode,
    GraphQLError,
    GraphQLSchema,
    InlineFragmentNode,
    IntValueNode,
    NullValueNode,
    ObjectValueNode,
    OperationDefinitionNode,
    SelectionNode,
    SelectionSetNode,
    VariableNode,
    Visitor,
    value_from_ast_untyped,
    visit,
)
from graphql.validation.validate import ValidationAbortedError, validate
from strawberry.extensions import SchemaExtension
from strawberry.schema.validation_rules.maybe_null import MaybeNullValidationRule
from strawberry.schema.validation_rules.one_of import OneOfInputValidationRule
from strawberry.types.graphql import OperationType

from domain.errors import ValidationFailed

#: Page size a list field has when the query does not say ``first``.
DEFAULT_PAGE: Mapping[str, int] = {
    "cards": 100,
    "runs": 20,
    "activity": 50,
    "agentRunLogs": 500,
    "searchLogs": 50,
    "apiKeys": 100,
    "invitations": 100,
}
#: Estimated length of lists without pagination (lanes, members, projects, events, lines).
UNPAGED_LIST = 20
UNPAGED_FIELDS = frozenset(
    {"lanes", "members", "projects", "events", "lines", "discrepancies", "usage"}
)


#: Root fields that fold the event log: their work grows with the log (every event of a
#: project, a card or a month's billing read and decoded), whatever little they return.
LOG_READING_FIELDS = frozenset({"cardHistory", "reconciliation"})
#: Root fields that fold the event log when given this argument (``board(asOf:)``).
LOG_READING_WITH = {"board": "asOf"}


class CostLimiter(SchemaExtension):
    """Refuses an operation whose estimated cost exceeds ``max_cost``, or that folds the event
    log more than ``max_log_reads`` times (code VALIDATION).

    The estimate counts objects returned, and a fold of the log returns few: thirty aliases of
    ``board(asOf:)`` cost it thirty boards, yet held one pooled connection and a worker thread
    for thirty folds of the project's whole history, seconds for a project of a few thousand
    events; a handful of such requests at once took every connection from every tenant.
    """

    def __init__(self, *, max_cost: int, max_log_reads: int = 3) -> None:
        self.max_cost = max_cost
        self.max_log_reads = max_log_reads

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
                # Page sizes and instants as the fields get them: a variable left out takes
                # its default (``$n: Int = 200``), which the estimate must count too.
                given = _given_variables(operation, context.variables or {})
                cost = estimate(operation, fragments, given)
                if cost.total > self.max_cost:
                    raise GraphQLError(
                        f"query is too expensive: {cost.described()}, more than {self.max_cost};"
                        f" {cost.advice()}",
                        extensions={"code": "VALIDATION"},
                    )
                reads = _log_reads(operation.selection_set, fragments, given)
                if len(reads) > self.max_log_reads:
                    raise GraphQLError(
                        f"query reads the event log {len(reads)} times (cardHistory, "
                        f"reconciliation, board with asOf), more than {self.max_log_reads}; "
                        "ask for fewer of them per request",
                        extensions={"code": "VALIDATION"},
                    )
        yield


def _given_variables(
    operation: OperationDefinitionNode, variables: Mapping[str, Any]
) -> Mapping[str, Any]:
    """``variables`` with the operation's defaults (as values) for those not given (what a
    field gets)."""
    given = dict(variables)
    for definition in operation.variable_definitions or ():
        name = definition.variable.name.value
        default = definition.default_value
        if name not in given and default is not None and not isinstance(default, NullValueNode):
            given[name] = value_from_ast_untyped(default)
    return given


def _log_reads(
    selection_set: SelectionSetNode,
    fragments: Mapping[str, FragmentDefinitionNode],
    variables: Mapping[str, Any],
    seen: frozenset[str] = frozenset(),
) -> set[str]:
    """Response keys of the root fields of ``selection_set`` that fold the event log.

    Keys, not occurrences: fields of one key are merged into one execution (a fragment spread
    twice reads once), and every alias is one more fold."""
    keys: set[str] = set()
    for selection in selection_set.selections:
        if isinstance(selection, FieldNode):
            if _folds_the_log(selection, variables):
                keys.add((selection.alias or selection.name).value)
        elif isinstance(selection, InlineFragmentNode):
            keys |= _log_reads(selection.selection_set, fragments, variables, seen)
        elif isinstance(selection, FragmentSpreadNode):
            name = selection.name.value
            fragment = fragments.get(name)
            if fragment is not None and name not in seen:
                keys |= _log_reads(fragment.selection_set, fragments, variables, seen | {name})
    return keys


def _folds_the_log(field: FieldNode, variables: Mapping[str, Any]) -> bool:
    name = field.name.value
    if name in LOG_READING_FIELDS:
        return True
    wanted = LOG_READING_WITH.get(name)
    if wanted is None:
        return False
    for argument in field.arguments or ():
        if argument.name.value == wanted:
            value = argument.value
            if isinstance(value, NullValueNode):
                return False
            if isinstance(value, VariableNode):
                return variables.get(value.name.value) is not None
            return True
    return False


MAX_CACHED_DOCUMENT_CHARS = 32_768
"""Longer documents are parsed and validated afresh each time, not kept by the caches: these
hold 512 documents each, whatever their size, and a string literal of nearly a megabyte passes
every other limit, so one user's 512 requests held half a gigabyte or more until others pushed
them out. Documents clients send are a few kilobytes."""


class BoundedValidation(SchemaExtension):
    """Strawberry's validation (cached), for documents whose fragments expand them to at most
    ``max_selections`` fields nesting at most ``max_nesting`` levels deep; any other document
    is refused (code VALIDATION) without being validated.

    The token limit bounds what a document says, not what it means: fragments that each spread
    the next one twice make a document of a few hundred bytes stand for 2^n fields, and the
    depth and alias rules (strawberry's) and the cost estimate all walk it expanded, each spread
    again, in the event loop; fragments that each spread the next, a few hundred deep, nest
    past what the parser allows for fields, and the depth rule ran out of stack on them. Here
    each fragment is measured once, so the check costs what the document's text does. The
    refusal is the validation's result (``pre_execution_errors``), so queries and subscriptions
    alike answer it as they answer any invalid document.
    """

    def __init__(self, *, maxsize: int, max_selections: int, max_nesting: int = 64) -> None:
        super().__init__()
        self._validated = _validation_cache(maxsize)
        self.max_selections = max_selections
        self.max_nesting = max_nesting

    def on_validate(self) -> Iterator[None]:
        context = self.execution_context
        document = context.graphql_document
        if document is not None:
            refusal = self._refusal(document, context.query)
            if refusal is not None:
                errors = [refusal]
            elif len(context.query or "") > MAX_CACHED_DOCUMENT_CHARS:
                errors = validate_bounded(
                    context.schema._schema, document, context.validation_rules
                )
            else:
                errors = self._validated(context.schema._schema, document, context.validation_rules)
            context.pre_execution_errors = _explained(errors)
        yield

    def _refusal(self, document: DocumentNode, text: str | None) -> GraphQLError | None:
        fragments = {
            d.name.value: d for d in document.definitions if isinstance(d, FragmentDefinitionNode)
        }
        operations = sum(isinstance(d, OperationDefinitionNode) for d in document.definitions)
        if operations > MAX_OPERATIONS:
            return GraphQLError(
                f"query holds {operations} operations, more than {MAX_OPERATIONS} operations; "
                "send the one to run (or a few, with operationName)",
                extensions={"code": "VALIDATION"},
            )
        measure = _Expansion(fragments, self.max_selections, self.max_nesting)
        for definition in document.definitions:
            if isinstance(definition, OperationDefinitionNode):
                try:
                    size, _ = measure(definition.selection_set, level=0)
                except _TooDeep:
                    return GraphQLError(
                        f"query is nested too deeply: more than {self.max_nesting} levels "
                        "of fields and fragments",
                        extensions={"code": "VALIDATION"},
                    )
                if size > self.max_selections:
                    return GraphQLError(
                        f"query is too large: its fragments expand it to more than "
                        f"{self.max_selections} fields; spread fewer fragments",
                        extensions={"code": "VALIDATION"},
                    )
        # Each field of an input object is written with a colon: a text with no more colons
        # than the bound (nearly every document) holds no wider object, and needs no walk.
        if text is None or text.count(":") > MAX_INPUT_OBJECT_FIELDS:
            widest = _WidestInputObject()
            visit(document, widest)
            if widest.fields > MAX_INPUT_OBJECT_FIELDS:
                return GraphQLError(
                    f"query has an input object of {widest.fields} fields; no input takes "
                    f"more than {MAX_INPUT_OBJECT_FIELDS}",
                    extensions={"code": "VALIDATION"},
                )
        return None


MAX_OPERATIONS = 50
"""How many operations a document may hold. One is run, but each is validated: 800 (within
the token limit) took half a second of the event loop. A client sends the one it runs, or a
file of its operations naming one, far fewer than this."""

MAX_VALIDATION_ERRORS = 10
"""Validation stops after this many errors (graphql-core's own limit is 100). Each unknown
field's error computes suggestions against every field of its type: a document of thousands of
them spent a fifth of a second of the event loop on its first 100 errors, where the first few
say what to mend."""


def validate_bounded(
    schema: GraphQLSchema, document: DocumentNode, rules: tuple[type[ASTValidationRule], ...]
) -> list[GraphQLError]:
    """Strawberry's validation (its rules added to ``rules``), stopping after
    :data:`MAX_VALIDATION_ERRORS` errors."""
    every = (*rules, MaybeNullValidationRule, OneOfInputValidationRule)
    return validate(schema, document, every, max_errors=MAX_VALIDATION_ERRORS)


@cache
def _validation_cache(maxsize: int) -> Callable[..., list[GraphQLError]]:
    """:func:`validate_bounded` behind an LRU cache of ``maxsize`` shared by every request (the
    schema, the document parsed once by the document cache and the rules built once are the same
    objects each time), as strawberry's validation cache is."""
    return lru_cache(maxsize=maxsize)(validate_bounded)


MAX_INPUT_OBJECT_FIELDS = 50
"""How many fields an input object written in a document may hold: no input type of the schema
has more than a few (StartAgentRunInput: 7). Validation answers each unknown field with an error
that prints the whole object: 1,300 fields (within the token limit) made 100 errors of 13 KB,
3 s of the event loop, every other request waiting."""


class _WidestInputObject(Visitor):
    """The most fields any input object literal of a document holds."""

    def __init__(self) -> None:
        super().__init__()
        self.fields = 0

    def enter_object_value(self, node: ObjectValueNode, *_: object) -> None:
        self.fields = max(self.fields, len(node.fields))


_ABORTED = "Validation aborted."


def _explained(errors: list[GraphQLError]) -> list[GraphQLError]:
    """``errors``, with graphql-core's word for a validation that ran out of its work budget (or
    of stack) said so that a client knows what to change; a new list (the cache keeps its own)."""
    if not any(type(e) is ValidationAbortedError and e.message == _ABORTED for e in errors):
        return errors
    return [
        GraphQLError(
            "query is too complex to validate: it asks for fields of the same name too many "
            "times over; ask for each field once",
            extensions={"code": "VALIDATION"},
        )
    ]


class _TooDeep(Exception):
    """A selection nests past the bound."""


class _Expansion:
    """The fields of a selection set with its fragments spread, and how deep it nests; each
    fragment measured once. A fragment spread inside itself (a cycle, which validation
    refuses) counts nothing. Sizes saturate just past ``most``: only exceeding it matters."""

    def __init__(
        self, fragments: Mapping[str, FragmentDefinitionNode], most: int, deepest: int
    ) -> None:
        self.fragments = fragments
        self.most = most
        self.deepest = deepest
        self.known: dict[str, tuple[int, int]] = {}
        self.open: set[str] = set()

    def __call__(self, selection_set: SelectionSetNode | None, *, level: int) -> tuple[int, int]:
        """``(fields, levels)`` of a selection set found ``level`` levels deep."""
        if selection_set is None:
            return 0, 0
        if level >= self.deepest:
            raise _TooDeep
        total, height = 0, 0
        for selection in selection_set.selections:
            if isinstance(selection, FieldNode):
                size, below = self(selection.selection_set, level=level + 1)
                size += 1
            elif isinstance(selection, InlineFragmentNode):
                size, below = self(selection.selection_set, level=level + 1)
            elif isinstance(selection, FragmentSpreadNode):
                size, below = self._fragment(selection.name.value, level=level + 1)
            else:  # pragma: no cover - the three kinds of selection
                continue
            total = min(total + size, self.most + 1)
            height = max(height, below + 1)
        return total, height

    def _fragment(self, name: str, *, level: int) -> tuple[int, int]:
        known = self.known.get(name)
        if known is None:
            fragment = self.fragments.get(name)
            if fragment is None or name in self.open:
                return 0, 0
            self.open.add(name)
            try:
                known = self(fragment.selection_set, level=level)
            finally:
                self.open.discard(name)
            self.known[name] = known
        if level + known[1] > self.deepest:
            raise _TooDeep
        return known


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
#: Fields below the root whose every resolution reads (a DataLoader's batch, a page of a
#: LATERAL query) and builds what it returns; every root field reads as well.
READING_FIELDS = frozenset(
    {
        "members", "projects", "spentThisMonth", "apiKeys", "invitations",
        "lanes", "cards", "runs", "attempts", "output",
    }
)  # fmt: skip
#: What one read costs besides the objects it returns, in objects: a lane's page of cards or a
#: card's page of runs took 55-85 µs of the API's CPU empty or with one item, a bare card about
#: 30 µs (bench/graphql_cost.py, 2026-12-07); rounded up.
READ_COST = 3


@dataclass(frozen=True)
class Estimate:
    """What an operation may cost: ``objects`` it may return and ``reads`` it may make (lists
    and fields resolved by a query), each read costing :data:`READ_COST` objects besides."""

    objects: int = 0
    reads: int = 0

    @property
    def total(self) -> int:
        return self.objects + READ_COST * self.reads

    def __add__(self, other: Estimate) -> Estimate:
        return Estimate(self.objects + other.objects, self.reads + other.reads)

    def described(self) -> str:
        return (
            f"it may resolve about {self.objects} objects in {self.reads} lists or reads"
            f" (cost {self.total}, each read counted as {READ_COST} objects)"
        )

    def advice(self) -> str:
        """What to reduce: whichever of the two makes most of the cost."""
        if READ_COST * self.reads >= self.objects:
            return (
                "ask for fewer lists: fewer aliases of a list field, fewer lists nested"
                " in each item of another (smaller pages of the outer list help too)"
            )
        return "ask for smaller pages (first) or fewer fields"


def estimate(
    operation: OperationDefinitionNode,
    fragments: Mapping[str, FragmentDefinitionNode],
    variables: Mapping[str, Any],
    *,
    lengths: Mapping[str, int] = MappingProxyType({}),
) -> Estimate:
    """The cost of ``operation``; ``lengths``: the known length of lists without pages, by
    field name (else :data:`UNPAGED_LIST` each), and the most items a page of a paged field
    can hold (else its page size)."""
    return _cost(
        operation.selection_set,
        fragments,
        variables,
        multiplier=1,
        depth=0,
        root=True,
        lengths=lengths,
    )


def _cost(
    selection_set: SelectionSetNode | None,
    fragments: Mapping[str, FragmentDefinitionNode],
    variables: Mapping[str, Any],
    *,
    multiplier: int,
    depth: int,
    root: bool = False,
    connections: int | None = None,
    lengths: Mapping[str, int] = MappingProxyType({}),
) -> Estimate:
    """Objects the selection may resolve, and reads it may make, when its parent stands for
    ``multiplier`` objects.

    A list multiplies what is under it by the page size asked (``first``, else the field's
    default); ``edges``/``node`` only wrap a connection's items and ``pageInfo`` comes once per
    connection (``connections`` of them), so a board with its lanes, cards and runs costs what
    it may return rather than a product of every nesting level. Scalars cost nothing of their
    own: the objects that hold them were counted. A field that reads (a root field, or one of
    :data:`READING_FIELDS`, a scalar among them) is a read each time its parent is resolved,
    whatever it returns: a page of one card cost a lane as much as a page of five.
    """
    if selection_set is None or depth > 50:
        return Estimate()
    total = Estimate()
    for selection in selection_set.selections:
        if isinstance(selection, FieldNode):
            field = selection.name.value
            reads = (root and not field.startswith("__")) or field in READING_FIELDS
            if selection.selection_set is None:
                if reads:
                    total += Estimate(reads=multiplier)
                continue
            owner = multiplier
            if field in CONNECTION_WRAPPERS:
                total += _cost(
                    selection.selection_set, fragments, variables,
                    multiplier=multiplier, depth=depth + 1, lengths=lengths,
                )  # fmt: skip
                continue
            if field in PER_CONNECTION and connections is not None:
                owner = connections
            page = _page(selection, variables)
            if page is None and field in DEFAULT_PAGE:
                page = DEFAULT_PAGE[field]
            if page is not None and field in DEFAULT_PAGE and field in lengths:
                page = min(page, lengths[field])
            if page is None and field in UNPAGED_FIELDS:
                page = lengths.get(field, UNPAGED_LIST)
            inner = owner * max(page if page is not None else 1, 1)
            total += Estimate(objects=inner, reads=owner if reads else 0)
            total += _cost(
                selection.selection_set,
                fragments,
                variables,
                multiplier=inner,
                depth=depth + 1,
                connections=owner if page is not None else None,
                lengths=lengths,
            )
        else:
            # A fragment's fields stand where it is spread: they cost what they would there.
            total += _cost(
                _fragment_selections(selection, fragments),
                fragments,
                variables,
                multiplier=multiplier,
                depth=depth + 1,
                root=root,
                connections=connections,
                lengths=lengths,
            )
    return total


def _fragment_selections(
    selection: SelectionNode, fragments: Mapping[str, FragmentDefinitionNode]
) -> SelectionSetNode | None:
    """The selections of an inline fragment or of a spread's fragment (``None``: an unknown
    fragment, which validation refuses)."""
    if isinstance(selection, InlineFragmentNode):
        return selection.selection_set
    if isinstance(selection, FragmentSpreadNode):
        fragment = fragments.get(selection.name.value)
        return None if fragment is None else fragment.selection_set
    return None


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


def refuse_longer_than_estimated(
    operation: OperationDefinitionNode,
    fragments: Mapping[str, FragmentDefinitionNode],
    variables: Mapping[str, Any],
    *,
    field: str,
    length: int,
    known: dict[str, int],
    max_cost: int,
    fullest: Mapping[str, int] = MappingProxyType({}),
    estimates: dict[tuple[tuple[str, int], ...], Estimate] | None = None,
) -> None:
    """Refuse (VALIDATION) once a list without pages turns out longer than the estimate took
    it to be (20) and the operation, estimated again with its real length, costs too much.

    How many projects (or members) a workspace has is the workspace's to decide, without
    bound, and a project may have up to 50 lanes: a tenant of a few hundred 50-lane projects
    asked for every board's cards at once, in a document the estimate passed, and held the
    event loop (every tenant's requests) for many seconds. Checked when the list is read, the
    only time its length is known; ``known`` keeps the longest of each list read so far in
    the request (updated here), so projects and their lanes multiply, and every list read
    after a refusal is refused too (each project's lanes, not only the first's). ``fullest``:
    the most items the list's items hold in a paged field (a lane's live cards), which then
    caps that field's pages: a board of 50 lanes of a few cards each is as cheap as it looks.
    ``estimates`` (the request's) keeps each set of lengths' estimate: the lengths change a few
    times in a request, the lists are read once per object above them (each project's lanes).
    """
    known[field] = max(length, known.get(field, 0))
    for paged, most in fullest.items():
        known[paged] = max(most, known.get(paged, 0))
    if max(known.get(f, 0) for f in UNPAGED_FIELDS) <= UNPAGED_LIST:
        return
    lengths = tuple(sorted(known.items()))
    cost = None if estimates is None else estimates.get(lengths)
    if cost is None:
        cost = estimate(operation, fragments, variables, lengths=known)
        if estimates is not None:
            estimates[lengths] = cost
    if cost.total > max_cost:
        longer = ", ".join(
            f"{n} {f}" for f, n in known.items() if f in UNPAGED_FIELDS and n > UNPAGED_LIST
        )
        raise ValidationFailed(
            f"query is too expensive: with {longer} {cost.described()}, more than {max_cost};"
            f" {cost.advice()}, or read them one at a time"
        )
