"""Token and call counts past GraphQL's ``Int`` (a signed 32-bit integer, at most 2,147,483,647).

A busy workspace's month passes 2.1 billion tokens (~100M a day), and ``usage`` sums its rows
in PostgreSQL (bigint columns, summed as numeric): nothing below the API loses a digit. The
contract's ``Int!`` counts cannot carry such a sum. graphql-core refused it with its generic
``Int cannot represent non 32-bit signed integer value: 3000000000`` as a ``VALIDATION`` error
(the client's fault, with nothing to do about it) and, the field being non-null, the whole
``usage`` answer was null. Now the ``Int!`` field answers ``INT_OVERFLOW`` naming the field, the
limit and the ``BigInt`` companion to read instead (``inputTokensTotal``...), which carries every
count exactly as a decimal string.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

import psycopg
import pytest
from api_client import ApiClient, wait_for
from e2e_stack import Stack

from commands import models as m

INT_MAX = 2**31 - 1
#: One heavy call of each run: under the limit alone, past it once two are summed.
RUN_INPUT, RUN_OUTPUT = 1_500_000_000, 20_000_000

USAGE = (
    "query($w: ID!, $from: DateTime!, $to: DateTime!, $by: UsageGrouping!) {"
    " usage(workspaceId: $w, from: $from, to: $to, groupBy: $by) { %s } }"
)
OLD = "key calls inputTokens outputTokens providerCost billed"
NEW = "key callsTotal inputTokensTotal outputTokensTotal providerCost billed"
RUN = "query($id: ID!) { agentRun(id: $id) { inputTokens outputTokens } }"


def _window(now: datetime) -> dict[str, str]:
    return {
        "from": (now - timedelta(days=1)).isoformat(),
        "to": (now + timedelta(days=1)).isoformat(),
    }


def heavy_workspace(stack: Stack, owner: str) -> tuple[ApiClient, dict[str, Any], list[str]]:
    """A workspace whose one project has two cards, each with a run that made one call of
    1.5 billion input tokens: 3 billion in the project, 1.5 billion in each card and run. The
    owner's client, the variables of a usage query over today (waiting for both charges) and
    the two runs."""
    alice, ws = stack.owner_with_workspace(owner)
    pid = alice.create_project(ws, "P", [{"name": "Todo"}])["project"]["id"]
    runs, token = [], ""
    for title in ("first", "second"):
        card = alice.create_card(pid, title)["card"]["id"]
        run = alice.start_agent_run(card)["run"]["id"]
        stack.write.begin_run(m.BeginRun(run_id=UUID(run), worker="w1"), stack.orchestrator(ws))
        token = stack.write.record_llm_call(
            m.RecordLlmCall(
                run_id=UUID(run), call_id="c1", provider="simulated", model="sim-1",
                input_tokens=RUN_INPUT, output_tokens=RUN_OUTPUT, latency_ms=1,
                provider_cost_micros=1_000_000, price_table_version="v1", at=datetime.now(UTC),
            ),
            stack.orchestrator(ws),
        ).consistency_token  # fmt: skip
        runs.append(run)
    after = {"X-Consistency-Token": token}
    variables = {"w": ws, **_window(datetime.now(UTC))}
    # The token is the last run's: the billing projector, which the usage rows are, applies
    # the charge (another aggregate of the same write) in its own time.
    wait_for(
        lambda: alice.data(USAGE % "inputTokensTotal", {**variables, "by": "DAY"}, headers=after),
        until=lambda data: [r["inputTokensTotal"] for r in data["usage"]] == [str(2 * RUN_INPUT)],
        what="both charges in the day's usage",
    )
    return alice, variables, runs


def test_a_sum_past_int_is_an_int_overflow_naming_the_bigint_field_to_read(stack: Stack) -> None:
    alice, variables, _ = heavy_workspace(stack, "overflow-old")

    answer = alice.post(USAGE % OLD, {**variables, "by": "PROJECT"})

    # Int! inside [UsageRow!]! inside a non-null root field: the null climbs to the answer.
    assert answer.data is None
    (error,) = answer.errors
    assert error["path"] == ["usage", 0, "inputTokens"]
    assert error["message"] == (
        "UsageRow.inputTokens is 3000000000, which GraphQL's Int (a signed 32-bit integer, "
        "-2147483648 to 2147483647) cannot carry; read inputTokensTotal (BigInt, a decimal "
        "string) instead"
    )
    assert error["extensions"] == {
        "code": "INT_OVERFLOW",
        "field": "UsageRow.inputTokens",
        "value": "3000000000",
        "max": INT_MAX,
        "instead": "inputTokensTotal",
    }


def test_the_bigint_fields_carry_the_sums_past_int_exactly(stack: Stack) -> None:
    alice, variables, _ = heavy_workspace(stack, "overflow-new")

    (row,) = alice.data(USAGE % NEW, {**variables, "by": "PROJECT"})["usage"]
    # outputTokens still fits: the old field answers beside its companion.
    (mixed,) = alice.data(
        USAGE % "calls callsTotal outputTokens outputTokensTotal", {**variables, "by": "DAY"}
    )["usage"]

    assert row["callsTotal"] == "2"
    assert row["inputTokensTotal"] == str(2 * RUN_INPUT) == "3000000000"
    assert row["outputTokensTotal"] == str(2 * RUN_OUTPUT)
    assert mixed == {
        "calls": 2, "callsTotal": "2",
        "outputTokens": 2 * RUN_OUTPUT, "outputTokensTotal": str(2 * RUN_OUTPUT),
    }  # fmt: skip


def test_rows_under_the_limit_answer_alike_in_int_and_bigint(stack: Stack) -> None:
    alice, variables, runs = heavy_workspace(stack, "overflow-cards")

    for by in ("CARD", "AGENT_RUN"):
        rows = alice.data(USAGE % f"{OLD} {NEW}", {**variables, "by": by})["usage"]
        assert len(rows) == 2
        for row in rows:
            assert row["inputTokens"] == RUN_INPUT
            for old in ("calls", "inputTokens", "outputTokens"):
                assert row[f"{old}Total"] == str(row[old])
    for run in runs:
        assert alice.data(RUN, {"id": run})["agentRun"] == {
            "inputTokens": RUN_INPUT, "outputTokens": RUN_OUTPUT,
        }  # fmt: skip


def _planted_day(stack: Stack, **counts: int) -> tuple[ApiClient, dict[str, Any]]:
    """A new workspace whose usage of today is one row with ``counts`` planted in the read
    model: two billion calls take no test's time to make. The owner's client and the variables
    of a usage query grouped by day."""
    alice, ws = stack.owner_with_workspace(f"planted-{uuid4().hex[:8]}")
    now = datetime.now(UTC)
    row = {"calls": 1, "input_tokens": 1, "output_tokens": 1, **counts}
    with psycopg.connect(stack.database_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO rm_usage_daily (workspace_id, day, dimension, key, calls, input_tokens,"
            " output_tokens, provider_cost_micros, billed_micros)"
            " VALUES (%s, %s, 'DAY', %s, %s, %s, %s, 1, 1)",
            (UUID(ws), now.date(), now.date().isoformat(), row["calls"], row["input_tokens"],
             row["output_tokens"]),
        )  # fmt: skip
    return alice, {"w": ws, **_window(now), "by": "DAY"}


@pytest.mark.parametrize(
    ("field", "column", "instead"),
    [
        ("calls", "calls", "callsTotal"),
        ("inputTokens", "input_tokens", "inputTokensTotal"),
        ("outputTokens", "output_tokens", "outputTokensTotal"),
    ],
)
def test_each_count_past_int_names_its_own_companion(
    stack: Stack, field: str, column: str, instead: str
) -> None:
    alice, variables = _planted_day(stack, **{column: 2**31})

    answer = alice.post(USAGE % f"key {field}", variables)
    (row,) = alice.data(USAGE % f"key {instead}", variables)["usage"]

    assert answer.data is None
    assert answer.codes == ["INT_OVERFLOW"]
    assert answer.errors[0]["path"] == ["usage", 0, field]
    assert answer.errors[0]["extensions"]["instead"] == instead
    assert f"UsageRow.{field} is 2147483648" in answer.errors[0]["message"]
    assert row[instead] == "2147483648"


def test_the_largest_int_is_still_an_int(stack: Stack) -> None:
    alice, variables = _planted_day(stack, calls=INT_MAX, input_tokens=INT_MAX)

    (row,) = alice.data(USAGE % "calls callsTotal inputTokens inputTokensTotal", variables)["usage"]

    assert row == {
        "calls": INT_MAX, "callsTotal": str(INT_MAX),
        "inputTokens": INT_MAX, "inputTokensTotal": str(INT_MAX),
    }  # fmt: skip


def test_a_run_past_int_is_an_int_overflow_naming_its_usage_row(stack: Stack) -> None:
    """A run's own counts have no BigInt companion (the orchestrator bounds them far below the
    limit); recorded past it all the same, they answer INT_OVERFLOW too, naming where the same
    count is read in full: the run's ``usage`` row."""
    alice, ws = stack.owner_with_workspace("overflow-run")
    _, _, run = stack.begun_run(alice, ws)
    for call in ("c1", "c2"):
        recorded = stack.write.record_llm_call(
            m.RecordLlmCall(
                run_id=UUID(run), call_id=call, provider="simulated", model="sim-1",
                input_tokens=RUN_INPUT, output_tokens=1, latency_ms=1, provider_cost_micros=1,
                price_table_version="v1", at=datetime.now(UTC),
            ),
            stack.orchestrator(ws),
        )  # fmt: skip
    after = {"X-Consistency-Token": recorded.consistency_token}

    answer = alice.post(RUN, {"id": run}, headers=after)
    # The token is the run's: the billing projector, which the usage rows are, may be behind.
    (row,) = wait_for(
        lambda: alice.data(
            USAGE % "key inputTokensTotal",
            {"w": ws, **_window(datetime.now(UTC)), "by": "AGENT_RUN"},
        )["usage"],
        until=lambda rows: rows and rows[0]["inputTokensTotal"] == str(2 * RUN_INPUT),
        what="both charges in the run's usage row",
    )

    assert answer.data == {"agentRun": None}  # agentRun is nullable: the null stops there
    (error,) = answer.errors
    assert error["path"] == ["agentRun", "inputTokens"]
    assert error["extensions"]["code"] == "INT_OVERFLOW"
    assert error["extensions"]["instead"] == "usage(groupBy: AGENT_RUN) { inputTokensTotal }"
    assert row == {"key": run, "inputTokensTotal": str(2 * RUN_INPUT)}
