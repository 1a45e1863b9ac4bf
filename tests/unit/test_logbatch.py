"""The run-log batcher: lines are written one chunk write after they complete, lines that
complete during a write share the next chunk, nothing is lost, duplicated or reordered."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestrator import logbatch
from orchestrator.logbatch import Line, LogBatcher


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
