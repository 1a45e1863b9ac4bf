"""Demo data for ``agentworks dev --demo``: a workspace, a project and cards across lanes.

Every command carries a command id derived from a fixed name, so seeding again on the same data
dir replays the first results and writes nothing new.
"""

from __future__ import annotations

import contextlib
import secrets
from dataclasses import dataclass
from pathlib import Path
from uuid import NAMESPACE_URL, UUID, uuid5

from adapters.credentials import kept_secret
from commands import models as m
from commands.handlers import Actor, AgentWorks
from commands.identity import Identity
from domain.errors import Duplicate

_NS = uuid5(NAMESPACE_URL, "https://agentworks.dev/demo")
# User ids are UUIDs (API.md), like the ones tokens carry.
DEMO_OWNER = str(uuid5(_NS, "user:demo-owner"))
DEMO_MEMBER = str(uuid5(_NS, "user:demo-member"))

LANES = (("Backlog", None), ("In progress", 3), ("Review", 2), ("Done", None))
CARDS = (
    ("Write the PRD for team billing", "Backlog"),
    ("Sketch the invoice PDF", "Backlog"),
    ("Add SSO login", "Backlog"),
    ("Rate-limit the public API", "Backlog"),
    ("Design the usage dashboard", "In progress"),
    ("Migrate logs to full-text search", "In progress"),
    ("Review the WIP-limit rules", "Review"),
    ("Fix the flaky board test", "Review"),
    ("Set up the event store", "Done"),
    ("Ship the Kanban read model", "Done"),
)


def _id(name: str) -> UUID:
    return uuid5(_NS, name)


@dataclass(frozen=True)
class Demo:
    workspace_id: UUID
    project_id: UUID
    owner: str
    cards: int


def seed_demo(app: AgentWorks) -> Demo:
    workspace = app.create_workspace(
        m.CreateWorkspace(name="Demo workspace", command_id=_id("workspace")),
        Actor(user_id=DEMO_OWNER, workspace_id="*"),
    )
    owner = Actor(user_id=DEMO_OWNER, workspace_id=str(workspace.id))
    project = app.create_project(
        m.CreateProject(
            workspace_id=workspace.id,
            name="AgentWorks launch",
            lanes=[m.LaneInput(name=name, wip_limit=limit) for name, limit in LANES],
            command_id=_id("project"),
        ),
        owner,
    )
    app.add_member(
        m.AddMember(
            workspace_id=workspace.id,
            user_id=DEMO_MEMBER,
            role="MEMBER",
            command_id=_id("member"),
        ),
        owner,
    )
    first_card = None
    for title, lane in CARDS:
        card = app.create_card(
            m.CreateCard(
                project_id=project.id,
                title=title,
                description=f"Demo card: {title.lower()}.",
                lane=lane,
                command_id=_id(f"card:{title}"),
            ),
            owner,
        )
        first_card = first_card or card
    if first_card is not None:
        app.start_agent_run(
            m.StartAgentRun(
                card_id=first_card.id, agent="prd_writer", max_cost="2.00", command_id=_id("run")
            ),
            owner,
        )
    return Demo(workspace.id, project.id, DEMO_OWNER, len(CARDS))


DEMO_EMAIL = "demo@agentworks.dev"


def seed_demo_user(
    app: AgentWorks, identity: Identity, demo: Demo, data_dir: Path
) -> tuple[str, str]:
    """A demo user who signs in at ``/auth/login`` and owns the demo workspace with its seeder.

    The password is made on first use and kept in ``DATA_DIR/demo_password`` (mode 0600), so
    seeding again prints the same one.
    """
    password = _demo_password(data_dir)
    with contextlib.suppress(Duplicate):  # seeded before
        identity.signup(email=DEMO_EMAIL, password=password, name="Demo user")
    user_id = identity.user_id_of(DEMO_EMAIL)
    if user_id is not None:
        app.add_member(
            m.AddMember(
                workspace_id=demo.workspace_id, user_id=str(user_id), role="OWNER",
                command_id=_id("demo-user"),
            ),
            Actor(user_id=DEMO_OWNER, workspace_id=str(demo.workspace_id)),
        )  # fmt: skip
    return DEMO_EMAIL, password


def _demo_password(data_dir: Path) -> str:
    return kept_secret(data_dir / "demo_password", lambda: secrets.token_urlsafe(12))
