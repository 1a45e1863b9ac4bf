"""Reading the event log as envelopes: in global order (fan-out) or per aggregate (healing).

Decoding is on the path of every projector, the relay and every rebuild, so it has a fast path.
The library's way is two passes: the mapper turns the stored JSON into a domain event (UUIDs,
datetimes and decimals as objects), then :func:`~domain.envelope.envelope_from_event` turns
those objects back into JSON-safe strings and validates the envelope. The fast path parses the
stored JSON once, straight into the JSON-safe form, and builds the envelope without validating
what it already knows to be well-typed. It covers exactly what the library's JSON transcoder
with its standard transcodings (UUID, datetime, Decimal) writes, with no cipher or compressor
and no upcasting to do; anything else (an unknown transcoding, an event stored at an older
``class_version``, a float, a malformed state) takes the library's path, so the result, and any
error, is the same either way. ``tests/unit/test_event_log_decoding.py`` holds the two paths to
the same envelopes.

Reading in global order fetches plain rows (binary, no per-row objects) with the recorder's own
statement and horizon rule (see :mod:`adapters.eventstore`), when the recorder offers them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any, NoReturn
from uuid import UUID

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

from domain.envelope import ENVELOPE_SCHEMA_VERSION, EventEnvelope, envelope_from_event

if TYPE_CHECKING:
    from eventsourcing.persistence import Mapper

    from adapters.eventstore import EventStoreRecorder

#: The write side's application name: the prefix eventsourcing accepts on its settings
#: (``AGENTWORKS_POSTGRES_HOST`` next to ``POSTGRES_HOST``), so the log reads the same ones.
EVENT_STORE_NAME = "AgentWorks"

#: Keys of a stored event's state that are not its payload (``envelope_from_event`` drops the
#: same, together with the originator id and version, which the state does not hold).
_NOT_PAYLOAD = frozenset({"timestamp", "meta", "originator_topic"})

#: The transcodings the fast path reproduces, by name, with the class the library uses for each.
_STANDARD = {
    "uuid_hex": UUIDAsHex,
    "datetime_iso": DatetimeAsISO,
    "decimal_str": DecimalAsStr,
}

_CACHE_LIMIT = 200_000

Row = tuple[int, UUID, int, str, bytes]
"""A stored event as the log query returns it: position, originator id and version, topic,
state."""


class _Fallback(Exception):
    """The fast path does not cover this stored event; use the library's."""


def _refuse_float(text: str) -> NoReturn:
    raise _Fallback  # the library's path refuses floats in payloads with its own error


class _FastDecoder:
    """Stored JSON → envelope in one pass (see the module's docstring)."""

    def __init__(self) -> None:
        self._uuids: dict[str, str] = {}
        self._workspaces: dict[str, UUID] = {}
        self._topics: dict[str, tuple[str, str, int]] = {}
        self._flat = json.JSONDecoder(parse_float=_refuse_float)
        self._hooked = json.JSONDecoder(object_hook=self._object, parse_float=_refuse_float)
        self._fields = frozenset(EventEnvelope.model_fields) - {"schema_version"}
        self._raw = self._raw_construction_works()

    # -- transcoded values ------------------------------------------------------------------------

    def _value(self, name: object, data: object) -> str:
        """A transcoded value as ``json_safe`` writes the object the library decodes it to."""
        if not isinstance(data, str):
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

    def _object(self, d: dict[str, object]) -> object:
        # The library's rule: a two-key object {_type_, _data_} is a transcoded value.
        if len(d) == 2 and "_type_" in d and "_data_" in d:
            return self._value(d["_type_"], d["_data_"])
        return d

    def _state(self, raw: bytes) -> dict[str, Any]:
        """The stored state with transcoded values replaced.

        Transcoded values sit at the top level in nearly every event; a plain parse and a look
        at the top level finds them, and counting ``"_type_"`` in the raw text proves there are
        no others (else the parse is redone, looking into every object).
        """
        text = raw.decode("utf8")
        state = self._flat.decode(text)
        if not isinstance(state, dict):
            raise _Fallback
        found = 0
        for key, value in state.items():
            if type(value) is dict and "_type_" in value:
                if len(value) != 2 or "_data_" not in value:
                    raise _Fallback  # shaped like none of ours: let the library judge
                state[key] = self._value(value["_type_"], value["_data_"])
                found += 1
        if raw.count(b'"_type_"') != found:
            state = self._hooked.decode(text)
            if not isinstance(state, dict):
                raise _Fallback
        return state

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
        position, originator_id, originator_version, topic, raw = row
        aggregate, qualname, class_version = self.describe(topic)
        state = self._state(raw)
        if state.pop("class_version", 1) != class_version:
            raise _Fallback  # stored at an older version: the mapper upcasts it
        meta = state.get("meta") or {}
        timestamp = state.get("timestamp")
        if (
            type(meta) is not dict
            or type(timestamp) is not str
            or type(originator_id) is not UUID
            or type(originator_version) is not int
            or not all(type(v) is str for v in meta.values())
        ):
            raise _Fallback
        workspace = meta.get("workspace_id")
        fields = {
            "schema_version": ENVELOPE_SCHEMA_VERSION,
            "position": position,
            "originator_id": originator_id,
            "originator_version": originator_version,
            "aggregate": aggregate,
            "type": qualname,
            "event_version": class_version,
            "timestamp": datetime.fromisoformat(timestamp),
            "workspace_id": self._workspace(workspace) if workspace else None,
            "metadata": dict(meta),
            "payload": {k: v for k, v in state.items() if k not in _NOT_PAYLOAD},
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


def _fast_path_applies(mapper: Mapper[UUID]) -> bool:
    transcoder = mapper.transcoder
    return (
        mapper.cipher is None
        and mapper.compressor is None
        and type(transcoder) is JSONTranscoder
        and set(transcoder.names) == set(_STANDARD)
        and all(type(transcoder.names[name]) is cls for name, cls in _STANDARD.items())
    )


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
        self._fast = _FastDecoder() if _fast_path_applies(mapper) else None
        self._select = _log_statement(recorder)

    def read(self, after: int, limit: int = 1000) -> list[EventEnvelope]:
        """Up to ``limit`` events with positions above ``after``, in order, never past a gap
        that a still-open transaction may fill."""
        return [self._envelope(row) for row in self._rows(after, limit)]

    def read_following(
        self, after: int, limit: int, aggregates: frozenset[str] | set[str]
    ) -> tuple[list[EventEnvelope], int, int]:
        """Like :meth:`read`, decoding only the events of ``aggregates`` (what a set of
        projectors follows): those envelopes, the position read up to, and how many events were
        read (followed or not)."""
        rows = self._rows(after, limit)
        if not rows:
            return [], after, 0
        aggregate_of = self._aggregate_of
        envelopes = [self._envelope(row) for row in rows if aggregate_of(row[3]) in aggregates]
        return envelopes, rows[-1][0], len(rows)

    def between(
        self, originator_id: UUID, *, after_version: int, before_version: int | None
    ) -> list[EventEnvelope]:
        return [
            self._envelope(_row(n))
            for n in self.recorder.select_positioned_events(
                originator_id, gt=after_version, lt=before_version
            )
        ]

    def within(self, ranges: Sequence[tuple[UUID, int, int]]) -> list[EventEnvelope]:
        """The events of several aggregates, each ``(originator id, after version, before
        version)`` with exclusive bounds, in log order."""
        return [self._envelope(_row(n)) for n in self.recorder.select_positioned_ranges(ranges)]

    def versions(
        self, *, after: int, through: int, limit: int, aggregates: frozenset[str] | set[str]
    ) -> tuple[list[tuple[int, UUID, int]], int]:
        """Position, originator id and version of the events of ``aggregates`` in
        ``(after, through]``, reading at most ``limit`` events; and the position read up to."""
        rows = self.recorder.select_versions(after=after, through=through, limit=limit)
        if not rows:
            return [], through
        aggregate_of = self._aggregate_of
        followed = [(p, o, v) for p, o, v, topic in rows if aggregate_of(topic) in aggregates]
        return followed, (rows[-1][0] if len(rows) == limit else through)

    def head(self) -> int:
        return self.recorder.max_notification_id() or 0

    @retry((InterfaceError, OperationalError), max_attempts=10, wait=0.2)
    def _rows(self, after: int, limit: int) -> Sequence[Row]:
        if self._select is None:
            return [
                _row(n)
                for n in self.recorder.select_notifications(
                    start=after, limit=limit, inclusive_of_start=False
                )
            ]
        with (
            self.recorder.datastore.get_connection() as conn,
            conn.cursor(row_factory=tuple_row, binary=True) as cur,
        ):
            cur.execute(self._select, (after, limit), prepare=True)
            return cur.fetchall()

    def _aggregate_of(self, topic: str) -> str:
        if self._fast is not None:
            return self._fast.describe(topic)[0]
        return str(resolve_topic(topic).__qualname__).split(".", 1)[0]

    def close(self) -> None:
        """Close the connections of a log opened on its own (:func:`open_event_log`)."""
        if self._close is not None:
            self._close()

    def decode(self, row: Row) -> EventEnvelope:
        """One stored row as an envelope (upcast like every other read of the log)."""
        return self._envelope(row)

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
    """The recorder's log query (its columns and its horizon rule), for plain rows; None when
    the recorder does not expose its parts (then :meth:`select_notifications` serves)."""
    select_from = getattr(recorder, "select_from", None)
    horizon = getattr(recorder, "horizon", None)
    if not isinstance(select_from, Composed) or not isinstance(horizon, SQL):
        return None
    return (
        select_from
        + SQL(" WHERE ")
        + horizon
        + SQL(" AND notification_id > %s ORDER BY notification_id LIMIT %s")
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
