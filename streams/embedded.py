"""Embedded fan-out: projectors fed straight from the event log, in-process, without Kafka.

It wakes on the store's NOTIFY and also polls, because a notification can be missed (a dropped
listener connection) and because the reader's horizon may hold an event back until an older
transaction ends, which sends no notification of its own.

An event a projector cannot apply parks its aggregate in the runner, so the loop below only ever
retries failures of the database, never one bad event forever.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import KW_ONLY, dataclass, field
from typing import TYPE_CHECKING

import structlog

from adapters.eventlog import MAX_BATCH_BYTES
from adapters.outages import is_outage
from adapters.wakeup import LogWakeup

if TYPE_CHECKING:
    from adapters.eventlog import EventLog
    from domain.envelope import EventEnvelope
    from projections.runner import BatchOutcome, ProjectionRunner

log = structlog.get_logger(__name__)


@dataclass(eq=False)
class EmbeddedFanout:
    """Reads the log once per batch and hands each projector what it has not applied yet.

    The projectors apply a batch side by side, each in its own transaction on its own
    connection: one after another, a change reached its readers only after every projector
    ahead of it had committed (a run's log line waited for the board, the ledger and the
    activity feed), and the database's waits of one projector left the other core idle.
    """

    event_log: EventLog
    runners: list[ProjectionRunner]
    _: KW_ONLY
    listen_url: str | None = field(default=None, repr=False)  # may carry a password
    poll_interval: float = 0.5
    batch_size: int = 500
    max_batch_bytes: int = MAX_BATCH_BYTES
    """Most bytes of stored events one batch holds, beside ``batch_size`` events."""
    _positions: dict[str, int] = field(init=False, default_factory=dict, repr=False)
    _failing: set[str] = field(init=False, default_factory=set, repr=False)
    _backlog: bool = field(init=False, default=False, repr=False)
    """The last batch read stopped at a bound: more may be applied at once."""
    """Projectors whose last batch failed: fed apart, from their own positions."""
    _stop: threading.Event = field(init=False, default_factory=threading.Event, repr=False)
    _wake: threading.Event = field(init=False, default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(init=False, default=None, repr=False)
    _wakeup: LogWakeup | None = field(init=False, default=None, repr=False)
    _appliers: ThreadPoolExecutor | None = field(init=False, default=None, repr=False)

    def positions(self) -> dict[str, int]:
        return {r.name: self._position(r) for r in self.runners}

    def run_once(self) -> int:
        """Apply one batch to every projector that is behind; returns how many events were read.

        A projector that fails (the database went away) does not undo what the others applied:
        their positions are kept and the first failure is raised once all have finished. One
        whose last batch failed is fed apart, from its own position: the shared read starts at
        the others', so a projector that keeps failing holds back none but itself."""
        sharing = [r for r in self.runners if r.name not in self._failing] or self.runners
        start = min((self._position(r) for r in sharing), default=0)
        envelopes, self._backlog = self._read(start)
        work: list[tuple[ProjectionRunner, int, list[EventEnvelope]]] = []
        for runner in self.runners:
            done = self._position(runner)
            read = envelopes
            if done < start:
                read, more = self._read(done)
                self._backlog |= more
            pending = [env for env in read if env.position > done]
            if pending:
                work.append((runner, done, pending))
        if len(work) == 1:
            runner, done, pending = work[0]
            try:
                outcome = runner.process(pending, read_after=done)
            except BaseException:
                self._failing.add(runner.name)
                raise
            self._failing.discard(runner.name)
            self._positions[runner.name] = max(done, outcome.position)
            return len(envelopes)
        applying: list[tuple[ProjectionRunner, int, Future[BatchOutcome]]] = [
            (runner, done, self._executor().submit(runner.process, pending, read_after=done))
            for runner, done, pending in work
        ]
        failure: BaseException | None = None
        for runner, done, future in applying:
            error = future.exception()
            if error is None:
                self._failing.discard(runner.name)
                self._positions[runner.name] = max(done, future.result().position)
                continue
            self._failing.add(runner.name)
            if failure is None:
                failure = error
        if failure is not None:
            raise failure
        return len(envelopes)

    def _read(self, after: int) -> tuple[list[EventEnvelope], bool]:
        return self.event_log.read_batch(after, self.batch_size, max_bytes=self.max_batch_bytes)

    def _executor(self) -> ThreadPoolExecutor:
        if self._appliers is None:
            self._appliers = ThreadPoolExecutor(
                max_workers=max(1, len(self.runners)), thread_name_prefix="embedded-projector"
            )
        return self._appliers

    def drain(self) -> int:
        """Apply everything the log holds now; returns how many events were read."""
        total = 0
        while True:
            total += self.run_once()
            if not self._backlog:
                return total

    def start(self) -> None:
        self._stop.clear()
        self._wakeup = LogWakeup(self.listen_url, self._wake) if self.listen_url else None
        if self._wakeup is not None:
            self._wakeup.start()
        self._thread = threading.Thread(target=self._loop, name="embedded-fanout", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._wakeup is not None:
            self._wakeup.stop()
            self._wakeup = None
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self._appliers is not None:
            self._appliers.shutdown(wait=True)
            self._appliers = None

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.drain()
            except Exception as error:
                if is_outage(error):
                    # Logged once by whoever noticed it (adapters.outages); resumes from the
                    # projectors' recorded positions when the database is back.
                    log.debug("fanout.database_unavailable", error=str(error))
                    self._positions.clear()
                else:
                    log.exception("fanout.batch_failed")
                time.sleep(self.poll_interval)
            self._wake.wait(self.poll_interval)
            self._wake.clear()

    def _position(self, runner: ProjectionRunner) -> int:
        if runner.name not in self._positions:
            self._positions[runner.name] = runner.position()
        return self._positions[runner.name]
