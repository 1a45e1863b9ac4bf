"""The API's custom scalars: ``Money`` (exact decimal USD as a string) and UTC ``DateTime``.

``Money`` is integer micro-USD inside the API and a string on the wire (``"1.250000"``), parsed
and formatted only by :mod:`domain.money`, so no float ever touches an amount.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import NewType

import strawberry
from strawberry.types.scalar import ScalarDefinition

from domain.errors import ValidationFailed
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
}
