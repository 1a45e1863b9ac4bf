"""AgentRun: one agent working one card, from request to a terminal status.

Lifecycle::

    QUEUED ──start──► RUNNING ──succeed──► SUCCEEDED
      │                 ├──fail─────────► FAILED
      │                 ├──time out─────► TIMED_OUT
      └──cancel─────────┴──cancel───────► CANCELLED
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any
from uuid import UUID

from domain.base import TenantAggregate
from domain.errors import BudgetExceeded, Conflict, InvalidTransition, ValidationFailed
from domain.meta import EventMeta
from domain.money import format_usd, positive_micros
from domain.text import replace_unstorable, trimmed

MAX_LOG_LINES_PER_CHUNK = 10_000
MAX_LOG_LINE_LENGTH = 16_384
LOG_STREAMS = frozenset({"stdout", "stderr", "system"})


@dataclass(frozen=True)
class RecordedCall:
    """What recording a call answered: what recording it again answers (see
    :meth:`AgentRun.recorded_call`)."""

    attempt: int
    charge_id: UUID | None = None
    billed_micros: int = 0


class RunStatus(StrEnum):
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    TIMED_OUT = "TIMED_OUT"

    @property
    def terminal(self) -> bool:
        return self not in (RunStatus.QUEUED, RunStatus.RUNNING)


class AgentRun(TenantAggregate):
    """The record of a run: its status, the LLM calls it made and the log lines it wrote."""

    if TYPE_CHECKING:
        project_id: UUID
        card_id: UUID
        agent: str
        provider: str | None
        model: str | None
        max_cost_micros: int | None
        status: RunStatus
        next_seq: int
        input_tokens: int
        output_tokens: int
        provider_cost_micros: int
        billed_micros: int
        call_ids: set[str]
        open_calls: dict[str, AgentRun.CallStarted]
        """Calls their worker said it was about to make, no attempt of them recorded yet: what
        charging one for its prompt needs, should its worker never record it."""
        recorded_calls: dict[str, RecordedCall]
        started_calls: dict[str, str]
        """Every call a worker said it was about to make, by id: the worker that started it
        (see :meth:`_expect_call_recordable`)."""
        error: str | None
        policy: str
        worker: str | None
        workers: set[str]
        attempts: int
        reclaims: int
        output: str | None

    class Requested(TenantAggregate.Created):
        project_id: UUID
        card_id: UUID
        agent: str
        provider: str | None
        model: str | None
        max_cost_micros: int | None
        policy: str = "cheapest"

        def apply(self, aggregate: AgentRun) -> None:
            aggregate.workspace_id = self.workspace_id
            aggregate.policy = self.policy
            aggregate.worker = None
            aggregate.workers = set()
            aggregate.attempts = 0
            aggregate.reclaims = 0
            aggregate.output = None
            aggregate.project_id = self.project_id
            aggregate.card_id = self.card_id
            aggregate.agent = self.agent
            aggregate.provider = self.provider
            aggregate.model = self.model
            aggregate.max_cost_micros = self.max_cost_micros
            aggregate.status = RunStatus.QUEUED
            aggregate.next_seq = 1
            aggregate.input_tokens = 0
            aggregate.output_tokens = 0
            aggregate.provider_cost_micros = 0
            aggregate.billed_micros = 0
            aggregate.call_ids = set()
            aggregate.open_calls = {}
            aggregate.recorded_calls = {}
            aggregate.started_calls = {}
            aggregate.error = None

    class Started(TenantAggregate.Event):
        worker: str

        def apply(self, aggregate: AgentRun) -> None:
            aggregate.status = RunStatus.RUNNING
            aggregate.worker = self.worker
            aggregate.workers.add(self.worker)

    class Heartbeat(TenantAggregate.Event):
        """The worker running the run is alive (written when it has written nothing else)."""

        worker: str

    class Reclaimed(TenantAggregate.Event):
        """Another worker took over a run whose worker stopped showing signs of life."""

        worker: str
        previous_worker: str

        def apply(self, aggregate: AgentRun) -> None:
            aggregate.worker = self.worker
            aggregate.workers.add(self.worker)
            aggregate.reclaims += 1

    class CallStarted(TenantAggregate.Event):
        """A provider call its worker is about to make, written before the call: should the
        worker die before recording it, whoever takes the run over charges it for its prompt
        (see :meth:`AgentRun.reclaim`). ``input_tokens``: the worker's estimate of the prompt;
        ``prompt_cost_micros``: what the prompt costs at the worker's price table, named."""

        call_id: str
        worker: str
        provider: str
        model: str
        input_tokens: int
        prompt_cost_micros: int
        price_table_version: str

        def apply(self, aggregate: AgentRun) -> None:
            aggregate.open_calls[self.call_id] = self
            aggregate.started_calls[self.call_id] = self.worker

    class AttemptRecorded(TenantAggregate.Event):
        """One call to a provider, whatever its outcome (``status`` ``ok`` or ``failed``).
        ``call_id``: the call's own id (None in attempts recorded before calls had one)."""

        attempt: int
        provider: str
        model: str
        status: str
        http_status: int | None
        error: str | None
        latency_ms: int
        input_tokens: int
        output_tokens: int
        provider_cost_micros: int
        estimated: bool
        call_id: str | None = None

        def apply(self, aggregate: AgentRun) -> None:
            aggregate.attempts = max(aggregate.attempts, self.attempt)
            if self.call_id is not None:
                aggregate.open_calls.pop(self.call_id, None)
                aggregate.recorded_calls[self.call_id] = RecordedCall(self.attempt)

    class OutputRecorded(TenantAggregate.Event):
        output: str

        def apply(self, aggregate: AgentRun) -> None:
            aggregate.output = self.output

    class StepStarted(TenantAggregate.Event):
        step: int
        name: str

    class LogChunkAppended(TenantAggregate.Event):
        """A batch of log lines; ``lines`` hold ``seq``, ``at`` (ISO UTC), ``stream``, ``text``."""

        first_seq: int
        lines: list[dict[str, Any]]

        def apply(self, aggregate: AgentRun) -> None:
            aggregate.next_seq = self.first_seq + len(self.lines)

    class LlmCallCompleted(TenantAggregate.Event):
        project_id: UUID
        card_id: UUID
        call_id: str
        charge_id: UUID
        provider: str
        model: str
        input_tokens: int
        output_tokens: int
        latency_ms: int
        provider_cost_micros: int
        billed_micros: int

        def apply(self, aggregate: AgentRun) -> None:
            aggregate.call_ids.add(self.call_id)
            aggregate.open_calls.pop(self.call_id, None)
            recorded = aggregate.recorded_calls.get(self.call_id, RecordedCall(0))
            aggregate.recorded_calls[self.call_id] = replace(
                recorded, charge_id=self.charge_id, billed_micros=self.billed_micros
            )
            aggregate.provider = self.provider
            aggregate.model = self.model
            aggregate.input_tokens += self.input_tokens
            aggregate.output_tokens += self.output_tokens
            aggregate.provider_cost_micros += self.provider_cost_micros
            aggregate.billed_micros += self.billed_micros

    class Succeeded(TenantAggregate.Event):
        def apply(self, aggregate: AgentRun) -> None:
            aggregate.status = RunStatus.SUCCEEDED

    class Failed(TenantAggregate.Event):
        error: str

        def apply(self, aggregate: AgentRun) -> None:
            aggregate.status = RunStatus.FAILED
            aggregate.error = self.error

    class Cancelled(TenantAggregate.Event):
        reason: str

        def apply(self, aggregate: AgentRun) -> None:
            aggregate.status = RunStatus.CANCELLED
            aggregate.error = self.reason

    class TimedOut(TenantAggregate.Event):
        after_seconds: int

        def apply(self, aggregate: AgentRun) -> None:
            aggregate.status = RunStatus.TIMED_OUT
            aggregate.error = f"timed out after {self.after_seconds}s"

    @classmethod
    def request(
        cls,
        *,
        run_id: UUID,
        workspace_id: UUID,
        project_id: UUID,
        card_id: UUID,
        agent: str,
        provider: str | None,
        model: str | None,
        max_cost_micros: int | None,
        meta: EventMeta,
        policy: str | None = None,
    ) -> AgentRun:
        agent_name = trimmed(agent, what="agent", at_most=100)
        if max_cost_micros is not None:
            positive_micros(max_cost_micros, "maxCost")
        return cls._create(
            cls.Requested,
            id=run_id,
            workspace_id=workspace_id,
            project_id=project_id,
            card_id=card_id,
            agent=agent_name,
            provider=_optional(provider, "provider"),
            model=_optional(model, "model"),
            max_cost_micros=max_cost_micros,
            policy=policy or "cheapest",
            meta=meta.as_dict(),
        )

    def start(self, *, worker: str, meta: EventMeta) -> None:
        self._expect(RunStatus.QUEUED, action="start")
        self._record(self.Started, meta, worker=worker)

    def expect_worker(self, worker: str | None) -> None:
        """Refuse a write from a worker that no longer runs this run (it was reclaimed)."""
        if worker is not None and self.worker != worker:
            raise Conflict(
                f"run {self.id} is run by {self.worker}, not {worker}; it was taken over",
                worker=self.worker,
            )

    def heartbeat(self, *, worker: str, meta: EventMeta) -> None:
        self._expect(RunStatus.RUNNING, action="record a heartbeat of")
        self.expect_worker(worker)
        self._record(self.Heartbeat, meta, worker=worker)

    def reclaim(self, *, worker: str, meta: EventMeta) -> None:
        """Take over a RUNNING run from a worker presumed dead (the caller decides staleness and
        saves with the version it judged, so a live worker's heartbeat makes this conflict).

        The worker named may be the run's own: one that let the run go while it was still
        recorded as its (its claim or its finish could not be confirmed) takes it up again this
        way, as any other worker would; refused, the run stayed RUNNING for good while that
        worker was the only one.

        The calls its workers started and never recorded (:attr:`open_calls`) are the taker's
        to charge, in the same save (``commands.runs``): only their prompt is known."""
        self._expect(RunStatus.RUNNING, action="reclaim")
        self._record(self.Reclaimed, meta, worker=worker, previous_worker=self.worker or "")

    def expect_ended(self) -> None:
        """Refuse to charge the calls left open (:attr:`open_calls`) of a run not ended yet:
        those of a running run are its worker's to record, or its taker's to charge (see
        :meth:`reclaim`). An ended run's are charged for their prompt once its worker is
        presumed dead, by the same judgement and in the same way as a takeover's
        (``commands.runs``): nobody takes an ended run over."""
        if not self.status.terminal:
            raise InvalidTransition(
                f"run {self.id} is {self.status.value}; only an ended run's calls left open "
                "are charged without taking it over"
            )

    def start_call(
        self,
        *,
        call_id: str,
        worker: str,
        provider: str,
        model: str,
        input_tokens: int,
        prompt_cost_micros: int,
        price_table_version: str,
        meta: EventMeta,
    ) -> None:
        """Say that ``worker`` is about to make the call ``call_id``. Refused once the run is no
        longer the worker's (it must not make the call); said again (a resend whose first answer
        was lost), nothing more is recorded."""
        self._expect(RunStatus.RUNNING, action="start a call of")
        self.expect_worker(worker)
        if call_id in self.open_calls or call_id in self.recorded_calls:
            return
        if input_tokens < 0 or prompt_cost_micros < 0:
            raise ValidationFailed(f"the prompt of call {call_id} must not count negative")
        self._record(
            self.CallStarted, meta, call_id=call_id, worker=worker, provider=provider,
            model=model, input_tokens=input_tokens, prompt_cost_micros=prompt_cost_micros,
            price_table_version=price_table_version,
        )  # fmt: skip

    def recorded_call(self, call_id: str | None, worker: str | None) -> RecordedCall | None:
        """What recording ``call_id`` answered, when it is recorded and ``worker`` may record
        calls of the run (see :meth:`_expect_call_recordable`): recording it again answers that,
        writing nothing, as a command sent again under its commandId does. The first record
        stands: a worker's late record of a call its run's new worker charged for its prompt
        when taking the run over bills nothing more."""
        if call_id is None or (worker is not None and worker not in self.workers):
            return None
        return self.recorded_calls.get(call_id)

    def record_attempt(
        self,
        *,
        provider: str,
        model: str,
        status: str,
        http_status: int | None,
        error: str | None,
        latency_ms: int,
        input_tokens: int,
        output_tokens: int,
        provider_cost_micros: int,
        estimated: bool,
        meta: EventMeta,
        worker: str | None = None,
        call_id: str | None = None,
    ) -> int:
        """Record one provider attempt; returns its number (1-based, per run). ``worker``: who
        made it (see :meth:`_expect_call_recordable`); ``call_id``: the call's own id."""
        self._expect_call_recordable(action="record an attempt of", worker=worker, call_id=call_id)
        if status not in ("ok", "failed"):
            raise ValidationFailed(f"attempt status must be ok or failed, got {status!r}")
        number = self.attempts + 1
        self._record(
            self.AttemptRecorded,
            meta,
            attempt=number,
            provider=provider,
            model=model,
            status=status,
            http_status=http_status,
            error=None if error is None else error[:2000],
            latency_ms=max(0, latency_ms),
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            provider_cost_micros=provider_cost_micros,
            estimated=estimated,
            call_id=call_id,
        )
        return number

    def record_output(self, output: str, *, meta: EventMeta) -> None:
        self._expect(RunStatus.RUNNING, action="record the output of")
        self._record(self.OutputRecorded, meta, output=replace_unstorable(output))

    def start_step(self, step: int, name: str, *, meta: EventMeta) -> None:
        self._expect(RunStatus.RUNNING, action="start a step of")
        self._record(self.StepStarted, meta, step=step, name=name[:200])

    def append_log(
        self, lines: list[tuple[datetime, str, str]], *, meta: EventMeta
    ) -> tuple[int, int]:
        """Append lines (at, stream, text); returns the (first, last) sequence numbers given."""
        self._expect(RunStatus.RUNNING, action="append log lines to")
        if not lines:
            raise ValidationFailed(f"a log chunk for run {self.id} needs at least one line")
        if len(lines) > MAX_LOG_LINES_PER_CHUNK:
            raise ValidationFailed(
                f"a log chunk holds at most {MAX_LOG_LINES_PER_CHUNK} lines, got {len(lines)}"
            )
        first = self.next_seq
        payload = []
        for offset, (at, stream, text) in enumerate(lines):
            if stream not in LOG_STREAMS:
                raise ValidationFailed(
                    f"log stream {stream!r} is not one of {', '.join(sorted(LOG_STREAMS))}"
                )
            if at.tzinfo is None:
                raise ValidationFailed("log line times must be timezone-aware UTC")
            payload.append(
                {
                    "seq": first + offset,
                    "at": at.isoformat(),
                    "stream": stream,
                    "text": replace_unstorable(text[:MAX_LOG_LINE_LENGTH]),
                }
            )
        self._record(self.LogChunkAppended, meta, first_seq=first, lines=payload)
        return first, first + len(lines) - 1

    def record_llm_call(
        self,
        *,
        call_id: str,
        charge_id: UUID,
        provider: str,
        model: str,
        input_tokens: int,
        output_tokens: int,
        latency_ms: int,
        provider_cost_micros: int,
        billed_micros: int,
        meta: EventMeta,
        worker: str | None = None,
    ) -> None:
        """Record a completed call. A call that happened is always recorded, even past budget.
        ``worker``: who made it (see :meth:`_expect_call_recordable`)."""
        self._expect_call_recordable(
            action="record an LLM call for", worker=worker, call_id=call_id
        )
        if call_id in self.call_ids:
            raise InvalidTransition(f"LLM call {call_id} of run {self.id} is already recorded")
        for name, value in (
            ("input tokens", input_tokens),
            ("output tokens", output_tokens),
            ("latency", latency_ms),
            ("provider cost", provider_cost_micros),
            ("billed amount", billed_micros),
        ):
            if value < 0:
                raise ValidationFailed(f"{name} of LLM call {call_id} must not be negative")
        self._record(
            self.LlmCallCompleted,
            meta,
            project_id=self.project_id,
            card_id=self.card_id,
            call_id=call_id,
            charge_id=charge_id,
            provider=provider,
            model=model,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            latency_ms=latency_ms,
            provider_cost_micros=provider_cost_micros,
            billed_micros=billed_micros,
        )

    @property
    def over_budget(self) -> bool:
        return self.max_cost_micros is not None and self.billed_micros >= self.max_cost_micros

    def check_budget(self, estimated_micros: int) -> None:
        """Refuse a further call whose estimated cost would take the run past its budget."""
        if self.max_cost_micros is None:
            return
        if self.billed_micros + estimated_micros > self.max_cost_micros:
            raise BudgetExceeded(
                f"run {self.id} has spent {format_usd(self.billed_micros)} of its "
                f"{format_usd(self.max_cost_micros)} budget; a call estimated at "
                f"{format_usd(estimated_micros)} would exceed it"
            )

    def succeed(self, *, meta: EventMeta) -> None:
        self._expect(RunStatus.RUNNING, action="succeed")
        self._record(self.Succeeded, meta)

    def fail(self, error: str, *, meta: EventMeta) -> None:
        self._expect(RunStatus.RUNNING, action="fail")
        text = replace_unstorable((error.strip() or "unknown error")[:2000])
        self._record(self.Failed, meta, error=text)

    def time_out(self, after_seconds: int, *, meta: EventMeta) -> None:
        self._expect(RunStatus.RUNNING, action="time out")
        self._record(self.TimedOut, meta, after_seconds=after_seconds)

    def cancel(self, reason: str, *, meta: EventMeta) -> None:
        if self.status.terminal:
            raise InvalidTransition(
                f"run {self.id} is already {self.status.value}; only QUEUED or RUNNING runs "
                "can be cancelled"
            )
        self._record(self.Cancelled, meta, reason=(reason.strip() or "cancelled")[:2000])

    def _expect_call_recordable(
        self, *, action: str, worker: str | None = None, call_id: str | None = None
    ) -> None:
        """A call that happened is recorded (and charged) even when the run was cancelled while
        it streamed: the provider bills it either way.

        So is a call of a worker the run was taken over from (made before it learnt so), in
        whatever state the run is now (its new worker may have finished it meanwhile): only
        that worker knows the call happened and what the provider counted, and the provider
        bills it. The charge's key is the call's, so it is never charged twice. Any other worker
        is refused as :meth:`expect_worker` refuses it.

        And so is a call whose start its worker recorded (:attr:`started_calls`), by that
        worker, whatever the run's state since: the run may have ended (failed, timed out) with
        the call's record still to come, or with nobody left to make it, when the call is
        charged for its prompt under its worker's name (see :meth:`expect_ended`)."""
        if worker is not None and worker != self.worker and worker in self.workers:
            return
        if call_id is not None and worker is not None and self.started_calls.get(call_id) == worker:
            return
        self.expect_worker(worker)
        if self.status is not RunStatus.CANCELLED:
            self._expect(RunStatus.RUNNING, action=action)

    def _expect(self, status: RunStatus, *, action: str) -> None:
        if self.status is not status:
            raise InvalidTransition(
                f"cannot {action} run {self.id}: it is {self.status.value}, not {status.value}"
            )


def _optional(value: str | None, what: str) -> str | None:
    return None if value is None else trimmed(value, what=what, at_most=100)
