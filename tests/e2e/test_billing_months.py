"""Every GraphQL field that takes a billing month takes the months the domain's one parser
(``domain.months.parse_month``) takes, and refuses the others with its VALIDATION message.

``statement`` read its month with a pattern of its own that let year 0000 through (an empty
statement of a month no ``datetime`` holds) where ``reconciliation`` refused it, and both took
9999-12, a month whose end no ``datetime`` holds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from domain.errors import ValidationFailed
from domain.months import FIRST_MONTH, LAST_MONTH, parse_month

if TYPE_CHECKING:
    from e2e_stack import Stack

QUERIES = {
    "statement": (
        "query($ws: ID!, $m: String!) { statement(workspaceId: $ws, month: $m) { month } }"
    ),
    "reconciliation": (
        "query($ws: ID!, $m: String!) { reconciliation(workspaceId: $ws, month: $m) { month } }"
    ),
}


def _refusal(month: str) -> str:
    with pytest.raises(ValidationFailed) as refused:
        parse_month(month)
    return str(refused.value)


@pytest.mark.parametrize("field", sorted(QUERIES))
def test_months_outside_the_billing_range_are_refused_alike(stack: Stack, field: str) -> None:
    alice, ws = stack.owner_with_workspace("alice", "Acme")
    for month in ["0000-01", "0000-12", "9999-12", "2026-13", "2026-1", "x" * 100]:
        answer = alice.post(QUERIES[field], {"ws": ws, "m": month})
        assert answer.codes == ["VALIDATION"], (month, answer.body)
        assert answer.errors[0]["message"] == _refusal(month), month
        assert answer.data is None
    for month in [FIRST_MONTH, LAST_MONTH]:
        assert alice.data(QUERIES[field], {"ws": ws, "m": month})[field]["month"] == month
