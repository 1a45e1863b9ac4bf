"""Fixtures of ``bench.graphql``: a fresh database with a 200-card board, seeded through the
real command handlers (so the read models are what the projectors make of real events).

The board: 4 lanes (Backlog 80 cards, In progress 50 with WIP limit 60, Review 30 with WIP
limit 40, Done 40), every other card assigned, most cards with 0-3 labels, 70 cards with agent
runs in every state (queued, running, succeeded with a cost, failed), 15 of them with two runs so
``lastRun`` is the newer one. A second workspace with its own 100-card board shares the tables,
so row-level security has rows to hide.
"""

from __future__ import annotations

import random
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from uuid import UUID

import psycopg
from psycopg import sql

from commands import models as m
from commands.handlers import Actor, AgentWorks

LANES = (("Backlog", None, 80), ("In progress", 60, 50), ("Review", 40, 30), ("Done", None, 40))
LABELS = ("bug", "feature", "infra", "ui", "backend", "urgent", "docs")
OWNER = "b3f1c2d4-0e5a-4b6c-8d7e-9f0a1b2c3d06"  # user ids are UUIDs, as tokens carry them
OTHER_OWNER = "other-owner"


@dataclass(frozen=True)
class Seeded:
    workspace_id: UUID
    project_id: UUID
    user_id: str
    cards: int
    runs: int
    commands: int
    other_workspace_id: UUID


def admin_url(base: str) -> str:
    return f"{base.rstrip('/')}/postgres"


def new_database_name() -> str:
    return f"aw_bench_{secrets.token_hex(6)}"


def drop_database(base: str, dbname: str) -> None:
    with psycopg.connect(admin_url(base), autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname))
        )


def _board(
    write: AgentWorks, owner: Actor, workspace: UUID, name: str, rng: random.Random, scale: float
) -> tuple[UUID, int, int, int]:
    commands = 0
    project = write.create_project(
        m.CreateProject(
            workspace_id=workspace,
            name=name,
            lanes=[m.LaneInput(name=lane, wip_limit=limit) for lane, limit, _ in LANES],
        ),
        owner,
    )
    commands += 1
    plan = [lane for lane, _, count in LANES for _ in range(round(count * scale))]
    rng.shuffle(plan)  # interleave lanes so positions are not created lane by lane
    cards: list[UUID] = []
    for i, lane in enumerate(plan):
        card = write.create_card(
            m.CreateCard(
                project_id=project.id,
                title=f"Card {i:03d}: {rng.choice(('Fix', 'Build', 'Review', 'Ship'))} "
                f"{rng.choice(('login', 'billing', 'search', 'board', 'export'))}",
                description="x" * rng.randint(0, 400),
                lane=lane,
            ),
            owner,
        )
        cards.append(card.id)
        commands += 1
    for i, card_id in enumerate(cards):
        if i % 2 == 0:
            # Assignees are members of the workspace; the owner is the one this seed has.
            write.assign_card(m.AssignCard(card_id=card_id, assignee=owner.user_id), owner)
            commands += 1
        labels = rng.sample(LABELS, rng.randint(0, 3))
        if labels:
            write.update_card(m.UpdateCard(card_id=card_id, labels=labels), owner)
            commands += 1
    runs = 0
    with_runs = rng.sample(cards, round(70 * scale))
    for i, card_id in enumerate(with_runs):
        for _ in range(2 if i < round(15 * scale) else 1):
            run = write.start_agent_run(
                m.StartAgentRun(
                    card_id=card_id, agent=rng.choice(("coder", "reviewer", "prd_writer"))
                ),
                owner,
            )
            runs += 1
            commands += 1
            fate = i % 4  # 0 queued, 1 running, 2 succeeded with cost, 3 failed
            if fate == 0:
                continue
            write.begin_run(m.BeginRun(run_id=run.id, worker="bench"), owner)
            commands += 1
            if fate == 1:
                continue
            write.record_llm_call(
                m.RecordLlmCall(
                    run_id=run.id,
                    call_id=f"call-{run.id}",
                    provider="simulated",
                    model="sim-1",
                    input_tokens=rng.randint(100, 5000),
                    output_tokens=rng.randint(50, 2000),
                    latency_ms=rng.randint(100, 3000),
                    provider_cost_micros=rng.randint(1_000, 900_000),
                    price_table_version="bench",
                    at=datetime.now(UTC),
                ),
                owner,
            )
            write.finish_run(
                m.FinishRun(
                    run_id=run.id,
                    outcome="SUCCEEDED" if fate == 2 else "FAILED",
                    error=None if fate == 2 else "tests failed",
                ),
                owner,
            )
            commands += 2
    return project.id, len(cards), runs, commands


def seed(write: AgentWorks, *, seed_value: int = 7) -> Seeded:
    """Two workspaces; the first holds the benchmarked 200-card board."""
    rng = random.Random(seed_value)
    boot = Actor(user_id=OWNER, workspace_id="*")
    ws = write.create_workspace(m.CreateWorkspace(name="Bench"), boot)
    owner = Actor(user_id=OWNER, workspace_id=str(ws.id))
    project_id, cards, runs, commands = _board(write, owner, ws.id, "Board of 200", rng, 1.0)

    other_boot = Actor(user_id=OTHER_OWNER, workspace_id="*")
    other = write.create_workspace(m.CreateWorkspace(name="Neighbour"), other_boot)
    other_owner = Actor(user_id=OTHER_OWNER, workspace_id=str(other.id))
    _, _, _, more = _board(write, other_owner, other.id, "Neighbour board", rng, 0.5)
    return Seeded(
        workspace_id=ws.id,
        project_id=project_id,
        user_id=OWNER,
        cards=cards,
        runs=runs,
        commands=commands + more + 2,
        other_workspace_id=other.id,
    )
