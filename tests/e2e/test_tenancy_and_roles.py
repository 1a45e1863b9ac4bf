"""A token sees one workspace; inside it, what a member may change depends on their role."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID, uuid4

import pytest
from api_client import ApiClient, subscribe
from e2e_stack import Stack, user_id

from commands import models as m
from commands.handlers import Actor
from domain.project import Project
from read_api.db import Offloader, ReadScope, StatementCounter

MONTH = datetime.now(UTC).strftime("%Y-%m")


@dataclass
class Tenant:
    client: ApiClient
    workspace: str
    project: str
    card: str
    run: str


def _tenant(stack: Stack, user: str, name: str) -> Tenant:
    client, ws = stack.owner_with_workspace(user, name)
    project = client.create_project(ws, f"{name} project", [{"name": "Todo"}, {"name": "Doing"}])
    pid = project["project"]["id"]
    card = client.create_card(pid, f"{name} card")["card"]["id"]
    run = client.start_agent_run(card)["run"]["id"]
    return Tenant(client, ws, pid, card, run)


QUERIES_ANSWERING_NULL = [
    ("query($id: ID!) { workspace(id: $id) { id } }", "workspace", "workspace"),
    ("query($id: ID!) { project(id: $id) { id } }", "project", "project"),
    ("query($id: ID!) { board(projectId: $id) { projectId } }", "project", "board"),
    ("query($id: ID!) { card(id: $id) { id } }", "card", "card"),
    ("query($id: ID!) { agentRun(id: $id) { id } }", "run", "agentRun"),
]

QUERIES_ANSWERING_NOT_FOUND = [
    ("query($id: ID!) { cardHistory(cardId: $id) { version } }", "card"),
    ("query($id: ID!) { agentRunLogs(runId: $id) { seq } }", "run"),
    ("query($id: ID!) { searchLogs(workspaceId: $id, query: \"card\") { seq } }", "workspace"),
    (
        "query($id: ID!) { usage(workspaceId: $id, from: \"2020-01-01T00:00:00Z\","
        " to: \"2030-01-01T00:00:00Z\", groupBy: DAY) { key } }",
        "workspace",
    ),
    (f"query($id: ID!) {{ statement(workspaceId: $id, month: \"{MONTH}\") {{ total }} }}",
     "workspace"),
    (f"query($id: ID!) {{ reconciliation(workspaceId: $id, month: \"{MONTH}\") {{ ok }} }}",
     "workspace"),
    ("query($id: ID!) { activity(workspaceId: $id) { edges { cursor } } }", "workspace"),
]  # fmt: skip

MUTATIONS: list[tuple[str, dict[str, Any]]] = [
    ("renameWorkspace", {"workspaceId": "workspace", "name": "mine now"}),
    ("addMember", {"workspaceId": "workspace", "userId": user_id("mallory"), "role": "OWNER"}),
    ("changeRole", {"workspaceId": "workspace", "userId": user_id("bob"), "role": "VIEWER"}),
    ("removeMember", {"workspaceId": "workspace", "userId": user_id("bob")}),
    ("setSpendLimit", {"workspaceId": "workspace", "monthlyLimit": "1.00"}),
    ("createProject", {"workspaceId": "workspace", "name": "intruder"}),
    ("setWipLimit", {"projectId": "project", "lane": "Todo", "wipLimit": 1}),
    ("addLane", {"projectId": "project", "name": "Mine"}),
    ("renameLane", {"projectId": "project", "lane": "Todo", "name": "Mine"}),
    ("reorderLanes", {"projectId": "project", "order": ["Doing", "Todo"]}),
    ("removeLane", {"projectId": "project", "lane": "Doing"}),
    ("archiveProject", {"projectId": "project"}),
    ("createCard", {"projectId": "project", "title": "planted"}),
    ("updateCard", {"cardId": "card", "title": "defaced"}),
    ("moveCard", {"cardId": "card", "toLane": "Doing"}),
    ("assignCard", {"cardId": "card", "assignee": user_id("mallory")}),
    ("archiveCard", {"cardId": "card"}),
    ("restoreCard", {"cardId": "card"}),
    ("blockCard", {"cardId": "card", "reason": "mine"}),
    ("unblockCard", {"cardId": "card"}),
    ("startAgentRun", {"cardId": "card", "agent": "coder"}),
    ("cancelAgentRun", {"runId": "run"}),
]

INPUT_TYPES = {name: name[0].upper() + name[1:] + "Input" for name, _ in MUTATIONS}


def _mutation(name: str) -> str:
    return (
        f"mutation($input: {INPUT_TYPES[name]}!) {{ {name}(input: $input) {{ consistencyToken }} }}"
    )


def _resolve(fields: dict[str, Any], tenant: Tenant) -> dict[str, Any]:
    targets = {"workspace": tenant.workspace, "project": tenant.project, "card": tenant.card,
               "run": tenant.run}  # fmt: skip
    return {key: targets.get(value, value) if isinstance(value, str) else value
            for key, value in fields.items()}  # fmt: skip


def test_another_workspace_reads_as_nothing_and_cannot_be_changed(stack: Stack) -> None:
    mine = _tenant(stack, "alice", "Alpha")
    theirs = _tenant(stack, "bob", "Beta")
    targets = {"workspace": theirs.workspace, "project": theirs.project, "card": theirs.card,
               "run": theirs.run}  # fmt: skip

    for query, target, field in QUERIES_ANSWERING_NULL:
        answer = mine.client.post(query, {"id": targets[target]})
        assert answer.status == 200
        assert answer.errors == [], query
        assert answer.data == {field: None}, query
        # ... while the owner sees it.
        assert theirs.client.data(query, {"id": targets[target]})[field] is not None

    for query, target in QUERIES_ANSWERING_NOT_FOUND:
        answer = mine.client.post(query, {"id": targets[target]})
        assert answer.codes == ["NOT_FOUND"], (query, answer.body)
        assert theirs.client.post(query, {"id": targets[target]}).errors == []

    for name, fields in MUTATIONS:
        answer = mine.client.post(_mutation(name), {"input": _resolve(fields, theirs)})
        assert answer.codes == ["NOT_FOUND"], (name, answer.body)

    # Nothing of theirs changed.
    card = theirs.client.data(
        "query($id: ID!) { card(id: $id) { title lane archived version } }", {"id": theirs.card}
    )["card"]
    assert card == {"title": "Beta card", "lane": "Todo", "archived": False, "version": 1}

    for query, target in (
        ("subscription($id: ID!) { boardChanged(projectId: $id) { kind } }", "project"),
        ("subscription($id: ID!) { agentRunLog(runId: $id) { seq } }", "run"),
    ):
        with subscribe(stack.ws_url, mine.client.token, query, {"id": targets[target]}) as sub:
            message = sub.next_message()
            assert message["type"] in ("next", "error")
            errors = (
                message["payload"]["errors"] if message["type"] == "next" else message["payload"]
            )
            assert [e["extensions"]["code"] for e in errors] == ["NOT_FOUND"]


def test_a_bootstrap_token_sees_no_workspace(stack: Stack) -> None:
    theirs = _tenant(stack, "bob", "Beta")
    boot = stack.client(stack.bootstrap_token("bob"))
    assert boot.data("query($id: ID!) { workspace(id: $id) { id } }", {"id": theirs.workspace}) == {
        "workspace": None
    }
    assert boot.error_codes(
        "query($id: ID!) { activity(workspaceId: $id) { edges { cursor } } }",
        {"id": theirs.workspace},
    ) == ["NOT_FOUND"]
    assert boot.error_codes(_mutation("createCard"), {
        "input": {"projectId": theirs.project, "title": "x"}
    }) == ["NOT_FOUND"]  # fmt: skip


def test_a_removed_member_sees_nothing_even_with_a_valid_token(stack: Stack) -> None:
    owner = _tenant(stack, "alice", "Alpha")
    owner.client.add_member(owner.workspace, user_id("bob"), "MEMBER")
    bob = stack.as_user("bob", owner.workspace, "MEMBER")
    assert bob.data("query($id: ID!) { card(id: $id) { id } }", {"id": owner.card})["card"]
    owner.client.data(
        "mutation($ws: ID!, $bob: ID!) { removeMember(input: {workspaceId: $ws, userId: $bob}) {"
        " workspace { members { userId } } } }",
        {"ws": owner.workspace, "bob": user_id("bob")},
    )
    assert bob.data("query($id: ID!) { card(id: $id) { id } }", {"id": owner.card}) == {
        "card": None
    }
    assert bob.error_codes(_mutation("createCard"), {
        "input": {"projectId": owner.project, "title": "x"}
    }) == ["NOT_FOUND"]  # fmt: skip


def test_row_level_security_hides_other_workspaces_without_any_filter(stack: Stack) -> None:
    mine = _tenant(stack, "alice", "Alpha")
    theirs = _tenant(stack, "bob", "Beta")
    services = stack.services
    offloader = Offloader(2)

    async def count_all() -> dict[str, int]:
        scope = ReadScope(
            pool=services.pool, offloader=offloader, workspace_id=UUID(mine.workspace),
            user_id=user_id("alice"), counter=StatementCounter(), statement_timeout_ms=5000,
        )  # fmt: skip
        try:
            counts = {}
            for table in ("rm_workspaces", "rm_projects", "rm_cards", "rm_runs", "rm_activity"):
                statement = f"SELECT DISTINCT workspace_id FROM {table}"  # no WHERE: RLS alone
                rows = await scope.run(
                    lambda conn, sql=statement: conn.execute(sql).fetchall()  # type: ignore[misc]
                )
                counts[table] = len(rows)
                assert {row["workspace_id"] for row in rows} <= {UUID(mine.workspace)}
            return counts
        finally:
            await scope.close()

    try:
        counts = asyncio.run(count_all())
    finally:
        offloader.shutdown()
    assert counts == dict.fromkeys(
        ("rm_workspaces", "rm_projects", "rm_cards", "rm_runs", "rm_activity"), 1
    )
    assert theirs.workspace != mine.workspace


# -- roles ---------------------------------------------------------------------------------------

ROLES = ("OWNER", "ADMIN", "MEMBER", "VIEWER")
RANK = {"VIEWER": 0, "MEMBER": 1, "ADMIN": 2, "OWNER": 3}


class Fixtures:
    """Fresh targets made on the write side as the owner, so each attempt starts clean."""

    def __init__(self, stack: Stack, workspace: str, project: str) -> None:
        self.write = stack.write
        self.workspace = UUID(workspace)
        self.project = UUID(project)
        self.owner = Actor(user_id=user_id("alice"), workspace_id=workspace)
        self.counter = itertools.count()

    def card(self) -> str:
        return str(self.write.create_card(
            m.CreateCard(project_id=self.project, title=f"card {next(self.counter)}"), self.owner
        ).id)  # fmt: skip

    def archived_card(self) -> str:
        card = self.card()
        self.write.archive_card(m.ArchiveCard(card_id=UUID(card)), self.owner)
        return card

    def blocked_card(self) -> str:
        card = self.card()
        self.write.block_card(m.BlockCard(card_id=UUID(card), reason="waiting"), self.owner)
        return card

    def run(self) -> str:
        return str(self.write.start_agent_run(
            m.StartAgentRun(card_id=UUID(self.card()), agent="coder"), self.owner
        ).id)  # fmt: skip

    def member(self) -> str:
        user = user_id(f"user-{next(self.counter)}")
        self.write.add_member(
            m.AddMember(workspace_id=self.workspace, user_id=user, role="MEMBER"), self.owner
        )
        return user

    def lane(self) -> str:
        name = f"lane {next(self.counter)}"
        self.write.add_lane(m.AddLane(project_id=self.project, name=name), self.owner)
        return name

    def lanes(self) -> list[str]:
        project: Project = self.write.repository.get(self.project)
        return [lane.name for lane in project.lanes]

    def project_id(self) -> str:
        return str(self.write.create_project(
            m.CreateProject(workspace_id=self.workspace, name=f"p{next(self.counter)}"), self.owner
        ).id)  # fmt: skip


Case = tuple[str, str, Callable[[Fixtures], dict[str, Any]]]

ROLE_CASES: list[Case] = [
    ("renameWorkspace", "ADMIN", lambda f: {"workspaceId": str(f.workspace), "name": "Renamed"}),
    ("addMember", "ADMIN", lambda f: {"workspaceId": str(f.workspace),
                                      "userId": str(uuid4()), "role": "MEMBER"}),
    ("changeRole", "ADMIN", lambda f: {"workspaceId": str(f.workspace), "userId": f.member(),
                                       "role": "VIEWER"}),
    ("removeMember", "ADMIN", lambda f: {"workspaceId": str(f.workspace), "userId": f.member()}),
    ("setSpendLimit", "ADMIN", lambda f: {"workspaceId": str(f.workspace),
                                          "monthlyLimit": "100.00"}),
    ("createProject", "MEMBER", lambda f: {"workspaceId": str(f.workspace), "name": "More"}),
    ("setWipLimit", "ADMIN", lambda f: {"projectId": str(f.project), "lane": "Todo",
                                        "wipLimit": 500}),
    ("addLane", "ADMIN", lambda f: {"projectId": str(f.project),
                                    "name": f"added {uuid4().hex[:6]}"}),
    ("renameLane", "ADMIN", lambda f: {"projectId": str(f.project), "lane": f.lane(),
                                       "name": f"renamed {uuid4().hex[:6]}"}),
    ("reorderLanes", "ADMIN", lambda f: {"projectId": str(f.project),
                                         "order": list(reversed(f.lanes()))}),
    ("removeLane", "ADMIN", lambda f: {"projectId": str(f.project), "lane": f.lane()}),
    ("archiveProject", "ADMIN", lambda f: {"projectId": f.project_id()}),
    ("createCard", "MEMBER", lambda f: {"projectId": str(f.project), "title": "new"}),
    ("updateCard", "MEMBER", lambda f: {"cardId": f.card(), "title": "edited"}),
    ("moveCard", "MEMBER", lambda f: {"cardId": f.card(), "toLane": "Doing"}),
    ("assignCard", "MEMBER", lambda f: {"cardId": f.card(), "assignee": user_id("carol")}),
    ("archiveCard", "MEMBER", lambda f: {"cardId": f.card()}),
    ("restoreCard", "MEMBER", lambda f: {"cardId": f.archived_card()}),
    ("blockCard", "MEMBER", lambda f: {"cardId": f.card(), "reason": "needs input"}),
    ("unblockCard", "MEMBER", lambda f: {"cardId": f.blocked_card()}),
    ("startAgentRun", "MEMBER", lambda f: {"cardId": f.card(), "agent": "reviewer"}),
    ("cancelAgentRun", "MEMBER", lambda f: {"runId": f.run()}),
]  # fmt: skip


def test_every_mutation_checks_the_callers_role(stack: Stack) -> None:
    owner, ws = stack.owner_with_workspace("alice")
    pid = owner.create_project(ws, "Roles", [{"name": "Todo"}, {"name": "Doing"}])["project"]["id"]
    for user, role in (("bob", "ADMIN"), ("carol", "MEMBER"), ("dave", "VIEWER")):
        owner.add_member(ws, user_id(user), role)
    # A token's role claim is not what counts: the workspace's membership is.
    clients = {
        "OWNER": owner,
        "ADMIN": stack.as_user("bob", ws, "OWNER"),
        "MEMBER": stack.as_user("carol", ws, "OWNER"),
        "VIEWER": stack.as_user("dave", ws, "OWNER"),
    }
    fixtures = Fixtures(stack, ws, pid)
    assert {c[0] for c in ROLE_CASES} == {name for name, _ in MUTATIONS}
    for (name, needed, make), role in itertools.product(ROLE_CASES, reversed(ROLES)):
        answer = clients[role].post(_mutation(name), {"input": make(fixtures)})
        if RANK[role] >= RANK[needed]:
            assert answer.errors == [], (name, role, answer.body)
            assert answer.data[name]["consistencyToken"]
        else:
            assert answer.codes == ["FORBIDDEN"], (name, role, answer.body)
            assert "needs" in answer.errors[0]["message"]


def test_no_member_sets_the_price_of_their_workspace_not_even_its_owner(stack: Stack) -> None:
    """Markup and billing increment are the operator's (``agentworks plan``): no mutation sets
    them, so an owner cannot bill their own calls at nothing."""
    owner, ws = stack.owner_with_workspace("alice")
    answer = owner.post(
        "mutation($input: SetPlanInput!) { setPlan(input: $input) { consistencyToken } }",
        {"input": {"workspaceId": ws, "markup": "0.000001", "billingIncrement": "0.01"}},
    )
    assert answer.data is None
    assert set(answer.codes) == {"VALIDATION"}, answer.body
    assert "Cannot query field 'setPlan'" in str(answer.errors)
    markup = owner.data("query($id: ID!) { workspace(id: $id) { markup } }", {"id": ws})
    assert markup == {"workspace": {"markup": "5"}}


@pytest.mark.parametrize("granted", ["OWNER"])
def test_only_an_owner_may_grant_owner(stack: Stack, granted: str) -> None:
    owner, ws = stack.owner_with_workspace("alice")
    owner.add_member(ws, user_id("bob"), "ADMIN")
    admin = stack.as_user("bob", ws, "ADMIN")
    answer = admin.post(
        _mutation("addMember"),
        {"input": {"workspaceId": ws, "userId": user_id("eve"), "role": granted}},
    )
    assert answer.codes == ["FORBIDDEN"]
    assert owner.add_member(ws, user_id("eve"), granted)["workspace"]["members"][-1] == {
        "userId": user_id("eve"), "role": "OWNER",
    }  # fmt: skip
