"""Reading the log's usage and credit events into one month's billing fold, fast.

The write side's way (``commands.billing.billing_events``) decodes every billing event of the
whole log through the mapper: the transcoder's object hook builds every UUID, datetime and nested
object of every event, and a million events took minutes. This reader gives
``domain.billing.MonthFold`` the same figures, reading only the fields the fold uses:

* **a second reading of the stored format, only where it provably agrees with the mapper's.** A
  row is read fast when the mapper is the library's JSON transcoder with its standard UUID and
  datetime transcodings and no cipher or compressor, the event was stored at its class's
  current version (nothing to upcast), its state parses (orjson) to an object whose text holds
  exactly as many ``{`` as the objects checked (so the mapper's hook meets no other transcoded
  value, nor one it would fail on), every transcoded value is well-formed, and the fields the
  fold reads have the types the mapper's event would give them. Any other row (an older version
  to upcast, a monthly credit, an unexpected shape) is decoded by the mapper and folded with
  ``MonthFold.add``, as before: the result, and any error, is the same either way.
* **the month, filtered in SQL.** When no usage event class has a version to upcast from, a row
  whose state does not hold the month's text (``"2026-10"``, which the JSON encoder always
  writes as is) cannot name that month, and the fold would use it only to learn a charge's
  project for a correction: those few charges (corrected in a later month) are looked up when
  their correction is met. A month's reconciliation decodes the month, not the whole log
  (``MonthFold.events`` then counts the rows read).

The month's charges read fast are summed per workspace and project and handed to the fold once
each (integer sums: the order of the additions cannot change them); corrections and every row the
mapper decodes are folded in log order. ``tests/integration/test_billing_log.py`` holds this fold
equal to the mapper's over generated logs, upcasting included.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, cast
from uuid import UUID

import orjson
from eventsourcing.persistence import Notification
from eventsourcing.utils import get_topic, resolve_topic
from psycopg.sql import SQL, Composed, Identifier

from adapters.eventlog import fetch_rows, writes_library_json
from domain.billing import MonthFold
from domain.months import month_of
from domain.usage import UsageCharge

if TYPE_CHECKING:
    from eventsourcing.persistence import ApplicationRecorder, Mapper

    from adapters.eventstore import EventStoreRecorder

_CHARGED = get_topic(UsageCharge.Charged)
_CORRECTIONS = frozenset({get_topic(UsageCharge.Credited), get_topic(UsageCharge.Refunded)})
BILLING_TOPICS = tuple(get_topic(event) for event in MonthFold.FOLDS)
"""The events a month's fold reads, as ``commands.billing`` selects them."""

_USAGE_CLASSES = (UsageCharge.Charged, UsageCharge.Credited, UsageCharge.Refunded)

#: How many JSON objects the state of each fast-read event holds: the state itself, its ``meta``
#: and each transcoded value (a charge's timestamp, workspace, project, card and run; a
#: correction's timestamp).
_CHARGE_OBJECTS = 7
_CORRECTION_OBJECTS = 3

#: What ``UUIDAsHex`` writes (``UUID.hex``); ``UUID()`` decodes any such text without error.
_UUID_HEX = re.compile(r"[0-9a-f]{32}")
_MONTH = re.compile(r"([0-9]{4})-([0-9]{2})")
_CACHE_LIMIT = 100_000

Row = tuple[int, bytes, int, str, bytes]
"""Position, originator id (its 16 bytes), originator version, topic, state."""
Charge = tuple[str, str, str, int, datetime]
"""Month, workspace and project (hex), billed micros, timestamp."""
Correction = tuple[str, dict[str, Any], int]
"""Month, metadata, amount in micros."""


class _Fallback(Exception):
    """This row is not one the fast reading covers: the mapper decodes it."""


class BillingLog:
    """The usage-charge and credit events of the log, folded into a ``MonthFold``."""

    page_size = 20_000

    def __init__(self, recorder: EventStoreRecorder, mapper: Mapper[UUID]) -> None:
        self.recorder = recorder
        self.mapper = mapper
        self.fast = writes_library_json(mapper, ("uuid_hex", "datetime_iso"), only=False)
        # The month is filtered in SQL only where no stored usage event is upcast on reading.
        self.month_filter = self.fast and all(
            getattr(cls, "class_version", 1) == 1 for cls in _USAGE_CLASSES
        )
        self._versions = {topic: _class_version(topic) for topic in (_CHARGED, *_CORRECTIONS)}
        self._uuids: dict[str, UUID] = {}
        table = Identifier(recorder.datastore.schema, recorder.events_table_name)
        # The originator id as its 16 bytes: psycopg's UUID objects cost more than the rest of
        # the row; the fold needs the ids of corrected charges only.
        columns = SQL(
            "SELECT notification_id, uuid_send(originator_id), originator_version, topic, state"
            " FROM {0}"
        ).format(table)
        # Every committed row, not the recorder's horizon (see adapters.eventstore): that rule
        # is for tailing the log, and hides every row committed after the oldest transaction
        # still open in the database began. A fold is no tail: a month's invoice is drafted
        # from it once (the month closed, its every event committed before the close), so a
        # row it did not see would never be billed.
        self._page = columns + SQL(" WHERE notification_id > %s AND topic = ANY(%s)")
        self._charge_before = columns + SQL(
            " WHERE originator_id = %s AND topic = %s AND notification_id < %s"
            " ORDER BY notification_id DESC LIMIT 1"
        )

    # -- folding ----------------------------------------------------------------------------------

    def fold(self, fold: MonthFold) -> None:
        """Fold every billing event of the log that can touch ``fold.month``, in log order."""
        month = _MONTH.fullmatch(fold.month)
        if month is None:  # pragma: no cover - MonthFold parsed it
            raise ValueError(fold.month)
        needle = f'"{fold.month}"'.encode() if self.month_filter else None
        folding = _Folding(self, fold, (int(month[1]), int(month[2])), lookup=needle is not None)
        for rows in self._pages(needle):
            for row in rows:
                folding.row(row)
        folding.finish()

    def _pages(self, needle: bytes | None) -> Iterator[Sequence[Row]]:
        """The rows in log order, a page at a time; the next page is read (by the database and
        psycopg, mostly without the GIL) while the caller folds this one."""
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="billing-log") as reader:
            rows = self._rows(0, needle)
            while rows:
                following = reader.submit(self._rows, rows[-1][0], needle)
                yield rows
                rows = following.result()

    def learn_charge(self, fold: MonthFold, charge_id: UUID, *, before: int) -> None:
        """The project of a charge the month filter left out (billed in another month), from
        its last ``Charged`` event before ``before``, as reading the whole log would have."""
        found = fetch_rows(self.recorder, self._charge_before, (charge_id, _CHARGED, before))
        if not found:
            return  # the fold reports the correction of a charge it never saw
        row = cast("Row", found[0])
        charge = self.read_charge(row[4])
        if charge is None:
            event = self.decode(row)
            assert isinstance(event, UsageCharge.Charged)
            fold.charge(charge_id, event.project_id)
        else:
            fold.charge(charge_id, self.uuid(charge[2]))

    # -- reading ----------------------------------------------------------------------------------

    def _rows(self, after: int, needle: bytes | None) -> Sequence[Row]:
        statement: Composed = self._page
        params: list[Any] = [after, list(BILLING_TOPICS)]
        if needle is not None:
            # Monthly credits are few and checked by the fold (by their spend's id): all read.
            # The month is the last field our usage events write: the tail settles the month's
            # own rows at once; the rest is searched whole (any order of fields).
            statement += SQL(
                " AND (topic <> ALL(%s)"
                " OR position(%s IN substr(state, greatest(length(state) - 63, 1))) > 0"
                " OR position(%s IN state) > 0)"
            )
            params += [[_CHARGED, *_CORRECTIONS], needle, needle]
        statement += SQL(" ORDER BY notification_id LIMIT %s")
        params.append(self.page_size)
        return cast("list[Row]", fetch_rows(self.recorder, statement, params))

    def decode(self, row: Row) -> object:
        """The mapper's event of a row (the write side's reading, upcasting included)."""
        position, originator_id, originator_version, topic, state = row
        return self.mapper.to_domain_event(
            Notification(
                id=position,
                originator_id=UUID(bytes=bytes(originator_id)),
                originator_version=originator_version,
                topic=topic,
                state=bytes(state),
            )
        )

    def read_charge(self, raw: bytes) -> Charge | None:
        """A ``Charged`` event's fields the fold reads, when the mapper's event would hold
        exactly these values in them; ``None`` for a row the mapper must decode."""
        # The mapper's decoder transcodes every {"_type_", "_data_"} object of the document.
        # Each JSON object opens with a "{" of its own, so a text holding as many "{" as the
        # objects checked here holds no other (a "{" inside a string only sends it back).
        if not self.fast or raw.count(b"{") != _CHARGE_OBJECTS:
            return None
        try:
            state = orjson.loads(raw)
            if state.get("class_version", 1) != self._versions[_CHARGED]:
                return None  # an older version to upcast (or a newer one)
            if type(state["meta"]) is not dict:
                return None
            at = _timestamp(state["timestamp"])
            workspace = self._hex(state["workspace_id"])
            project = self._hex(state["project_id"])
            self._hex(state["card_id"])
            self._hex(state["run_id"])
            month, billed = state["month"], state["billed_micros"]
        except (orjson.JSONDecodeError, _Fallback, KeyError, AttributeError, ValueError):
            return None  # the mapper's decoder decides (big numbers, NaN, odd shapes, ...)
        if type(month) is not str or type(billed) is not int:
            return None
        return month, workspace, project, billed, at

    def read_correction(self, topic: str, raw: bytes) -> Correction | None:
        """A credit's or refund's fields the fold reads (see :meth:`read_charge`)."""
        if not self.fast or raw.count(b"{") != _CORRECTION_OBJECTS:
            return None
        try:
            state = orjson.loads(raw)
            if state.get("class_version", 1) != self._versions[topic]:
                return None
            meta = state["meta"]
            _timestamp(state["timestamp"])
            month, amount = state["month"], state["amount_micros"]
        except (orjson.JSONDecodeError, _Fallback, KeyError, AttributeError, ValueError):
            return None
        if type(meta) is not dict or type(month) is not str or type(amount) is not int:
            return None
        return month, meta, amount

    def _hex(self, value: object) -> str:
        """The text of a value transcoded as ``uuid_hex`` that ``UUID()`` decodes."""
        if type(value) is dict and len(value) == 2 and value.get("_type_") == "uuid_hex":
            text = value.get("_data_")
            if type(text) is str and (text in self._uuids or _UUID_HEX.fullmatch(text)):
                return text
        raise _Fallback

    def uuid(self, text: str) -> UUID:
        """The UUID of a hex text read above (the few projects and workspaces, cached)."""
        found = self._uuids.get(text)
        if found is None:
            if len(self._uuids) >= _CACHE_LIMIT:
                self._uuids.clear()
            found = self._uuids[text] = UUID(text)
        return found


class _Folding:
    """One fold's pass over the rows.

    The month's charges read fast are summed per workspace and project (and their late part)
    and handed to the fold once per project at the end: integer sums, which the order of the
    additions cannot change. A charge is otherwise noted by its raw id only; the fold learns its
    project when one of its corrections arrives (a UUID per correction, not per charge), so
    the fold's rule holds: a correction is filed under the project of its charge's last
    ``Charged`` event before it. Corrections and every row the mapper decodes are folded in log
    order, as they come.
    """

    def __init__(
        self, log: BillingLog, fold: MonthFold, year_month: tuple[int, int], *, lookup: bool
    ) -> None:
        self.log = log
        self.fold = fold
        self.month = fold.month
        self.year, self.mon = year_month
        self.lookup = lookup
        self.projects: dict[bytes, str] = {}
        """The project (hex) of each charge read fast, by raw id, until the fold learns it."""
        self.billed: dict[tuple[str, str], int] = {}
        self.late: dict[tuple[str, str], int] = {}
        self.events = 0

    def row(self, row: Row) -> None:
        position, raw_id, _, topic, raw = row
        if topic == _CHARGED:
            charge = self.log.read_charge(raw)
            if charge is None:
                self._slowly(row)
                return
            self.events += 1
            month, workspace, project, billed, at = charge
            self.projects[raw_id] = project
            if month == self.month:
                key = (workspace, project)
                self.billed[key] = self.billed.get(key, 0) + billed
                if (
                    at.tzinfo is not UTC or at.year != self.year or at.month != self.mon
                ) and month_of(at) != month:
                    self.late[key] = self.late.get(key, 0) + billed
        elif topic in _CORRECTIONS:
            correction = self.log.read_correction(topic, raw)
            if correction is None:
                self._slowly(row)
                return
            self.events += 1
            month, meta, amount = correction
            if month == self.month:
                self.fold.correct(self._introduce(raw_id, position), meta, amount)
        else:
            self._slowly(row)

    def finish(self) -> None:
        """Hand the fold the month's charges summed so far."""
        uuid, late = self.log.uuid, self.late
        for key, billed in self.billed.items():
            workspace, project = uuid(key[0]), uuid(key[1])
            late_part = late.get(key)
            self.fold.bill(workspace, project, billed - (late_part or 0), late=False)
            if late_part is not None:
                self.fold.bill(workspace, project, late_part, late=True)
        self.fold.events += self.events
        self.billed, self.late, self.events = {}, {}, 0

    def _slowly(self, row: Row) -> None:
        """A row the mapper decodes, folded by ``MonthFold.add`` as every row once was."""
        position, raw_id, _, topic, _ = row
        event = self.log.decode(row)
        if topic == _CHARGED:
            self.projects.pop(raw_id, None)  # the fold has the charge's latest project now
        elif topic in _CORRECTIONS and getattr(event, "month", None) == self.month:
            self._introduce(raw_id, position)
        self.fold.add(event)

    def _introduce(self, raw_id: bytes, position: int) -> UUID:
        """The id of a corrected charge, its project made known to the fold."""
        charge_id = UUID(bytes=raw_id)
        project = self.projects.pop(raw_id, None)
        if project is not None:
            self.fold.charge(charge_id, self.log.uuid(project))
        elif self.lookup and not self.fold.knows_charge(charge_id):
            self.log.learn_charge(self.fold, charge_id, before=position)
        return charge_id


def _timestamp(value: object) -> datetime:
    """What ``DatetimeAsISO`` decodes a transcoded value to; a timestamp without a zone is left
    to the mapper (the fold refuses it in its own words)."""
    if type(value) is dict and len(value) == 2 and value.get("_type_") == "datetime_iso":
        text = value.get("_data_")
        if type(text) is str:
            at = datetime.fromisoformat(text)
            if at.tzinfo is not None:
                return at
    raise _Fallback


def _class_version(topic: str) -> int:
    return int(getattr(resolve_topic(topic), "class_version", 1))


def billing_log_for(recorder: ApplicationRecorder, mapper: Mapper[UUID]) -> BillingLog | None:
    """The fast reader over the write side's recorder, or ``None`` for a store that is not our
    PostgreSQL one (the in-memory store of tests): then the mapper reads every event."""
    from adapters.eventstore import EventStoreRecorder

    if not isinstance(recorder, EventStoreRecorder):
        return None
    return BillingLog(recorder, mapper)
