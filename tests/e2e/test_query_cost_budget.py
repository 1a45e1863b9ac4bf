"""Budgets of executed fields a minute, per user and per workspace (``read_api.ratelimit``):
within every per-request bound one request may execute 100,000 fields, about a second of the
API's event loop, so one tenant's client at its request rate could keep every other tenant's
requests waiting."""

from __future__ import annotations

import secrets
from itertools import count

from api_client import ApiClient
from e2e_stack import MakeStack, Stack, user_id
from rate_windows import clear_of_a_window_end

from read_api.services import RateLimits

_MEMBERS = "query($ws: ID!) {{ w{n}: workspace(id: $ws) {{ id name members {{ userId role }} }} }}"


def _budgeted(make_stack: MakeStack, **budgets: int | None) -> Stack:
    clear_of_a_window_end(15)
    return make_stack(
        rate_limits=RateLimits(
            per_user_per_minute=100_000, per_workspace_per_minute=100_000,
            per_address_per_minute=100_000, key_prefix=f"cost-{secrets.token_hex(4)}", **budgets,
        )
    )  # fmt: skip


def _add_member(owner: ApiClient, workspace: str, user: str) -> None:
    owner.data(
        "mutation($ws: ID!, $u: ID!) { addMember(input: {workspaceId: $ws, userId: $u,"
        " role: MEMBER}) { consistencyToken } }",
        {"ws": workspace, "u": user_id(user)},
    )


def _until_refused(
    stack: Stack, client: ApiClient, workspace: str, most: int = 100
) -> tuple[int, int]:
    """Ask a new (uncached) question of the workspace until refused: how many were answered,
    and the fields they executed, as the API counted them."""
    numbered = count()
    executed = 0
    for answered in range(most):
        before = len(stack.stats)
        answer = client.post(_MEMBERS.format(n=next(numbered)), {"ws": workspace})
        if answer.status == 429:
            assert answer.codes == ["RATE_LIMITED"]
            assert "executed fields per minute" in answer.errors[0]["message"]
            assert 1 <= int(answer.headers["Retry-After"]) <= 60
            return answered, executed
        assert answer.status == 200, answer.body
        assert not answer.errors
        executed += sum(s.executed for s in stack.stats[before:])
    raise AssertionError(f"{most} requests answered, none refused")


def test_a_users_requests_are_refused_once_their_minute_of_executed_fields_is_spent(
    make_stack: MakeStack,
) -> None:
    stack = _budgeted(make_stack, cost_per_user_per_minute=400, cost_per_workspace_per_minute=None)
    bob, workspace = stack.owner_with_workspace("bob")
    _add_member(bob, workspace, "alice")
    answered, executed = _until_refused(
        stack, stack.as_user("alice", workspace, "MEMBER"), workspace
    )
    # Refused at the first request after the fields it executed reached the budget (each
    # request executes what it asks for whole, so the last one may go past it).
    assert answered >= 2
    assert executed >= 400
    assert executed - executed // answered < 400
    # Another user has a budget of their own.
    assert bob.post(_MEMBERS.format(n="b"), {"ws": workspace}).status == 200


def test_a_workspaces_budget_is_shared_by_its_users(make_stack: MakeStack) -> None:
    stack = _budgeted(make_stack, cost_per_user_per_minute=None, cost_per_workspace_per_minute=300)
    carol, workspace = stack.owner_with_workspace("carol")
    _add_member(carol, workspace, "dave")
    _add_member(carol, workspace, "erin")
    _until_refused(stack, stack.as_user("dave", workspace, "MEMBER"), workspace)
    refused = stack.as_user("erin", workspace, "MEMBER").post(
        _MEMBERS.format(n="e"), {"ws": workspace}
    )
    assert refused.status == 429
    assert "for this workspace" in refused.errors[0]["message"]
    frank, elsewhere = stack.owner_with_workspace("frank", "Elsewhere")
    assert frank.post(_MEMBERS.format(n="f"), {"ws": elsewhere}).status == 200


def test_without_budgets_nothing_is_refused(make_stack: MakeStack) -> None:
    stack = _budgeted(make_stack, cost_per_user_per_minute=None, cost_per_workspace_per_minute=None)
    owner, workspace = stack.owner_with_workspace("gina")
    statuses = {owner.post(_MEMBERS.format(n=n), {"ws": workspace}).status for n in range(40)}
    assert statuses == {200}
