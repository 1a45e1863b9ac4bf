"""Kafka plumbing against the local tansu broker: topics, the relay's producer, faust workers.

faust workers run as real subprocesses, the way ``agentworks worker`` will run: this file is
also the worker program (``python test_kafka_plumbing.py worker ...``, see ``_worker_main``).
A worker writes one JSON line per event it sees and per partition assignment it receives to its
own file, which the tests read. Topic and group names are unique per test, so tests can share
the session broker; the test that restarts a broker starts its own.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
import warnings
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from kafka_helpers import IGNORE_REFUSED_SOCKETS, read_topic

from adapters.kafka_broker import LocalBroker

# kafka-python 3.0 reads its protocol schemas with importlib.resources.read_text/open_text at
# import time. Python 3.11 deprecates both; pyproject's "kafka.*" ignore covers read_text (warned
# from kafka's own module) but open_text is warned from importlib.resources._legacy. Collection
# runs outside any pytest mark, hence this narrow filter around the one import.
with warnings.catch_warnings():
    warnings.filterwarnings(
        "ignore", "open_text is deprecated", DeprecationWarning, "importlib.resources._legacy"
    )
    from kafka import KafkaAdminClient, KafkaConsumer
    from kafka.errors import KafkaConfigurationError, KafkaError

from adapters import kafka as kafka_adapter
from adapters.kafka import (
    create_topics,
    faust_settings,
    make_producer,
    producer_is_fatal,
    publish,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    #: The ``workers`` fixture: ``workers(name, bootstrap, app_id, topic)`` starts one.
    StartWorker = Callable[[str, str, str, str], "Worker"]

pytestmark = IGNORE_REFUSED_SOCKETS

# Registers the session-wide ``kafka_broker`` fixture (tests/kafka_fixtures.py). Not imported
# by name: pytest must import the plugin itself (assertion rewriting), and the fixture parameter
# would shadow the import (ruff F811).
pytest_plugins = ["kafka_fixtures"]

HERE = Path(__file__).resolve()
TESTS_DIR = HERE.parents[1]
REPO = HERE.parents[2]

#: tansu answers a JoinGroup after half the session timeout, rounded up to whole seconds:
#: a 3 s session means about 2 s per (re)join.
SESSION_TIMEOUT = 3.0
PARTITIONS = 3


# --------------------------------------------------------------------------------------------
# The worker program (runs in a subprocess)
# --------------------------------------------------------------------------------------------


def _worker_main(bootstrap: str, app_id: str, topic: str, out: str) -> None:
    """A minimal projector worker: one agent over ``topic``, raw bytes, offsets committed."""
    import faust

    app = faust.App(
        app_id,
        **faust_settings(bootstrap, session_timeout=SESSION_TIMEOUT, commit_interval=0.2),
    )
    source = app.topic(topic, key_serializer="raw", value_serializer="raw")
    sink = open(out, "a", buffering=1)  # noqa: SIM115 - lives as long as the process

    def record(**fields: Any) -> None:
        sink.write(json.dumps({"pid": os.getpid(), "t": time.time(), **fields}) + "\n")

    @app.agent(source)
    async def project(stream: Any) -> None:
        async for event in stream.events():
            message = event.message
            record(
                kind="event",
                partition=message.partition,
                offset=message.offset,
                key=event.key.decode(),
                value=event.value.decode(),
                headers={k: v.decode() for k, v in (event.headers or {}).items()},
            )

    @app.on_partitions_assigned.connect  # type: ignore[arg-type]
    async def on_assigned(sender: Any, assigned: Any, **kwargs: Any) -> None:
        record(kind="assigned", partitions=sorted(tp.partition for tp in assigned))

    record(kind="boot")
    # Worker installs SIGTERM/SIGINT handlers: stop agents, commit, leave the group, exit 0.
    faust.Worker(app, loglevel="info").execute_from_commandline()


class Worker:
    """One faust worker subprocess and what it reported."""

    def __init__(self, tmp_path: Path, name: str, bootstrap: str, app_id: str, topic: str):
        self.name = name
        self.out = tmp_path / f"{name}.jsonl"
        self.log = tmp_path / f"{name}.log"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(TESTS_DIR), env.get("PYTHONPATH", "")])
        self.started = time.monotonic()
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(HERE), "worker", bootstrap, app_id, topic, str(self.out)],
                cwd=REPO,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def records(self, kind: str) -> list[dict[str, Any]]:
        if not self.out.exists():
            return []
        lines = self.out.read_text().splitlines()
        # The last line may be half-written while the worker runs.
        parsed = []
        for line in lines:
            try:
                parsed.append(json.loads(line))
            except json.JSONDecodeError:
                break
        return [r for r in parsed if r["kind"] == kind]

    def events(self) -> list[dict[str, Any]]:
        return self.records("event")

    def assignments(self) -> list[list[int]]:
        return [r["partitions"] for r in self.records("assigned")]

    def wait_until(self, what: str, check: Callable[[], bool], timeout: float = 20.0) -> float:
        """Seconds it took until ``check()`` held; fails with the worker's log otherwise."""
        start = time.monotonic()
        while not check():
            if self.proc.poll() is not None:
                pytest.fail(
                    f"worker {self.name} exited ({self.proc.returncode}) waiting for "
                    f"{what}:\n{self.log_tail()}"
                )
            if time.monotonic() - start > timeout:
                pytest.fail(f"worker {self.name}: no {what} within {timeout}s:\n{self.log_tail()}")
            time.sleep(0.05)
        return time.monotonic() - start

    def terminate(self, timeout: float = 15.0) -> float:
        """SIGTERM and wait; returns the seconds the graceful shutdown took."""
        start = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"worker {self.name} ignored SIGTERM for {timeout}s:\n{self.log_tail()}")
        return time.monotonic() - start

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[StartWorker]:
    """Factory ``workers(name, bootstrap, app_id, topic)``; kills leftovers after the test."""
    started: list[Worker] = []

    def start(name: str, bootstrap: str, app_id: str, topic: str) -> Worker:
        worker = Worker(tmp_path, name, bootstrap, app_id, topic)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.kill()


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def unique_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def worker_topic(bootstrap: str) -> tuple[str, str]:
    """A new event topic of ``PARTITIONS`` partitions, and a new consumer group to read it."""
    topic, group = unique_name("ev"), unique_name("projector")
    create_topics(bootstrap, [topic], PARTITIONS)
    return topic, group


def produce(bootstrap: str, topic: str, values: range, producer: Any = None) -> None:
    """Publish ``v<i>`` with key ``k<i>`` and headers, and wait for every ack."""
    owned = producer is None
    producer = producer or make_producer(bootstrap)
    try:
        futures = [
            publish(
                producer,
                topic,
                key=f"k{i}",
                value=f"v{i}".encode(),
                headers={"event_type": "CardMoved", "position": str(i)},
            )
            for i in values
        ]
        for future in futures:
            future.get(timeout=15)
    finally:
        if owned:
            producer.close()


def committed_offsets(bootstrap: str, group: str) -> dict[int, int]:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        offsets = admin.list_group_offsets(group)[group]
    finally:
        admin.close()
    return {tp.partition: meta.offset for tp, meta in offsets.items() if meta.offset >= 0}


def partition_count(bootstrap: str, topic: str) -> int:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        return len(consumer.partitions_for_topic(topic) or ())
    finally:
        consumer.close()


def log_end_offsets(bootstrap: str, topic: str, expected: int) -> dict[int, int]:
    """Next offset per partition, from the records themselves.

    Not ``end_offsets()``: tansu answers ListOffsets(LATEST) with the base offset of the last
    record batch + 1, which is too small whenever that batch held several records.
    """
    records = read_topic(bootstrap, topic, expected)
    assert len(records) == expected
    ends = dict.fromkeys(range(partition_count(bootstrap, topic)), 0)
    for record in records:
        ends[record.partition] = max(ends[record.partition], record.offset + 1)
    return ends


# --------------------------------------------------------------------------------------------
# Broker, topics, producer
# --------------------------------------------------------------------------------------------


def test_local_broker_restart_keeps_port_and_loses_memory() -> None:
    with LocalBroker() as broker:
        bootstrap = broker.bootstrap
        assert bootstrap == f"127.0.0.1:{broker.port}"
        create_topics(bootstrap, ["kept"], 1)
        first_pid = broker.pid

        broker.restart()

        assert broker.running
        assert broker.bootstrap == bootstrap
        assert broker.pid != first_pid
        admin = KafkaAdminClient(bootstrap_servers=bootstrap)
        try:
            assert "kept" not in admin.list_topics()
        finally:
            admin.close()
    assert not broker.running


def test_create_topics_is_idempotent(kafka_broker: LocalBroker) -> None:
    names = [unique_name("ev-a"), unique_name("ev-b")]

    assert create_topics(kafka_broker.bootstrap, names, PARTITIONS) == names
    assert create_topics(kafka_broker.bootstrap, names, PARTITIONS) == []
    assert create_topics(kafka_broker.bootstrap, [*names, names[0]], PARTITIONS) == []

    assert partition_count(kafka_broker.bootstrap, names[0]) == PARTITIONS


def test_tansu_auto_creates_topics_with_four_partitions(
    kafka_broker: LocalBroker, caplog: pytest.LogCaptureFixture
) -> None:
    """A client naming an unknown topic creates it (4 partitions), even when told not to."""
    topic = unique_name("auto")
    producer = make_producer(kafka_broker.bootstrap, allow_auto_create_topics=False)
    try:
        produce(kafka_broker.bootstrap, topic, range(1), producer)
    finally:
        producer.close()

    with caplog.at_level(logging.WARNING, logger="adapters.kafka"):
        assert create_topics(kafka_broker.bootstrap, [topic], PARTITIONS) == []

    assert partition_count(kafka_broker.bootstrap, topic) == 4
    assert "exists with 4 partitions, not 3" in caplog.text


def test_idempotent_producer_sends_keyed_records_with_headers(kafka_broker: LocalBroker) -> None:
    topic = unique_name("ev")
    create_topics(kafka_broker.bootstrap, [topic], PARTITIONS)
    producer = make_producer(kafka_broker.bootstrap)
    try:
        futures = [
            publish(
                producer,
                topic,
                key=f"card-{i % 4}",
                value=f"{i}".encode(),
                headers={"event_type": "CardMoved", "position": str(i), "traceparent": b"00-x"},
            )
            for i in range(20)
        ]
        metadata = [f.get(timeout=15) for f in futures]
        # tansu granted a producer id, i.e. idempotence is really on (InitProducerId works).
        assert producer.config["enable_idempotence"] is True
        assert producer._transaction_manager.producer_id_and_epoch.producer_id >= 0
        assert not producer_is_fatal(producer)
    finally:
        producer.close()

    # One key, one partition, in publishing order.
    by_key: dict[str, set[int]] = {}
    for i, meta in enumerate(metadata):
        by_key.setdefault(f"card-{i % 4}", set()).add(meta.partition)
    assert all(len(parts) == 1 for parts in by_key.values())

    records = read_topic(kafka_broker.bootstrap, topic, expected=20)
    assert len(records) == 20
    for record in records:
        headers = dict(record.headers)
        assert headers["event_type"] == b"CardMoved"
        assert headers["traceparent"] == b"00-x"
        assert record.key == f"card-{int(record.value) % 4}".encode()
    per_key_order: dict[bytes, list[int]] = {}
    for record in sorted(records, key=lambda r: (r.partition, r.offset)):
        per_key_order.setdefault(record.key, []).append(int(record.value))
    assert all(values == sorted(values) for values in per_key_order.values())


def test_make_producer_falls_back_when_idempotence_is_refused(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """tansu grants idempotence; an older broker makes kafka-python refuse it at construction."""
    configs: list[dict[str, Any]] = []

    class RefusingProducer:
        def __init__(self, **config: Any) -> None:
            configs.append(config)
            if config["enable_idempotence"]:
                raise KafkaConfigurationError("Idempotent producer requires broker >= 0.11")

    monkeypatch.setattr(kafka_adapter, "KafkaProducer", RefusingProducer)
    with caplog.at_level(logging.WARNING, logger="adapters.kafka"):
        producer = make_producer("127.0.0.1:9")

    assert isinstance(producer, RefusingProducer)
    assert [c["enable_idempotence"] for c in configs] == [True, False]
    assert configs[-1]["acks"] == "all"
    assert configs[-1]["max_in_flight_requests_per_connection"] == 1
    assert "refused the idempotent producer" in caplog.text


# --------------------------------------------------------------------------------------------
# faust workers
# --------------------------------------------------------------------------------------------


def reached(worker: Worker, ends: dict[int, int], since: dict[int, int] | None = None) -> bool:
    """The worker has seen the last record of every partition that has records after ``since``.

    Records of one partition arrive in offset order, so once the last one is seen, anything
    redelivered from that partition would have been seen before it: no need to sleep and wait.
    """
    since = since or {}
    seen: dict[int, set[int]] = {}
    for event in worker.events():
        seen.setdefault(event["partition"], set()).add(event["offset"])
    return all(end - 1 in seen.get(p, set()) for p, end in ends.items() if end > since.get(p, 0))


@pytest.mark.slow
def test_faust_worker_commits_and_resumes_from_committed_offsets(
    kafka_broker: LocalBroker, workers: StartWorker
) -> None:
    bootstrap = kafka_broker.bootstrap
    topic, group = worker_topic(bootstrap)
    produce(bootstrap, topic, range(12))

    # 1. A worker consumes everything produced by kafka-python, keys and headers intact.
    first = workers("first", bootstrap, group, topic)
    first.wait_until("12 events", lambda: len(first.events()) == 12)
    events = first.events()
    assert sorted(e["value"] for e in events) == sorted(f"v{i}" for i in range(12))
    assert all(
        e["headers"] == {"event_type": "CardMoved", "position": e["value"][1:]} for e in events
    )
    assert all(e["key"] == "k" + e["value"][1:] for e in events)
    assert first.assignments()[-1] == [0, 1, 2]

    # 2. Graceful stop right after the last event: offsets are committed on the way out.
    shutdown = first.terminate()
    assert first.proc.returncode == 0, first.log_tail()
    assert shutdown < 5
    committed = committed_offsets(bootstrap, group)
    assert committed == log_end_offsets(bootstrap, topic, 12)

    # 3. A new worker resumes after the committed offsets: only new events, nothing again.
    produce(bootstrap, topic, range(12, 18))
    ends = log_end_offsets(bootstrap, topic, 18)
    second = workers("second", bootstrap, group, topic)
    second.wait_until("the 6 new events", lambda: reached(second, ends, committed))
    assert sorted(e["value"] for e in second.events()) == sorted(f"v{i}" for i in range(12, 18))

    # 4. A crash (SIGKILL) redelivers at most what was not committed yet: the next worker
    #    starts each partition exactly at the committed offset and sees everything after it once.
    produce(bootstrap, topic, range(18, 30))
    ends = log_end_offsets(bootstrap, topic, 30)
    second.wait_until("events up to 30", lambda: reached(second, ends))
    second.kill()
    at_crash = committed_offsets(bootstrap, group)
    produce(bootstrap, topic, range(30, 36))
    ends = log_end_offsets(bootstrap, topic, 36)
    third = workers("third", bootstrap, group, topic)
    third.wait_until("events after the crash", lambda: reached(third, ends, at_crash))
    seen = sorted((e["partition"], e["offset"]) for e in third.events())
    assert seen == [(p, o) for p in sorted(ends) for o in range(at_crash.get(p, 0), ends[p])]
    third.kill()


@pytest.mark.slow
def test_two_faust_workers_split_partitions(
    kafka_broker: LocalBroker, workers: StartWorker
) -> None:
    bootstrap = kafka_broker.bootstrap
    topic, group = worker_topic(bootstrap)

    one = workers("one", bootstrap, group, topic)
    two = workers("two", bootstrap, group, topic)

    def split() -> bool:
        a, b = one.assignments(), two.assignments()
        return bool(a and b and a[-1] and b[-1]) and sorted(a[-1] + b[-1]) == [0, 1, 2]

    assert one.wait_until("a split of the partitions", split) < 15
    mine_one, mine_two = set(one.assignments()[-1]), set(two.assignments()[-1])
    produce(bootstrap, topic, range(30))
    one.wait_until(
        "30 events between both workers", lambda: len(one.events()) + len(two.events()) >= 30
    )
    assert {e["partition"] for e in one.events()} <= mine_one
    assert {e["partition"] for e in two.events()} <= mine_two
    assert Counter(e["value"] for e in one.events() + two.events()) == Counter(
        f"v{i}" for i in range(30)
    )

    # The survivor takes every partition over when the other one leaves (LeaveGroup on SIGTERM).
    two.terminate()
    one.wait_until("all partitions back", lambda: one.assignments()[-1] == [0, 1, 2])
    produce(bootstrap, topic, range(30, 36))
    one.wait_until(
        "the new events",
        lambda: {f"v{i}" for i in range(30, 36)} <= {e["value"] for e in one.events()},
    )


@pytest.mark.slow
def test_broker_restart_loses_memory_and_clients_recover(
    workers: StartWorker, caplog: pytest.LogCaptureFixture
) -> None:
    # kafka-python logs every refused reconnect at ERROR with the exception as an argument;
    # captured records would keep those exceptions (and the sockets kafka-python leaks with
    # them, see pytestmark) alive past this test, where the ResourceWarning is no longer ignored.
    caplog.set_level(logging.CRITICAL, logger="kafka")
    with LocalBroker() as broker:
        bootstrap = broker.bootstrap
        topic, group = worker_topic(bootstrap)
        producer = make_producer(bootstrap)
        worker = workers("survivor", bootstrap, group, topic)
        produce(bootstrap, topic, range(6), producer)
        worker.wait_until("6 events", lambda: len(worker.events()) == 6)
        assignments_before = len(worker.assignments())

        broker.restart()  # memory lost: topics, records, groups, committed offsets, producer ids
        create_topics(bootstrap, [topic], PARTITIONS)  # the worker may have auto-created it

        # The idempotent producer is unusable now: its next batch fails (UnknownProducerId),
        # the KIP-360 epoch bump it tries is refused, and it ends in a fatal state.
        with pytest.raises(KafkaError):
            produce(bootstrap, topic, range(6, 7), producer)
        deadline = time.monotonic() + 5
        while not producer_is_fatal(producer) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert producer_is_fatal(producer)
        with pytest.raises(KafkaError, match="InitProducerId"):
            produce(bootstrap, topic, range(6, 7), producer)
        producer.close()

        # The worker notices (heartbeat: unknown member), rejoins, and with no committed
        # offsets starts from the beginning of the new, empty log.
        worker.wait_until(
            "a new assignment", lambda: len(worker.assignments()) > assignments_before
        )
        replacement = make_producer(bootstrap)
        try:
            produce(bootstrap, topic, range(100, 106), replacement)
        finally:
            replacement.close()
        worker.wait_until("6 new events", lambda: len(worker.events()) == 12)
        after = worker.events()[6:]
        assert sorted(e["value"] for e in after) == sorted(f"v{i}" for i in range(100, 106))
        assert worker.terminate() < 5
    # kafka-python 3.0.12 leaks the socket of every refused connection attempt made while the
    # broker was down; finalize them now, under this module's ResourceWarning filter.
    del producer, replacement
    gc.collect()


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    _worker_main(*sys.argv[2:6])
