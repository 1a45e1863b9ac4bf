"""The group commit's queue and lead (adapters/eventstore.py ``GroupCommit``), without a database.

What forms a group, and that the lead passes on so that every append is written exactly once,
by one thread at a time; the database's side is in tests/integration/test_group_commit.py.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from typing import Any
from uuid import UUID, uuid4

from hypothesis import given
from hypothesis import strategies as st

from adapters.eventstore import GroupCommit, _Pending
from domain.idempotency import CommandRecord

AGGREGATES = [uuid4() for _ in range(4)]


def pending(
    writes: list[UUID], command: str | None = None, reads: list[UUID] | None = None
) -> _Pending:
    return _Pending(
        count=len(writes),
        columns=(writes, [1] * len(writes)) if writes else None,
        command=CommandRecord(
            scope="ws", command_id=command, command_type="C", fingerprint="f", actor="a", result={}
        )
        if command
        else None,
        reads=(reads, [0] * len(reads)) if reads else None,
    )


SPEC = st.tuples(
    st.lists(st.sampled_from(AGGREGATES), max_size=2, unique=True),
    st.none() | st.sampled_from(["c1", "c2", "c3"]),
    st.lists(st.sampled_from(AGGREGATES), max_size=2, unique=True),
)


def submit_from_threads(
    commit: GroupCommit, appends: list[_Pending], write: Callable[[list[_Pending]], None]
) -> None:
    """16 clients at once, each submitting every 16th append in turn; every append must come
    back written, and no client may be left waiting."""
    start = threading.Barrier(16)
    failures: list[BaseException] = []

    def client(k: int) -> None:
        start.wait()
        try:
            for p in appends[k::16]:
                commit.submit(p, write)
                assert p.done
                assert p.notification_ids == [1]
        except BaseException as error:  # noqa: BLE001 - reported by the test's thread
            failures.append(error)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads), "an append was never written"
    assert not failures, failures


@given(specs=st.lists(SPEC, min_size=1, max_size=12), cap=st.integers(1, 8))
def test_a_group_holds_nothing_that_could_conflict_and_keeps_arrival_order(
    specs: list[Any], cap: int
) -> None:
    queue = [pending(*spec) for spec in specs]
    commit = GroupCommit(max_appends=cap, max_events=100)
    commit._queue = list(queue)

    group = commit._take()

    assert group, "the head of the queue always goes"
    assert group[0] is queue[0]
    assert len(group) <= cap
    left = commit._queue
    assert [p for p in queue if p in group] == group
    assert [p for p in queue if p not in group] == left
    for i, a in enumerate(group):
        for b in group[i + 1 :]:
            assert a.writes.isdisjoint(b.writes)
            assert a.writes.isdisjoint(b.read_ids)
            assert b.writes.isdisjoint(a.read_ids)
            assert a.key is None or a.key != b.key
    if len(group) < cap:
        # Whatever was left conflicted with an append that went, or came after one that did.
        for p in left:
            earlier = [g for g in group if queue.index(g) < queue.index(p)]
            assert any(
                not p.writes.isdisjoint(g.writes)
                or not p.writes.isdisjoint(g.read_ids)
                or not p.read_ids.isdisjoint(g.writes)
                or (p.key is not None and p.key == g.key)
                for g in earlier
            )


def test_the_event_cap_leaves_a_large_append_for_the_next_group_but_never_stalls_it() -> None:
    commit = GroupCommit(max_appends=10, max_events=5)
    small, large = pending([uuid4()]), pending([uuid4() for _ in range(8)])
    commit._queue = [small, large]

    assert commit._take() == [small]
    assert commit._take() == [large]


def test_every_append_is_written_once_by_one_leader_at_a_time_and_groups_form() -> None:
    commit = GroupCommit(max_appends=8, max_events=1000)
    written: list[_Pending] = []
    writing = threading.Lock()

    def write(group: list[_Pending]) -> None:
        assert writing.acquire(blocking=False), "two leaders wrote at once"
        try:
            time.sleep(0.002)  # a transaction's round trips
            written.extend(group)
            for member in group:
                member.notification_ids = [1]
        finally:
            writing.release()

    appends = [pending([uuid4()], command=str(uuid4())) for _ in range(200)]
    submit_from_threads(commit, appends, write)

    assert sorted(map(id, written)) == sorted(map(id, appends))
    assert sum(size * n for size, n in commit.sizes.items()) == len(appends)
    assert max(commit.sizes) > 1
    assert commit.waiting == 0
    assert commit.leading == 0


def test_several_writers_at_once_never_share_an_aggregate_and_write_every_append_once() -> None:
    commit = GroupCommit(max_appends=8, max_events=1000, max_in_flight=3)
    hot = [uuid4() for _ in range(3)]
    flying: list[tuple[set[UUID], set[UUID]]] = []
    most_at_once = 0
    state = threading.Lock()
    written: list[_Pending] = []

    def write(group: list[_Pending]) -> None:
        nonlocal most_at_once
        writes = set().union(*(member.writes for member in group))
        reads = set().union(*(member.read_ids for member in group))
        touched = (writes, reads)
        with state:
            for other_writes, other_reads in flying:
                assert other_writes.isdisjoint(writes | reads), "one writes what another touches"
                assert writes.isdisjoint(other_reads), "one writes what another read"
            flying.append(touched)
            most_at_once = max(most_at_once, len(flying))
        time.sleep(0.002)
        with state:
            flying.remove(touched)
            written.extend(group)
        for member in group:
            member.notification_ids = [1]

    rng = random.Random(7)
    appends = [
        pending([rng.choice(hot)] if k % 3 == 0 else [uuid4()], reads=[rng.choice(hot)])
        for k in range(300)
    ]
    submit_from_threads(commit, appends, write)

    assert sorted(map(id, written)) == sorted(map(id, appends))
    assert 1 < most_at_once <= 3
    assert commit.waiting == 0
    assert commit.leading == 0


def test_without_group_commit_every_append_is_written_alone_at_once() -> None:
    commit = GroupCommit(max_appends=8, max_events=1000, max_in_flight=0)
    both_writing = threading.Barrier(2, timeout=10)
    groups: list[list[_Pending]] = []

    def write(group: list[_Pending]) -> None:
        groups.append(group)
        both_writing.wait()  # neither waits for the other to finish: no queue, no leader
        for member in group:
            member.notification_ids = [1]

    appends = [pending([uuid4()]), pending([uuid4()])]
    threads = [threading.Thread(target=commit.submit, args=(p, write)) for p in appends]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)

    assert all(p.done and p.notification_ids == [1] for p in appends)
    assert sorted(len(group) for group in groups) == [1, 1]
    assert commit.sizes == {1: 2}
    assert commit.waiting == 0
    assert commit.leading == 0


def test_an_error_of_the_write_reaches_every_member_and_the_lead_passes_on() -> None:
    commit = GroupCommit(max_appends=8, max_events=1000)
    boom = RuntimeError("write failed")

    def write(group: list[_Pending]) -> None:
        raise boom

    first = pending([uuid4()])
    commit.submit(first, write)

    assert first.done
    assert first.error is boom
    assert commit.leading == 0
    second = pending([uuid4()])
    commit.submit(second, lambda group: None)
    assert second.done
    assert second.error is None
