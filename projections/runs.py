"""The agent-run read model: one summary row per run and every log line it wrote.

The summary follows the run's lifecycle (QUEUED → RUNNING → a terminal status) and adds up its
LLM calls; the lines are stored one row each so that a run's log can be paged by sequence number
and searched by text. A chunk can hold 10,000 lines, so its lines go in with one statement.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from projections.base import Change, Projector, Tables, on

if TYPE_CHECKING:
    from psycopg import Cursor
    from psycopg.rows import DictRow

    from streams.envelope import EventEnvelope

#: Terminal status and the error text (if any) each terminal event records.
_TERMINAL: dict[str, str] = {
    "AgentRun.Succeeded": "SUCCEEDED",
    "AgentRun.Failed": "FAILED",
    "AgentRun.Cancelled": "CANCELLED",
    "AgentRun.TimedOut": "TIMED_OUT",
}


def run_channel(run_id: object) -> str:
    return f"run:{run_id}"


class RunsProjector(Projector):
    name: ClassVar[str] = "runs"
    aggregates: ClassVar[frozenset[str]] = frozenset({"AgentRun"})
    tables: ClassVar[tuple[str, ...]] = ("rm_runs", "rm_log_lines")

    # -- lifecycle -------------------------------------------------------------------------------

    @on("AgentRun.Requested")
    def _requested(
        self, cur: Cursor[DictRow], env: EventEnvelope, t: Tables, changes: list[Change]
    ) -> None:
        p = env.payload
        cur.execute(
            t.q(
                "INSERT INTO {rm_runs} (workspace_id, run_id, project_id, card_id, agent, status,"
                " provider, model, max_cost_micros, requested_at, version)"
                " VALUES (%s, %s, %s, %s, %s, 'QUEUED', %s, %s, %s, %s, %s)"
            ),
            (
                env.workspace_id,
                env.originator_id,
                p["project_id"],
                p["card_id"],
                p["agent"],
                p["provider"],
                p["model"],
                p["max_cost_micros"],
                env.timestamp,
                env.originator_version,
            ),
        )
        self._status_changed(env, changes, "QUEUED")

    @on("AgentRun.Started")
    def _started(
        self, cur: Cursor[DictRow], env: EventEnvelope, t: Tables, changes: list[Change]
    ) -> None:
        cur.execute(
            t.q(
                "UPDATE {rm_runs} SET status = 'RUNNING', started_at = %s, version = %s"
                " WHERE run_id = %s"
            ),
            (env.timestamp, env.originator_version, env.originator_id),
        )
        self._status_changed(env, changes, "RUNNING")

    @on("AgentRun.StepStarted")
    def _step_started(
        self, cur: Cursor[DictRow], env: EventEnvelope, t: Tables, changes: list[Change]
    ) -> None:
        cur.execute(
            t.q("UPDATE {rm_runs} SET version = %s WHERE run_id = %s"),
            (env.originator_version, env.originator_id),
        )

    @on(*_TERMINAL)
    def _finished(
        self, cur: Cursor[DictRow], env: EventEnvelope, t: Tables, changes: list[Change]
    ) -> None:
        status = _TERMINAL[env.type]
        cur.execute(
            t.q(
                "UPDATE {rm_runs} SET status = %s, finished_at = %s, error = %s, version = %s"
                " WHERE run_id = %s"
            ),
            (status, env.timestamp, _error(env), env.originator_version, env.originator_id),
        )
        self._status_changed(env, changes, status)

    # -- what the run did ------------------------------------------------------------------------

    @on("AgentRun.LlmCallCompleted")
    def _llm_call(
        self, cur: Cursor[DictRow], env: EventEnvelope, t: Tables, changes: list[Change]
    ) -> None:
        p = env.payload
        cur.execute(
            t.q(
                "UPDATE {rm_runs} SET provider = %s, model = %s,"
                " input_tokens = input_tokens + %s, output_tokens = output_tokens + %s,"
                " provider_cost_micros = provider_cost_micros + %s,"
                " billed_micros = billed_micros + %s, llm_calls = llm_calls + 1, version = %s"
                " WHERE run_id = %s"
            ),
            (
                p["provider"],
                p["model"],
                p["input_tokens"],
                p["output_tokens"],
                p["provider_cost_micros"],
                p["billed_micros"],
                env.originator_version,
                env.originator_id,
            ),
        )

    @on("AgentRun.LogChunkAppended")
    def _log_chunk(
        self, cur: Cursor[DictRow], env: EventEnvelope, t: Tables, changes: list[Change]
    ) -> None:
        lines = [_storable(line) for line in env.payload["lines"]]
        # One statement for the whole chunk (COPY would be faster but refuses tables with row-level
        # security); every line is new because the runner applies each chunk exactly once.
        cur.execute(
            t.q(
                "INSERT INTO {rm_log_lines} (workspace_id, run_id, seq, at, stream, text)"
                " SELECT %s, %s, l.seq, l.at, l.stream, l.text"
                " FROM unnest(%s::integer[], %s::timestamptz[], %s::text[], %s::text[])"
                " AS l(seq, at, stream, text)"
            ),
            (
                env.workspace_id,
                env.originator_id,
                [line["seq"] for line in lines],
                [line["at"] for line in lines],
                [line["stream"] for line in lines],
                [line["text"] for line in lines],
            ),
        )
        cur.execute(
            t.q(
                "UPDATE {rm_runs} SET log_line_count = log_line_count + %s, version = %s"
                " WHERE run_id = %s"
            ),
            (len(lines), env.originator_version, env.originator_id),
        )
        changes.append(
            Change(
                run_channel(env.originator_id),
                {
                    "kind": "lines",
                    "runId": str(env.originator_id),
                    "lines": lines,
                    "position": env.position,
                },
            )
        )

    # -- helpers ---------------------------------------------------------------------------------

    @staticmethod
    def _status_changed(env: EventEnvelope, changes: list[Change], status: str) -> None:
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


def _error(env: EventEnvelope) -> str | None:
    """The error text the run's aggregate keeps for a terminal event (None on success)."""
    p = env.payload
    if env.type == "AgentRun.Failed":
        return _pg_text(p["error"])
    if env.type == "AgentRun.Cancelled":
        return _pg_text(p["reason"])
    if env.type == "AgentRun.TimedOut":
        return f"timed out after {p['after_seconds']}s"
    return None


def _storable(line: dict[str, Any]) -> dict[str, Any]:
    return {
        "seq": int(line["seq"]),
        "at": line["at"],
        "stream": line["stream"],
        "text": _pg_text(line["text"]),
    }


def _pg_text(value: object) -> str:
    """``value`` as Postgres ``text`` can hold it: that type refuses NUL characters.

    The event keeps the original; only the read model's copy is changed, so one stray byte in a
    tool's output cannot wedge the projector on an event it can never apply.
    """
    text = str(value)
    return text.replace("\x00", "\ufffd") if "\x00" in text else text
