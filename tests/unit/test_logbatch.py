"""The run-log batcher: lines are written one chunk write after they complete, lines that
complete during a write share the next chunk, nothing is lost, duplicated or reordered."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from uuid import UUID, uuid4

import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestrator import logbatch
from orchestrator.logbatch import Line, LogBatcher, RunLogWriter


class Sink:
    """A chunk writer that can be held, like a slow database."""

    def __init__(self) -> None:
        self.chunks: list[list[Line]] = []
        self.open = asyncio.Event()
        self.open.set()

    async def write(self, lines: list[Line]) -> None:
        await self.open.wait()
        self.chunks.append(lines)

    def texts(self) -> list[list[str]]:
        return [[text for _, _, text in chunk] for chunk in self.chunks]


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_a_completed_line_is_written_at_once_when_no_write_is_under_way() -> None:
    async def scenario() -> list[list[str]]:
        sink = Sink()
        batcher = LogBatcher(sink.write)
        batcher.start()
        batcher.add("hello world\n")
        await settle()  # no timer: the line is written before any time passes
        written = sink.texts()
        await batcher.close()
        return written

    assert asyncio.run(scenario()) == [["hello world"]]


def test_lines_completed_during_a_write_share_the_next_chunk() -> None:
    async def scenario() -> list[list[str]]:
        sink = Sink()
        batcher = LogBatcher(sink.write)
        batcher.start()
        sink.open.clear()
        batcher.add("first\n")
        await settle()  # the first chunk's write is under way, held
        for n in range(5):
            batcher.add(f"line {n}\n")
        sink.open.set()
        await settle()
        await batcher.close()
        return sink.texts()

    assert asyncio.run(scenario()) == [["first"], [f"line {n}" for n in range(5)]]


def test_chunks_hold_at_most_max_lines() -> None:
    async def scenario() -> list[int]:
        sink = Sink()
        batcher = LogBatcher(sink.write, max_lines=100)
        sink.open.clear()
        batcher.start()
        batcher.add("".join(f"{n}\n" for n in range(250)))
        await settle()
        sink.open.set()
        await batcher.close()
        return [len(chunk) for chunk in sink.chunks]

    assert asyncio.run(scenario()) == [100, 100, 50]


def test_a_partial_line_is_written_after_its_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logbatch, "PARTIAL_LINE_SECONDS", 0.05)

    async def scenario() -> tuple[list[list[str]], list[list[str]]]:
        sink = Sink()
        batcher = LogBatcher(sink.write)
        batcher.start()
        batcher.add("no newline yet")
        await settle()
        before = sink.texts()
        await asyncio.sleep(0.2)
        after = sink.texts()
        await batcher.close()
        return before, after

    assert asyncio.run(scenario()) == ([], [["no newline yet"]])


@given(
    pieces=st.lists(
        st.text(alphabet=st.sampled_from("ab \n"), min_size=1, max_size=8), max_size=40
    ),
    system_at=st.sets(st.integers(0, 40), max_size=4),
    max_lines=st.integers(1, 5),
)
def test_every_line_is_written_once_in_order(
    pieces: list[str], system_at: set[int], max_lines: int
) -> None:
    async def scenario() -> tuple[list[tuple[str, str]], list[int]]:
        sink = Sink()
        batcher = LogBatcher(sink.write, max_lines=max_lines)
        batcher.start()
        for index, piece in enumerate(pieces):
            if index in system_at:
                batcher.system(f"system {index}")
            batcher.add(piece)
            if index % 3 == 0:
                await asyncio.sleep(0)
        await batcher.close()
        written = [(stream, text) for chunk in sink.chunks for _, stream, text in chunk]
        return written, [len(chunk) for chunk in sink.chunks]

    written, sizes = asyncio.run(scenario())
    assert all(0 < size <= max_lines for size in sizes)
    stdout = [text for stream, text in written if stream == "stdout"]
    # A system line cuts the partial line short; otherwise the text comes back as it went in.
    if not system_at & set(range(len(pieces))):
        expected = "".join(pieces).split("\n")
        if expected[-1] == "":
            expected.pop()  # the text ended with its newline: no partial line is left
        assert stdout == expected
    assert [text for stream, text in written if stream == "system"] == [
        f"system {i}" for i in sorted(system_at) if i < len(pieces)
    ]


WS_A = UUID("1b2c3d4e-5f60-4172-8394-a5b6c7d8e9f0")
WS_B = UUID("2c3d4e5f-6071-4283-94a5-b6c7d8e9f0a1")


class Store:
    """Group and single writes as the orchestrator sends them; a group may be refused."""

    def __init__(self, refuse_groups: BaseException | None = None) -> None:
        self.groups: list[tuple[UUID, list[UUID]]] = []
        self.alone: list[UUID] = []
        self.refuse_groups = refuse_groups
        self.gate = asyncio.Event()
        self.gate.set()

    async def write_group(self, workspace: UUID, chunks: list[tuple[UUID, list[Line]]]) -> None:
        await self.gate.wait()
        if self.refuse_groups is not None:
            raise self.refuse_groups
        self.groups.append((workspace, [run for run, _ in chunks]))

    def alone_writer(self, run: UUID, fail: bool = False) -> Callable[[], Awaitable[None]]:
        async def write() -> None:
            await self.gate.wait()
            if fail:
                raise LookupError(f"run {run} was taken over")
            self.alone.append(run)

        return write


def locks() -> Callable[[UUID], asyncio.Lock]:
    held: dict[UUID, asyncio.Lock] = {}
    return lambda run: held.setdefault(run, asyncio.Lock())


def lines(text: str) -> list[Line]:
    return [(datetime.now(UTC), "stdout", text)]


def test_chunks_waiting_together_go_out_as_one_write_per_workspace() -> None:
    runs = [uuid4() for _ in range(5)]

    async def scenario() -> Store:
        store = Store()
        writer = RunLogWriter(store.write_group, retry_alone=lambda error: True, run_lock=locks())
        writer.start()
        store.gate.clear()
        first = asyncio.create_task(
            writer.write(WS_A, runs[0], lines("a"), store.alone_writer(runs[0]))
        )
        await settle()  # the first chunk is being written (alone: nothing else waited)
        rest = [
            asyncio.create_task(
                writer.write(WS_A if i < 3 else WS_B, run, lines("b"), store.alone_writer(run))
            )
            for i, run in enumerate(runs[1:], start=1)
        ]
        await settle()
        store.gate.set()
        await asyncio.gather(first, *rest)
        await writer.stop()
        return store

    store = asyncio.run(scenario())
    assert store.alone == [runs[0]]
    assert sorted(store.groups) == sorted([(WS_A, runs[1:3]), (WS_B, runs[3:])])


def test_a_refused_group_is_written_chunk_by_chunk_and_each_run_gets_its_own_outcome() -> None:
    ok, lost, other = uuid4(), uuid4(), uuid4()

    async def scenario() -> tuple[Store, list[BaseException | None]]:
        store = Store(refuse_groups=LookupError("one run of the group was taken over"))
        writer = RunLogWriter(store.write_group, retry_alone=lambda error: True, run_lock=locks())
        writer.start()
        store.gate.clear()
        warmup = asyncio.create_task(
            writer.write(WS_A, other, lines("w"), store.alone_writer(other))
        )
        await settle()
        tasks = [
            asyncio.create_task(writer.write(WS_A, ok, lines("x"), store.alone_writer(ok))),
            asyncio.create_task(
                writer.write(WS_A, lost, lines("y"), store.alone_writer(lost, fail=True))
            ),
        ]
        await settle()
        store.gate.set()
        outcomes = await asyncio.gather(warmup, *tasks, return_exceptions=True)
        await writer.stop()
        return store, list(outcomes)

    store, outcomes = asyncio.run(scenario())
    assert store.groups == []
    assert sorted(store.alone) == sorted([other, ok])
    assert outcomes[:2] == [None, None]
    assert isinstance(outcomes[2], LookupError)


def test_a_group_the_store_may_have_written_is_not_written_again() -> None:
    runs = [uuid4() for _ in range(3)]

    async def scenario() -> tuple[Store, list[BaseException | None]]:
        store = Store(refuse_groups=TimeoutError("outcome unknown"))
        writer = RunLogWriter(
            store.write_group,
            retry_alone=lambda error: not isinstance(error, TimeoutError),
            run_lock=locks(),
        )
        writer.start()
        store.gate.clear()
        tasks = [
            asyncio.create_task(writer.write(WS_A, run, lines("z"), store.alone_writer(run)))
            for run in runs
        ]
        await settle()
        store.gate.set()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        await writer.stop()
        return store, list(outcomes)

    store, outcomes = asyncio.run(scenario())
    # All three waited together, as one group: it is neither written again as a group nor
    # chunk by chunk, and every run learns that its chunk's fate is unknown.
    assert store.alone == []
    assert store.groups == []
    assert all(isinstance(outcome, TimeoutError) for outcome in outcomes)


def test_a_group_waits_for_its_runs_other_writes_instead_of_racing_them() -> None:
    busy, free = uuid4(), uuid4()

    async def scenario() -> list[str]:
        order: list[str] = []
        held: dict[UUID, asyncio.Lock] = {}

        def run_lock(run: UUID) -> asyncio.Lock:
            return held.setdefault(run, asyncio.Lock())

        async def write_group(workspace: UUID, chunks: list[tuple[UUID, list[Line]]]) -> None:
            order.append("group")

        writer = RunLogWriter(write_group, retry_alone=lambda error: True, run_lock=run_lock)
        writer.start()
        async with run_lock(busy):  # the busy run's charge is being written
            tasks = [
                asyncio.create_task(writer.write(WS_A, run, lines("x"), Store().alone_writer(run)))
                for run in (busy, free)
            ]
            await settle()
            order.append("charge written")
        await asyncio.gather(*tasks)
        await writer.stop()
        return order

    assert asyncio.run(scenario()) == ["charge written", "group"]


def test_a_close_cut_short_by_the_runs_timeout_leaves_the_writes_for_the_next_close() -> None:
    """The run's timeout can fire while its last lines are being written: that cancelled the
    batcher's own task with the close, the orchestrator's second close (to write the timeout's
    line) raised CancelledError, and the run was never finished, left RUNNING."""

    async def scenario() -> list[list[str]]:
        sink = Sink()
        batcher = LogBatcher(sink.write)
        batcher.start()
        sink.open.clear()  # a slow database
        batcher.add("last line\n")
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await batcher.close()
        batcher.system("timed out")
        sink.open.set()
        await batcher.close()
        return sink.texts()

    assert asyncio.run(scenario()) == [["last line"], ["timed out"]]


@pytest.mark.parametrize(
    ("pieces", "kept", "cut"),
    [
        (["\n" * 1000], [""] * 5, True),
        (["a\nb\nc\nd\ne\nf\ng"], list("abcde"), True),
        ([f"{n}\n" for n in range(9)], [str(n) for n in range(5)], True),
        (["a\nb\nc\nd\ne"], list("abcde"), False),  # its last line ends with the log
        (["a\nb\nc\nd\ne\nf"], list("abcde"), True),  # one more, partial: cut
        (["a\nb\nc\nd\ne\n", "more\n", "and more"], list("abcde"), True),
    ],
)
def test_a_runs_log_keeps_at_most_its_lines_and_says_where_it_was_cut(
    pieces: list[str], kept: list[str], cut: bool
) -> None:
    """Every line of streamed text was kept, however many: a million newlines in one piece
    became a million lines to write."""

    async def scenario() -> list[tuple[str, str]]:
        sink = Sink()
        batcher = LogBatcher(sink.write, max_run_lines=5)
        batcher.start()
        for piece in pieces:
            batcher.add(piece)
        batcher.system("done")
        await batcher.close()
        return [(stream, text) for chunk in sink.chunks for _, stream, text in chunk]

    lines = asyncio.run(scenario())
    assert [text for stream, text in lines if stream == "stdout"] == kept
    ours = ["log cut after 5 lines: the rest is not kept"] if cut else []
    assert [text for stream, text in lines if stream == "system"] == [*ours, "done"]
