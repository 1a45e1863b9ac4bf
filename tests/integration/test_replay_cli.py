"""``agentworks replay card``: a card's history and state from the event store, as a process."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import pytest
from board_helpers import add_cards, bootstrap_board
from test_cli import agentworks, assert_one_line_error

from commands import models as m

if TYPE_CHECKING:
    from pathlib import Path

    from commands.handlers import AgentWorks


# Each test runs the CLI as separate processes (several seconds each on this machine).
pytestmark = pytest.mark.slow


@pytest.fixture
def card(write_side: AgentWorks, database_url: str, tmp_path: Path) -> dict[str, Any]:
    board = bootstrap_board(write_side)
    (card_id,) = add_cards(write_side, board, 1)
    write_side.move_card(m.MoveCard(card_id=card_id, to_lane="Doing"), board.owner)
    write_side.update_card(m.UpdateCard(card_id=card_id, title="renamed"), board.owner)
    return {
        "id": str(card_id),
        "project": str(board.project_id),
        "env": {"AGENTWORKS_DATABASE_URL": database_url},
    }


def replay(card: dict[str, Any], tmp_path: Path, *args: str) -> Any:
    return agentworks("replay", "card", *args, cwd=tmp_path, env=card["env"])


def test_json_history_and_state_at_every_version(card: dict[str, Any], tmp_path: Path) -> None:
    now = replay(card, tmp_path, card["id"], "--json")
    assert now.returncode == 0, now.stderr
    latest = json.loads(now.stdout)
    assert latest["version"] == 3
    assert [e["type"] for e in latest["events"]] == ["Card.Created", "Card.Moved", "Card.Edited"]
    assert {e["actor"] for e in latest["events"]} == {"alice"}
    assert (latest["state"]["lane"], latest["state"]["title"]) == ("Doing", "renamed")

    first = json.loads(replay(card, tmp_path, card["id"], "--as-of-version", "1", "--json").stdout)
    assert (first["version"], first["state"]["lane"], first["state"]["title"]) == (
        1,
        "Todo",
        "card 0",
    )
    assert first["events"] == latest["events"][:1]

    moved_at = latest["events"][1]["at"]
    at_move = json.loads(replay(card, tmp_path, card["id"], "--as-of", moved_at, "--json").stdout)
    assert (at_move["version"], at_move["state"]["lane"]) == (2, "Doing")
    assert at_move["state"]["title"] == "card 0"


def test_table_names_who_when_what_and_position(card: dict[str, Any], tmp_path: Path) -> None:
    result = replay(card, tmp_path, card["id"])
    assert result.returncode == 0, result.stderr
    for text in ("Card.Created", "Card.Moved", "alice", "renamed", "version"):
        assert text in result.stdout


def test_a_time_before_the_card_existed_is_not_found_exit_1(
    card: dict[str, Any], tmp_path: Path
) -> None:
    created = json.loads(replay(card, tmp_path, card["id"], "--json").stdout)["events"][0]["at"]
    before = (datetime.fromisoformat(created) - timedelta(seconds=1)).isoformat()
    line = assert_one_line_error(replay(card, tmp_path, card["id"], "--as-of", before), code=1)
    assert "did not exist" in line


@pytest.mark.parametrize(
    "args",
    [
        ("00000000-0000-0000-0000-000000000001",),  # unknown card
        ("not-a-card-id",),
        ("{card}", "--as-of", "last tuesday"),
        ("{card}", "--as-of-version", "99"),
        ("{card}", "--as-of-version", "1", "--as-of", "2026-01-01T00:00:00Z"),
    ],
)
def test_bad_input_is_one_line_exit_2(
    card: dict[str, Any], tmp_path: Path, args: tuple[str, ...]
) -> None:
    assert_one_line_error(replay(card, tmp_path, *(a.format(card=card["id"]) for a in args)))


def test_replay_board_before_and_after_the_move(card: dict[str, Any], tmp_path: Path) -> None:
    events = json.loads(replay(card, tmp_path, card["id"], "--json").stdout)["events"]
    created, moved = events[0]["at"], events[1]["at"]

    def board_at(at: str) -> dict[str, Any]:
        result = agentworks(
            "replay", "board", card["project"], "--as-of", at, "--json",
            cwd=tmp_path, env=card["env"],
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        return {lane["name"]: [c["id"] for c in lane["cards"]]
                for lane in json.loads(result.stdout)["lanes"]}  # fmt: skip

    assert board_at(created)["Todo"] == [card["id"]]
    assert board_at(moved) == {"Todo": [], "Doing": [card["id"]], "Done": []}
    before = agentworks(
        "replay", "board", card["project"], "--as-of", "2001-01-01T00:00:00Z",
        cwd=tmp_path, env=card["env"],
    )  # fmt: skip
    assert "did not exist" in assert_one_line_error(before, code=1)


@pytest.mark.parametrize("group", ["replay", "audit"])
def test_a_group_without_its_command_is_one_line_exit_2(group: str, tmp_path: Path) -> None:
    assert "missing command" in assert_one_line_error(agentworks(group, cwd=tmp_path))


@pytest.mark.parametrize("instant", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"])
def test_an_instant_out_of_range_in_utc_is_one_line_exit_2(
    card: dict[str, Any], tmp_path: Path, instant: str
) -> None:
    """Year 1 east of UTC (9999 west of it) has no UTC time: bad input, not a traceback."""
    assert "out of range" in assert_one_line_error(
        replay(card, tmp_path, card["id"], "--as-of", instant)
    )
    board = agentworks(
        "replay", "board", card["project"], "--as-of", instant, cwd=tmp_path, env=card["env"]
    )
    assert "out of range" in assert_one_line_error(board)


#: A title a client may give a card (control characters are ordinary text, domain/text.py):
#: rich markup that closes a tag never opened, an OSC 52 sequence (writes the terminal's
#: clipboard), an ANSI colour and a bidi override.
HOSTILE_TITLE = "[/bold] done \x1b]52;c;cm0gLXJmIH4=\x07 \x1b[31mred \u202eevil"


def test_client_text_in_the_tables_is_shown_not_acted_on(
    write_side: AgentWorks, database_url: str, tmp_path: Path
) -> None:
    board = bootstrap_board(write_side)
    (card_id,) = add_cards(write_side, board, 1)
    write_side.update_card(m.UpdateCard(card_id=card_id, title=HOSTILE_TITLE), board.owner)
    env = {"AGENTWORKS_DATABASE_URL": database_url}
    history = agentworks("replay", "card", str(card_id), cwd=tmp_path, env=env)
    at = json.loads(
        agentworks("replay", "card", str(card_id), "--json", cwd=tmp_path, env=env).stdout
    )["events"][-1]["at"]
    board_now = agentworks(
        "replay", "board", str(board.project_id), "--as-of", at, cwd=tmp_path, env=env
    )

    for result in (history, board_now):
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr
        assert "\x1b" not in result.stdout
        assert "\u202e" not in result.stdout
        assert "[/bold] done" in result.stdout
        assert "\\x1b[31mred" in result.stdout


def test_a_renamed_lane_is_named_as_the_board_named_it_then(
    card: dict[str, Any], write_side: AgentWorks, tmp_path: Path
) -> None:
    from uuid import UUID

    from commands.handlers import Actor

    before = json.loads(replay(card, tmp_path, card["id"], "--json").stdout)
    assert before["state"]["lane"] == "Doing"
    owner = Actor(user_id="alice", workspace_id=before["workspaceId"])
    rename = m.RenameLane(project_id=UUID(card["project"]), lane="Doing", name="In progress")
    write_side.rename_lane(rename, owner)
    now = json.loads(replay(card, tmp_path, card["id"], "--json").stdout)
    assert now["state"]["lane"] == "In progress"
    then = before["events"][-1]["at"]
    at_then = json.loads(replay(card, tmp_path, card["id"], "--as-of", then, "--json").stdout)
    assert at_then["state"]["lane"] == "Doing"
    at_version = json.loads(
        replay(card, tmp_path, card["id"], "--as-of-version", "3", "--json").stdout
    )
    assert at_version["state"]["lane"] == "Doing"


@pytest.mark.parametrize("version", ["0", "-1", "4"])
def test_a_version_the_card_never_had_names_the_cli_option(
    card: dict[str, Any], tmp_path: Path, version: str
) -> None:
    """The operator typed --as-of-version: the refusal names it (it named the GraphQL argument
    asOfVersion, which the command has not) and the versions the card has."""
    line = assert_one_line_error(replay(card, tmp_path, card["id"], "--as-of-version", version))
    assert "--as-of-version must be between 1 and 3" in line
    assert "asOfVersion" not in line
