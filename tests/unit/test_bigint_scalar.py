"""``BigInt``: an integer as a decimal string. An answer is exact whatever its size; an input is
taken strictly (a canonical decimal string or an ``Int``, within signed 64 bits), as a variable
and as a literal, and anything else is refused with ``VALIDATION``."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest
import strawberry
from hypothesis import given
from hypothesis import strategies as st
from strawberry.schema.config import StrawberryConfig

from domain.errors import ValidationFailed
from read_api.errors import ErrorShaping
from read_api.execution import LeafShortcutExecution
from read_api.scalars import (
    BIGINT_MAX,
    BIGINT_MIN,
    SCALARS,
    BigInt,
    _parse_bigint,
    _serialize_bigint,
)
from read_api.schema import schema_sdl

CANONICAL = re.compile(r"0|-?[1-9][0-9]*")
bigints = st.integers(BIGINT_MIN, BIGINT_MAX)


@strawberry.type
class Query:
    @strawberry.field
    def echo(self, n: BigInt) -> BigInt:
        return n

    @strawberry.field
    def big(self) -> BigInt:
        return BigInt(10**30)


SCHEMA = strawberry.Schema(
    query=Query,
    config=StrawberryConfig(scalar_map=SCALARS),
    execution_context_class=LeafShortcutExecution,
    extensions=[ErrorShaping],
)


def _echo(literal: str | None = None, value: object = None) -> tuple[Any, list[Any]]:
    """``echo`` of a literal written in the document, or of a variable's JSON value."""
    if literal is not None:
        result = asyncio.run(SCHEMA.execute(f"{{ echo(n: {literal}) }}"))
    else:
        result = asyncio.run(
            SCHEMA.execute("query($n: BigInt!) { echo(n: $n) }", variable_values={"n": value})
        )
    return result.data, [e.formatted["extensions"]["code"] for e in result.errors or ()]


# -- serialization ----------------------------------------------------------------------------


@given(st.integers())
def test_an_answer_is_the_exact_canonical_decimal_whatever_its_size(value: int) -> None:
    text = _serialize_bigint(value)

    assert CANONICAL.fullmatch(text)
    assert int(text) == value


@pytest.mark.parametrize("value", [True, 1.0, "1", None])
def test_only_an_int_is_served_as_a_bigint(value: object) -> None:
    with pytest.raises(TypeError):
        _serialize_bigint(value)


def test_an_answer_past_64_bits_is_still_exact() -> None:
    assert asyncio.run(SCHEMA.execute("{ big }")).data == {"big": "1" + "0" * 30}


# -- parsing ----------------------------------------------------------------------------------


@given(bigints)
def test_every_64_bit_integer_round_trips(value: int) -> None:
    assert _parse_bigint(_serialize_bigint(value)) == value
    assert _parse_bigint(value) == value


@given(bigints)
def test_every_64_bit_integer_round_trips_through_graphql(value: int) -> None:
    text = str(value)
    assert _echo(value=text) == ({"echo": text}, [])
    assert _echo(value=value) == ({"echo": text}, [])
    assert _echo(literal=f'"{text}"') == ({"echo": text}, [])
    assert _echo(literal=text) == ({"echo": text}, [])


@given(st.one_of(st.text(max_size=24), st.from_regex(r"\A[-+ 0-9_]{1,22}\Z")))
def test_a_string_is_taken_only_as_the_canonical_decimal_of_a_64_bit_integer(text: str) -> None:
    try:
        parsed = _parse_bigint(text)
    except ValidationFailed:
        assert not CANONICAL.fullmatch(text) or not BIGINT_MIN <= int(text) <= BIGINT_MAX
    else:
        assert _serialize_bigint(parsed) == text


REFUSED: list[object] = [
    "", " 1", "1 ", "+1", "01", "-0", "--1", "1_000", "1e9", "3.0", "0x10",
    "\u0661\u0662", "\uff11\uff12",  # Arabic-Indic and fullwidth digits: int() takes them
    str(BIGINT_MAX + 1), str(BIGINT_MIN - 1), "9" * 1000,
    BIGINT_MAX + 1, BIGINT_MIN - 1, 3.0, 3e9, float("nan"), True, False, None, [], {},
]  # fmt: skip


@pytest.mark.parametrize("value", REFUSED, ids=repr)
def test_anything_else_is_refused(value: object) -> None:
    with pytest.raises(ValidationFailed):
        _parse_bigint(value)


@pytest.mark.parametrize("value", [v for v in REFUSED if v is not None], ids=repr)
def test_a_refused_variable_is_a_validation_error(value: object) -> None:
    assert _echo(value=value) == (None, ["VALIDATION"])


@pytest.mark.parametrize(
    "literal", ["3e9", "3000000000.0", "true", '"+1"', '"01"', str(BIGINT_MAX + 1), "null"]
)
def test_a_refused_literal_is_a_validation_error(literal: str) -> None:
    assert _echo(literal=literal) == (None, ["VALIDATION"])


def test_the_schema_describes_the_scalar() -> None:
    sdl = schema_sdl()
    described = sdl[: sdl.index("scalar BigInt")].rsplit('"""', 2)[1]

    assert "decimal digits" in described
    assert "2147483647" in described
