"""Streamed text into log lines, written as chunks of at most ``max_lines`` lines or
``interval`` seconds, whichever comes first, so a subscriber sees output as it is produced
without one event per token."""

from __future__ import annotations

import asyncio
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
        interval: float = 0.2,
    ) -> None:
        self._write = write
        self.max_lines = max_lines
        self.interval = interval
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
            await self._wake.wait()
            self._wake.clear()
            if not self._closed and len(self._pending) < self.max_lines:
                # Give the chunk up to one interval to fill.
                await asyncio.sleep(self.interval)
            if (
                self._partial
                and not self._pending
                and time.monotonic() - self._partial_since >= PARTIAL_LINE_SECONDS
            ):
                self._take_partial()
            while self._pending:
                batch, self._pending = (
                    self._pending[: self.max_lines],
                    self._pending[self.max_lines :],
                )
                await self._write(batch)
                self.lines_written += len(batch)
            if self._closed:
                return
            if self._partial:
                self._wake.set()
                await asyncio.sleep(self.interval)
