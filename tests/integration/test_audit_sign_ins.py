"""The audit export shows sign-ins (DESIGN.md, Identity): a member's logins and failed logins
while a member of the workspace, never a stranger's, never one from before joining or after
leaving, and the chain still verifies."""

from __future__ import annotations

import contextlib
import json
from typing import TYPE_CHECKING

import psycopg
import pytest
from board_helpers import add_cards, bootstrap_board
from identities import cheap_identity
from test_cli import agentworks
from undecodable import plant_undecodable

from adapters.audit_signing import DEV_AUDIT_KEY_FILE, load_public_key
from commands import models as m
from domain.errors import Unauthenticated
from streams.audit import verify, workspace_rows

if TYPE_CHECKING:
    from pathlib import Path

    from commands.handlers import AgentWorks

pytestmark = pytest.mark.slow

PASSWORD = "correct horse battery"


def test_export_holds_members_sign_ins_only_while_they_are_members(
    write_side: AgentWorks, database_url: str, tmp_path: Path
) -> None:
    identity = cheap_identity(write_side)
    board = bootstrap_board(write_side)
    ada = identity.signup(email="ada@example.com", password=PASSWORD, name="Ada")
    eve = identity.signup(email="eve@example.com", password=PASSWORD, name="Eve")

    def log_in(email: str, password: str = PASSWORD) -> None:
        with contextlib.suppress(Unauthenticated):
            identity.login(email=email, password=password)

    log_in("ada@example.com")  # before joining: not the workspace's business
    add = m.AddMember(workspace_id=board.workspace_id, user_id=str(ada), role="MEMBER")
    write_side.add_member(add, board.owner)
    log_in("ada@example.com")
    log_in("ada@example.com", "wrong password!")
    log_in("eve@example.com")  # never a member
    remove = m.RemoveMember(workspace_id=board.workspace_id, user_id=str(ada))
    write_side.remove_member(remove, board.owner)
    log_in("ada@example.com")  # after leaving

    data_dir = tmp_path / "data"
    result = agentworks(
        "audit", "export", "--workspace", str(board.workspace_id), "--data-dir", str(data_dir),
        cwd=tmp_path, env={"AGENTWORKS_DATABASE_URL": database_url},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    events = [json.loads(text) for text in lines[:-1]]

    sign_ins = [e for e in events if e["type"].startswith("User.")]
    assert [(e["type"], e["originatorId"]) for e in sign_ins] == [
        ("User.LoginSucceeded", str(ada)),
        ("User.LoginFailed", str(ada)),
    ]
    assert str(eve) not in result.stdout
    assert "ada@example.com" not in result.stdout  # sign-ins only, no address or credential
    key = load_public_key((data_dir / DEV_AUDIT_KEY_FILE).read_text(), source="dev key")
    assert verify(lines, key).ok


def test_export_reads_no_identity_event_of_the_installation_but_sign_ins(
    write_side: AgentWorks, database_url: str
) -> None:
    """The export's query reads the workspace's events, the sign-ins, and events naming no
    workspace that may be the workspace's (a tenant event whose state cannot be read); never
    the rest of the installation's identity events (registrations, e-mail claims, every
    session's refresh), which it would decode only to drop: an export's cost must follow its
    workspace, not how many people sign in anywhere."""
    identity = cheap_identity(write_side)
    board = bootstrap_board(write_side)
    (card,) = add_cards(write_side, board, 1)
    broken = plant_undecodable(write_side, card, broken_json=True, then_good=False)
    ada = identity.signup(email="ada-rows@example.com", password=PASSWORD, name="Ada")
    write_side.add_member(
        m.AddMember(workspace_id=board.workspace_id, user_id=str(ada), role="MEMBER"),
        board.owner,
    )
    session = identity.login(email="ada-rows@example.com", password=PASSWORD)
    identity.refresh(session.refresh_token)

    with psycopg.connect(database_url) as conn, conn.transaction():
        rows = list(workspace_rows(conn, workspace_id=board.workspace_id, json_prefilter=True))

    identity_types = {
        str(topic).partition(":")[2]
        for (_, _, _, topic, _) in rows
        if str(topic).partition(":")[2].split(".")[0] in {"User", "Session", "EmailClaim"}
    }
    assert identity_types == {"User.LoginSucceeded"}
    assert (card, broken) in {(oid, version) for (_, oid, version, _, _) in rows}
