"""A run read with a user token (the SPA's, from /auth/login): no home workspace, membership
decides. Its output and attempts must show as they do for a workspace token."""

from __future__ import annotations

from datetime import UTC, datetime
from uuid import UUID

from api_client import wait_for
from e2e_stack import Stack, user_id

from adapters.tokens import issue_user_token
from commands import models as m

RUN = """
query($id: ID!) { agentRun(id: $id) {
  status output attempts { attempt provider status inputTokens }
} }
"""


def test_a_user_token_sees_a_runs_output_and_attempts(stack: Stack) -> None:
    alice, ws = stack.owner_with_workspace("run-reader")
    *_, run = stack.begun_run(alice, ws, "Login page")
    bot = stack.orchestrator(ws)
    write = stack.write
    write.record_provider_attempt(
        m.RecordProviderAttempt(
            run_id=UUID(run), worker="w1", provider="simulated", model="sim-1", status="ok",
            latency_ms=5, input_tokens=100, output_tokens=20, started_at=datetime.now(UTC),
        ),
        bot,
    )  # fmt: skip
    write.finish_run(
        m.FinishRun(run_id=UUID(run), outcome="SUCCEEDED", worker="w1", output="all done"), bot
    )
    expected = {
        "status": "SUCCEEDED",
        "output": "all done",
        "attempts": [{"attempt": 1, "provider": "simulated", "status": "ok", "inputTokens": 100}],
    }
    # The workspace token sees it all...
    wait_for(
        lambda: alice.data(RUN, {"id": run})["agentRun"],
        until=lambda found: found == expected,
        what="the finished run with its output and attempt",
    )
    # ...and so does the same member's user token.
    user = stack.client(
        issue_user_token(user_id=user_id("run-reader"), ttl_seconds=600, secret=stack.secret)
    )
    assert user.data(RUN, {"id": run})["agentRun"] == expected
