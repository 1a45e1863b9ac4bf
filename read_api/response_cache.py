"""Answers of read-only GraphQL queries kept per read-model version, so a repeated query (the
board every client polls) costs a cache lookup instead of an execution.

Why it is never stale: an answer is stored under the read models' version that its request read
*first*, in the first statement of its transaction (``ReadScope(versioned=True)``,
``projections.progress_queries.scope_reading_version``), and served only to a request that reads
that same version. Every projector transaction that changes read-model rows of a workspace also
bumps that workspace's version, so an unchanged version means no such commit happened in
between: the stored answer is what executing the query now would read (or newer, never older).
Nothing depends on change notifications arriving, so it is equally right on every API instance,
and a consistency token needs nothing more: the wait for it happens before the version is read,
and a version read after the projectors applied the write cannot be one from before it.

What may be cached is decided once per document, from the fields it selects
(:data:`CACHEABLE_FIELDS`): queries whose every field is read from read-model rows of the
caller's workspace, whatever the clock, the user (beyond membership) or the event store say.
``board(asOf:)``, ``cardHistory``, ``me``, ``spentThisMonth``, introspection and mutations
always execute. The key is the document, the operation name, the variables and the caller's
workspace and role; only tokens with a home workspace are served from it (a user token's
workspace is resolved per object, from the write side). Membership is still checked on every
request, in the same transaction that reads the version (a removed member reads nothing, as
before); authentication, rate limits and consistency waits all happen before the cache is asked.
Only answers without errors are kept: errors, outages and refusals are produced afresh each time.

The version is the caller's workspace's (``projections.read_versions``): a counter per projector
bumped by every projector commit that applied an event of that workspace, and a global epoch
bumped by a rebuild's swap and by events of no workspace. An answer reads rows of the caller's
workspace only (row-level security), so a commit in another workspace cannot change it, and does
not evict it: a busy tenant leaves its neighbours' answers served.

Concurrent misses of one key at one version execute once (:meth:`ResponseCache.serve`): the first
executes, the others wait for its answer, which is the one they would have read (same version). If
it keeps nothing (an error, a refusal, a cancelled request), each executes on its own, as it
would without a cache.
"""

from __future__ import annotations

import asyncio
import json
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from graphql import (
    FieldNode,
    FragmentDefinitionNode,
    FragmentSpreadNode,
    GraphQLError,
    GraphQLObjectType,
    InlineFragmentNode,
    OperationDefinitionNode,
    OperationType,
    SelectionSetNode,
    get_named_type,
    parse,
)
from prometheus_client import Counter

if TYPE_CHECKING:
    from graphql import GraphQLSchema

    from adapters.tokens import Principal

#: Per object type, the fields whose value comes only from read-model rows of the caller's
#: workspace (through its ``ReadScope``). Listed, not derived: a field added later is not cached
#: until someone decides it may be.
CACHEABLE_FIELDS: Mapping[str, frozenset[str]] = {
    "Query": frozenset({"workspace", "project", "board", "card", "agentRun"}),
    "Workspace": frozenset(
        {
            "id",
            "name",
            "markup",
            "billingIncrement",
            "monthlyLimit",
            "version",
            "createdAt",
            "updatedAt",
            "members",
            "projects",
        }
    ),
    "Member": frozenset({"userId", "role"}),
    "Project": frozenset({"id", "workspaceId", "name", "archived", "createdAt", "board"}),
    "Board": frozenset({"projectId", "version", "lanes"}),
    "Lane": frozenset({"name", "wipLimit", "count", "cards"}),
    "CardConnection": frozenset({"edges", "pageInfo"}),
    "CardEdge": frozenset({"node", "cursor"}),
    "PageInfo": frozenset({"hasNextPage", "hasPreviousPage", "startCursor", "endCursor"}),
    "Card": frozenset(
        {
            "id",
            "projectId",
            "title",
            "description",
            "lane",
            "position",
            "assignee",
            "labels",
            "blockedReason",
            "archived",
            "version",
            "createdAt",
            "updatedAt",
            "cost",
            "lastRun",
            "runs",
        }
    ),
    "AgentRun": frozenset(
        {
            "id",
            "cardId",
            "projectId",
            "agent",
            "status",
            "provider",
            "model",
            "inputTokens",
            "outputTokens",
            "providerCost",
            "billed",
            "maxCost",
            "llmCalls",
            "requestedAt",
            "startedAt",
            "finishedAt",
            "error",
            "logLineCount",
            "version",
            "output",
            "attempts",
        }
    ),
    "AgentRunConnection": frozenset({"edges", "pageInfo"}),
    "AgentRunEdge": frozenset({"cursor", "node"}),
    "ProviderAttempt": frozenset(
        {
            "attempt",
            "provider",
            "model",
            "status",
            "httpStatus",
            "error",
            "latencyMs",
            "inputTokens",
            "outputTokens",
            "providerCost",
            "estimated",
        }
    ),
}
#: Arguments that make an otherwise cacheable field read something else (the event store).
UNCACHEABLE_ARGUMENTS: Mapping[tuple[str, str], frozenset[str]] = {
    ("Query", "board"): frozenset({"asOf"}),
}

LOOKUPS = Counter(
    "agentworks_graphql_response_cache_total",
    "Lookups of the GraphQL response cache by outcome: hit, or miss (not kept, or kept at an "
    "older read-model version); queries it may not answer are not counted. shared: misses "
    "answered by a concurrent execution of the same query at the same version (counted among "
    "the misses too).",
    ["outcome"],
)
_HIT = LOOKUPS.labels("hit")
_MISS = LOOKUPS.labels("miss")
_SHARED = LOOKUPS.labels("shared")

DEFAULT_MAX_ENTRIES = 512
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
_MAX_DOCUMENTS = 1024
_MAX_DOCUMENT_CHARS = 32_768
"""Longer documents execute: their keys would cost more memory than they save CPU."""


def render(value: object) -> bytes:
    """JSON exactly as Starlette's ``JSONResponse`` renders it, so a cached answer is byte for
    byte the answer an execution gives."""
    return json.dumps(
        value, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":")
    ).encode("utf-8")


@dataclass(frozen=True, slots=True)
class Entry:
    version: str
    data: bytes
    """``data`` of the answer, rendered."""
    extensions: dict[str, Any]
    size: int
    """Bytes it holds: the rendered data and the key's document and variables."""


Key = tuple[str, str | None, str, str, str]
T = TypeVar("T")


class Flight:
    """One execution under way of a key at a version, that concurrent misses of the same wait
    for instead of executing it again."""

    __slots__ = ("_landed", "entry")

    def __init__(self) -> None:
        self._landed = asyncio.Event()
        self.entry: Entry | None = None

    async def wait(self) -> Entry | None:
        """The entry the execution kept, once it ends (``None``: it kept nothing).

        Each waiter waits on the event, not on a shared future: one cancelled waiter (its client
        gone) cancels nobody else."""
        await self._landed.wait()
        return self.entry

    def land(self, entry: Entry | None) -> None:
        self.entry = entry
        self._landed.set()


class ResponseCache:
    """Rendered answers by (document, operation, variables, workspace, role), each valid at one
    read-model version; least recently used first out, bounded in entries and bytes.

    Used from the event loop only (no locks).
    """

    def __init__(
        self,
        schema: GraphQLSchema,
        *,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        self._schema = schema
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._entries: OrderedDict[Key, Entry] = OrderedDict()
        self._bytes = 0
        self._documents: OrderedDict[tuple[str, str | None], bool] = OrderedDict()
        self._flights: dict[tuple[Key, str], Flight] = {}
        self.hits = 0
        self.misses = 0
        self.shared = 0

    @property
    def enabled(self) -> bool:
        return self._max_entries > 0

    def key(
        self,
        principal: Principal,
        workspace_id: object,
        query: str,
        variables: Mapping[str, Any] | None,
        operation_name: str | None,
    ) -> Key | None:
        """The key of this request's answer; ``None`` when it must execute."""
        if (
            not self.enabled
            or workspace_id is None
            or principal.is_user
            or len(query) > _MAX_DOCUMENT_CHARS
        ):
            return None
        if not self.cacheable(query, operation_name):
            return None
        try:
            canonical = json.dumps(variables, sort_keys=True, separators=(",", ":"))
        except (TypeError, ValueError):
            return None
        if len(canonical) > _MAX_DOCUMENT_CHARS:
            return None
        return (query, operation_name, canonical, str(workspace_id), str(principal.role))

    def get(self, key: Key, version: str) -> Entry | None:
        entry = self._entries.get(key)
        if entry is None or entry.version != version:
            self.misses += 1
            _MISS.inc()
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        _HIT.inc()
        return entry

    async def serve(
        self,
        key: Key,
        version: str,
        execute: Callable[[], Awaitable[T]],
        keep: Callable[[T], Entry | None],
    ) -> Entry | T:
        """The answer of ``key`` at ``version``: the one kept, else the one a concurrent
        execution of the same keeps (it is waited for), else ``execute()``'s result, which
        ``keep`` may keep (returning the entry kept) for later requests and for the ones that
        waited."""
        hit = self.get(key, version)
        if hit is not None:
            return hit
        flight = self._flights.get((key, version))
        if flight is not None:
            hit = await flight.wait()
            if hit is not None:
                self.shared += 1
                _SHARED.inc()
                return hit
            # It kept nothing (an error, a refusal, its client gone): execute as without a cache.
            result = await execute()
            keep(result)
            return result
        flight = self._flights[(key, version)] = Flight()
        kept: Entry | None = None
        try:
            result = await execute()
            kept = keep(result)
            return result
        finally:
            del self._flights[(key, version)]
            flight.land(kept)

    def put(
        self, key: Key, version: str, data: object, extensions: Mapping[str, Any]
    ) -> Entry | None:
        """Keep an answer; the entry kept (``None``: too large to keep)."""
        rendered = render(data)
        entry = Entry(
            version, rendered, dict(extensions), len(rendered) + len(key[0]) + len(key[2])
        )
        if entry.size > self._max_bytes:
            return None
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= old.size
        self._entries[key] = entry
        self._bytes += entry.size
        while len(self._entries) > self._max_entries or self._bytes > self._max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self._bytes -= evicted.size
        return entry

    def cacheable(self, query: str, operation_name: str | None) -> bool:
        """Whether the operation only selects :data:`CACHEABLE_FIELDS` (decided once per
        document)."""
        if len(query) > _MAX_DOCUMENT_CHARS:
            return False
        memo = (query, operation_name)
        known = self._documents.get(memo)
        if known is None:
            known = self._decide(query, operation_name)
            self._documents[memo] = known
            if len(self._documents) > _MAX_DOCUMENTS:
                self._documents.popitem(last=False)
        return known

    def _decide(self, query: str, operation_name: str | None) -> bool:
        try:
            document = parse(query)
        except GraphQLError:
            return False
        operations = [d for d in document.definitions if isinstance(d, OperationDefinitionNode)]
        if operation_name is not None:
            operations = [o for o in operations if o.name and o.name.value == operation_name]
        if len(operations) != 1 or operations[0].operation != OperationType.QUERY:
            return False
        fragments = {
            d.name.value: d for d in document.definitions if isinstance(d, FragmentDefinitionNode)
        }
        root = self._schema.query_type
        if root is None:
            return False
        return _reads_only_read_models(operations[0].selection_set, root, fragments, set(), {})


def _reads_only_read_models(
    selection_set: SelectionSetNode,
    parent: GraphQLObjectType,
    fragments: Mapping[str, FragmentDefinitionNode],
    spreading: set[str],
    judged: dict[str, bool],
) -> bool:
    """Whether the selection reads only :data:`CACHEABLE_FIELDS`; ``judged`` keeps each
    fragment's verdict (its type condition is its parent's), so a fragment spread many times is
    walked once: this runs in the event loop, before the schema's limits, and fragments that
    each spread the next twice would otherwise be walked 2^n times."""
    allowed = CACHEABLE_FIELDS.get(parent.name, frozenset())
    for selection in selection_set.selections:
        if isinstance(selection, FieldNode):
            name = selection.name.value
            if name == "__typename":
                continue
            if name not in allowed or (field := parent.fields.get(name)) is None:
                return False
            refused = UNCACHEABLE_ARGUMENTS.get((parent.name, name), frozenset())
            if any(argument.name.value in refused for argument in selection.arguments or ()):
                return False
            if selection.selection_set is not None:
                inner = get_named_type(field.type)
                if not isinstance(inner, GraphQLObjectType) or not _reads_only_read_models(
                    selection.selection_set, inner, fragments, spreading, judged
                ):
                    return False
        elif isinstance(selection, InlineFragmentNode):
            condition = selection.type_condition
            if condition is not None and condition.name.value != parent.name:
                return False
            if not _reads_only_read_models(
                selection.selection_set, parent, fragments, spreading, judged
            ):
                return False
        elif isinstance(selection, FragmentSpreadNode):
            name = selection.name.value
            fragment = fragments.get(name)
            if (
                fragment is None
                or name in spreading
                or fragment.type_condition.name.value != parent.name
            ):
                return False
            verdict = judged.get(name)
            if verdict is None:
                verdict = judged[name] = _reads_only_read_models(
                    fragment.selection_set, parent, fragments, spreading | {name}, judged
                )
            if not verdict:
                return False
        else:
            return False
    return True


__all__ = ["CACHEABLE_FIELDS", "Entry", "Flight", "Key", "ResponseCache", "render"]
