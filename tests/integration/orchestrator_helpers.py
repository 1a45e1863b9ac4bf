"""Helpers for orchestrator tests: a board with a card, orchestrators in threads, waiting."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

import pg
from board_helpers import Board, bootstrap_board
from cli_process import clean_env

from adapters.eventlog import EventLog
from adapters.providers.base import Provider
from adapters.providers.simulated import SimulatedProvider
from commands import models as m
from commands.handlers import AgentWorks
from domain.agent_run import AgentRun, RunStatus
from domain.budget_holds import SpendReader
from infra.bootstrap import build_write_side
from orchestrator.holds import BudgetHolds
from orchestrator.service import Orchestrator, OrchestratorConfig, OrchestratorThread


@dataclass
class CardOnBoard:
    board: Board
    card_id: UUID


def card_on_board(app: AgentWorks, *, title: str = "Login page") -> CardOnBoard:
    board = bootstrap_board(app)
    card = app.create_card(
        m.CreateCard(project_id=board.project_id, title=title,
                     description="Users sign in with e-mail and password."),
        board.owner,
    )  # fmt: skip
    return CardOnBoard(board, card.id)


def start(app: AgentWorks, card: CardOnBoard, **fields: Any) -> UUID:
    """Start a run on ``card`` (by the coder agent unless ``fields`` say otherwise)."""
    fields.setdefault("agent", "coder")
    return app.start_agent_run(m.StartAgentRun(card_id=card.card_id, **fields), card.board.owner).id


def fast_simulated(**kwargs: Any) -> SimulatedProvider:
    return SimulatedProvider(tokens_per_second=kwargs.pop("tokens_per_second", 500), **kwargs)


@contextmanager
def orchestrator_thread(
    database_url: str,
    providers: Mapping[str, Provider] | None = None,
    holds: BudgetHolds | None = None,
    spend: SpendReader | None = None,
    listen_url: str | None = None,
    **config: Any,
) -> Iterator[Orchestrator]:
    """An orchestrator with a write side of its own, running in a thread until the block ends.
    ``spend``: where its spend checks read the month's usage (default: its write model)."""
    # Few connections: the tests run two orchestrators beside the fixture's write side, and
    # the session keeps within its connection budget (tests/conftest.py).
    write = build_write_side(database_url, pool_size=4)
    write.write_each_command_alone()  # as `agentworks orchestrator`'s write side
    event_log = EventLog(write.recorder, write.mapper)  # type: ignore[arg-type]
    if spend is not None:
        write.spend = spend
    settings = {"heartbeat_interval": 1.0, "stale_after": 30.0, "backoff_base": 0.05, **config}
    orchestrator = Orchestrator(
        write, event_log, providers or {"simulated": fast_simulated()},
        OrchestratorConfig(**settings), holds=holds, listen_url=listen_url,
    )  # fmt: skip
    thread = OrchestratorThread(orchestrator)
    thread.start()
    try:
        yield orchestrator
    finally:
        thread.stop()
        write.close()


@contextmanager
def orchestrator_process(database_url: str, tmp_path: Path, **env: str) -> Iterator[None]:
    """``agentworks orchestrator`` in a process of its own, on the test's database, heartbeating
    every half second (``env``: more of its settings), SIGKILLed when the block ends, as its
    machine dying would end it: no cleanup of any kind."""
    settings = clean_env(
        **pg.LOGIN_ENV, AGENTWORKS_DATABASE_URL=database_url,
        AGENTWORKS_HEARTBEAT_INTERVAL="0.5", **env,
    )  # fmt: skip
    process = subprocess.Popen(
        [sys.executable, "-m", "infra.cli", "orchestrator"],
        cwd=tmp_path,
        env=settings,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(10)


def wait_for(
    app: AgentWorks, run_id: UUID, done: Callable[[AgentRun], bool], *, timeout: float = 30.0
) -> AgentRun:
    deadline = time.monotonic() + timeout
    while True:
        run = app.run_snapshot(run_id)
        if done(run):
            return run
        if time.monotonic() > deadline:
            raise AssertionError(
                f"run {run_id} is {run.status} (error {run.error!r}) after {timeout}s"
            )
        time.sleep(0.05)


def finished(run: AgentRun) -> bool:
    return run.status.terminal


def running_with_lines(run: AgentRun) -> bool:
    return run.status is RunStatus.RUNNING and run.next_seq > 3


def stored(app: AgentWorks, run_id: UUID) -> list[Any]:
    """Every stored event of a run, in order."""
    return list(app.events.get(run_id))


def events_of(app: AgentWorks, run_id: UUID, kind: type) -> list[Any]:
    """The stored events of a run of one class, in order."""
    return [e for e in stored(app, run_id) if isinstance(e, kind)]
