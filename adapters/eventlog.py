"""Reading the event log as envelopes: in global order (fan-out) or per aggregate (healing).

Decoding is on the path of every projector, the relay and every rebuild, so it has a fast path.
The library's way is two passes: the mapper turns the stored JSON into a domain event (UUIDs,
datetimes and decimals as objects), then :func:`~domain.envelope.envelope_from_event` turns
those objects back into JSON-safe strings and validates the envelope. The fast path parses the
stored JSON once with ``orjson``, replaces the transcoded values with their JSON-safe form, and
builds the envelope without validating what it already knows to be well-typed. It covers
exactly what the library's JSON transcoder with its standard transcodings (UUID, datetime,
Decimal) writes, with no cipher or compressor and no upcasting to do; anything else (an unknown
transcoding, an event stored at an older ``class_version``, a float, an integer beyond 64 bits,
a malformed state) takes the library's path, so the result, and any error, is the same either
way. ``tests/unit/test_event_log_decoding.py`` holds the two paths to the same envelopes.

Reading in global order fetches plain rows (binary, no per-row objects) with the recorder's own
statement and horizon rule (see :mod:`adapters.eventstore`), when the recorder offers them.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from itertools import chain, repeat
from operator import contains
from typing import TYPE_CHECKING, Any, TypeVar, cast
from uuid import UUID

import orjson
import structlog
from eventsourcing.persistence import (
    DatetimeAsISO,
    DecimalAsStr,
    InterfaceError,
    JSONTranscoder,
    Notification,
    OperationalError,
    UUIDAsHex,
)
from eventsourcing.utils import Environment, resolve_topic, retry
from psycopg.rows import tuple_row
from psycopg.sql import SQL, Composed

from domain.envelope import (
    ENVELOPE_SCHEMA_VERSION,
    UNDECODABLE,
    UNREAD,
    EventEnvelope,
    envelope_from_event,
)

if TYPE_CHECKING:
    from eventsourcing.persistence import Mapper

    from adapters.eventstore import EventStoreRecorder

log = structlog.get_logger(__name__)

#: The write side's application name: the prefix eventsourcing accepts on its settings
#: (``AGENTWORKS_POSTGRES_HOST`` next to ``POSTGRES_HOST``), so the log reads the same ones.
EVENT_STORE_NAME = "AgentWorks"

#: Keys of a stored state that are not payload, besides ``class_version``, ``timestamp`` and
#: ``meta``: the mapper sets ``originator_id`` and ``originator_version`` from the row, and
#: ``envelope_from_event`` drops them and ``originator_topic``.
_NOT_PAYLOAD = ("originator_topic", "originator_id", "originator_version")

#: The transcodings the fast path reproduces, by name, with the class the library uses for each.
_STANDARD = {
    "uuid_hex": UUIDAsHex,
    "datetime_iso": DatetimeAsISO,
    "decimal_str": DecimalAsStr,
}

#: What ``orjson`` parses a JSON value to, apart from ``dict``, ``list`` and ``float``.
_SCALARS = frozenset({str, int, bool, type(None)})
_STR = frozenset({str})
_DICT = frozenset({dict})
_TYPE = "_type_"

_CACHE_LIMIT = 200_000

Row = tuple[int, UUID, int, str, bytes]
"""A stored event as the log query returns it: position, originator id and version, topic,
state."""

#: Most bytes of stored state in one batch read from the log to publish or project, beside the
#: batch's count of events: a batch of large events (agent outputs, log chunks) must not make
#: one huge Kafka request, transaction or heap. An event larger than this still goes, alone
#: (the relay publishes one over a message's size without its payload, see
#: :data:`~domain.envelope.OMITTED`).
MAX_BATCH_BYTES = 16 * 1024 * 1024

T = TypeVar("T")


def byte_bounded(items: Iterable[T], size: Callable[[T], int], max_bytes: int) -> Iterator[list[T]]:
    """``items`` in order, in runs of at most ``max_bytes`` by ``size``; an item larger than
    that makes a run alone."""
    run: list[T] = []
    total = 0
    for item in items:
        bytes_ = size(item)
        if run and total + bytes_ > max_bytes:
            yield run
            run, total = [], 0
        run.append(item)
        total += bytes_
    if run:
        yield run


@dataclass(frozen=True)
class LogBatch:
    """Events read up to a byte bound: ``cut`` says the bound stopped the read (the rest is
    for a batch of its own), ``size`` how many bytes of stored state were read."""

    envelopes: list[EventEnvelope]
    cut: bool
    size: int


@dataclass(frozen=True)
class EventHeader:
    """Where a stored event sits and what it is, without its state: enough to name it (as a
    retry that stops before it parks its aggregate there) without reading it."""

    position: int
    originator_id: UUID
    originator_version: int
    type: str
    workspace_id: UUID | None


class _Fallback(Exception):
    """The fast path does not cover this stored event; use the library's."""


def _plain(values: Collection[object]) -> bool:
    """Whether JSON values as ``orjson`` parses them hold, at any depth, neither a float nor
    an object with a ``"_type_"`` key: then the library's decoder gives exactly these values.

    ``orjson`` parses a number the library's ``json`` reads as an ``int`` into a ``float`` when
    it does not fit 64 bits, so a float here may be an integer; it is left to the library too.
    The containers are looked at a level at a time, their types collected by C loops.
    """
    while True:
        types = set(map(type, values))
        if types <= _SCALARS:
            return True
        if float in types:
            return False
        dicts = cast(
            "Collection[dict[str, object]]",
            values if types == _DICT else [v for v in values if type(v) is dict],
        )
        if any(map(contains, dicts, repeat(_TYPE))):
            return False
        lists = [v for v in values if type(v) is list] if list in types else ()
        values = list(chain(chain.from_iterable(map(dict.values, dicts)), *lists))


class _FastDecoder:
    """Stored JSON → envelope in one pass (see the module's docstring)."""

    def __init__(self) -> None:
        self._uuids: dict[str, str] = {}
        self._workspaces: dict[str, UUID] = {}
        self._topics: dict[str, tuple[str, str, int]] = {}
        self._fields = frozenset(EventEnvelope.model_fields) - {"schema_version"}
        self._raw = self._raw_construction_works()

    # -- transcoded values ------------------------------------------------------------------------

    def _value(self, name: object, data: object) -> str:
        """A transcoded value as ``json_safe`` writes the object the library decodes it to."""
        if type(data) is not str:
            raise _Fallback
        if name == "uuid_hex":
            text = self._uuids.get(data)
            if text is None:
                try:
                    text = str(UUID(data))
                except ValueError:
                    raise _Fallback from None
                if len(self._uuids) >= _CACHE_LIMIT:
                    self._uuids.clear()
                self._uuids[data] = text
            return text
        try:
            if name == "datetime_iso":
                return datetime.fromisoformat(data).isoformat()
            if name == "decimal_str":
                return str(Decimal(data))
        except (ValueError, ArithmeticError):
            raise _Fallback from None
        raise _Fallback

    def _transcode(self, value: dict[str, Any] | list[Any]) -> None:
        """Replace, in place, the transcoded values nested in ``value`` (the library's rule: an
        object of exactly the keys ``_type_`` and ``_data_``); a float anywhere falls back."""
        items: Iterable[tuple[Any, object]] = (
            value.items() if type(value) is dict else enumerate(value)
        )
        for key, item in items:
            kind = type(item)
            if kind is dict:
                assert isinstance(item, dict)
                if len(item) == 2 and _TYPE in item and "_data_" in item:
                    value[key] = self._value(item[_TYPE], item["_data_"])
                else:
                    self._transcode(item)
            elif kind is list:
                assert isinstance(item, list)
                self._transcode(item)
            elif kind is float:
                raise _Fallback

    # -- envelopes --------------------------------------------------------------------------------

    def describe(self, topic: str) -> tuple[str, str, int]:
        """(aggregate, event type, class version) of a topic."""
        described = self._topics.get(topic)
        if described is None:
            cls = resolve_topic(topic)
            qualname = cls.__qualname__
            described = (
                qualname.split(".", 1)[0],
                qualname,
                int(getattr(cls, "class_version", 1)),
            )
            self._topics[topic] = described
        return described

    def _workspace(self, text: str) -> UUID:
        workspace = self._workspaces.get(text)
        if workspace is None:
            workspace = UUID(text)
            if len(self._workspaces) >= _CACHE_LIMIT:
                self._workspaces.clear()
            self._workspaces[text] = workspace
        return workspace

    def envelope(self, row: Row) -> EventEnvelope:
        """The envelope of a stored event; raises (``_Fallback`` or whatever the parse raises)
        where the library's path must decide.

        The state parsed by ``orjson`` is what the library's ``json`` decoder gives before its
        object hook, as long as it holds no float (``json`` gives a float for the same text,
        or an ``int`` for an integer beyond 64 bits) and the parse succeeds (``orjson`` refuses
        ``NaN``, ``Infinity`` and lone surrogates, which ``json`` reads): both are checked on
        the parsed values, so a float or a ``"_type_"`` inside a string costs nothing. The
        parsed state, less the keys that are not payload, is the payload.
        """
        position, originator_id, originator_version, topic, raw = row
        aggregate, qualname, class_version = self.describe(topic)
        if type(originator_id) is not UUID or type(originator_version) is not int:
            raise _Fallback
        state = orjson.loads(raw)
        if type(state) is not dict:
            raise _Fallback
        pop = state.pop
        if pop("class_version", 1) != class_version:
            raise _Fallback  # stored at an older version: the mapper upcasts it
        timestamp = pop("timestamp", None)
        meta = pop("meta", None)
        for key in _NOT_PAYLOAD:
            if type(pop(key, None)) not in _SCALARS:
                raise _Fallback  # (the library's decoder reads it, and may fail on it)
        if (
            type(timestamp) is not dict
            or len(timestamp) != 2
            or timestamp.get(_TYPE) != "datetime_iso"
            or type(when := timestamp.get("_data_")) is not str
        ):
            raise _Fallback
        if meta is None:
            meta = {}
        elif (
            type(meta) is not dict
            or _TYPE in meta  # (the library would read a transcoded value, then fail)
            or not _STR.issuperset(map(type, meta.values()))
        ):
            raise _Fallback
        nested: list[dict[str, Any] | list[Any]] = []
        for key, value in state.items():
            kind = type(value)
            if kind is dict:
                if len(value) == 2 and _TYPE in value and "_data_" in value:
                    state[key] = self._value(value[_TYPE], value["_data_"])
                else:
                    nested.append(value)
            elif kind is list:
                nested.append(value)
            elif kind is float:
                raise _Fallback
        if nested and not _plain(nested):
            for value in nested:  # (the top level is done)
                self._transcode(value)
        workspace = meta.get("workspace_id")
        fields = {
            "schema_version": ENVELOPE_SCHEMA_VERSION,
            "position": position,
            "originator_id": originator_id,
            "originator_version": originator_version,
            "aggregate": aggregate,
            "type": qualname,
            "event_version": class_version,
            "timestamp": datetime.fromisoformat(when),
            "workspace_id": self._workspace(workspace) if workspace else None,
            "metadata": meta,
            "payload": state,
        }
        if self._raw:
            return self._construct(fields)
        del fields["schema_version"]
        return EventEnvelope(**fields)

    def _construct(self, fields: dict[str, Any]) -> EventEnvelope:
        """What validating would build from values already of the right types, without
        validating (the same attributes pydantic's ``model_construct`` sets)."""
        envelope = EventEnvelope.__new__(EventEnvelope)
        object.__setattr__(envelope, "__dict__", fields)
        object.__setattr__(envelope, "__pydantic_fields_set__", set(self._fields))
        object.__setattr__(envelope, "__pydantic_extra__", None)
        object.__setattr__(envelope, "__pydantic_private__", None)
        return envelope

    def _raw_construction_works(self) -> bool:
        """Whether :meth:`_construct` builds what validation does, with this pydantic."""
        probe = {
            "schema_version": ENVELOPE_SCHEMA_VERSION,
            "position": 7,
            "originator_id": UUID(int=1),
            "originator_version": 2,
            "aggregate": "Card",
            "type": "Card.Moved",
            "event_version": 1,
            "timestamp": datetime.fromisoformat("2025-01-02T03:04:05.000006+00:00"),
            "workspace_id": UUID(int=2),
            "metadata": {"actor": "a"},
            "payload": {"lines": [{"seq": 1}], "to_lane": "Done"},
        }
        try:
            validated = EventEnvelope(**{k: v for k, v in probe.items() if k != "schema_version"})
            built = self._construct(dict(probe))
            return (
                built == validated
                and built.model_dump_json() == validated.model_dump_json()
                and built.model_fields_set == validated.model_fields_set
            )
        except Exception:  # noqa: BLE001 - a probe: any surprise means validate instead
            return False


def writes_library_json(mapper: Mapper[UUID], names: Collection[str], *, only: bool) -> bool:
    """Whether ``mapper`` stores events as the library's JSON transcoder writes them, with no
    cipher or compressor and the library's own transcoding for each of ``names`` (and, with
    ``only``, no other): what any reader of the stored bytes that bypasses the mapper needs.
    """
    transcoder = mapper.transcoder
    return (
        mapper.cipher is None
        and mapper.compressor is None
        and type(transcoder) is JSONTranscoder
        and (not only or set(transcoder.names) == set(names))
        and all(type(transcoder.names.get(name)) is _STANDARD[name] for name in names)
    )


@retry((InterfaceError, OperationalError), max_attempts=10, wait=0.2)
def fetch_rows(
    recorder: EventStoreRecorder, statement: Composed, params: Sequence[object]
) -> list[tuple[Any, ...]]:
    """Plain rows of a query of the store (binary, prepared), retried across a lost connection
    like the library's own reads."""
    with (
        recorder.datastore.get_connection() as conn,
        conn.cursor(row_factory=tuple_row, binary=True) as cur,
    ):
        cur.execute(statement, params, prepare=True)
        return cur.fetchall()


class EventLog:
    """The store's notification log, decoded into envelopes."""

    def __init__(
        self,
        recorder: EventStoreRecorder,
        mapper: Mapper[UUID],
        *,
        close: Callable[[], None] | None = None,
    ) -> None:
        self.recorder = recorder
        self.mapper = mapper
        self._close = close
        self._fast = _FastDecoder() if writes_library_json(mapper, _STANDARD, only=True) else None
        self._select = _log_statement(recorder)
        self._bounded = None if self._select is None else _bounded(self._select, flagged=True)
        self._between, self._within = _aggregate_statements(recorder)

    def read(
        self, after: int, limit: int = 1000, *, max_bytes: int | None = None
    ) -> list[EventEnvelope]:
        """Up to ``limit`` events with positions above ``after``, in order, never past a gap
        that a still-open transaction may fill; with ``max_bytes``, no more events than fit
        in that many bytes of stored state (at least one)."""
        return self.read_batch(after, limit, max_bytes=max_bytes)[0]

    def read_batch(
        self, after: int, limit: int, *, max_bytes: int | None = MAX_BATCH_BYTES
    ) -> tuple[list[EventEnvelope], bool]:
        """:meth:`read`, and whether more events may be read at once: the batch stopped at
        ``limit`` or at ``max_bytes`` (a reader that takes a short batch for the log's end
        would wait for the next wake-up with a backlog in front of it)."""
        batch = self.read_sized(after, limit, max_bytes=max_bytes)
        return batch.envelopes, batch.cut

    def read_sized(self, after: int, limit: int, *, max_bytes: int | None) -> LogBatch:
        """:meth:`read_batch` as a :class:`LogBatch`: ``cut`` is whether more may be read at
        once, ``size`` the bytes of stored state read (what a reader that keeps reads counts)."""
        rows, more = self._rows(after, limit, max_bytes)
        return LogBatch(
            [self.readable(row) for row in rows], cut=more, size=sum(len(row[4]) for row in rows)
        )

    def read_following(
        self,
        after: int,
        limit: int,
        aggregates: frozenset[str] | set[str],
        *,
        max_bytes: int | None = None,
        unread: Collection[str] = frozenset(),
    ) -> tuple[list[EventEnvelope], int, int, bool]:
        """Like :meth:`read_batch`, decoding only the events of ``aggregates`` (what a set of
        projectors follows): those envelopes, the position read up to, how many events were
        read (followed or not), and whether more may be read at once.

        ``unread``: event types (``"AgentRun.LogChunkAppended"``) whose payload every reader
        of the batch ignores. Their envelopes are :func:`header_envelope` ones, their stored
        state not parsed (a run's log chunks, the largest events, were decoded for projectors
        that only count them), and one that could not be decoded parks nothing."""
        rows, more = self._rows(after, limit, max_bytes)
        if not rows:
            return [], after, 0, False
        aggregate_of = self._aggregate_of
        followed = [row for row in rows if aggregate_of(row[3]) in aggregates]
        if unread:
            envelopes = [self._read_unless(row, unread) for row in followed]
        else:
            envelopes = [self.readable(row) for row in followed]
        return envelopes, rows[-1][0], len(rows), more

    def _read_unless(self, row: Row, unread: Collection[str]) -> EventEnvelope:
        """The envelope of ``row``, without its payload when its type is ``unread``."""
        described = self._described(row[3])
        if described is not None and described[1] in unread:
            position, originator_id, originator_version, _, _ = row
            return header_envelope(
                position, originator_id, originator_version, described[1], described[2]
            )
        return self.readable(row)

    def _described(self, topic: str) -> tuple[str, str, int] | None:
        """(aggregate, event type, class version) of ``topic``; None when it does not resolve."""
        try:
            if self._fast is not None:
                return self._fast.describe(topic)
            cls = resolve_topic(topic)
        except Exception:  # noqa: BLE001 - a topic that no longer resolves: its type is unknown
            return None
        qualname = str(cls.__qualname__)
        return qualname.split(".", 1)[0], qualname, int(getattr(cls, "class_version", 1))

    def between(
        self, originator_id: UUID, *, after_version: int, before_version: int | None
    ) -> list[EventEnvelope]:
        return [
            self.readable(_row(n))
            for n in self.recorder.select_positioned_events(
                originator_id, gt=after_version, lt=before_version
            )
        ]

    def within(self, ranges: Sequence[tuple[UUID, int, int]]) -> list[EventEnvelope]:
        """The events of several aggregates, each ``(originator id, after version, before
        version)`` with exclusive bounds, in log order."""
        return [self.readable(_row(n)) for n in self.recorder.select_positioned_ranges(ranges)]

    def between_batch(
        self,
        originator_id: UUID,
        *,
        after_version: int,
        before_version: int | None,
        max_bytes: int = MAX_BATCH_BYTES,
    ) -> LogBatch:
        """:meth:`between` cut at ``max_bytes`` of stored state (at least one event); the
        caller takes what a cut left in a batch of its own."""
        if self._between is None:
            everything = self.between(
                originator_id, after_version=after_version, before_version=before_version
            )
            return self._cut(everything, max_bytes)
        below = _NO_VERSION_ABOVE if before_version is None else before_version
        return self._sized(self._between, (originator_id, after_version, below), max_bytes)

    def within_batch(
        self, ranges: Sequence[tuple[UUID, int, int]], *, max_bytes: int = MAX_BATCH_BYTES
    ) -> LogBatch:
        """:meth:`within` cut at ``max_bytes`` of stored state (at least one event), in log
        order: after a cut, each aggregate's events read are the first of its range."""
        if not ranges:
            return LogBatch([], cut=False, size=0)
        if self._within is None:
            return self._cut(self.within(ranges), max_bytes)
        ids, gts, lts = (list(column) for column in zip(*ranges, strict=True))
        return self._sized(self._within, (ids, gts, lts), max_bytes)

    def following(self, originator_id: UUID, *, after_version: int) -> EventHeader | None:
        """The header of an aggregate's first event after ``after_version`` (None: it has
        none), its state left in the store: the next batch of :meth:`between_batch` reads it."""
        found = self.recorder.select_following(originator_id, gt=after_version)
        if found is None:
            return None
        position, version, topic, workspace_id = found
        try:
            event_type = str(resolve_topic(topic).__qualname__)
        except Exception:  # noqa: BLE001 - a topic that no longer resolves: named as stored
            event_type = _qualname_of(topic)
        return EventHeader(position, originator_id, version, event_type, workspace_id)

    def _sized(self, statement: Composed, params: tuple[object, ...], max_bytes: int) -> LogBatch:
        sized = fetch_rows(self.recorder, statement, (*params, max_bytes))
        if not sized:
            return LogBatch([], cut=False, size=0)
        return LogBatch(
            [self.readable(cast("Row", row[:5])) for row in sized],
            cut=bool(sized[-1][5]),
            size=sum(len(row[4]) for row in sized),
        )

    @staticmethod
    def _cut(envelopes: list[EventEnvelope], max_bytes: int) -> LogBatch:
        """A read of a store without plain statements, cut here (by its payloads' size)."""
        if not envelopes:
            return LogBatch([], cut=False, size=0)
        sizes = [len(orjson.dumps(env.payload)) for env in envelopes]
        kept = next(byte_bounded(range(len(envelopes)), sizes.__getitem__, max_bytes))
        return LogBatch(
            envelopes[: len(kept)], cut=len(kept) < len(envelopes), size=sum(sizes[: len(kept)])
        )

    def versions(
        self, *, after: int, through: int, limit: int, aggregates: frozenset[str] | set[str]
    ) -> tuple[list[tuple[int, UUID, int]], int]:
        """Position, originator id and version of the events of ``aggregates`` in
        ``(after, through]``, reading at most ``limit`` events; and the position read up to,
        never past an event the reader horizon held back (``through`` may come from a statement
        whose horizon was higher)."""
        rows = self.recorder.select_versions(after=after, through=through, limit=limit)
        if not rows:
            return [], through
        read_up_to = rows[-1][0] if len(rows) == limit else through
        held = next((n for n, row in enumerate(rows) if not row[4]), None)
        if held is not None:
            read_up_to = rows[held - 1][0] if held else after
            rows = rows[:held]
        aggregate_of = self._aggregate_of
        followed = [(p, o, v) for p, o, v, topic, _ in rows if aggregate_of(topic) in aggregates]
        return followed, read_up_to

    def head(self) -> int:
        return self.recorder.max_notification_id() or 0

    def _rows(self, after: int, limit: int, max_bytes: int | None) -> tuple[Sequence[Row], bool]:
        """The rows of a batch, and whether it stopped at ``limit`` or ``max_bytes``.

        Bounded by bytes, PostgreSQL cuts the batch (a running sum of the states' sizes, which
        it knows without reading them), so the states past the bound never leave the server."""
        if self._select is None:
            rows: Sequence[Row] = [
                _row(n)
                for n in self.recorder.select_notifications(
                    start=after, limit=limit, inclusive_of_start=False
                )
            ]
            if max_bytes is None or not rows:
                return rows, len(rows) == limit
            kept = next(byte_bounded(rows, lambda row: len(row[4]), max_bytes))
            return kept, len(rows) == limit or len(kept) < len(rows)
        read = self.recorder.read_under_horizon
        if max_bytes is None:
            rows = cast("list[Row]", read(self._select, (after, limit)))
            return rows, len(rows) == limit
        sized = read(cast("Composed", self._bounded), (after, limit, max_bytes))
        if not sized:
            return [], False
        more = len(sized) == limit or bool(sized[-1][5])
        return [cast("Row", row[:5]) for row in sized], more

    def _aggregate_of(self, topic: str) -> str:
        described = self._described(topic)
        if described is None:  # a topic that no longer resolves: read by its name
            return _qualname_of(topic).split(".", 1)[0]
        return described[0]

    def close(self) -> None:
        """Close the connections of a log opened on its own (:func:`open_event_log`)."""
        if self._close is not None:
            self._close()

    def decode(self, row: Row) -> EventEnvelope:
        """One stored row as an envelope (upcast like every other read of the log)."""
        return self._envelope(row)

    def readable(self, row: Row) -> EventEnvelope:
        """:meth:`_envelope`, or, for a stored event that cannot be decoded, an envelope marked
        :data:`~domain.envelope.UNDECODABLE`: one bad row must not stop every reader of the log
        (the relay, the fan-out, a rebuild) at its position, for every tenant. Projectors park
        its aggregate (:mod:`projections.runner`); a retry after the fix reads it again."""
        try:
            return self._envelope(row)
        except Exception as error:  # noqa: BLE001 - decoding is pure: the row's own fault
            log.warning(
                "eventlog.undecodable_event",
                position=row[0],
                originator_id=str(row[1]),
                originator_version=row[2],
                topic=row[3],
                error=f"{type(error).__name__}: {error}",
            )
            return undecodable_envelope(row, error)

    def _envelope(self, row: Row) -> EventEnvelope:
        if self._fast is not None:
            try:
                return self._fast.envelope(row)
            except Exception:  # noqa: S110, BLE001 - _Fallback, or malformed: the library's path
                pass  # decides, and reports any error in its own words
        return self.decode_slowly(row)

    def decode_slowly(self, row: Row) -> EventEnvelope:
        """The library's path: the mapper's domain event, wrapped (the reference for the fast
        path)."""
        position, originator_id, originator_version, topic, state = row
        notification = Notification(
            id=position,
            originator_id=originator_id,
            originator_version=originator_version,
            topic=topic,
            state=bytes(state),
        )
        return envelope_from_event(position, self.mapper.to_domain_event(notification))


def _qualname_of(topic: str) -> str:
    """The class name a stored topic (``module:Class.Event``) names, resolvable or not."""
    return str(topic).partition(":")[2] or str(topic)


#: Longest error text an undecodable envelope carries.
_MAX_ERROR = 2000

#: The timestamp of an undecodable envelope whose stored state does not say when it was made.
UNKNOWN_TIME = datetime(1970, 1, 1, tzinfo=UTC)


def header_envelope(
    position: int,
    originator_id: UUID,
    originator_version: int,
    event_type: str,
    event_version: int,
    workspace_id: UUID | None = None,
) -> EventEnvelope:
    """The envelope of an event read for where it sits and what it is only (see
    :data:`~domain.envelope.UNREAD`): its state is left as stored (or as delivered)."""
    return EventEnvelope(
        position=position,
        originator_id=originator_id,
        originator_version=originator_version,
        aggregate=event_type.split(".", 1)[0],
        type=event_type,
        event_version=event_version,
        timestamp=UNKNOWN_TIME,
        workspace_id=workspace_id,
        metadata={UNREAD: "its payload is used by none of its readers"},
        payload={},
    )


def undecodable_envelope(row: Row, error: BaseException) -> EventEnvelope:
    """The envelope of a stored event that cannot be decoded: where it sits, its aggregate and
    type as its topic names them, what of its metadata can still be read (its workspace), no
    payload, and the error under :data:`~domain.envelope.UNDECODABLE`."""
    position, originator_id, originator_version, topic, raw = row
    qualname = _qualname_of(topic)
    meta: dict[str, str] = {}
    timestamp = UNKNOWN_TIME
    event_version = 1
    try:
        state = orjson.loads(bytes(raw))
    except Exception:  # noqa: BLE001 - not JSON: nothing more to read
        state = None
    if isinstance(state, dict):
        stored_meta = state.get("meta")
        if isinstance(stored_meta, dict):
            meta = {str(k): v for k, v in stored_meta.items() if isinstance(v, str)}
        stamp = state.get("timestamp")
        if isinstance(stamp, dict) and isinstance(stamp.get("_data_"), str):
            with suppress(ValueError):
                timestamp = datetime.fromisoformat(stamp["_data_"])
        if type(state.get("class_version")) is int:
            event_version = state["class_version"]
    meta[UNDECODABLE] = f"{type(error).__name__}: {error}"[:_MAX_ERROR]
    workspace: UUID | None = None
    with suppress(ValueError, TypeError, AttributeError):
        workspace = UUID(meta.get("workspace_id") or "") if meta.get("workspace_id") else None
    return EventEnvelope(
        position=position,
        originator_id=originator_id,
        originator_version=originator_version,
        aggregate=qualname.split(".", 1)[0],
        type=qualname,
        event_version=event_version,
        timestamp=timestamp,
        workspace_id=workspace,
        metadata=meta,
        payload={},
    )


def _row(notification: Notification) -> Row:
    originator_id = notification.originator_id
    return (
        notification.id,
        originator_id if isinstance(originator_id, UUID) else UUID(originator_id),
        notification.originator_version,
        notification.topic,
        notification.state,
    )


def _log_statement(recorder: EventStoreRecorder) -> Composed | None:
    """The recorder's log query (its columns and its horizon rule), for plain rows: a statement
    of :meth:`~adapters.eventstore.EventStoreRecorder.under_horizon`; None when the recorder does
    not expose its parts (then :meth:`select_notifications` serves)."""
    select_from = getattr(recorder, "select_from", None)
    horizon = getattr(recorder, "horizon", None)
    if not isinstance(select_from, Composed) or not isinstance(horizon, SQL):
        return None
    return recorder.under_horizon(
        select_from
        + SQL(" WHERE ")
        + horizon
        + SQL(" AND notification_id > %s ORDER BY notification_id LIMIT %s")
    )


#: ``before_version`` of an aggregate read with no upper end.
_NO_VERSION_ABOVE = 2**63 - 1


def _aggregate_statements(
    recorder: EventStoreRecorder,
) -> tuple[Composed | None, Composed | None]:
    """The recorder's queries of one aggregate's events between two versions (``id``, ``gt``,
    ``lt``) and of several aggregates' (arrays of each), in log order, cut at a number of bytes
    (:func:`_bounded`); None when the recorder does not expose its columns."""
    select_from = getattr(recorder, "select_from", None)
    if not isinstance(select_from, Composed):
        return None, None
    between = select_from + SQL(
        " WHERE originator_id = %s AND originator_version > %s AND originator_version < %s"
        " ORDER BY notification_id"
    )
    within = select_from + SQL(
        " AS e JOIN unnest(%s::uuid[], %s::bigint[], %s::bigint[]) AS r(id, gt, lt)"
        " ON e.originator_id = r.id AND e.originator_version > r.gt"
        " AND e.originator_version < r.lt ORDER BY e.notification_id"
    )
    return _bounded(between), _bounded(within)


def _bounded(select: Composed, *, flagged: bool = False) -> Composed:
    """The log query (``after``, ``limit``) cut further at ``max_bytes`` of stored state (at
    least one row), each row saying whether the query alone gave a row after it. (Window
    functions that look one row ahead at most: nothing makes PostgreSQL hold the whole page.)
    ``flagged``: the query's rows begin with its horizon's flag (``under_horizon``), kept first."""
    return (
        SQL("SELECT moved, " if flagged else "SELECT ")
        + SQL(
            "notification_id, originator_id, originator_version, topic, state, followed"
            " FROM (SELECT page.*, sum(octet_length(state)) OVER w AS running,"
            " row_number() OVER w AS n, lead(true, 1, false) OVER w AS followed FROM ("
        )
        + select
        + SQL(
            ") AS page WINDOW w AS (ORDER BY notification_id)) AS sized"
            " WHERE n = 1 OR running <= %s ORDER BY notification_id"
        )
    )


def open_event_log(env: Mapping[str, str]) -> EventLog:
    """The event log alone, on connections of its own, for components that never write (the
    projectors, the relay): no application is built around it.

    ``env`` is the store's configuration as for the write side (``infra.bootstrap``); the mapper
    decodes with the transcodings the write side encodes with, those of eventsourcing's
    ``Application`` (UUIDs, Decimals and datetimes), which the write side does not change.
    """
    from adapters.eventstore import EventStoreRecorder, Factory

    factory = Factory(Environment(EVENT_STORE_NAME, dict(env)))
    recorder = factory.application_recorder()
    if not isinstance(recorder, EventStoreRecorder):  # pragma: no cover - Factory's own class
        raise TypeError(f"expected the event store's recorder, got {type(recorder).__name__}")
    transcoder = factory.transcoder()
    if isinstance(transcoder, JSONTranscoder):
        for transcoding in (UUIDAsHex(), DecimalAsStr(), DatetimeAsISO()):
            transcoder.register(transcoding)
    return EventLog(recorder, factory.mapper(transcoder=transcoder), close=factory.close)
