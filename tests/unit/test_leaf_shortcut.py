"""The leaf shortcut answers exactly as graphql-core's own execution does, errors included (an
``Int`` past 32 bits named as ``INT_OVERFLOW`` on both paths: tests/unit/test_int_overflow.py)."""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass
from typing import Any

import strawberry
from hypothesis import given, settings
from hypothesis import strategies as st
from strawberry.schema.config import StrawberryConfig
from strawberry.schema.schema import StrawberryGraphQLCoreExecutionContext

from read_api.execution import LeafShortcutExecution, NamedIntOverflow
from read_api.scalars import SCALARS, Money


@strawberry.enum
class Phase(enum.Enum):
    QUEUED = "queued"
    DONE = "done"


@strawberry.type
class Thing:
    display_name: str
    nickname: str | None
    count: int
    cost: Money
    phase: Phase
    tags: list[str]
    maybe_tags: list[str | None] | None

    @strawberry.field
    def shout(self, times: int = 1) -> str:
        return self.display_name.upper() * times


@dataclass
class Source:
    """Whatever a resolver handed over: not always what the schema promises."""

    display_name: Any
    nickname: Any
    count: Any
    cost: Any
    phase: Any
    tags: Any
    maybe_tags: Any


@strawberry.type
class Query:
    things: strawberry.Private[list[Source]]

    @strawberry.field
    def items(self) -> list[Thing]:
        return self.things  # type: ignore[return-value]


def _schema(execution: type[StrawberryGraphQLCoreExecutionContext]) -> strawberry.Schema:
    return strawberry.Schema(
        query=Query,
        config=StrawberryConfig(scalar_map=SCALARS),
        execution_context_class=execution,
    )


SHORTCUT = _schema(LeafShortcutExecution)
#: The general path alone: graphql-core's execution, with an Int overflow named.
GRAPHQL_CORE = _schema(NamedIntOverflow)

QUERY = """
query ($n: Int!, $skipTags: Boolean!) {
  items {
    displayName nickname count cost phase
    tags @skip(if: $skipTags)
    maybeTags
    alias: displayName
    shout(times: $n)
    __typename
  }
}
"""


def _answer(schema: strawberry.Schema, sources: list[Source], skip: bool) -> Any:
    result = asyncio.run(
        schema.execute(
            QUERY,
            variable_values={"n": 2, "skipTags": skip},
            root_value=Query(things=sources),
        )
    )
    errors = sorted(
        (
            str(e.message),
            tuple(e.path or ()),
            tuple((loc.line, loc.column) for loc in e.locations or ()),
        )
        for e in result.errors or ()
    )
    return result.data, errors


anything = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.text(max_size=5),
    st.sampled_from([Phase.QUEUED, Phase.DONE, 1.5, float("nan")]),
)
sources = st.builds(
    Source,
    display_name=st.one_of(st.text(max_size=5), anything),
    nickname=anything,
    count=st.one_of(st.integers(-5, 5), anything),
    cost=st.one_of(st.integers(0, 10**9), anything),
    phase=st.one_of(st.sampled_from(list(Phase)), anything),
    tags=st.one_of(
        st.lists(st.text(max_size=3), max_size=3), st.lists(anything, max_size=3), anything
    ),
    maybe_tags=st.one_of(st.lists(st.one_of(st.none(), st.text(max_size=3)), max_size=3), anything),
)


@settings(max_examples=300, deadline=None)
@given(things=st.lists(sources, max_size=3), skip=st.booleans())
def test_answers_and_errors_match_graphql_cores_own_execution(
    things: list[Source], skip: bool
) -> None:
    assert _answer(SHORTCUT, things, skip) == _answer(GRAPHQL_CORE, things, skip)


def test_a_null_in_a_non_null_field_is_an_error_at_that_fields_path() -> None:
    good = Source("a", None, 1, 2_500_000, Phase.DONE, ["x"], None)
    bad = Source(None, None, 1, 0, Phase.QUEUED, [], [None, "y"])

    data, errors = _answer(SHORTCUT, [good, bad], skip=False)

    # The null climbs to the nearest nullable parent (here the whole answer), as the spec says,
    # and the error points at the field that broke the promise.
    assert data is None
    assert errors == [
        (
            "Cannot return null for non-nullable field Thing.displayName.",
            ("items", 1, "displayName"),
            ((4, 5),),
        )
    ]


def test_plain_fields_come_back_serialized() -> None:
    thing = Source("a", "b", 3, 1_250_000, Phase.DONE, ["x", "y"], ["z", None])

    data, errors = _answer(SHORTCUT, [thing], skip=False)

    assert errors == []
    assert data["items"][0] == {
        "displayName": "a",
        "nickname": "b",
        "count": 3,
        "cost": "1.250000",
        "phase": "DONE",
        "tags": ["x", "y"],
        "maybeTags": ["z", None],
        "alias": "a",
        "shout": "AA",
        "__typename": "Thing",
    }
