"""An orchestrator process SIGKILLed mid-run: the run is taken over and finished by another
orchestrator once its heartbeats stop, and no call is charged twice."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pg
import pytest
from orchestrator_helpers import (
    card_on_board,
    fast_simulated,
    finished,
    orchestrator_thread,
    running_with_lines,
    stored,
    wait_for,
)

from commands import models as m
from commands.handlers import AgentWorks
from domain.agent_run import AgentRun, RunStatus
from domain.usage import UsageCharge

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def orchestrator_process(database_url: str, tmp_path: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTWORKS_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(pg.LOGIN_ENV)
    env.update(
        AGENTWORKS_DATABASE_URL=database_url,
        AGENTWORKS_SIMULATED_TOKENS_PER_SECOND="30",
        AGENTWORKS_SIMULATED_OUTPUT_TOKENS="400",
        AGENTWORKS_HEARTBEAT_INTERVAL="0.5",
    )
    return subprocess.Popen(
        [sys.executable, "-m", "infra.cli", "orchestrator"],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def test_a_killed_orchestrators_runs_are_taken_over_and_never_charged_twice(
    write_side: AgentWorks, database_url: str, tmp_path: Path
) -> None:
    card = card_on_board(write_side)
    first = write_side.start_agent_run(
        m.StartAgentRun(card_id=card.card_id, agent="coder"), card.board.owner
    ).id
    process = orchestrator_process(database_url, tmp_path)
    try:
        wait_for(write_side, first, running_with_lines, timeout=60)
        # A second run the dead process had finished one call of would show a double charge.
        process.send_signal(signal.SIGKILL)
        process.wait(10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    killed_worker = write_side.run_snapshot(first).worker
    lines_before = write_side.run_snapshot(first).next_seq
    second = write_side.start_agent_run(
        m.StartAgentRun(card_id=card.card_id, agent="reviewer"), card.board.owner
    ).id
    with orchestrator_thread(database_url, {"simulated": fast_simulated()}, stale_after=1.5,
                             worker_id="rescuer"):  # fmt: skip
        runs = [wait_for(write_side, r, finished, timeout=60) for r in (first, second)]
    assert [r.status for r in runs] == [RunStatus.SUCCEEDED, RunStatus.SUCCEEDED]
    rescued = runs[0]
    [reclaimed] = [e for e in stored(write_side, first) if isinstance(e, AgentRun.Reclaimed)]
    assert (reclaimed.previous_worker, reclaimed.worker) == (killed_worker, "rescuer")
    assert rescued.next_seq > lines_before  # the log went on after the takeover
    for run in runs:
        calls = [e for e in stored(write_side, run.id) if isinstance(e, AgentRun.LlmCallCompleted)]
        ids = Counter(c.call_id for c in calls)
        assert all(n == 1 for n in ids.values()), ids
        charges: list[UsageCharge] = [write_side.repository.get(c.charge_id) for c in calls]
        assert all(isinstance(c, UsageCharge) for c in charges)
        assert run.billed_micros == sum(c.billed_micros for c in charges)
