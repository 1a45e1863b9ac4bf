"""Instants as events carry them: timezone-aware, written as ISO 8601 text."""

from __future__ import annotations

from datetime import datetime


def instant_text(at: datetime, *, what: str) -> str:
    """``at`` as ISO 8601 text for an event. A naive ``at`` is refused with ``ValueError``: the
    caller computed it (an expiry, say), so it is a bug, not input to answer VALIDATION to."""
    if at.tzinfo is None:
        raise ValueError(f"{what} must be timezone-aware")
    return at.isoformat()
