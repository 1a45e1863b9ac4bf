"""``agentworks plan``: the operator sets a workspace's markup and billing increment (no member
may: ``tests/e2e/test_tenancy_and_roles.py``); bad values are one line and exit 2."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pg
import pytest
from test_cli import agentworks

from commands import models as m
from commands.handlers import Actor
from infra.bootstrap import build_write_side

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path
    from uuid import UUID

    from commands.handlers import AgentWorks


def plan(database_url: str, tmp_path: Path, *args: str) -> tuple[int, str, str]:
    result = agentworks(
        "plan", *args, cwd=tmp_path, env={"AGENTWORKS_DATABASE_URL": database_url, **pg.LOGIN_ENV}
    )
    return result.returncode, result.stdout, result.stderr


@pytest.fixture
def workspace(database_url: str) -> Iterator[tuple[AgentWorks, UUID]]:
    app = build_write_side(database_url)
    created = app.create_workspace(
        m.CreateWorkspace(name="Priced"), Actor(user_id="olga", workspace_id="*")
    )
    yield app, created.id
    app.close()


def test_the_operator_sets_a_workspaces_plan(
    database_url: str, tmp_path: Path, workspace: tuple[AgentWorks, UUID]
) -> None:
    app, workspace_id = workspace
    code, out, err = plan(
        database_url, tmp_path, "--workspace", str(workspace_id), "--markup", "3.5",
        "--increment", "0.10",
    )  # fmt: skip

    assert code == 0, err
    assert "markup 3.5" in out
    priced = app.repository.get(workspace_id)
    assert (str(priced.markup), priced.billing_increment_micros) == ("3.5", 100_000)


@pytest.mark.parametrize(
    ("markup", "increment", "named"),
    [
        ("0", "0.25", "markup"),
        ("five", "0.25", "markup"),
        ("5", "0.005", "cent"),
        # Named 'amount' before: the option is --increment.
        ("5", "abc", "billing increment"),
        ("5", "-0.25", "billing increment"),
        ("5", "0.0000001", "billing increment"),
    ],
)
def test_a_plan_no_invoice_could_bill_is_refused_in_one_line(
    database_url: str,
    tmp_path: Path,
    workspace: tuple[AgentWorks, UUID],
    markup: str,
    increment: str,
    named: str,
) -> None:
    app, workspace_id = workspace
    code, _, err = plan(
        database_url, tmp_path, "--workspace", str(workspace_id), "--markup", markup,
        "--increment", increment,
    )  # fmt: skip

    assert code == 2
    assert named in err.strip().splitlines()[-1]
    assert str(app.repository.get(workspace_id).markup) == "5"
