"""Scale-out: two workers of one projector share its partitions, and one leaving loses nothing.

Both workers are ``agentworks worker --projector kanban`` processes in the projector's consumer
group; the sweep is off, so only Kafka delivery can bring the read model up to date. Their JSON
logs say which partitions each holds after every rebalance.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import pg
import pytest
from fanout_helpers import Service, cli, kafka_stack, lag, wait_until
from kafka.partitioner.default import murmur2
from kafka_helpers import OUTAGE_TEST

from projections.registry import all_projectors
from streams.worker import projector_topics

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path
    from uuid import UUID

    from fanout_helpers import KafkaStack, Tenant

pytestmark = OUTAGE_TEST

PARTITIONS = 3  # what KafkaStack creates its topics with


@pytest.fixture
def stack(migrated_template: str, tmp_path: Path) -> Iterator[KafkaStack]:
    name = pg.random_name("aw_t_scale_")
    with (
        pg.temporary_database(name, template=migrated_template) as url,
        kafka_stack(url, tmp_path / "stack", seed=9) as stack,
    ):
        yield stack


def _kanban_worker(stack: KafkaStack, name: str, workdir: Path) -> Service:
    env = {**stack.fanout.env, "AGENTWORKS_LOG_JSON": "true"}
    return Service(name, cli("worker", "--projector", "kanban"), env=env, cwd=workdir)


def _holding(worker: Service) -> set[str] | None:
    """The partitions the worker's latest rebalance gave it (None before its first)."""
    held = None
    for line in worker.log_tail(10**7).splitlines():
        if '"worker.partitions_assigned"' in line:
            held = set(json.loads(line)["partitions"])
    return held


def _not_json(worker: Service) -> list[str]:
    """Console lines of the worker that are not JSON log records (the harness's own markers
    and blank lines aside): faust's banner, its spinner, a dict-shaped record."""
    found = []
    for line in worker.log_tail(10**7).splitlines():
        if not line.strip() or line.startswith("=== start"):
            continue
        try:
            json.loads(line)
        except ValueError:
            found.append(line)
    return found


def _on_every_partition(stack: KafkaStack) -> list[Tenant]:
    """Tenants whose workspace keys land on every partition, so that both workers get work."""
    tenants: list[Tenant] = []
    while {_partition_of(t.workspace_id) for t in tenants} != set(range(PARTITIONS)):
        assert len(tenants) < 40, "workspace keys keep missing a partition"
        tenants.append(stack.workload.tenant(f"t{len(tenants)}", projects=1))
    return tenants


def _partition_of(workspace_id: UUID) -> int:
    """Where the relay's producer puts a workspace's events (kafka-python's key hash)."""
    return (murmur2(str(workspace_id).encode()) & 0x7FFFFFFF) % PARTITIONS


@pytest.mark.many_connections
def test_two_workers_of_one_projector_split_the_partitions_and_survive_one_leaving(
    stack: KafkaStack, tmp_path: Path
) -> None:
    url = stack.database_url
    (kanban,) = [p for p in all_projectors() if p.name == "kanban"]
    everything = {f"{t}:{n}" for t in projector_topics(kanban) for n in range(PARTITIONS)}
    stack.fanout.workers["kanban"].stop()
    first = _kanban_worker(stack, "kanban-1", tmp_path).start()
    second = _kanban_worker(stack, "kanban-2", tmp_path)
    # Convergence checks watch the stack's workers for deaths: these two stand for its kanban one.
    stack.fanout.workers["kanban"] = first
    tenants = _on_every_partition(stack)
    try:
        wait_until(lambda: _holding(first) == everything, timeout=60, what="the first worker")
        second.start()
        wait_until(
            lambda: bool(_holding(second)) and _holding(first) != everything,
            timeout=60,
            what="a rebalance giving the second worker partitions",
        )
        held_by_first, held_by_second = _holding(first), _holding(second)
        assert held_by_first
        assert held_by_second
        assert held_by_first.isdisjoint(held_by_second)
        assert held_by_first | held_by_second == everything
        for tenant in tenants:
            stack.workload.mixed(tenant, 20)
        stack.assert_equals_rebuild()

        stack.fanout.workers["kanban"] = second
        first.stop()
        wait_until(
            lambda: _holding(second) == everything,
            timeout=60,
            what="the second worker taking over every partition",
        )
        for tenant in tenants:
            stack.workload.mixed(tenant, 20)
        wait_until(lambda: lag(url)["kanban"] == 0, timeout=60, what="kanban caught up")
        stack.assert_equals_rebuild()
        assert _not_json(first) == []
        assert _not_json(second) == []
    finally:
        first.stop()
        second.stop()
