"""What a projector is, and the table names it writes through.

A projector turns envelopes into read-model rows. It never loads an aggregate: every event is
self-describing. It writes through :class:`Tables`, so the same code fills the live tables or, in a
rebuild, fresh copies that are swapped in afterwards.
"""

from __future__ import annotations

import string
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from psycopg import sql

if TYPE_CHECKING:
    from psycopg import Cursor
    from psycopg.rows import DictRow

    from domain.budget_holds import CountedSpend
    from domain.envelope import EventEnvelope
    from domain.events import EventPayload


@dataclass(frozen=True)
class Change:
    """A read-model change worth telling subscribers about, published after commit."""

    channel: str
    payload: dict[str, Any]


class Tables:
    """Logical read-model table names mapped to physical ones, with compiled statements."""

    def __init__(self, names: Mapping[str, str] | None = None) -> None:
        self._names = dict(names or {})
        self._compiled: dict[str, sql.Composed] = {}

    def name(self, logical: str) -> str:
        return self._names.get(logical, logical)

    def q(self, template: str) -> sql.Composed:
        """``template`` with ``{rm_cards}``-style placeholders bound to the physical tables."""
        compiled = self._compiled.get(template)
        if compiled is None:
            compiled = sql.SQL(template).format(
                **{key: sql.Identifier(self.name(key)) for key in _placeholders(template)}
            )
            self._compiled[template] = compiled
        return compiled


def _placeholders(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


@dataclass
class BatchContext:
    """Where and how a batch is applied."""

    cur: Cursor[DictRow]
    tables: Tables
    changes: list[Change] | None
    """Where to append changes for subscribers; None when nobody listens (a rebuild)."""
    copy: bool = False
    """The tables are a rebuild's private, fresh copies, written by this runner alone and not yet
    under row-level security: plain inserts may use ``COPY``, and no pipeline is open."""
    memo: dict[str, Any] = field(default_factory=dict)
    """A projector's scratch space. Fresh for every batch, except in a rebuild (``exclusive``),
    where it lives for the whole replay: nothing else writes the tables, so what a projector
    remembers of them stays true."""
    exclusive: bool = False
    spend: list[CountedSpend] | None = None
    """Where the billing projector notes each workspace-month's usage it committed, for the
    Redis spend counter; None in a rebuild (its tables are not the live ones yet)."""


#: Set in a rebuild's ``memo`` when the runner dropped it: a batch failed and was rolled back
#: (what the projectors remembered of it was never written). A projector must then read from the
#: tables whatever its memo lacks, never take the memo for complete.
MEMO_DROPPED = "runner.memo_dropped"


def rebuild_memo(ctx: BatchContext, key: str, limit: int) -> tuple[dict[Any, Any], bool]:
    """A projector's memory of the rows it wrote, kept in ``ctx.memo`` under ``key``, and whether
    it holds all of them (then what it lacks is not in the tables either).

    Only a rebuild (``copy`` and ``exclusive``) remembers across batches; any other batch gets a
    fresh, empty memory that knows nothing. Past ``limit`` entries the memory is emptied and is
    never complete again, nor once the runner dropped it (:data:`MEMO_DROPPED`).
    """
    if not (ctx.copy and ctx.exclusive):
        return {}, False
    remembered: dict[Any, Any] = ctx.memo.setdefault(key, {})
    if len(remembered) > limit:
        remembered.clear()
        ctx.memo[key + ".partial"] = True
    return remembered, key + ".partial" not in ctx.memo and MEMO_DROPPED not in ctx.memo


class Projector(ABC):
    """A named read model: the aggregates it follows, the tables it owns, and its fold.

    The fold (:meth:`apply_batch`) is the projector's one implementation: the runner hands it
    every batch, and a batch of one event when it must tell which event fails. Every domain event
    is either in ``handles`` or in ``ignores``, so a new event makes each projector's owner
    decide (``tests/unit/test_event_contract.py``). Events of a followed aggregate that are not
    handled still advance the projector's version of that aggregate, which is what lets gaps be
    detected.
    """

    name: ClassVar[str]
    aggregates: ClassVar[frozenset[str]]
    tables: ClassVar[tuple[str, ...]]
    handles: ClassVar[frozenset[type[EventPayload]]]
    """Domain events the fold applies: the keys of the tables it dispatches on, so that what is
    declared here is what runs."""
    ignores: ClassVar[frozenset[type[EventPayload]]]
    """Domain events this projector has nothing to do with, named so that none is overlooked."""
    revision: ClassVar[int] = 1
    """Bumped by a change after which rows built by older code are wrong or missing (a table
    filled from older events, a column computed otherwise): ``agentworks migrate`` then rebuilds
    read models built at a lower revision (see :mod:`projections.revisions`)."""

    def follows(self, envelope: EventEnvelope) -> bool:
        return envelope.aggregate in self.aggregates

    @abstractmethod
    def apply_batch(self, ctx: BatchContext, envelopes: Sequence[EventEnvelope]) -> None:
        """Apply ``envelopes`` (in log order, none of them applied before) to the tables of
        ``ctx``, and note the changes subscribers are told about, in event order."""


def unread_by(projectors: Iterable[Projector]) -> frozenset[str]:
    """The event types whose payload every one of ``projectors`` ignores: a read of the log
    for them alone need not decode those (``EventLog.read_following``)."""
    ignored = [frozenset(event.event_type for event in p.ignores) for p in projectors]
    return frozenset.intersection(*ignored) if ignored else frozenset()
