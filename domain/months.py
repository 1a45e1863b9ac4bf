"""Billing months: ``YYYY-MM`` UTC calendar months, one parser for every edge that takes one.

A month is a billing month when both its first instant and the first instant after it are
UTC datetimes: ``0001-01`` to ``9999-11``. Year 0 is no year (``datetime`` starts at 1), and
``9999-12`` ends at an instant no ``datetime`` holds, so whether it has ended, what follows it
and its rows up to its end cannot be asked. Every month a statement, reconciliation or invoice
names is parsed here (GraphQL, the CLI, the read side's queries, the domain's folds), so each
refuses the same text with the same VALIDATION message naming it.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Final

from domain.errors import ValidationFailed

FIRST_MONTH: Final[str] = "0001-01"
LAST_MONTH: Final[str] = "9999-11"
"""The last month whose end (the next month's first instant) a UTC ``datetime`` can hold."""

_MONTH: Final[re.Pattern[str]] = re.compile(r"[0-9]{4}-(0[1-9]|1[0-2])", re.ASCII)
#: How much of a malformed month a refusal quotes (a client may send megabytes).
_QUOTED = 40


def parse_month(text: object) -> str:
    """``text`` if it is a billing month (``YYYY-MM``, :data:`FIRST_MONTH` to
    :data:`LAST_MONTH`), else VALIDATION naming it."""
    if not isinstance(text, str) or not _MONTH.fullmatch(text):
        shown = text[:_QUOTED] if isinstance(text, str) else text
        raise ValidationFailed(f"month must look like YYYY-MM (e.g. 2026-01), got {shown!r}")
    # Fixed-width digits: the text order is the months' order.
    if not FIRST_MONTH <= text <= LAST_MONTH:
        raise ValidationFailed(
            f"month {text} is outside the billing months {FIRST_MONTH} to {LAST_MONTH}"
        )
    return text


def month_of(at: datetime) -> str:
    """The UTC calendar month of ``at``: billing months are UTC months wherever the caller is."""
    if at.tzinfo is None:
        raise ValidationFailed("times must be timezone-aware UTC")
    utc = at.astimezone(UTC)
    return f"{utc.year:04d}-{utc.month:02d}"


def month_start(month: str) -> datetime:
    """The first instant (UTC) of ``month``."""
    year, mon = parse_month(month).split("-")
    return datetime(int(year), int(mon), 1, tzinfo=UTC)


def month_end(month: str) -> datetime:
    """The first instant (UTC) after ``month``."""
    start = month_start(month)
    year, mon = (start.year + 1, 1) if start.month == 12 else (start.year, start.month + 1)
    return start.replace(year=year, month=mon)


def next_month(month: str) -> str:
    """The month after ``month`` (after :data:`LAST_MONTH`, a month no parser takes)."""
    return month_of(month_end(month))
