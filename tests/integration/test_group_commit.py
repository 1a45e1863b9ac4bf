"""Group commit: appends that arrive while one is being written go together, in one transaction.

A group forms only while a write is in progress, so these tests make one form for certain: they
hold the store's advisory lock from a session of their own, start one append (which leads, alone,
and waits on the lock), queue the others behind it and then let the lock go. The first commits
alone and the queued ones are written as one group. Every append must still get what a lone
append gets: its own notification ids, its own command record with its own position, its own
conflict (only it fails) and the truth about a commit whose answer was lost.
"""

from __future__ import annotations

import contextlib
import threading
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar
from uuid import UUID, uuid4

import psycopg
import pytest
from board_helpers import Board, add_cards, bootstrap_board, command_log_count
from eventsourcing.persistence import IntegrityError
from fault_proxy import FaultProxy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from recorder_helpers import (
    EVENTS_TABLE,
    advisory_locks,
    command_record,
    event,
    open_recorder,
    transaction_waits,
    until,
)

from adapters.eventstore import (
    CommandAlreadyRecorded,
    EventStoreRecorder,
    PostgresCommandLog,
    StaleVersion,
)
from commands import models as m
from infra.bootstrap import build_write_side

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from commands.handlers import AgentWorks
    from commands.service import CommandResult

T = TypeVar("T")
LOCK_KEY = zlib.crc32(f"public.{EVENTS_TABLE}".encode()) & 0x7FFFFFFF


# -- making a group form ---------------------------------------------------------------------------


@contextlib.contextmanager
def store_locked(database_url: str) -> Iterator[None]:
    """The store's advisory lock, held by a session of the test's own until the block ends."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
        try:
            yield
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))


def grouped(
    database_url: str,
    recorder: EventStoreRecorder,
    first: Callable[[], Any],
    rest: list[Callable[[], T]],
    *,
    before_release: Callable[[], None] = lambda: None,
) -> tuple[Future[Any], list[Future[T]]]:
    """Run ``first`` alone while the lock is held, queue ``rest`` behind it, then let go.

    The recorder's count of group sizes starts again from nothing here, and it writes one
    transaction at a time, so that everything queues behind the first.
    """
    recorder.group_commit.sizes.clear()
    recorder.group_commit.max_in_flight = 1
    pool = ThreadPoolExecutor(max_workers=len(rest) + 1)
    try:
        with store_locked(database_url):
            leading = pool.submit(first)
            until(
                lambda: advisory_locks(database_url, granted=False) == 1,
                "the first append waits on the lock",
            )
            queued = [pool.submit(call) for call in rest]
            until(
                lambda: recorder.group_commit.waiting == len(rest),
                f"{len(rest)} appends are queued",
            )
            before_release()
        for future in [leading, *queued]:
            with contextlib.suppress(Exception):
                future.result(timeout=60)
        return leading, queued
    finally:
        pool.shutdown(wait=True)


# -- the recorder alone ----------------------------------------------------------------------------


@pytest.fixture
def recorder(database_url: str) -> Iterator[EventStoreRecorder]:
    with open_recorder(database_url) as opened:
        yield opened


def stored(database_url: str) -> dict[tuple[UUID, int], tuple[int, int]]:
    """(originator id, version) -> (notification id, transaction id) of every stored event."""
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            f"SELECT originator_id, originator_version, notification_id, "
            f"transaction_id::text::bigint FROM {EVENTS_TABLE}"
        ).fetchall()
    return {(r[0], r[1]): (r[2], r[3]) for r in rows}


def recorded_positions(database_url: str) -> dict[str, int]:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT command_id::text, result FROM command_log").fetchall()
    return {str(r[0]): int(r[1]["position"]) for r in rows}


def test_appends_queued_behind_a_write_go_as_one_transaction(
    database_url: str, recorder: EventStoreRecorder
) -> None:
    appends = [([event(), event()] if i % 2 else [event()], command_record()) for i in range(8)]

    first, queued = grouped(
        database_url,
        recorder,
        lambda: recorder.insert_events([event()], command_record=command_record()),
        [
            (lambda e=events, r=rec: recorder.insert_events(e, command_record=r))
            for events, rec in appends
        ],
    )

    assert recorder.group_commit.sizes == {1: 1, 8: 1}
    rows = stored(database_url)
    positions = recorded_positions(database_url)
    transactions = set()
    for (events, rec), future in zip(appends, queued, strict=True):
        ids = list(future.result())
        assert ids == [rows[(e.originator_id, e.originator_version)][0] for e in events]
        assert positions[rec.command_id] == max(ids)
        transactions |= {rows[(e.originator_id, e.originator_version)][1] for e in events}
    assert len(transactions) == 1, "the group's appends were not one transaction"
    all_ids = [i for future in queued for i in future.result()]
    assert all_ids == sorted(all_ids)
    assert first.result()[0] < all_ids[0]


def test_a_conflicting_append_fails_alone_and_the_rest_of_its_group_commits(
    database_url: str, recorder: EventStoreRecorder
) -> None:
    """A version taken, an aggregate read that moved on, a command recorded before: each
    refuses the group's transaction, and then only the append concerned fails."""
    taken, read = event(), event()
    recorder.insert_events([taken])
    recorder.insert_events([read])
    recorder.insert_events([event(read.originator_id, 2)])
    recorded_before = command_record()
    recorder.insert_events([event()], command_record=recorded_before)
    good = [([event()], command_record()) for _ in range(4)]
    clash = ([event(taken.originator_id, 1)], command_record())
    stale = ([event()], command_record())
    again = ([event()], recorded_before)

    calls = [
        (lambda e=events, r=rec: recorder.insert_events(e, command_record=r))
        for events, rec in [good[0], clash, good[1], good[2]]
    ]
    calls.append(
        lambda: recorder.insert_events(
            stale[0], command_record=stale[1], unchanged_since={read.originator_id: 1}
        )
    )
    calls.append(lambda: recorder.insert_events(good[3][0], command_record=good[3][1]))
    calls.append(lambda: recorder.insert_events(again[0], command_record=again[1]))
    _, queued = grouped(database_url, recorder, lambda: recorder.insert_events([event()]), calls)

    assert recorder.group_commit.sizes == {1: 1, 7: 1}
    with pytest.raises(IntegrityError):
        queued[1].result()
    with pytest.raises(StaleVersion, match=str(read.originator_id)):
        queued[4].result()
    with pytest.raises(CommandAlreadyRecorded):
        queued[6].result()
    rows = stored(database_url)
    positions = recorded_positions(database_url)
    for (events, rec), future in zip(
        good, [queued[0], queued[2], queued[3], queued[5]], strict=True
    ):
        assert list(future.result()) == [rows[(events[0].originator_id, 1)][0]]
        assert positions[rec.command_id] == future.result()[0]
    assert clash[1].command_id not in positions
    assert stale[1].command_id not in positions
    assert (stale[0][0].originator_id, 1) not in rows
    assert (again[0][0].originator_id, 1) not in rows
    assert advisory_locks(database_url, granted=True) == 0


def test_duplicates_inside_one_group_are_written_one_after_the_other(
    database_url: str, recorder: EventStoreRecorder
) -> None:
    """Two records of one command, or two appends to one aggregate, never share a group: the
    second waits for the next group, and meets the first as a lone append would."""
    twice = command_record()
    aggregate = uuid4()
    first_copy, second_copy = [event()], [event()]
    calls = [
        lambda: recorder.insert_events(first_copy, command_record=twice),
        lambda: recorder.insert_events([event(aggregate, 1)], command_record=command_record()),
        lambda: recorder.insert_events(second_copy, command_record=twice),
        lambda: recorder.insert_events([event(aggregate, 2)], command_record=command_record()),
        lambda: recorder.insert_events([event()], command_record=command_record()),
    ]

    _, queued = grouped(database_url, recorder, lambda: recorder.insert_events([event()]), calls)

    # The first alone; a group of three; the second copy and the aggregate's second version
    # left for the next group, of two, refused for the copy; then each of those two alone.
    assert recorder.group_commit.sizes == {1: 1, 3: 1, 2: 1}
    with pytest.raises(CommandAlreadyRecorded):
        queued[2].result()
    for index in (0, 1, 3, 4):
        assert queued[index].result()
    rows = stored(database_url)
    assert (first_copy[0].originator_id, 1) in rows
    assert (second_copy[0].originator_id, 1) not in rows
    assert rows[(aggregate, 1)][0] < rows[(aggregate, 2)][0]


# -- commands through the write side ---------------------------------------------------------------


@pytest.fixture
def proxy(database_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultProxy]:
    monkeypatch.setenv("PGSSLMODE", "disable")  # the proxy reads the protocol
    running = FaultProxy("127.0.0.1", 5432)
    try:
        yield running
    finally:
        running.close()


def store_recorder(app: AgentWorks) -> EventStoreRecorder:
    recorder = app.recorder
    assert isinstance(recorder, EventStoreRecorder)
    return recorder


def rename(app: AgentWorks, board: Board, card_id: UUID, title: str) -> Callable[[], Any]:
    command = m.UpdateCard(card_id=card_id, title=title, command_id=uuid4())
    return lambda: app.update_card(command, board.owner)


def versions(database_url: str, ids: list[UUID]) -> dict[UUID, int]:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            f"SELECT originator_id, max(originator_version) FROM {EVENTS_TABLE} "
            "WHERE originator_id = ANY(%s) GROUP BY originator_id",
            (ids,),
        ).fetchall()
    return {r[0]: int(r[1]) for r in rows}


def test_concurrent_commands_are_grouped_and_each_gets_its_own_result(
    database_url: str, write_side: AgentWorks, board: Board
) -> None:
    recorder = store_recorder(write_side)
    lone, *cards = add_cards(write_side, board, 7)

    _, queued = grouped(
        database_url,
        recorder,
        rename(write_side, board, lone, "alone"),
        [rename(write_side, board, card, f"renamed {i}") for i, card in enumerate(cards)],
    )

    assert recorder.group_commit.sizes == {1: 1, 6: 1}
    results: list[CommandResult] = [future.result() for future in queued]
    rows = stored(database_url)
    for card, result in zip(cards, results, strict=True):
        assert result.id == card
        assert result.version == 2
        assert result.position == rows[(card, 2)][0]
        assert write_side.card_at(card, board.owner).title.startswith("renamed")
    assert len({rows[(card, 2)][1] for card in cards}) == 1


def test_a_command_whose_group_conflicts_decides_again_and_the_others_commit(
    database_url: str, write_side: AgentWorks, board: Board
) -> None:
    """A card renamed by another replica meanwhile: this side's cached copy is stale, so its
    append in the group takes a version that is taken; the group is refused, the other commands
    commit on their own and the stale one decides again on the store's state, in its own retry
    loop, as it would alone."""
    recorder = store_recorder(write_side)
    lone, stale, *cards = add_cards(write_side, board, 6)
    other = build_write_side(database_url, pool_size=2)
    try:
        other.update_card(m.UpdateCard(card_id=stale, title="elsewhere"), board.owner)
    finally:
        other.close()

    _, queued = grouped(
        database_url,
        recorder,
        rename(write_side, board, lone, "alone"),
        [rename(write_side, board, card, f"renamed {card}") for card in [stale, *cards]],
    )

    assert recorder.group_commit.sizes[5] == 1
    results: list[CommandResult] = [future.result() for future in queued]
    assert results[0].version == 3  # after the other replica's rename
    assert write_side.card_at(stale, board.owner).title == f"renamed {stale}"
    assert versions(database_url, [stale, *cards]) == {stale: 3} | {card: 2 for card in cards}


@pytest.mark.parametrize("cut", ["after", "before"])
def test_a_group_whose_commit_answer_was_lost_settles_for_every_command(
    database_url: str, proxy: FaultProxy, cut: str
) -> None:
    """The connection is cut as the group's COMMIT goes out (after the server got it, or
    instead of it): every command of the group learns the truth by the group's transaction id,
    and each is written exactly once."""
    app = build_write_side(proxy.url_for(database_url), pool_size=3, settle_seconds=5.0)
    try:
        board = bootstrap_board(app)
        cards = add_cards(app, board, 5)
        recorder = store_recorder(app)
        taken = event(cards[0], 1)  # refused at once, so the first write sends no COMMIT
        commands = [
            m.UpdateCard(card_id=card, title=f"{cut} {card}", command_id=uuid4()) for card in cards
        ]

        first, queued = grouped(
            database_url,
            recorder,
            lambda: recorder.insert_events([taken]),
            [(lambda c=command: app.update_card(c, board.owner)) for command in commands],
            before_release=proxy.cut_after_commit if cut == "after" else proxy.cut_before_commit,
        )

        with pytest.raises(IntegrityError):
            first.result()
        assert proxy.cuts == 1
        assert recorder.group_commit.sizes[5] == 1
        for command, future in zip(commands, queued, strict=True):
            result = future.result()
            assert result.replayed is False
            assert result.version == 2
            assert command_log_count(database_url, command.command_id) == 1
        assert versions(database_url, cards) == dict.fromkeys(cards, 2)
    finally:
        app.close()


# Appends over a few aggregates at random versions (some taken, some not, some twice), each with
# its own command id or a shared one, some with a read check: whatever the group does, each append
# must end as it would alone, all or nothing, and what was stored must be a consistent log.
APPEND = st.tuples(
    st.integers(0, 3),  # aggregate
    st.integers(1, 3),  # version
    st.integers(0, 5),  # command id (ten appends over six ids: some share one)
    st.none() | st.tuples(st.integers(0, 3), st.integers(0, 3)),  # read check
).filter(lambda spec: spec[3] is None or spec[3][0] != spec[0])  # as the write side sends them


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(appends=st.lists(APPEND, min_size=2, max_size=10))
def test_each_append_of_a_group_ends_as_it_would_alone(
    database_url: str, recorder: EventStoreRecorder, appends: list[Any]
) -> None:
    aggregates = [uuid4() for _ in range(4)]
    for aggregate in aggregates[:2]:  # two of them exist already, at version 1
        recorder.insert_events([event(aggregate, 1)])
    command_ids = [str(uuid4()) for _ in range(6)]

    def append(spec: Any) -> Any:
        index, version, command, read = spec
        extra = {}
        if read is not None:
            extra["unchanged_since"] = {aggregates[read[0]]: read[1]}
        rec = command_record(command_ids[command])
        return recorder.insert_events(
            [event(aggregates[index], version)], command_record=rec, **extra
        )

    _, queued = grouped(
        database_url,
        recorder,
        lambda: recorder.insert_events([event()]),
        [(lambda s=spec: append(s)) for spec in appends],
    )

    if _independent(appends):
        assert recorder.group_commit.sizes == {1: 1, len(appends): 1}
    rows = stored(database_url)
    positions = recorded_positions(database_url)
    succeeded = [
        (spec, f.result()) for spec, f in zip(appends, queued, strict=True) if not f.exception()
    ]
    for future in queued:
        error = future.exception()
        assert error is None or isinstance(error, IntegrityError), error
    # Every success is stored under the ids it was given, with its own command record.
    for (index, version, command, _), ids in succeeded:
        assert list(ids) == [rows[(aggregates[index], version)][0]]
        assert positions[command_ids[command]] == ids[0]
    # One success per command id at most, and each stored (aggregate, version) by one append.
    assert len({spec[2] for spec, _ in succeeded}) == len(succeeded)
    assert len({(spec[0], spec[1]) for spec, _ in succeeded}) == len(succeeded)
    # A command record exists only for a success.
    for command, command_id in enumerate(command_ids):
        assert (command_id in positions) == any(spec[2] == command for spec, _ in succeeded)
    # No append failed without a reason of its own: its version was taken, its command id was
    # recorded, or an aggregate it read had moved on.
    for spec, future in zip(appends, queued, strict=True):
        if future.exception() is None:
            continue
        index, version, command, read = spec
        taken = (aggregates[index], version) in rows
        recorded = command_ids[command] in positions
        moved_on = read is not None and any(
            key[0] == aggregates[read[0]] and key[1] > read[1] for key in rows
        )
        assert taken or recorded or moved_on, f"{spec} failed for no reason of its own"
    assert advisory_locks(database_url, granted=True) == 0


def _independent(appends: list[Any]) -> bool:
    """Whether no two appends share an aggregate or a command, or read what another writes."""
    written = [spec[0] for spec in appends]
    read = [spec[3][0] for spec in appends if spec[3] is not None]
    return (
        len(set(written)) == len(written)
        and len({spec[2] for spec in appends}) == len(appends)
        and not set(read) & set(written)
    )


def test_a_group_chosen_as_a_deadlock_victim_by_one_append_writes_the_others_alone(
    database_url: str, recorder: EventStoreRecorder
) -> None:
    """One append of a group waits on a writer elsewhere (the same command id, sent again to
    another replica, not committed yet) who then waits on an event of the group: PostgreSQL
    breaks the deadlock by aborting the group's transaction. That is a statement refused, like a
    version taken, not the database gone: the connection is fine, nothing was written, and each
    append is written again on its own (the innocent one commits; it is not told UNAVAILABLE)."""
    innocent = ([event()], command_record())
    culprit = ([event()], command_record())
    elsewhere = psycopg.connect(database_url)
    waiter: list[threading.Thread] = []

    def hold_the_command_id() -> None:
        elsewhere.execute("SET LOCAL deadlock_timeout = '60s'")  # the group detects it
        elsewhere.execute(
            "INSERT INTO command_log (scope, command_id, command_type, fingerprint, actor, result)"
            " VALUES ('ws', %s, 'MoveCard', 'f', 'bob', '{}')",
            (culprit[1].command_id,),
        )

        def wait_on_the_group() -> None:
            until(lambda: transaction_waits(database_url) == 1, "the group waits on the id")
            with contextlib.suppress(psycopg.Error):
                elsewhere.execute(
                    f"INSERT INTO {EVENTS_TABLE} (originator_id, originator_version, topic, state)"
                    " VALUES (%s, 1, 'topic', '\\x7b7d')",
                    (culprit[0][0].originator_id,),
                )
            elsewhere.rollback()

        waiter.append(threading.Thread(target=wait_on_the_group))
        waiter[0].start()

    try:
        _, queued = grouped(
            database_url,
            recorder,
            lambda: recorder.insert_events([event()]),
            [
                lambda: recorder.insert_events(innocent[0], command_record=innocent[1]),
                lambda: recorder.insert_events(culprit[0], command_record=culprit[1]),
            ],
            before_release=hold_the_command_id,
        )
        waiter[0].join(timeout=60)
    finally:
        elsewhere.close()

    rows = stored(database_url)
    positions = recorded_positions(database_url)
    for (events, rec), future in zip([innocent, culprit], queued, strict=True):
        assert list(future.result()) == [rows[(events[0].originator_id, 1)][0]]
        assert positions[rec.command_id] == future.result()[0]
    assert advisory_locks(database_url, granted=True) == 0


def test_a_command_id_sent_again_while_its_first_run_commits_answers_the_first_result(
    database_url: str, write_side: AgentWorks, board: Board
) -> None:
    """A client whose request timed out sends the same move (same commandId, same
    expectedVersion) again while the first run is still committing (here, waiting for the
    store's lock). Deciding now, the retry would find no record, decide on the version it
    expected, lose the version to the first run and then refuse (CONFLICT) on the state the
    first run made; it waits for its turn instead and answers the first result (API: a retry
    returns the first result)."""
    recorder = store_recorder(write_side)
    recorder.group_commit.max_in_flight = 1
    (card,) = add_cards(write_side, board, 1)
    command = m.MoveCard(card_id=card, to_lane="Doing", expected_version=1, command_id=uuid4())

    def send() -> CommandResult:
        return write_side.move_card(command, board.owner)

    with ThreadPoolExecutor(max_workers=2) as pool:
        with store_locked(database_url):
            first = pool.submit(send)
            until(
                lambda: advisory_locks(database_url, granted=False) == 1,
                "the first run waits on the lock",
            )
            again = pool.submit(send)
            log = write_side.command_log
            assert isinstance(log, PostgresCommandLog)
            until(lambda: log.waiting == 1, "the retry waits for its first run")
        answers = [first.result(timeout=60), again.result(timeout=60)]

    assert [a.replayed for a in answers] == [False, True]
    assert {(a.id, a.version, a.position) for a in answers} == {(card, 2, answers[0].position)}
    assert versions(database_url, [card]) == {card: 2}
    assert command_log_count(database_url, command.command_id) == 1
