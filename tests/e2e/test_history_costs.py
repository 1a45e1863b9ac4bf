"""A card as it was (``board(asOf:)``, ``cardHistory``) shows the runs and cost it had at the
instant asked about, as the live card shows them now: a run started and charged after the card's
last change belongs to every instant after it."""

from __future__ import annotations

from datetime import UTC, datetime
from uuid import UUID

from api_client import wait_for
from e2e_stack import Stack

from commands import models as m

CARD = "cost lastRun { id } runs { edges { node { id billed } } }"
BOARD = (
    "query($p: ID!, $at: DateTime) { board(projectId: $p, asOf: $at) {"
    f" lanes {{ cards {{ edges {{ node {{ {CARD} }} }} }} }} }} }}"
)
HISTORY = (
    "query($c: ID!, $at: DateTime) { cardHistory(cardId: $c, asOf: $at) {"
    f" state {{ {CARD} }} }} }}"
)
LIVE = f"query($c: ID!) {{ card(id: $c) {{ {CARD} }} }}"


def test_a_card_then_shows_the_runs_and_cost_it_had_then(stack: Stack) -> None:
    alice, ws = stack.owner_with_workspace("history-costs")
    pid, card, run = stack.begun_run(alice, ws)
    bot = stack.orchestrator(ws)
    stack.write.record_llm_call(
        m.RecordLlmCall(
            run_id=UUID(run), call_id="c1", provider="simulated", model="sim-1",
            input_tokens=10, output_tokens=5, latency_ms=1, provider_cost_micros=20_000,
            price_table_version="v1", at=datetime.now(UTC),
        ),
        bot,
    )  # fmt: skip
    live = wait_for(
        lambda: alice.data(LIVE, {"c": card})["card"],
        until=lambda found: (
            found["cost"] != "0.000000"
            and found["runs"]["edges"][0]["node"]["billed"] != "0.000000"
        ),
        what="the charge on the card",
    )
    assert live["lastRun"] == {"id": run}
    now = datetime.now(UTC).isoformat()
    (lane,) = alice.data(BOARD, {"p": pid, "at": now})["board"]["lanes"]
    assert lane["cards"]["edges"] == [{"node": live}]
    assert alice.data(HISTORY, {"c": card, "at": now})["cardHistory"]["state"] == live
    assert alice.data(HISTORY, {"c": card})["cardHistory"]["state"] == live
