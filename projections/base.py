"""What a projector is, and the table names it writes through.

A projector turns envelopes into read-model rows. It never loads an aggregate: every event is
self-describing. It writes through :class:`Tables`, so the same code fills the live tables or, in a
rebuild, fresh copies that are swapped in afterwards.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from psycopg import sql

if TYPE_CHECKING:
    from psycopg import Cursor
    from psycopg.rows import DictRow

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


HandlerMethod = Callable[..., None]


def on(*events: type[EventPayload]) -> Callable[[HandlerMethod], HandlerMethod]:
    """Mark a projector method as the handler of the given events (``CardMoved``); it is called
    as ``method(cur, envelope, event, tables, changes)`` with the envelope's typed payload."""

    def mark(method: HandlerMethod) -> HandlerMethod:
        method.__dict__["_handles"] = events
        return method

    return mark


class Projector:
    """A named read model: the aggregates it follows, the tables it owns, its event handlers.

    Every domain event is either handled (``@on``) or named in ``ignores``, so a new event makes
    each projector's owner decide (``tests/unit/test_event_contract.py``). Events of a followed
    aggregate without a handler still advance the projector's version of that aggregate, which
    is what lets gaps be detected.
    """

    name: ClassVar[str]
    aggregates: ClassVar[frozenset[str]]
    tables: ClassVar[tuple[str, ...]]
    ignores: ClassVar[frozenset[type[EventPayload]]]
    """Domain events this projector has nothing to do with, named so that none is overlooked."""
    _handlers: ClassVar[dict[type[EventPayload], str]] = {}

    def __init_subclass__(cls) -> None:
        super().__init_subclass__()
        handlers: dict[type[EventPayload], str] = {}
        for klass in reversed(cls.__mro__):
            for attr, value in vars(klass).items():
                for event in getattr(value, "_handles", ()):
                    handlers[event] = attr
        cls._handlers = handlers

    @classmethod
    def handled(cls) -> frozenset[type[EventPayload]]:
        """The domain events this projector applies."""
        return frozenset(cls._handlers)

    def follows(self, envelope: EventEnvelope) -> bool:
        return envelope.aggregate in self.aggregates

    def apply(
        self,
        cur: Cursor[DictRow],
        envelope: EventEnvelope,
        tables: Tables,
        changes: list[Change],
    ) -> None:
        event = envelope.event
        method = self._handlers.get(type(event))
        if method is not None:
            getattr(self, method)(cur, envelope, event, tables, changes)
