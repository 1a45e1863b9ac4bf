"""A message on a projector's topic that is not an event envelope does not cost the events
delivered with it, nor stop the worker.

The relay only publishes envelopes, but a topic is open to any producer (a tool, a misrouted
service, an envelope of a newer schema during an upgrade). The worker used to decode a delivered
batch as a whole: one such message raised out of its faust agent, which crashed; faust settled
the batch's messages and restarted the agent, so every event delivered in the same batch, of
every workspace, was passed over (only a sweep, minutes later or never, would bring them in).
Now a message that is not an envelope is logged and skipped, and the batch applied without it;
an envelope's event lost that way is still in the store, where the sweep finds it.
"""

from __future__ import annotations

import contextlib
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from board_helpers import bootstrap_board, whole_log
from fanout_helpers import KafkaFanout, connect, projector_side, wait_until

from adapters.kafka import create_topics, make_producer
from commands import models as m
from domain.envelope import TOPICS
from infra.bootstrap import build_write_side
from streams.relay import headers_for, topic_for
from streams.worker import decode_batch

if TYPE_CHECKING:
    from collections.abc import Iterator

    from commands.handlers import AgentWorks

pytest_plugins = ["kafka_fixtures"]


@pytest.fixture
def app(database_url: str) -> Iterator[AgentWorks]:
    with contextlib.closing(build_write_side(database_url, pool_size=2)) as write_side:
        yield write_side


def test_a_batch_decodes_without_what_is_not_an_envelope() -> None:
    good = (
        b'{"position": 3, "originator_id": "00000000-0000-0000-0000-000000000001",'
        b' "originator_version": 1, "aggregate": "Card", "type": "Card.Labelled",'
        b' "event_version": 1, "timestamp": "2026-01-01T00:00:00+00:00", "workspace_id": null,'
        b' "metadata": {}, "payload": {"label": "x"}}'
    )
    decoded = decode_batch([b"not json", good, b'{"position": 1}', b"\xff\xfe", None])  # type: ignore[list-item]
    assert [env.position for env in decoded] == [3]


def labels(url: str) -> set[str]:
    with connect(url) as conn:
        return {
            label for (found,) in conn.execute("SELECT labels FROM rm_cards") for label in found
        }


@pytest.mark.slow
def test_the_events_delivered_with_a_message_that_is_not_an_envelope_are_applied(
    database_url: str, app: AgentWorks, kafka_broker: Any, tmp_path: Path
) -> None:
    prefix = f"garbage-{uuid.uuid4().hex[:8]}."
    create_topics(kafka_broker.bootstrap, [prefix + t for t in TOPICS], 1)
    a = bootstrap_board(app, owner="alice")
    b = bootstrap_board(app, owner="bob")
    cards = [
        app.create_card(m.CreateCard(project_id=board.project_id, title="t"), board.owner).id
        for board in (a, b)
    ]
    # No relay: this test publishes the log itself, so that the garbage and the events share
    # one delivery.
    fanout = KafkaFanout(
        database_url,
        kafka_broker.bootstrap,
        tmp_path,
        topic_prefix=prefix,
        partitions=1,
        projectors=["kanban"],
    )
    producer = make_producer(kafka_broker.bootstrap)
    with projector_side(database_url) as (_, log):

        def publish(after: int, garbage: bytes | None = None) -> int:
            envelopes = whole_log(log, after)
            if garbage is not None:
                producer.send(prefix + "card-events", value=garbage, key=b"x")
            for env in envelopes:
                producer.send(
                    topic_for(env, prefix),
                    value=env.to_bytes(),
                    key=str(env.workspace_id).encode(),
                    headers=headers_for(env),
                )
            producer.flush(timeout=10)
            return envelopes[-1].position

        try:
            published = publish(0)
            for worker in fanout.workers.values():
                worker.start()
            wait_until(
                lambda: _count(database_url) == 2, timeout=90, what="the first cards", poll=0.2
            )
            for card, board in zip(cards, (a, b), strict=True):
                app.label_card(m.LabelCard(card_id=card, label=f"l{card}"), board.owner)
            publish(published, garbage=b"this is not an envelope")
            wait_until(
                lambda: labels(database_url) == {f"l{card}" for card in cards},
                timeout=30,
                what="the labels delivered with the garbage are applied",
                poll=0.2,
            )
            assert fanout.dead() == []
        finally:
            producer.close(timeout=5)
            fanout.stop()


def _count(url: str) -> int:
    with connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM rm_cards").fetchone()
    return int(row[0]) if row else 0
