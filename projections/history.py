"""Time travel: cards and boards as they were, folded from the event store (never a read model).

A read model shows the present; an audit asks about the past. Everything here reads the log
through the write side's repository and mapper, so snapshots shorten the fold and stored events
written at an older ``class_version`` are upcast on the way, exactly as the write side sees them.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import groupby
from operator import itemgetter
from typing import TYPE_CHECKING, Any
from uuid import UUID

from eventsourcing.persistence import StoredEvent
from eventsourcing.utils import get_topic, resolve_topic
from psycopg.rows import tuple_row

from adapters.aggregate_events import unappliable
from adapters.eventlog import UNKNOWN_TIME, undecodable_envelope, writes_library_json
from domain.card import OVERWRITING_EVENTS, Card
from domain.envelope import UNDECODABLE
from domain.errors import NotFound, UndecodableEvent, ValidationFailed
from domain.project import Project
from projections.kanban_sql import LANE_RENAMED_TOPIC, lane_after

if TYPE_CHECKING:
    from collections.abc import Generator, Iterator, Sequence

    from eventsourcing.persistence import Mapper
    from psycopg import Connection

    from domain.envelope import EventEnvelope


def parse_instant(text: str, *, option: str) -> datetime:
    """An ISO-8601 instant as tz-aware UTC; one without an offset is read as UTC."""
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValidationFailed(
            f"{option}: malformed time {text!r}; give ISO-8601 such as 2026-01-31T12:00:00Z"
        ) from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    try:
        return value.astimezone(UTC)
    except OverflowError:  # year 1 east of UTC, or 9999 west of it: no such UTC year here
        raise ValidationFailed(f"{option}: time {text!r} is out of range in UTC") from None


def card_state(card: Card) -> dict[str, Any]:
    """A card aggregate as plain JSON (the fields of the API's ``Card`` that the card holds)."""
    return {
        "id": str(card.id),
        "projectId": str(card.project_id),
        "title": card.title,
        "description": card.description,
        "lane": card.lane,
        "position": card.position,
        "assignee": card.assignee,
        "labels": list(card.labels),
        "blockedReason": card.blocked_reason,
        "archived": card.archived,
        "version": card.version,
        "createdAt": card.created_on.isoformat(),
        "updatedAt": card.modified_on.isoformat(),
    }


@dataclass(frozen=True)
class HistoryEntry:
    """One event of a card's history, with the fields of the API's ``HistoryEvent``.

    An event that could not be read (see :data:`~domain.envelope.UNDECODABLE`) is an entry too,
    so a history never silently skips a version: its ``type`` is :data:`UNDECODABLE`, its
    ``data`` names the type the log stored it under (``storedType``, None when unknown), and
    ``reason`` says why it could not be read. Its ``at`` is its own time when the stored state
    still says it (``at_known``), else the time of the entry before it: an aggregate's event
    times rise with its versions, so it was made no earlier."""

    version: int
    type: str
    at: datetime
    at_known: bool
    actor: str
    position: str
    """The log position; "" when the reader could not see the event."""
    data: dict[str, Any]
    reason: str = ""
    """Why the event could not be read; "" when it was."""

    def as_dict(self) -> dict[str, Any]:
        """As plain JSON (``at`` null when unknown), with ``reason`` for an unread one."""
        shown = {
            "version": self.version,
            "type": self.type,
            "at": self.at.isoformat() if self.at_known else None,
            "actor": self.actor,
            "position": self.position,
            "data": self.data,
        }
        return shown | {"reason": self.reason} if self.reason else shown


def history_entries(envelopes: Sequence[EventEnvelope]) -> list[HistoryEntry]:
    """A card's events (in version order, as :func:`read_api.eventlog.card_log` gives them)
    as history entries."""
    entries: list[HistoryEntry] = []
    previous = UNKNOWN_TIME
    for envelope in envelopes:
        actor = envelope.metadata.get("actor", "")
        reason = envelope.undecodable
        if not reason:
            previous = envelope.timestamp
            entries.append(
                HistoryEntry(
                    envelope.originator_version, envelope.type, previous, True, actor,
                    str(envelope.position), envelope.payload,
                )
            )  # fmt: skip
            continue
        known = envelope.timestamp != UNKNOWN_TIME
        previous = envelope.timestamp if known else previous
        entries.append(
            HistoryEntry(
                envelope.originator_version, UNDECODABLE, previous, known, actor,
                str(envelope.position) if envelope.position else "",
                {"storedType": envelope.type or None}, reason,
            )
        )  # fmt: skip
    return entries


def lane_then(
    conn: Connection[Any],
    mapper: Mapper[UUID],
    card: Card,
    envelopes: Sequence[EventEnvelope],
    *,
    as_of: datetime | None,
) -> str:
    """The name the board gave at ``as_of`` (None: now) to the lane ``card`` (folded from
    ``envelopes``, its events in version order) was in: a lane renamed after the card entered it
    and by ``as_of`` is named as renamed (the card's own events never mention the rename), as
    the Kanban read model and :func:`board_as_of` name it.

    Reads the project's lane renames stored after the card's last event that set its lane (an
    index holds them alone); one that cannot be read ends the search there."""
    entered = next(
        (
            e.position
            for e in reversed(envelopes[: card.version])
            if e.type in _LANE_SETTING_TYPES and not e.undecodable
        ),
        None,
    )
    if entered is None:
        return card.lane
    decode = _Decoder(mapper)
    renames: list[tuple[int, str, str]] = []
    for row in _rows(
        conn,
        "SELECT notification_id, originator_id, originator_version, topic, state"
        " FROM agentworks_events WHERE originator_id = %s AND topic = %s"
        " AND notification_id > %s ORDER BY originator_version",
        (card.project_id, LANE_RENAMED_TOPIC, entered),
    ):
        try:
            renamed = decode.row(row)
        except Exception:  # noqa: BLE001 - decoding is pure: the stored event's own fault
            break
        if as_of is not None and renamed.timestamp > as_of:
            break  # a project's event times rise with its versions: so are the rest
        renames.append((int(row[0]), renamed.lane, renamed.name))
    return lane_after(renames, entered, card.lane)


# -- boards ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CardAt:
    """A card as it was, and the lane the board showed it in (a lane renamed since the card
    entered it shows the new name; the card's own events never mention the rename)."""

    card: Card
    lane: str

    def state(self) -> dict[str, Any]:
        return card_state(self.card) | {"lane": self.lane}


@dataclass(frozen=True)
class LaneAt:
    name: str
    wip_limit: int | None
    cards: list[CardAt]
    """Live cards in board order (position, then id)."""

    @property
    def count(self) -> int:
        return len(self.cards)


@dataclass(frozen=True)
class BoardAt:
    """A board as it was at ``as_of``: what the Kanban read model showed right after the last
    write before that instant (lanes, WIP limits, counts, cards in order, the board version)."""

    project_id: UUID
    workspace_id: UUID
    as_of: datetime
    version: int
    lanes: list[LaneAt]
    unreadable: dict[UUID, int] = field(default_factory=dict)
    """Cards with an event up to ``as_of`` that could not be decoded or applied, each with that
    event's version: such a card is shown as of the version before it (not at all when it is
    its first), as ``cardHistory`` shows its state."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "projectId": str(self.project_id),
            "asOf": self.as_of.isoformat(),
            "version": self.version,
            "lanes": [
                {"name": lane.name, "wipLimit": lane.wip_limit, "count": lane.count,
                 "cards": [card.state() for card in lane.cards]}
                for lane in self.lanes
            ],
        }  # fmt: skip


#: Project events that only say where a card sits; the cards themselves say it too, so the
#: board's lanes are folded without them (a busy board has one per move).
_BOARD_ONLY = (Project.CardMoved, Project.CardLifted)
_LANE_SETTING = (Card.Created, Card.Moved, Card.Respread, Card.Restored)
_LANE_SETTING_TYPES = frozenset(cls.__qualname__ for cls in _LANE_SETTING)


def board_as_of(
    conn: Connection[Any], mapper: Mapper[UUID], *, project_id: UUID, as_of: datetime
) -> BoardAt:
    """The board of ``project_id`` at ``as_of``, folded from the event store.

    Lanes come from the project's own events (not its per-move placements); the cards from
    each card's latest snapshot at or before ``as_of`` plus the events after it, in two
    set-based queries for all cards (see :func:`_cards_at`). An aggregate's event times rise
    with its versions (each is decided after the one before was stored), which lets the
    board's version be found by bisection.
    Raises NotFound when the project does not exist, :class:`NotYet` when it did not yet.
    """
    with _without_jit(conn):
        return _board_as_of(conn, _Decoder(mapper), project_id, as_of)


def _board_as_of(
    conn: Connection[Any], decode: _Decoder, project_id: UUID, as_of: datetime
) -> BoardAt:
    excluded = [get_topic(cls) for cls in _BOARD_ONLY]
    # Beside each row, how many this reader sees up to it; and the project's last row, whatever
    # its kind: versions are gapless in the log, so fewer rows than versions means events this
    # reader cannot see (row-level security hides a state that names no workspace).
    rows = _stream(
        conn,
        "SELECT notification_id, originator_id, originator_version, topic, state, seen, last"
        " FROM (SELECT notification_id, originator_id, originator_version, topic, state,"
        " row_number() OVER w AS seen, lead(originator_version) OVER w IS NULL AS last"
        " FROM agentworks_events WHERE originator_id = %s"
        " WINDOW w AS (ORDER BY originator_version)) AS rows"
        " WHERE topic <> ALL(%s) OR last ORDER BY originator_version",
        (project_id, excluded),
    )
    # Decoded one at a time: a board's worth of events held at once is what sets off the
    # cyclic garbage collector (and a full collection costs more than the whole board).
    first = next(rows, None)
    created = None if first is None else _project_event(decode, first)
    if not isinstance(created, Project.Created):
        rows.close()
        raise NotFound(f"project {project_id} does not exist")
    if created.timestamp > as_of:
        rows.close()
        raise NotYet(f"project {project_id} did not exist at {as_of.isoformat()}")
    try:
        project: Any = created.mutate(None)
    except Exception as error:  # as for the events after it, below
        raise unappliable(created, error) from error
    renames: list[tuple[int, str, str]] = []
    card_ids: dict[UUID, None] = {}
    known_before, known_after = 1, None
    top, seen = 1, int(first[5])  # type: ignore[index]
    for row in rows:
        top, seen = int(row[2]), int(row[5])
        if row[3] in excluded:
            continue  # the last row, of a kind the lanes are folded without
        position = int(row[0])
        try:
            event = _project_event(decode, row)
        except UndecodableEvent as error:
            made = undecodable_envelope(
                (position, row[1], int(row[2]), str(row[3]), bytes(row[4])), error
            ).timestamp
            if made == UNKNOWN_TIME or made <= as_of:
                raise
            # Made after the instant, as all after it: the board before it is whole.
            known_after = int(row[2]) if known_after is None else known_after
            continue
        if event.timestamp > as_of:
            known_after = event.originator_version if known_after is None else known_after
            continue
        known_before = event.originator_version
        try:
            event.apply(project)
        except Exception as error:
            # It decodes, and today's apply refuses it: the board cannot be folded past it, as
            # past one that cannot be decoded.
            raise unappliable(event, error) from error
        if isinstance(event, Project.LaneRenamed):
            renames.append((position, event.lane, event.name))
        elif isinstance(event, Project.CardPlaced):
            card_ids[event.card_id] = None
    if seen != top:
        # The unseen event counts at the time of the next one this reader sees: were that
        # after the instant, so are the rest, none of them folded (nor to be bisected).
        unseen = _unseen_between(conn, project_id, 0, top)
        if unseen is not None:
            following = _rows(
                conn,
                "SELECT notification_id, originator_id, originator_version, topic, state"
                " FROM agentworks_events WHERE originator_id = %s AND originator_version > %s"
                " ORDER BY originator_version LIMIT 1",
                (project_id, unseen),
            )
            if following and _project_event(decode, following[0]).timestamp <= as_of:
                raise UndecodableEvent(
                    f"project {project_id}: its event at version {unseen} cannot be read here "
                    "(its stored state names no workspace); its board cannot be folded past it",
                    version=unseen,
                )
            known_after = unseen if known_after is None else min(known_after, unseen)
    version = _version_at(conn, decode, project_id, as_of, low=known_before, high=known_after)
    unreadable: dict[UUID, int] = {}
    cards = _cards_at(conn, decode, list(card_ids), as_of, unreadable=unreadable)
    by_lane: dict[str, list[CardAt]] = {spec.name: [] for spec in project.lanes}
    for card, lane_set_at in cards:
        if card.archived:
            continue
        if lane_set_at == 0 and any(old == card.lane for _, old, _ in renames):
            # Folded from a snapshot that hides when the card entered its lane, and a lane of
            # that name was renamed: fold this card from its start to know which lane it was.
            ((card, lane_set_at),) = _cards_at(conn, decode, [card.id], as_of, snapshots=False)
        lane = card.lane
        for position, old, new in renames:
            if position > lane_set_at and lane == old:
                lane = new
        by_lane.setdefault(lane, []).append(CardAt(card, lane))
    lanes = [
        LaneAt(
            name=spec.name,
            wip_limit=spec.wip_limit,
            cards=sorted(by_lane[spec.name], key=lambda c: (c.card.position, c.card.id)),
        )
        for spec in project.lanes
    ]
    return BoardAt(
        project_id=project_id,
        workspace_id=project.workspace_id,
        as_of=as_of,
        version=version,
        lanes=lanes,
        unreadable=unreadable,
    )


def _project_event(decode: _Decoder, row: tuple[Any, ...]) -> Any:  # noqa: ANN401
    """A project's stored event decoded (see :meth:`_Decoder.row`); :class:`UndecodableEvent`
    when it cannot be: the board's lanes cannot be folded past it."""
    try:
        return decode.row(row)
    except Exception as error:  # decoding is pure: the stored event's own fault
        raise UndecodableEvent(
            f"project {row[1]}: its event at version {row[2]} could not be decoded "
            f"({type(error).__name__}: {error}); its board cannot be folded past it",
            version=int(row[2]),
        ) from error


class NotYet(NotFound):
    """The thing asked about exists, but not yet at the instant asked about."""


@contextmanager
def _without_jit(conn: Connection[Any]) -> Iterator[None]:
    """Run the statements of a time-travel read without PostgreSQL's JIT compiler, and put the
    caller's setting back after them.

    The planner cannot know how few of a card's events lie between two snapshots, so it costs
    the per-card index ranges high and JIT-compiles them: ~230 ms of compiling for a 200-card
    board whose rows take ~20 ms to read. ``set_config(..., true)`` lasts until the end of the
    transaction (a savepoint in the caller's one, if it has one), hence the explicit reset."""
    with conn.transaction():
        ((before, _),) = _rows(
            conn, "SELECT current_setting('jit'), set_config('jit', 'off', true)", ()
        )
        yield
        _rows(conn, "SELECT set_config('jit', %s, true)", (before,))


#: The standard library's JSON parser without hooks, past the whitespace checks of ``json.loads``.
_PARSE = json.JSONDecoder().raw_decode


class _Decoder:
    """Stored rows as domain events, exactly as ``mapper.to_domain_event`` makes them.

    Most of a board's fold is card edits whose only transcoded value is their timestamp (a
    state that starts with :data:`_STAMP_PREFIX` and names ``"_type_"`` once). Those are read
    with one plain JSON parse (no object hook) and the timestamp converted as the library's
    ``DatetimeAsISO`` does, which spares the mapper's Python hook per JSON object and its
    per-event bookkeeping.
    Anything else (other transcoded values, an event stored at an older ``class_version``, a
    cipher or compressor, a state the plain read refuses) goes through the mapper, so its
    result or error is the mapper's. ``tests/unit/test_history_decoding.py`` holds the two ways
    to the same events."""

    def __init__(self, mapper: Mapper[UUID]) -> None:
        self.mapper = mapper
        self.plain = mapper.cipher is None and mapper.compressor is None
        """Stored states are the transcoder's JSON as is: PostgreSQL can read times in them."""
        self._fast = writes_library_json(mapper, ("datetime_iso",), only=False)

    def row(self, row: tuple[Any, ...]) -> Any:  # noqa: ANN401
        """A row ``(position, originator id, version, topic, state)`` as its domain event."""
        return self(row[1], int(row[2]), str(row[3]), bytes(row[4]))

    def __call__(self, originator_id: UUID, version: int, topic: str, state: bytes) -> Any:  # noqa: ANN401
        """The domain event of one stored event or snapshot.

        Any: the row is an aggregate's event or its snapshot, and each caller folds what it
        asked for (events have ``apply``, snapshots only ``mutate``); the mapper types neither."""
        if (
            self._fast
            and state.startswith(_STAMP_PREFIX)
            and state.count(b'"_type_"') == 1
            and b"\\u" not in state
        ):
            event = self._plain_event(originator_id, version, topic, state)
            if event is not None:
                return event
        return self.mapper.to_domain_event(
            StoredEvent(
                originator_id=originator_id,
                originator_version=version,
                topic=topic,
                state=state,
            )
        )

    @staticmethod
    def _plain_event(originator_id: UUID, version: int, topic: str, state: bytes) -> Any:  # noqa: ANN401
        """The event of a state whose one transcoded value is its timestamp; None when anything
        is not as expected, for the mapper to decide. (The caller checked the prefix, that
        ``"_type_"`` occurs once and that no ``\\u`` escape could spell it otherwise: so no
        other object is a transcoded value.)"""
        try:
            cls = resolve_topic(topic)
            text = state.decode("utf8")
            values, end = _PARSE(text)
            if end != len(text):
                return None  # the mapper allows trailing whitespace, or refuses what follows
            stamp = values["timestamp"]
            if len(stamp) != 2 or stamp["_type_"] != "datetime_iso":
                return None
            values["timestamp"] = datetime.fromisoformat(stamp["_data_"])
            if values.pop("class_version", 1) < getattr(cls, "class_version", 1):
                return None  # to be upcast
        except Exception:  # noqa: BLE001 - the mapper's path raises its own error for it
            return None
        values["originator_id"] = originator_id
        values["originator_version"] = version
        event = object.__new__(cls)
        object.__setattr__(event, "__dict__", values)
        return event


def _version_at(
    conn: Connection[Any],
    decode: _Decoder,
    aggregate_id: UUID,
    as_of: datetime,
    *,
    low: int,
    high: int | None,
) -> int:
    """The last version of an aggregate stored at or before ``as_of``, knowing that version
    ``low`` was and version ``high`` (if any) was not.

    With plain JSON states PostgreSQL bisects, reading the time in each probed state, in one
    statement; it leaves the rest (if any) to the loop here when a state does not start as
    :data:`_STAMP_PREFIX` (or the states are not plain), which decodes each probed event."""
    if decode.plain:
        ((low, high),) = _rows(
            conn,
            "WITH RECURSIVE probe(low, high) AS ("
            " SELECT %(low)s::bigint, coalesce(%(high)s::bigint, (SELECT max(originator_version)"
            "  + 1 FROM agentworks_events WHERE originator_id = %(id)s))"
            " UNION ALL"
            " SELECT CASE WHEN e.early THEN m.mid ELSE m.low END,"
            "  CASE WHEN e.early THEN m.high ELSE m.mid END"
            " FROM (SELECT low, high, (low + high) / 2 AS mid FROM probe WHERE high - low > 1)"
            "  AS m CROSS JOIN LATERAL (SELECT "
            f"{_EARLY} AS early FROM agentworks_events"
            "  WHERE originator_id = %(id)s AND originator_version = m.mid) AS e"
            " WHERE e.early IS NOT NULL)"
            " SELECT low, high FROM probe ORDER BY high - low LIMIT 1",
            {"id": aggregate_id, "low": low, "high": high, **_instant(as_of)},
        )
    elif high is None:
        ((top,),) = _rows(
            conn,
            "SELECT max(originator_version) FROM agentworks_events WHERE originator_id = %s",
            (aggregate_id,),
        )
        high = int(top) + 1
    while high - low > 1:
        middle = (low + high) // 2
        (row,) = _rows(
            conn,
            "SELECT notification_id, originator_id, originator_version, topic, state"
            " FROM agentworks_events WHERE originator_id = %s AND originator_version = %s",
            (aggregate_id, middle),
        )
        if _project_event(decode, row).timestamp <= as_of:
            low = middle
        else:
            high = middle
    return low


#: No upper bound on a card's versions (the largest bigint).
_UNBOUNDED = 2**63 - 1

#: Per kind (topic) of a card's rows after its snapshot: how many, and the last version (the
#: fold's own window, so nearly free): what :func:`_first_unseen` needs.
_KIND_COUNTS = (
    "count(*) OVER (PARTITION BY topic) AS kind_rows,"
    " max(originator_version) OVER (PARTITION BY topic) AS kind_top"
)


def _cards_at(
    conn: Connection[Any],
    decode: _Decoder,
    card_ids: list[UUID],
    as_of: datetime,
    *,
    snapshots: bool = True,
    unreadable: dict[UUID, int] | None = None,
) -> list[tuple[Card, int]]:
    """Each card as of ``as_of`` (those that existed), with the log position of the event that
    last set its lane (0 when that is before the snapshot it was folded from).

    A card with an event up to ``as_of`` that cannot be decoded is folded up to the event
    before it (or left out, when it is its first), and named in ``unreadable`` with that
    event's version. So is one with an event this reader cannot see (row-level security hides
    from the API a state that names no workspace, one that is not JSON among them) before one
    up to ``as_of``: a version missing from its rows (see :func:`_first_unseen`).

    Two statements for the whole board: each card's chosen snapshot (and the version of the
    one after it), then each card's events after its snapshot, one primary-key range per card.
    With plain JSON states PostgreSQL picks the snapshot and drops the events after ``as_of``
    (their times are in the state), and of the overwriting events
    (:data:`domain.card.OVERWRITING_EVENTS`: edits, moves ...) all but the latest of each kind,
    so only what the fold needs crosses the wire: a few rows a card, however far its snapshot
    is behind. Otherwise every snapshot, and every event after the chosen one, comes back and
    the times are compared here.
    """
    if not card_ids:
        return []
    base, later = (
        _snapshots_at(conn, decode, card_ids, as_of) if snapshots else ({}, [None] * len(card_ids))
    )
    folded: dict[int, tuple[Any, int]] = {n: (card, 0) for n, card in base.items()}
    after = [base[n].version if n in base else 0 for n in range(len(card_ids))]
    del base
    # A card's event times rise with its versions, so its events up to ``as_of`` are the ones
    # before the first event stamped later, ``stop``. That one is looked for from the card's
    # next snapshot on (taken after ``as_of``, the events past it almost always were too: the
    # search reads a row or two); not bounded by that snapshot's version itself, because the
    # events saved with the one it was taken at, or by a command that raced it, can be older
    # than the snapshot. Each card's events are one index range (a lateral subquery keeps the
    # planner on the primary key); rows name their card by its place in ``card_ids``.
    columns = "notification_id, originator_version, topic, state"
    if decode.plain:
        stop = (
            "coalesce((SELECT originator_version FROM agentworks_events"
            " WHERE originator_id = r.id AND originator_version > coalesce(r.later, r.after)"
            f" AND NOT ({_EARLY}) ORDER BY originator_version LIMIT 1), {_UNBOUNDED})"
        )
        # An overwriting event is dropped where a later one of its kind is surely at or before
        # the instant (so is it, and every event between: the card's times rise); one whose
        # time PostgreSQL cannot read ("maybe") is kept for the fold here to decide.
        events = (
            f"SELECT {columns}, kind_rows, kind_top FROM (SELECT {columns}, {_KIND_COUNTS},"
            " max(originator_version) FILTER (WHERE early) OVER (PARTITION BY topic) AS last_sure"
            f" FROM (SELECT {columns}, {_EARLY} AS early FROM agentworks_events"
            " WHERE originator_id = r.id AND originator_version > r.after"
            " AND originator_version < stop.version) AS range WHERE early IS NOT false) AS kept"
            " WHERE originator_version >= coalesce(last_sure, 0)"
            " OR topic <> ALL(%(overwriting)s::text[])"
        )
    else:
        stop = str(_UNBOUNDED)
        events = (
            f"SELECT {columns}, {_KIND_COUNTS} FROM agentworks_events WHERE originator_id = r.id"
            " AND originator_version > r.after AND originator_version < stop.version"
        )
    sql = (
        "SELECT r.n, e.notification_id, e.originator_version, e.topic, e.state, e.kind_rows,"
        " e.kind_top"
        " FROM unnest(%(ids)s::uuid[], %(after)s::bigint[], %(later)s::bigint[])"
        " WITH ORDINALITY AS r(id, after, later, n)"
        f" CROSS JOIN LATERAL (SELECT {stop} AS version) AS stop"
        f" CROSS JOIN LATERAL ({events} ORDER BY originator_version) AS e"
        " ORDER BY r.n, e.originator_version"
    )
    params = {
        "ids": card_ids,
        "after": after,
        "later": later,
        "overwriting": [get_topic(cls) for cls in OVERWRITING_EVENTS],
        **_instant(as_of),
    }
    # Only the plain path drops rows; elsewhere the library's own check on versions stands.
    dropping = decode.plain
    for n, rows in groupby(_stream(conn, sql, params), key=itemgetter(0)):
        card = n - 1
        card_id = card_ids[card]
        kept = list(rows)  # a few a card: the plain path sends only what the fold needs
        unseen = _first_unseen(conn, card_id, after[card], kept)
        for _, position, version, topic, state, _, _ in kept:
            try:
                event = decode(card_id, version, topic, state)
            except Exception as error:  # noqa: BLE001 - decoding is pure: the stored event's own fault
                stored = (position, card_id, version, str(topic), bytes(state))
                made = undecodable_envelope(stored, error).timestamp
                if unreadable is not None and (made == UNKNOWN_TIME or made <= as_of):
                    unreadable.setdefault(card_id, min(version, unseen or version))
                break
            if event.timestamp > as_of:
                break
            if unseen is not None and unseen < version:
                # Made before this event, which is up to the instant: so is the unseen one,
                # whose time is unknown (cardHistory's asOf counts it so too).
                if unreadable is not None:
                    unreadable.setdefault(card_id, unseen)
                break
            aggregate, lane_set_at = folded.get(card, (None, 0))
            if dropping and aggregate is not None and version > aggregate.version + 1:
                aggregate.version = version - 1  # the events between were overwritten, and dropped
            # A card's applies replace its attributes (never change a list in place), so its
            # attributes as they were are the card as of the version before.
            before = None if aggregate is None else dict(aggregate.__dict__)
            try:
                aggregate = event.mutate(aggregate)
            except Exception:  # noqa: BLE001 - folding is pure: the stored event's own fault
                # It decodes, and today's apply refuses it (see adapters.aggregate_events): as
                # an event that cannot be decoded, the card is shown as of the version before.
                if before is not None:
                    vars(aggregate).clear()
                    vars(aggregate).update(before)
                if unreadable is not None:
                    unreadable.setdefault(card_id, version)
                break
            if isinstance(event, _LANE_SETTING):
                lane_set_at = position
            folded[card] = (aggregate, lane_set_at)
    return [folded[n] for n in range(len(card_ids)) if n in folded]


def _first_unseen(
    conn: Connection[Any], card_id: UUID, after: int, rows: list[tuple[Any, ...]]
) -> int | None:
    """The first version after ``after`` that this reader cannot see, if one lies below the
    card's last row: versions are gapless in the log, so that is when the rows (each with its
    kind's count and last version, ``kind_rows`` and ``kind_top``, taken before any row of the
    kind was dropped) number fewer than the versions they span. None when there is none (also
    when a row was left out for its time, stamped after a later version's)."""
    kinds = {row[3]: (int(row[5]), int(row[6])) for row in rows}
    seen = sum(count for count, _ in kinds.values())
    top = max((last for _, last in kinds.values()), default=after)
    return None if top - after == seen else _unseen_between(conn, card_id, after, top)


def _unseen_between(
    conn: Connection[Any], aggregate_id: UUID, after: int, below: int
) -> int | None:
    """The first version of an aggregate between ``after`` and ``below`` (exclusive) that this
    reader cannot see; None when it sees them all."""
    ((version,),) = _rows(
        conn,
        "SELECT min(v) FROM generate_series(%s::bigint + 1, %s::bigint - 1) AS v WHERE NOT EXISTS"
        " (SELECT FROM agentworks_events WHERE originator_id = %s AND originator_version = v)",
        (after, below, aggregate_id),
    )
    return None if version is None else int(version)


def _snapshots_at(
    conn: Connection[Any], decode: _Decoder, card_ids: list[UUID], as_of: datetime
) -> tuple[dict[int, Any], list[int | None]]:
    """Each card as its latest snapshot at or before ``as_of`` has it (by the card's place in
    ``card_ids``), and the version of the card's next snapshot (None: there is none)."""
    if decode.plain:
        # Newest first, the time read from each snapshot's state until one is old enough.
        rows = _stream(
            conn,
            "SELECT r.n - 1, s.originator_version, s.topic, s.state,"
            " (SELECT min(originator_version) FROM agentworks_snapshots"
            "  WHERE originator_id = r.id"
            "  AND originator_version > coalesce(s.originator_version, 0))"
            " FROM unnest(%(ids)s::uuid[]) WITH ORDINALITY AS r(id, n)"
            " LEFT JOIN LATERAL (SELECT originator_version, topic, state"
            "  FROM agentworks_snapshots WHERE originator_id = r.id"
            f"  AND coalesce({_EARLY}, {_AT} <= %(as_of)s)"
            "  ORDER BY originator_version DESC LIMIT 1) AS s ON true"
            " ORDER BY r.n",
            {"ids": card_ids, **_instant(as_of)},
        )
        chosen: dict[int, Any] = {}
        following: list[int | None] = []
        for n, version, topic, state, next_version in rows:
            if version is not None:
                chosen[n] = decode(card_ids[n], version, topic, state).mutate(None)
            following.append(None if next_version is None else int(next_version))
        return chosen, following
    place = {card_id: n for n, card_id in enumerate(card_ids)}
    taken: dict[int, list[Any]] = {}
    for card_id, version, topic, state in _rows(
        conn,
        "SELECT originator_id, originator_version, topic, state FROM agentworks_snapshots"
        " WHERE originator_id = ANY(%s) ORDER BY originator_id, originator_version",
        (card_ids,),
    ):
        taken.setdefault(place[card_id], []).append(decode(card_id, version, topic, state))
    base: dict[int, Any] = {}
    upto: list[int | None] = [None] * len(card_ids)
    for n, snapshots in taken.items():
        before = [s for s in snapshots if s.timestamp <= as_of]
        if before:
            base[n] = before[-1].mutate(None)
        low = base[n].version if n in base else 0
        upto[n] = next(
            (s.originator_version for s in snapshots if s.originator_version > low), None
        )
    return base, upto


#: An event's or snapshot's time, read by PostgreSQL from a plain JSON state.
_AT = "(convert_from(state, 'UTF8')::json #>> '{timestamp,_data_}')::timestamptz"

#: The same, cheaply, where the state starts as the library's JSON transcoder writes events
#: and snapshots (:data:`_STAMP_PREFIX`, then the ISO time); NULL for any other start.
_STAMP_PREFIX = b'{"timestamp":{"_type_":"datetime_iso","_data_":"'
_STAMPED = (
    f"CASE WHEN substring(state from 1 for {len(_STAMP_PREFIX)})"
    f" = '\\x{_STAMP_PREFIX.hex()}'::bytea THEN split_part(encode(substring(state from"
    f" {len(_STAMP_PREFIX) + 1} for 40), 'escape'), '\"', 1)::timestamptz END"
)

STATE_TIME_SQL = _STAMPED
"""A stored event's time read in SQL from its ``state`` (NULL for a state PostgreSQL cannot
read it in: a cipher's or compressor's, another transcoding), for other folds by time."""

#: The shape of the time that follows :data:`_STAMP_PREFIX` when it is UTC to the microsecond
#: (what the transcoder writes for ``datetime.now(UTC)``, a time on a whole second aside).
_UTC_MICROS = b'____-__-__T__:__:__.______+00:00"'

#: Whether a state's time is at or before the instant (``%(as_of)s``, and ``%(as_of_text)s``
#: from :func:`_instant`); NULL when the state does not say, which callers treat as "maybe": a
#: filter, never a verdict. Times of the shape :data:`_UTC_MICROS` order as their first 26
#: bytes do, so those are compared as bytes (about 30 times cheaper than reading a
#: ``timestamptz``); others are read.
_EARLY = (
    f"CASE WHEN substring(state from 1 for {len(_STAMP_PREFIX)})"
    f" = '\\x{_STAMP_PREFIX.hex()}'::bytea AND substring(state from {len(_STAMP_PREFIX) + 1}"
    f" for {len(_UTC_MICROS)}) LIKE '\\x{_UTC_MICROS.hex()}'::bytea"
    f" THEN substring(state from {len(_STAMP_PREFIX) + 1} for 26) <= %(as_of_text)s"
    f" ELSE {_STAMPED} <= %(as_of)s END"
)


def _instant(as_of: datetime) -> dict[str, Any]:
    """The parameters :data:`_EARLY` compares with."""
    utc = as_of.astimezone(UTC).isoformat(timespec="microseconds")
    return {"as_of": as_of, "as_of_text": utc[:26].encode()}


def _rows(
    conn: Connection[Any], sql: str, params: tuple[Any, ...] | dict[str, Any]
) -> list[tuple[Any, ...]]:
    with conn.cursor(row_factory=tuple_row, binary=True) as cur:
        cur.execute(sql, params)
        return cur.fetchall()


def _stream(
    conn: Connection[Any], sql: str, params: tuple[Any, ...] | dict[str, Any]
) -> Generator[tuple[Any, ...], None, None]:
    """The rows of a statement, made into Python tuples one at a time (the result is read
    whole, as by :func:`_rows`)."""
    with conn.cursor(row_factory=tuple_row, binary=True) as cur:
        cur.execute(sql, params)
        yield from cur
