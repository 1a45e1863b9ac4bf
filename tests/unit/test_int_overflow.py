"""A value past GraphQL's ``Int`` (a signed 32-bit integer) in a field typed ``Int`` is an
``INT_OVERFLOW`` error at that field, naming the field, the limit and where to read the count
(the field's ``metadata``), on the leaf shortcut and on the general path alike; the fields that
may carry such counts stay plain leaves (the shortcut, counting 1 in the executed budget)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import strawberry
from graphql import GraphQLObjectType
from hypothesis import given
from hypothesis import strategies as st
from strawberry.schema.config import StrawberryConfig
from strawberry.schema.schema import StrawberryGraphQLCoreExecutionContext

from read_api.errors import ErrorShaping
from read_api.execution import LeafShortcutExecution, NamedIntOverflow
from read_api.scalars import INSTEAD, INT_MAX, INT_MIN, SCALARS, BigInt
from read_api.schema import build_schema


@strawberry.type
class Row:
    name: str
    count: int = strawberry.field(metadata={INSTEAD: "countTotal"})
    count_total: BigInt
    spare: int | None

    @strawberry.field
    def doubled(self) -> int:
        return self.count * 2


@strawberry.type
class Query:
    held: strawberry.Private[list[Row]]

    @strawberry.field
    def rows(self) -> list[Row]:
        return self.held


def _schema(execution: type[StrawberryGraphQLCoreExecutionContext]) -> strawberry.Schema:
    return strawberry.Schema(
        query=Query,
        config=StrawberryConfig(scalar_map=SCALARS),
        execution_context_class=execution,
        extensions=[ErrorShaping],
    )


EXECUTIONS = {
    "shortcut": _schema(LeafShortcutExecution),
    "general": _schema(NamedIntOverflow),
}
GRAPHQL_CORE = _schema(StrawberryGraphQLCoreExecutionContext)


def _row(count: int, spare: int | None = None) -> Row:
    return Row(name="a", count=count, count_total=BigInt(count), spare=spare)


def _run(schema: strawberry.Schema, query: str, *rows: Row) -> tuple[Any, list[dict[str, Any]]]:
    result = asyncio.run(schema.execute(query, root_value=Query(held=list(rows))))
    return result.data, [dict(error.formatted) for error in result.errors or ()]


@pytest.fixture(params=sorted(EXECUTIONS))
def schema(request: pytest.FixtureRequest) -> strawberry.Schema:
    return EXECUTIONS[request.param]


def test_graphql_cores_own_refusal_is_generic() -> None:
    """What the API answered before: the client's fault (VALIDATION), no field to read."""
    data, errors = _run(GRAPHQL_CORE, "{ rows { count } }", _row(2**31))

    assert data is None
    assert [(e["message"], e["extensions"]) for e in errors] == [
        ("Int cannot represent non 32-bit signed integer value: 2147483648", {"code": "VALIDATION"})
    ]


def test_a_count_past_int_is_int_overflow_naming_its_companion(schema: strawberry.Schema) -> None:
    data, errors = _run(schema, "{ rows { name count } }", _row(1), _row(2**31))

    assert data is None  # Int! in [Row!]! in a non-null root: the null climbs to the answer
    assert errors == [
        {
            "message": "Row.count is 2147483648, which GraphQL's Int (a signed 32-bit integer, "
            "-2147483648 to 2147483647) cannot carry; read countTotal (BigInt, a decimal "
            "string) instead",
            "locations": [{"line": 1, "column": 15}],
            "path": ["rows", 1, "count"],
            "extensions": {
                "code": "INT_OVERFLOW",
                "field": "Row.count",
                "value": "2147483648",
                "max": INT_MAX,
                "instead": "countTotal",
            },
        }
    ]


def test_the_companion_carries_the_count(schema: strawberry.Schema) -> None:
    data, errors = _run(schema, "{ rows { countTotal } }", _row(1), _row(2**31), _row(-(2**40)))

    assert errors == []
    assert [row["countTotal"] for row in data["rows"]] == ["1", "2147483648", "-1099511627776"]


def test_a_nullable_int_past_the_limit_is_null_alone(schema: strawberry.Schema) -> None:
    data, errors = _run(schema, "{ rows { name spare } }", _row(1, spare=INT_MIN - 1))

    assert data == {"rows": [{"name": "a", "spare": None}]}
    assert [(e["path"], e["extensions"]) for e in errors] == [
        (
            ["rows", 0, "spare"],
            {"code": "INT_OVERFLOW", "field": "Row.spare", "value": "-2147483649", "max": INT_MAX},
        )
    ]
    assert "read" not in errors[0]["message"]  # no companion to name


@pytest.mark.parametrize(
    ("query", "field", "instead"),
    [
        ("{ rows { doubled } }", "Row.doubled", None),  # a resolver's: 2^30 doubled
        ("{ rows { count @include(if: true) } }", "Row.count", "countTotal"),  # a directive's
    ],
)
def test_fields_off_the_shortcut_are_named_alike(
    schema: strawberry.Schema, query: str, field: str, instead: str | None
) -> None:
    data, errors = _run(schema, query, _row(2**30 if field == "Row.doubled" else 2**31))

    assert data is None
    (error,) = errors
    assert error["extensions"]["code"] == "INT_OVERFLOW"
    assert error["extensions"]["field"] == field
    assert error["extensions"].get("instead") == instead


edges = st.sampled_from([INT_MIN - 1, INT_MIN, -1, 0, INT_MAX, INT_MAX + 1, 2**63, -(2**63)])


@given(count=st.one_of(edges, st.integers(-(2**40), 2**40)))
def test_an_int_answers_its_value_when_it_fits_and_int_overflow_when_not(count: int) -> None:
    answers = [
        _run(schema, "{ rows { count countTotal } }", _row(count)) for schema in EXECUTIONS.values()
    ]

    assert answers[0] == answers[1]
    data, errors = answers[0]
    if INT_MIN <= count <= INT_MAX:
        assert errors == []
        assert data == {"rows": [{"count": count, "countTotal": str(count)}]}
    else:
        assert data is None
        assert [e["extensions"]["code"] for e in errors] == ["INT_OVERFLOW"]
        assert errors[0]["extensions"]["value"] == str(count)


COUNTS = {
    "UsageRow": {
        "calls": "callsTotal",
        "inputTokens": "inputTokensTotal",
        "outputTokens": "outputTokensTotal",
    },
    "AgentRun": {
        "inputTokens": "usage(groupBy: AGENT_RUN) { inputTokensTotal }",
        "outputTokens": "usage(groupBy: AGENT_RUN) { outputTokensTotal }",
    },
}


def test_the_apis_counts_name_their_companions_and_stay_plain_leaves() -> None:
    """A resolver would take them off the shortcut: four times the executed budget each."""
    types = build_schema()._schema.type_map
    for type_name, counts in COUNTS.items():
        owner = types[type_name]
        assert isinstance(owner, GraphQLObjectType)
        fields = owner.fields
        for name, instead in counts.items():
            field = fields[name]
            assert str(field.type) == "Int!", name
            definition = field.extensions["strawberry-definition"]
            assert definition.metadata[INSTEAD] == instead
            assert getattr(field.resolve, "_is_default", False), name
            if type_name == "UsageRow":
                assert str(fields[instead].type) == "BigInt!"
                assert getattr(fields[instead].resolve, "_is_default", False), instead
