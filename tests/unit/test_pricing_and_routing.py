"""Prices, exact call costs, the router's choices, fallbacks and circuit breakers."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from domain.agents import (
    AGENTS,
    EARLIER_OUTPUT_CHARS,
    EARLIER_RUNS,
    EarlierRun,
    agent_named,
    build_prompt,
)
from domain.errors import ValidationFailed
from domain.money import billed_amount
from domain.pricing import PriceRow, PriceTable, built_in_price_table, call_cost_micros
from domain.routing import (
    Breakers,
    BreakerState,
    CircuitBreaker,
    LatencyTracker,
    RouteRequest,
    backoff_seconds,
    route,
    validate_choice,
)

T0 = datetime(2025, 1, 1, tzinfo=UTC)

prices_st = st.decimals(min_value=0, max_value=1000, places=6, allow_nan=False)
tokens_st = st.integers(min_value=0, max_value=10**9)
markup_st = st.decimals(min_value=Decimal("0.000001"), max_value=100, places=6)


def row(provider: str, model: str, at: datetime, inp: str, out: str) -> PriceRow:
    return PriceRow(
        provider=provider,
        model=model,
        effective_from=at,
        input_per_mtok=Decimal(inp),
        output_per_mtok=Decimal(out),
    )


@given(prices_st, prices_st, tokens_st, tokens_st)
def test_call_cost_is_the_exact_price_rounded_up_once(
    inp: Decimal, out: Decimal, tin: int, tout: int
) -> None:
    price = PriceRow(
        provider="p", model="m", effective_from=T0, input_per_mtok=inp, output_per_mtok=out
    )
    exact_micros = Fraction(tin) * Fraction(inp) + Fraction(tout) * Fraction(
        out
    )  # USD/Mtok x tokens = micro-USD
    cost = call_cost_micros(price, input_tokens=tin, output_tokens=tout)
    assert cost >= exact_micros
    assert cost - exact_micros < 1


@given(
    prices_st,
    prices_st,
    markup_st,
    st.lists(st.tuples(tokens_st, tokens_st), min_size=1, max_size=20),
)
def test_run_totals_are_the_sum_of_their_calls(
    inp: Decimal, out: Decimal, markup: Decimal, calls: list[tuple[int, int]]
) -> None:
    table = PriceTable(
        [PriceRow(provider="p", model="m", effective_from=T0, input_per_mtok=inp,
                  output_per_mtok=out)]
    )  # fmt: skip
    costs = [
        table.cost("p", "m", at=T0, input_tokens=i, output_tokens=o, markup=markup)
        for i, o in calls
    ]
    for c, (_i, _o) in zip(costs, calls, strict=True):
        assert c.billed_micros == billed_amount(c.provider_cost_micros, markup)
        assert c.billed_micros >= Fraction(c.provider_cost_micros) * Fraction(markup)
        assert c.billed_micros - Fraction(c.provider_cost_micros) * Fraction(markup) < 1
    run_cost = sum(c.provider_cost_micros for c in costs)
    exact = sum(Fraction(i) * Fraction(inp) + Fraction(o) * Fraction(out) for i, o in calls)
    # Rounded once per call: the run is off the exact sum by less than a micro per call.
    assert exact <= run_cost < exact + len(calls)


@given(st.lists(st.integers(min_value=0, max_value=1000), min_size=1, max_size=8, unique=True),
       st.integers(min_value=-10, max_value=1100))  # fmt: skip
def test_row_in_force_is_the_latest_at_or_before_the_call(days: list[int], at_day: int) -> None:
    table = PriceTable(row("p", "m", T0 + timedelta(days=d), str(d), "1") for d in days)
    found = table.in_force("p", "m", T0 + timedelta(days=at_day))
    earlier = [d for d in days if d <= at_day]
    if not earlier:
        assert found is None
    else:
        assert found is not None
        assert found.input_per_mtok == Decimal(max(earlier))


def test_price_change_never_alters_a_past_call() -> None:
    table = PriceTable(
        [row("p", "m", T0, "1", "2"), row("p", "m", T0 + timedelta(days=30), "9", "9")]
    )
    before = table.cost("p", "m", at=T0 + timedelta(days=1), input_tokens=10**6,
                        output_tokens=10**6, markup=Decimal(5))  # fmt: skip
    assert before.provider_cost_micros == 3_000_000
    assert before.billed_micros == 15_000_000


def test_price_table_from_document_refuses_floats_and_missing_fields() -> None:
    good = {"prices": [{"provider": "openai", "model": "gpt-4o-mini",
                        "effective_from": "2024-07-18T00:00:00Z", "input_per_mtok": "0.15",
                        "output_per_mtok": "0.60"}]}  # fmt: skip
    table = PriceTable.from_document(good)
    assert table.require("openai", "gpt-4o-mini", T0).output_per_mtok == Decimal("0.60")
    bad_float = {"prices": [{**good["prices"][0], "input_per_mtok": 0.15}]}
    with pytest.raises(ValidationFailed, match="input_per_mtok"):
        PriceTable.from_document(bad_float)
    missing = {"prices": [{"provider": "x", "model": "y"}]}
    with pytest.raises(ValidationFailed, match="lacks effective_from"):
        PriceTable.from_document(missing)
    with pytest.raises(ValidationFailed, match="no price in force"):
        table.require("openai", "gpt-4o-mini", datetime(2020, 1, 1, tzinfo=UTC))


def test_price_table_version_changes_with_content() -> None:
    a = PriceTable([row("p", "m", T0, "1", "2")])
    b = PriceTable([row("p", "m", T0, "1", "3")])
    assert a.version != b.version
    assert a.version == PriceTable([row("p", "m", T0, "1", "2")]).version


# -- the router -------------------------------------------------------------------------------

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def test_cheapest_orders_available_models_by_price() -> None:
    chain = route(RouteRequest(), available={"simulated", "openai", "anthropic"},
                  prices=built_in_price_table(), at=NOW)  # fmt: skip
    names = [(o.provider, o.model) for o in chain]
    assert names[0] == ("openai", "gpt-4o-mini")
    assert names[-1] == ("anthropic", "claude-3-5-sonnet-latest")
    assert len(names) == 5


def test_providers_without_a_key_are_not_routed_to() -> None:
    chain = route(RouteRequest(), available={"simulated"}, prices=built_in_price_table(), at=NOW)
    assert [(o.provider, o.model) for o in chain] == [("simulated", "sim-1")]


def test_fastest_prefers_observed_low_latency_and_unknown_last() -> None:
    tracker = LatencyTracker()
    tracker.observe("anthropic", "claude-3-5-sonnet-latest", 100)
    tracker.observe("openai", "gpt-4o-mini", 900)
    chain = route(RouteRequest(policy="fastest"), available={"openai", "anthropic", "simulated"},
                  prices=built_in_price_table(), at=NOW, latency_ms=tracker.means)  # fmt: skip
    assert [(o.provider, o.model) for o in chain[:2]] == [
        ("anthropic", "claude-3-5-sonnet-latest"),
        ("openai", "gpt-4o-mini"),
    ]


def test_pinned_run_never_routes_to_another_provider() -> None:
    chain = route(RouteRequest(provider="anthropic"), available={"openai", "anthropic"},
                  prices=built_in_price_table(), at=NOW)  # fmt: skip
    assert {o.provider for o in chain} == {"anthropic"}
    pinned = route(RouteRequest(provider="openai", model="gpt-4o"), available={"openai"},
                   prices=built_in_price_table(), at=NOW)  # fmt: skip
    assert [(o.provider, o.model) for o in pinned] == [("openai", "gpt-4o")]
    with pytest.raises(ValidationFailed, match="no model is available"):
        route(RouteRequest(provider="openai"), available={"simulated"},
              prices=built_in_price_table(), at=NOW)  # fmt: skip


def test_unknown_provider_model_or_policy_and_unpriced_models_are_refused() -> None:
    prices = built_in_price_table()
    validate_choice(provider="openai", model="gpt-4o-mini", policy=None, prices=prices, at=NOW)
    with pytest.raises(ValidationFailed, match="provider 'acme'"):
        validate_choice(provider="acme", model=None, policy=None, prices=prices, at=NOW)
    with pytest.raises(ValidationFailed, match="not a known model"):
        validate_choice(provider="openai", model="gpt-9", policy=None, prices=prices, at=NOW)
    with pytest.raises(ValidationFailed, match="policy 'random'"):
        validate_choice(provider=None, model=None, policy="random", prices=prices, at=NOW)
    with pytest.raises(ValidationFailed, match="no price in force"):
        validate_choice(provider="openai", model="gpt-4o-mini", policy=None, prices=prices,
                        at=datetime(2023, 1, 1, tzinfo=UTC))  # fmt: skip


def test_breaker_opens_after_threshold_and_half_opens_for_one_trial() -> None:
    breaker = CircuitBreaker(threshold=3, cooldown_seconds=10)
    assert breaker.allows(0)
    breaker.failed(1)
    breaker.failed(2)
    assert breaker.state is BreakerState.CLOSED
    assert breaker.failed(3) is BreakerState.OPEN
    assert not breaker.allows(5)
    assert breaker.allows(13)  # half-open: one trial goes through
    assert breaker.state.value == "half-open"
    assert not breaker.allows(13.5)  # ... and only one
    assert breaker.failed(14) is BreakerState.OPEN  # a failed trial opens it again at once
    assert not breaker.allows(20)
    assert breaker.allows(24.5)
    assert breaker.succeeded() is BreakerState.CLOSED
    assert breaker.allows(25)
    assert breaker.allows(25)


def test_success_resets_the_failure_count() -> None:
    breaker = CircuitBreaker(threshold=2)
    breaker.failed(0)
    breaker.succeeded()
    assert breaker.failed(1) is BreakerState.CLOSED


def test_one_workspaces_failures_open_its_own_circuit_not_the_providers() -> None:
    """Three failures in a row of one tenant's calls (its prompts time out, say) opened the
    provider's circuit for every tenant; they open that tenant's, and another tenant's call
    still goes to the provider."""
    breakers = Breakers(threshold=3, cooldown_seconds=10)
    opened = [breakers.failed("openai", "ws-a", t) for t in (1, 2, 3)]
    assert opened == [[], [], ["workspace"]]
    assert not breakers.allows("openai", "ws-a", 4)
    assert breakers.allows("openai", "ws-b", 4)
    assert breakers.allows("openai", "ws-a", 13)  # its own trial, a cooldown later
    breakers.succeeded("openai", "ws-a")
    assert breakers.by_workspace == {}  # a closed workspace breaker is forgotten
    assert breakers.allows("openai", "ws-a", 14)


def test_a_workspace_trial_is_not_taken_while_the_providers_circuit_refuses() -> None:
    """The workspace's circuit half-open and the provider's open: no call goes, and the
    workspace's trial is still there once the provider's lets calls through."""
    breakers = Breakers(threshold=2, cooldown_seconds=10)
    breakers.failed("openai", "ws-a", 0)
    breakers.failed("openai", "ws-a", 1)  # ws-a's own circuit opens at 1
    breakers.failed("openai", "ws-b", 8)  # the provider's opens at 8: two workspaces
    assert not breakers.allows("openai", "ws-a", 12)  # ws-a half-open, the provider open
    assert breakers.allows("openai", "ws-a", 18)  # both let their trial go, with one call
    assert not breakers.allows("openai", "ws-a", 19)
    assert [check.would_allow(19) for check in _both_breakers(breakers, "ws-a")] == [
        False, False,
    ]  # fmt: skip


def _both_breakers(breakers: Breakers, workspace: str) -> list[CircuitBreaker]:
    return [breakers.of("openai"), breakers.by_workspace[("openai", workspace)]]


def test_failures_from_two_workspaces_open_the_providers_circuit() -> None:
    breakers = Breakers(threshold=3, cooldown_seconds=10)
    assert breakers.failed("openai", "ws-a", 1) == []
    assert breakers.failed("openai", "ws-a", 2) == []
    assert breakers.failed("openai", "ws-b", 3) == ["provider"]
    assert not breakers.allows("openai", "ws-c", 4)
    assert breakers.allows("anthropic", "ws-c", 4)


def test_a_refusal_of_the_providers_key_counts_for_every_workspace() -> None:
    breakers = Breakers(threshold=2, cooldown_seconds=10)
    breakers.failed("openai", "ws-a", 1, provider_wide=True)
    assert breakers.failed("openai", "ws-a", 2, provider_wide=True) == ["provider", "workspace"]
    assert not breakers.allows("openai", "ws-b", 3)


def test_a_success_of_any_workspace_closes_the_providers_circuit_count() -> None:
    breakers = Breakers(threshold=3, cooldown_seconds=10)
    breakers.failed("openai", "ws-a", 1)
    breakers.failed("openai", "ws-b", 2)
    breakers.succeeded("openai", "ws-c")
    assert breakers.failed("openai", "ws-b", 3) == []
    assert breakers.of("openai").failures == 1


@given(st.integers(min_value=1, max_value=30), st.floats(min_value=0, max_value=0.999))
def test_backoff_is_jittered_capped_and_honours_retry_after(attempt: int, jitter: float) -> None:
    wait = backoff_seconds(attempt, retry_after=None, base=0.2, cap=10, jitter=jitter)
    assert 0 <= wait <= min(10, 0.2 * 2 ** (attempt - 1))
    assert backoff_seconds(attempt, retry_after=7.5, jitter=jitter) == 7.5


def test_every_agent_has_a_prompt_over_the_card_and_earlier_outputs() -> None:
    assert set(AGENTS) == {"ceo_copilot", "prd_writer", "architect", "coder", "reviewer"}
    messages = build_prompt(agent_named("reviewer"), title="Login page",
                            description="OAuth login",
                            earlier=[EarlierRun("coder", "def login(): ...")])  # fmt: skip
    user = messages[1]["content"]
    assert "Login page" in user
    assert "OAuth login" in user
    assert "def login()" in user
    with pytest.raises(ValidationFailed, match="agent 'poet'"):
        agent_named("poet")


def test_a_trial_that_never_got_a_verdict_lets_another_through_after_a_cooldown() -> None:
    """A half-open breaker's trial call may end with no verdict (cancelled, stopped by a budget,
    a request the provider refused as bad): its breaker stayed half-open with its one trial out
    for good, and the router never chose that provider again."""
    breaker = CircuitBreaker(threshold=1, cooldown_seconds=10)
    breaker.failed(0)
    assert breaker.allows(10)  # the trial, whose call then ends without a verdict
    assert not breaker.allows(15)
    assert breaker.allows(20)  # a cooldown later, another trial
    assert not breaker.allows(21)
    assert breaker.succeeded() is BreakerState.CLOSED


def test_a_prompt_shows_the_latest_earlier_runs_of_its_card_only() -> None:
    """Every earlier output went into the prompt: a busy card's prompts grew with each run until
    its model refused them as too long."""
    earlier = [EarlierRun("coder", f"attempt number {n}") for n in range(1, 11)]
    user = build_prompt(agent_named("reviewer"), title="t", description="d", earlier=earlier)[1]
    shown = [n for n in range(1, 11) if f"attempt number {n}\n" in user["content"] + "\n"]
    assert shown == list(range(11 - EARLIER_RUNS, 11))


@given(st.text(max_size=EARLIER_OUTPUT_CHARS + 50), st.text(max_size=20))
def test_an_output_kept_for_later_prompts_shows_as_the_whole_output_did(
    output: str, padding: str
) -> None:
    whole = " " + padding + output
    spec = agent_named("coder")
    assert build_prompt(
        spec, title="t", description="d", earlier=[EarlierRun.kept("coder", whole)]
    ) == build_prompt(spec, title="t", description="d", earlier=[EarlierRun("coder", whole)])
    assert len(EarlierRun.kept("coder", whole * 3).output) <= EARLIER_OUTPUT_CHARS + 1


#: Prices as an operator may write them: a few digits at any scale a price can have.
spread_prices_st = st.builds(
    lambda digits, exponent: Decimal(digits).scaleb(exponent),
    st.integers(min_value=0, max_value=999),
    st.integers(min_value=-18, max_value=6),
)


@example(Decimal("9E+8"), Decimal("1E-18"), 10**9, 1)
@given(spread_prices_st, spread_prices_st, tokens_st, tokens_st)
def test_call_cost_is_exact_whatever_the_scale_of_the_two_prices(
    inp: Decimal, out: Decimal, tin: int, tout: int
) -> None:
    """Two prices of far apart scales (a costly input, a near-free output) need more digits
    than either has: the sum is exact all the same, not a decimal error."""
    price = PriceRow(
        provider="p", model="m", effective_from=T0, input_per_mtok=inp, output_per_mtok=out
    )
    exact_micros = Fraction(tin) * Fraction(inp) + Fraction(tout) * Fraction(out)
    cost = call_cost_micros(price, input_tokens=tin, output_tokens=tout)
    assert exact_micros <= cost < exact_micros + 1


@pytest.mark.parametrize(
    ("price", "problem"),
    [
        ("1e999999999", "below 1000000000"),
        ("1000000000", "below 1000000000"),
        ("0.0000000000000000001", "18 decimal places"),
        ("1e-999999999", "18 decimal places"),
    ],
)
def test_a_price_table_refuses_prices_no_call_can_be_costed_at(price: str, problem: str) -> None:
    document = {"prices": [{"provider": "x", "model": "y", "effective_from": "2024-01-01T00:00:00Z",
                            "input_per_mtok": price, "output_per_mtok": "1"}]}  # fmt: skip
    with pytest.raises(ValidationFailed, match=f"input_per_mtok .*{problem}"):
        PriceTable.from_document(document)


def test_a_breaker_says_how_long_until_it_may_let_a_call_through() -> None:
    """What a run with no candidate let through waits for: the cooldown of an open breaker, the
    trial's cooldown while the trial is out, nothing once a trial is free."""
    breaker = CircuitBreaker(threshold=1, cooldown_seconds=10)
    assert breaker.wait(0) == 0
    breaker.failed(1)
    assert breaker.wait(4) == 7
    assert breaker.allows(11)  # the trial goes out at 11
    assert breaker.wait(12) == 9
    assert breaker.wait(30) == 0  # its trial given up: another may go
    breaker.succeeded()
    assert breaker.wait(31) == 0


def test_a_calls_wait_is_the_longer_of_its_two_breakers() -> None:
    breakers = Breakers(threshold=2, cooldown_seconds=10)
    breakers.failed("openai", "ws-a", 0)
    breakers.failed("openai", "ws-a", 1)  # ws-a's own circuit opens at 1
    assert breakers.wait("openai", "ws-a", 3) == 8
    assert breakers.wait("openai", "ws-b", 3) == 0
    breakers.failed("openai", "ws-b", 5)  # the provider's opens at 5: two workspaces
    assert breakers.wait("openai", "ws-a", 6) == breakers.wait("openai", "ws-b", 6) == 9
    assert breakers.wait("anthropic", "ws-a", 6) == 0
