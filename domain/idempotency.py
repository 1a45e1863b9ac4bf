"""Idempotent commands: a repeated ``command_id`` returns the first result and writes nothing.

The record of an accepted command is written in the same transaction as its events, so either both
exist or neither does. The event store accepts a :class:`CommandRecord` alongside the events it
appends and answers look-ups as a :class:`CommandLog`.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True, kw_only=True)
class CommandRecord:
    """``scope`` is the workspace of the caller's credentials, so ids never cross tenants."""

    scope: str
    command_id: str
    command_type: str
    fingerprint: str
    actor: str
    result: dict[str, Any]
    """The command's result; the store adds ``position`` once its events have ids."""


@dataclass(frozen=True, kw_only=True)
class StoredCommand:
    command_type: str
    fingerprint: str
    result: dict[str, Any]


class CommandLog(Protocol):
    """Raises :class:`~domain.errors.Unavailable` when the store cannot answer."""

    def find(self, scope: str, command_id: str) -> StoredCommand | None:
        """The record of an already accepted command, or None."""
        ...

    def one_at_a_time(
        self, scope: str, command_id: str
    ) -> AbstractContextManager[StoredCommand | None]:
        """Held by one execution of a command id until its record is committed (or it wrote
        nothing): another execution of the id, in any process writing to the same store, waits
        for it to end. Yields the id's record as the turn began (:meth:`find`'s answer then),
        so a second execution finds what the first recorded."""
        ...

    def committed(self, transaction_id: str) -> bool | None:
        """Whether a write whose commit was interrupted committed: True, False, or None while
        the store is still deciding."""
        ...
