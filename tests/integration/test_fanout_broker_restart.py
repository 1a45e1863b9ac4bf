"""Fan-out through Kafka when the broker restarts and loses its memory (tansu keeps nothing on
disk): topics, records and the consumer groups' committed offsets are gone, the relay's recorded
position is ahead of everything the broker holds, and clients re-create the topics on first use
(with the broker's own partition count, 4, not the 3 these tests ask for).

The way back: the relay sees acknowledged offsets go back and publishes again from the
projectors' lowest sweep watermark; workers forget faust's read marks when partitions are
assigned (so what is republished at offsets they had passed is not dropped), do not commit into
the new log the offsets of records they read from the old one (a worker stalled over the restart
still holds a fetch the old broker answered: see ``streams.faust_app``), learn of the extra
partition at their next metadata refresh, and sweep in from the store whatever was published and
never delivered.

That last part is not only for lost messages here: tansu keeps every group at generation 0 and
answers SyncGroup with the assignment of the group's first sync, so after the rebalance that the
extra partition triggers, no member is actually given it (a worker restart is the only cure on
tansu; a real Kafka cluster bumps the generation). The sweep brings those events in.

Because the sweep would also bring in whatever the relay's and workers' own recovery missed,
that recovery is tested on its own too: sweeps off, and topics of tansu's own partition count so
the re-created ones match. Then only deliveries can bring in the charges the lagging worker had
not read (an aggregate's first and only event has no successor to heal it from); they are
republished from the projectors' watermark, at offsets below those the workers had read. (With
the relay's rewind disabled this test fails: billing never converges. With
``streams.worker.forget_read_offsets_of`` disabled it still passes: on tansu the restarted broker
no longer knows the member, aiokafka rejoins, and faust clears its read marks on that revoke
itself. ``forget_read_offsets_of`` covers an assignment that hands a partition back without a
revoke; ``tests/integration/test_worker_app.py`` checks what it does, and that a faust without
those marks stops the worker at start-up.)
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
    connect,
    head,
    kafka_stack,
    lag,
    relay_position,
    scalar,
    wait_until,
)
from kafka_helpers import OUTAGE_TEST

from commands import models as m

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

pytestmark = OUTAGE_TEST


#: tansu creates a topic that a client asks for before it exists with this many partitions.
TANSU_PARTITIONS = 4


@contextlib.contextmanager
def _stack(
    migrated_template: str, workdir: Path, *, sweep_interval: float, partitions: int
) -> Iterator[KafkaStack]:
    name = pg.random_name("aw_t_amnesia_")
    with (
        pg.temporary_database(name, template=migrated_template) as url,
        kafka_stack(
            url, workdir, seed=9, sweep_interval=sweep_interval, partitions=partitions
        ) as built,
    ):
        yield built


@pytest.fixture
def stack(migrated_template: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaStack]:
    with _stack(
        migrated_template, tmp_path_factory.mktemp("amnesia"), sweep_interval=2, partitions=3
    ) as built:
        yield built


@pytest.fixture
def sweepless_stack(
    migrated_template: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[KafkaStack]:
    with _stack(
        migrated_template,
        tmp_path_factory.mktemp("amnesia-nosweep"),
        sweep_interval=0,
        partitions=TANSU_PARTITIONS,
    ) as built:
        yield built


def _restart_broker_while_billing_lags(
    stack: KafkaStack, *, watermark_at_convergence: bool = False
) -> list[str]:
    """Converge, stall the billing worker, record charges it has not read, restart the broker
    (memory lost) while events keep coming, and wait until new cards show up again. Returns the
    call ids of the charges billing had not read.

    ``watermark_at_convergence``: record every projector's sweep watermark at the converged head
    (true then: each has applied everything up to it), as sweeps would have; the relay republishes
    from there instead of from 0, so the republished records land at offsets below the ones the
    workers had read.
    """
    url, fanout, work = stack.database_url, stack.fanout, stack.workload
    tenant = work.tenant("amnesia", projects=1)
    work.mixed(tenant, 60)
    stack.converge()
    if watermark_at_convergence:
        with connect(url) as conn:
            conn.execute("UPDATE projection_positions SET swept_through = %s", (head(url),))

    # A consumer lags at the moment of the crash: the billing worker stalls, and charges are
    # published (acknowledged by the broker) that it has not read yet.
    fanout.workers["billing"].pause()
    run = work.running_run(tenant)
    lagging = [f"lagging-{i}" for i in range(5)]
    for call_id in lagging:
        stack.app.record_llm_call(
            m.RecordLlmCall(
                run_id=run, call_id=call_id, provider="simulated", model="sim-small",
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
    return lagging


def test_broker_restarted_with_memory_lost_converges(stack: KafkaStack) -> None:
    _restart_broker_while_billing_lags(stack)

    # What the old broker held unread is published again, or swept in from the store.
    stack.assert_equals_rebuild()
    relay_log = stack.fanout.relay.log_tail(100_000)
    assert "relay.broker_log_lost" in relay_log, "the relay did not notice the lost log"


def test_after_a_broker_restart_the_workers_recover_by_delivery_alone_without_sweeps(
    sweepless_stack: KafkaStack,
) -> None:
    stack = sweepless_stack
    url = stack.database_url
    lagging = _restart_broker_while_billing_lags(stack, watermark_at_convergence=True)

    stack.assert_equals_rebuild()
    assert "relay.broker_log_lost" in stack.fanout.relay.log_tail(100_000)
    # The sweep is off, so none of the unread charges was swept in, and each is its
    # aggregate's only event, so no gap healing brought it: they were delivered again.
    charged = scalar(url, "SELECT count(*) FROM rm_charges WHERE call_id = ANY(%s)", (lagging,))
    assert charged == len(lagging)
    assert "projection.sweep_healed" not in stack.fanout.workers["billing"].log_tail(1_000_000)
