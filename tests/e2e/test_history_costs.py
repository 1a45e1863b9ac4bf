"""A card as it was (``board(asOf:)``, ``cardHistory``) shows the runs and cost it had at the
instant asked about, as the live card shows them now: a run started and charged after the card's
last change belongs to every instant after it."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from api_client import ApiClient, wait_for
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


def charged_card(stack: Stack, owner: str) -> tuple[ApiClient, str, str, str, str, str]:
    """A new workspace of ``owner`` with a card whose run made one call billed $0.10: the owner's
    client, the workspace, project, card, run and charge ids."""
    alice, ws = stack.owner_with_workspace(owner)
    pid, card, run = stack.begun_run(alice, ws)
    charged = stack.write.record_llm_call(
        m.RecordLlmCall(
            run_id=UUID(run), call_id="c1", provider="simulated", model="sim-1",
            input_tokens=10, output_tokens=5, latency_ms=1, provider_cost_micros=20_000,
            price_table_version="v1", at=datetime.now(UTC),
        ),
        stack.orchestrator(ws),
    )  # fmt: skip
    return alice, ws, pid, card, run, str(charged.extra["charge_id"])


def live_card(alice: ApiClient, card: str) -> dict[str, Any]:
    """The live card once its charge shows in its cost and its run's ``billed``."""
    found: dict[str, Any] = wait_for(
        lambda: alice.data(LIVE, {"c": card})["card"],
        until=lambda found: (
            found["cost"] != "0.000000"
            and found["runs"]["edges"][0]["node"]["billed"] != "0.000000"
        ),
        what="the charge on the card",
    )
    return found


def test_a_card_then_shows_the_runs_and_cost_it_had_then(stack: Stack) -> None:
    alice, _, pid, card, run, _ = charged_card(stack, "history-costs")
    live = live_card(alice, card)
    assert live["lastRun"] == {"id": run}
    now = datetime.now(UTC).isoformat()
    (lane,) = alice.data(BOARD, {"p": pid, "at": now})["board"]["lanes"]
    assert lane["cards"]["edges"] == [{"node": live}]
    assert alice.data(HISTORY, {"c": card, "at": now})["cardHistory"]["state"] == live
    assert alice.data(HISTORY, {"c": card})["cardHistory"]["state"] == live


USAGE_BY_CARD = """query($w: ID!, $from: DateTime!, $to: DateTime!) {
  usage(workspaceId: $w, from: $from, to: $to, groupBy: CARD) { key billed } }"""


def test_a_credited_and_refunded_card_costs_the_same_live_and_as_of_now(stack: Stack) -> None:
    """``Card.cost`` is what the card's runs billed (the sum of their ``billed``, charges only),
    live and as of any instant alike; credits and refunds lower the statement and ``usage``."""
    alice, ws, pid, card, _, charge = charged_card(stack, "history-credits")
    started = datetime.now(UTC)
    bot = stack.orchestrator(ws)
    for amount, refund in (("0.030000", False), ("0.020000", True)):
        corrected = stack.write.credit_charge(
            m.CreditCharge(
                charge_id=UUID(charge), amount=amount, reason="goodwill", refund=refund,
                at=datetime.now(UTC),
            ),
            bot,
        )  # fmt: skip
    live = live_card(alice, card)
    assert live["cost"] == "0.100000"
    assert live["runs"]["edges"][0]["node"]["billed"] == "0.100000"
    after = {"X-Consistency-Token": corrected.consistency_token}
    window = {"w": ws, "from": (started - timedelta(days=1)).isoformat(),
              "to": (datetime.now(UTC) + timedelta(days=1)).isoformat()}  # fmt: skip
    usage = alice.data(USAGE_BY_CARD, window, headers=after)["usage"]
    assert usage == [{"key": card, "billed": "0.050000"}]  # the corrections are in
    now = datetime.now(UTC).isoformat()
    (lane,) = alice.data(BOARD, {"p": pid, "at": now}, headers=after)["board"]["lanes"]
    assert lane["cards"]["edges"] == [{"node": live}]
    assert alice.data(HISTORY, {"c": card, "at": now})["cardHistory"]["state"] == live
    assert alice.data(HISTORY, {"c": card})["cardHistory"]["state"] == live


RUN_THEN = (
    "lastRun { status startedAt finishedAt error output inputTokens billed llmCalls"
    " logLineCount version attempts { attempt } }"
)
BOARD_RUN = (
    "query($p: ID!, $at: DateTime) { board(projectId: $p, asOf: $at) {"
    f" lanes {{ cards {{ edges {{ node {{ {RUN_THEN} }} }} }} }} }} }}"
)
HISTORY_RUN = (
    f"query($c: ID!, $at: DateTime) {{ cardHistory(cardId: $c, asOf: $at) {{ state {{ {RUN_THEN} }}"
    " } }"
)


def test_a_run_as_of_an_instant_is_the_run_it_was_then(stack: Stack) -> None:
    """A card as it was showed each of its runs as it is now: at an instant its run was still
    going, board(asOf:) and cardHistory(asOf:) said SUCCEEDED, with a finishedAt after the
    instant, the output and the billing of calls not made yet."""
    alice, ws, pid, card, run, _ = charged_card(stack, "history-run-then")
    first = live_card(alice, card)["runs"]["edges"][0]["node"]["billed"]
    then = datetime.now(UTC)
    time.sleep(0.01)  # the second call is after the instant asked about
    bot = stack.orchestrator(ws)
    stack.write.record_llm_call(
        m.RecordLlmCall(
            run_id=UUID(run), call_id="c2", provider="simulated", model="sim-1",
            input_tokens=30, output_tokens=7, latency_ms=1, provider_cost_micros=40_000,
            price_table_version="v1", at=datetime.now(UTC),
        ),
        bot,
    )  # fmt: skip
    stack.write.finish_run(
        m.FinishRun(run_id=UUID(run), outcome="SUCCEEDED", output="all done", worker="w1"), bot
    )
    wait_for(
        lambda: alice.data(LIVE, {"c": card})["card"]["lastRun"],
        until=lambda found: found is not None,
        what="the run on the card",
    )
    finished = wait_for(
        lambda: alice.data(BOARD_RUN, {"p": pid, "at": None})["board"]["lanes"][0]["cards"][
            "edges"
        ],
        until=lambda edges: edges[0]["node"]["lastRun"]["status"] == "SUCCEEDED",
        what="the run finished on the board",
    )[0]["node"]["lastRun"]
    assert (finished["output"], finished["llmCalls"]) == ("all done", 2)
    at = then.isoformat()
    (lane,) = alice.data(BOARD_RUN, {"p": pid, "at": at})["board"]["lanes"]
    was = lane["cards"]["edges"][0]["node"]["lastRun"]
    assert was["status"] == "RUNNING"
    assert was["startedAt"] is not None
    assert datetime.fromisoformat(was["startedAt"]) <= then
    assert (was["finishedAt"], was["error"], was["output"]) == (None, None, None)
    assert (was["llmCalls"], was["inputTokens"], was["billed"]) == (1, 10, first)
    assert was["version"] < finished["version"]
    assert was["attempts"] == []
    state = alice.data(HISTORY_RUN, {"c": card, "at": at})["cardHistory"]["state"]
    assert state["lastRun"] == was
