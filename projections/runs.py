"""The agent-run read model: one summary row per run and every log line it wrote.

The summary follows the run's lifecycle (QUEUED → RUNNING → a terminal status) and adds up its
LLM calls; the lines are stored one row each so that a run's log can be paged by sequence number
and searched by text. A chunk can hold 10,000 lines, so its lines go in with one statement.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, ClassVar
from uuid import UUID

from domain import events as ev
from domain.events import EventPayload, events_of
from projections.base import BatchContext, Change, Projector
from projections.batch import (
    COPY_FIELDS_6,
    COPY_NULL,
    COPY_SIGNATURE,
    COPY_TRAILER,
    columns_of,
    copy_encoded,
    copy_field,
    insert_rows,
)
from projections.columns import RUN_COLUMNS as _RUN_COLUMNS
from projections.text import storable_utf8

if TYPE_CHECKING:
    from domain.envelope import EventEnvelope

#: Terminal status and the error text (if any) each terminal event records.
TERMINAL: dict[type[EventPayload], str] = {
    ev.AgentRunSucceeded: "SUCCEEDED",
    ev.AgentRunFailed: "FAILED",
    ev.AgentRunCancelled: "CANCELLED",
    ev.AgentRunTimedOut: "TIMED_OUT",
}


def run_channel(run_id: object) -> str:
    return f"run:{run_id}"


_LINE_COLUMNS = (
    ("workspace_id", "uuid"),
    ("run_id", "uuid"),
    ("seq", "integer"),
    ("at", "timestamptz"),
    ("stream", "text"),
    ("text", "text"),
)

ATTEMPT_COLUMNS = (
    ("workspace_id", "uuid"),
    ("run_id", "uuid"),
    ("attempt", "integer"),
    ("at", "timestamptz"),
    ("provider", "text"),
    ("model", "text"),
    ("status", "text"),
    ("http_status", "integer"),
    ("error", "text"),
    ("latency_ms", "integer"),
    ("input_tokens", "bigint"),
    ("output_tokens", "bigint"),
    ("provider_cost_micros", "bigint"),
    ("estimated", "boolean"),
)
_OUTPUT_COLUMNS = (("workspace_id", "uuid"), ("run_id", "uuid"), ("output", "text"))


def attempt_row(env: EventEnvelope, event: ev.AgentRunAttemptRecorded) -> tuple[Any, ...]:
    return (
        env.workspace_id, env.originator_id, event.attempt, env.timestamp, event.provider,
        event.model, event.status, event.http_status, event.error, event.latency_ms,
        event.input_tokens, event.output_tokens, event.provider_cost_micros, event.estimated,
    )  # fmt: skip


def output_row(env: EventEnvelope, event: ev.AgentRunOutputRecorded) -> tuple[Any, ...]:
    return (env.workspace_id, env.originator_id, _str(event.output))


# What a batch did to runs requested before it: columns it set (NULL: left alone, except where a
# flag says it was set) and amounts it added.
_UPDATE_RUNS = (
    "UPDATE {rm_runs} AS r SET"
    " status = coalesce(v.status, r.status),"
    " started_at = CASE WHEN v.started THEN v.started_at ELSE r.started_at END,"
    " finished_at = CASE WHEN v.finished THEN v.finished_at ELSE r.finished_at END,"
    " error = CASE WHEN v.finished THEN v.error ELSE r.error END,"
    " provider = CASE WHEN v.called THEN v.provider ELSE r.provider END,"
    " model = CASE WHEN v.called THEN v.model ELSE r.model END,"
    " input_tokens = r.input_tokens + v.input_tokens,"
    " output_tokens = r.output_tokens + v.output_tokens,"
    " provider_cost_micros = r.provider_cost_micros + v.provider_cost_micros,"
    " billed_micros = r.billed_micros + v.billed_micros,"
    " llm_calls = r.llm_calls + v.llm_calls,"
    " log_line_count = r.log_line_count + v.log_lines,"
    " version = v.version"
    " FROM unnest(%s::uuid[], %s::text[], %s::boolean[], %s::timestamptz[], %s::boolean[],"
    " %s::timestamptz[], %s::text[], %s::boolean[], %s::text[], %s::text[], %s::bigint[],"
    " %s::bigint[], %s::bigint[], %s::bigint[], %s::integer[], %s::integer[], %s::bigint[])"
    " AS v(run_id, status, started, started_at, finished, finished_at, error, called, provider,"
    " model, input_tokens, output_tokens, provider_cost_micros, billed_micros, llm_calls,"
    " log_lines, version)"
    " WHERE r.run_id = v.run_id"
)


@dataclass
class _RunFold:
    """What a batch's events do to one run's row, folded in order."""

    requested: list[Any] | None = None
    """The whole row, when the batch holds the request (the run's first event)."""
    status: str | None = None
    started_at: datetime | None = None
    started: bool = False
    finished_at: datetime | None = None
    finished: bool = False
    error: str | None = None
    called: bool = False
    provider: str | None = None
    model: str | None = None
    adds: list[int] = field(default_factory=lambda: [0, 0, 0, 0, 0, 0])
    """input tokens, output tokens, provider cost, billed, LLM calls, log lines."""
    version: int | None = None


class RunsProjector(Projector):
    name: ClassVar[str] = "runs"
    aggregates: ClassVar[frozenset[str]] = frozenset({"AgentRun"})
    tables: ClassVar[tuple[str, ...]] = (
        "rm_runs", "rm_log_lines", "rm_run_attempts", "rm_run_outputs",
    )  # fmt: skip
    handles: ClassVar[frozenset[type[EventPayload]]] = frozenset(
        {
            ev.AgentRunRequested,
            ev.AgentRunStarted,
            ev.AgentRunStepStarted,
            *TERMINAL,
            ev.AgentRunHeartbeat,
            ev.AgentRunReclaimed,
            ev.AgentRunCallStarted,
            ev.AgentRunAttemptRecorded,
            ev.AgentRunOutputRecorded,
            ev.AgentRunLlmCallCompleted,
            ev.AgentRunLogChunkAppended,
        }
    )
    ignores: ClassVar[frozenset[type[EventPayload]]] = events_of(
        "ApiKey",
        "Card",
        "EmailClaim",
        "Invitation",
        "Invoice",
        "MonthlySpend",
        "OidcLink",
        "Project",
        "Session",
        "UsageCharge",
        "User",
        "Workspace",
    )
    #: Tables the projector only ever inserts into, new rows only: a rebuild builds their keys
    #: after loading them (see :mod:`projections.rebuild`).
    insert_only: ClassVar[frozenset[str]] = frozenset(
        {"rm_log_lines", "rm_run_attempts", "rm_run_outputs"}
    )

    # -- the batch path ----------------------------------------------------------------------------

    def apply_batch(self, ctx: BatchContext, envelopes: Sequence[EventEnvelope]) -> None:
        """A batch's runs and lines in a few statements, the same rows however it is cut.

        Each run's events are folded in order: a run requested in this batch is inserted whole;
        the others get one update that sets what the batch set and adds what it added. Every
        log line of the batch goes in with one statement.
        """
        folds: dict[UUID, _RunFold] = {}
        attempts: list[tuple[Any, ...]] = []
        outputs: list[tuple[Any, ...]] = []
        lines: list[tuple[Any, ...]] = []
        chunks: list[tuple[UUID | None, UUID, list[dict[str, Any]]]] = []
        for env in envelopes:
            event = env.event
            if type(event) not in self.handles:
                continue
            run = folds.get(env.originator_id)
            if run is None:
                run = folds[env.originator_id] = _RunFold()
            version = env.originator_version
            if isinstance(event, ev.AgentRunLogChunkAppended):
                ws, run_id = env.workspace_id, env.originator_id
                if ctx.copy and ctx.changes is None:
                    # A rebuild: the chunk's lines are encoded for COPY straight from the payload.
                    chunks.append((ws, run_id, event.lines))
                    run.adds[5] += len(event.lines)
                elif ctx.changes is None:
                    added = len(lines)
                    lines.extend(
                        (ws, run_id, int(line["seq"]), line["at"], line["stream"], _str(t))
                        if type(t := line["text"]) is not str
                        else (ws, run_id, int(line["seq"]), line["at"], line["stream"], t)
                        for line in event.lines
                    )
                    run.adds[5] += len(lines) - added
                else:
                    stored = [storable_line(line) for line in event.lines]
                    lines.extend(
                        (ws, run_id, line["seq"], line["at"], line["stream"], line["text"])
                        for line in stored
                    )
                    run.adds[5] += len(stored)
                    lines_changed(env, ctx.changes, stored)
            elif isinstance(event, ev.AgentRunLlmCallCompleted):
                run.called, run.provider, run.model = True, event.provider, event.model
                adds = run.adds
                adds[0] += event.input_tokens
                adds[1] += event.output_tokens
                adds[2] += event.provider_cost_micros
                adds[3] += event.billed_micros
                adds[4] += 1
            elif isinstance(
                event,
                ev.AgentRunStepStarted
                | ev.AgentRunHeartbeat
                | ev.AgentRunReclaimed
                | ev.AgentRunCallStarted,
            ):
                pass
            elif isinstance(event, ev.AgentRunAttemptRecorded):
                attempts.append(attempt_row(env, event))
            elif isinstance(event, ev.AgentRunOutputRecorded):
                outputs.append(output_row(env, event))
            elif isinstance(event, ev.AgentRunRequested):
                run.requested = [
                    _text(env.workspace_id),
                    str(env.originator_id),
                    event.project_id,
                    event.card_id,
                    event.agent,
                    "QUEUED",
                    event.provider,
                    event.model,
                    event.max_cost_micros,
                    env.timestamp,
                ]
                run.status = "QUEUED"
                if ctx.changes is not None:
                    status_changed(env, ctx.changes, "QUEUED")
            elif isinstance(event, ev.AgentRunStarted):
                run.status, run.started, run.started_at = "RUNNING", True, env.timestamp
                if ctx.changes is not None:
                    status_changed(env, ctx.changes, "RUNNING")
            else:
                status = TERMINAL[type(event)]
                run.status, run.finished, run.finished_at = status, True, env.timestamp
                run.error = terminal_error(event)
                if ctx.changes is not None:
                    status_changed(env, ctx.changes, status)
            run.version = version
        inserts: list[list[Any]] = []
        updates: list[tuple[Any, ...]] = []
        for key, run in folds.items():
            if run.version is None:
                continue
            if run.requested is not None:
                (ws, rid, project, card, agent, _, provider, model, budget, at) = run.requested
                if run.called:
                    provider, model = run.provider, run.model
                inserts.append(
                    [
                        ws,
                        rid,
                        project,
                        card,
                        agent,
                        run.status,
                        provider,
                        model,
                        budget,
                        *run.adds[:5],
                        at,
                        run.started_at,
                        run.finished_at,
                        run.error,
                        run.adds[5],
                        run.version,
                    ]
                )
            else:
                updates.append(
                    (
                        str(key),
                        run.status,
                        run.started,
                        run.started_at,
                        run.finished,
                        run.finished_at,
                        run.error,
                        run.called,
                        run.provider,
                        run.model,
                        *run.adds,
                        run.version,
                    )
                )
        insert_rows(ctx, "rm_runs", _RUN_COLUMNS, inserts)
        if updates:
            updates.sort(key=lambda row: row[0])
            ctx.cur.execute(ctx.tables.q(_UPDATE_RUNS), columns_of(updates, 17))
        if chunks:
            try:
                encoded = _encode_chunks(chunks)
            except (TypeError, ValueError, KeyError, OverflowError, struct.error):
                encoded = None  # not the shape the encoder expects: the general path decides
            if encoded is not None:
                copy_encoded(ctx, "rm_log_lines", _LINE_COLUMNS, encoded)
            else:
                lines.extend(
                    (
                        ws,
                        run_id,
                        int(line["seq"]),
                        line["at"],
                        line["stream"],
                        _str(line["text"]),
                    )
                    for ws, run_id, chunk in chunks
                    for line in chunk
                )
        insert_rows(ctx, "rm_log_lines", _LINE_COLUMNS, lines)
        insert_rows(ctx, "rm_run_attempts", ATTEMPT_COLUMNS, attempts)
        insert_rows(ctx, "rm_run_outputs", _OUTPUT_COLUMNS, outputs)


def status_changed(env: EventEnvelope, changes: list[Change], status: str) -> None:
    """The run's new status, for the run's subscribers."""
    changes.append(
        Change(
            run_channel(env.originator_id),
            {
                "kind": "status",
                "runId": str(env.originator_id),
                "status": status,
                "position": env.position,
            },
        )
    )


LIVE_LINES_MOST_TEXT = 64 * 1024
"""The most UTF-8 bytes of log text one live message carries. A larger chunk (up to 10,000
lines of 16 KiB) is announced as stored, and its subscribers read it from the read model: sent
whole it was one message that size through Redis pub/sub, and each subscriber's queue could hold
a thousand of them in the API's memory."""


def lines_changed(env: EventEnvelope, changes: list[Change], lines: list[dict[str, Any]]) -> None:
    """A chunk's lines (as stored), for the run's subscribers; past
    :data:`LIVE_LINES_MOST_TEXT`, only up to which line they are stored."""
    payload: dict[str, Any] = {"kind": "lines", "runId": str(env.originator_id)}
    if _small(lines):
        payload["lines"] = lines
    else:
        payload["kind"], payload["lastSeq"] = "lines_stored", lines[-1]["seq"]
    payload["position"] = env.position
    changes.append(Change(run_channel(env.originator_id), payload))


def _small(lines: list[dict[str, Any]]) -> bool:
    """Whether the lines' text is within :data:`LIVE_LINES_MOST_TEXT`, encoded only when its
    length in characters (1 to 4 bytes each) cannot tell."""
    characters = sum(len(line["text"]) for line in lines)
    if characters > LIVE_LINES_MOST_TEXT or 4 * characters <= LIVE_LINES_MOST_TEXT:
        return characters <= LIVE_LINES_MOST_TEXT
    encoded = sum(len(line["text"].encode("utf-8", "surrogatepass")) for line in lines)
    return encoded <= LIVE_LINES_MOST_TEXT


def _encode_chunks(chunks: list[tuple[UUID | None, UUID, list[dict[str, Any]]]]) -> bytes:
    """The lines of log chunks as one binary COPY stream for ``rm_log_lines`` (the rows the
    fold inserts otherwise, text as :mod:`projections.text` stores it). A
    chunk's ids are encoded once for all its lines; raises on any value of another shape."""
    out = bytearray(COPY_SIGNATURE)
    times: dict[str, bytes] = {}
    for workspace_id, run_id, lines in chunks:
        prefix = (
            COPY_FIELDS_6
            + (COPY_NULL if workspace_id is None else copy_field("uuid", workspace_id))
            + copy_field("uuid", run_id)
        )
        for line in lines:
            seq, at, stream, text = line["seq"], line["at"], line["stream"], line["text"]
            if type(seq) is not int or type(stream) is not str or type(text) is not str:
                raise TypeError("log line of an unexpected shape")
            moment = times.get(at)
            if moment is None:
                moment = times[at] = copy_field("timestamptz", at)
            stream_bytes = stream.encode() if "\x00" not in stream else storable_utf8(stream)
            text_bytes = text.encode() if "\x00" not in text else storable_utf8(text)
            out += prefix
            out += copy_field("integer", seq)
            out += moment
            out += _I32(len(stream_bytes))
            out += stream_bytes
            out += _I32(len(text_bytes))
            out += text_bytes
    out += COPY_TRAILER
    return bytes(out)


_I32 = struct.Struct("!i").pack


def _text(value: object) -> str | None:
    return None if value is None else str(value)


def terminal_error(event: EventPayload) -> str | None:
    """The error text the run's aggregate keeps for a terminal event (None on success)."""
    if isinstance(event, ev.AgentRunFailed):
        return _str(event.error)
    if isinstance(event, ev.AgentRunCancelled):
        return _str(event.reason)
    if isinstance(event, ev.AgentRunTimedOut):
        return f"timed out after {event.after_seconds}s"
    return None


def storable_line(line: dict[str, Any]) -> dict[str, Any]:
    return {
        "seq": int(line["seq"]),
        "at": line["at"],
        "stream": line["stream"],
        "text": _str(line["text"]),
    }


def _str(value: object) -> str:
    """``value`` as the text column holds it (NUL and the like are replaced where the runner
    writes, see :mod:`projections.text`)."""
    return value if type(value) is str else str(value)
