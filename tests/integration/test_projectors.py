"""The runs, billing and activity projectors, one event type at a time, against real Postgres.

Every test runs real commands through the write side, reads the resulting envelopes back from
the event log and applies them with the exactly-once runner as the projector role, then checks
the rows (and the live-update notifications) the event left behind.

The tests share one migrated database and keep apart by working in a workspace each (and by
looking only at the notifications of their own runs).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, date, datetime
from typing import TYPE_CHECKING, Any
from uuid import UUID

import pytest
from read_side_helpers import (
    ReadSide,
    World,
    append_log,
    correct,
    create_card,
    llm_call,
    request_run,
    running_run,
)

from commands import models as m
from domain.agent_run import MAX_LOG_LINES_PER_CHUNK
from projections.activity import MAX_SUMMARY_LENGTH, ActivityProjector
from projections.base import Change
from projections.billing import BillingProjector
from projections.runs import RunsProjector

if TYPE_CHECKING:
    from projections.runner import BatchOutcome


@pytest.fixture
def side(shared_side: ReadSide) -> ReadSide:
    return shared_side


def _run(side: ReadSide, run_id: UUID, columns: str = "*") -> dict[str, Any]:
    """``columns`` of the run's ``rm_runs`` row."""
    return side.row(f"SELECT {columns} FROM rm_runs WHERE run_id = %s", (run_id,))


def _run_changes(outcome: BatchOutcome, run_id: UUID) -> list[Change]:
    return [change for change in outcome.changes if change.channel == f"run:{run_id}"]


def _status_change(run_id: UUID, status: str, position: int) -> Change:
    return Change(
        f"run:{run_id}",
        {"kind": "status", "runId": str(run_id), "status": status, "position": position},
    )


# == runs ==========================================================================================


class TestRunsProjector:
    def test_requested_run_is_queued_with_its_policy_and_budget(
        self, side: ReadSide, world: World
    ) -> None:
        card_id = create_card(side, world)
        run_id = request_run(
            side, world, card_id, agent="coder", provider="openai", model="gpt-4o-mini",
            max_cost="2.50",
        )  # fmt: skip
        outcome = side.project(RunsProjector())

        requested = side.envelope_at(side.position_of("AgentRun.Requested"))
        run = _run(side, run_id)
        assert run == {
            "workspace_id": world.workspace_id,
            "run_id": run_id,
            "project_id": world.project_id,
            "card_id": card_id,
            "agent": "coder",
            "status": "QUEUED",
            "provider": "openai",
            "model": "gpt-4o-mini",
            "max_cost_micros": 2_500_000,
            "input_tokens": 0,
            "output_tokens": 0,
            "provider_cost_micros": 0,
            "billed_micros": 0,
            "llm_calls": 0,
            "requested_at": requested.timestamp,
            "started_at": None,
            "finished_at": None,
            "error": None,
            "log_line_count": 0,
            "version": 1,
        }
        assert _run_changes(outcome, run_id) == [
            _status_change(run_id, "QUEUED", requested.position)
        ]

    def test_started_run_is_running_since_the_event_time(
        self, side: ReadSide, world: World
    ) -> None:
        run_id = running_run(side, world)
        outcome = side.project(RunsProjector())

        started = side.envelope_at(side.position_of("AgentRun.Started"))
        run = _run(side, run_id, "status, started_at, version")
        assert run == {"status": "RUNNING", "started_at": started.timestamp, "version": 2}
        assert _run_changes(outcome, run_id)[-1] == _status_change(
            run_id, "RUNNING", started.position
        )

    def test_step_started_only_advances_the_version(self, side: ReadSide, world: World) -> None:
        run_id = running_run(side, world)
        side.project(RunsProjector())
        before = _run(side, run_id)

        side.app.start_run_step(
            m.StartRunStep(run_id=run_id, step=1, name="plan"), world.orchestrator
        )
        outcome = side.project(RunsProjector())

        after = _run(side, run_id)
        assert after == {**before, "version": 3}
        assert _run_changes(outcome, run_id) == []

    def test_log_chunks_store_every_line_in_sequence_and_count_them(
        self, side: ReadSide, world: World
    ) -> None:
        run_id = running_run(side, world)
        at = datetime(2025, 3, 14, 9, 26, 53, 589793, tzinfo=UTC)
        append_log(side, world, run_id, ["cloning repo", "installing deps"], at=at)
        append_log(side, world, run_id, ["warning: deprecated"], stream="stderr", at=at)
        outcome = side.project(RunsProjector())

        lines = side.rows(
            "SELECT workspace_id, seq, at, stream, text FROM rm_log_lines WHERE run_id = %s"
            " ORDER BY seq",
            (run_id,),
        )
        assert lines == [
            {"workspace_id": world.workspace_id, "seq": 1, "at": at, "stream": "stdout",
             "text": "cloning repo"},
            {"workspace_id": world.workspace_id, "seq": 2, "at": at, "stream": "stdout",
             "text": "installing deps"},
            {"workspace_id": world.workspace_id, "seq": 3, "at": at, "stream": "stderr",
             "text": "warning: deprecated"},
        ]  # fmt: skip
        run = _run(side, run_id, "log_line_count, version")
        assert run == {"log_line_count": 3, "version": 4}

        chunks = [c for c in _run_changes(outcome, run_id) if c.payload["kind"] == "lines"]
        last_chunk = side.position_of("AgentRun.LogChunkAppended")
        assert chunks[-1] == Change(
            f"run:{run_id}",
            {
                "kind": "lines",
                "runId": str(run_id),
                "lines": [
                    {"seq": 3, "at": at.isoformat(), "stream": "stderr",
                     "text": "warning: deprecated"},
                ],
                "position": last_chunk,
            },
        )  # fmt: skip
        assert [line["seq"] for c in chunks for line in c.payload["lines"]] == [1, 2, 3]

    def test_a_full_chunk_of_ten_thousand_lines_is_stored_whole(
        self, side: ReadSide, world: World
    ) -> None:
        run_id = running_run(side, world)
        texts = [f"step {i}: compiled module_{i % 97}.py" for i in range(MAX_LOG_LINES_PER_CHUNK)]
        append_log(side, world, run_id, texts)
        side.project(RunsProjector())

        stored = side.row(
            "SELECT count(*) AS lines, min(seq) AS first, max(seq) AS last,"
            " count(DISTINCT text) AS texts FROM rm_log_lines WHERE run_id = %s",
            (run_id,),
        )
        assert stored == {"lines": 10_000, "first": 1, "last": 10_000, "texts": 10_000}
        run = _run(side, run_id, "log_line_count")
        assert run["log_line_count"] == 10_000

    def test_nul_characters_from_tool_output_do_not_wedge_the_projector(
        self, side: ReadSide, world: World
    ) -> None:
        run_id = running_run(side, world)
        append_log(side, world, run_id, ["binary\x00garbage"])
        side.app.finish_run(
            m.FinishRun(run_id=run_id, outcome="FAILED", error="exit\x00 1"), world.orchestrator
        )
        outcome = side.project(RunsProjector())

        line = side.row("SELECT text FROM rm_log_lines WHERE run_id = %s", (run_id,))
        assert line["text"] == "binary\ufffdgarbage"
        chunk = _run_changes(outcome, run_id)[-2]
        assert chunk.payload["lines"][0]["text"] == "binary\ufffdgarbage"
        run = _run(side, run_id, "status, error")
        assert run == {"status": "FAILED", "error": "exit\ufffd 1"}

    def test_llm_calls_add_up_tokens_cost_and_billing_on_the_run(
        self, side: ReadSide, world: World
    ) -> None:
        run_id = running_run(side, world, provider="openai", model="gpt-4o")
        first = llm_call(side, world, run_id, "call-1", cost=1_234, model="sim-small",
                         input_tokens=100, output_tokens=40)  # fmt: skip
        second = llm_call(side, world, run_id, "call-2", cost=5_001, provider="anthropic",
                          model="claude-x", input_tokens=7, output_tokens=3)  # fmt: skip
        side.project(RunsProjector())

        run = _run(
            side,
            run_id,
            "provider, model, input_tokens, output_tokens, provider_cost_micros, billed_micros,"
            " llm_calls, version",
        )
        assert run == {
            "provider": "anthropic",
            "model": "claude-x",
            "input_tokens": 107,
            "output_tokens": 43,
            "provider_cost_micros": 6_235,
            "billed_micros": first.extra["billed"] + second.extra["billed"],
            "llm_calls": 2,
            "version": 4,
        }
        assert run["billed_micros"] == 5 * 6_235  # the default markup

    @pytest.mark.parametrize(
        ("outcome", "event_type", "status", "error"),
        [
            (m.FinishRun(run_id=UUID(int=0), outcome="SUCCEEDED"),
             "AgentRun.Succeeded", "SUCCEEDED", None),
            (m.FinishRun(run_id=UUID(int=0), outcome="FAILED", error="tests failed"),
             "AgentRun.Failed", "FAILED", "tests failed"),
            (m.FinishRun(run_id=UUID(int=0), outcome="TIMED_OUT", after_seconds=300),
             "AgentRun.TimedOut", "TIMED_OUT", "timed out after 300s"),
            (m.CancelAgentRun(run_id=UUID(int=0), reason="no longer needed"),
             "AgentRun.Cancelled", "CANCELLED", "no longer needed"),
        ],
        ids=["succeeded", "failed", "timed-out", "cancelled"],
    )  # fmt: skip
    def test_a_terminal_event_finishes_the_run(
        self,
        side: ReadSide,
        world: World,
        outcome: m.Command,
        event_type: str,
        status: str,
        error: str | None,
    ) -> None:
        run_id = running_run(side, world)
        command = outcome.model_copy(update={"run_id": run_id})
        if isinstance(command, m.CancelAgentRun):
            side.app.cancel_agent_run(command, world.owner)
        else:
            assert isinstance(command, m.FinishRun)
            side.app.finish_run(command, world.orchestrator)
        changes = _run_changes(side.project(RunsProjector()), run_id)

        finished = side.envelope_at(side.position_of(event_type))
        run = _run(side, run_id, "status, finished_at, error, version")
        assert run == {
            "status": status,
            "finished_at": finished.timestamp,
            "error": error,
            "version": 3,
        }
        assert changes[-1] == _status_change(run_id, status, finished.position)

    def test_a_queued_run_can_be_cancelled_without_ever_starting(
        self, side: ReadSide, world: World
    ) -> None:
        run_id = request_run(side, world, create_card(side, world))
        side.app.cancel_agent_run(m.CancelAgentRun(run_id=run_id), world.owner)
        side.project(RunsProjector())

        run = _run(side, run_id, "status, started_at, finished_at IS NOT NULL AS finished, error")
        assert run == {
            "status": "CANCELLED",
            "started_at": None,
            "finished": True,
            "error": "cancelled by user",
        }


# == billing =======================================================================================

MARCH_14 = datetime(2025, 3, 14, 23, 59, 59, tzinfo=UTC)


def _usage(side: ReadSide, world: World) -> dict[tuple[date, str, str], dict[str, Any]]:
    rows = side.rows(
        "SELECT day, dimension, key, calls, input_tokens, output_tokens, provider_cost_micros,"
        " billed_micros FROM rm_usage_daily WHERE workspace_id = %s",
        (world.workspace_id,),
    )
    return {(row.pop("day"), row.pop("dimension"), row.pop("key")): row for row in rows}


class TestBillingProjector:
    def test_a_charge_is_a_charge_row_a_ledger_entry_and_rollups(
        self, side: ReadSide, world: World
    ) -> None:
        card_id = create_card(side, world)
        run_id = running_run(side, world, card_id)
        call = llm_call(side, world, run_id, "call-1", cost=1_234, at=MARCH_14,
                        provider="openai", model="gpt-4o-mini", input_tokens=900,
                        output_tokens=100)  # fmt: skip
        charge_id = UUID(call.extra["charge_id"])
        side.project(BillingProjector())

        charge = side.row("SELECT * FROM rm_charges WHERE charge_id = %s", (charge_id,))
        assert charge == {
            "workspace_id": world.workspace_id,
            "charge_id": charge_id,
            "project_id": world.project_id,
            "card_id": card_id,
            "run_id": run_id,
            "call_id": "call-1",
            "provider": "openai",
            "model": "gpt-4o-mini",
            "input_tokens": 900,
            "output_tokens": 100,
            "provider_cost_micros": 1_234,
            "markup": "5",
            "billed_micros": 6_170,
            "credited_micros": 0,
            "price_table_version": "2025-01",
            "month": "2025-03",
            "occurred_at": MARCH_14,
        }
        entry = side.row("SELECT * FROM rm_ledger_entries WHERE charge_id = %s", (charge_id,))
        assert entry == {
            "workspace_id": world.workspace_id,
            "entry_position": side.position_of("UsageCharge.Charged"),
            "charge_id": charge_id,
            "kind": "CHARGE",
            "project_id": world.project_id,
            "card_id": card_id,
            "run_id": run_id,
            "provider": "openai",
            "model": "gpt-4o-mini",
            "input_tokens": 900,
            "output_tokens": 100,
            "provider_cost_micros": 1_234,
            "billed_micros": 6_170,
            "month": "2025-03",
            "day": date(2025, 3, 14),
            "at": MARCH_14,
        }
        usage = {"calls": 1, "input_tokens": 900, "output_tokens": 100,
                 "provider_cost_micros": 1_234, "billed_micros": 6_170}  # fmt: skip
        day = date(2025, 3, 14)
        assert _usage(side, world) == {
            (day, "PROJECT", str(world.project_id)): usage,
            (day, "CARD", str(card_id)): usage,
            (day, "AGENT_RUN", str(run_id)): usage,
            (day, "PROVIDER", "openai"): usage,
            (day, "MODEL", "gpt-4o-mini"): usage,
            (day, "DAY", "2025-03-14"): usage,
        }
        assert side.rows(
            "SELECT month, project_id, billed_exact_micros FROM rm_statement_lines"
            " WHERE workspace_id = %s",
            (world.workspace_id,),
        ) == [{"month": "2025-03", "project_id": world.project_id, "billed_exact_micros": 6_170}]
        assert side.rows(
            "SELECT month, billed_micros FROM rm_monthly_spend WHERE workspace_id = %s",
            (world.workspace_id,),
        ) == [{"month": "2025-03", "billed_micros": 6_170}]

    def test_charges_of_one_day_and_month_accumulate_in_the_rollups(
        self, side: ReadSide, world: World
    ) -> None:
        run_id = running_run(side, world)
        llm_call(side, world, run_id, "call-1", cost=1_000, at=MARCH_14, model="a")
        llm_call(side, world, run_id, "call-2", cost=333, at=MARCH_14, model="b")
        side.project(BillingProjector())

        usage = _usage(side, world)
        day = date(2025, 3, 14)
        assert usage[(day, "AGENT_RUN", str(run_id))] == {
            "calls": 2, "input_tokens": 200, "output_tokens": 100,
            "provider_cost_micros": 1_333, "billed_micros": 6_665,
        }  # fmt: skip
        assert usage[(day, "MODEL", "a")]["billed_micros"] == 5_000
        assert usage[(day, "MODEL", "b")]["billed_micros"] == 1_665
        assert side.row(
            "SELECT billed_exact_micros FROM rm_statement_lines WHERE workspace_id = %s",
            (world.workspace_id,),
        ) == {"billed_exact_micros": 6_665}

    def test_a_credit_is_a_negative_entry_filed_under_the_charge(
        self, side: ReadSide, world: World
    ) -> None:
        card_id = create_card(side, world)
        run_id = running_run(side, world, card_id)
        call = llm_call(side, world, run_id, "call-1", cost=2_000_000, provider="openai",
                        model="gpt-4o")  # fmt: skip
        charge_id = call.extra["charge_id"]
        correct(side, world, charge_id, "1.25")
        side.project(BillingProjector())

        credited = side.envelope_at(side.position_of("UsageCharge.Credited"))
        charged = side.envelope_at(side.position_of("UsageCharge.Charged"))
        day = credited.timestamp.astimezone(UTC).date()
        month = credited.payload["month"]
        assert side.row(
            "SELECT billed_micros, credited_micros FROM rm_charges WHERE charge_id = %s",
            (charge_id,),
        ) == {"billed_micros": 10_000_000, "credited_micros": 1_250_000}
        entry = side.row(
            "SELECT * FROM rm_ledger_entries WHERE entry_position = %s", (credited.position,)
        )
        assert entry == {
            "workspace_id": world.workspace_id,
            "entry_position": credited.position,
            "charge_id": UUID(charge_id),
            "kind": "CREDIT",
            "project_id": world.project_id,
            "card_id": card_id,
            "run_id": run_id,
            "provider": "openai",
            "model": "gpt-4o",
            "input_tokens": 0,
            "output_tokens": 0,
            "provider_cost_micros": 0,
            "billed_micros": -1_250_000,
            "month": month,
            "day": day,
            "at": credited.timestamp,
        }
        # Both events happen today, so the credit lands in the charge's own rollup rows.
        assert charged.timestamp.astimezone(UTC).date() == day
        assert _usage(side, world)[(day, "CARD", str(card_id))] == {
            "calls": 1,
            "input_tokens": 100,
            "output_tokens": 50,
            "provider_cost_micros": 2_000_000,
            "billed_micros": 8_750_000,
        }
        assert side.row(
            "SELECT billed_exact_micros FROM rm_statement_lines WHERE workspace_id = %s",
            (world.workspace_id,),
        ) == {"billed_exact_micros": 8_750_000}
        assert side.row(
            "SELECT billed_micros FROM rm_monthly_spend WHERE workspace_id = %s",
            (world.workspace_id,),
        ) == {"billed_micros": 8_750_000}

    def test_a_refund_is_filed_on_its_own_day_and_month(self, side: ReadSide, world: World) -> None:
        run_id = running_run(side, world)
        call = llm_call(side, world, run_id, "call-1", cost=100_000, at=MARCH_14, model="m")
        correct(side, world, call.extra["charge_id"], "0.2", refund=True)
        correct(side, world, call.extra["charge_id"], "0.05", refund=True)
        side.project(BillingProjector())

        refunded = side.envelope_at(side.position_of("UsageCharge.Refunded"))
        day = refunded.timestamp.astimezone(UTC).date()
        month = refunded.payload["month"]
        assert month != "2025-03"
        entries = side.rows(
            "SELECT kind, billed_micros, month FROM rm_ledger_entries WHERE workspace_id = %s"
            " ORDER BY entry_position",
            (world.workspace_id,),
        )
        assert entries == [
            {"kind": "CHARGE", "billed_micros": 500_000, "month": "2025-03"},
            {"kind": "REFUND", "billed_micros": -200_000, "month": month},
            {"kind": "REFUND", "billed_micros": -50_000, "month": month},
        ]
        usage = _usage(side, world)
        assert usage[(date(2025, 3, 14), "MODEL", "m")]["billed_micros"] == 500_000
        assert usage[(day, "MODEL", "m")] == {
            "calls": 0,
            "input_tokens": 0,
            "output_tokens": 0,
            "provider_cost_micros": 0,
            "billed_micros": -250_000,
        }
        assert usage[(day, "DAY", day.isoformat())]["billed_micros"] == -250_000
        spend = side.rows(
            "SELECT month, billed_micros FROM rm_monthly_spend WHERE workspace_id = %s"
            " ORDER BY month",
            (world.workspace_id,),
        )
        assert spend == [
            {"month": "2025-03", "billed_micros": 500_000},
            {"month": month, "billed_micros": -250_000},
        ]
        assert side.row(
            "SELECT credited_micros FROM rm_charges WHERE workspace_id = %s",
            (world.workspace_id,),
        ) == {"credited_micros": 250_000}


# == activity ======================================================================================


# == activity cases ================================================================================

Setup = Callable[[ReadSide, World], object]


def _nothing(side: ReadSide, world: World) -> None:
    return None


def _with_card(change: Callable[[ReadSide, World, UUID], object]) -> Setup:
    def setup(side: ReadSide, world: World) -> None:
        change(side, world, create_card(side, world, "Fix login"))

    return setup


def _with_running_run(change: Callable[[ReadSide, World, UUID], object]) -> Setup:
    def setup(side: ReadSide, world: World) -> None:
        change(side, world, running_run(side, world, create_card(side, world, "Fix login")))

    return setup


def _add_bob(side: ReadSide, world: World) -> None:
    side.app.add_member(
        m.AddMember(workspace_id=world.workspace_id, user_id="bob", role="MEMBER"), world.owner
    )


def _change_bob(side: ReadSide, world: World) -> None:
    _add_bob(side, world)
    side.app.change_role(
        m.ChangeRole(workspace_id=world.workspace_id, user_id="bob", role="ADMIN"), world.owner
    )


def _remove_bob(side: ReadSide, world: World) -> None:
    _add_bob(side, world)
    side.app.remove_member(
        m.RemoveMember(workspace_id=world.workspace_id, user_id="bob"), world.owner
    )


def _project(
    command: Callable[[World], m.Command], handler: str, *, operator: bool = False
) -> Setup:
    """Send the command as the workspace's owner (or as the operator: a plan is theirs)."""

    def setup(side: ReadSide, world: World) -> None:
        getattr(side.app, handler)(command(world), world.operator if operator else world.owner)

    return setup


def _card(handler: str, **fields: Any) -> Setup:
    return _card_steps((handler, fields))


def _then(*steps: Setup) -> Setup:
    def setup(side: ReadSide, world: World) -> None:
        for step in steps:
            step(side, world)

    return setup


def _card_steps(*commands: tuple[str, dict[str, Any]]) -> Setup:
    classes: dict[str, type[Any]] = {
        "update_card": m.UpdateCard,
        "move_card": m.MoveCard,
        "assign_card": m.AssignCard,
        "label_card": m.LabelCard,
        "unlabel_card": m.UnlabelCard,
        "block_card": m.BlockCard,
        "unblock_card": m.UnblockCard,
        "archive_card": m.ArchiveCard,
        "restore_card": m.RestoreCard,
    }

    def change(side: ReadSide, world: World, card_id: UUID) -> None:
        for handler, fields in commands:
            getattr(side.app, handler)(classes[handler](card_id=card_id, **fields), world.owner)

    return _with_card(change)


def _reorder_within_lane(side: ReadSide, world: World) -> None:
    first = create_card(side, world, "first")
    second = create_card(side, world, "second")
    side.app.move_card(
        m.MoveCard(card_id=second, to_lane="Todo", before_card_id=first), world.owner
    )


def _finish(outcome: str, **fields: Any) -> Setup:
    return _with_running_run(
        lambda side, world, run_id: side.app.finish_run(
            m.FinishRun(run_id=run_id, outcome=outcome, **fields),
            world.orchestrator,
        )
    )


def _request(side: ReadSide, world: World) -> None:
    card = create_card(side, world)
    request_run(side, world, card, agent="coder", provider="openai", model="gpt-4o-mini")


ACTIVITY_CASES: list[tuple[str, Setup, str, str, str]] = [
    # (kind, setup, summary, who acted, which ids the item carries)
    ("workspace.created", _nothing, "created workspace 'alice's workspace'", "alice", ""),
    ("workspace.renamed",
     _project(lambda w: m.RenameWorkspace(workspace_id=w.workspace_id, name="Acme"),
              "rename_workspace"),
     "renamed workspace to 'Acme'", "alice", ""),
    ("member.added", _add_bob, "added bob as MEMBER", "alice", ""),
    ("member.role_changed", _change_bob, "changed the role of bob to ADMIN", "alice", ""),
    ("member.removed", _remove_bob, "removed member bob", "alice", ""),
    ("workspace.plan_set",
     _project(lambda w: m.SetPlan(workspace_id=w.workspace_id, markup="3",
                                  billing_increment="0.10"), "set_plan", operator=True),
     "set the plan to markup 3x, billed in increments of $0.100000", "operator", ""),
    ("workspace.spend_limit_set",
     _project(lambda w: m.SetSpendLimit(workspace_id=w.workspace_id, monthly_limit="100"),
              "set_spend_limit"),
     "set the monthly spend limit to $100.000000", "alice", ""),
    ("project.created", _nothing, "created project 'Line' with lanes Todo, Doing, Done",
     "alice", "project"),
    ("project.archived",
     _project(lambda w: m.ArchiveProject(project_id=w.project_id), "archive_project"),
     "archived the project", "alice", "project"),
    ("lane.added",
     _project(lambda w: m.AddLane(project_id=w.project_id, name="QA", wip_limit=2), "add_lane"),
     "added lane 'QA' (WIP 2)", "alice", "project"),
    ("lane.renamed",
     _project(lambda w: m.RenameLane(project_id=w.project_id, lane="Done", name="Shipped"),
              "rename_lane"),
     "renamed lane 'Done' to 'Shipped'", "alice", "project"),
    ("lanes.reordered",
     _project(lambda w: m.ReorderLanes(project_id=w.project_id, order=["Done", "Doing", "Todo"]),
              "reorder_lanes"),
     "reordered lanes: Done, Doing, Todo", "alice", "project"),
    ("lane.removed",
     _project(lambda w: m.RemoveLane(project_id=w.project_id, lane="Done"), "remove_lane"),
     "removed lane 'Done'", "alice", "project"),
    ("lane.wip_limit_set",
     _project(lambda w: m.SetWipLimit(project_id=w.project_id, lane="Todo", wip_limit=7),
              "set_wip_limit"),
     "set the WIP limit of Todo to 7", "alice", "project"),
    ("card.created", _with_card(lambda s, w, c: None), "created card 'Fix login' in Todo",
     "alice", "card+project"),
    ("card.edited", _card("update_card", title="Fix logout"), "edited card 'Fix logout'",
     "alice", "card+project"),
    ("card.moved", _card("move_card", to_lane="Doing"), "moved card from Todo to Doing",
     "alice", "card+project"),
    ("card.assigned", _then(_add_bob, _card("assign_card", assignee="bob")),
     "assigned card to bob",
     "alice", "card+project"),
    ("card.labelled", _card("label_card", label="bug"), "labelled card 'bug'",
     "alice", "card+project"),
    ("card.unlabelled",
     _card_steps(("label_card", {"label": "bug"}), ("unlabel_card", {"label": "bug"})),
     "removed label 'bug' from card", "alice", "card+project"),
    ("card.blocked", _card("block_card", reason="waiting for API keys"),
     "blocked card: waiting for API keys", "alice", "card+project"),
    ("card.unblocked",
     _card_steps(("block_card", {"reason": "keys"}), ("unblock_card", {})),
     "unblocked card", "alice", "card+project"),
    ("card.archived", _card("archive_card"), "archived card", "alice", "card+project"),
    ("card.restored",
     _card_steps(("archive_card", {}), ("restore_card", {"lane": "Doing"})),
     "restored card to Doing", "alice", "card+project"),
    ("run.requested", _request, "requested agent 'coder' on gpt-4o-mini", "alice",
     "card+project"),
    ("run.started", _with_running_run(lambda s, w, r: None), "agent run started on worker-1",
     "orchestrator", "card+project"),
    ("run.succeeded", _finish("SUCCEEDED"), "agent run succeeded", "orchestrator",
     "card+project"),
    ("run.failed", _finish("FAILED", error="tests failed"), "agent run failed: tests failed",
     "orchestrator", "card+project"),
    ("run.timed_out", _finish("TIMED_OUT", after_seconds=300),
     "agent run timed out after 300s", "orchestrator", "card+project"),
    ("run.cancelled",
     _with_running_run(lambda s, w, r: s.app.cancel_agent_run(
         m.CancelAgentRun(run_id=r, reason="superseded"), w.owner)),
     "agent run cancelled: superseded", "alice", "card+project"),
]  # fmt: skip

MORE_SUMMARIES: list[tuple[str, Setup, str]] = [
    ("workspace.spend_limit_set",
     _then(_project(lambda w: m.SetSpendLimit(workspace_id=w.workspace_id, monthly_limit="5"),
                    "set_spend_limit"),
           _project(lambda w: m.SetSpendLimit(workspace_id=w.workspace_id, monthly_limit=None),
                    "set_spend_limit")),
     "removed the monthly spend limit"),
    ("lane.wip_limit_set",
     _project(lambda w: m.SetWipLimit(project_id=w.project_id, lane="Doing", wip_limit=None),
              "set_wip_limit"),
     "removed the WIP limit of Doing"),
    ("lane.added",
     _project(lambda w: m.AddLane(project_id=w.project_id, name="Ideas", index=0), "add_lane"),
     "added lane 'Ideas'"),
    ("card.moved", _reorder_within_lane, "reordered card within Todo"),
    ("card.assigned",
     _then(_add_bob, _card_steps(("assign_card", {"assignee": "bob"}),
                                 ("assign_card", {"assignee": None}))),
     "unassigned card"),
    ("run.requested",
     lambda s, w: request_run(s, w, create_card(s, w), agent="reviewer"),
     "requested agent 'reviewer'"),
]  # fmt: skip


def _newest_item(side: ReadSide, world: World, kind: str) -> dict[str, Any]:
    items = side.rows(
        "SELECT * FROM rm_activity WHERE workspace_id = %s AND kind = %s ORDER BY position DESC",
        (world.workspace_id, kind),
    )
    assert items, f"no {kind} item in the feed"
    return items[0]


class TestActivityProjector:
    @pytest.mark.parametrize(
        ("kind", "setup", "summary", "actor", "ids"),
        ACTIVITY_CASES,
        ids=[case[0] for case in ACTIVITY_CASES],
    )
    def test_each_meaningful_event_becomes_one_feed_item(
        self,
        side: ReadSide,
        world: World,
        kind: str,
        setup: Setup,
        summary: str,
        actor: str,
        ids: str,
    ) -> None:
        setup(side, world)
        side.project(ActivityProjector())

        item = _newest_item(side, world, kind)
        event = side.envelope_at(item["position"])
        assert item["summary"] == summary
        assert item["actor"] == actor == event.metadata["actor"]
        assert item["at"] == event.timestamp
        assert item["subject_id"] == event.originator_id
        card_id = event.originator_id if event.aggregate == "Card" else None
        if event.aggregate == "AgentRun":
            requested = side.position_of("AgentRun.Requested", event.originator_id)
            card_id = UUID(side.envelope_at(requested).payload["card_id"])
        expected = {
            "": (None, None),
            "project": (None, world.project_id),
            "card+project": (card_id, world.project_id),
        }[ids]
        assert (item["card_id"], item["project_id"]) == expected

    @pytest.mark.parametrize(
        ("kind", "setup", "summary"), MORE_SUMMARIES, ids=[case[2] for case in MORE_SUMMARIES]
    )
    def test_summaries_describe_what_the_event_says(
        self, side: ReadSide, world: World, kind: str, setup: Setup, summary: str
    ) -> None:
        setup(side, world)
        side.project(ActivityProjector())

        assert _newest_item(side, world, kind)["summary"] == summary

    def test_log_chunks_steps_llm_calls_and_charges_stay_out_of_the_feed(
        self, side: ReadSide, world: World
    ) -> None:
        run_id = running_run(side, world)
        side.project(ActivityProjector())
        before = side.rows("SELECT position FROM rm_activity ORDER BY position")

        side.app.start_run_step(
            m.StartRunStep(run_id=run_id, step=1, name="plan"), world.orchestrator
        )
        append_log(side, world, run_id, ["hello"])
        call = llm_call(side, world, run_id, "call-1", cost=10)
        correct(side, world, call.extra["charge_id"], "0.00001")
        outcome = side.project(ActivityProjector())

        # step, chunk, call and the month's spend (opened, added, the correction filed):
        # followed, but not shown
        assert outcome.applied == 6
        assert side.rows("SELECT position FROM rm_activity ORDER BY position") == before

    def test_a_long_summary_is_cut_short_on_one_line(self, side: ReadSide, world: World) -> None:
        reason = "line one\n" + "x" * 990
        _card("block_card", reason=reason)(side, world)
        side.project(ActivityProjector())

        summary = _newest_item(side, world, "card.blocked")["summary"]
        assert len(summary) == MAX_SUMMARY_LENGTH
        assert summary.startswith("blocked card: line one xxx")
        assert summary.endswith("…")
        assert "\n" not in summary

    def test_a_nul_character_in_an_error_does_not_wedge_the_feed(
        self, side: ReadSide, world: World
    ) -> None:
        _finish("FAILED", error="segfault\x00")(side, world)
        side.project(ActivityProjector())

        assert _newest_item(side, world, "run.failed")["summary"] == (
            "agent run failed: segfault\ufffd"
        )

    def test_items_of_another_workspace_are_kept_apart(self, side: ReadSide, world: World) -> None:
        other = side.new_world(owner="carol")
        create_card(side, other, "Theirs")
        side.project(ActivityProjector())

        kinds = side.rows(
            "SELECT workspace_id, kind, actor FROM rm_activity WHERE workspace_id = %s"
            " ORDER BY position",
            (other.workspace_id,),
        )
        assert [(k["kind"], k["actor"]) for k in kinds] == [
            ("workspace.created", "carol"),
            ("project.created", "carol"),
            ("card.created", "carol"),
        ]
