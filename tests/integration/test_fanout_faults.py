"""Fan-out through Kafka under faults: every test ends with the test of record — the read models
built incrementally equal a rebuild from scratch, row for row, for every projector.

The relay and one worker per projector run as ``agentworks`` subprocesses against a database and
a tansu broker of this module's own, shared by all its tests: each starts from a converged system
with every process running, and restarts what it killed. Faults: the relay SIGKILLed mid-batch
while events keep being appended; a worker SIGKILLed mid-batch; the same message delivered twice;
a message lost on its way (published around on purpose). The broker restart, which loses the
broker's memory, is in ``test_fanout_broker_restart.py`` (a stack of its own).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING
from uuid import UUID

import pg
import pytest
from fanout_helpers import (
    LOG_LINE_COUNTS,
    Appender,
    KafkaStack,
    Tenant,
    envelopes_after,
    head,
    healed_from_store,
    kafka_stack,
    lag,
    positions_in_store,
    projector_position,
    publish_envelopes,
    published_positions,
    record_relay_position,
    relay_position,
    wait_until,
)
from kafka_helpers import OUTAGE_TEST

from commands import models as m
from projections.registry import all_projectors

if TYPE_CHECKING:
    from collections.abc import Iterator

    from adapters.kafka_broker import LocalBroker

pytestmark = OUTAGE_TEST

Stack = KafkaStack

#: Events appended in bulk before a process is killed: enough that it dies with work in hand.
BACKLOG = 6000


@contextlib.contextmanager
def frozen(broker: LocalBroker) -> Iterator[None]:
    """The broker process stopped (SIGSTOP): clients' requests go unanswered until it resumes."""
    assert broker.pid is not None
    os.kill(broker.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(broker.pid, signal.SIGCONT)


@pytest.fixture(scope="module")
def shared_stack(
    migrated_template: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    name = pg.random_name("aw_t_faults_")
    with (
        pg.temporary_database(name, template=migrated_template) as url,
        kafka_stack(url, tmp_path_factory.mktemp("faults"), seed=5) as stack,
    ):
        yield stack


@pytest.fixture
def stack(shared_stack: Stack) -> Stack:
    """The shared stack with every process running and every event applied."""
    for service in shared_stack.fanout.services:
        service.resume()
        service.start()
    shared_stack.converge()
    return shared_stack


# == (a) the relay killed mid-batch ===============================================================


def test_relay_killed_mid_batch_resumes_where_it_recorded_and_loses_nothing(stack: Stack) -> None:
    url, relay, broker = stack.database_url, stack.fanout.relay, stack.broker
    relay.stop()
    healed_before = healed_from_store(url)
    tenant = stack.workload.tenant("relay-kill", projects=1)
    stack.workload.mixed(tenant, 40)
    stack.workload.bulk_log_chunks(tenant, BACKLOG)
    recorded = relay_position(url)

    with Appender(url, seed=21, pause=0.01):
        relay.start()
        wait_until(
            lambda: relay_position(url) > recorded,
            timeout=60,
            what="the relay publishing its backlog",
            poll=0.002,
        )
        time.sleep(random.uniform(0, 0.1))
        # Catch it mid-batch: with the broker frozen the relay has read its next batch and sent
        # what it could, and waits for acknowledgements that do not come; it dies right there.
        with frozen(broker):
            stalled_at = relay_position(url)
            time.sleep(0.5)
            assert relay_position(url) == stalled_at < head(url), "the relay was not mid-batch"
            relay.kill()
        time.sleep(0.5)
        relay.start()
        time.sleep(2)  # events keep arriving while it catches up

    stack.assert_equals_rebuild()
    # Equal read models alone would not show a skipped range: the workers heal gaps from the
    # store. So: every event from the relay's recorded position on is on its topic, and the
    # workers took nothing from the store (each event arrived as a delivery).
    wait_until(lambda: relay_position(url) >= head(url), timeout=60, what="relay caught up")
    missing = positions_in_store(url, after=recorded) - published_positions(broker.bootstrap)
    assert not missing, f"{len(missing)} events never published, from {min(missing)}"
    healed = healed_from_store(url)
    assert {name: n - healed_before.get(name, 0) for name, n in healed.items()} == dict.fromkeys(
        healed, 0
    )
    assert sorted(healed) == sorted(stack.fanout.workers)


# == (b) a worker killed mid-batch ================================================================


def test_worker_killed_mid_batch_restarts_without_double_effect(stack: Stack) -> None:
    url, worker = stack.database_url, stack.fanout.workers["runs"]
    worker.stop()
    tenant = stack.workload.tenant("worker-kill", projects=1)
    stack.workload.bulk_log_chunks(tenant, BACKLOG)
    (bulk_run,) = tenant.running
    wait_until(lambda: relay_position(url) >= head(url), timeout=60, what="relay caught up")
    before = projector_position(url, "runs")

    with Appender(url, seed=22, pause=0.01):
        worker.start()
        wait_until(
            lambda: projector_position(url, "runs") > before,
            timeout=60,
            what="the runs worker applying its backlog",
            poll=0.005,
        )
        worker.kill()
        assert lag(url)["runs"], "the worker finished its backlog before it was killed"
        time.sleep(0.5)
        worker.start()
        time.sleep(2)

    stack.assert_equals_rebuild()
    # The counters a redelivered batch would have doubled.
    assert stack.rows(LOG_LINE_COUNTS, bulk_run) == [(BACKLOG, BACKLOG)]


# == (d) the same message twice ===================================================================


def _busy_card(stack: Stack, tenant: Tenant) -> tuple[UUID, UUID, int]:
    """A card moved and labelled, with a finished run that logged, called an LLM and was
    credited: (card, run, billed)."""
    app, work = stack.app, stack.workload
    card = work.card(tenant, "twice")
    app.move_card(m.MoveCard(card_id=card, to_lane="Doing"), tenant.owner)
    app.label_card(m.LabelCard(card_id=card, label="p1"), tenant.owner)
    run = work.running_run(tenant, card)
    now = datetime.now(UTC)
    app.append_run_log(
        m.AppendRunLog(run_id=run, lines=[m.LogLineInput(at=now, text="hello")] * 2),
        tenant.orchestrator,
    )
    call = app.record_llm_call(
        m.RecordLlmCall(
            run_id=run, call_id="once", provider="simulated", model="sim-small",
            input_tokens=500, output_tokens=80, latency_ms=200, provider_cost_micros=20_000,
            price_table_version="2025-01", at=now,
        ),
        tenant.orchestrator,
    )  # fmt: skip
    app.credit_charge(
        m.CreditCharge(
            charge_id=UUID(call.extra["charge_id"]), amount="0.01", reason="goodwill", at=now
        ),
        tenant.owner,
    )
    app.finish_run(m.FinishRun(run_id=run, outcome="SUCCEEDED"), tenant.orchestrator)
    app.move_card(m.MoveCard(card_id=card, to_lane="Review"), tenant.owner)
    return card, run, int(call.extra["billed"])


def _touch_every_topic(stack: Stack, tenant: Tenant) -> None:
    """One new event per topic on the tenant's partitions: applied only after what came before."""
    app, work = stack.app, stack.workload
    app.rename_workspace(
        m.RenameWorkspace(workspace_id=tenant.workspace_id, name="after"), tenant.owner
    )
    run = work.running_run(tenant)
    app.record_llm_call(
        m.RecordLlmCall(
            run_id=run, call_id="after", provider="simulated", model="sim-small",
            input_tokens=1, output_tokens=1, latency_ms=1, provider_cost_micros=1,
            price_table_version="2025-01", at=datetime.now(UTC),
        ),
        tenant.orchestrator,
    )  # fmt: skip


def test_a_message_delivered_twice_takes_effect_once(stack: Stack) -> None:
    url = stack.database_url
    start = head(url)
    tenant = stack.workload.tenant("twice", projects=1)
    card, run, billed = _busy_card(stack, tenant)
    stack.converge()

    # Every event of the tenant once more, straight onto its topic, as a relay retry would.
    again = envelopes_after(url, start)
    assert {e.aggregate for e in again} >= {"Workspace", "Project", "Card", "AgentRun",
                                            "UsageCharge"}  # fmt: skip
    publish_envelopes(stack.broker.bootstrap, again)
    publish_envelopes(stack.broker.bootstrap, again[len(again) // 2 :])
    _touch_every_topic(stack, tenant)

    stack.assert_equals_rebuild()
    assert stack.rows(
        "SELECT lane, labels, cost_micros FROM rm_cards WHERE card_id = %s", card
    ) == [("Review", ["p1"], billed)]
    assert stack.rows(
        "SELECT log_line_count, llm_calls, billed_micros FROM rm_runs WHERE run_id = %s", run
    ) == [(2, 1, billed)]
    assert stack.rows(
        "SELECT card_count FROM rm_lanes WHERE project_id = %s ORDER BY ord", tenant.projects[0]
    ) == [(1,), (0,), (1,), (0,)]  # the card above, and the one _touch_every_topic ran on


# == (e) a message lost on its way ================================================================


def test_a_lost_message_is_healed_from_the_store(stack: Stack) -> None:
    url, relay = stack.database_url, stack.fanout.relay
    relay.stop()
    start = relay_position(url)
    tenant = stack.workload.tenant("lost", projects=1)
    card, run, _ = _busy_card(stack, tenant)
    stack.app.update_card(m.UpdateCard(card_id=card, title="later"), tenant.owner)
    events = envelopes_after(url, start)

    def version(aggregate: str, originator: UUID | None, number: int) -> int:
        (found,) = [
            e.position
            for e in events
            if e.aggregate == aggregate
            and (originator is None or e.originator_id == originator)
            and e.originator_version == number
        ]
        return found

    # A card's move, a run's log chunk and a charge's first event: each followed by later
    # versions of its aggregate that arrive without it.
    charged = version("UsageCharge", None, 1)
    lost = {version("Card", card, 2), version("AgentRun", run, 3), charged}
    healed_before = healed_from_store(url)
    publish_envelopes(stack.broker.bootstrap, [e for e in events if e.position not in lost])
    # As if the relay had published all of it: the lost messages will never be sent again.
    record_relay_position(url, events[-1].position)
    relay.start()

    stack.assert_equals_rebuild()
    # Each lost event took effect, read back from the store when its successor arrived: once
    # by each projector that follows it, and the counter says so.
    healed = healed_from_store(url)
    assert {name: n - healed_before.get(name, 0) for name, n in healed.items()} == {
        p.name: sum(p.follows(e) for e in events if e.position in lost) for p in all_projectors()
    }
    (move,) = [e for e in events if e.position in lost and e.aggregate == "Card"]
    assert stack.rows(
        "SELECT kind, summary FROM rm_activity WHERE position = %s", move.position
    ) == [("card.moved", "moved card from Todo to Doing")]
    assert stack.rows("SELECT count(*) FROM rm_log_lines WHERE run_id = %s", run) == [(2,)]
    (charge,) = [e.originator_id for e in events if e.position == charged]
    assert stack.rows(
        "SELECT provider_cost_micros, credited_micros FROM rm_charges WHERE charge_id = %s", charge
    ) == [(20_000, 10_000)]
    assert stack.rows("SELECT lane, title FROM rm_cards WHERE card_id = %s", card) == [
        ("Review", "later")
    ]


def test_a_lost_last_event_is_swept_in_by_the_workers(stack: Stack) -> None:
    """The last event of an aggregate has no successor to reveal its loss: gap healing cannot
    see it, the workers' sweep does."""
    url, fanout = stack.database_url, stack.fanout
    fanout.relay.stop()
    start = relay_position(url)
    tenant = stack.workload.tenant("tail", projects=1)
    card, _run, _ = _busy_card(stack, tenant)
    stack.app.update_card(m.UpdateCard(card_id=card, title="the last word"), tenant.owner)
    events = envelopes_after(url, start)
    (lost,) = [e for e in events if e.originator_id == card and e.type == "Card.Edited"][-1:]
    assert lost.position == max(e.position for e in events if e.originator_id == card)
    publish_envelopes(stack.broker.bootstrap, [e for e in events if e is not lost])
    record_relay_position(url, events[-1].position)
    fanout.relay.start()

    def title() -> str:
        found = stack.rows("SELECT title FROM rm_cards WHERE card_id = %s", card)
        return str(found[0][0]) if found else ""

    wait_until(lambda: title() != "", timeout=60, what="the card in the read model")
    time.sleep(2)
    assert title() != "the last word", "the lost event arrived without a sweep"
    assert lag(url)["kanban"] > 0

    sweeping = {**fanout.env, "AGENTWORKS_SWEEP_INTERVAL": "1"}
    try:
        for worker in fanout.workers.values():
            worker.stop()
            worker.env = sweeping
            worker.start()
        stack.assert_equals_rebuild()
        assert title() == "the last word"
    finally:
        for worker in fanout.workers.values():
            worker.stop()
            worker.env = fanout.env
            worker.start()
