"""What a mutation's payload reads back is what the mutation left, also when an earlier mutation
of the same document (they run one after the other, in one request) read the same workspace."""

from __future__ import annotations

from e2e_stack import Stack, user_id

MEMBERS = "workspace { members { userId role } projects { name } }"
DOCUMENT = f"""
mutation($w: ID!, $u: ID!) {{
  added: addMember(input: {{workspaceId: $w, userId: $u, role: MEMBER}}) {{ {MEMBERS} }}
  project: createProject(input: {{workspaceId: $w, name: "Second", lanes: [{{name: "Todo"}}]}})
    {{ project {{ name }} }}
  promoted: changeRole(input: {{workspaceId: $w, userId: $u, role: ADMIN}}) {{ {MEMBERS} }}
  removed: removeMember(input: {{workspaceId: $w, userId: $u}}) {{ {MEMBERS} }}
}}
"""


def test_each_payload_of_a_document_shows_its_own_mutations_members_and_projects(
    stack: Stack,
) -> None:
    alice, ws = stack.owner_with_workspace("read-back-owner")
    alice.create_project(ws, "First", [{"name": "Todo"}])
    owner = {"userId": user_id("read-back-owner"), "role": "OWNER"}
    bob = user_id("read-back-bob")
    answer = alice.data(DOCUMENT, {"w": ws, "u": bob})

    def members(field: str) -> list[dict[str, str]]:
        return sorted(answer[field]["workspace"]["members"], key=lambda m: m["userId"])

    def projects(field: str) -> list[str]:
        return sorted(p["name"] for p in answer[field]["workspace"]["projects"])

    assert members("added") == sorted([owner, {"userId": bob, "role": "MEMBER"}],
                                      key=lambda m: m["userId"])  # fmt: skip
    assert projects("added") == ["First"]
    assert members("promoted") == sorted([owner, {"userId": bob, "role": "ADMIN"}],
                                         key=lambda m: m["userId"])  # fmt: skip
    assert projects("promoted") == ["First", "Second"]
    assert members("removed") == [owner]


CARD_RUNS = "card { runs { edges { node { id status } } } lastRun { id status } }"
RUN_DOCUMENT = f"""
mutation($c: ID!) {{
  before: updateCard(input: {{cardId: $c, title: "one"}}) {{ {CARD_RUNS} }}
  started: startAgentRun(input: {{cardId: $c, agent: "coder"}}) {{ run {{ id }} }}
  after: updateCard(input: {{cardId: $c, title: "two"}}) {{ {CARD_RUNS} }}
}}
"""


def test_a_cards_payload_shows_the_runs_an_earlier_mutation_of_the_document_started(
    stack: Stack,
) -> None:
    alice, ws = stack.owner_with_workspace("read-back-runs")
    pid = alice.create_project(ws, "P", [{"name": "Todo"}])["project"]["id"]
    card = alice.create_card(pid, "Card")["card"]["id"]
    answer = alice.data(RUN_DOCUMENT, {"c": card})
    run = {"id": answer["started"]["run"]["id"], "status": "QUEUED"}
    assert answer["before"]["card"]["runs"]["edges"] == []
    assert answer["after"]["card"]["lastRun"] == run
    assert answer["after"]["card"]["runs"]["edges"] == [{"node": run}]


LANES = "project { board { lanes { name count cards { edges { node { title } } } } } }"
LANE_DOCUMENT = f"""
mutation($p: ID!) {{
  before: setWipLimit(input: {{projectId: $p, lane: "Todo", wipLimit: 5}}) {{ {LANES} }}
  created: createCard(input: {{projectId: $p, title: "new"}}) {{ card {{ id }} }}
  after: setWipLimit(input: {{projectId: $p, lane: "Todo", wipLimit: 6}}) {{ {LANES} }}
}}
"""


def test_a_projects_payload_shows_the_cards_an_earlier_mutation_of_the_document_created(
    stack: Stack,
) -> None:
    alice, ws = stack.owner_with_workspace("read-back-lanes")
    pid = alice.create_project(ws, "P", [{"name": "Todo"}])["project"]["id"]
    answer = alice.data(LANE_DOCUMENT, {"p": pid})
    (before,) = answer["before"]["project"]["board"]["lanes"]
    (after,) = answer["after"]["project"]["board"]["lanes"]
    assert (before["count"], before["cards"]["edges"]) == (0, [])
    assert (after["count"], after["cards"]["edges"]) == (1, [{"node": {"title": "new"}}])
