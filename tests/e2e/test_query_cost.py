"""The board a single-page app draws passes the cost limit; a real abuse still does not."""

from __future__ import annotations

from e2e_stack import Stack

SPA_BOARD = """
query Board($id: ID!) {
  board(projectId: $id) {
    lanes {
      name wipLimit count
      cards {
        pageInfo { hasNextPage endCursor }
        edges {
          cursor
          node {
            id title description lane position assignee labels version updatedAt cost
            lastRun { id status }
            runs {
              pageInfo { hasNextPage endCursor }
              edges { node { id agent status model inputTokens outputTokens billed startedAt } }
            }
          }
        }
      }
    }
  }
}
"""


def test_the_board_a_spa_writes_at_the_default_page_sizes_runs_on_a_ten_card_board(
    stack: Stack,
) -> None:
    alice, ws = stack.owner_with_workspace()
    lanes = [{"name": name, "wipLimit": None} for name in ("Todo", "Doing", "Done")]
    project = alice.create_project(ws, "SPA", lanes)["project"]["id"]
    for index in range(10):
        alice.create_card(project, f"card {index}", lane=lanes[index % 3]["name"])

    answer = alice.post(SPA_BOARD, {"id": project})

    assert answer.errors == [], answer.errors
    drawn = answer.data["board"]["lanes"]
    assert sum(len(lane["cards"]["edges"]) for lane in drawn) == 10


def test_lanes_of_200_cards_of_200_runs_each_are_still_refused(stack: Stack) -> None:
    alice, ws = stack.owner_with_workspace()
    abuse = SPA_BOARD.replace("cards {", "cards(first: 200) {").replace(
        "runs {", "runs(first: 200) {"
    )

    answer = alice.post(abuse, {"id": ws})

    assert answer.codes == ["VALIDATION"]
    assert "too expensive" in answer.errors[0]["message"]
