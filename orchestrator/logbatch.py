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
from datetime import UTC, datetime

Line = tuple[datetime, str, str]

#: A partial line (no newline yet) waits at most this long before it is written as a line.
PARTIAL_LINE_SECONDS = 1.0


class LogBatcher:
    def __init__(
        self,
        write: Callable[[list[Line]], Awaitable[None]],
        *,
        max_lines: int = 100,
    ) -> None:
        self._write = write
        self.max_lines = max_lines
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
        """Streamed text: complete lines are queued, the rest waits for its newline."""
        if not self._partial:
            self._partial_since = time.monotonic()
        self._partial += text
        if "\n" in self._partial:
            *complete, self._partial = self._partial.split("\n")
            now = datetime.now(UTC)
            self._pending.extend((now, stream, line) for line in complete)
            self._partial_since = time.monotonic()
            self._wake.set()

    def system(self, text: str) -> None:
        """A line of our own (routing, fallbacks, breakers) between the model's lines."""
        self._take_partial()
        self._pending.append((datetime.now(UTC), "system", text))
        self._wake.set()

    async def close(self) -> None:
        """Write everything still pending, partial line included, and stop."""
        self._take_partial()
        self._closed = True
        self._wake.set()
        if self._task is not None:
            await self._task

    def abandon(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def _take_partial(self) -> None:
        if self._partial:
            self._pending.append((datetime.now(UTC), "stdout", self._partial))
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
