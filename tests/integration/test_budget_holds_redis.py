"""Budget holds in Redis: the same decisions as the pure function, atomic across processes, and
several orchestrators on one backlog never together overshoot a month by more than a piece of
output per call."""

from __future__ import annotations

import asyncio
import io
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from uuid import UUID, uuid4

import pytest
import redis
import redis.asyncio
from board_helpers import whole_log
from fault_proxy import FaultProxy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from orchestrator_helpers import (
    CardOnBoard,
    card_on_board,
    fast_simulated,
    finished,
    orchestrator_thread,
    running_with_lines,
    wait_for,
)
from prometheus_client import REGISTRY

from adapters.budget_holds import RedisBudgetHolds
from adapters.eventlog import EventLog
from adapters.outages import OUTAGES, REDIS
from adapters.postgres import make_pool
from adapters.spend_counter import RedisSpend, RedisSpendCounter, counter_key, holds_key
from commands import models as m
from commands.handlers import AgentWorks
from domain.agent_run import RunStatus
from domain.budget_holds import Hold, HoldRequest, decide_hold
from domain.errors import BudgetExceeded
from domain.money import format_usd
from domain.usage import month_of
from projections.billing import BillingProjector
from projections.runner import ProjectionRunner
from projections.spend import ReadModelSpend

MONTH = "2026-12"
amounts = st.integers(min_value=0, max_value=10**12)


@pytest.fixture
def flushed(redis_url: str) -> Iterator[str]:
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    yield redis_url
    client.flushdb()
    client.close()


def request(workspace: UUID, *, want: int, limit: int | None, floor: int = 0, spent: int = 0,
            run_room: int | None = None, hold_id: UUID | None = None,
            written: int = 0) -> HoldRequest:  # fmt: skip
    return HoldRequest(
        workspace_id=workspace, month=MONTH, hold_id=hold_id or uuid4(), want=want, floor=floor,
        spent=spent, limit=limit, run_room=run_room, written=written,
    )  # fmt: skip


async def _hold_all(url: str, requests: list[HoldRequest], *, stores: int = 1) -> list[Hold]:
    """Every request at once, spread over ``stores`` clients (processes, in production)."""
    clients = [RedisBudgetHolds(redis.asyncio.Redis.from_url(url)) for _ in range(stores)]
    try:
        return list(
            await asyncio.gather(
                *(clients[i % stores].hold(r, ttl=60) for i, r in enumerate(requests))
            )
        )
    finally:
        for client in clients:
            await client.aclose()


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    extra=amounts, floor=amounts, spent=amounts, elsewhere=amounts,
    limit=st.none() | amounts, run_room=st.none() | st.integers(-(10**6), 10**12),
)  # fmt: skip
def test_redis_decides_exactly_as_the_pure_function(
    flushed: str, extra: int, floor: int, spent: int, elsewhere: int, limit: int | None,
    run_room: int | None,
) -> None:  # fmt: skip
    workspace = uuid4()
    # Another run already holds ``elsewhere`` (no limit, so it is granted in full).
    asyncio.run(_hold_all(flushed, [request(workspace, want=elsewhere, limit=None)]))
    asked = request(workspace, want=floor + extra, floor=floor, spent=spent, limit=limit,
                    run_room=run_room)  # fmt: skip
    [held] = asyncio.run(_hold_all(flushed, [asked]))
    assert held == decide_hold(asked, elsewhere)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    in_flight=amounts, settled=st.lists(amounts, max_size=3), spent=amounts, written=amounts,
    floor=amounts, extra=amounts, limit=st.none() | amounts,
)  # fmt: skip
def test_redis_counts_settled_holds_against_the_written_usage_as_the_pure_function(
    flushed: str, in_flight: int, settled: list[int], spent: int, written: int, floor: int,
    extra: int, limit: int | None,
) -> None:  # fmt: skip
    """Holds of calls under way and of charges written (settled), and the write model's usage:
    the script decides as ``decide_hold``, the settled holds told apart by their markers."""
    workspace = uuid4()

    async def scenario() -> Hold:
        store = RedisBudgetHolds(redis.asyncio.Redis.from_url(flushed))
        try:
            await store.hold(request(workspace, want=in_flight, limit=None), ttl=60)
            for amount in settled:
                charge = uuid4()
                await store.hold(request(workspace, want=amount, limit=None, hold_id=charge),
                                 ttl=60)  # fmt: skip
                await store.settle(workspace, MONTH, charge, billed=amount, ttl=60)
            return await store.hold(asked, ttl=60)
        finally:
            await store.aclose()

    asked = request(workspace, want=floor + extra, floor=floor, spent=spent, limit=limit,
                    written=written)  # fmt: skip
    held = asyncio.run(scenario())
    assert held == decide_hold(asked, in_flight + sum(settled), settled_elsewhere=sum(settled))


def test_a_marker_left_without_its_hold_is_dropped_and_counts_nothing(flushed: str) -> None:
    """A projector of the version before markers drops a counted charge's hold and not its
    marker: the marker goes with the next decision, and no hold of that name is settled by
    it."""
    workspace, charge = uuid4(), uuid4()
    client = redis.Redis.from_url(flushed)

    async def scenario() -> list[Hold]:
        store = RedisBudgetHolds(redis.asyncio.Redis.from_url(flushed))
        try:
            await store.hold(request(workspace, want=300, limit=1000, hold_id=charge), ttl=60)
            await store.settle(workspace, MONTH, charge, billed=300, ttl=60)
            client.hdel(holds_key(workspace, MONTH), str(charge))  # as that projector does
            after = await store.hold(request(workspace, want=900, limit=1000, written=300,
                                             spent=300), ttl=60)  # fmt: skip
            return [after]
        finally:
            await store.aclose()

    try:
        [after] = asyncio.run(scenario())
        fields = client.hkeys(holds_key(workspace, MONTH))
    finally:
        client.close()
    assert after == Hold(700, 700)
    assert f"settled:{charge}".encode() not in fields
    assert len(fields) == 1


@pytest.mark.parametrize("limit", [10**14 + 11, 10**15 + 7, 2**53 - 1])
def test_redis_decides_exactly_for_amounts_past_fourteen_digits(flushed: str, limit: int) -> None:
    """A monthly limit of $100,000,000 and more: Lua writes such numbers as "1e+14" unless told
    otherwise, which the answer's reader (and a hold's amount) cannot take exactly."""
    workspace = uuid4()
    asked = request(workspace, want=limit // 2 + 3, floor=1, spent=11, limit=limit)
    [held] = asyncio.run(_hold_all(flushed, [asked]))
    assert held == decide_hold(asked, 0)
    stored = redis.Redis.from_url(flushed).hgetall(holds_key(workspace, MONTH))
    assert [int(v.split(b":")[0]) for v in stored.values()] == [limit // 2 + 3]


def test_holds_from_several_clients_at_once_never_add_up_past_the_month(flushed: str) -> None:
    workspace = uuid4()
    asked = [request(workspace, want=300, floor=10, limit=10_000, spent=1_000) for _ in range(60)]
    held = asyncio.run(_hold_all(flushed, asked, stores=4))
    granted = [h.granted for h in held if h.granted is not None]
    assert sum(granted) == 9_000  # 30 full holds; the rest refused: nothing left for a prompt
    assert len(granted) == 30
    stored = redis.Redis.from_url(flushed).hgetall(holds_key(workspace, MONTH))
    assert sum(int(v.split(b":")[0]) for v in stored.values()) == 9_000


def test_released_and_lapsed_holds_give_their_room_back(flushed: str) -> None:
    workspace, first = uuid4(), uuid4()

    async def scenario() -> list[int | None]:
        store = RedisBudgetHolds(redis.asyncio.Redis.from_url(flushed))
        try:
            a = await store.hold(request(workspace, want=800, limit=1000, hold_id=first), ttl=60)
            b = await store.hold(request(workspace, want=800, limit=1000), ttl=0.2)
            await store.release(workspace, MONTH, first)
            c = await store.hold(request(workspace, want=900, limit=1000), ttl=60)
            await asyncio.sleep(0.3)  # b's hold lapses: a dead process stops holding back
            d = await store.hold(request(workspace, want=900, limit=1000), ttl=60)
            return [a.granted, b.granted, c.granted, d.granted]
        finally:
            await store.aclose()

    assert asyncio.run(scenario()) == [800, 200, 800, 200]


def test_the_decision_reads_the_spend_counter_when_it_knows_more_than_the_request(
    flushed: str,
) -> None:
    """The counter may have moved since the orchestrator read it (the projector counted a
    charge and dropped its hold): the script takes the larger of the two."""
    workspace = uuid4()
    redis.Redis.from_url(flushed).set(counter_key(workspace, MONTH), 700)
    [held] = asyncio.run(_hold_all(flushed, [request(workspace, want=900, limit=1000, spent=0)]))
    assert held == Hold(300, 300)
    [held] = asyncio.run(
        _hold_all(flushed, [request(workspace, want=900, limit=1000, spent=800, floor=250)])
    )
    assert held == Hold(None, -100)


def test_a_settled_hold_holds_what_was_billed_and_is_not_revived_once_dropped(
    flushed: str,
) -> None:
    workspace, charge = uuid4(), uuid4()

    async def scenario() -> list[int | None]:
        store = RedisBudgetHolds(redis.asyncio.Redis.from_url(flushed))
        try:
            await store.hold(request(workspace, want=800, limit=1000, hold_id=charge), ttl=60)
            await store.settle(workspace, MONTH, charge, billed=300, ttl=60)
            after_settling = await store.hold(request(workspace, want=900, limit=1000), ttl=60)
            await store.release(workspace, MONTH, charge)  # as the projector drops it
            await store.settle(workspace, MONTH, charge, billed=300, ttl=60)
            return [after_settling.granted]
        finally:
            await store.aclose()

    assert asyncio.run(scenario()) == [700]
    stored = redis.Redis.from_url(flushed).hgetall(holds_key(workspace, MONTH))
    assert str(charge).encode() not in stored


def runs_under_a_limit(
    write_side: AgentWorks, limit: str, count: int
) -> tuple[CardOnBoard, list[UUID]]:
    """A card whose workspace may spend ``limit`` USD a month, and ``count`` coder runs on it."""
    card = card_on_board(write_side)
    owner = card.board.owner
    write_side.set_spend_limit(
        m.SetSpendLimit(workspace_id=card.board.workspace_id, monthly_limit=limit), owner
    )
    run_ids = [
        write_side.start_agent_run(m.StartAgentRun(card_id=card.card_id, agent="coder"), owner).id
        for _ in range(count)
    ]
    return card, run_ids


@contextmanager
def two_orchestrators(
    database_url: str, redis_url: str, spend: RedisSpend, concurrency: int
) -> Iterator[None]:
    """Orchestrators A and B sharing holds through one Redis, each call wanting up to 1,000
    output tokens."""
    with (
        orchestrator_thread(
            database_url, {"simulated": fast_simulated(tokens_per_second=2000, output_tokens=1000)},
            holds=RedisBudgetHolds(redis.asyncio.Redis.from_url(redis_url)), spend=spend,
            concurrency=concurrency, worker_id="A",
        ),
        orchestrator_thread(
            database_url, {"simulated": fast_simulated(tokens_per_second=2000, output_tokens=1000)},
            holds=RedisBudgetHolds(redis.asyncio.Redis.from_url(redis_url)), spend=spend,
            concurrency=concurrency, worker_id="B",
        ),
    ):  # fmt: skip
        yield


def test_two_orchestrators_sharing_holds_stay_within_the_monthly_limit(
    write_side: AgentWorks, database_url: str, flushed: str
) -> None:
    # sim-1 x 5: a coder call wants up to 2,000 output tokens ($0.0152 billed): more than the
    # month's $0.01, so only what the shared holds leave may be spent.
    _, run_ids = runs_under_a_limit(write_side, "0.010000", 8)
    # As deployed: spend checks read the Redis counter (missing here: no projector runs, so
    # the read model's zero seeds it), and settled holds stand for the charges it has not
    # counted.
    read_pool = make_pool(database_url, role="agentworks_api", max_size=1)
    spend = RedisSpend(redis.Redis.from_url(flushed), ReadModelSpend(read_pool))
    with two_orchestrators(database_url, flushed, spend, concurrency=4):
        runs = [wait_for(write_side, run_id, finished, timeout=60) for run_id in run_ids]
    read_pool.close()
    billed = sum(run.billed_micros for run in runs)
    # Each call may pass its room by the one piece of output (a word: a few tokens) that
    # crossed it; without shared holds each orchestrator would spend the whole month itself.
    assert 7_000 < billed <= 10_000 + len(runs) * 5 * 8
    refused = [run for run in runs if run.status is RunStatus.FAILED]
    assert refused
    assert all("budget" in (run.error or "") for run in refused)


def test_with_the_projector_counting_charges_two_orchestrators_still_stay_within_the_month(
    write_side: AgentWorks, database_url: str, flushed: str
) -> None:
    """As deployed, end to end: the billing projector raises the counter and drops the holds of
    the charges it counts while two orchestrators spend; the month is still not overshot by
    more than a piece of output per call. One run at a time on each: a call holds what it
    could cost (twice what it bills here), so the runs after the first two can only start
    once the counter has taken over their predecessors' holds."""
    card, run_ids = runs_under_a_limit(write_side, "0.030000", 10)
    projector_pool = make_pool(database_url, role="agentworks_projector", max_size=2)
    feed = RedisSpendCounter(redis.Redis.from_url(flushed))
    runner = ProjectionRunner(
        BillingProjector(), projector_pool, EventLog(write_side.recorder, write_side.mapper),
        on_spend=feed.feed,
    )  # fmt: skip
    stop = threading.Event()

    def project() -> None:
        while not stop.is_set():
            runner.process(whole_log(runner.log, runner.position()))
            stop.wait(0.02)

    projecting = threading.Thread(target=project, daemon=True)
    projecting.start()
    read_pool = make_pool(database_url, role="agentworks_api", max_size=1)
    spend = RedisSpend(redis.Redis.from_url(flushed), ReadModelSpend(read_pool))
    try:
        with two_orchestrators(database_url, flushed, spend, concurrency=1):
            runs = [wait_for(write_side, run_id, finished, timeout=90) for run_id in run_ids]
        billed = sum(run.billed_micros for run in runs)
        month = month_of(datetime.now(UTC))
        deadline = time.monotonic() + 10
        while (counted := spend.read(card.board.workspace_id, month).spent) < billed:
            assert time.monotonic() < deadline, f"the counter stayed at {counted} of {billed}"
            time.sleep(0.05)
    finally:
        stop.set()
        projecting.join(10)
        projector_pool.close()
        read_pool.close()
        feed.close()
    assert 20_000 < billed <= 30_000 + len(runs) * 5 * 8
    assert counted == billed
    assert any(run.status is RunStatus.FAILED and "budget" in (run.error or "") for run in runs)
    # Every charge counted: no hold of a charged call is left behind.
    assert not redis.Redis.from_url(flushed).hgetall(holds_key(card.board.workspace_id, month))


@pytest.mark.parametrize("shared", [False, True], ids=["in-process holds", "holds in Redis"])
def test_a_month_keeps_its_limit_while_no_billing_projector_counts_its_charges(
    write_side: AgentWorks, database_url: str, flushed: str, shared: bool
) -> None:
    """No billing projector runs, so the usage the checks read stays at nothing, and each
    charge's settled hold lapses (a run timeout and ``stale_after`` later, 3.5 s here) without
    its charge ever being counted. Before, each lapse gave the month that room back: the runs
    queued behind spent the $0.04 limit three times over, $0.12 (a workspace could spend its
    limit again every 330 s while the projector was down). The write model counts every
    charge."""
    card, run_ids = runs_under_a_limit(write_side, "0.040000", 10)
    read_pool = make_pool(database_url, role="agentworks_api", max_size=1)
    reader = ReadModelSpend(read_pool)
    spend = RedisSpend(redis.Redis.from_url(flushed), reader) if shared else reader
    holds = RedisBudgetHolds(redis.asyncio.Redis.from_url(flushed)) if shared else None
    # A call of 1,000 output tokens takes 1.25 s and bills $0.008 to $0.013 (its prompt grows
    # with the card's earlier outputs): four or five calls fill the month in about 6 s, and the
    # first calls' holds lapse before that.
    slow = fast_simulated(tokens_per_second=800, output_tokens=1000)
    try:
        with orchestrator_thread(
            database_url, {"simulated": slow}, holds=holds, spend=spend, concurrency=1,
            run_timeout=2.5, stale_after=1.0, heartbeat_interval=0.2,
        ):  # fmt: skip
            runs = [wait_for(write_side, run_id, finished, timeout=90) for run_id in run_ids]
        # With the limit lowered to what was billed, a run asked for now is refused up front:
        # the usage read still says nothing, the write model says the month is spent. (The
        # runs may leave less room than a prompt costs, which stops calls, not requests.)
        spent = sum(run.billed_micros for run in runs)
        write_side.set_spend_limit(
            m.SetSpendLimit(workspace_id=card.board.workspace_id,
                            monthly_limit=format_usd(spent)),
            card.board.owner,
        )  # fmt: skip
        write_side.spend = spend
        assert spend.read(card.board.workspace_id, month_of(datetime.now(UTC))).spent == 0
        with pytest.raises(BudgetExceeded):
            write_side.start_agent_run(
                m.StartAgentRun(card_id=card.card_id, agent="coder"), card.board.owner
            )
    finally:
        read_pool.close()
    billed = sum(run.billed_micros for run in runs)
    assert 30_000 < billed <= 40_000 + len(runs) * 5 * 8
    refused = [run for run in runs if run.status is RunStatus.FAILED]
    assert len(refused) >= 4
    assert all("budget" in (run.error or "") for run in refused)


class _AnswerHeldBack(RedisBudgetHolds):
    """Redis holds whose answer to a hold comes back only once ``answer`` is set: the script has
    run (the hold is recorded) while its caller still waits, as a reply in flight."""

    def __init__(self, client: redis.asyncio.Redis) -> None:
        super().__init__(client)
        self.recorded = threading.Event()
        self.answer = threading.Event()

    async def hold(self, request: HoldRequest, *, ttl: float) -> Hold:
        decided = await super().hold(request, ttl=ttl)
        self.recorded.set()
        while not self.answer.is_set():
            await asyncio.sleep(0.01)
        return decided


def test_a_run_cancelled_while_its_hold_was_being_decided_leaves_no_hold(
    write_side: AgentWorks, database_url: str, flushed: str
) -> None:
    """Cancelled while the hold's answer was on its way, the call was never made, but its hold
    stayed recorded until it lapsed (the run timeout and stale_after later): near its limit,
    the workspace could start no call meanwhile."""
    card = card_on_board(write_side)
    holds = _AnswerHeldBack(redis.asyncio.Redis.from_url(flushed))
    client = redis.Redis.from_url(flushed)
    key = holds_key(card.board.workspace_id, month_of(datetime.now(UTC)))
    try:
        with orchestrator_thread(database_url, {"simulated": fast_simulated()}, holds=holds):
            run_id = write_side.start_agent_run(
                m.StartAgentRun(card_id=card.card_id, agent="coder"), card.board.owner
            ).id
            assert holds.recorded.wait(20)
            assert client.hlen(key) == 1
            write_side.cancel_agent_run(
                m.CancelAgentRun(run_id=run_id, reason="changed my mind"), card.board.owner
            )
            assert wait_for(write_side, run_id, finished).status is RunStatus.CANCELLED
            deadline = time.monotonic() + 10
            while client.hlen(key) and time.monotonic() < deadline:
                time.sleep(0.05)
            left = client.hlen(key)
    finally:
        holds.answer.set()
        client.close()
    assert left == 0, "the hold of a call never made stayed until it lapsed"


def test_holds_kept_in_process_while_redis_was_away_still_count_once_it_is_back(
    write_side: AgentWorks, database_url: str, flushed: str
) -> None:
    """A call that held in-process while Redis could not be reached is still under way when
    Redis comes back: the next call's hold in Redis, which never saw the first, was granted the
    whole month's room beside it, and the two together held (and could spend) past the limit."""
    card, _ = runs_under_a_limit(write_side, "0.020000", 0)
    owner, workspace = card.board.owner, card.board.workspace_id
    host, port = "127.0.0.1", int(flushed.rsplit(":", 1)[1].split("/")[0])
    proxy = FaultProxy(host, port)
    proxied = flushed.replace(f":{port}/", f":{proxy.port}/")
    holds = RedisBudgetHolds(redis.asyncio.Redis.from_url(proxied, socket_timeout=2))
    direct = redis.Redis.from_url(flushed)
    key = holds_key(workspace, month_of(datetime.now(UTC)))
    slow = fast_simulated(tokens_per_second=20, output_tokens=1000)
    try:
        proxy.refuse(True)
        with orchestrator_thread(database_url, {"simulated": slow}, holds=holds) as orchestrator:
            first = write_side.start_agent_run(
                m.StartAgentRun(card_id=card.card_id, agent="coder"), owner
            ).id
            wait_for(write_side, first, running_with_lines)
            month = month_of(datetime.now(UTC))
            held_here = orchestrator._local_holds.held(workspace, month)
            assert held_here > 10_000  # the coder's call wants ~$0.0152 of the $0.02
            assert direct.hlen(key) == 0
            proxy.refuse(False)
            second = write_side.start_agent_run(
                m.StartAgentRun(card_id=card.card_id, agent="coder"), owner
            ).id
            deadline = time.monotonic() + 20
            while not direct.hlen(key) and time.monotonic() < deadline:
                time.sleep(0.02)
            held_in_redis = sum(int(value.split(b":")[0]) for value in direct.hgetall(key).values())
            assert write_side.run_snapshot(second).status in (RunStatus.RUNNING, RunStatus.FAILED)
    finally:
        direct.close()
        proxy.close()
    assert held_in_redis > 0
    assert held_here + held_in_redis <= 20_000


def test_holds_redis_away_is_said_once_not_with_a_traceback_per_call(
    write_side: AgentWorks, database_url: str, flushed: str, log_lines: io.StringIO
) -> None:
    """Every call of every run holds, settles and releases in Redis: while it was away, each
    logged a warning with its whole traceback (three a call, 200 runs at once), and the
    orchestrator's ``agentworks_dependency_up{dependency="redis"}`` never said it was down."""
    OUTAGES.up(REDIS)  # whatever an earlier test in this process left
    card, _ = runs_under_a_limit(write_side, "5.000000", 0)
    owner = card.board.owner
    host, port = "127.0.0.1", int(flushed.rsplit(":", 1)[1].split("/")[0])
    proxy = FaultProxy(host, port)
    proxied = flushed.replace(f":{port}/", f":{proxy.port}/")
    holds = RedisBudgetHolds(redis.asyncio.Redis.from_url(proxied, socket_timeout=2))
    try:
        proxy.refuse(True)
        with orchestrator_thread(database_url, holds=holds):
            away = [
                write_side.start_agent_run(
                    m.StartAgentRun(card_id=card.card_id, agent="coder"), owner
                ).id
                for _ in range(3)
            ]
            runs = [wait_for(write_side, run_id, finished, timeout=60) for run_id in away]
            down = REGISTRY.get_sample_value("agentworks_dependency_up", {"dependency": REDIS})
            proxy.refuse(False)
            back = write_side.start_agent_run(
                m.StartAgentRun(card_id=card.card_id, agent="coder"), owner
            ).id
            wait_for(write_side, back, finished, timeout=60)
            up = REGISTRY.get_sample_value("agentworks_dependency_up", {"dependency": REDIS})
    finally:
        proxy.close()

    assert all(run.status is RunStatus.SUCCEEDED for run in runs)
    assert (down, up) == (0.0, 1.0)
    records = [json.loads(line) for line in log_lines.getvalue().splitlines()]
    with_traceback = [r["event"] for r in records if "exception" in r]
    assert with_traceback == []
    said = [r["event"] for r in records if r["event"] == "orchestrator.shared_holds_unavailable"]
    assert said == ["orchestrator.shared_holds_unavailable"]
    redis_lines = [r["event"] for r in records if r.get("dependency") == REDIS]
    assert redis_lines == ["dependency.down", "dependency.up"]
