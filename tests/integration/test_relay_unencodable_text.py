"""An event whose text has no UTF-8 form does not stop the relay, and still reaches the
projectors.

A stored event may hold a lone surrogate (its JSON carries a ``\\ud800`` escape: an older
writer, a manual repair); the write side reads it, and the read models keep such text as U+FFFD
(:mod:`projections.text`). The relay serialised every envelope as UTF-8 JSON, which such text
has no form in: the serialisation raised, the relay rewound and tried the same batch again,
forever, and nothing after that event was published, for any tenant. Now such an event is
published without its payload, as an event too large for a message is, and the worker reads
it whole from the store.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from board_helpers import to_the_head, whole_log
from fanout_helpers import EmbeddedPath, parked, projector_side, rebuild_differences, rows
from kafka_helpers import read_topic, relay_to_the_head
from parking_helpers import TwoTenants, _plant_next

from commands import models as m
from domain.card import Card
from domain.envelope import OMITTED
from projections.kanban import KanbanProjector
from projections.runner import ProjectionRunner
from streams.worker import decode_batch, read_omitted

if TYPE_CHECKING:
    from uuid import UUID

    from commands.handlers import AgentWorks

pytest_plugins = ["kafka_fixtures"]


def plant_without_utf8(app: AgentWorks, card_id: UUID, event_class: Any, name: str) -> int:
    """An ``event_class`` event of the card stored with a lone surrogate in its field ``name``
    (the library's own encoder cannot write one, an older writer's could); its version."""
    (stored,) = app.recorder.select_events(card_id, desc=True, limit=1)
    last = app.mapper.to_domain_event(stored)
    good = app.mapper.to_stored_event(
        event_class(
            originator_id=card_id,
            originator_version=last.originator_version + 1,
            timestamp=datetime.now(UTC),
            meta=dict(last.meta),  # type: ignore[attr-defined]
            **{name: "PLANTED"},
        )
    )
    state = good.state.replace(b'"PLANTED"', b'"half \\ud800 a pair"')
    assert state != good.state
    app.recorder.insert_events(
        [type(good)(originator_id=card_id, originator_version=good.originator_version,
                    topic=good.topic, state=state)]
    )  # fmt: skip
    return int(good.originator_version)


def card(url: str, card_id: UUID) -> tuple[Any, ...]:
    """The card's labels and blocked reason in the read model."""
    ((found, reason),) = rows(
        url, "SELECT labels, blocked_reason FROM rm_cards WHERE card_id = %s", card_id
    )
    return list(found), reason


def test_the_relay_publishes_past_text_without_a_utf8_form(
    database_url: str, app: AgentWorks, kafka_broker: Any
) -> None:
    scene = TwoTenants(app)
    version = plant_without_utf8(app, scene.a1, Card.Blocked, "reason")
    app.label_card(m.LabelCard(card_id=scene.b1, label="fine"), scene.b.owner)
    prefix = f"utf8-{uuid.uuid4().hex[:8]}."
    with projector_side(database_url) as (pool, log):
        head = relay_to_the_head(log, database_url, kafka_broker.bootstrap, prefix)
        expected = sum(1 for env in whole_log(log) if env.topic == "card-events")
        records = read_topic(kafka_broker.bootstrap, prefix + "card-events", expected)
        delivered = decode_batch([record.value for record in records])
        assert max(env.position for env in delivered) == head
        (marked,) = [
            e for e in delivered if (e.originator_id, e.originator_version) == (scene.a1, version)
        ]
        assert OMITTED in marked.metadata
        assert marked.workspace_id == scene.a.workspace_id
        # What the worker makes of it: the event read from the store, its text kept as U+FFFD.
        runner = ProjectionRunner(KanbanProjector(), pool, log)
        runner.process(read_omitted(delivered, log, projector=runner.name))
    assert card(database_url, scene.b1) == (["fine"], None)
    assert card(database_url, scene.a1) == ([], "half \ufffd a pair")
    assert parked(database_url) == []


def test_labels_without_a_storable_form_are_kept_as_replacement_characters(
    database_url: str, app: AgentWorks
) -> None:
    """Labels travel to the table as JSON, where a NUL or a lone surrogate is an escape that
    PostgreSQL refuses: the card was parked (its later events held back) instead of showing
    U+FFFD as any other text of a read model does. Removing such a label must then find it as
    the table holds it, or a card would keep a label its rebuild drops."""
    scene = TwoTenants(app)
    plant_without_utf8(app, scene.a1, Card.Labelled, "label")
    _plant_next(app, scene.a2, Card.Labelled, label="nul \x00 here")
    app.label_card(m.LabelCard(card_id=scene.b1, label="fine"), scene.b.owner)
    path = EmbeddedPath(database_url)
    try:
        to_the_head(path.fanout.drain, lambda: min(path.fanout.positions().values()), path.log)
        assert parked(database_url) == []
        assert card(database_url, scene.a1) == (["half \ufffd a pair"], None)
        assert card(database_url, scene.a2) == (["nul \ufffd here"], None)
        plant_without_utf8(app, scene.a1, Card.Unlabelled, "label")
        _plant_next(app, scene.a2, Card.Unlabelled, label="nul \x00 here")
        to_the_head(path.fanout.drain, lambda: min(path.fanout.positions().values()), path.log)
    finally:
        path.stop()
    assert card(database_url, scene.a1) == ([], None)
    assert card(database_url, scene.a2) == ([], None)
    assert card(database_url, scene.b1) == (["fine"], None)
    assert rebuild_differences(database_url) == {}
