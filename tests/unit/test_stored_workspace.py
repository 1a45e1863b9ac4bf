"""The events table's workspace column, read from a stored state's metadata: the short cut for
states that begin as the transcoder writes ours must agree with parsing the whole state."""

from __future__ import annotations

import json
from typing import Any
from uuid import UUID, uuid4

import pytest
from aw_builders import World

from adapters.eventstore import _workspace_of, stored_workspace
from commands import models as m

WS, OTHER = uuid4(), uuid4()
STAMP = {"_type_": "datetime_iso", "_data_": "2026-12-06T09:20:29.846148+00:00"}


def state(*pairs: tuple[str, Any]) -> bytes:
    """A JSON object with exactly these keys in this order (repeats kept), as the transcoder
    writes it: no spaces."""
    return ("{" + ",".join(f"{json.dumps(k)}:{json.dumps(v, separators=(',', ':'))}"
                           for k, v in pairs) + "}").encode()  # fmt: skip


def meta(workspace: object) -> dict[str, object]:
    return {"workspace_id": str(workspace), "actor": "alice"}


CASES = {
    "ours": state(("timestamp", STAMP), ("meta", meta(WS)), ("to_lane", "Doing")),
    "a later meta wins": state(("timestamp", STAMP), ("meta", meta(WS)), ("meta", meta(OTHER))),
    "a later workspace_id in meta wins": state(("timestamp", STAMP), ("meta", meta(WS))).replace(
        b'"actor":"alice"', f'"actor":"a","workspace_id":"{OTHER}"'.encode()
    ),
    "payload workspace_id": state(
        ("timestamp", STAMP), ("meta", meta(WS)), ("workspace_id", str(OTHER))
    ),
    "nested meta in the payload": state(
        ("timestamp", STAMP), ("meta", meta(WS)), ("lines", [{"meta": meta(OTHER)}])
    ),
    "a key ending in meta": state(("timestamp", STAMP), ("meta", meta(WS)), ('x"meta', 1)),
    "upper-case id": state(("timestamp", STAMP), ("meta", meta(str(WS).upper()))),
    "no workspace": state(("timestamp", STAMP), ("meta", {"workspace_id": "", "actor": "a"})),
    "meta not after the timestamp": state(("meta", meta(WS)), ("timestamp", STAMP)),
    "not JSON": b"\x00\x01compressed",
}


@pytest.mark.parametrize("name", CASES)
def test_the_short_cut_agrees_with_the_full_parse(name: str) -> None:
    stored = CASES[name]
    assert _workspace_of(stored, {}) == stored_workspace(stored)


def test_the_states_the_write_side_stores_agree() -> None:
    world = World.build()
    world.app.move_card(m.MoveCard(card_id=world.card_id, to_lane="Review"), world.owner)
    known: dict[bytes, UUID] = {}
    states = [n.state for n in world.app.recorder.select_notifications(start=1, limit=1000)]
    assert [_workspace_of(s, known) for s in states] == [stored_workspace(s) for s in states]
    assert stored_workspace(states[-1]) == world.workspace_id
    assert known, "the write side's own events never took the short cut"
