"""The projector worker's faust app: its consumer group, topics and fetch wait. Nothing here
connects to a broker. faust leaves event loops and sockets of its own open when an app is built
and dropped, so the consumer is built in a child interpreter, as a worker process builds it."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from domain.errors import SetupError
from projections.kanban import KanbanProjector
from streams.faust_app import FaustInternalsChanged, read_offsets_of
from streams.worker import consumer_group, forget_read_offsets_of, projector_topics

BUILD = textwrap.dedent(
    """
    import asyncio, sys
    from projections.kanban import KanbanProjector
    from projections.runner import ProjectionRunner
    from streams.worker import build_worker_app

    options = {} if sys.argv[1] == "default" else {"fetch_wait_ms": int(sys.argv[1])}
    runner = ProjectionRunner(KanbanProjector(), pool=None, log_reader=None)
    app = build_worker_app(runner, "127.0.0.1:9", topic_prefix="t-", **options)

    async def build():
        consumer = app.consumer._new_consumer_thread()._create_worker_consumer(app.transport)
        await consumer.stop()
        return consumer._fetch_max_wait_ms, app.conf.id

    print(*asyncio.run(build()))
    """
)


def built(option: str) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", BUILD, option],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_the_consumer_waits_at_most_the_configured_fetch_wait() -> None:
    assert built("70") == ["70", "t-agentworks-projector-kanban"]
    assert built("default") == ["100", "t-agentworks-projector-kanban"]


def test_one_group_per_projector_on_its_topics() -> None:
    assert consumer_group("kanban", "t-") == "t-agentworks-projector-kanban"
    assert projector_topics(KanbanProjector(), "t-") == [
        "t-agent-runs",
        "t-card-events",
        "t-workspace-events",
    ]


FORGET = textwrap.dedent(
    """
    import asyncio
    from faust.types import TP
    from projections.kanban import KanbanProjector
    from projections.runner import ProjectionRunner
    from streams.worker import build_worker_app, forget_read_offsets_of

    runner = ProjectionRunner(KanbanProjector(), pool=None, log_reader=None)
    app = build_worker_app(runner, "127.0.0.1:9")

    async def forget():
        consumer = app.consumer
        kept, forgotten = TP("card-events", 0), TP("card-events", 1)
        consumer._read_offset[kept] = 41
        consumer._read_offset[forgotten] = 42
        forget_read_offsets_of(consumer, {forgotten})
        return dict(consumer._read_offset)

    print(asyncio.run(forget()))
    """
)


def test_forgetting_read_offsets_clears_faust_marks_of_the_assigned_partitions_only() -> None:
    done = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", FORGET],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "{TP(topic='card-events', partition=0): 41}"


def test_a_faust_without_read_marks_is_refused_loudly() -> None:
    """The worker's recovery after a broker lost its log leans on faust's private read marks:
    if faust stops keeping them, the worker must not start (nor carry on with a warning)."""

    class ConsumerOfAnotherFaust:
        pass

    with pytest.raises(FaustInternalsChanged, match="_read_offset"):
        forget_read_offsets_of(ConsumerOfAnotherFaust(), set())
    with pytest.raises(FaustInternalsChanged):
        read_offsets_of(ConsumerOfAnotherFaust())


def test_a_changed_faust_is_a_setup_error_with_its_own_code() -> None:
    """An operator's problem, told the way every other deployment problem is (and still the
    ``RuntimeError`` it was)."""
    with pytest.raises(SetupError) as refused:
        read_offsets_of(object())
    assert isinstance(refused.value, RuntimeError)
    assert refused.value.code == "FAUST_INTERNALS"
