"""Fan-out through Kafka when the broker restarts and loses its memory (tansu keeps nothing on
disk): topics, records and the consumer groups' committed offsets are gone, the relay's recorded
position is ahead of everything the broker holds, and clients re-create the topics on first use
(with the broker's own partition count, 4, not the 3 these tests ask for).

The way back: the relay sees acknowledged offsets go back and publishes again from the
projectors' lowest sweep watermark; workers forget faust's read marks when partitions are
assigned (so what is republished at offsets they had passed is not dropped), learn of the extra
partition at their next metadata refresh, and sweep in from the store whatever was published and
never delivered.

That last part is not only for lost messages here: tansu keeps every group at generation 0 and
answers SyncGroup with the assignment of the group's first sync, so after the rebalance that the
extra partition triggers, no member is actually given it (a worker restart is the only cure on
tansu; a real Kafka cluster bumps the generation). The sweep brings those events in.
"""

from __future__ import annotations

import contextlib
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import pg
import pytest
from fanout_helpers import (
    Appender,
    KafkaStack,
    head,
    kafka_stack,
    lag,
    relay_position,
    wait_until,
)

from commands import models as m

if TYPE_CHECKING:
    from collections.abc import Iterator

pytestmark = [
    pytest.mark.slow,
    # kafka-python never closes a socket whose connect() was refused (broker restarting).
    pytest.mark.filterwarnings("ignore:unclosed <socket.socket:ResourceWarning"),
]


@pytest.fixture
def stack(migrated_template: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaStack]:
    name = pg.random_name("aw_t_amnesia_")
    url = pg.create_database(name, template=migrated_template)
    try:
        with kafka_stack(
            url, tmp_path_factory.mktemp("amnesia"), seed=9, sweep_interval=2
        ) as built:
            yield built
    finally:
        pg.drop_database(name)


def test_broker_restarted_with_memory_lost_converges(stack: KafkaStack) -> None:
    url, fanout, work = stack.database_url, stack.fanout, stack.workload
    tenant = work.tenant("amnesia", projects=1)
    work.mixed(tenant, 60)
    stack.converge()

    # A consumer lags at the moment of the crash: the billing worker stalls, and charges are
    # published (acknowledged by the broker) that it has not read yet.
    fanout.workers["billing"].pause()
    run = work.running_run(tenant)
    for i in range(5):
        stack.app.record_llm_call(
            m.RecordLlmCall(
                run_id=run, call_id=f"lagging-{i}", provider="simulated", model="sim-small",
                input_tokens=10, output_tokens=10, latency_ms=10, provider_cost_micros=777,
                price_table_version="2025-01", at=datetime.now(UTC),
            ),
            tenant.orchestrator,
        )  # fmt: skip
    published = head(url)
    wait_until(lambda: relay_position(url) >= published, timeout=30, what="relay published")

    with Appender(url, seed=23, pause=0.01):
        time.sleep(0.5)
        stack.broker.restart()
        fanout.workers["billing"].resume()
        time.sleep(3)  # events keep arriving after the restart

    # The relay rebuilds its producer, the workers rejoin, and new events flow again (new
    # workspaces spread their keys over the re-created topics' four partitions).
    fresh = [work.card(work.tenant(f"after{i}", projects=1), "after") for i in range(8)]

    def visible() -> int:
        (row,) = stack.rows("SELECT count(*) FROM rm_cards WHERE card_id = ANY(%s)", fresh)
        return int(row[0])

    try:
        wait_until(lambda: visible() > 0, timeout=90, what="new cards in the read model", poll=0.2)
    except TimeoutError as error:
        where = f"head {head(url)}, relay at {relay_position(url)}, lag {lag(url)}"
        pytest.fail(
            f"no recovery after the broker restart ({where}): {error}\n{fanout.diagnostics()}"
        )
    with contextlib.suppress(TimeoutError):
        wait_until(lambda: visible() == len(fresh), timeout=30, what="every new card", poll=0.2)
    assert visible() == len(fresh), f"new cards missing; lag {lag(url)}\n{fanout.diagnostics()}"

    # What the old broker held unread is published again, or swept in from the store.
    stack.assert_equals_rebuild()
    relay_log = fanout.relay.log_tail(100_000)
    assert "relay.broker_log_lost" in relay_log, "the relay did not notice the lost log"
