"""Read-side queries (``projections.queries``) over read models built from real commands.

Queries run as the API role inside a transaction scoped to one workspace, as the API runs them,
so row-level security is part of every test. The tests share one database and keep apart by
using a workspace each.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import TYPE_CHECKING
from uuid import UUID, uuid4

import pytest
from read_side_helpers import (
    ReadSide,
    World,
    api_connection,
    append_log,
    correct,
    create_card,
    llm_call,
    running_run,
)

from commands import models as m
from domain.errors import NotFound, ValidationFailed
from domain.usage import month_of
from projections import queries
from projections.billing import UsageDimension
from projections.registry import all_projectors

if TYPE_CHECKING:
    pass

MARCH = datetime(2025, 3, 1, tzinfo=UTC)


@pytest.fixture
def side(shared_side: ReadSide) -> ReadSide:
    return shared_side


def project_all(side: ReadSide) -> None:
    for projector in all_projectors():
        side.project(projector)


# == usage =========================================================================================


@pytest.fixture
def usage_world(side: ReadSide, world: World) -> dict[str, UUID]:
    """Charges on March 1st, 2nd and 31st and April 1st, over two runs of two cards."""
    first_card = create_card(side, world, "first")
    second_card = create_card(side, world, "second")
    first_run = running_run(side, world, first_card)
    second_run = running_run(side, world, second_card)
    llm_call(side, world, first_run, "a", cost=1_000, at=MARCH, provider="openai", model="gpt",
             input_tokens=10, output_tokens=1)  # fmt: skip
    llm_call(side, world, first_run, "b", cost=2_000, at=MARCH + timedelta(days=1, hours=23),
             provider="openai", model="gpt-mini", input_tokens=20, output_tokens=2)  # fmt: skip
    llm_call(side, world, second_run, "c", cost=4_000, at=MARCH + timedelta(days=30, hours=12),
             provider="anthropic", model="claude", input_tokens=40, output_tokens=4)  # fmt: skip
    llm_call(side, world, second_run, "d", cost=8_000, at=MARCH + timedelta(days=31),
             provider="anthropic", model="claude", input_tokens=80, output_tokens=8)  # fmt: skip
    project_all(side)
    return {"first_card": first_card, "second_card": second_card, "first_run": first_run,
            "second_run": second_run}  # fmt: skip


def _usage(
    side: ReadSide, world: World, group_by: UsageDimension | str, start: datetime, end: datetime
) -> list[queries.UsageRow]:
    with api_connection(side.database_url, world.workspace_id) as conn:
        return queries.usage(conn, world.workspace_id, from_=start, to=end, group_by=group_by)


class TestUsage:
    def test_grouped_by_day_over_whole_days_counts_each_day_in_the_window(
        self, side: ReadSide, world: World, usage_world: dict[str, UUID]
    ) -> None:
        rows = _usage(side, world, UsageDimension.DAY, MARCH, MARCH + timedelta(days=31))

        assert rows == [
            queries.UsageRow(key="2025-03-01", calls=1, input_tokens=10, output_tokens=1,
                             provider_cost_micros=1_000, billed_micros=5_000),
            queries.UsageRow(key="2025-03-02", calls=1, input_tokens=20, output_tokens=2,
                             provider_cost_micros=2_000, billed_micros=10_000),
            queries.UsageRow(key="2025-03-31", calls=1, input_tokens=40, output_tokens=4,
                             provider_cost_micros=4_000, billed_micros=20_000),
        ]  # fmt: skip

    @pytest.mark.parametrize(
        ("group_by", "keys"),
        [
            ("PROJECT", lambda ids, world: {str(world.project_id): 35_000}),
            ("CARD", lambda ids, world: {str(ids["first_card"]): 15_000,
                                         str(ids["second_card"]): 20_000}),
            ("AGENT_RUN", lambda ids, world: {str(ids["first_run"]): 15_000,
                                              str(ids["second_run"]): 20_000}),
            ("PROVIDER", lambda ids, world: {"anthropic": 20_000, "openai": 15_000}),
            ("MODEL", lambda ids, world: {"claude": 20_000, "gpt": 5_000, "gpt-mini": 10_000}),
        ],
    )  # fmt: skip
    def test_each_grouping_sums_its_keys_exactly(
        self,
        side: ReadSide,
        world: World,
        usage_world: dict[str, UUID],
        group_by: str,
        keys: object,
    ) -> None:
        rows = _usage(side, world, group_by, MARCH, MARCH + timedelta(days=31))

        assert callable(keys)
        assert {row.key: row.billed_micros for row in rows} == keys(usage_world, world)
        assert [row.key for row in rows] == sorted(row.key for row in rows)
        assert sum(row.calls for row in rows) == 3

    def test_a_window_with_times_of_day_counts_every_day_it_touches(
        self, side: ReadSide, world: World, usage_world: dict[str, UUID]
    ) -> None:
        rows = _usage(side, world, "DAY", MARCH + timedelta(days=1, hours=22),
                      MARCH + timedelta(days=30, hours=1))  # fmt: skip

        assert [row.key for row in rows] == ["2025-03-02", "2025-03-31"]

    def test_days_are_utc_days_whatever_the_zone_of_the_window(
        self, side: ReadSide, world: World, usage_world: dict[str, UUID]
    ) -> None:
        new_york = timezone(timedelta(hours=-5))
        evening = datetime(2025, 3, 1, 23, 30, tzinfo=new_york)  # March 2nd, 04:30 UTC

        rows = _usage(side, world, "DAY", evening, evening + timedelta(minutes=1))

        assert [row.key for row in rows] == ["2025-03-02"]

    def test_the_widest_window_counts_everything(
        self, side: ReadSide, world: World, usage_world: dict[str, UUID]
    ) -> None:
        rows = _usage(side, world, "DAY", datetime.min.replace(tzinfo=UTC),
                      datetime.max.replace(tzinfo=UTC))  # fmt: skip

        assert [row.key for row in rows] == ["2025-03-01", "2025-03-02", "2025-03-31", "2025-04-01"]

    def test_an_empty_window_has_no_usage_and_a_backwards_one_is_refused(
        self, side: ReadSide, world: World, usage_world: dict[str, UUID]
    ) -> None:
        assert _usage(side, world, "DAY", MARCH, MARCH) == []
        with pytest.raises(ValidationFailed, match=r"from .* is after to"):
            _usage(side, world, "DAY", MARCH + timedelta(days=5), MARCH)

    def test_credits_lower_billed_but_not_what_was_used(self, side: ReadSide, world: World) -> None:
        run_id = running_run(side, world)
        call = llm_call(side, world, run_id, "a", cost=100_000, model="m")
        correct(side, world, call.extra["charge_id"], "0.1")
        project_all(side)

        today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        (row,) = _usage(side, world, "MODEL", today - timedelta(days=1), today + timedelta(2))
        assert (row.calls, row.provider_cost_micros, row.billed_micros) == (1, 100_000, 400_000)

    def test_an_unknown_grouping_or_a_naive_time_is_refused(
        self, side: ReadSide, world: World
    ) -> None:
        with pytest.raises(ValidationFailed, match="PROJECT, CARD"):
            _usage(side, world, "WEEK", MARCH, MARCH + timedelta(days=1))
        with pytest.raises(ValidationFailed, match="timezone"):
            _usage(side, world, "DAY", datetime(2025, 3, 1), MARCH)


# == statements and spend ==========================================================================


class TestStatement:
    def test_lines_are_rounded_up_to_the_increment_and_total_the_rounded_lines(
        self, side: ReadSide, world: World
    ) -> None:
        side.app.set_plan(
            m.SetPlan(workspace_id=world.workspace_id, markup="1", billing_increment="0.10"),
            world.operator,
        )
        other = side.app.create_project(
            m.CreateProject(workspace_id=world.workspace_id, name="Another"), world.owner
        ).id
        run_a = running_run(side, world)
        card_b = side.app.create_card(m.CreateCard(project_id=other, title="b"), world.owner).id
        run_b = running_run(side, world, card_b)
        llm_call(side, world, run_a, "a1", cost=100_000, at=MARCH)
        llm_call(side, world, run_a, "a2", cost=23_456, at=MARCH)
        llm_call(side, world, run_b, "b1", cost=200_000, at=MARCH)
        llm_call(side, world, run_b, "b2", cost=999, at=MARCH + timedelta(days=40))  # April
        project_all(side)

        with api_connection(side.database_url, world.workspace_id) as conn:
            statement = queries.statement(conn, world.workspace_id, "2025-03")

        assert statement.billing_increment_micros == 100_000
        assert statement.lines == [
            queries.StatementLine(project_id=other, description="Agent usage, 2025-03: Another",
                                  billed_exact_micros=200_000, billed_micros=200_000),
            queries.StatementLine(project_id=world.project_id,
                                  description="Agent usage, 2025-03: Line",
                                  billed_exact_micros=123_456, billed_micros=200_000),
        ]  # fmt: skip
        assert statement.total_micros == 400_000
        assert (statement.workspace_id, statement.month) == (world.workspace_id, "2025-03")
        assert (statement.invoice_id, statement.invoice_status) == (None, None)

    def test_a_month_of_refunds_only_has_a_credit_line_rounded_toward_zero(
        self, side: ReadSide, world: World
    ) -> None:
        run_id = running_run(side, world)
        call = llm_call(side, world, run_id, "a", cost=200_000, at=MARCH)  # billed $1.00
        correct(side, world, call.extra["charge_id"], "0.30", refund=True)
        project_all(side)
        this_month = month_of(datetime.now(UTC))

        with api_connection(side.database_url, world.workspace_id) as conn:
            march = queries.statement(conn, world.workspace_id, "2025-03")
            now = queries.statement(conn, world.workspace_id, this_month)

        assert [(line.billed_exact_micros, line.billed_micros) for line in march.lines] == [
            (1_000_000, 1_000_000)
        ]
        assert [(line.billed_exact_micros, line.billed_micros) for line in now.lines] == [
            (-300_000, -250_000)
        ]
        assert now.total_micros == -250_000

    def test_an_empty_month_has_no_lines_and_a_zero_total(
        self, side: ReadSide, world: World
    ) -> None:
        project_all(side)
        with api_connection(side.database_url, world.workspace_id) as conn:
            statement = queries.statement(conn, world.workspace_id, "2024-02")
        assert (statement.lines, statement.total_micros) == ([], 0)
        assert statement.billing_increment_micros == 250_000

    def test_another_workspace_or_a_malformed_month_is_refused(
        self, side: ReadSide, world: World
    ) -> None:
        other = side.new_world(owner="mallory")
        project_all(side)
        with api_connection(side.database_url, world.workspace_id) as conn:
            with pytest.raises(NotFound):
                queries.statement(conn, other.workspace_id, "2025-03")
            with pytest.raises(ValidationFailed, match=r"YYYY-MM .* got '2025-13'"):
                queries.statement(conn, world.workspace_id, "2025-13")

    def test_month_to_date_spend_is_net_of_corrections(self, side: ReadSide, world: World) -> None:
        run_id = running_run(side, world)
        call = llm_call(side, world, run_id, "a", cost=1_000)
        llm_call(side, world, run_id, "b", cost=10, at=MARCH)
        correct(side, world, call.extra["charge_id"], "0.000001")
        project_all(side)

        with api_connection(side.database_url, world.workspace_id) as conn:
            assert queries.month_to_date_spend(conn, world.workspace_id) == 4_999
            assert queries.month_to_date_spend(conn, world.workspace_id, month="2025-03") == 50
            assert queries.month_to_date_spend(conn, world.workspace_id, month="2025-04") == 0


# == logs ==========================================================================================


class TestLogs:
    def test_run_logs_page_by_sequence_number(self, side: ReadSide, world: World) -> None:
        run_id = running_run(side, world)
        append_log(side, world, run_id, [f"line {i}" for i in range(1, 16)])
        append_log(side, world, run_id, [f"line {i}" for i in range(16, 26)], stream="stderr")
        project_all(side)

        with api_connection(side.database_url, world.workspace_id) as conn:
            pages = [
                queries.run_logs(conn, run_id, first=10),
                queries.run_logs(conn, run_id, after_seq=10, first=10),
                queries.run_logs(conn, run_id, after_seq=20, first=10),
                queries.run_logs(conn, run_id, after_seq=25),
                queries.run_logs(conn, run_id, first=0),
            ]
        assert [[line.seq for line in page] for page in pages] == [
            list(range(1, 11)), list(range(11, 21)), list(range(21, 26)), [], []
        ]  # fmt: skip
        assert pages[2][-1] == queries.LogLine(
            run_id=run_id, seq=25, at=pages[2][-1].at, stream="stderr", text="line 25"
        )

    def test_run_logs_refuse_an_oversized_page(self, side: ReadSide, world: World) -> None:
        with (
            api_connection(side.database_url, world.workspace_id) as conn,
            pytest.raises(ValidationFailed, match="first"),
        ):
            queries.run_logs(conn, uuid4(), first=queries.MAX_LOG_PAGE + 1)

    def test_search_finds_words_and_phrases_best_match_first(
        self, side: ReadSide, world: World
    ) -> None:
        run_id = running_run(side, world)
        append_log(side, world, run_id, [
            "ERROR: connection refused by db:5432",
            "connection established",
            "all 120 tests passed",
            "error error error: retrying",
            "src/app/login.py compiled",
        ])  # fmt: skip
        project_all(side)

        with api_connection(side.database_url, world.workspace_id) as conn:

            def search(query: str, first: int = 50) -> list[int]:
                hits = queries.search_logs(conn, world.workspace_id, query=query, first=first)
                assert all(hit.run_id == run_id for hit in hits)
                return [hit.seq for hit in hits]

            assert search("error") == [4, 1]
            assert search("error", first=1) == [4]
            assert search('"connection refused"') == [1]
            assert search("connection -refused") == [2]
            assert search("tests or compiled") == [3, 5]
            assert search("src/app/login.py") == [5]
            assert search("   ") == []
            assert search("nothing-like-this") == []

    def test_search_never_returns_another_workspaces_lines(
        self, side: ReadSide, world: World
    ) -> None:
        other = side.new_world(owner="mallory")
        append_log(side, other, running_run(side, other), ["secret token leaked"])
        append_log(side, world, running_run(side, world), ["nothing secret here"])
        project_all(side)

        with api_connection(side.database_url, world.workspace_id) as conn:
            assert queries.search_logs(conn, other.workspace_id, query="secret") == []
            hits = queries.search_logs(conn, world.workspace_id, query="secret")
        assert [hit.text for hit in hits] == ["nothing secret here"]


# == runs and activity =============================================================================


class TestRunsAndActivity:
    def test_agent_run_reads_the_summary_row_of_the_callers_workspace_only(
        self, side: ReadSide, world: World
    ) -> None:
        run_id = running_run(side, world, provider="openai", model="gpt-4o")
        llm_call(side, world, run_id, "a", cost=10, model="gpt-4o")
        other = side.new_world(owner="mallory")
        other_run = running_run(side, other)
        project_all(side)

        with api_connection(side.database_url, world.workspace_id) as conn:
            run = queries.agent_run(conn, run_id)
            assert queries.agent_run(conn, other_run) is None
            assert queries.agent_run(conn, uuid4()) is None
        assert run is not None
        assert (run.status, run.model, run.llm_calls, run.billed_micros) == (
            "RUNNING", "gpt-4o", 1, 50,
        )  # fmt: skip
        assert run.workspace_id == world.workspace_id

    def test_activity_pages_run_newest_first_without_gaps_or_repeats(
        self, side: ReadSide, world: World
    ) -> None:
        for i in range(5):
            create_card(side, world, f"card {i}")
        project_all(side)

        seen: list[queries.ActivityItem] = []
        pages = 0
        after: int | None = None
        with api_connection(side.database_url, world.workspace_id) as conn:
            while True:
                page = queries.activity_page(
                    conn, world.workspace_id, first=3, after_position=after
                )
                seen.extend(page.items)
                pages += 1
                if not page.has_next_page:
                    break
                after = page.end_position
            everything = queries.activity_page(conn, world.workspace_id, first=50)
            empty = queries.activity_page(conn, world.workspace_id, first=0)

        assert pages == 3
        assert seen == everything.items
        assert [item.position for item in seen] == sorted(
            (item.position for item in seen), reverse=True
        )
        assert [item.kind for item in seen] == ["card.created"] * 5 + [
            "project.created", "workspace.created",
        ]  # fmt: skip
        assert seen[0].summary == "created card 'card 4' in Todo"
        assert seen[0].project_id == world.project_id
        assert not everything.has_next_page
        assert (empty.items, empty.has_next_page, empty.end_position) == ([], True, None)

    def test_activity_of_another_workspace_is_invisible(self, side: ReadSide, world: World) -> None:
        other = side.new_world(owner="mallory")
        project_all(side)
        with api_connection(side.database_url, world.workspace_id) as conn:
            page = queries.activity_page(conn, other.workspace_id)
        assert page.items == []
        assert not page.has_next_page
