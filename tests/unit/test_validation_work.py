"""How much work validating a document may take: graphql-core's check that same-named fields
merge compares them pairwise, and its own budget let one document take seconds."""

from __future__ import annotations

import pytest
from graphql.validation.rules import overlapping_fields_can_be_merged as merging

from read_api.schema import build_schema
from read_api.services import QueryLimits

#: Within the default token limit (4,000).
REPEATED = ["query { " + "me { id } " * 950 + "}", "query { " + "__typename " * 3900 + "}"]


@pytest.fixture
def spent(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """What the merge rule charges its budget, charge by charge."""
    charges: list[int] = []
    charge = merging.spend_complexity_budget

    def counted(context: object, cost: int) -> None:
        charges.append(cost)
        charge(context, cost)  # type: ignore[arg-type]

    monkeypatch.setattr(merging, "spend_complexity_budget", counted)
    return charges


@pytest.mark.parametrize("document", REPEATED, ids=["me", "typename"])
def test_a_document_repeating_a_field_stops_within_the_budget_and_says_why(
    spent: list[int], document: str
) -> None:
    limits = QueryLimits()
    result = build_schema(limits).execute_sync(document)
    assert [e.extensions for e in result.errors or []] == [{"code": "VALIDATION"}]
    assert "too complex to validate" in (result.errors or [])[0].message
    assert sum(spent) <= limits.max_field_merge_work + max(spent)


def test_fields_asked_for_a_few_times_over_are_valid(spent: list[int]) -> None:
    result = build_schema().execute_sync("query { " + "__typename " * 50 + "a: __typename }")
    assert result.errors is None
    assert result.data == {"__typename": "Query", "a": "Query"}
    assert 0 < sum(spent) < QueryLimits().max_field_merge_work


def test_bounded_validation_runs_every_rule_strawberrys_own_validation_adds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """read_api.limits.validate_bounded stands in for strawberry's validate_document (to stop
    after a few errors) and so repeats the rules strawberry adds to the schema's: a strawberry
    that adds another would have it skipped here, silently. Both are asked to validate with no
    rules of ours and say which rules they ran."""
    from graphql import parse
    from strawberry.schema import schema as strawberry_schema

    from read_api import limits

    ran: dict[str, tuple[type, ...]] = {}

    def recording(name: str) -> object:
        def validate(
            _schema: object, _document: object, rules: tuple[type, ...], **_: object
        ) -> list[object]:
            ran[name] = tuple(rules)
            return []

        return validate

    graphql_schema = build_schema()._schema
    document = parse("{ __typename }")
    monkeypatch.setattr(strawberry_schema, "validate", recording("strawberry"))
    strawberry_schema.validate_document(graphql_schema, document, ())
    monkeypatch.setattr(limits, "validate", recording("ours"))
    limits.validate_bounded(graphql_schema, document, ())
    assert ran["ours"] == ran["strawberry"]
