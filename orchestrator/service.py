"""The orchestrator loop: follow the log, claim runs, execute them, recover orphans.

Claiming is the ``Started`` event itself: ``BeginRun`` saves the run at the version it was
QUEUED at, so of two orchestrators that saw the same request only one start is stored; the
other's command is refused and it moves on. A run whose worker died is noticed by its events
stopping (heartbeats, log chunks, attempts); another orchestrator takes it over with a
``Reclaimed`` event saved at the version it judged stale, so a live worker's next heartbeat (or a
second rescuer) makes that takeover conflict. Every later write names the worker, and a worker
whose run was taken over is refused and stops; only the call it had under way is still recorded
and charged (the provider bills it, and only that worker knows it happened), after which it
stops too.

Calls are charged once: each call is named before it is made, its charge id derives from (run,
call id) and the run aggregate answers a call id it has recorded as it did the first time,
writing nothing, so neither a restarted orchestrator nor two workers of a run taken over can
bill a call twice, and a record whose commit's answer was lost is sent again. A call's start is
recorded before it is made (``CallStarted``): a worker that dies during the call leaves it for
whoever takes the run over, who charges it for its prompt in the takeover's own save. A run
that ended with such a call open (cancelled while its worker was dead) is nobody's to take
over: the same sweep charges its open calls once their worker is judged dead the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import TYPE_CHECKING, TypeVar
from uuid import UUID, uuid4

import structlog

from adapters import metrics
from adapters.eventlog import MAX_BATCH_BYTES
from adapters.outages import is_outage
from adapters.providers.base import (
    Accepted,
    ChatRequest,
    PermanentProviderError,
    Piece,
    Provider,
    StreamBroken,
    TransientProviderError,
    Usage,
)
from adapters.tokenizer import count_message_tokens, count_tokens_upto
from adapters.wakeup import LogWakeup
from commands import models as m
from commands.handlers import Actor, CommandResult
from commands.service import WriteModelSpend
from domain.agents import EARLIER_RUNS, EarlierRun, agent_named, build_prompt
from domain.budget_holds import Hold, HoldRequest
from domain.errors import AgentWorksError, Conflict, InvalidTransition, NotFound, Unavailable
from domain.money import billed_amount, format_usd
from domain.months import month_of
from domain.pricing import call_cost_micros
from domain.routing import (
    Breakers,
    LatencyTracker,
    ModelOption,
    RouteRequest,
    backoff_seconds,
    route,
)
from domain.usage import charge_id_for
from orchestrator.holds import BudgetHolds, LocalHolds
from orchestrator.logbatch import Line, LogBatcher, RunLogWriter

if TYPE_CHECKING:
    from adapters.eventlog import EventLog
    from commands.handlers import AgentWorks
    from domain.envelope import EventEnvelope

log = structlog.get_logger(__name__)
T = TypeVar("T")

_TERMINAL = {"Succeeded", "Failed", "Cancelled", "TimedOut"}

#: Times a write lost to concurrent writers is retried before the run fails.
WRITE_RACES = 30

#: Text longer than this is token-counted in a worker thread, not on the event loop.
_COUNT_ON_LOOP_CHARS = 16 * 1024

#: The shortest wait between two looks at circuits that let none of a run's calls through.
_CIRCUIT_RECHECK = 0.01

#: How long a run whose claim failed (the store unavailable) waits before it is queued again.
CLAIM_RETRY_SECONDS = 1.0


@dataclass(frozen=True, kw_only=True)
class OrchestratorConfig:
    worker_id: str = field(
        default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}:{uuid4().hex[:6]}"
    )
    concurrency: int = 20
    run_timeout: float = 300.0
    heartbeat_interval: float = 5.0
    stale_after: float = 30.0
    max_reclaims: int = 2
    max_attempts: int = 4
    poll_interval: float = 0.1
    log_max_lines: int = 100
    backoff_base: float = 0.2
    backoff_cap: float = 10.0
    breaker_threshold: int = 3
    breaker_cooldown: float = 30.0


@dataclass
class RunView:
    """What the log has told us about a run."""

    run_id: UUID
    workspace_id: UUID
    card_id: UUID
    agent: str
    provider: str | None
    model: str | None
    policy: str
    status: str = "QUEUED"
    version: int = 1
    last_event_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    """When the run's worker last wrote (a cancel is not a sign of its life)."""
    worker: str | None = None
    started_at: datetime | None = None
    """When the run was started (its ``Started`` event): its timeout counts from then, whoever
    runs it now."""
    reclaims: int = 0
    attempts: int = 0
    """The provider calls recorded on the run (its last attempt's number), by whichever worker."""
    open_calls: set[str] = field(default_factory=set)
    """The calls its workers started and never recorded: an ended run's are charged once its
    worker is presumed dead (see :meth:`Orchestrator._charge_ended`)."""


class RunFailed(Exception):
    """The run ends FAILED with this message."""


class _Unaffordable(RunFailed):
    """The budget left cannot pay for this model's prompt alone (a cheaper one's it may)."""


class _Lost(Exception):
    """Another worker owns the run now; stop without writing."""


@dataclass
class _Charged:
    """What became of a call's charge, which decides what becomes of its budget hold."""

    billed: int = 0
    """Billed micro-USD of the charge written (0: none, or none yet)."""
    unsure: bool = False
    """A charge was sent and its write may have committed (the store did not say)."""


@dataclass(frozen=True)
class _Call:
    """One provider call under way: what its charge and its budget checks need."""

    view: RunView
    option: ModelOption
    input_tokens: int
    started_at: datetime
    billed: Callable[[int, int], int]
    """What the call bills for a prompt and an output of so many tokens."""
    room: int | None
    call_id: str
    """The call's own id, its charge's key (and so its budget hold's name): one per call, so
    that a call is charged once, whoever records it."""
    deadline: float
    """When (monotonic) the run's timeout ends it."""
    max_tokens: int
    """The output the call asked for at most: a provider stops there, and no more is charged."""
    limiting: str = ""
    """The budget that leaves ``room``, as a stop's error names it."""
    charged: _Charged = field(default_factory=_Charged)


@dataclass
class _Outcome:
    ok: bool
    text: str = ""
    retry_after: float | None = None
    error: str = ""
    permanent: bool = False
    provider_wide: bool = False
    """A refusal of the provider's (its key), not of the model: no model of it will answer."""


class _LoopWake:
    """Sets an event of the orchestrator's loop from the listener's thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop, event: asyncio.Event) -> None:
        self._loop = loop
        self._event = event

    def set(self) -> None:
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits any more
            self._loop.call_soon_threadsafe(self._event.set)


class Orchestrator:
    def __init__(
        self,
        app: AgentWorks,
        event_log: EventLog,
        providers: Mapping[str, Provider],
        config: OrchestratorConfig | None = None,
        holds: BudgetHolds | None = None,
        listen_url: str | None = None,
    ) -> None:
        """``listen_url``: the store's database, to wake on its NOTIFY when events are appended
        rather than only at the next poll (a run was picked up 50 ms late on average)."""
        self.app = app
        self.log = event_log
        self.listen_url = listen_url
        self.providers = dict(providers)
        self.config = config or OrchestratorConfig()
        self.worker = self.config.worker_id
        self.views: dict[UUID, RunView] = {}
        #: Per card, its latest runs that recorded an output, as many as a prompt shows and
        #: one more (a run taken over may find its own there): their ids only, for every card
        #: the log has run, so their outputs are read from the store when a prompt is built.
        self.outputs: dict[UUID, deque[UUID]] = {}
        #: Runs waiting for a slot, per workspace in the order requested; the workspaces in
        #: the order they are served next among equals (see :meth:`_schedule`).
        self.queues: dict[UUID, deque[UUID]] = {}
        self.tasks: dict[UUID, asyncio.Task[None]] = {}
        #: Tasks under way per workspace (runs claimed or taken over).
        self._running: Counter[UUID] = Counter()
        self._idle: set[UUID] = set()
        """Runs under way here that are waiting (a backoff, a provider's retry-after, a
        circuit's trial): they hold no slot meanwhile (see :meth:`_idle_for`)."""
        self._resuming: deque[tuple[UUID, asyncio.Future[None]]] = deque()
        """Runs done waiting, for a slot to come free, in turn: served before any new claim."""
        self.cancelled: set[UUID] = set()
        #: Runs this worker was told it lost to a takeover, their tasks cancelled.
        self.taken_over: set[UUID] = set()
        self.position = 0
        self.caught_up = False
        self.max_batch_bytes = MAX_BATCH_BYTES
        """Most bytes of stored events one read of the log holds, beside its 1,000 events."""
        self.latency = LatencyTracker()
        self.breakers = Breakers(
            threshold=self.config.breaker_threshold,
            cooldown_seconds=self.config.breaker_cooldown,
        )
        # Also where holds go while a shared store cannot be reached: this process's own runs
        # still hold against each other, and the next call tries the shared store again.
        self._local_holds = LocalHolds()
        self._written = WriteModelSpend(app)
        self._shared_holds_reachable = True
        """Whether the last hold asked of the shared store got an answer (see :meth:`_hold`)."""
        self.holds: BudgetHolds = holds if holds is not None else self._local_holds
        self._last_write: dict[UUID, float] = {}
        self._executing: dict[UUID, float] = {}
        """Runs under way here: when (monotonic) this worker began executing each."""
        self._answered: dict[UUID, str] = {}
        """Runs under way here whose answer came: its text, kept from before its record is sent
        (see :meth:`_execute`)."""
        self._charging: dict[UUID, asyncio.Lock] = {}
        # A refused group is written chunk by chunk, each with its run's own outcome; a group
        # the store may have written (UNAVAILABLE) is not written twice.
        self._run_locks: dict[UUID, asyncio.Lock] = {}
        self._log_writer = RunLogWriter(
            self._write_log_group,
            retry_alone=lambda error: not isinstance(error, Unavailable),
            run_lock=self._run_lock,
        )
        self._executor = ThreadPoolExecutor(
            max_workers=min(64, self.config.concurrency + 4), thread_name_prefix="orchestrator"
        )
        self._stop = asyncio.Event()
        self._woken = asyncio.Event()

    # -- the loop ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Follow the log and execute runs until :meth:`stop`; runs in flight are abandoned at
        stop (another orchestrator takes them over once their heartbeats stop)."""
        last_stale_check = 0.0
        self._log_writer.start()
        wakeup = (
            LogWakeup(self.listen_url, _LoopWake(asyncio.get_running_loop(), self._woken))
            if self.listen_url
            else None
        )
        if wakeup is not None:
            wakeup.start()
        try:
            while not self._stop.is_set():
                # Cleared before reading: an append during the read wakes the next wait at once.
                self._woken.clear()
                try:
                    more = await self._tail()
                except Exception as error:
                    if is_outage(error):
                        # Said once by the pool that saw the database go (adapters.outages),
                        # not with a traceback at every read while it stays away.
                        log.debug("orchestrator.database_unavailable", error=str(error))
                    else:
                        log.exception("orchestrator.tail_failed")
                    more = False
                    await asyncio.sleep(1.0)
                if self.caught_up:
                    self._schedule()
                    if time.monotonic() - last_stale_check >= min(1.0, self.config.stale_after):
                        last_stale_check = time.monotonic()
                        await self._recover_stale()
                        await self._charge_ended()
                if not more:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._woken.wait(), self.config.poll_interval)
        finally:
            if wakeup is not None:
                await asyncio.to_thread(wakeup.stop)
            for task in list(self.tasks.values()):
                task.cancel()
            await asyncio.gather(*self.tasks.values(), return_exceptions=True)
            await self._log_writer.stop()
            await asyncio.gather(
                *(p.aclose() for p in self.providers.values()),
                self.holds.aclose(),
                return_exceptions=True,
            )
            self._executor.shutdown(wait=True)

    def stop(self) -> None:
        self._stop.set()
        self._woken.set()

    async def _call(self, fn: Callable[..., T], *args: object) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, partial(fn, *args))

    async def _tail(self) -> bool:
        """Fold the next batch of the log's run events; whether more may be read at once (the
        batch stopped at its count or its bytes: every event's state is read, and an agent's
        output or log chunk may be large)."""
        envelopes, upto, _, more = await self._call(
            partial(self.log.read_following, max_bytes=self.max_batch_bytes),
            self.position, 1000, frozenset({"AgentRun"}),
        )  # fmt: skip
        for env in envelopes:
            self._fold(env)
        self.position = max(self.position, upto)
        if not more:
            self.caught_up = True
        return more

    def _fold(self, env: EventEnvelope) -> None:
        if env.undecodable:
            # Its payload is lost to today's code (no card, no worker, no time): folded, it
            # raised, and the whole batch was read again and again, every other run with it.
            log.warning(
                "orchestrator.undecodable_event", run_id=str(env.originator_id),
                version=env.originator_version, type=env.type, error=env.undecodable,
            )  # fmt: skip
            return
        kind = env.type.split(".", 1)[1]
        p = env.payload
        run_id = env.originator_id
        if kind == "Requested":
            requested = RunView(
                run_id=run_id,
                workspace_id=UUID(str(env.workspace_id)),
                card_id=UUID(str(p["card_id"])),
                agent=str(p["agent"]),
                provider=p.get("provider"),
                model=p.get("model"),
                policy=str(p.get("policy") or "cheapest"),
            )
            self.views[run_id] = requested
            self._enqueue(requested)
        view = self.views.get(run_id)
        if view is None:
            return
        view.version = env.originator_version
        if kind != "Cancelled":
            view.last_event_at = env.timestamp
        if kind == "CallStarted":
            view.open_calls.add(str(p["call_id"]))
        elif kind in ("AttemptRecorded", "LlmCallCompleted"):
            view.open_calls.discard(str(p.get("call_id")))
            if kind == "AttemptRecorded":
                view.attempts = max(view.attempts, int(p["attempt"]))
        elif kind == "Started":
            view.status, view.worker = "RUNNING", str(p["worker"])
            view.started_at = env.timestamp
        elif kind == "Reclaimed":
            view.worker = str(p["worker"])
            view.reclaims += 1
        elif kind == "OutputRecorded":
            latest = self.outputs.setdefault(view.card_id, deque(maxlen=EARLIER_RUNS + 1))
            if run_id in latest:
                latest.remove(run_id)
            latest.append(run_id)
        elif kind in _TERMINAL:
            view.status = kind
            task = self.tasks.get(run_id)
            if task is not None and kind == "Cancelled":
                self.cancelled.add(run_id)
                task.cancel()
        # Finished runs need no watching, but for the calls they left open; keep what later
        # prompts and takeovers need.
        if view.status in _TERMINAL and not view.open_calls and run_id not in self.tasks:
            self.views.pop(run_id, None)

    def _enqueue(self, view: RunView) -> None:
        self.queues.setdefault(view.workspace_id, deque()).append(view.run_id)

    def _busy(self) -> int:
        """Slots taken: runs under way here but those waiting."""
        return len(self.tasks) - len(self._idle)

    def _schedule(self) -> None:
        """Give free slots to runs done waiting, then claim queued runs: next, the oldest run of
        the workspace with the fewest runs under way here, workspaces taking turns among equals.
        First come, first served, one workspace's backlog (thousands of runs, within its rate
        limits) held every slot until all of it had run, and every other tenant's runs waited
        behind it. A run whose circuits bar every call it could make stays queued, its timeout
        not begun, and the runs behind it go first."""
        while self._resuming and self._busy() < self.config.concurrency:
            run_id, granted = self._resuming.popleft()
            if not granted.done():
                self._idle.discard(run_id)
                granted.set_result(None)
        barred: dict[UUID, list[UUID]] = {}
        judged: dict[tuple[str | None, UUID], bool] = {}
        now = time.monotonic()
        while self.queues and not self._resuming and self._busy() < self.config.concurrency:
            workspace_id = min(self.queues, key=self._running.__getitem__)
            waiting = self.queues.pop(workspace_id)
            run_id = waiting.popleft()
            if waiting:
                self.queues[workspace_id] = waiting  # behind the others, its turn taken
            view = self.views.get(run_id)
            if view is None or view.status != "QUEUED":
                continue
            judgement = (view.provider, workspace_id)
            if judgement not in judged:
                judged[judgement] = self._barred(view, now)
            if judged[judgement]:
                barred.setdefault(workspace_id, []).append(run_id)
                continue
            self._spawn(view, claim=True)
        for workspace_id, run_ids in barred.items():
            # Back where they were, ahead of their workspace's later runs.
            self.queues.setdefault(workspace_id, deque()).extendleft(reversed(run_ids))

    def _barred(self, view: RunView, now: float) -> bool:
        """Whether circuits bar every call of ``view`` now: its pinned provider's, or those of
        every provider here (an unpinned run's candidates are among them)."""
        providers = [view.provider] if view.provider is not None else list(self.providers)
        workspace = str(view.workspace_id)
        return bool(providers) and all(self.breakers.wait(p, workspace, now) for p in providers)

    async def _idle_for(self, run_id: UUID, seconds: float) -> None:
        """Wait ``seconds`` without a slot (see :meth:`_slot_lent`)."""
        async with self._slot_lent(run_id):
            await asyncio.sleep(seconds)

    @contextlib.asynccontextmanager
    async def _slot_lent(self, run_id: UUID) -> AsyncIterator[None]:
        """While the block runs, ``run_id``'s task holds no slot; when it ends, the run takes
        one back, before any run not yet claimed. A run sleeping out a provider's rate limit or
        outage held its slot: every other run (another provider's, another tenant's) queued
        behind runs that did nothing. A block that raises ends the run: no slot is taken."""
        self._idle.add(run_id)
        if self.queues:
            self._woken.set()  # the loop claims a queued run into the slot now free
        try:
            yield
            if self._resuming or self._busy() >= self.config.concurrency:
                granted = asyncio.get_running_loop().create_future()
                self._resuming.append((run_id, granted))
                await granted
        finally:
            self._idle.discard(run_id)

    def _spawn(self, view: RunView, *, claim: bool) -> None:
        task = asyncio.create_task(self._own(view, claim=claim), name=f"run-{view.run_id}")
        self.tasks[view.run_id] = task
        self._running[view.workspace_id] += 1
        run_id, workspace_id = view.run_id, view.workspace_id
        task.add_done_callback(lambda _task: self._done(run_id, workspace_id))

    def _done(self, run_id: UUID, workspace_id: UUID) -> None:
        self.tasks.pop(run_id, None)
        if self._resuming:
            self._woken.set()  # its slot is free: a run done waiting is given it at once
        self._running[workspace_id] -= 1
        if self._running[workspace_id] <= 0:
            del self._running[workspace_id]
        self._run_locks.pop(run_id, None)
        self.cancelled.discard(run_id)
        self.taken_over.discard(run_id)
        self._last_write.pop(run_id, None)
        view = self.views.get(run_id)
        if view is not None and view.status in _TERMINAL and not view.open_calls:
            self.views.pop(run_id, None)

    async def _recover_stale(self) -> None:
        """Take over RUNNING runs whose worker has written nothing for ``stale_after``."""
        horizon = datetime.now(UTC) - timedelta(seconds=self.config.stale_after)
        for view in list(self.views.values()):
            if self._busy() >= self.config.concurrency:
                return
            if view.status != "RUNNING" or view.run_id in self.tasks:
                continue
            if view.last_event_at > horizon:
                continue
            self._spawn(view, claim=False)

    async def _charge_ended(self) -> None:
        """Charge the calls an ended run's worker started and never recorded, once that worker
        has written nothing for ``stale_after``: the judgement a takeover makes of a running
        run, which nobody takes over once it has ended (a user cancelled it while its worker
        was dead, say), so that the provider's bill for the call is charged all the same. Saved
        at the version judged, as a takeover is: the worker's own record meanwhile makes this
        conflict (it charged the call), and one after it is answered with this charge."""
        horizon = datetime.now(UTC) - timedelta(seconds=self.config.stale_after)
        for view in list(self.views.values()):
            if view.status not in _TERMINAL or not view.open_calls or view.run_id in self.tasks:
                continue
            if view.last_event_at > horizon:
                continue
            cmd = m.ChargeOrphanedCalls(run_id=view.run_id, expected_version=view.version)
            try:
                charged = await self._call(self.app.charge_orphaned_calls, cmd, self._actor(view))
            except Conflict:
                continue  # written meanwhile: the log says what, and it is judged again
            except Unavailable:
                log.warning("orchestrator.orphans_not_charged", run_id=str(view.run_id),
                            exc_info=True)  # fmt: skip
                continue
            except AgentWorksError:  # the run's state refuses it, and will again
                log.exception("orchestrator.orphans_refused", run_id=str(view.run_id))
                self.views.pop(view.run_id, None)
                continue
            except Exception:  # the loop goes on; judged again at the next sweep
                log.exception("orchestrator.orphans_charge_failed", run_id=str(view.run_id))
                continue
            self.views.pop(view.run_id, None)  # its calls are all recorded now
            log.info(
                "orchestrator.orphans_charged", run_id=str(view.run_id), status=view.status,
                worker=view.worker, charged_calls=charged.extra.get("charged_calls", []),
            )  # fmt: skip

    # -- one run -------------------------------------------------------------------------------

    def _actor(self, view: RunView) -> Actor:
        return Actor.service("orchestrator", view.workspace_id)

    async def _own(self, view: RunView, *, claim: bool) -> None:
        actor = self._actor(view)
        try:
            if claim:
                await self._call(
                    self.app.begin_run, m.BeginRun(run_id=view.run_id, worker=self.worker), actor
                )
            else:
                reclaimed = await self._call(
                    self.app.reclaim_run,
                    m.ReclaimRun(
                        run_id=view.run_id, worker=self.worker, expected_version=view.version
                    ),
                    actor,
                )
                orphans = list(reclaimed.extra.get("charged_calls", []))
                log.info(
                    "orchestrator.reclaimed", run_id=str(view.run_id), previous=view.worker,
                    charged_calls=orphans,
                )  # fmt: skip
        except (Conflict, InvalidTransition, NotFound):
            return  # another orchestrator was first, or the run ended meanwhile
        except Exception:
            log.exception("orchestrator.claim_failed", run_id=str(view.run_id))
            if claim:
                # Off the queue, a QUEUED run would wait for the next orchestrator to start.
                # Claimed after all, it is RUNNING and taken over once stale; if not, it is
                # claimed again here.
                await asyncio.sleep(CLAIM_RETRY_SECONDS)
                self._enqueue(view)
            return
        self._last_write[view.run_id] = time.monotonic()
        if not claim and view.reclaims + 1 > self.config.max_reclaims:
            await self._finish(
                view,
                "FAILED",
                error=f"run abandoned: its worker stopped {view.reclaims + 1} times "
                f"(stale heartbeat; at most {self.config.max_reclaims} takeovers)",
            )
            return
        await self._execute(view, reclaimed=not claim, orphans=0 if claim else len(orphans))

    async def _execute(self, view: RunView, *, reclaimed: bool, orphans: int = 0) -> None:
        """``orphans``: how many calls the previous worker left under way, charged by the
        takeover (a line of the log says so)."""
        batcher = LogBatcher(
            partial(self._write_lines, view),
            max_lines=self.config.log_max_lines,
        )
        batcher.start()
        heartbeat = asyncio.create_task(self._heartbeats(view))
        started = time.monotonic()
        if reclaimed and view.started_at is not None:
            # Its clock began at its start, not at this takeover: begun afresh, a run changing
            # hands ran, and was charged, up to a whole timeout more each time.
            started -= max(0.0, (datetime.now(UTC) - view.started_at).total_seconds())
        self._executing[view.run_id] = started
        metrics.AGENT_RUNS_IN_FLIGHT.inc()
        output: str | None = None
        try:
            if reclaimed:
                batcher.system(f"taken over by {self.worker} (the previous worker went silent)")
                if orphans:
                    batcher.system(
                        f"charged {orphans} call(s) the previous worker had under way for "
                        "their prompt (estimated): it never recorded them"
                    )
            async with asyncio.timeout(started + self.config.run_timeout - time.monotonic()):
                output = await self._work(
                    view, batcher, deadline=started + self.config.run_timeout,
                    made=view.attempts + orphans,
                )  # fmt: skip
                await batcher.close()
            await self._finish(view, "SUCCEEDED", output=output)
        except TimeoutError:
            answer = self._answered.get(view.run_id)
            if answer is not None:
                # Its answer came, and its record (the charge) was written, before the deadline
                # ended the task: the store or the log's last lines were slow, not the model.
                # Timed out, the run lost the answer its customer pays for.
                await self._end(view, batcher, None, "SUCCEEDED", output=answer)
            else:
                after = int(time.monotonic() - started)
                timed_out = f"timed out after {self.config.run_timeout:g}s"
                await self._end(view, batcher, timed_out, "TIMED_OUT", after=after)
        except RunFailed as failure:
            await self._end(view, batcher, f"failed: {failure}", "FAILED", error=str(failure))
        except _Lost:
            batcher.abandon()
            log.warning("orchestrator.lost_run", run_id=str(view.run_id))
        except asyncio.CancelledError:
            if output is None:
                # Stopped while the answer's record was being written (it ran to its end).
                output = self._answered.get(view.run_id)
            if output is not None and view.run_id not in self.cancelled | self.taken_over:
                # Stopped (the orchestrator shutting down) with the run's work done and
                # charged, its log or its finish still being written: finished first.
                await self._end(view, batcher, None, "SUCCEEDED", output=output)
            batcher.abandon()
            if view.run_id not in self.cancelled:
                raise
            log.info("orchestrator.cancelled", run_id=str(view.run_id))
        except Exception as error:
            log.exception("orchestrator.run_crashed", run_id=str(view.run_id))
            crashed = f"internal error: {type(error).__name__}"
            await self._end(view, batcher, crashed, "FAILED", error=f"internal error: {error}")
        finally:
            metrics.AGENT_RUNS_IN_FLIGHT.dec()
            self._executing.pop(view.run_id, None)
            self._answered.pop(view.run_id, None)
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat

    async def _end(
        self, view: RunView, batcher: LogBatcher, line: str | None, outcome: str, *,
        output: str | None = None, error: str | None = None, after: int | None = None,
    ) -> None:  # fmt: skip
        """Close the run's log (with ``line``) and finish the run ``outcome``, both to their end
        however often the task is cancelled meanwhile (a cancel is raised after): cut by the
        orchestrator stopping, they left the run RUNNING, its calls charged, and whoever took it
        over ran it, and charged it, again."""

        async def end() -> None:
            await self._close_quietly(batcher, line)
            await self._finish(view, outcome, output=output, error=error, after=after)

        await _despite_cancels(end())

    async def _close_quietly(self, batcher: LogBatcher, line: str | None) -> None:
        if line is not None:
            batcher.system(line)
        try:
            await batcher.close()
        except Exception:
            log.exception("orchestrator.log_flush_failed")

    async def _write_lines(self, view: RunView, lines: list[Line]) -> None:
        """Write a chunk; one the store refused as unavailable with nothing written is written
        again (backing off, for up to ``stale_after``): an error here ends the run's log writer,
        and with it the run, its calls done and charged, FAILED."""
        await self._while_unavailable(
            partial(
                self._log_writer.write,
                view.workspace_id,
                view.run_id,
                lines,
                partial(self._write_lines_alone, view, lines),
            )
        )

    async def _write_lines_alone(self, view: RunView, lines: list[Line]) -> None:
        cmd = m.AppendRunLog(run_id=view.run_id, worker=self.worker, lines=_line_inputs(lines))
        await self._write(view, self.app.append_run_log, cmd)

    async def _write_log_group(
        self, workspace_id: UUID, chunks: list[tuple[UUID, list[Line]]]
    ) -> None:
        cmd = m.AppendRunLogs(
            worker=self.worker,
            chunks=[
                m.RunLogChunk(run_id=run_id, lines=_line_inputs(lines)) for run_id, lines in chunks
            ],
        )
        await self._call(self.app.append_run_logs, cmd, Actor.service("orchestrator", workspace_id))
        written = time.monotonic()
        for run_id, _ in chunks:
            self._last_write[run_id] = written

    def _run_lock(self, run_id: UUID) -> asyncio.Lock:
        """Held by every write of the run from here: they would only race each other."""
        return self._run_locks.setdefault(run_id, asyncio.Lock())

    async def _write(
        self, view: RunView, handler: Callable[..., CommandResult], cmd: m.Command
    ) -> CommandResult:
        async with self._run_lock(view.run_id):
            return await self._write_unlocked(view, handler, cmd)

    async def _write_unlocked(
        self, view: RunView, handler: Callable[..., CommandResult], cmd: m.Command
    ) -> CommandResult:
        """Send a command for the run; a race lost to other writers (every charge of a workspace
        saves its month's spend) is retried with jittered backoff, since nothing was written."""
        for race in range(1, WRITE_RACES + 1):
            try:
                result = await self._call(handler, cmd, self._actor(view))
            except Conflict as error:
                if "taken over" in error.message:
                    self.taken_over.add(view.run_id)
                    task = self.tasks.get(view.run_id)
                    if task is not None and task is not asyncio.current_task():
                        task.cancel()
                    raise _Lost(error.message) from error
                if race == WRITE_RACES:
                    raise
                await asyncio.sleep(random.uniform(0, 0.01 * race))  # noqa: S311
                continue
            except InvalidTransition as error:
                raise _Lost(error.message) from error
            self._last_write[view.run_id] = time.monotonic()
            return result
        raise AssertionError("unreachable")  # pragma: no cover

    async def _while_unavailable(
        self, write: Callable[[], Awaitable[T]], *, unknown_too: bool = False
    ) -> T:
        """``write()``, again (backing off, for up to ``stale_after``) while the store refuses it
        as unavailable with nothing written. A write whose commit the store could not tell is
        sent again only when ``unknown_too``: writes whose second sending is refused (a finish)
        or answered with the first one's result (a call's start, its attempt: by call id) once
        the first is in; others would be recorded twice (a log chunk)."""
        pause = self.config.backoff_base
        give_up = time.monotonic() + self.config.stale_after
        while True:
            try:
                return await write()
            except Unavailable as error:
                unknown = error.outcome == "unknown" and not unknown_too
                if unknown or time.monotonic() + pause > give_up:
                    raise
                await asyncio.sleep(pause)
                pause = min(pause * 2, self.config.backoff_cap)

    async def _heartbeats(self, view: RunView) -> None:
        interval = self.config.heartbeat_interval
        while True:
            await asyncio.sleep(interval / 2)
            if time.monotonic() - self._last_write.get(view.run_id, 0.0) < interval:
                continue
            try:
                await self._write(
                    view,
                    self.app.record_run_heartbeat,
                    m.RecordRunHeartbeat(run_id=view.run_id, worker=self.worker),
                )
            except _Lost:
                task = self.tasks.get(view.run_id)
                if task is not None:
                    task.cancel()
                return
            except Exception as error:
                if is_outage(error):  # said once by outages; the next beat tries again
                    log.debug("orchestrator.heartbeat_unavailable", run_id=str(view.run_id))
                else:
                    log.exception("orchestrator.heartbeat_failed", run_id=str(view.run_id))

    async def _finish(
        self, view: RunView, outcome: str, *, output: str | None = None, error: str | None = None,
        after: int | None = None,
    ) -> None:  # fmt: skip
        cmd = m.FinishRun(
            run_id=view.run_id, outcome=outcome, worker=self.worker, output=output,
            error=error, after_seconds=after,
        )  # fmt: skip

        async def finish() -> None:
            # Again while the store cannot take it: safe (a finish that did commit makes the
            # next refused, the run no longer RUNNING), and needed (the run's calls are charged:
            # left RUNNING, it would be taken over and run, and charged, again).
            await self._while_unavailable(
                partial(self._write, view, self.app.finish_run, cmd), unknown_too=True
            )
            # Counted once stored, a cancel meanwhile (the orchestrator stopping) or not.
            metrics.AGENT_RUNS_FINISHED.labels(outcome).inc()
            started = self._executing.get(view.run_id)
            if started is not None:
                metrics.AGENT_RUN_SECONDS.labels(outcome).observe(time.monotonic() - started)

        try:
            await _despite_cancels(finish())
        except _Lost:
            return
        except Unavailable:
            log.exception("orchestrator.finish_failed", run_id=str(view.run_id))
        except AgentWorksError:
            log.exception("orchestrator.finish_refused", run_id=str(view.run_id))

    # -- the agent's work ----------------------------------------------------------------------

    def _earlier_runs(self, run_ids: list[UUID]) -> list[EarlierRun]:
        """The outputs of ``run_ids`` (oldest first) as a prompt shows them; a run that cannot
        be read is left out (logged), not the new run failed."""
        earlier = []
        for run_id in run_ids:
            try:
                run = self.app.run_snapshot(run_id)
            except AgentWorksError as error:
                log.warning(
                    "orchestrator.earlier_run_unreadable", run_id=str(run_id), error=str(error)
                )
                continue
            if run.output is not None:
                earlier.append(EarlierRun.kept(run.agent, run.output))
        return earlier

    async def _work(
        self, view: RunView, batcher: LogBatcher, *, deadline: float, made: int = 0
    ) -> str:
        """The run's output; ``deadline`` (monotonic) is when its timeout ends it, ``made`` the
        calls its earlier workers made (a run taken over), which its attempts count: begun
        afresh, each takeover made, and charged, as many calls again."""
        try:
            spec = agent_named(view.agent)
            card = await self._call(self.app.card_snapshot, view.card_id)
        except AgentWorksError as error:
            raise RunFailed(error.message) from error
        earlier_ids = [rid for rid in self.outputs.get(view.card_id, ()) if rid != view.run_id]
        earlier = await self._call(self._earlier_runs, earlier_ids) if earlier_ids else []
        messages = build_prompt(
            spec, title=card.title, description=card.description, earlier=earlier
        )
        request = RouteRequest(
            policy=view.policy if view.provider is None else "pinned",
            provider=view.provider,
            model=view.model,
            needs=spec.needs,
        )
        try:
            chain = route(
                request,
                available=self.providers,
                prices=self.app.prices,
                at=datetime.now(UTC),
                latency_ms=self.latency.means,
            )
        except AgentWorksError as error:
            raise RunFailed(error.message) from error
        last_error = ""
        index = 0
        if made >= self.config.max_attempts:
            raise RunFailed(
                f"gave up after {made} attempts: its previous workers made them before it was "
                "taken over"
            )
        for attempt in range(made + 1, self.config.max_attempts + 1):
            while True:
                option, index = await self._pick(
                    chain, index, view, batcher, deadline=deadline, last_error=last_error
                )
                try:
                    outcome = await self._call_once(
                        view, option, messages, spec.max_output_tokens, batcher, deadline,
                        attempt=attempt,
                    )  # fmt: skip
                    break
                except _Unaffordable as unaffordable:
                    # No call was made. An unpinned run goes to the next candidate (one whose
                    # prompt costs less may fit, as startAgentRun judged); it failed here.
                    kept = [o for o in chain if o != option]
                    if request.pinned or not kept:
                        raise
                    batcher.system(f"not calling {option.provider}/{option.model}: {unaffordable}")
                    chain, index = kept, index % len(kept)
            if outcome.ok:
                return outcome.text
            last_error = outcome.error
            if outcome.permanent and request.pinned:
                raise RunFailed(f"{option.provider} refused the call: {outcome.error}")
            refused = False
            if outcome.permanent:
                # The same request would be refused the same way: it goes to the others only.
                kept = [
                    o for o in chain
                    if o != option and not (outcome.provider_wide and o.provider == option.provider)
                ]  # fmt: skip
                if not kept:
                    raise RunFailed(f"every candidate refused the call: {outcome.error}")
                # What followed the refused option in the chain comes next.
                after = chain[index + 1 :] + chain[:index]
                index = kept.index(next(o for o in after if o in kept)) - 1
                chain, refused = kept, True
            if attempt == self.config.max_attempts:
                break
            wait = backoff_seconds(
                attempt, retry_after=outcome.retry_after, base=self.config.backoff_base,
                cap=self.config.backoff_cap, jitter=random.random(),  # noqa: S311
            )  # fmt: skip
            fallback = not request.pinned and (len(chain) > 1 or refused)
            if fallback:
                wait = min(wait, self.config.backoff_base)
            left = deadline - time.monotonic()
            if wait >= left:
                # A wait the run's timeout would cut short: no retry can come of it, and the
                # run would hold its slot idle until then and end TIMED_OUT, the cause unsaid.
                raise RunFailed(
                    f"gave up after {attempt} attempts: the next could start in {wait:.1f}s, "
                    f"after the run's deadline ({max(left, 0.0):.1f}s left): {last_error}"
                )
            if fallback:
                index = (index + 1) % len(chain)
                nxt = chain[index]
                batcher.system(
                    f"falling back from {option.provider}/{option.model} to "
                    f"{nxt.provider}/{nxt.model}: {outcome.error}"
                )
            else:
                batcher.system(f"retrying in {wait:.1f}s: {outcome.error}")
            await self._idle_for(view.run_id, wait)
        raise RunFailed(f"gave up after {self.config.max_attempts} attempts: {last_error}")

    async def _pick(
        self,
        chain: list[ModelOption],
        index: int,
        view: RunView,
        batcher: LogBatcher,
        *,
        deadline: float,
        last_error: str,
    ) -> tuple[ModelOption, int]:
        """The next candidate, from ``index`` on, whose breakers let a call of ``view``'s
        workspace through. While none does (a pinned run's provider, or every candidate's,
        failing), the run waits for the first circuit's trial, holding no slot: a call now would
        only add to the outage, and the run would spend its attempts on it. A trial past the
        deadline fails the run."""
        said, workspace = False, str(view.workspace_id)
        while True:
            now = time.monotonic()
            for step in range(len(chain)):
                at = (index + step) % len(chain)
                if self.breakers.allows(chain[at].provider, workspace, now):
                    return chain[at], at
            # The slot is taken back once a circuit would let a call through, not at each look:
            # a run looking every second took one back each time, ahead of every queued run.
            async with self._slot_lent(view.run_id):
                while True:
                    now = time.monotonic()
                    waits = {o.provider: self.breakers.wait(o.provider, workspace, now)
                             for o in chain}  # fmt: skip
                    first = min(waits, key=waits.__getitem__)
                    if not waits[first]:
                        break
                    left = deadline - now
                    if waits[first] >= left:
                        why = f": {last_error}" if last_error else ""
                        raise RunFailed(
                            f"circuit for {first} is open for {waits[first]:.1f}s more, after "
                            f"the run's deadline ({max(left, 0.0):.1f}s left){why}"
                        )
                    if not said:
                        said = True
                        batcher.system(f"waiting {waits[first]:.1f}s for the circuit of {first}"
                                       " to let a call through")  # fmt: skip
                    # A trial out may close the circuit before its cooldown ends: looked at
                    # again soon.
                    await asyncio.sleep(min(max(waits[first], _CIRCUIT_RECHECK), 1.0))

    async def _call_once(
        self,
        view: RunView,
        option: ModelOption,
        messages: list[dict[str, str]],
        max_tokens: int,
        batcher: LogBatcher,
        deadline: float,
        *,
        attempt: int,
    ) -> _Outcome:
        provider = self.providers[option.provider]
        started_at = datetime.now(UTC)
        price = self.app.prices.require(option.provider, option.model, started_at)
        input_tokens = count_message_tokens(messages)
        budget = await self._call(self.app.run_budget, view.run_id)

        def billed(prompt_tokens: int, output_tokens: int) -> int:
            cost = call_cost_micros(price, input_tokens=prompt_tokens, output_tokens=output_tokens)
            return billed_amount(cost, budget.markup)

        month = month_of(started_at)
        # Named before the call is made. Not after the attempt's number: the worker a run is
        # taken over from records its call in flight too, and its number may be the new
        # worker's. The hold is named after the charge the call will write, so that whoever
        # counts the charge can drop the hold.
        call_id = f"call-{uuid4()}"
        hold_id = charge_id_for(view.run_id, call_id)
        reading = await self._call(
            self.app.spend.read,
            view.workspace_id,
            month,
            self._local_holds.settled(view.workspace_id, month),
        )
        # Read after the usage the checks read: both only grow, so the write model's is the
        # later of the two, as the floor it sets (``decide_hold``) assumes. Only a monthly
        # limit reads it.
        written = 0
        if budget.month_limit_micros is not None:
            written = (await self._call(self._written.read, view.workspace_id, month)).spent
        try:
            hold, store = await self._hold(
                HoldRequest(
                    workspace_id=view.workspace_id,
                    month=month,
                    hold_id=hold_id,
                    want=billed(input_tokens, max_tokens),
                    floor=billed(input_tokens, 0),
                    spent=reading.spent,
                    counted=reading.counted,
                    written=written,
                    limit=budget.month_limit_micros,
                    run_room=budget.run_room_micros,
                )
            )
        except asyncio.CancelledError:
            # Cut while the hold was decided: it may be recorded all the same (its answer on
            # its way), and it stayed until it lapsed, holding back room for a call never made.
            await _despite_cancels(self._release_everywhere(view.workspace_id, month, hold_id))
            raise
        room = hold.room
        limiting = budget.limiting(room)
        if hold.granted is None:
            raise _Unaffordable(
                f"budget reached: {format_usd(max(room or 0, 0))} left under {limiting}, the "
                f"prompt alone would be billed {format_usd(billed(input_tokens, 0))}"
            )
        # Said once the call may go: a model the budget cannot pay for is "not called" instead.
        batcher.system(f"calling {option.provider}/{option.model} (attempt {attempt})")
        call = _Call(
            view, option, input_tokens, started_at, billed, room, call_id, deadline, max_tokens,
            limiting,
        )  # fmt: skip
        try:
            # Said before the call is made, so that it is charged should this worker die
            # during it (one write more per call: a few milliseconds against its seconds).
            start = m.StartProviderCall(
                run_id=view.run_id, worker=self.worker, call_id=call_id,
                provider=option.provider, model=option.model, input_tokens=input_tokens,
                prompt_cost_micros=call_cost_micros(price, input_tokens=input_tokens,
                                                    output_tokens=0),
                price_table_version=self.app.prices.version,
            )  # fmt: skip
            try:
                await self._while_unavailable(
                    partial(self._write, view, self.app.start_provider_call, start),
                    unknown_too=True,
                )
            except asyncio.CancelledError:
                # Stopped while the start was being written (its thread goes on, and it may
                # yet land): an attempt without tokens says the call was never made, so that
                # no takeover charges it, in either order (a start after its call's attempt
                # records nothing).
                with contextlib.suppress(_Lost, AgentWorksError):
                    await _despite_cancels(self._attempt(
                        call, "failed", None, f"{self._cut(call)} before the call was made", 0,
                        Usage(0, 0),
                    ))  # fmt: skip
                raise
            return await self._stream(
                call, provider.stream(ChatRequest(option.model, messages, max_tokens)), batcher
            )
        finally:
            await self._settle(store, view, month, hold_id, call.charged)

    async def _stream(
        self, call: _Call, stream: AsyncIterator[Piece], batcher: LogBatcher
    ) -> _Outcome:
        option, input_tokens, billed, room = call.option, call.input_tokens, call.billed, call.room
        text: list[str] = []
        output_tokens = 0
        usage: Usage | None = None
        accepted: Accepted | None = None
        error: Exception | None = None
        budget_hit = False
        overrun_at = 2 * call.max_tokens + 16
        t0 = time.monotonic()

        def used() -> Usage:
            """What a call cut short used, as far as we know: the provider's count of the
            prompt when its wire gave one, else ours; the output received, counted, up to the
            call's ``max_tokens``."""
            output = count_tokens_upto("".join(text), call.max_tokens)
            if accepted is None or accepted.input_tokens is None:
                return Usage(input_tokens, output, estimated=True)
            return Usage(accepted.input_tokens, output, estimated=output > 0)

        try:
            async with contextlib.aclosing(stream):  # type: ignore[type-var]
                async for piece in stream:
                    if isinstance(piece, Usage):
                        usage = piece
                        break
                    if isinstance(piece, Accepted):
                        if accepted is None or piece.input_tokens is not None:
                            accepted = piece
                        continue
                    if not text:
                        metrics.LLM_FIRST_TOKEN_SECONDS.labels(option.provider).observe(
                            time.monotonic() - t0
                        )
                    text.append(piece)
                    batcher.add(piece)
                    # No piece is counted past where the stream is cut (see overrun_at), and
                    # a long one is counted off the event loop every run here waits on.
                    upto = overrun_at + 1 - output_tokens
                    if len(piece) < _COUNT_ON_LOOP_CHARS:
                        output_tokens += count_tokens_upto(piece, upto)
                    else:
                        output_tokens += await self._call(count_tokens_upto, piece, upto)
                    # The provider's count of the prompt once its wire gave one (Anthropic's
                    # message_start): it bills that, whatever ours said before the call.
                    prompt = input_tokens
                    if accepted is not None and accepted.input_tokens is not None:
                        prompt = accepted.input_tokens
                    if room is not None and billed(prompt, output_tokens) >= room:
                        budget_hit = True
                        break
                    if output_tokens > overrun_at:
                        # Far past where the provider stops (our tokenizer is not its own): it
                        # ignores the cap, and would stream into the run's log until its
                        # deadline.
                        error = StreamBroken(
                            f"{option.provider} streamed past the call's {call.max_tokens} "
                            "output tokens", provider=option.provider,
                        )  # fmt: skip
                        break
        except (TransientProviderError, PermanentProviderError) as caught:
            error = caught
        except asyncio.CancelledError:
            # Cancelled, timed out or stopping: once the provider took the call it bills the
            # prompt and whatever streamed so far, so that is charged before the cancellation
            # goes on. Cut before it answered, the call may never have reached it: no charge,
            # but an attempt all the same, so that no takeover charges the call as one its
            # worker died during.
            taken = bool(text) or accepted is not None
            latency_ms = int((time.monotonic() - t0) * 1000)
            metrics.LLM_CALLS.labels(option.provider, option.model, "cut").inc()
            with contextlib.suppress(_Lost, AgentWorksError):
                await _despite_cancels(self._attempt(
                    call, "failed", None,
                    self._cut(call) if taken else f"{self._cut(call)} before the provider "
                    "answered", latency_ms, used() if taken else Usage(0, 0),
                ))  # fmt: skip
            raise
        latency_ms = int((time.monotonic() - t0) * 1000)
        received = "".join(text)
        provider_name, workspace = option.provider, str(call.view.workspace_id)
        metrics.LLM_CALLS.labels(
            option.provider, option.model, _call_outcome(error, budget_hit=budget_hit)
        ).inc()
        metrics.LLM_CALL_SECONDS.labels(option.provider).observe(latency_ms / 1000)
        if usage is not None:
            self.latency.observe(option.provider, option.model, latency_ms)
            self.breakers.succeeded(provider_name, workspace)
            # Kept first: a cancel during the record (which runs to its end) is raised after it,
            # and the run's task must still know it has its answer, charged (see _execute).
            self._answered[call.view.run_id] = received
            await _despite_cancels(self._attempt(call, "ok", None, None, latency_ms, usage))
            return _Outcome(ok=True, text=received)
        # No usage block: a call whose stream broke (cut, timed out, unreadable) or that
        # produced text is charged for what was sent and received, from our own counts where
        # the provider gave none. One the provider itself refused or failed (an HTTP error, an
        # error event) before any text is not: it did not bill it.
        streamed = bool(text) or isinstance(error, StreamBroken) or budget_hit
        estimate = used()
        if budget_hit:
            await _despite_cancels(
                self._attempt(call, "failed", None, "stopped: budget reached", latency_ms, estimate)
            )
            raise RunFailed(
                f"budget reached mid-stream after {estimate.output_tokens} output tokens "
                f"({format_usd(max(room or 0, 0))} was left under {call.limiting})"
            )
        assert error is not None
        http_status = getattr(error, "http_status", None)
        await _despite_cancels(self._attempt(
            call, "failed", http_status, str(error), latency_ms,
            estimate if streamed else Usage(0, 0),
        ))  # fmt: skip
        # A refusal of the provider's (our key, our account), not of the request.
        provider_wide = isinstance(error, PermanentProviderError) and error.provider_wide
        if isinstance(error, PermanentProviderError) and not provider_wide:
            # The provider is up and judged the request (a prompt too long, an unknown model):
            # one tenant's bad requests must not turn every other run away from it.
            self.breakers.succeeded(provider_name, workspace)
        else:
            opened = self.breakers.failed(
                provider_name, workspace, time.monotonic(), provider_wide=provider_wide
            )
            for scope in opened:
                metrics.PROVIDER_CIRCUITS_OPENED.labels(provider_name, scope).inc()
            if "provider" in opened:
                batcher.system(f"circuit for {provider_name} is open")
            elif opened:
                batcher.system(f"circuit for {provider_name} is open for this workspace")
        if isinstance(error, PermanentProviderError):
            return _Outcome(ok=False, error=str(error), permanent=True, provider_wide=provider_wide)
        assert isinstance(error, TransientProviderError)
        return _Outcome(ok=False, error=str(error), retry_after=error.retry_after)

    def _cut(self, call: _Call) -> str:
        """Why ``call`` was cut short, as its attempt says: its run cancelled by a user, taken
        over, timed out, or this worker shutting down (all of them cancel the run's task)."""
        run_id = call.view.run_id
        if run_id in self.taken_over:
            return "stopped: taken over"
        if run_id not in self.cancelled:
            if self._stop.is_set():
                return "stopped: worker shut down"
            if time.monotonic() >= call.deadline:
                return "stopped: timed out"
        # A cancel the log has not brought yet: a heartbeat refused, the run no longer RUNNING.
        return "stopped: cancelled"

    @property
    def _hold_ttl(self) -> float:
        """A hold outlives no run: the run's timeout bounds its calls, and its takeover by
        another orchestrator starts after ``stale_after``. A settled hold gets as long again
        for its charge to be counted."""
        return self.config.run_timeout + self.config.stale_after

    async def _hold(self, request: HoldRequest) -> tuple[Hold, BudgetHolds]:
        """The hold, and the store that keeps it (the shared one, or this process's own while
        the shared one cannot be reached)."""
        if self.holds is not self._local_holds:
            # What this process held here while the shared store was away (calls still under
            # way, charges not yet counted): the shared store never saw it, and granted the
            # whole month's room past it.
            aside, aside_written = self._local_holds.outstanding(
                request.workspace_id, request.month, request.counted
            )
            shared = request
            if aside and request.limit is not None:
                # The written charges among them are in the write model's usage as well: the
                # shared store is told that usage without them, or it would count them twice.
                shared = replace(
                    request,
                    limit=request.limit - aside,
                    written=max(0, request.written - aside_written),
                )
            try:
                held = await self.holds.hold(shared, ttl=self._hold_ttl), self.holds
            except Unavailable as away:
                # Said once while it stays away (and by outages, with when it is back), not
                # with a traceback at every call of every run.
                if self._shared_holds_reachable:
                    self._shared_holds_reachable = False
                    log.warning("orchestrator.shared_holds_unavailable", error=str(away))
            except Exception:
                log.warning("orchestrator.shared_holds_unavailable", exc_info=True)
            else:
                self._shared_holds_reachable = True
                return held
        return await self._local_holds.hold(request, ttl=self._hold_ttl), self._local_holds

    async def _release_everywhere(self, workspace_id: UUID, month: str, hold_id: UUID) -> None:
        """Drop the hold ``hold_id`` from whichever store may keep it (nothing if none does)."""
        for store in {id(s): s for s in (self.holds, self._local_holds)}.values():
            try:
                await store.release(workspace_id, month, hold_id)
            except Unavailable:
                pass  # said by outages; it lapses on its own (see ``_hold_ttl``)
            except Exception:
                # It lapses on its own (see ``_hold_ttl``); until then it only holds back.
                log.warning("orchestrator.hold_release_failed", exc_info=True)

    async def _settle(
        self, store: BudgetHolds, view: RunView, month: str, hold_id: UUID, charged: _Charged
    ) -> None:
        """A charged call's hold stays, at the amount billed, until the usage spend checks read
        counts the charge (``orchestrator.holds``); an uncharged call's goes now. One whose
        charge may or may not have been written stays as it is and lapses."""
        try:
            if charged.billed > 0:
                await store.settle(
                    view.workspace_id, month, hold_id, billed=charged.billed, ttl=self._hold_ttl
                )
            elif not charged.unsure:
                await store.release(view.workspace_id, month, hold_id)
        except Unavailable:
            pass  # said by outages; the hold lapses on its own (see ``_hold_ttl``)
        except Exception:
            # The hold lapses on its own (see ``_hold_ttl``); until then it only holds back.
            log.warning("orchestrator.hold_settle_failed", exc_info=True)

    async def _attempt(
        self, call: _Call, status: str, http_status: int | None, error: str | None,
        latency_ms: int, usage: Usage,
    ) -> None:  # fmt: skip
        """Record the call's attempt (and charge). Recorded, and the run taken over from this
        worker meanwhile (the charge stands: the provider bills the call), it raises
        :class:`_Lost`, so that the worker makes no further call for the run. A record whose
        commit the store could not tell is sent again: the call id recorded, the run answers
        the first record's result."""
        view, option, charged = call.view, call.option, call.charged
        cmd = m.RecordProviderAttempt(
            run_id=view.run_id, worker=self.worker, call_id=call.call_id,
            provider=option.provider, model=option.model, status=status,
            http_status=http_status, error=None if error is None else error[:2000],
            latency_ms=latency_ms, input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens, estimated=usage.estimated,
            started_at=call.started_at,
        )  # fmt: skip
        # Every charge of a workspace saves its month's spend: charges sent at once from here
        # would only conflict on it, and a conflict holds the store's append lock while it
        # waits for the other commit. One at a time per workspace, they do not.
        lock = self._charging.setdefault(view.workspace_id, asyncio.Lock())
        try:
            async with lock:
                result = await self._while_unavailable(
                    partial(self._write, view, self.app.record_provider_attempt, cmd),
                    unknown_too=True,
                )
            charged.billed = int(result.extra.get("billed", 0))
            _count_charged(option.provider, usage, charged.billed)
        except BaseException as failure:
            # Refused (or taken over): nothing was written. Anything else may have committed.
            refused = isinstance(failure, _Lost) or (
                isinstance(failure, AgentWorksError) and not isinstance(failure, Unavailable)
            )
            if usage.input_tokens or usage.output_tokens:
                charged.unsure = not refused
            raise
        finally:
            if not lock.locked() and self._charging.get(view.workspace_id) is lock:
                del self._charging[view.workspace_id]
        if result.extra.get("taken_over"):
            raise _Lost(f"run {view.run_id} was taken over while its call was under way")


def _call_outcome(error: Exception | None, *, budget_hit: bool) -> str:
    """A call's outcome as ``agentworks_llm_calls_total`` labels it (not cut short by its run)."""
    if budget_hit:
        return "budget"
    if error is None:
        return "ok"
    if isinstance(error, StreamBroken):
        return "broken"
    if isinstance(error, PermanentProviderError):
        return "refused"
    if getattr(error, "http_status", None) == 429:
        return "rate_limited"
    return "unavailable"


def _count_charged(provider: str, usage: Usage, billed: int) -> None:
    metrics.LLM_TOKENS.labels(provider, "input").inc(usage.input_tokens)
    metrics.LLM_TOKENS.labels(provider, "output").inc(usage.output_tokens)
    metrics.LLM_BILLED.labels(provider).inc(billed)


async def _despite_cancels(work: Awaitable[T]) -> T:
    """``work`` to its end, however often its task is cancelled meanwhile; a cancel that came
    is raised once it has ended. For the record of a call the provider had (a cancel cut it
    before it was sent, and the call stayed uncharged until the sweep of calls left open
    charged its prompt alone) and what a run's task does on its way out of a cancellation
    (recording the call it had under way, releasing its hold): a run's cancel reaches its task
    more than once (the log brings it, and a write of the run refused since, a heartbeat's say,
    cancels the task too), and its timeout and the orchestrator stopping cancel it as well."""
    inner = asyncio.ensure_future(work)
    cancelled = False
    while True:
        try:
            done = await asyncio.shield(inner)
        except asyncio.CancelledError:
            if inner.done():
                raise
            cancelled = True
            continue
        if cancelled:
            raise asyncio.CancelledError
        return done


def _line_inputs(lines: list[Line]) -> list[m.LogLineInput]:
    return [m.LogLineInput(at=at, stream=stream, text=text) for at, stream, text in lines]


class OrchestratorThread:
    """An orchestrator on an event loop of its own thread (``agentworks dev``, tests)."""

    def __init__(self, orchestrator: Orchestrator) -> None:
        self.orchestrator = orchestrator
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._main, name="orchestrator", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 15.0) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self.orchestrator.stop)
            self._thread.join(timeout)

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self.orchestrator.run())
        finally:
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            self._loop.close()
