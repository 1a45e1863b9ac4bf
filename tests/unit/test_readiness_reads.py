"""``/readyz`` answers anyone: however many checks arrive at once, the positions are read once
at a time (one pooled connection), and a check after a read finished reads afresh."""

from __future__ import annotations

import asyncio
import json
import threading
from types import SimpleNamespace
from typing import Any

from read_api.app import Health


class Positions:
    """A positions read that blocks until released, counting how often it ran."""

    def __init__(self) -> None:
        self.reads = 0
        self.started = threading.Event()
        self.release = threading.Event()

    def __call__(self) -> tuple[int, dict[str, int], dict[str, int], str | None]:
        self.reads += 1
        self.started.set()
        self.release.wait(10)
        return 7, {}, {}, None  # the write side not checked


def health_reading(positions: Positions) -> Health:
    async def run(work: Any) -> Any:
        return await asyncio.to_thread(work)

    services = SimpleNamespace(
        projectors=(), max_projector_lag=None, projector_stall_seconds=None,
        fanout_readiness=None, redis=None,
    )  # fmt: skip
    health = Health(SimpleNamespace(services=services, offloader=SimpleNamespace(run=run)))  # type: ignore[arg-type]
    health._positions = positions  # type: ignore[method-assign]
    return health


def test_checks_arriving_together_share_one_read_and_a_later_check_reads_again() -> None:
    positions = Positions()
    health = health_reading(positions)

    async def flood() -> list[Any]:
        checks = [asyncio.ensure_future(health.ready()) for _ in range(25)]
        await asyncio.to_thread(positions.started.wait, 10)
        await asyncio.sleep(0.05)  # every check is waiting on the read by now
        positions.release.set()
        answers = await asyncio.gather(*checks)
        answers.append(await health.ready())
        return answers

    answers = asyncio.run(flood())

    assert positions.reads == 2
    assert {answer.status_code for answer in answers} == {200}
    assert {json.loads(answer.body)["head"] for answer in answers} == {7}
