"""A replayed commandId, over HTTP: the first result, but only for a caller who could run the
command now (API.md, "Tokens"; issue 10)."""

from __future__ import annotations

from typing import TYPE_CHECKING
from uuid import uuid4

if TYPE_CHECKING:
    from e2e_stack import Stack

SET_LIMIT = """mutation($input: SetSpendLimitInput!) {
  setSpendLimit(input: $input) { consistencyToken workspace { monthlyLimit } } }"""


def test_viewer_replaying_an_owners_set_spend_limit_gets_forbidden_not_the_payload(
    stack: Stack,
) -> None:
    owner, workspace_id = stack.owner_with_workspace(user=f"owner-{uuid4().hex[:6]}")
    viewer_id = str(uuid4())
    owner.add_member(workspace_id, viewer_id, "VIEWER")
    viewer = stack.as_user(viewer_id, workspace_id, "VIEWER")
    command = {"workspaceId": workspace_id, "monthlyLimit": "250.00", "commandId": str(uuid4())}

    first = owner.post(SET_LIMIT, {"input": command})
    replayed_by_owner = owner.post(SET_LIMIT, {"input": command})
    replayed_by_viewer = viewer.post(SET_LIMIT, {"input": command})

    assert first.errors == []
    assert replayed_by_owner.errors == []
    token = first.data["setSpendLimit"]["consistencyToken"]
    assert replayed_by_owner.data["setSpendLimit"]["consistencyToken"] == token
    assert replayed_by_viewer.codes == ["FORBIDDEN"]
    assert replayed_by_viewer.data is None
