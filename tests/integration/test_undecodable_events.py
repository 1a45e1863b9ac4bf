"""A stored event that cannot even be decoded parks its aggregate; it never stops the pipeline.

A bad upgrade can leave events in the log that today's code cannot turn into domain events: a
class renamed or removed (its stored topic no longer resolves), or a state that is not the JSON
the mapper expects. Every reader of the log in global order (the relay, the embedded fan-out, a
rebuild, the sweep) used to raise on such a row, and being the only way forward, tried it again
and again: nothing after it reached any read model of any tenant. Now the row reads as an
envelope marked undecodable, the relay publishes it like any other, and each projector following
its aggregate parks that aggregate (its later events wait behind it) while every other aggregate
goes on; after the fix ``retry_parked`` applies it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from uuid import UUID

import eventsourcing.utils
import pytest
from board_helpers import stored_head, to_the_head, whole_log
from fanout_helpers import EmbeddedPath, parked, projector_side, rows
from parking_helpers import TwoTenants
from undecodable import plant_undecodable

from commands import models as m
from domain.card import Card
from domain.envelope import EventEnvelope
from projections.kanban import KanbanProjector
from projections.rebuild import rebuild_many
from projections.runner import ProjectionRunner
from projections.sweep import ProjectionSweep
from streams.relay import Relay, RelayPositions

if TYPE_CHECKING:
    from commands.handlers import AgentWorks


def labels(url: str, card_id: UUID) -> list[str]:
    ((found,),) = rows(url, "SELECT labels FROM rm_cards WHERE card_id = %s", card_id)
    return list(found)


class Scene(TwoTenants):
    """Two workspaces; card ``a1`` gets an event stored under a topic that no longer resolves
    (or, ``broken_json``, with a state that is not JSON), then every card goes on."""

    planted_title = "undecodable"

    def plant_and_go_on(self, *, broken_json: bool = False) -> None:
        app = self.app
        self.bad_version = plant_undecodable(app, self.a1, broken_json=broken_json)
        app.label_card(m.LabelCard(card_id=self.a2, label="fine"), self.a.owner)
        app.label_card(m.LabelCard(card_id=self.b1, label="fine"), self.b.owner)

    def assert_parked_alone(self, url: str, *, workspace_known: bool = True) -> None:
        assert labels(url, self.a2) == ["fine"]
        assert labels(url, self.b1) == ["fine"]
        assert labels(url, self.a1) == []  # held behind the undecodable event
        kanban = [p for p in parked(url, "workspace_id") if p[0] == "kanban"]
        assert [(p[1], p[2]) for p in kanban] == [(self.a1, self.bad_version)]
        # The workspace is read from the stored metadata when that is still JSON.
        assert kanban[0][4] == (self.a.workspace_id if workspace_known else None)


@pytest.mark.parametrize("broken_json", [False, True], ids=["unknown-topic", "broken-json"])
def test_the_embedded_fanout_parks_an_undecodable_event_and_goes_on(
    database_url: str, app: AgentWorks, broken_json: bool
) -> None:
    scene = Scene(app)
    path = EmbeddedPath(database_url)
    try:
        path.fanout.drain()
        scene.plant_and_go_on(broken_json=broken_json)
        head = to_the_head(
            path.fanout.drain, lambda: min(path.fanout.positions().values()), path.log
        )
        scene.assert_parked_alone(database_url, workspace_known=not broken_json)
        assert set(path.fanout.positions().values()) == {head}
    finally:
        path.stop()


def test_the_sweep_and_a_rebuild_go_past_an_undecodable_event(
    database_url: str, app: AgentWorks
) -> None:
    scene = Scene(app)
    scene.plant_and_go_on()
    with projector_side(database_url) as (pool, log):
        runner = ProjectionRunner(KanbanProjector(), pool, log)
        sweep = ProjectionSweep(runner)
        to_the_head(lambda: sweep.sweep(stored_head(log)), sweep.watermark, log)
        scene.assert_parked_alone(database_url)
        rebuild_many([KanbanProjector()], pool, log, batch_size=3)
        scene.assert_parked_alone(database_url)


def test_a_retry_after_the_fix_applies_the_parked_events(
    database_url: str, app: AgentWorks, monkeypatch: pytest.MonkeyPatch
) -> None:
    scene = Scene(app)
    scene.plant_and_go_on()
    with projector_side(database_url) as (pool, log):
        runner = ProjectionRunner(KanbanProjector(), pool, log)
        runner.process(whole_log(log))
        scene.assert_parked_alone(database_url)
        # The fix: the renamed class is known again under its old topic.
        monkeypatch.setitem(
            eventsourcing.utils._topic_cache,
            f"{Card.Labelled.__module__}:Card.Relabelled",
            Card.Labelled,
        )
        (retried,) = runner.retry_parked()
        assert (retried.applied, retried.parked) == (2, None)
    assert labels(database_url, scene.a1) == ["after", "planted"]
    assert [p for p in parked(database_url, "workspace_id") if p[0] == "kanban"] == []


class RecordingProducer:
    """Acknowledges everything at once and keeps what it was sent."""

    def __init__(self) -> None:
        self.sent: list[EventEnvelope] = []

    def send(self, topic: str, value: bytes | None = None, **_: Any) -> Any:
        assert value is not None
        self.sent.append(EventEnvelope.from_bytes(value))
        sent = len(self.sent)

        class Ack:
            def get(self, timeout: float | None = None) -> Any:
                return type("Meta", (), {"topic": topic, "partition": 0, "offset": sent})()

        return Ack()

    def flush(self, timeout: float | None = None) -> None:
        pass

    def close(self, timeout: float | None = None) -> None:
        pass


def test_the_relay_publishes_past_an_undecodable_event(database_url: str, app: AgentWorks) -> None:
    scene = Scene(app)
    scene.plant_and_go_on()
    producer = RecordingProducer()
    with projector_side(database_url) as (_, log):
        relay = Relay(log, lambda: producer, RelayPositions(database_url, role=None))
        try:
            to_the_head(relay.publish_once, lambda: relay.position, log)
        finally:
            relay.positions.close()
    (marked,) = [
        e
        for e in producer.sent
        if e.originator_version == scene.bad_version and e.originator_id == scene.a1
    ]
    assert marked.aggregate == "Card"
    assert marked.workspace_id == scene.a.workspace_id
    # What a worker makes of it: the projector parks the card, the others go on.
    with projector_side(database_url) as (pool, log):
        ProjectionRunner(KanbanProjector(), pool, log).process(producer.sent)
    scene.assert_parked_alone(database_url)
