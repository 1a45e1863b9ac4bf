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
    from adapters.eventlog import EventLog, LogBatch
    from projections.runner import BatchOutcome, ProjectionRunner

log = structlog.get_logger(__name__)

KEPT_READS = 8
"""Most batches read that the fan-out keeps for the projectors behind the one it read them for,
and at most :data:`KEPT_BATCHES_OF_BYTES` times ``max_batch_bytes`` of stored events in all."""
KEPT_BATCHES_OF_BYTES = 2
"""The kept reads' bound in bytes, in batches: eight kept batches of large log chunks were
eight times ``max_batch_bytes`` of stored state held, several times that decoded."""


@dataclass(eq=False)
class EmbeddedFanout:
    """Reads the log once per batch and hands each projector what it has not applied yet.

    The projectors apply a batch side by side, each in its own transaction on its own
    connection: one after another, a change reached its readers only after every projector
    ahead of it had committed (a run's log line waited for the board, the ledger and the
    activity feed), and the database's waits of one projector left the other core idle.

    Nor does a projector wait for the others to finish their batches: running, the fan-out hands
    the next batch to each projector as soon as it is done with its last. A round that waited for
    all of them let the slowest set every tenant's pace: one tenant's flood of large log chunks,
    or a rebuild's swap holding the run logs' lock, stopped every board.
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
    """Projector name → the position its next batch starts after. Written by the thread that
    runs the fan-out only, under :attr:`_positions_lock`, so :meth:`positions` on another thread
    copies it whole."""
    _positions_lock: threading.Lock = field(init=False, default_factory=threading.Lock, repr=False)
    _backlog: bool = field(init=False, default=False, repr=False)
    """The last batch read stopped at a bound: more may be applied at once."""
    _applying: dict[str, tuple[int, Future[BatchOutcome]]] = field(
        init=False, default_factory=dict, repr=False
    )
    """Projector name → the position its batch under way starts after, and that batch."""
    _reads: dict[int, LogBatch] = field(init=False, default_factory=dict, repr=False)
    """The last batches read, by the position they start after (see :meth:`_hand_out`)."""
    _resting: dict[str, float] = field(init=False, default_factory=dict, repr=False)
    """Projector name → when (``time.monotonic``) it may be tried again after a failed batch."""
    _stop: threading.Event = field(init=False, default_factory=threading.Event, repr=False)
    _wake: threading.Event = field(init=False, default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(init=False, default=None, repr=False)
    _wakeup: LogWakeup | None = field(init=False, default=None, repr=False)
    _appliers: ThreadPoolExecutor | None = field(init=False, default=None, repr=False)

    def positions(self) -> dict[str, int]:
        """Where each projector is, safe to call from any thread. A projector the fan-out has
        no position for yet is read from the database but not recorded: recorded here, after
        the fan-out had moved on, it sent the fan-out back to events it had applied."""
        with self._positions_lock:
            known = dict(self._positions)
        return {r.name: known[r.name] if r.name in known else r.position() for r in self.runners}

    def run_once(self) -> int:
        """Apply one batch to every projector that is behind; returns how many events were read.

        A projector that fails (the database went away) does not undo what the others applied:
        their positions are kept and the first failure is raised once all have finished."""
        read = self._hand_out()
        failed = self._take_in(wait=True)
        if failed:
            raise failed[0][1]
        return read

    def _hand_out(self, *, now: float | None = None) -> int:
        """Start a batch for every projector that is behind and has none under way; returns how
        many events the largest batch read held.

        Projectors at one position share one read of the log (they move in step while each keeps
        up), even when they come to it at different times: the last reads (:data:`KEPT_READS`,
        within :data:`KEPT_BATCHES_OF_BYTES`) are kept for the projectors behind (what the log
        reader passes is final: nothing will be added before its last position; an empty read
        is not kept). A kept read says nothing of what was appended after it: a projector
        handed one reads on afresh before the fan-out counts it caught up. One further behind (it
        was slow, or its last batch failed) is read for apart, so a projector that lags or keeps
        failing holds back none but itself. ``now``: one whose batch failed less than a poll
        interval before is left to rest."""
        reads = self._reads
        backlog: bool | None = None
        largest = 0
        for runner in self.runners:
            if runner.name in self._applying:
                continue
            if now is not None and self._resting.get(runner.name, now) > now:
                continue
            done = self._position(runner)
            earlier = reads.get(done)
            read = earlier or self._read(done)
            pending = read.envelopes
            # A kept read ends where the log's head was when it was read: events may have
            # been appended since, so only a fresh read not cut at a bound says there is none.
            backlog = read.cut or earlier is not None or bool(backlog)
            largest = max(largest, len(pending))
            if pending:
                reads[done] = read
                applying = self._executor().submit(runner.process, pending, read_after=done)
                self._applying[runner.name] = (done, applying)
                applying.add_done_callback(lambda _: self._wake.set())
        if backlog is not None:
            self._backlog = backlog
        # Kept while a projector behind may still come to them (it was read for one ahead),
        # the last few only: what a projector far behind needs, it reads for itself.
        lowest = min((self._positions.get(r.name, 0) for r in self.runners), default=0)
        for start in [start for start in reads if start < lowest]:
            del reads[start]
        room = KEPT_BATCHES_OF_BYTES * self.max_batch_bytes
        for kept, start in enumerate(sorted(reads, reverse=True)):
            room -= reads[start].size
            if kept >= KEPT_READS or room < 0:
                del reads[start]
        return largest

    def _step(self) -> None:
        """What the running fan-out does whenever the log or a batch moves: record the batches
        that ended, start the next ones. A projector whose batch failed rests a poll interval
        before it is tried again, alone: the others go on meanwhile."""
        now = time.monotonic()
        for name, error in self._take_in(wait=False):
            self._resting[name] = now + self.poll_interval
            if is_outage(error):
                # Logged once by whoever noticed it (adapters.outages); resumes from its
                # recorded position when the database is back.
                log.debug("fanout.database_unavailable", projector=name, error=str(error))
                with self._positions_lock:
                    self._positions.pop(name, None)
            else:
                log.error("fanout.batch_failed", projector=name, exc_info=error)
        self._hand_out(now=now)

    def _take_in(self, *, wait: bool) -> list[tuple[str, BaseException]]:
        """Record the batches that ended (``wait``: every batch under way, once it ends): the
        position of each that committed; returns the projectors whose batch failed, with why."""
        failed: list[tuple[str, BaseException]] = []
        for name, (done, applying) in list(self._applying.items()):
            if not (wait or applying.done()):
                continue
            error = applying.exception()
            del self._applying[name]
            if error is None:
                with self._positions_lock:
                    self._positions[name] = max(done, applying.result().position)
            else:
                failed.append((name, error))
        return failed

    def _read(self, after: int) -> LogBatch:
        return self.event_log.read_sized(after, self.batch_size, max_bytes=self.max_batch_bytes)

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
        self._take_in(wait=True)  # (what ended as it stopped: applied, or to be read again)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()  # (set again by the log's NOTIFY and by every batch that ends)
            try:
                self._step()
            except Exception as error:
                if is_outage(error):
                    # Logged once by whoever noticed it (adapters.outages); resumes from the
                    # projectors' recorded positions when the database is back.
                    log.debug("fanout.database_unavailable", error=str(error))
                    with self._positions_lock:
                        self._positions.clear()
                else:
                    log.exception("fanout.batch_failed")
                time.sleep(self.poll_interval)
            if self._backlog and self._free():
                continue  # more to read for a projector that is free to take it
            self._wake.wait(self.poll_interval)

    def _free(self) -> bool:
        """Whether a projector is free to take a batch now: none under way, not resting."""
        now = time.monotonic()
        return any(
            r.name not in self._applying and self._resting.get(r.name, now) <= now
            for r in self.runners
        )

    def _position(self, runner: ProjectionRunner) -> int:
        """The fan-out's own thread's view (it alone writes :attr:`_positions`)."""
        known = self._positions.get(runner.name)
        if known is None:
            known = runner.position()
            with self._positions_lock:
                self._positions[runner.name] = known
        return known
