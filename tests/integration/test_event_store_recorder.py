"""Our event store recorder (adapters/eventstore.py) against the real PostgreSQL.

First the eventsourcing library's own recorder test cases, their assertions unchanged, against
``EventStoreRecorder`` on the table our migration creates (``agentworks_events``, which has the
``transaction_id xid8`` column the recorder's reader horizon needs) and connected as the
application role, as production runs it. Then what the library's cases cannot see: the reader
horizon that replaces the library's table lock (and what it means for subscriptions), and that a
failed insert gives the advisory lock back.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import threading
import time
import types
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import replace
from typing import TYPE_CHECKING, Any
from uuid import uuid4

import pg
import psycopg
import pytest
from board_helpers import wait_for
from eventsourcing.persistence import IntegrityError, JSONTranscoder, Mapper
from psycopg import IsolationLevel
from psycopg.conninfo import make_conninfo
from psycopg.rows import dict_row
from recorder_helpers import (
    APP_ROLE,
    EVENTS_TABLE,
    advisory_locks,
    command_record,
    event,
    make_datastore,
    make_recorder,
    open_recorder,
)

from adapters.eventlog import EventLog
from adapters.eventstore import EventStoreRecorder, StaleVersion

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

    from eventsourcing.persistence import Notification
    from eventsourcing.postgres import PostgresDatastore


def _import_library_cases() -> types.ModuleType:
    """``eventsourcing.tests.persistence``, even where the cipher's dependency is missing.

    That module imports ``eventsourcing.cipher`` (which needs ``pycryptodome``, the library's
    ``crypto`` extra, not one of our dependencies) only for its infrastructure-factory cases.
    The recorder cases never touch it, so when it cannot be imported a placeholder stands in for
    the duration of the import and is removed again, leaving no fake module behind for others.
    """
    try:
        importlib.import_module("eventsourcing.cipher")
    except ModuleNotFoundError as missing:
        if missing.name is None or not missing.name.startswith("Crypto"):
            raise
    else:
        return importlib.import_module("eventsourcing.tests.persistence")
    placeholder = types.ModuleType("eventsourcing.cipher")
    placeholder.AESCipher = None  # type: ignore[attr-defined]
    sys.modules["eventsourcing.cipher"] = placeholder
    try:
        return importlib.import_module("eventsourcing.tests.persistence")
    finally:
        del sys.modules["eventsourcing.cipher"]


if TYPE_CHECKING:
    from eventsourcing.tests import persistence as library_cases
else:
    library_cases = _import_library_cases()


def _other_database(database_url: str) -> str:
    return make_conninfo(database_url, dbname="postgres")


@pytest.fixture
def datastores(database_url: str) -> Iterator[list[PostgresDatastore]]:
    """Datastores a test opens, closed at its end (before its database is dropped)."""
    opened: list[PostgresDatastore] = []
    yield opened
    for datastore in opened:
        datastore.close()


@pytest.fixture
def recorder(database_url: str) -> Iterator[EventStoreRecorder]:
    with open_recorder(database_url) as opened:
        yield opened


# -- the library's own recorder test cases ---------------------------------------------------------


class _SettlingRecorder(EventStoreRecorder):
    """Our recorder, whose reads first wait for the transactions in flight when they began.

    The library's cases read right after writing and expect to see the write. Our recorder
    shows a committed event only once every transaction older than it has ended, on the whole
    server (the documented cost of the horizon, see ``adapters/eventstore.py`` and
    ``test_an_open_transaction_in_another_database_holds_readers_back``). Test sessions share
    one server, so an unrelated session's open transaction would make these cases flaky.
    Waiting (bounded) until every transaction that was running when the read began has ended
    makes everything committed before the read visible to it, without weakening any of the
    cases' assertions on contents, order and filters.
    """

    SETTLE_TIMEOUT = 10.0

    def select_notifications(self, *args: Any, **kwargs: Any) -> Sequence[Notification]:
        self._settle()
        found: Sequence[Notification] = super().select_notifications(*args, **kwargs)
        return found

    def max_notification_id(self) -> int | None:
        self._settle()
        highest: int | None = super().max_notification_id()
        return highest

    def _settle(self) -> None:
        deadline = time.monotonic() + self.SETTLE_TIMEOUT
        with self.datastore.get_connection() as conn:
            # Every transaction id below xmax was assigned before now.
            row = conn.execute(
                "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint AS xmax"
            ).fetchone()
            assert row is not None
            began = int(row["xmax"])
            while time.monotonic() < deadline:
                row = conn.execute(
                    "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint AS xmin"
                ).fetchone()
                assert row is not None
                if int(row["xmin"]) >= began:
                    return
                time.sleep(0.01)


class _OnFreshDatabase:
    """Gives a library (unittest) test case this test's fresh migrated database."""

    database_url: str
    _datastores: list[PostgresDatastore]

    @pytest.fixture(autouse=True)
    def _fresh_database(self, database_url: str) -> Iterator[None]:
        self.database_url = database_url
        self._datastores = []
        yield
        for datastore in self._datastores:
            datastore.close()

    def create_recorder(self) -> EventStoreRecorder:
        # Four connections (the library's own postgres suite uses 1-4): enough for its
        # concurrent cases to overlap commits, which is what our recorder changes.
        datastore = make_datastore(self.database_url, pool_size=4, max_overflow=4)
        self._datastores.append(datastore)
        return _SettlingRecorder(datastore, events_table_name=EVENTS_TABLE)


class TestLibraryApplicationRecorderCases(
    _OnFreshDatabase, library_cases.ApplicationRecorderTestCase[EventStoreRecorder]
):
    """``eventsourcing.tests.persistence.ApplicationRecorderTestCase``, every method.

    None of its methods asserts the table lock, so none is skipped; reads settle first
    (:class:`_SettlingRecorder`) so other sessions on the shared server cannot make them flaky.
    """

    def test_insert_subscribe(self) -> None:
        # Optional in the base class; the library's postgres suite runs it, so do we: the
        # LISTEN/NOTIFY subscription pulls through our select_notifications (with the horizon).
        self.optional_test_insert_subscribe()


class TestLibraryNonInterleavingCase(
    _OnFreshDatabase, library_cases.NonInterleavingNotificationIDsBaseCase
):
    """Two concurrent 1,000-event inserts get two unbroken runs of ids (the advisory lock)."""


# -- the reader horizon ----------------------------------------------------------------------------


def test_reader_does_not_pass_an_id_a_still_open_transaction_may_commit(
    recorder: EventStoreRecorder, database_url: str
) -> None:
    first, second = event(topic="first"), event(topic="second")
    with psycopg.connect(database_url) as slow:
        # The slow writer obtains the lower id (and the older transaction id), then dawdles.
        row = slow.execute(
            "INSERT INTO agentworks_events (originator_id, originator_version, topic, state) "
            "VALUES (%s, %s, %s, %s) RETURNING notification_id",
            (first.originator_id, first.originator_version, first.topic, first.state),
        ).fetchone()
        assert row is not None
        slow_id = row[0]

        # A fast writer commits a higher id meanwhile.
        (fast_id,) = recorder.insert_events([second])
        assert fast_id > slow_id

        # A reader tailing the log must not see the higher id yet: it would advance past the
        # lower one, which may still commit.
        assert recorder.select_notifications(start=None, limit=10) == []
        assert recorder.select_notifications(start=slow_id, limit=10) == []
        assert recorder.max_notification_id() is None

        slow.commit()

    notifications = wait_for(lambda: recorder.select_notifications(start=None, limit=10), 2)
    assert [(n.id, n.originator_id, n.topic) for n in notifications] == [
        (slow_id, first.originator_id, "first"),
        (fast_id, second.originator_id, "second"),
    ]
    assert recorder.max_notification_id() == fast_id


def test_reader_skips_nothing_when_the_open_transaction_rolls_back(
    recorder: EventStoreRecorder, database_url: str
) -> None:
    with psycopg.connect(database_url) as slow:
        slow.execute(
            "INSERT INTO agentworks_events (originator_id, originator_version, topic, state) "
            "VALUES (%s, 1, 'lost', '')",
            (uuid4(),),
        )
        (kept_id,) = recorder.insert_events([event(topic="kept")])
        assert recorder.select_notifications(start=None, limit=10) == []
        slow.rollback()

    notifications = wait_for(lambda: recorder.select_notifications(start=None, limit=10), 1)
    # The rolled-back id is a gap for good; the committed event behind it appears.
    assert [(n.id, n.topic) for n in notifications] == [(kept_id, "kept")]


def test_an_open_transaction_in_another_database_does_not_hold_readers_back(
    recorder: EventStoreRecorder, database_url: str
) -> None:
    # Transaction ids are server-wide, but the horizon leaves out transactions that belong to
    # other databases: a long transaction elsewhere on the cluster must not stall fan-out.
    with psycopg.connect(_other_database(database_url)) as elsewhere:
        elsewhere.execute("SELECT pg_current_xact_id()")
        (event_id,) = recorder.insert_events([event()])
        notifications = recorder.select_notifications(start=None, limit=10)
        assert [n.id for n in notifications] == [event_id]
        elsewhere.commit()


def test_an_open_transaction_in_this_database_holds_readers_back(
    recorder: EventStoreRecorder, database_url: str
) -> None:
    # Any transaction here might still insert an event with a lower id than what it sees.
    with psycopg.connect(database_url) as here:
        here.execute("SELECT pg_current_xact_id()")
        (event_id,) = recorder.insert_events([event()])
        assert recorder.select_notifications(start=None, limit=10) == []
        here.commit()

    notifications = wait_for(lambda: recorder.select_notifications(start=None, limit=10), 1)
    assert [n.id for n in notifications] == [event_id]


@contextlib.contextmanager
def _first_read_with_an_old_snapshot(
    recorder: EventStoreRecorder, database_url: str
) -> Iterator[int]:
    """The race behind the horizon's re-read, made deterministic: a transaction of another
    database, older than the event written here, is running when the recorder's next read takes
    its snapshot and has ended when that read looks it up in ``pg_locks``.

    A statement takes its snapshot when it starts; a connection in REPEATABLE READ whose
    snapshot was taken earlier stands in for a statement whose look-up came late. The recorder's
    next connection is that one; later ones are its own. Yields the event's position."""
    login = pg.login_url_for(database_url, APP_ROLE)
    with psycopg.connect(_other_database(database_url)) as elsewhere:
        elsewhere.execute("SELECT pg_current_xact_id()")
        (event_id,) = recorder.insert_events([event()])
        stale = psycopg.connect(login, row_factory=dict_row)
        stale.isolation_level = IsolationLevel.REPEATABLE_READ
        stale.execute("SELECT 1")  # the snapshot: `elsewhere` is running
        elsewhere.commit()  # and ends before the read
    own = recorder.datastore.get_connection
    handed = []

    @contextlib.contextmanager
    def get_connection(*args: Any, **kwargs: Any) -> Iterator[Any]:
        if handed:
            with own(*args, **kwargs) as conn:
                yield conn
            return
        handed.append(stale)
        yield stale

    recorder.datastore.get_connection = get_connection  # type: ignore[method-assign]
    try:
        yield event_id
        assert handed, "the read never took the connection with the old snapshot"
    finally:
        del recorder.datastore.get_connection
        stale.close()


_READS: dict[str, Callable[[EventStoreRecorder], list[int]]] = {
    "select_notifications": lambda r: [n.id for n in r.select_notifications(None, 10)],
    "max_notification_id": lambda r: [r.max_notification_id() or 0],
    "select_versions": lambda r: [
        row[0] for row in r.select_versions(after=0, through=2**62, limit=10) if row[4]
    ],
    "event_log.read": lambda r: [
        e.position for e in EventLog(r, Mapper(transcoder=JSONTranscoder())).read(0)
    ],
    "event_log.read_batch": lambda r: [
        e.position for e in EventLog(r, Mapper(transcoder=JSONTranscoder())).read_batch(0, 10)[0]
    ],
}


@pytest.mark.parametrize("read", sorted(_READS))
def test_a_read_held_back_by_a_transaction_that_had_already_ended_reads_again_at_once(
    recorder: EventStoreRecorder, database_url: str, read: str
) -> None:
    """The horizon keeps a transaction of its snapshot that has no lock left to tell its
    database by: it may have been this database's. One that ended in the moment between the
    snapshot and the look-up held the read back for nothing (while the suite copies databases,
    often). The read is made again at once, with a snapshot of its own, instead of reporting a
    log shorter than the one committed before it began."""
    with _first_read_with_an_old_snapshot(recorder, database_url) as event_id:
        assert _READS[read](recorder) == [event_id]


class _PullCountingRecorder(EventStoreRecorder):
    """Counts reads of the notification log, so a test can tell when a subscription pulled."""

    def __init__(self, datastore: PostgresDatastore) -> None:
        super().__init__(datastore, events_table_name=EVENTS_TABLE)
        self.pulls = 0
        self._pulls_lock = threading.Lock()

    def select_notifications(self, *args: Any, **kwargs: Any) -> Sequence[Notification]:
        found: Sequence[Notification] = super().select_notifications(*args, **kwargs)
        with self._pulls_lock:
            self.pulls += 1
        return found

    def wait_for_pulls(self, more_than: int, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while self.pulls <= more_than:
            assert time.monotonic() < deadline, "the subscription never pulled"
            time.sleep(0.01)


def _next_within(subscription: Any, timeout: float) -> Notification:
    with ThreadPoolExecutor(1) as pool:
        delivery = pool.submit(next, subscription)
        try:
            delivered: Notification = delivery.result(timeout=timeout)
        except FutureTimeout:
            subscription.stop()  # unblocks the waiting thread
            pytest.fail(f"nothing delivered within {timeout} s")
    return delivered


def test_subscription_delivers_an_event_the_horizon_held_back_at_its_notification(
    database_url: str, datastores: list[PostgresDatastore]
) -> None:
    datastore = make_datastore(database_url)
    datastores.append(datastore)
    recorder = _PullCountingRecorder(datastore)

    with recorder.subscribe(gt=0) as subscription:
        recorder.wait_for_pulls(more_than=0)  # the initial catch-up pull
        with psycopg.connect(_other_database(database_url)) as elsewhere:
            elsewhere.execute("SELECT pg_current_xact_id()")  # an older open transaction
            pulls = recorder.pulls
            (event_id,) = recorder.insert_events([event()])
            recorder.wait_for_pulls(more_than=pulls)  # woken by the NOTIFY; the horizon hides it
        # The older transaction has ended, nothing else is written: the event is readable now.
        assert [n.id for n in wait_for(lambda: recorder.select_notifications(None, 10), 1)] == [
            event_id
        ]
        delivered = _next_within(subscription, timeout=2.0)

    assert delivered.id == event_id


# -- the advisory lock is given back when an insert fails ------------------------------------------


@pytest.fixture
def two_sessions(
    database_url: str, datastores: list[PostgresDatastore]
) -> tuple[EventStoreRecorder, EventStoreRecorder]:
    """A recorder on one connection, so a failed insert and the next one share a session, and a
    recorder on another session, which would wait for a lock the first one leaked: its
    lock_timeout turns that hang into an error."""
    single = make_datastore(database_url, pool_size=1, max_overflow=0)
    other = make_datastore(database_url, pool_size=1, max_overflow=0, options="-c lock_timeout=2s")
    datastores.extend([single, other])
    return make_recorder(single), make_recorder(other)


def test_failed_insert_releases_the_advisory_lock(
    database_url: str, two_sessions: tuple[EventStoreRecorder, EventStoreRecorder]
) -> None:
    recorder, other_recorder = two_sessions

    taken = event()
    recorder.insert_events([taken])
    with pytest.raises(IntegrityError):
        recorder.insert_events([event(taken.originator_id, version=1)])

    assert advisory_locks(database_url, granted=True) == 0
    assert other_recorder.insert_events([event()]) is not None  # would hit lock_timeout
    assert recorder.insert_events([event()]) is not None
    assert len(wait_for(lambda: recorder.select_notifications(None, 10), 3)) == 3


def test_duplicate_command_record_fails_the_whole_insert_and_releases_the_lock(
    database_url: str, two_sessions: tuple[EventStoreRecorder, EventStoreRecorder]
) -> None:
    recorder, other_recorder = two_sessions
    record = command_record()

    recorder.insert_events([event()], command_record=record)
    lost = event()
    with pytest.raises(IntegrityError, match="command_log_pkey"):
        recorder.insert_events([lost], command_record=record)

    # Events and command record are one transaction: the events of the refused one are gone.
    assert recorder.select_events(lost.originator_id) == []
    assert advisory_locks(database_url, granted=True) == 0
    assert other_recorder.insert_events([event()]) is not None
    assert recorder.insert_events([event()]) is not None


def test_ranged_read_returns_each_aggregates_versions_between_its_bounds_in_log_order(
    recorder: EventStoreRecorder,
) -> None:
    first, second, untouched = uuid4(), uuid4(), uuid4()
    for version in range(1, 5):
        recorder.insert_events([event(first, version), event(second, version)])
    recorder.insert_events([event(untouched, 1)])

    found = recorder.select_positioned_ranges([(first, 1, 4), (second, 0, 3)])

    assert [(n.originator_id, n.originator_version) for n in found] == [
        (second, 1),
        (first, 2),
        (second, 2),
        (first, 3),
    ]
    assert [n.id for n in found] == sorted(n.id for n in found)
    assert recorder.select_positioned_ranges([]) == []


# -- a write whose decision read an aggregate that moved on writes nothing -------------------------


def test_write_is_refused_when_an_aggregate_it_read_has_moved_on(
    database_url: str, datastores: list[PostgresDatastore]
) -> None:
    single = make_datastore(database_url, pool_size=1, max_overflow=0)
    datastores.append(single)
    recorder = make_recorder(single)
    read = event()
    recorder.insert_events([read])
    record = command_record()
    # Current at version 1: the write goes through.
    written = event()
    recorder.insert_events(
        [written], command_record=record, unchanged_since={read.originator_id: 1}
    )
    assert len(recorder.select_events(written.originator_id)) == 1

    # The read aggregate moves on to version 2; a write that read version 1 is refused whole.
    recorder.insert_events([event(read.originator_id, version=2)])
    lost = event()
    late = replace(record, command_id=str(uuid4()))
    with pytest.raises(StaleVersion, match=str(read.originator_id)):
        recorder.insert_events(
            [lost], command_record=late, unchanged_since={read.originator_id: 1, uuid4(): 0}
        )
    assert recorder.select_events(lost.originator_id) == []
    with psycopg.connect(database_url) as conn:
        logged = conn.execute(
            "SELECT count(*) FROM command_log WHERE command_id = %s", (late.command_id,)
        ).fetchone()
    assert logged == (0,)
    assert advisory_locks(database_url, granted=True) == 0
    assert recorder.insert_events([event()], unchanged_since={read.originator_id: 2}) is not None
