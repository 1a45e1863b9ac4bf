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


def _run_child(script: str, *args: str) -> str:
    """What ``script`` printed, run in a child interpreter (see the module's docstring)."""
    done = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def built(option: str) -> list[str]:
    return _run_child(BUILD, option).split()


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
    assert _run_child(FORGET) == "{TP(topic='card-events', partition=0): 41}"


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


EARLIER_GENERATION = textwrap.dedent(
    """
    import asyncio
    from types import SimpleNamespace
    from faust.types import TP
    from faust.types.tuples import Message
    from projections.kanban import KanbanProjector
    from projections.runner import ProjectionRunner
    from streams.worker import build_worker_app

    runner = ProjectionRunner(KanbanProjector(), pool=None, log_reader=None)
    app = build_worker_app(runner, "127.0.0.1:9")
    tp = TP("card-events", 0)

    class Thread:
        '''What the rebalance listener drives: notes the generation of each step.'''

        def __init__(self):
            self.app = app
            self.steps = []

        async def on_partitions_revoked(self, revoked):
            self.steps.append(("revoked", app.consumer_generation_id))

        async def on_partitions_assigned(self, assigned, generation):
            self.steps.append(("assigned", app.consumer_generation_id, generation))

    async def rebalance_twice():
        thread = Thread()
        listener = app.consumer.RebalanceListener(thread)
        for _ in range(2):
            await listener.on_partitions_revoked(set())
            await listener.on_partitions_assigned(set())
        return thread.steps

    async def acknowledge():
        consumer = app.consumer
        app.topics._acking_topics.add(tp.topic)  # as once the app runs its agent on the topic

        def read(offset, generation):
            return Message(tp.topic, tp.partition, offset, 0.0, 0, None, b"k", b"v", None,
                           tp=tp, generation_id=generation)

        now = app.consumer_generation_id
        current, earlier = read(7, now), read(8, now - 1)
        acks = consumer.ack(current), consumer.ack(earlier)
        return acks, earlier.acked, sorted(consumer._acked[tp])

    async def commit(member_id):
        sent = []

        async def send(offsets):
            sent.append({f"{k.topic}:{k.partition}": v.offset for k, v in offsets.items()})

        thread = app.consumer._new_consumer_thread()
        thread._consumer = SimpleNamespace(
            _coordinator=SimpleNamespace(member_id=member_id), assignment=lambda: {tp}, commit=send
        )
        return await thread._commit({tp: 5}), sent

    print(asyncio.run(rebalance_twice()))
    print(asyncio.run(acknowledge()))
    print(asyncio.run(commit("")), asyncio.run(commit("member-1")))
    """
)


def test_what_was_read_before_a_rebalance_or_outside_the_group_is_never_committed() -> None:
    """A worker stalled over a restart of a broker that lost its log acknowledges records of the
    old log while it rejoins; committed into the new log, their offsets would skip what the relay
    republished there. Every revocation and assignment starts a generation (tansu keeps every
    group at generation 0), an acknowledgement from an earlier one is not kept for a commit, and
    no commit goes out while the consumer is not a member of its group."""
    rebalances, acknowledgements, commits = _run_child(EARLIER_GENERATION).splitlines()
    assert rebalances == "[('revoked', 1), ('assigned', 2, 2), ('revoked', 3), ('assigned', 4, 4)]"
    # The earlier generation's record is settled (nothing waits for it) but not to be committed.
    assert acknowledgements == "((True, False), True, [7])"
    assert commits == "(False, []) (True, [{'card-events:0': 5}])"
