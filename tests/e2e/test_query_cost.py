"""The board a single-page app draws passes the cost limit; a real abuse still does not."""

from __future__ import annotations

import time
from uuid import UUID

from api_client import Answer, first_change, subscribe, wait_for
from e2e_stack import MakeStack, Stack
from users import user_id

from commands import models as m
from commands.handlers import Actor
from read_api.services import QueryLimits

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


def test_page_sizes_given_by_a_variables_default_count_as_given(stack: Stack) -> None:
    """``first: $n`` with ``$n: Int = 200`` left out of the variables asks for 200, as the
    field gets it: estimated at the field's own default instead (20 runs a card), the abuse
    above passed the estimate and read its 200 x 200 runs a lane before anything stopped it."""
    alice, ws = stack.owner_with_workspace()
    project = alice.create_project(ws, "P", [{"name": "Todo"}])["project"]["id"]
    abuse = (
        SPA_BOARD.replace("$id: ID!", "$id: ID!, $cards: Int = 200, $runs: Int = 200")
        .replace("cards {", "cards(first: $cards) {")
        .replace("runs {", "runs(first: $runs) {")
    )

    answer = alice.post(abuse, {"id": project})

    assert answer.codes == ["VALIDATION"], answer.body
    assert "too expensive" in answer.errors[0]["message"]
    assert answer.data is None  # refused before anything ran
    # Given explicitly (the defaults then unused), small pages pass as before.
    assert alice.post(abuse, {"id": project, "cards": 10, "runs": 5}).errors == []


def test_fragments_that_double_at_each_level_are_refused_before_validation(stack: Stack) -> None:
    """A document of under 1 KB whose fragments each spread the next twice stands for 2^18
    fields: the depth, alias and cost checks walked every one of them (seconds of the event
    loop at 18 levels, doubling with each more), and the query then ran. It is refused, at
    once, for what it expands to."""
    alice, _ = stack.owner_with_workspace()
    levels = 18
    fragments = "\n".join(
        f"fragment F{i} on Query {{ ...F{i + 1} ...F{i + 1} }}" for i in range(levels)
    )
    document = f"query {{ ...F0 }}\n{fragments}\nfragment F{levels} on Query {{ __typename }}"
    assert len(document) < 1024

    started = time.monotonic()
    answer = alice.post(document)

    assert answer.codes == ["VALIDATION"], answer.body
    assert time.monotonic() - started < 1.0
    # A fragment used in several places is fine: what is refused is the size it expands to.
    shared = (
        "query { a: me { ...Who } b: me { ...Who } c: me { ...Who } }\n"
        "fragment Who on Me { id email name }"
    )
    assert alice.post(shared).codes != ["VALIDATION"]


def test_a_long_chain_of_fragments_is_refused_not_an_internal_error(stack: Stack) -> None:
    """Fragments that each spread the next, a few hundred deep, are a small document (within
    the token limit) that the depth rule followed recursively until Python's stack ran out:
    INTERNAL. It is refused as input."""
    alice, _ = stack.owner_with_workspace()
    levels = 300
    fragments = "\n".join(f"fragment F{i} on Query {{ ...F{i + 1} }}" for i in range(levels))
    document = f"query {{ ...F0 }}\n{fragments}\nfragment F{levels} on Query {{ __typename }}"

    assert alice.post(document).codes == ["VALIDATION"]


def test_an_exploding_subscription_is_refused_over_the_websocket(stack: Stack) -> None:
    """The same refusal, at once, as a subscription's error message (not a bare complete)."""
    alice, _ = stack.owner_with_workspace()
    levels = 18
    fragments = "\n".join(
        f"fragment F{i} on Subscription {{ ...F{i + 1} ...F{i + 1} }}" for i in range(levels)
    )
    document = (
        f"subscription {{ ...F0 }}\n{fragments}\n"
        f"fragment F{levels} on Subscription {{ __typename }}"
    )
    with subscribe(stack.ws_url, alice.token, document) as sub:
        started = time.monotonic()
        message = sub.next_message()
        elapsed = time.monotonic() - started
    assert message["type"] in ("error", "next"), message
    errors = message["payload"] if message["type"] == "error" else message["payload"]["errors"]
    assert [e["extensions"]["code"] for e in errors] == ["VALIDATION"], message
    assert "too large" in errors[0]["message"]
    assert elapsed < 1.0


LOG_READ_VARIABLES = {
    "card": "ID!",
    "project": "ID!",
    "then": "DateTime",
    "later": 'DateTime = "2999-01-01T00:00:00Z"',
}


def _log_reads(selections: str) -> str:
    """A query of ``selections`` declaring the variables they use."""
    used = [
        f"${name}: {kind}" for name, kind in LOG_READ_VARIABLES.items() if f"${name}" in selections
    ]
    declared = f"({', '.join(used)})" if used else ""
    return f"query{declared} {{ {selections} }}"


def test_a_document_folding_the_event_log_more_than_three_times_is_refused(stack: Stack) -> None:
    """Each alias of cardHistory, reconciliation or board(asOf:) folds the log anew: thirty of
    them held a connection for thirty folds of a project's whole history."""
    alice, ws = stack.owner_with_workspace()
    project = alice.create_project(ws, "Log", [{"name": "Todo"}])["project"]["id"]
    card = alice.create_card(project, "c")["card"]["id"]
    given = {"card": card, "project": project, "then": "2999-01-01T00:00:00Z"}

    def history(i: int) -> str:
        return f"h{i}: cardHistory(cardId: $card) {{ version }}"

    def board(i: int, as_of: str) -> str:
        return f"b{i}: board(projectId: $project, asOf: {as_of}) {{ version }}"

    def ask(selections: str) -> Answer:
        query = _log_reads(selections)
        return alice.post(query, {k: v for k, v in given.items() if f"${k}:" in query})

    refused = {
        "four histories": " ".join(history(i) for i in range(4)),
        "boards then in a fragment": f"{history(0)} {history(1)} ...F }} fragment F on Query {{"
        f" {board(0, '$then')} {board(1, '$then')}",
        "boards at a default instant": " ".join(board(i, "$later") for i in range(4)),
        "reconciliations": " ".join(
            f'r{i}: reconciliation(workspaceId: "{ws}", month: "2026-01") {{ ok }}'
            for i in range(4)
        ),
    }
    for what, selections in refused.items():
        answer = ask(selections)
        assert answer.codes == ["VALIDATION"], (what, answer.body)
        assert "reads the event log" in answer.errors[0]["message"], what
        assert stack.stats[-1].statements == 0, what

    allowed = {
        "three histories": " ".join(history(i) for i in range(3)),
        "live boards besides": " ".join(
            [*(history(i) for i in range(3)), *(board(i, "null") for i in range(10))]
        ),
        "one fragment spread twice": "...F ...F } fragment F on Query {"
        + " ".join(history(i) for i in range(3)),
    }
    for what, selections in allowed.items():
        answer = ask(selections)
        assert answer.errors == [], (what, answer.body)


EVERY_BOARD = """
query($ws: ID!) {
  workspace(id: $ws) {
    projects { id board { lanes { cards(first: 200) { edges { node { id title } } } } } }
  }
}
"""


def test_every_board_of_a_workspace_of_more_projects_than_estimated_is_refused(
    stack: Stack,
) -> None:
    """The estimate takes a workspace's projects to be 20; a tenant decides how many it has, and
    a few hundred 50-lane projects made this document, which the estimate passed, hold the event
    loop for seconds. Read, the real count decides."""
    alice, ws = stack.owner_with_workspace()
    actor = Actor(user_id=user_id("alice"), workspace_id=ws)
    for i in range(30):
        project = m.CreateProject(
            workspace_id=UUID(ws), name=f"p{i}", lanes=[m.LaneInput(name="T")]
        )
        stack.write.create_project(project, actor)
    listing = "query($ws: ID!) { workspace(id: $ws) { projects { id name } } }"
    wait_for(
        lambda: alice.data(listing, {"ws": ws})["workspace"]["projects"],
        until=lambda projects: len(projects) == 30,
    )

    answer = alice.post(EVERY_BOARD, {"ws": ws})

    assert answer.codes == ["VALIDATION"], answer.body
    assert "with 30 projects" in answer.errors[0]["message"]
    assert answer.data == {"workspace": None}

    bob, few = stack.owner_with_workspace("bob", "Few")
    for i in range(3):
        bob.create_project(few, f"p{i}", [{"name": "T"}])
    assert len(bob.data(EVERY_BOARD, {"ws": few})["workspace"]["projects"]) == 3


def _every_lane(selections: str) -> str:
    return (
        "query($ws: ID!) { workspace(id: $ws) { projects { board { lanes { "
        + selections
        + " } } } } }"
    )


def _aliased(count: int, field: str, prefix: str) -> str:
    return " ".join(f"{prefix}{i}: {field}" for i in range(count))


def test_many_small_lists_are_refused_before_a_row_is_read(stack: Stack) -> None:
    """Each list read costs a query and a connection whatever its page holds; counted only by
    the objects they return, the first page of 8 cards of every lane and, under each card, its
    first run 29 times over passed the estimate and held the API for 17 s of CPU
    (bench/graphql_cost.py). Each read now costs what it costs besides its objects."""
    alice, ws = stack.owner_with_workspace()
    runs = _aliased(29, "runs(first: 1) { edges { node { id } } }", "r")
    document = _every_lane(f"cards(first: 8) {{ edges {{ node {{ id {runs} }} }} }}")

    answer = alice.post(document, {"ws": ws})

    assert answer.codes == ["VALIDATION"], answer.body
    message = answer.errors[0]["message"]
    assert "too expensive" in message
    assert "fewer lists" in message
    assert answer.data is None


def test_lists_of_projects_of_more_lanes_than_estimated_are_refused(stack: Stack) -> None:
    """The estimate takes a board to have 20 lanes; a project may have 50. Thirty aliased pages
    of one card from each lane of 20 such projects (30,000 list reads, 3 s of CPU) cost 2.5 times
    what the estimate said. Read, the real number of lanes decides."""
    alice, ws = stack.owner_with_workspace()
    actor = Actor(user_id=user_id("alice"), workspace_id=ws)
    lanes = [m.LaneInput(name=f"L{i}") for i in range(50)]
    for i in range(20):
        project = m.CreateProject(workspace_id=UUID(ws), name=f"p{i}", lanes=lanes)
        wide = str(stack.write.create_project(project, actor).id)
    alice.create_card(wide, "a card", lane="L7")
    listing = "query($ws: ID!) { workspace(id: $ws) { projects { id } } }"
    wait_for(
        lambda: alice.data(listing, {"ws": ws})["workspace"]["projects"],
        until=lambda projects: len(projects) == 20,
    )
    document = _every_lane(_aliased(30, "cards(first: 1) { edges { node { id } } }", "c"))

    answer = alice.post(document, {"ws": ws})

    assert answer.codes == ["VALIDATION"], answer.body
    assert "with 50 lanes" in answer.errors[0]["message"]
    assert "fewer lists" in answer.errors[0]["message"]
    # A board as the SPA draws it is what its lanes hold, not 50 lanes of 100 cards.
    wait_for(
        lambda: alice.data(SPA_BOARD, {"id": wide})["board"]["lanes"],
        until=lambda drawn: sum(len(lane["cards"]["edges"]) for lane in drawn) == 1,
    )
    # Lanes as many as estimated: the same document runs.
    bob, narrow = stack.owner_with_workspace("bob", "Narrow")
    bob.create_project(narrow, "Narrow", [{"name": "T"}, {"name": "D"}])
    assert bob.data(document, {"ws": narrow})["workspace"]["projects"][0]["board"]["lanes"]


def test_an_operation_that_executes_more_than_its_limit_is_stopped_with_one_error(
    make_stack: MakeStack,
) -> None:
    """The estimate takes lists at their page size; what they hold decides what runs. A board
    of 2,000 cards of 20 runs each, which the SPA's default pages admit, took 3 s of CPU: past
    the fields an operation may execute, the rest is not resolved, and the answer says so once
    (not once per field left)."""
    stack = make_stack(query_limits=QueryLimits(max_executed=300, max_cost=10**6))
    alice, ws = stack.owner_with_workspace()
    lanes = [{"name": name} for name in ("Todo", "Doing", "Done")]
    project = alice.create_project(ws, "Big", lanes)["project"]["id"]
    for index in range(12):
        alice.create_card(project, f"card {index}", lane=lanes[index % 3]["name"])
    counted = "query($id: ID!) { board(projectId: $id) { lanes { count } } }"
    wait_for(
        lambda: alice.data(counted, {"id": project})["board"]["lanes"],
        until=lambda drawn: sum(lane["count"] for lane in drawn) == 12,
    )

    body = SPA_BOARD.split("board(projectId: $id)", 1)[1].rsplit("}", 1)[0]
    twice = f"query($id: ID!) {{ a: board(projectId: $id) {body} b: board(projectId: $id) {body} }}"

    answer = alice.post(twice, {"id": project})

    assert answer.codes == ["VALIDATION"], answer.body
    assert "executed more than 300 fields" in answer.errors[0]["message"]
    assert "smaller pages" in answer.errors[0]["message"]
    assert alice.data(counted, {"id": project})["board"]["lanes"]


def test_each_event_of_a_subscription_counts_apart(make_stack: MakeStack) -> None:
    """A subscription is one operation that runs for as long as its socket: the limit on fields
    executed holds for each event it delivers, never for their sum."""
    stack = make_stack(query_limits=QueryLimits(max_executed=40))
    alice, ws = stack.owner_with_workspace()
    project = alice.create_project(ws, "Live", [{"name": "Todo"}])["project"]["id"]
    changes = (
        "subscription($id: ID!) { boardChanged(projectId: $id) {"
        " kind cardId position card { id title lane } } }"
    )
    with subscribe(stack.ws_url, alice.token, changes, {"id": project}) as sub:
        first = first_change(sub, lambda: alice.create_card(project, "warm-up"))
        assert "errors" not in first, first
        created = {alice.create_card(project, f"card {i}")["card"]["id"] for i in range(6)}
        delivered: set[str] = set()
        while not created <= delivered:
            message = sub.next(timeout=15)
            assert "errors" not in message, message
            event = message["data"]["boardChanged"]
            assert event["card"]["id"] == event["cardId"]
            delivered.add(event["cardId"])
