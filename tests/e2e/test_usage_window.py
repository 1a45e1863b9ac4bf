"""``usage`` over a window whose ``from`` is after its ``to`` is a VALIDATION error, not ``[]``."""

from __future__ import annotations

from e2e_stack import Stack

USAGE = (
    "query($ws: ID!, $from: DateTime!, $to: DateTime!) {"
    " usage(workspaceId: $ws, from: $from, to: $to, groupBy: DAY) { key calls } }"
)


def test_a_backwards_usage_window_is_refused_and_an_empty_one_is_empty(stack: Stack) -> None:
    alice, ws = stack.owner_with_workspace()

    backwards = alice.post(
        USAGE, {"ws": ws, "from": "2025-03-05T00:00:00Z", "to": "2025-03-01T00:00:00Z"}
    )
    empty = alice.post(
        USAGE, {"ws": ws, "from": "2025-03-01T00:00:00Z", "to": "2025-03-01T00:00:00Z"}
    )

    assert backwards.codes == ["VALIDATION"]
    assert "after" in backwards.errors[0]["message"]
    assert empty.errors == []
    assert empty.data["usage"] == []
