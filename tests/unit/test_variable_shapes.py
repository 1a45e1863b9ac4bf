"""The shape check of a GraphQL request's ``variables``: how deep, how many, at a bounded cost."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from read_api.input_checks import MAX_VARIABLE_NESTING, MAX_VARIABLE_VALUES, shape_problem


class CountedList(list[object]):
    """A JSON array that counts how many of its items were looked at."""

    looked_at = 0

    def __iter__(self) -> Iterator[object]:
        for item in super().__iter__():
            CountedList.looked_at += 1
            yield item


def _problem(value: object) -> str | None:
    return shape_problem(value, depth=MAX_VARIABLE_NESTING, values=MAX_VARIABLE_VALUES)


@pytest.mark.parametrize(
    "variables",
    [
        {"big": CountedList([CountedList([0]) for _ in range(1_000_000)])},
        {"a": CountedList([0] * 999), "b": CountedList([0] * 1_000_000)},
        {"a": CountedList([CountedList([0] * 999)]), "b": CountedList([0])},
    ],
    ids=["one-list", "lists-side-by-side", "nested"],
)
def test_more_values_than_the_bound_are_refused_having_looked_at_no_more_than_it(
    variables: dict[str, object],
) -> None:
    CountedList.looked_at = 0
    assert _problem(variables) == f"hold more than {MAX_VARIABLE_VALUES} values"
    assert CountedList.looked_at <= MAX_VARIABLE_VALUES


def _nested(levels: int) -> object:
    value: object = 0
    for _ in range(levels):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("variables", "problem"),
    [
        ({"x": [0] * (MAX_VARIABLE_VALUES - 1)}, None),
        ({"x": [0] * MAX_VARIABLE_VALUES}, f"hold more than {MAX_VARIABLE_VALUES} values"),
        ({f"v{n}": {"k": n} for n in range(MAX_VARIABLE_VALUES // 2)}, None),
        ({"x": _nested(MAX_VARIABLE_NESTING - 1)}, None),
        ({"x": _nested(MAX_VARIABLE_NESTING)}, f"nest deeper than {MAX_VARIABLE_NESTING} levels"),
        ({"lanes": [{"name": f"l{n}", "wipLimit": n} for n in range(50)]}, None),
        ({}, None),
    ],
    ids=["under", "over", "many-small", "deep-enough", "too-deep", "fifty-lanes", "none"],
)
def test_the_bounds_are_exact(variables: dict[str, object], problem: str | None) -> None:
    assert _problem(variables) == problem
