"""The Redis spend counter: fed by the billing projector, read by spend checks.

The counter of a workspace-month equals ``rm_monthly_spend.charged_micros`` after every commit,
after redelivery and after a rebuild; a flushed Redis heals from the read model; a projector
whose Redis is down keeps projecting and catches the counter up once Redis is back; a spend
check refuses a run from the counter alone, and without Redis from the read model.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime
from urllib.parse import urlsplit
from uuid import UUID

import pytest
import redis
import redis.asyncio
from fault_proxy import FaultProxy
from read_side_helpers import (
    ReadSide,
    World,
    correct,
    create_card,
    llm_call,
    running_run,
)

from adapters.budget_holds import RedisBudgetHolds
from adapters.metrics import SPEND_COUNTER_FAILURES
from adapters.postgres import make_pool
from adapters.spend_counter import RedisSpend, RedisSpendCounter, counter_key, holds_key
from commands import models as m
from domain.budget_holds import HoldRequest, SpendReading
from domain.errors import BudgetExceeded
from domain.usage import charge_id_for, month_of
from projections.billing import BillingProjector
from projections.rebuild import rebuild
from projections.runner import ProjectionRunner
from projections.spend import ReadModelSpend

MARCH = datetime(2025, 3, 14, 12, 0, tzinfo=UTC)


@pytest.fixture
def world(side: ReadSide) -> World:
    return side.new_world()


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    found = redis.Redis.from_url(redis_url)
    found.flushdb()
    yield found
    found.flushdb()
    found.close()


@pytest.fixture
def read_model(database_url: str) -> Iterator[ReadModelSpend]:
    """The read model as spend checks read it in production: as the API, scoped by workspace."""
    pool = make_pool(database_url, role="agentworks_api", max_size=1)
    try:
        yield ReadModelSpend(pool)
    finally:
        pool.close()


def billing_runner(side: ReadSide, counter: RedisSpendCounter) -> ProjectionRunner:
    return ProjectionRunner(BillingProjector(), side.pool, side.log, on_spend=counter.feed)


def project(side: ReadSide, runner: ProjectionRunner) -> None:
    runner.process(side.envelopes(after=runner.position()))


def charged(side: ReadSide, workspace_id: UUID, month: str) -> int:
    return int(
        side.row(
            "SELECT charged_micros FROM rm_monthly_spend WHERE workspace_id = %s AND month = %s",
            (workspace_id, month),
        )["charged_micros"]
    )


def counter(client: redis.Redis, workspace_id: UUID, month: str) -> int | None:
    stored = client.get(counter_key(workspace_id, month))
    return None if stored is None else int(stored)


def test_the_counter_is_the_committed_usage_after_a_batch_a_redelivery_and_a_rebuild(
    side: ReadSide, world: World, client: redis.Redis
) -> None:
    feed = RedisSpendCounter(client)
    runner = billing_runner(side, feed)
    run_id = running_run(side, world)
    first = llm_call(side, world, run_id, "call-1", cost=1_000, at=MARCH)
    llm_call(side, world, run_id, "call-2", cost=2_000, at=MARCH)
    project(side, runner)
    month = "2025-03"
    usage = charged(side, world.workspace_id, month)
    assert usage > 0
    assert counter(client, world.workspace_id, month) == usage

    # A credit lowers what its month bills, not the usage a spend limit counts.
    correct(side, world, first.extra["charge_id"], "0.001")
    llm_call(side, world, run_id, "call-3", cost=500, at=MARCH)
    project(side, runner)
    usage = charged(side, world.workspace_id, month)
    assert counter(client, world.workspace_id, month) == usage
    now = month_of(datetime.now(UTC))
    credited = side.row(
        "SELECT billed_micros, charged_micros FROM rm_monthly_spend"
        " WHERE workspace_id = %s AND month = %s",
        (world.workspace_id, now),
    )
    assert credited == {"billed_micros": -1_000, "charged_micros": 0}
    assert counter(client, world.workspace_id, now) == 0

    # Every event delivered again: nothing applies twice, nothing moves.
    runner.process(side.envelopes())
    assert counter(client, world.workspace_id, month) == usage

    # Rebuilt from the log: the same usage, and the counter still equals it.
    rebuild(BillingProjector(), side.pool, side.log)
    assert charged(side, world.workspace_id, month) == usage
    assert counter(client, world.workspace_id, month) == usage


def test_a_flushed_redis_heals_from_the_read_model(
    side: ReadSide, world: World, client: redis.Redis, read_model: ReadModelSpend
) -> None:
    runner = billing_runner(side, RedisSpendCounter(client))
    run_id = running_run(side, world)
    llm_call(side, world, run_id, "call-1", cost=1_000, at=MARCH)
    project(side, runner)
    month = "2025-03"
    usage = charged(side, world.workspace_id, month)

    client.flushdb()
    reader = RedisSpend(client, read_model)
    assert reader.read(world.workspace_id, month).spent == usage
    # The read seeded the counter: the next check reads Redis alone.
    assert counter(client, world.workspace_id, month) == usage

    client.flushdb()
    llm_call(side, world, run_id, "call-2", cost=1_000, at=MARCH)
    project(side, runner)
    assert counter(client, world.workspace_id, month) == charged(side, world.workspace_id, month)


def test_the_projector_keeps_projecting_with_redis_down_and_catches_the_counter_up(
    side: ReadSide, world: World, client: redis.Redis, redis_url: str
) -> None:
    parts = urlsplit(redis_url)
    proxy = FaultProxy(parts.hostname or "127.0.0.1", parts.port or 6379)
    proxied = redis.Redis.from_url(
        f"redis://127.0.0.1:{proxy.port}{parts.path}", socket_timeout=1, socket_connect_timeout=1
    )
    feed = RedisSpendCounter(proxied, retry_after=0.0, max_retry_after=0.0)
    runner = billing_runner(side, feed)
    month = "2025-03"
    failures = SPEND_COUNTER_FAILURES.labels("feed")
    try:
        run_id = running_run(side, world)
        proxy.refuse(True)
        proxy.drop_all()
        before = failures._value.get()
        llm_call(side, world, run_id, "call-1", cost=1_000, at=MARCH)
        project(side, runner)
        llm_call(side, world, run_id, "call-2", cost=1_000, at=MARCH)
        project(side, runner)
        # The read model moved on; the counter waits, and the failures were counted.
        assert charged(side, world.workspace_id, month) > 0
        assert runner.position() == side.envelopes()[-1].position
        assert counter(client, world.workspace_id, month) is None
        assert failures._value.get() >= before + 2
        assert feed.pending == 1

        proxy.refuse(False)
        llm_call(side, world, run_id, "call-3", cost=1_000, at=MARCH)
        project(side, runner)
        assert counter(client, world.workspace_id, month) == charged(
            side, world.workspace_id, month
        )
        assert feed.pending == 0
    finally:
        proxied.close()
        proxy.close()


def test_counting_a_charge_drops_its_hold_in_the_same_step(
    side: ReadSide, world: World, client: redis.Redis, redis_url: str
) -> None:
    runner = billing_runner(side, RedisSpendCounter(client))
    run_id = running_run(side, world)
    month = month_of(MARCH)
    charge_id = charge_id_for(run_id, "call-1")
    other = charge_id_for(run_id, "call-2")

    async def hold(hold_id: UUID) -> None:
        store = RedisBudgetHolds(redis.asyncio.Redis.from_url(redis_url))
        try:
            request = HoldRequest(
                workspace_id=world.workspace_id, month=month, hold_id=hold_id, want=50_000,
                floor=0, spent=0, limit=None, run_room=None,
            )  # fmt: skip
            await store.hold(request, ttl=60)
            if hold_id == charge_id:
                await store.settle(world.workspace_id, month, hold_id, billed=5_000, ttl=60)
        finally:
            await store.aclose()

    asyncio.run(hold(charge_id))
    asyncio.run(hold(other))
    llm_call(side, world, run_id, "call-1", cost=1_000, at=MARCH)
    project(side, runner)
    assert counter(client, world.workspace_id, month) == charged(side, world.workspace_id, month)
    # The counted charge's hold is gone; the call still in flight keeps its own.
    assert set(client.hgetall(holds_key(world.workspace_id, month))) == {str(other).encode()}


def test_a_run_is_refused_from_the_counter(
    side: ReadSide, world: World, client: redis.Redis, read_model: ReadModelSpend
) -> None:
    side.app.set_spend_limit(
        m.SetSpendLimit(workspace_id=world.workspace_id, monthly_limit="1.00"), world.owner
    )
    side.app.spend = RedisSpend(client, read_model)
    card_id = create_card(side, world)
    month = month_of(datetime.now(UTC))
    start = m.StartAgentRun(card_id=card_id, agent="coder")
    client.set(counter_key(world.workspace_id, month), 999_999)
    side.app.start_agent_run(start, world.owner)
    # Neither the write model nor the read model has a charge: the counter alone refuses.
    client.set(counter_key(world.workspace_id, month), 1_000_000)
    with pytest.raises(BudgetExceeded):
        side.app.start_agent_run(start, world.owner)


def test_without_redis_a_run_is_refused_from_the_read_model(
    side: ReadSide, world: World, read_model: ReadModelSpend
) -> None:
    side.app.set_spend_limit(
        m.SetSpendLimit(workspace_id=world.workspace_id, monthly_limit="1.00"), world.owner
    )
    side.app.spend = read_model
    card_id = create_card(side, world)
    month = month_of(datetime.now(UTC))
    start = m.StartAgentRun(card_id=card_id, agent="coder")
    side.app.start_agent_run(start, world.owner)
    with side.pool.connection() as conn:
        conn.execute(
            "INSERT INTO rm_monthly_spend (workspace_id, month, billed_micros, charged_micros)"
            " VALUES (%s, %s, 0, 1000000)",
            (world.workspace_id, month),
        )
    with pytest.raises(BudgetExceeded):
        side.app.start_agent_run(start, world.owner)


def test_the_read_model_says_which_pending_charges_it_counts(
    side: ReadSide, world: World, read_model: ReadModelSpend
) -> None:
    run_id = running_run(side, world)
    llm_call(side, world, run_id, "call-1", cost=1_000, at=MARCH)
    counted = charge_id_for(run_id, "call-1")
    not_yet = charge_id_for(run_id, "call-2")
    assert read_model.read(world.workspace_id, "2025-03", [counted, not_yet]).counted == set()
    side.project(BillingProjector())
    reading = read_model.read(world.workspace_id, "2025-03", [counted, not_yet])
    assert reading.counted == {counted}
    assert reading.spent == charged(side, world.workspace_id, "2025-03")


def test_holds_kept_in_process_while_redis_was_away_are_counted_from_the_read_model(
    side: ReadSide, world: World, client: redis.Redis, read_model: ReadModelSpend
) -> None:
    run_id = running_run(side, world)
    llm_call(side, world, run_id, "call-1", cost=1_000, at=MARCH)
    side.project(BillingProjector())
    usage = charged(side, world.workspace_id, "2025-03")
    counted = charge_id_for(run_id, "call-1")
    # A counter behind the read model (its last feed failed): the reading that says the
    # charge is counted must also count it.
    client.set(counter_key(world.workspace_id, "2025-03"), usage - 1)
    reading = RedisSpend(client, read_model).read(world.workspace_id, "2025-03", [counted])
    assert reading == SpendReading(usage, frozenset({counted}))
    assert RedisSpend(client, read_model).read(world.workspace_id, "2025-03").spent == usage - 1
