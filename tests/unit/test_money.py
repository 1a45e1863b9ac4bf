from __future__ import annotations

import decimal
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from fractions import Fraction
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from domain.errors import ValidationFailed
from domain.money import (
    DEFAULT_BILLING_INCREMENT_MICROS,
    DEFAULT_MARKUP,
    MAX_MICROS,
    MICROS_PER_USD,
    billed_amount,
    format_markup,
    format_usd,
    parse_markup,
    parse_usd,
    round_up_to_increment,
    tokens_cost_micros,
)

micros_amounts = st.integers(min_value=-MAX_MICROS, max_value=MAX_MICROS)
costs = st.integers(min_value=0, max_value=10**15)
markups = st.integers(min_value=1, max_value=10**9).map(lambda n: Decimal(n).scaleb(-6))
increments = st.one_of(
    st.just(DEFAULT_BILLING_INCREMENT_MICROS),
    st.integers(min_value=1, max_value=10**9),
)


def exact(value: Decimal | int) -> Fraction:
    return Fraction(value)


def reference_micros(text: str) -> int:
    with decimal.localcontext(decimal.Context(prec=200, traps=[decimal.Inexact])):
        return int(Decimal(text) * MICROS_PER_USD)


# --- parse_usd / format_usd ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "micros"),
    [
        ("1.25", 1_250_000),
        ("0.000001", 1),
        ("12", 12_000_000),
        ("0", 0),
        ("0.5", 500_000),
        ("007.100000", 7_100_000),
        ("1.2500000", 1_250_000),
        ("9223372036854.775807", MAX_MICROS),
    ],
)
def test_parse_usd_reads_plain_decimals_exactly(text: str, micros: int) -> None:
    assert parse_usd(text) == micros


@given(micros_amounts)
def test_format_then_parse_round_trips_every_amount(micros: int) -> None:
    assert parse_usd(format_usd(micros), allow_negative=True) == micros


@given(micros_amounts)
def test_format_usd_has_six_decimals_and_the_exact_value(micros: int) -> None:
    text = format_usd(micros)
    assert len(text.split(".")[1]) == 6
    assert exact(Decimal(text)) == Fraction(micros, MICROS_PER_USD)


@pytest.mark.parametrize(
    ("micros", "text"),
    [(1_250_000, "1.250000"), (-5, "-0.000005"), (0, "0.000000"), (12_000_000, "12.000000")],
)
def test_format_usd_examples(micros: int, text: str) -> None:
    assert format_usd(micros) == text


@given(
    whole=st.integers(min_value=0, max_value=10**12),
    fraction=st.text(alphabet="0123456789", min_size=0, max_size=6),
)
def test_parse_usd_agrees_with_exact_decimal_arithmetic(whole: int, fraction: str) -> None:
    text = f"{whole}.{fraction}" if fraction else str(whole)
    parsed = parse_usd(text)
    assert type(parsed) is int
    assert parsed == reference_micros(text)


@given(
    whole=st.integers(min_value=0, max_value=10**6),
    fraction=st.text(alphabet="0123456789", min_size=7, max_size=12).filter(
        lambda digits: digits[6:].strip("0") != ""
    ),
)
def test_parse_usd_refuses_amounts_finer_than_a_micro(whole: int, fraction: str) -> None:
    with pytest.raises(ValidationFailed, match="decimal places"):
        parse_usd(f"{whole}.{fraction}")


@pytest.mark.parametrize(
    "text",
    [
        "",
        " 1",
        "1 ",
        "1.",
        ".5",
        "+1",
        "1e3",
        "1E-2",
        "NaN",
        "nan",
        "sNaN",
        "Infinity",
        "-Infinity",
        "inf",
        "abc",
        "1,5",
        "1_000",
        "0x10",
        "--1",
        "\uff11",  # fullwidth digit one: Decimal would accept it
        "\u0661",  # arabic-indic digit one
        "0.30000000000000004",
        "1" * 41,
    ],
)
def test_parse_usd_refuses_malformed_text_and_names_it(text: str) -> None:
    with pytest.raises(ValidationFailed) as refused:
        parse_usd(text, allow_negative=True)
    assert repr(text[:40]) in str(refused.value) or repr(text) in str(refused.value)


@given(st.integers(min_value=1, max_value=MAX_MICROS))
def test_parse_usd_refuses_negatives_unless_allowed(micros: int) -> None:
    text = format_usd(-micros)
    with pytest.raises(ValidationFailed, match="negative"):
        parse_usd(text)
    assert parse_usd(text, allow_negative=True) == -micros


def test_negative_zero_is_zero() -> None:
    assert parse_usd("-0.000000") == 0


def test_parse_usd_refuses_amounts_that_do_not_fit_bigint() -> None:
    with pytest.raises(ValidationFailed, match="too large"):
        parse_usd(format_usd(MAX_MICROS + 1))
    with pytest.raises(ValidationFailed, match="too large"):
        parse_usd(format_usd(-MAX_MICROS - 1), allow_negative=True)


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_parse_usd_refuses_floats(value: Any) -> None:
    with pytest.raises(ValidationFailed, match="float"):
        parse_usd(value)


@pytest.mark.parametrize("value", [Decimal("1.25"), 1, None, b"1.25", True])
def test_parse_usd_refuses_every_non_string(value: Any) -> None:
    with pytest.raises(ValidationFailed, match="decimal string"):
        parse_usd(value)


@pytest.mark.parametrize("value", [1.25, True, Decimal("1"), "1"])
def test_format_usd_refuses_anything_but_int_micros(value: Any) -> None:
    with pytest.raises(ValidationFailed):
        format_usd(value)


# --- markup ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "markup"),
    [("5", Decimal(5)), ("1.5", Decimal("1.5")), ("0.000001", Decimal("0.000001"))],
)
def test_parse_markup_reads_positive_decimals(text: str, markup: Decimal) -> None:
    assert parse_markup(text) == markup


@pytest.mark.parametrize(
    "text", ["0", "0.000000", "-1", "1.0000001", "1e1", "NaN", "Infinity", "", "+5", "5.", "x"]
)
def test_parse_markup_refuses_zero_negative_or_malformed(text: str) -> None:
    with pytest.raises(ValidationFailed, match="markup"):
        parse_markup(text)


@pytest.mark.parametrize("text", ["1000.000001", "1001", "9" * 23, "9" * 33 + ".5"])
def test_parse_markup_refuses_markups_past_a_thousandfold(text: str) -> None:
    """Past 1000 times a markup is a mistake, and a large enough one bills amounts no read model can
    store (a bigint of micro-USD)."""
    with pytest.raises(ValidationFailed, match="at most 1000"):
        parse_markup(text)
    assert parse_markup("1000") == Decimal(1000)


@pytest.mark.parametrize("value", [5.0, 5, None])
def test_parse_markup_refuses_non_strings(value: Any) -> None:
    with pytest.raises(ValidationFailed, match="markup"):
        parse_markup(value)


@given(markups)
def test_markup_round_trips_through_its_shortest_text(markup: Decimal) -> None:
    text = format_markup(markup)
    assert "E" not in text
    assert parse_markup(text) == markup


def test_default_markup_is_five() -> None:
    assert format_markup(DEFAULT_MARKUP) == "5"


# --- billed_amount ---------------------------------------------------------------------------


@given(costs, markups)
def test_billed_amount_is_the_exact_ceiling_of_cost_times_markup(
    cost: int, markup: Decimal
) -> None:
    with decimal.localcontext(decimal.Context(prec=200, traps=[decimal.Inexact])):
        expected = int((Decimal(cost) * markup).to_integral_value(rounding=ROUND_CEILING))
    billed = billed_amount(cost, markup)
    assert type(billed) is int
    assert billed == expected


@given(costs, markups)
def test_billed_amount_never_undercharges_and_overcharges_by_less_than_a_micro(
    cost: int, markup: Decimal
) -> None:
    billed = billed_amount(cost, markup)
    owed = exact(cost) * exact(markup)
    assert owed <= billed < owed + 1


@given(st.integers(min_value=0, max_value=10**60), markups)
def test_billed_amount_stays_exact_for_huge_costs(cost: int, markup: Decimal) -> None:
    billed = billed_amount(cost, markup)
    owed = exact(cost) * exact(markup)
    assert owed <= billed < owed + 1


@given(costs, costs, markups)
def test_billing_two_charges_separately_costs_at_most_one_micro_more(
    first: int, second: int, markup: Decimal
) -> None:
    together = billed_amount(first + second, markup)
    apart = billed_amount(first, markup) + billed_amount(second, markup)
    assert together <= apart <= together + 1


def test_billed_amount_ignores_the_global_decimal_context() -> None:
    with decimal.localcontext() as context:
        context.prec = 2
        context.rounding = ROUND_FLOOR
        assert billed_amount(123_456_789, Decimal("1.5")) == 185_185_184


@pytest.mark.parametrize(
    ("cost", "markup", "billed"),
    [
        (123, DEFAULT_MARKUP, 615),
        (1, Decimal("1.000001"), 2),
        (3, Decimal("0.5"), 2),
        (0, DEFAULT_MARKUP, 0),
        (1_000_000, Decimal("1.25"), 1_250_000),
    ],
)
def test_billed_amount_examples(cost: int, markup: Decimal, billed: int) -> None:
    assert billed_amount(cost, markup) == billed


@pytest.mark.parametrize(
    ("cost", "markup"),
    [
        (-1, DEFAULT_MARKUP),
        (1.0, DEFAULT_MARKUP),
        (True, DEFAULT_MARKUP),
        (100, 5.0),
        (100, 5),
        (100, Decimal(0)),
        (100, Decimal(-2)),
        (100, Decimal("NaN")),
        (100, Decimal("Infinity")),
        (100, Decimal("1.0000001")),
    ],
)
def test_billed_amount_refuses_bad_cost_or_markup(cost: Any, markup: Any) -> None:
    with pytest.raises(ValidationFailed):
        billed_amount(cost, markup)


# --- tokens_cost_micros ----------------------------------------------------------------------


@given(
    st.integers(min_value=0, max_value=10**9),
    st.integers(min_value=0, max_value=10**9),
)
def test_token_cost_is_the_ceiling_of_the_exact_cost(tokens: int, price: int) -> None:
    cost = tokens_cost_micros(tokens, price)
    exact_cost = Fraction(tokens * price, 1_000_000)
    assert type(cost) is int
    assert exact_cost <= cost < exact_cost + 1


@pytest.mark.parametrize(
    ("tokens", "price", "cost"),
    [(1, 1, 1), (1_000_000, 3_000_000, 3_000_000), (1, 3_000_000, 3), (0, 15_000_000, 0)],
)
def test_token_cost_examples(tokens: int, price: int, cost: int) -> None:
    assert tokens_cost_micros(tokens, price) == cost


@pytest.mark.parametrize(("tokens", "price"), [(-1, 1), (1, -1), (1.5, 1), (1, 2.5)])
def test_token_cost_refuses_negative_or_non_integer_input(tokens: Any, price: Any) -> None:
    with pytest.raises(ValidationFailed):
        tokens_cost_micros(tokens, price)


# --- round_up_to_increment -------------------------------------------------------------------


@given(st.integers(min_value=-(10**15), max_value=10**15), increments)
def test_rounded_line_is_the_next_multiple_of_the_increment(micros: int, increment: int) -> None:
    rounded = round_up_to_increment(micros, increment)
    assert rounded % increment == 0
    assert micros <= rounded < micros + increment


@given(st.integers(min_value=-(10**12), max_value=10**12), increments)
def test_rounding_leaves_multiples_unchanged(multiple: int, increment: int) -> None:
    assert round_up_to_increment(multiple * increment, increment) == multiple * increment


@given(
    st.integers(min_value=-(10**12), max_value=10**12),
    st.integers(min_value=-(10**12), max_value=10**12),
    increments,
)
def test_rounding_is_monotone(first: int, second: int, increment: int) -> None:
    low, high = sorted((first, second))
    assert round_up_to_increment(low, increment) <= round_up_to_increment(high, increment)


@given(st.lists(st.integers(min_value=0, max_value=10**12), max_size=50), increments)
def test_statement_of_rounded_lines_never_bills_less_than_its_exact_total(
    lines: list[int], increment: int
) -> None:
    rounded_total = sum(round_up_to_increment(line, increment) for line in lines)
    exact_total = sum(lines)
    assert rounded_total % increment == 0
    assert rounded_total >= round_up_to_increment(exact_total, increment) >= exact_total
    assert rounded_total - exact_total < max(len(lines), 1) * increment


@pytest.mark.parametrize(
    ("micros", "rounded"),
    [
        (0, 0),
        (1, 250_000),
        (250_000, 250_000),
        (250_001, 500_000),
        (1_000_000, 1_000_000),
        (-1, 0),
        (-300_000, -250_000),
    ],
)
def test_default_increment_rounds_up_to_a_quarter_dollar(micros: int, rounded: int) -> None:
    assert round_up_to_increment(micros) == rounded


@pytest.mark.parametrize("increment", [0, -250_000, 0.25, True])
def test_increment_must_be_a_positive_int(increment: Any) -> None:
    with pytest.raises(ValidationFailed, match="increment"):
        round_up_to_increment(1, increment)


def test_rounding_refuses_float_amounts() -> None:
    with pytest.raises(ValidationFailed, match="float"):
        round_up_to_increment(0.1)  # type: ignore[arg-type]
