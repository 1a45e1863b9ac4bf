"""The API's custom scalars: ``Money`` (exact decimal USD as a string), UTC ``DateTime`` and
``BigInt`` (an integer as a decimal string), and the error of a count past GraphQL's ``Int``.

``Money`` is integer micro-USD inside the API and a string on the wire (``"1.250000"``), parsed
and formatted only by :mod:`domain.money`, so no float ever touches an amount.

``Int`` is a signed 32-bit integer (GraphQL's spec), and the contract types some counts ``Int!``
that a busy workspace's month passes (a usage row's tokens: ~100M a day is 2.1 billion in three
weeks). Each such field has a ``BigInt`` companion (``inputTokensTotal`` beside ``inputTokens``)
that carries the same count whatever its size, as a string: JSON numbers past 2^53 lose digits in
JavaScript, so a number would only move the limit. The ``Int`` field itself, when its value does
not fit, answers :class:`IntOverflow` (``INT_OVERFLOW``) naming the companion; see
:mod:`read_api.execution` for where, and docs/API_NOTES.md for what a client sees.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any, NewType

import strawberry
from strawberry.types.scalar import ScalarDefinition

from domain.errors import AgentWorksError, ValidationFailed
from domain.money import format_usd, parse_usd

Money = NewType("Money", int)
"""Micro-USD in Python; a decimal string of USD in GraphQL."""


def _serialize_money(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"Money must be int micro-USD inside the API, got {type(value).__name__}")
    return format_usd(value)


def _parse_money(value: object) -> Money:
    if not isinstance(value, str):
        raise ValidationFailed(
            f'Money must be a string of US dollars such as "1.25", got {type(value).__name__}'
        )
    return Money(parse_usd(value))


def _serialize_datetime(value: object) -> str:
    if not isinstance(value, datetime):
        raise TypeError(f"DateTime must be a datetime, got {type(value).__name__}")
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _parse_datetime(value: object) -> datetime:
    if not isinstance(value, str) or len(value) > 64:
        raise ValidationFailed("DateTime must be an ISO-8601 string such as 2025-01-31T12:00:00Z")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ValidationFailed(
            f"DateTime {value!r} is not ISO-8601 (e.g. 2025-01-31T12:00:00Z)"
        ) from None
    if parsed.tzinfo is None:
        raise ValidationFailed(f"DateTime {value!r} needs a time zone, e.g. a trailing 'Z' for UTC")
    try:
        return parsed.astimezone(UTC)
    except OverflowError:  # year 1 east of UTC, or 9999 west of it: no such UTC year here
        raise ValidationFailed(f"DateTime {value!r} is out of range in UTC") from None


BigInt = NewType("BigInt", int)
"""An int in Python; a decimal string in GraphQL (``"3000000000"``)."""

INT_MIN, INT_MAX = -(2**31), 2**31 - 1
"""The values GraphQL's ``Int`` holds: a signed 32-bit integer."""
BIGINT_MIN, BIGINT_MAX = -(2**63), 2**63 - 1
"""The values a ``BigInt`` input may hold: a signed 64-bit integer, PostgreSQL's bigint."""

_BIGINT_TEXT = re.compile(r"(?:0|-?[1-9][0-9]*)", re.ASCII)
"""A ``BigInt`` as it is written: ASCII digits, no sign but a minus, no leading zero, no
space, no ``_`` (``int()`` takes all of those, and other scripts' digits)."""


def _serialize_bigint(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"BigInt must be an int inside the API, got {type(value).__name__}")
    # Exact whatever its size: a sum of bigint columns is summed as numeric by PostgreSQL.
    return str(value)


def _parse_bigint(value: object) -> BigInt:
    """A ``BigInt`` variable or literal: a decimal string, or an ``Int`` (a JSON integer).

    Strict: a float (``3e9`` or ``3000000000.0``), a boolean, a string with a sign other than a
    minus, leading zeros, spaces, underscores or non-ASCII digits, and a value outside signed
    64 bits are refused (VALIDATION)."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValidationFailed(
            f'BigInt must be a string of decimal digits such as "3000000000" (or an Int), '
            f"got {type(value).__name__}"
        )
    if isinstance(value, str):
        if len(value) > len(str(BIGINT_MIN)) or not _BIGINT_TEXT.fullmatch(value):
            raise ValidationFailed(
                f"BigInt {value[:40]!r} is not an integer written in decimal digits "
                '(an optional minus, no leading zero), such as "3000000000"'
            )
        value = int(value)
    if not BIGINT_MIN <= value <= BIGINT_MAX:
        raise ValidationFailed(
            f"BigInt {value} is outside a signed 64-bit integer ({BIGINT_MIN} to {BIGINT_MAX})"
        )
    return BigInt(value)


INSTEAD = "agentworks.int_overflow_instead"
"""Key of a field's strawberry ``metadata``: for an ``Int`` field whose value may pass 32 bits,
where the same count is read whatever its size (its ``BigInt`` companion's name, or a path to
one), which its :class:`IntOverflow` names."""


class IntOverflow(AgentWorksError):
    """A field typed ``Int`` holds a value that GraphQL's ``Int`` (signed 32 bits) cannot carry.

    The field answers this error rather than graphql-core's generic refusal (which reached the
    client as ``VALIDATION``: the request's fault, which it is not), with what a client needs to
    read the count: the field (``Type.field``), the value (a string), the limit and ``instead``,
    the field that carries it (``None`` when the type has none)."""

    code = "INT_OVERFLOW"

    def __init__(self, *, field: str, value: int, instead: str | None) -> None:
        message = (
            f"{field} is {value}, which GraphQL's Int (a signed 32-bit integer, "
            f"{INT_MIN} to {INT_MAX}) cannot carry"
        )
        if instead is not None:
            message += f"; read {instead} (BigInt, a decimal string) instead"
        super().__init__(message, field=field, value=value, instead=instead)
        self.field = field
        self.value = value
        self.instead = instead

    def extensions(self) -> dict[str, Any]:
        """``extensions`` of the GraphQL error besides ``code``."""
        found: dict[str, Any] = {"field": self.field, "value": str(self.value), "max": INT_MAX}
        if self.instead is not None:
            found["instead"] = self.instead
        return found


SCALARS: dict[object, ScalarDefinition] = {
    Money: strawberry.scalar(
        name="Money",
        description='An exact amount of US dollars as a decimal string, e.g. "1.250000".',
        serialize=_serialize_money,
        parse_value=_parse_money,
    ),
    datetime: strawberry.scalar(
        name="DateTime",
        description='An ISO-8601 instant in UTC, e.g. "2025-01-31T12:00:00Z".',
        serialize=_serialize_datetime,
        parse_value=_parse_datetime,
    ),
    BigInt: strawberry.scalar(
        name="BigInt",
        description=(
            'An integer as a string of decimal digits, e.g. "3000000000": for counts that may '
            "pass Int's signed 32 bits (2147483647). An answer is exact whatever its size; an "
            'input is a string of digits with an optional minus, no leading zero ("-12", not '
            '"+12" or "012"), or an Int, within a signed 64-bit integer.'
        ),
        serialize=_serialize_bigint,
        parse_value=_parse_bigint,
    ),
}
