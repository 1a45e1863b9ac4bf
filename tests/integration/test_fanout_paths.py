"""One projector test-suite, two fan-out paths: embedded (in-process, from the log) and Kafka.

On the Kafka path the relay and the workers run as production runs them: ``agentworks relay``
and ``agentworks worker`` subprocesses (the latter spawning one process per projector) against
a real broker (the session's tansu broker, topics under a prefix of this module's own) and a
database of this module's own. Every test drives real commands while the fan-out runs, waits
until every projector has applied every version of every aggregate it follows, and ends with the
test of record: the incrementally built read models equal a rebuild from scratch, row for row,
for all projectors.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import pg
import pytest
from fanout_helpers import (
    LOG_LINE_COUNTS,
    EmbeddedPath,
    KafkaFanout,
    Workload,
    connect,
    rebuild_differences,
    wait_converged,
)

from commands import models as m
from infra.bootstrap import build_write_side
from projections.registry import all_projectors

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from commands.handlers import AgentWorks

pytest_plugins = ["kafka_fixtures"]

#: Worker processes take a few seconds to import, join their groups (tansu answers a JoinGroup
#: after half the session timeout) and catch up on two busy cores.
CONVERGE_TIMEOUT = 90.0

READ_MODELS = [table for projector in all_projectors() for table in projector.tables]


class Fanout:
    """A database of its own with one fan-out path running against it, and a write side."""

    def __init__(self, kind: str, database_url: str, path: EmbeddedPath | KafkaFanout) -> None:
        self.kind = kind
        self.database_url = database_url
        self.path = path
        self.app: AgentWorks = build_write_side(database_url, pool_size=2)
        self.workload = Workload(self.app, seed={"embedded": 1, "kafka": 2}[kind])

    def converge(self) -> float:
        return wait_converged(self.database_url, timeout=CONVERGE_TIMEOUT, path=self.path)

    def assert_equals_rebuild(self) -> None:
        self.converge()
        differences = rebuild_differences(self.database_url)
        assert differences == {}, f"{self.kind}: live read models differ from a rebuild"

    def rows(self, query: str, *params: object) -> list[tuple[object, ...]]:
        with connect(self.database_url) as conn:
            return conn.execute(query, params).fetchall()


@pytest.fixture(scope="module", params=["embedded", "kafka"])
def fanout(
    request: pytest.FixtureRequest,
    migrated_template: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Fanout]:
    name = pg.random_name("aw_t_fanout_")
    url = pg.create_database(name, template=migrated_template)
    path: EmbeddedPath | KafkaFanout | None = None
    subject: Fanout | None = None
    try:
        if request.param == "embedded":
            path = EmbeddedPath(url)
        else:
            broker = request.getfixturevalue("kafka_broker")
            workdir: Path = tmp_path_factory.mktemp("fanout-kafka")
            path = KafkaFanout(
                url,
                broker.bootstrap,
                workdir,
                topic_prefix=f"fanout-{uuid.uuid4().hex[:8]}.",
                partitions=3,
                per_projector=False,  # `agentworks worker`: one process per projector
            )
        path.start()
        subject = Fanout(request.param, url, path)
        yield subject
    finally:
        try:
            if subject is not None:
                subject.app.close()
        finally:
            try:
                if path is not None:
                    path.stop()
            finally:
                pg.drop_database(name)


def test_a_mixed_workload_builds_the_same_read_models_as_a_rebuild(fanout: Fanout) -> None:
    work = fanout.workload
    tenants = [work.tenant(f"mix{i}-{fanout.kind}") for i in range(2)]
    for _ in range(3):
        for tenant in tenants:
            work.mixed(tenant, 70)
    for tenant in tenants:
        work.finale(tenant)
    assert work.commands > 300

    fanout.assert_equals_rebuild()

    # The workload reached every read model (a suite that compared empty tables proves nothing),
    # but invoices: issuing one needs Stripe (tests/integration/test_billing_stripe.py holds its
    # read model equal to a rebuild).
    for table in (t for t in READ_MODELS if t != "rm_invoices"):
        (count,) = fanout.rows(f"SELECT count(*) FROM {table}")[0]
        assert count, f"{table} is empty"
    statuses = {row[0] for row in fanout.rows("SELECT DISTINCT status FROM rm_runs")}
    assert {"SUCCEEDED", "FAILED", "CANCELLED", "TIMED_OUT"} <= statuses
    kinds = {row[0] for row in fanout.rows("SELECT DISTINCT kind FROM rm_ledger_entries")}
    assert len(kinds) >= 2, kinds  # charges and their corrections


def test_read_models_show_what_each_command_did(fanout: Fanout) -> None:
    work = fanout.workload
    tenant = work.tenant(f"spot-{fanout.kind}", projects=1)
    project = tenant.projects[0]
    card = work.card(tenant, "Fix login")
    app, owner, orchestrator = fanout.app, tenant.owner, tenant.orchestrator
    app.move_card(m.MoveCard(card_id=card, to_lane="Doing"), owner)
    app.label_card(m.LabelCard(card_id=card, label="bug"), owner)
    run = work.running_run(tenant, card)
    now = datetime.now(UTC)
    app.append_run_log(
        m.AppendRunLog(
            run_id=run, lines=[m.LogLineInput(at=now, text=f"line {i}") for i in range(3)]
        ),
        orchestrator,
    )
    call = app.record_llm_call(
        m.RecordLlmCall(
            run_id=run, call_id="c1", provider="simulated", model="sim-small",
            input_tokens=1000, output_tokens=200, latency_ms=300,
            provider_cost_micros=12_345, price_table_version="2025-01", at=now,
        ),
        orchestrator,
    )  # fmt: skip
    finished = app.finish_run(m.FinishRun(run_id=run, outcome="SUCCEEDED"), orchestrator)
    billed = int(call.extra["billed"])
    fanout.converge()

    assert fanout.rows(
        "SELECT lane, labels, version, last_run_id, cost_micros FROM rm_cards WHERE card_id = %s",
        card,
    ) == [("Doing", ["bug"], 3, run, billed)]
    assert fanout.rows(
        "SELECT name, card_count FROM rm_lanes WHERE project_id = %s ORDER BY ord", project
    ) == [("Todo", 0), ("Doing", 1), ("Review", 0), ("Done", 0)]
    assert fanout.rows(
        "SELECT status, log_line_count, llm_calls, billed_micros, version FROM rm_runs"
        " WHERE run_id = %s",
        run,
    ) == [("SUCCEEDED", 3, 1, billed, finished.version)]
    assert fanout.rows(
        "SELECT billed_micros, provider_cost_micros FROM rm_charges WHERE run_id = %s", run
    ) == [(billed, 12_345)]
    kinds = [
        row[0]
        for row in fanout.rows(
            "SELECT kind FROM rm_activity WHERE workspace_id = %s ORDER BY position",
            tenant.workspace_id,
        )
    ]
    assert kinds[-6:] == [
        "card.created", "card.moved", "card.labelled", "run.requested", "run.started",
        "run.succeeded",
    ]  # fmt: skip
    fanout.assert_equals_rebuild()


def test_a_backlog_appended_in_bulk_arrives_whole(fanout: Fanout) -> None:
    work = fanout.workload
    tenant = work.tenant(f"bulk-{fanout.kind}", projects=1)
    written = work.bulk_log_chunks(tenant, 3000)
    (run,) = tenant.running
    fanout.converge()

    assert fanout.rows(LOG_LINE_COUNTS, run) == [(written, written)]
    fanout.assert_equals_rebuild()
