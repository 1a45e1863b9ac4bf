"""A board costs a fixed number of SQL statements, whatever its number of cards."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from api_client import ApiClient
from e2e_stack import Stack, user_id

from commands import models as m
from commands.handlers import Actor

BOARD = """
query($id: ID!) {
  board(projectId: $id) {
    version
    lanes { name count
      cards(first: 200) { edges { cursor node { id title cost
        lastRun { id status billed }
        runs(first: 3) { edges { node { id agent } } } } } } }
  }
}
"""
LANES = ("Todo", "Doing", "Done")


def _board_with(stack: Stack, actor: Actor, workspace: UUID, cards: int) -> tuple[str, str]:
    write = stack.write
    project = write.create_project(
        m.CreateProject(
            workspace_id=workspace,
            name=f"{cards} cards",
            lanes=[m.LaneInput(name=lane) for lane in LANES],
        ),
        actor,
    )
    last = project
    for i in range(cards):
        card = write.create_card(
            m.CreateCard(project_id=project.id, title=f"card {i}", lane=LANES[i % 3]), actor
        )
        last = write.start_agent_run(m.StartAgentRun(card_id=card.id, agent="coder"), actor)
    return str(project.id), last.consistency_token


def _statements_for(
    stack: Stack, client: ApiClient, project: str, token: str
) -> tuple[int, dict[str, Any]]:
    answer = client.post(BOARD, {"id": project}, headers={"X-Consistency-Token": token})
    assert answer.errors == [], answer.body
    assert not answer.stale
    request_id = answer.headers["X-Request-Id"]
    (stats,) = [s for s in stack.stats if s.request_id == request_id]
    return stats.statements, answer.data["board"]


def test_a_board_of_200_cards_costs_as_many_statements_as_one_of_20(stack: Stack) -> None:
    owner, ws = stack.owner_with_workspace("dora", "Loaders")
    actor = Actor(user_id=user_id("dora"), workspace_id=ws)
    small, small_token = _board_with(stack, actor, UUID(ws), 20)
    large, large_token = _board_with(stack, actor, UUID(ws), 200)

    small_statements, small_board = _statements_for(stack, owner, small, small_token)
    large_statements, large_board = _statements_for(stack, owner, large, large_token)

    assert sum(len(lane["cards"]["edges"]) for lane in large_board["lanes"]) == 200
    assert sum(lane["count"] for lane in small_board["lanes"]) == 20
    for lane in large_board["lanes"]:
        for edge in lane["cards"]["edges"]:
            node = edge["node"]
            assert node["lastRun"]["status"] == "QUEUED"
            assert [run["node"]["id"] for run in node["runs"]["edges"]] == [node["lastRun"]["id"]]
    assert large_statements == small_statements
    # Scope (workspace setting, membership), project, lanes, cards, last runs, runs per card.
    assert small_statements <= 7
