"""Schema evolution: events stored in an older shape are upcast on every read, never rewritten.

The evolution is staged on real card events (the classes get ``class_version = 2`` and an
``upcast_v1_v2`` for the test's duration), so the real mapper, repository, snapshots, history,
replay CLI, rebuild and audit export all read the old rows with "today's" code:

* ``Card.Edited`` v1 stored the title as ``name`` and had no description (renamed, added);
* ``Card.Moved`` v1 stored ``lanes: "Todo->Doing"`` (split into ``from_lane`` / ``to_lane``).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any
from uuid import UUID

import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from psycopg import IsolationLevel
from psycopg.rows import dict_row

from adapters.audit_signing import Signer
from adapters.eventlog import EventLog
from commands import models as m
from commands.handlers import Actor
from domain.card import Card
from infra import cli
from projections.kanban import KanbanProjector
from projections.rebuild import rebuild
from read_api.eventlog import card_events
from streams.audit import export_lines, verify, workspace_rows

if TYPE_CHECKING:
    from read_side_helpers import ReadSide


def _edited_v1_v2(state: dict[str, Any]) -> None:
    state["title"] = state.pop("name")
    state.setdefault("description", "")


def _moved_v1_v2(state: dict[str, Any]) -> None:
    state["from_lane"], state["to_lane"] = state.pop("lanes").split("->")


@pytest.fixture
def evolved(monkeypatch: pytest.MonkeyPatch) -> None:
    """Today's code: the two card events at class version 2, with their upcasters."""
    monkeypatch.setattr(Card.Edited, "class_version", 2, raising=False)
    monkeypatch.setattr(Card.Edited, "upcast_v1_v2", staticmethod(_edited_v1_v2), raising=False)
    monkeypatch.setattr(Card.Moved, "class_version", 2, raising=False)
    monkeypatch.setattr(Card.Moved, "upcast_v1_v2", staticmethod(_moved_v1_v2), raising=False)


def _store_old_events(side: ReadSide, card_id: UUID) -> list[bytes]:
    """Append version 2 (Edited v1) and 3 (Moved v1) of the card as an old release wrote them."""
    created = card_events_of(side, card_id)[0]
    encode = side.app.mapper.transcoder.encode
    base = {"timestamp": created.timestamp, "meta": dict(created.metadata)}
    old = [
        (2, Card.Edited, base | {"name": "named the old way"}),
        (3, Card.Moved, base | {"lanes": "Todo->Doing", "position": "V5"}),
    ]
    states = [encode(state) for _, _, state in old]
    with psycopg.connect(side.database_url) as conn:
        for (version, cls, _), state in zip(old, states, strict=True):
            conn.execute(
                "INSERT INTO agentworks_events (originator_id, originator_version, topic, state)"
                " VALUES (%s, %s, %s, %s)",
                (card_id, version, f"{cls.__module__}:{cls.__qualname__}", state),
            )
    return states


def _stored_states(side: ReadSide, card_id: UUID) -> list[bytes]:
    rows = side.rows(
        "SELECT state FROM agentworks_events WHERE originator_id = %s"
        " AND originator_version IN (2, 3) ORDER BY originator_version",
        (card_id,),
    )
    return [bytes(row["state"]) for row in rows]


def card_events_of(side: ReadSide, card_id: UUID) -> list[Any]:
    created = side.row(
        "SELECT convert_from(state, 'UTF8')::jsonb #>> '{meta,workspace_id}' AS ws"
        " FROM agentworks_events WHERE originator_id = %s AND originator_version = 1",
        (card_id,),
    )
    with psycopg.connect(side.database_url, row_factory=dict_row) as conn:
        return card_events(conn, side.app.mapper, card_id=card_id, workspace_id=UUID(created["ws"]))


@pytest.mark.usefixtures("evolved")
def test_old_shape_events_read_as_today_everywhere(
    side: ReadSide, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    world = side.new_world()
    actor = world.owner
    card_id = side.app.create_card(m.CreateCard(project_id=world.project_id, title="t"), actor).id
    old_states = _store_old_events(side, card_id)
    # Today's release keeps writing: this edit is stored at class version 2.
    side.app.update_card(m.UpdateCard(card_id=card_id, description="new"), actor)

    # History (the API's cardHistory path) and the repository at every version.
    history = card_events_of(side, card_id)
    assert [e.type for e in history] == ["Card.Created", "Card.Edited", "Card.Moved", "Card.Edited"]
    assert history[1].payload == {"title": "named the old way", "description": ""}
    assert (history[2].payload["from_lane"], history[2].payload["to_lane"]) == ("Todo", "Doing")
    service = Actor.service("audit-test", world.workspace_id)
    then = side.app.card_at(card_id, service, version=3)
    assert (then.title, then.description, then.lane) == ("named the old way", "", "Doing")
    now = side.app.card_at(card_id, service)
    assert (now.title, now.description, now.version) == ("named the old way", "new", 4)

    # The replay CLI, in this process so that it runs today's (evolved) classes.
    monkeypatch.setenv("AGENTWORKS_DATABASE_URL", side.database_url)
    monkeypatch.setenv("AGENTWORKS_LOG_LEVEL", "ERROR")
    assert cli.run(["replay", "card", str(card_id), "--as-of-version", "3", "--json"]) == 0
    replayed = json.loads(capsys.readouterr().out)
    assert replayed["state"]["title"] == "named the old way"
    assert replayed["events"][2]["data"]["to_lane"] == "Doing"

    # A rebuild of the Kanban read model from the log.
    log = EventLog(side.app.recorder, side.app.mapper)  # type: ignore[arg-type]
    rebuild(KanbanProjector(), side.pool, log)
    row = side.row("SELECT title, description, lane, version FROM rm_cards WHERE card_id = %s",
                   (card_id,))  # fmt: skip
    assert row == {
        "title": "named the old way",
        "description": "new",
        "lane": "Doing",
        "version": 4,
    }

    # The audit export carries the upcast shape, and verifies.
    signer = Signer(Ed25519PrivateKey.generate())
    with psycopg.connect(side.database_url) as conn:
        conn.isolation_level = IsolationLevel.REPEATABLE_READ
        with conn.transaction():
            lines = list(
                export_lines(
                    workspace_rows(conn, workspace_id=world.workspace_id, json_prefilter=True),
                    log.decode,
                    workspace_id=world.workspace_id,
                    signer=signer,
                )
            )
    mine = [json.loads(line) for line in lines[:-1]]
    mine = [line for line in mine if line["originatorId"] == str(card_id)]
    assert mine[1]["data"] == {"title": "named the old way", "description": ""}
    assert mine[2]["data"]["from_lane"] == "Todo"
    assert verify(lines, signer.public_key).ok

    # Nothing was rewritten: the old rows hold exactly what the old release stored.
    assert _stored_states(side, card_id) == old_states
    assert all(b"class_version" not in state for state in old_states)
