"""A Kafka worker's position through a real broker, with sweeps off.

A worker is delivered its projector's topics only. With sweeps off
(``AGENTWORKS_SWEEP_INTERVAL=0``) its position was the last event it was delivered: the billing
worker's stayed at the last charge while card events went on, so `/metrics`, `agentworks status`
and `/readyz` (503 once behind the head without moving) showed a stall with everything applied.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

from fanout_helpers import KafkaFanout, Workload, head, projector_position, wait_until

if TYPE_CHECKING:
    from pathlib import Path

    from commands.handlers import AgentWorks

pytest_plugins = ["kafka_fixtures"]


def test_a_worker_without_sweeps_is_not_left_behind_by_events_it_does_not_follow(
    database_url: str, app: AgentWorks, kafka_broker: Any, tmp_path: Path
) -> None:
    work = Workload(app)
    tenant = work.tenant("positions", projects=1)
    work.running_run(tenant)
    work.llm_call(tenant)
    charged = head(database_url)
    fanout = KafkaFanout(
        database_url,
        kafka_broker.bootstrap,
        tmp_path,
        topic_prefix=f"positions-{uuid.uuid4().hex[:8]}.",
        projectors=["billing"],
        sweep_interval=0,
    )
    try:
        fanout.start()
        wait_until(
            lambda: projector_position(database_url, "billing") >= charged,
            timeout=90,
            what="the billing worker applies the charge",
            poll=0.2,
        )
        for i in range(3):
            work.card(tenant, f"after the charge {i}")
        last = head(database_url)

        wait_until(
            lambda: projector_position(database_url, "billing") >= last,
            timeout=30,
            what=f"the billing worker's position at the head ({last})",
            poll=0.2,
        )
    finally:
        fanout.stop()
