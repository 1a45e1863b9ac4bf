"""Text as the read models can store it: the one place a projector's strings meet PostgreSQL.

An event may carry text that PostgreSQL's ``text`` cannot hold: a NUL character, or (from JSON
with a ``\\ud800`` escape) a lone surrogate, which has no UTF-8 encoding. The event is the
record and is never changed; a read model is a view of it and shows U+FFFD (the Unicode
replacement character) there instead, visibly, rather than refusing the event and stalling
every read model behind it.

This is done once, where projector text leaves Python, not field by field: every cursor a
projection runner opens dumps strings through :class:`StorableStrDumper` and its siblings
(:func:`protect`), and the hand-written binary ``COPY`` encoders of the rebuild path encode text
with :func:`storable_utf8`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from psycopg.adapt import Dumper
from psycopg.postgres import types as pg_types
from psycopg.pq import Format

if TYPE_CHECKING:
    from psycopg.abc import AdaptContext, Buffer

REPLACEMENT = "\ufffd"

_TEXT_OID = pg_types["text"].oid


def storable(text: str) -> str:
    """``text`` with what PostgreSQL ``text`` refuses (NUL, lone surrogates) replaced by U+FFFD."""
    if "\x00" in text:
        text = text.replace("\x00", REPLACEMENT)
    try:
        text.encode()
    except UnicodeEncodeError:
        return "".join(REPLACEMENT if 0xD800 <= ord(ch) <= 0xDFFF else ch for ch in text)
    return text


def storable_utf8(text: str) -> bytes:
    """:func:`storable` ``text`` encoded as UTF-8 (what the binary encoders write)."""
    if "\x00" not in text:
        try:
            return text.encode()
        except UnicodeEncodeError:
            pass
    return storable(text).encode()


class _StorableDumper(Dumper):
    def dump(self, obj: str) -> Buffer | None:
        return storable_utf8(obj)


class StorableStrDumper(_StorableDumper):
    """Text format, to the ``text`` type (what ``COPY`` with ``set_types`` looks up)."""

    oid = _TEXT_OID


class StorableStrDumperUnknown(_StorableDumper):
    """Text format, to the unknown type: psycopg's default for ``str`` parameters, which lets a
    string stand for a uuid or a timestamp; kept as the default here."""


class StorableStrBinaryDumper(_StorableDumper):
    """Binary format, to the ``text`` type."""

    format = Format.BINARY
    oid = _TEXT_OID


def protect(context: AdaptContext) -> None:
    """Make ``context`` (a cursor, say) dump every ``str`` as :func:`storable` text.

    The registration order matters: the last dumper registered for a format is the default
    for ``str`` in it, as psycopg's own registration has it.
    """
    adapters = context.adapters
    adapters.register_dumper(str, StorableStrBinaryDumper)
    adapters.register_dumper(str, StorableStrDumper)
    adapters.register_dumper(str, StorableStrDumperUnknown)
