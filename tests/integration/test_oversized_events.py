"""An event too large for a Kafka message does not stop the relay, and still reaches the
projectors.

A run's log chunk may hold 10,000 lines of any length, within the API's 1 MB request body, and
as an envelope it is larger still (every line gains its sequence number and stream): well past
the 1 MiB a Kafka producer sends by default (and the broker takes). kafka-python refused to send
it, the relay rewound and tried the same batch again, forever: nothing after that event was
published, for any tenant. Now the relay publishes such an event without its payload, marked,
and the worker reads it whole from the store before applying it.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from uuid import UUID

import pytest
from board_helpers import whole_log
from fanout_helpers import KafkaFanout, Workload, connect, projector_side, wait_until
from kafka_helpers import relay_to_the_head
from prometheus_client import REGISTRY
from read_side_helpers import ReadSide, create_card
from structlog.testing import capture_logs

from commands import models as m
from projections.kanban import KanbanProjector
from projections.registry import all_projectors
from projections.runner import ProjectionRunner
from streams.relay import Relay, RelayPositions

if TYPE_CHECKING:
    from pathlib import Path

    from commands.handlers import AgentWorks

pytest_plugins = ["kafka_fixtures"]

LINES = 10_000
TEXT = "x" * 40


def big_chunk(app: AgentWorks, workload: Workload) -> tuple[Any, UUID]:
    tenant = workload.tenant("big", projects=1)
    run_id = workload.running_run(tenant)
    now = datetime.now(UTC)
    lines = [m.LogLineInput(at=now, text=TEXT) for _ in range(LINES)]
    request = m.AppendRunLog(run_id=run_id, lines=lines)
    # What an API client sends for it (each line's time and text) fits the request body limit.
    sent = request.model_dump_json(include={"lines": {"__all__": {"at", "text"}}})
    assert len(sent) < 1_000_000
    app.append_run_log(request, tenant.orchestrator)
    other = workload.tenant("small", projects=1)
    workload.card(other, "after the big chunk")
    return tenant, run_id


def log_lines(url: str, run_id: UUID) -> int:
    with connect(url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM rm_log_lines WHERE run_id = %s", (run_id,)
        ).fetchone()
    return int(row[0]) if row else 0


@pytest.mark.slow
def test_the_relay_publishes_past_an_event_too_large_for_a_message(
    database_url: str, app: AgentWorks, kafka_broker: Any, tmp_path: Path
) -> None:
    _, run_id = big_chunk(app, Workload(app))
    prefix = f"big-{uuid.uuid4().hex[:8]}."
    with projector_side(database_url) as (_, log):
        (chunk,) = [e for e in whole_log(log) if "LogChunk" in e.type]
        assert len(chunk.to_bytes()) > 1024 * 1024  # past what a Kafka producer sends
        relay_to_the_head(log, database_url, kafka_broker.bootstrap, prefix)
    # The worker applies the chunk whole (the sweep is off: it comes through Kafka).
    fanout = KafkaFanout(
        database_url, kafka_broker.bootstrap, tmp_path, topic_prefix=prefix, projectors=["runs"]
    )
    try:
        for worker in fanout.workers.values():
            worker.start()
        wait_until(
            lambda: log_lines(database_url, run_id) == LINES,
            timeout=90,
            what="the worker applies the large chunk",
            poll=0.2,
        )
    finally:
        fanout.stop()


def test_an_omitted_payload_is_read_from_the_store(database_url: str, app: AgentWorks) -> None:
    from streams.worker import read_omitted

    _, run_id = big_chunk(app, Workload(app))
    sent: list[Any] = []

    class Producer:
        def send(self, topic: str, value: bytes | None = None, **_: Any) -> Any:
            from domain.envelope import EventEnvelope

            assert value is not None
            assert len(value) < 1_000_000
            sent.append(EventEnvelope.from_bytes(value))
            meta = type("Meta", (), {"topic": topic, "partition": 0, "offset": len(sent)})()
            return type("Ack", (), {"get": lambda self, timeout=None: meta})()

        def flush(self, timeout: float | None = None) -> None:
            pass

        def close(self, timeout: float | None = None) -> None:
            pass

    with projector_side(database_url) as (pool, log):
        relay = Relay(log, Producer, RelayPositions(database_url, role=None))
        try:
            while relay.publish_once():
                pass
        finally:
            relay.positions.close()
        omitted = [env for env in sent if env.payload == {}]
        assert [env.type for env in omitted] == ["AgentRun.LogChunkAppended"]
        for projector in all_projectors():
            runner = ProjectionRunner(projector, pool, log)
            runner.process(read_omitted(sent, log, projector=runner.name))
    assert log_lines(database_url, run_id) == LINES


def test_an_omitted_payload_the_store_no_longer_has_parks_its_aggregate(side: ReadSide) -> None:
    """A message published without its payload whose event the store does not hold (its topics
    outlived a database restored to an earlier point) reached the projector as it came: an
    event with an empty payload, unmarked, which the projector applied or failed on as if it
    were one. Now it is marked undecodable, saying why: the projector parks its aggregate, and
    the worker logs it and counts it."""
    from domain.envelope import OMITTED
    from streams.worker import read_omitted

    world = side.new_world()
    card = create_card(side, world, title="kept")
    runner = side.runner(KanbanProjector())
    runner.process(side.envelopes())
    created = [env for env in side.envelopes() if env.originator_id == card][-1]
    gone = created.model_copy(
        update={
            "position": created.position + 1_000,
            "originator_version": created.originator_version + 1,
            "type": "Card.Edited",
            "payload": {},
            "metadata": {**created.metadata, OMITTED: "2000000 bytes"},
        }
    )
    missing = REGISTRY.get_sample_value(
        "agentworks_worker_omitted_events_missing_total", {"projector": "kanban"}
    )

    with capture_logs() as logs:
        outcome = runner.process(read_omitted([gone], side.log, projector="kanban"))

    assert (outcome.applied, [p.originator_id for p in outcome.parked]) == (0, [card])
    (parked,) = outcome.parked
    assert parked.originator_version == gone.originator_version
    assert "not in the store" in parked.error
    assert side.row("SELECT title FROM rm_cards WHERE card_id = %s", (card,))["title"] == "kept"
    assert (
        REGISTRY.get_sample_value(
            "agentworks_worker_omitted_events_missing_total", {"projector": "kanban"}
        )
        == (missing or 0) + 1
    )
    (logged,) = [entry for entry in logs if entry["event"] == "worker.omitted_event_missing"]
    assert (logged["log_level"], logged["position"], logged["projector"]) == (
        "error", gone.position, "kanban",
    )  # fmt: skip
