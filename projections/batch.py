"""Applying a batch of envelopes at once: what a projector's fold sees, and shared SQL.

A projector's ``apply_batch(ctx, envelopes)`` must leave exactly the rows and emit exactly the
changes (same order) whatever the envelopes are cut into: one batch, several, or one event each.
It turns thousands of per-event statements into a handful of set-based ones (``INSERT ... SELECT
FROM unnest(...)``, ``UPDATE ... FROM unnest(...)``, ``COPY``), which is what makes a rebuild
fast. The tests hold every fold to an event-by-event reference kept beside them
(``tests/integration/projection_reference.py``).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any
from uuid import UUID

from projections.base import BatchContext
from projections.text import protect, storable_utf8

if TYPE_CHECKING:
    from psycopg import Cursor, sql
    from psycopg.abc import Params
    from psycopg.rows import DictRow


def fetch_all(
    cur: Cursor[DictRow], query: sql.Composed, params: Params | None = None
) -> list[DictRow]:
    """The rows of ``query``, run in ``cur``'s transaction on a cursor of its own.

    A batch's statements are pipelined, and psycopg hands a statement's answer to its cursor
    when it reads it, which can be while a later statement of that cursor is under way: a
    statement whose answer overflows the server's send buffer flushes the answers queued before
    it, and whatever is sent next reads them. Fetched from the batch's cursor, such rows could
    be an earlier command's answer ("the last operation didn't produce records"), and the batch
    failed and was applied again event by event. A cursor of its own answers this query alone.
    """
    with cur.connection.cursor(row_factory=cur.row_factory) as own:
        protect(own)
        own.execute(query, params)
        return own.fetchall()


def insert_rows(
    ctx: BatchContext,
    table: str,
    columns: Sequence[tuple[str, str]],
    rows: Sequence[Sequence[Any]],
) -> None:
    """Insert ``rows`` (values in ``columns`` order; ``(name, sql type)`` pairs) into the
    logical ``table``: by ``COPY`` into a rebuild's private tables, else by one
    ``INSERT ... SELECT FROM unnest(...)``. A row that is already there is an error either way."""
    if not rows:
        return
    names = ", ".join(name for name, _ in columns)
    if ctx.copy:
        # Binary: the server parses nothing (text COPY costs it half again as much per row),
        # and the rows are encoded here, which costs less than psycopg's per-value dumpers.
        statement = ctx.tables.q(f"COPY {{{table}}} ({names}) FROM STDIN (FORMAT BINARY)")
        kinds = [kind for _, kind in columns]
        try:
            encoded = encode_binary_copy(rows, kinds)
        except (TypeError, ValueError, AttributeError, KeyError, OverflowError, struct.error):
            encoded = None  # a value of a shape the encoder does not know: psycopg's dumpers
        if encoded is not None:
            copy_encoded(ctx, table, columns, encoded)
            return
        converters = [(i, _BINARY[kind]) for i, (_, kind) in enumerate(columns) if kind in _BINARY]
        with ctx.cur.copy(statement) as copy:
            copy.set_types([kind for _, kind in columns])
            write = copy.write_row
            if not converters:
                for row in rows:
                    write(row)
                return
            for row in rows:
                values = list(row)
                for i, convert in converters:
                    value = values[i]
                    if value is not None:
                        values[i] = convert(value)
                write(values)
        return
    arrays = ", ".join(f"%s::{kind}[]" for _, kind in columns)
    ctx.cur.execute(
        ctx.tables.q(f"INSERT INTO {{{table}}} ({names}) SELECT * FROM unnest({arrays})"),
        columns_of(rows, len(columns)),
    )


_UUIDS: dict[str, UUID] = {}


def as_uuid(value: object) -> UUID:
    """A UUID from its text (the envelopes' JSON-safe form), remembered: ids repeat a lot."""
    if type(value) is UUID:
        return value
    text = str(value)
    found = _UUIDS.get(text)
    if found is None:
        if len(_UUIDS) > 500_000:
            _UUIDS.clear()
        found = _UUIDS[text] = UUID(text)
    return found


def _as_datetime(value: object) -> datetime:
    return value if isinstance(value, datetime) else datetime.fromisoformat(str(value))


def _as_date(value: object) -> date:
    return value if isinstance(value, date) else date.fromisoformat(str(value))


#: What binary COPY needs as Python values, for the types whose text a projector may hold.
_BINARY: dict[str, Callable[[Any], Any]] = {
    "uuid": as_uuid,
    "timestamptz": _as_datetime,
    "date": _as_date,
}


COPY_SIGNATURE = b"PGCOPY\n\xff\r\n\x00" + b"\x00\x00\x00\x00" + b"\x00\x00\x00\x00"
COPY_TRAILER = b"\xff\xff"
COPY_NULL = b"\xff\xff\xff\xff"
COPY_FIELDS_6 = b"\x00\x06"
_SIGNATURE, _TRAILER, _NULL = COPY_SIGNATURE, COPY_TRAILER, COPY_NULL
_PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
_PG_EPOCH_DATE = date(2000, 1, 1)
_MICROSECOND = timedelta(microseconds=1)
_I16 = struct.Struct("!h").pack
_I32 = struct.Struct("!i").pack
_LEN_I32 = struct.Struct("!ii").pack  # length 4, then the value
_LEN_I64 = struct.Struct("!iq").pack  # length 8, then the value


def _uuid_field(value: object) -> bytes:
    return b"\x00\x00\x00\x10" + as_uuid(value).bytes


def _text_field(value: object) -> bytes:
    if type(value) is not str:
        raise TypeError(f"text column holds {type(value).__name__}")
    data = storable_utf8(value)
    return _I32(len(data)) + data


def _int4_field(value: object) -> bytes:
    if type(value) is not int:
        raise TypeError(f"integer column holds {type(value).__name__}")
    return _LEN_I32(4, value)


def _int8_field(value: object) -> bytes:
    if type(value) is not int:
        raise TypeError(f"bigint column holds {type(value).__name__}")
    return _LEN_I64(8, value)


def _bool_field(value: object) -> bytes:
    if type(value) is not bool:
        raise TypeError(f"boolean column holds {type(value).__name__}")
    return b"\x00\x00\x00\x01\x01" if value else b"\x00\x00\x00\x01\x00"


def _timestamptz_field(value: object) -> bytes:
    moment = _as_datetime(value)
    if moment.tzinfo is None:
        raise ValueError("naive datetime for a timestamptz column")
    return _LEN_I64(8, (moment - _PG_EPOCH) // _MICROSECOND)


def _date_field(value: object) -> bytes:
    day = _as_date(value)
    if isinstance(day, datetime):
        raise TypeError("datetime for a date column")
    return _LEN_I32(4, (day - _PG_EPOCH_DATE).days)


_FIELD: dict[str, Callable[[Any], bytes]] = {
    "uuid": _uuid_field,
    "text": _text_field,
    "integer": _int4_field,
    "bigint": _int8_field,
    "boolean": _bool_field,
    "timestamptz": _timestamptz_field,
    "date": _date_field,
}


def copy_field(kind: str, value: object) -> bytes:
    """One non-NULL value of SQL type ``kind`` as binary COPY writes it (length and bytes)."""
    return _FIELD[kind](value)


def copy_encoded(
    ctx: BatchContext, table: str, columns: Sequence[tuple[str, str]], data: bytes
) -> None:
    """Send a whole binary COPY stream (from :func:`encode_binary_copy` or a projector's own
    encoder) into the logical ``table``; only for a rebuild's private tables (``ctx.copy``)."""
    assert ctx.copy
    names = ", ".join(name for name, _ in columns)
    statement = ctx.tables.q(f"COPY {{{table}}} ({names}) FROM STDIN (FORMAT BINARY)")
    with ctx.cur.copy(statement) as copy:
        copy.write(data)


def encode_binary_copy(rows: Sequence[Sequence[Any]], kinds: Sequence[str]) -> bytes:
    """``rows`` as a whole ``COPY ... (FORMAT BINARY)`` stream, for columns of ``kinds``.

    Raises (TypeError, ValueError, KeyError...) on a type or value it does not encode exactly
    as PostgreSQL's binary input expects; the caller then lets psycopg do it. Ids and times
    repeat a lot (every line of a log chunk has the run's ids), so their encodings are
    remembered for the call (by object: the rows keep the objects alive meanwhile).
    """
    fields = [_FIELD[kind] for kind in kinds]
    remember = [kind in ("uuid", "timestamptz", "date") for kind in kinds]
    width = len(fields)
    head = _I16(width)
    out = bytearray(_SIGNATURE)
    seen: dict[object, bytes] = {}
    text_field = _text_field
    for row in rows:
        if len(row) != width:
            raise ValueError(f"row of {len(row)} values for {width} columns")
        out += head
        for i, value in enumerate(row):
            if value is None:
                out += _NULL
            elif remember[i]:
                key = value if type(value) is str else id(value)
                encoded = seen.get(key)
                if encoded is None:
                    encoded = seen[key] = fields[i](value)
                out += encoded
            elif fields[i] is text_field and type(value) is str:
                # A lone surrogate fails to encode (ValueError): then psycopg's path, which
                # stores it as projections.text does.
                data = value.encode() if "\x00" not in value else storable_utf8(value)
                out += _I32(len(data))
                out += data
            else:
                out += fields[i](value)
    out += _TRAILER
    return bytes(out)


def columns_of(rows: Sequence[Sequence[Any]], width: int) -> list[list[Any]]:
    """Rows → one list per column (what ``unnest`` takes)."""
    if not rows:
        return [[] for _ in range(width)]
    return [list(column) for column in zip(*rows, strict=True)]
