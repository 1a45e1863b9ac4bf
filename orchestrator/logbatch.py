"""Streamed text into log lines, written as log chunks the way a database group-commits.

A complete line is written at once when no chunk write is under way; lines that complete while
one is under way wait for it and go together in the next chunk (at most ``max_lines`` a chunk).
So a subscriber sees a line one write after it was produced, not after a fixed batching window,
and the chunk rate adapts by itself: one line a chunk while writes are quick, many when they are
slow — never one event per token. A line without its newline yet is written as it is after
``PARTIAL_LINE_SECONDS``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from uuid import UUID

Line = tuple[datetime, str, str]

#: A partial line (no newline yet) waits at most this long before it is written as a line.
PARTIAL_LINE_SECONDS = 1.0

#: The most lines of the model's text one run's log keeps; past them one line of ours says the
#: log was cut. A model's 2,000 tokens can be 64,000 blank lines, and a provider's one piece
#: millions: each became a line of the run's log, written 100 at a time into the store every
#: workspace shares before the run could end.
MAX_RUN_LOG_LINES = 20_000


class LogBatcher:
    def __init__(
        self,
        write: Callable[[list[Line]], Awaitable[None]],
        *,
        max_lines: int = 100,
        max_run_lines: int = MAX_RUN_LOG_LINES,
    ) -> None:
        self._write = write
        self.max_lines = max_lines
        self.max_run_lines = max_run_lines
        self._taken = 0
        """Lines of streamed text taken so far (at most ``max_run_lines``)."""
        self._cut = False
        self._pending: list[Line] = []
        self._partial = ""
        self._partial_since = 0.0
        self._wake = asyncio.Event()
        self._closed = False
        self._task: asyncio.Task[None] | None = None
        self.lines_written = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    def add(self, text: str, stream: str = "stdout") -> None:
        """Streamed text: complete lines are queued, the rest waits for its newline; past
        ``max_run_lines`` of them, nothing more is."""
        if self._cut:
            return
        if not self._partial:
            self._partial_since = time.monotonic()
        self._partial += text
        if "\n" in self._partial:
            # Split no further than the lines kept: the rest is never made into lines.
            *complete, self._partial = self._partial.split("\n", self.max_run_lines - self._taken)
            now = datetime.now(UTC)
            self._pending.extend((now, stream, line) for line in complete)
            self._taken += len(complete)
            if self._taken >= self.max_run_lines and "\n" in self._partial:
                self._cut_here(now)
            self._partial_since = time.monotonic()
            self._wake.set()

    def _cut_here(self, now: datetime) -> None:
        self._partial, self._cut = "", True
        self._pending.append(
            (now, "system", f"log cut after {self.max_run_lines} lines: the rest is not kept")
        )

    def system(self, text: str) -> None:
        """A line of our own (routing, fallbacks, breakers) between the model's lines."""
        self._take_partial()
        self._pending.append((datetime.now(UTC), "system", text))
        self._wake.set()

    async def close(self) -> None:
        """Write everything still pending, partial line included, and stop.

        A close cut short (the run's timeout fired during its last writes) leaves the writes
        going, shielded, for the next close to wait for: cancelled with it, the writer task
        made that next close raise ``CancelledError`` and the run was never finished."""
        self._take_partial()
        self._closed = True
        self._wake.set()
        while self._task is not None:
            await asyncio.shield(self._task)
            if not self._pending:
                return
            # Lines added after the writer had finished (between two closes) get one of their own.
            self._wake.set()
            self._task = asyncio.create_task(self._run())

    def abandon(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def _take_partial(self) -> None:
        if not self._partial:
            return
        if self._taken >= self.max_run_lines:
            self._cut_here(datetime.now(UTC))
            return
        self._pending.append((datetime.now(UTC), "stdout", self._partial))
        self._taken += 1
        self._partial = ""

    async def _run(self) -> None:
        while True:
            due: float | None = None
            if self._partial and not self._pending and not self._closed:
                due = max(0.0, PARTIAL_LINE_SECONDS - (time.monotonic() - self._partial_since))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), due)
            self._wake.clear()
            if (
                self._partial
                and not self._pending
                and time.monotonic() - self._partial_since >= PARTIAL_LINE_SECONDS
            ):
                self._take_partial()
            # What completed while a chunk was being written goes in the very next one.
            while self._pending:
                batch, self._pending = (
                    self._pending[: self.max_lines],
                    self._pending[self.max_lines :],
                )
                await self._write(batch)
                self.lines_written += len(batch)
            if self._closed:
                return


@dataclass
class _Chunk:
    workspace_id: UUID
    run_id: UUID
    lines: list[Line]
    alone: Callable[[], Awaitable[None]]
    done: asyncio.Future[None]


#: Chunks in one group write at the most (each run has at most one chunk waiting).
GROUP_MAX_CHUNKS = 50


class RunLogWriter:
    """Every run's log chunks of one orchestrator, written together: a group commit across runs.

    Each run's batcher hands its chunk over and waits for it (so a run's chunks stay in order);
    whatever chunks are waiting when the writer is free go out as one command per workspace —
    one transaction for all of that workspace's runs instead of one per chunk. A group that is
    refused (one of its runs was taken over, cancelled or ended, or it kept losing races to the
    runs' other writes) is written again chunk by chunk through each chunk's ``alone`` writer, so
    every run learns its own outcome. A group whose outcome the store could not tell
    (``Unavailable``) is not written again: the error goes to every run in it, as a single
    chunk's would.
    """

    def __init__(
        self,
        write_group: Callable[[UUID, list[tuple[UUID, list[Line]]]], Awaitable[None]],
        *,
        retry_alone: Callable[[BaseException], bool],
        run_lock: Callable[[UUID], asyncio.Lock],
    ) -> None:
        self._write_group = write_group
        self._retry_alone = retry_alone
        self._run_lock = run_lock
        self._waiting: list[_Chunk] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.groups_written = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="run-log-writer")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for chunk in self._waiting:
            chunk.done.cancel()
        self._waiting.clear()

    async def write(
        self,
        workspace_id: UUID,
        run_id: UUID,
        lines: list[Line],
        alone: Callable[[], Awaitable[None]],
    ) -> None:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append(_Chunk(workspace_id, run_id, lines, alone, done))
        self._wake.set()
        await done

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._waiting:
                taken, self._waiting = self._waiting, []
                groups: dict[UUID, list[_Chunk]] = {}
                for chunk in taken:
                    if not chunk.done.cancelled():
                        groups.setdefault(chunk.workspace_id, []).append(chunk)
                writes = [
                    self._write(chunks[at : at + GROUP_MAX_CHUNKS])
                    for chunks in groups.values()
                    for at in range(0, len(chunks), GROUP_MAX_CHUNKS)
                ]
                await asyncio.gather(*writes)

    async def _write(self, chunks: list[_Chunk]) -> None:
        if len(chunks) == 1:
            await self._settle(chunks[0], chunks[0].alone())
            return
        # The runs' other writes (attempts, output, heartbeats) take the same locks, so a group
        # never loses a race to them; the locks are taken in one order, so never in a cycle.
        async with contextlib.AsyncExitStack() as locks:
            for chunk in sorted(chunks, key=lambda chunk: chunk.run_id):
                await locks.enter_async_context(self._run_lock(chunk.run_id))
            try:
                await self._write_group(
                    chunks[0].workspace_id, [(chunk.run_id, chunk.lines) for chunk in chunks]
                )
            except asyncio.CancelledError:
                raise
            except Exception as caught:  # noqa: BLE001 - handed on to the runs, not swallowed
                error: Exception | None = caught
            else:
                error = None
        if error is not None:
            if not self._retry_alone(error):
                for chunk in chunks:
                    if not chunk.done.done():
                        chunk.done.set_exception(error)
                return
            await asyncio.gather(*(self._settle(chunk, chunk.alone()) for chunk in chunks))
            return
        self.groups_written += 1
        for chunk in chunks:
            if not chunk.done.done():
                chunk.done.set_result(None)

    async def _settle(self, chunk: _Chunk, write: Awaitable[None]) -> None:
        try:
            await write
        except asyncio.CancelledError:
            if not chunk.done.done():
                chunk.done.cancel()
            raise
        except Exception as error:  # noqa: BLE001 - handed on to the run that waits for it
            if not chunk.done.done():
                chunk.done.set_exception(error)
        else:
            if not chunk.done.done():
                chunk.done.set_result(None)
