"""An event a projector cannot apply parks its aggregate, and nothing else.

The event is planted below the API, as a bad upgrade would leave it (a ``Card.Moved`` whose
position is not text: the kanban projector cannot store it). On both fan-out paths (the embedded
one in-process, and ``agentworks relay`` plus ``agentworks worker`` processes over a broker), on
the sweep's path and in a rebuild: the kanban projector parks that card (recorded in
``projection_parked``) and holds its later events back, while every other card of the same
workspace and of other workspaces, and every other projector, keeps projecting.
``agentworks parked retry`` after the fix applies the held events in order.
"""

from __future__ import annotations

import asyncio
import itertools
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any
from uuid import UUID

import psycopg
import pytest
from board_helpers import stored_head, to_the_head, whole_log
from fanout_helpers import (
    EmbeddedPath,
    KafkaFanout,
    parked,
    projector_side,
    rebuild_differences,
    rows,
    wait_until,
)
from in_process_api import CountingOffloader
from parking_helpers import (
    FIXED_CLI,
    FIXED_POSITION,
    TwoTenants,
    install_fix,
    new_card,
    parked_card,
    plant_block,
    plant_unprojectable_move,
)
from read_side_helpers import ReadSide
from test_batch_bytes import BOUND, LARGE, large_in

import projections.runner as runner_module
from adapters.postgres import API_ROLE, make_pool
from commands import models as m
from projections.kanban import KanbanProjector
from projections.rebuild import rebuild_many
from projections.registry import ALL_PROJECTORS, all_projectors
from projections.runner import RETRY_PENDING, ProjectionRunner
from projections.sweep import ProjectionSweep
from read_api.consistency import ConsistencyToken, ConsistencyWaiter

if TYPE_CHECKING:
    from collections.abc import Sequence

    from commands.handlers import AgentWorks
    from domain.envelope import EventEnvelope
    from projections.base import BatchContext
    from projections.runner import BatchOutcome, Parked

pytest_plugins = ["kafka_fixtures"]

HERE = Path(__file__).parent
REPO = HERE.parent.parent


def card(url: str, card_id: UUID) -> tuple[Any, ...]:
    (row,) = rows(
        url,
        "SELECT lane, position, labels, version FROM rm_cards WHERE card_id = %s",
        card_id,
    )
    return row


class Scene(TwoTenants):
    """Two workspaces, three cards; card ``a1`` gets the planted event."""

    planted_title = "poisoned"

    def poison_and_go_on(self) -> None:
        """The planted event, then later events of the same card and of the others."""
        app = self.app
        self.bad_version = plant_unprojectable_move(app, self.a1)
        app.label_card(m.LabelCard(card_id=self.a1, label="after"), self.a.owner)
        app.move_card(m.MoveCard(card_id=self.a2, to_lane="Doing"), self.a.owner)
        app.label_card(m.LabelCard(card_id=self.b1, label="fine"), self.b.owner)

    def others_projected(self, url: str) -> bool:
        return (
            card(url, self.a2)[0] == "Doing"
            and card(url, self.b1)[2] == ["fine"]
            and len(parked(url, "error", "attempts")) == 1
            and bool(
                rows(
                    url,
                    "SELECT 1 FROM rm_activity WHERE subject_id = %s AND kind = 'card.labelled'",
                    self.a1,
                )
            )
        )

    def assert_parked_alone(self, url: str, *, activity: bool = True) -> None:
        ((projector, originator, version, event_type, error, attempts),) = parked(
            url, "error", "attempts"
        )
        assert (projector, originator, version, event_type, attempts) == (
            "kanban", self.a1, self.bad_version, "Card.Moved", 1,
        )  # fmt: skip
        assert error  # what went wrong, for the operator
        # Nothing of the parked card after the planted event is applied (no later label).
        lane, _, labels, version = card(url, self.a1)
        assert (lane, labels, version) == ("Todo", [], self.bad_version - 1)
        assert rows(
            url,
            "SELECT version FROM projection_versions WHERE projector = 'kanban'"
            " AND originator_id = %s",
            self.a1,
        ) == [(self.bad_version - 1,)]
        # The other cards, of both workspaces, went on.
        assert card(url, self.a2)[0] == "Doing"
        assert card(url, self.b1)[2] == ["fine"]
        if not activity:
            return
        # Other projectors were not held: the activity feed has the planted move and after.
        kinds = [
            r[0]
            for r in rows(
                url,
                "SELECT kind FROM rm_activity WHERE subject_id = %s ORDER BY position",
                self.a1,
            )
        ]
        assert kinds[-2:] == ["card.moved", "card.labelled"]

    def assert_retried(self, url: str) -> None:
        assert parked(url, "error", "attempts") == []
        assert card(url, self.a1) == ("Doing", FIXED_POSITION, ["after"], self.bad_version + 1)


def cli_env(url: str) -> dict[str, str]:
    import os

    import pg

    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTWORKS_")}
    env.update(
        pg.LOGIN_ENV,  # as a deployment sets them (and no dev passwords left in the cwd)
        AGENTWORKS_DATABASE_URL=url,
        AGENTWORKS_LOG_JSON="false",
        AGENTWORKS_POOL_SIZE="2",
        PYTHONPATH=os.pathsep.join([str(REPO), str(HERE)]),
        COLUMNS="200",
    )
    return env


def agentworks(url: str, *args: str, fixed: bool = False) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-c", FIXED_CLI] if fixed else [sys.executable, "-m", "infra.cli"]
    return subprocess.run(
        [*command, *args], env=cli_env(url), capture_output=True, text=True, timeout=120
    )


# -- the embedded path -----------------------------------------------------------------------------


def test_embedded_fanout_parks_only_the_aggregate_it_cannot_apply(
    database_url: str, app: AgentWorks, monkeypatch: pytest.MonkeyPatch
) -> None:
    scene = Scene(app)
    path = EmbeddedPath(database_url)
    try:
        path.fanout.drain()
        scene.poison_and_go_on()
        path.fanout.drain()
        scene.assert_parked_alone(database_url)

        # Applied again (a restart, the next batch): still parked, still held, no loop.
        path.fanout.drain()
        app.label_card(m.LabelCard(card_id=scene.a1, label="while parked"), scene.a.owner)
        path.fanout.drain()
        assert card(database_url, scene.a1)[2:] == ([], scene.bad_version - 1)
        assert len(parked(database_url, "error", "attempts")) == 1

        # After the fix, a retry applies the held events in order, and the card is live again.
        monkeypatch.setattr(KanbanProjector, "apply_batch", KanbanProjector.apply_batch)
        install_fix()
        runner = ProjectionRunner(KanbanProjector(), path.pool, path.log)
        (retried,) = runner.retry_parked()
        assert (retried.originator_id, retried.applied, retried.parked) == (scene.a1, 3, None)
        assert parked(database_url, "error", "attempts") == []
        assert card(database_url, scene.a1) == (
            "Doing", FIXED_POSITION, ["after", "while parked"], scene.bad_version + 2,
        )  # fmt: skip
        app.label_card(m.LabelCard(card_id=scene.a1, label="later"), scene.a.owner)
        path.fanout.drain()
        assert card(database_url, scene.a1)[2] == ["after", "later", "while parked"]
    finally:
        path.stop()


def test_a_retry_that_fails_again_keeps_the_aggregate_parked_with_the_new_error(
    database_url: str, app: AgentWorks
) -> None:
    scene = Scene(app)
    with projector_side(database_url) as (pool, log):
        runner = ProjectionRunner(KanbanProjector(), pool, log)
        runner.process(whole_log(log))
        scene.poison_and_go_on()
        runner.process(whole_log(log, runner.position()))
        scene.assert_parked_alone(database_url, activity=False)

        (retried,) = runner.retry_parked([scene.a1])
        assert retried.applied == 0
        assert retried.parked is not None
        assert retried.parked.originator_version == scene.bad_version
        ((*_, attempts),) = parked(database_url, "error", "attempts")
        assert attempts == 2
        assert card(database_url, scene.a1)[3] == scene.bad_version - 1


class ChunkRecorder:
    """Installs the fix and records how many events each transaction of a retry applies;
    with ``crash_at``, the retry's transaction of that number (1-based) fails as a lost
    database would, after its events were handed over."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, crash_at: int | None = None) -> None:
        self.sizes: list[int] = []
        self.crash_at = crash_at
        monkeypatch.setattr(KanbanProjector, "apply_batch", KanbanProjector.apply_batch)
        install_fix()
        fixed = KanbanProjector.apply_batch

        def recorded(
            projector: KanbanProjector, ctx: BatchContext, envelopes: Sequence[EventEnvelope]
        ) -> None:
            self.sizes.append(len(envelopes))
            fixed(projector, ctx, envelopes)
            if len(self.sizes) == self.crash_at:
                raise psycopg.OperationalError("server closed the connection unexpectedly")

        monkeypatch.setattr(KanbanProjector, "apply_batch", recorded)


def long_parked_tail(scene: Scene, url: str, runner: ProjectionRunner, labels: int) -> int:
    """Card ``a1`` parked by the kanban projector with ``labels`` more events of it waiting
    behind the planted one (besides the scene's own); the number of events waiting."""
    runner.process(whole_log(runner.log))
    scene.poison_and_go_on()
    for n in range(labels):
        scene.app.label_card(m.LabelCard(card_id=scene.a1, label=f"l{n}"), scene.a.owner)
    runner.process(whole_log(runner.log, runner.position()))
    assert [p[2] for p in parked(url)] == [scene.bad_version]
    return 2 + labels


def test_a_retry_applies_a_long_tail_a_bounded_chunk_per_transaction(
    database_url: str, app: AgentWorks, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A long-parked busy aggregate's tail used to be read whole and applied in one
    transaction; now at most RETRY_CHUNK events at a time, each chunk committed."""
    monkeypatch.setattr(runner_module, "RETRY_CHUNK", 3)
    scene = Scene(app)
    with projector_side(database_url) as (pool, log):
        runner = ProjectionRunner(KanbanProjector(), pool, log)
        waiting = long_parked_tail(scene, database_url, runner, labels=6)
        chunks = ChunkRecorder(monkeypatch)
        (retried,) = runner.retry_parked()
    assert (retried.applied, retried.parked) == (waiting, None)
    assert chunks.sizes == [3, 3, 2]
    assert parked(database_url) == []
    lane, position, labels, version = card(database_url, scene.a1)
    assert (lane, position, version) == ("Doing", FIXED_POSITION, scene.bad_version + 7)
    assert sorted(labels) == sorted(["after", *(f"l{n}" for n in range(6))])


def test_a_retry_stopped_half_way_leaves_the_aggregate_parked_where_it_got_to(
    database_url: str, app: AgentWorks, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runner_module, "RETRY_CHUNK", 3)
    scene = Scene(app)
    with projector_side(database_url) as (pool, log):
        runner = ProjectionRunner(KanbanProjector(), pool, log)
        long_parked_tail(scene, database_url, runner, labels=6)
        ChunkRecorder(monkeypatch, crash_at=2)
        with pytest.raises(psycopg.OperationalError):
            runner.retry_parked()
        # The first chunk committed: the card is 3 versions further and parked at the next,
        # with no failure counted; the live path still holds its events back.
        ((_, _, version, _, error, attempts),) = parked(database_url, "error", "attempts")
        assert (version, attempts) == (scene.bad_version + 3, 1)
        assert error.startswith(RETRY_PENDING)
        assert card(database_url, scene.a1)[3] == scene.bad_version + 2
        app.label_card(m.LabelCard(card_id=scene.a1, label="meanwhile"), scene.a.owner)
        runner.process(whole_log(log, runner.position()))
        assert card(database_url, scene.a1)[3] == scene.bad_version + 2

        # Retried again, it goes on from there (nothing applied twice) to the end.
        chunks = ChunkRecorder(monkeypatch)
        (retried,) = runner.retry_parked()
    assert (retried.applied, retried.parked) == (6, None)
    assert chunks.sizes == [3, 3]
    assert parked(database_url) == []
    assert card(database_url, scene.a1)[3] == scene.bad_version + 8
    assert "meanwhile" in card(database_url, scene.a1)[2]


def test_a_retry_reads_a_tail_of_large_events_a_bounded_batch_per_transaction(
    database_url: str, app: AgentWorks, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A retry read up to RETRY_CHUNK events per transaction whatever their size: a tail of a
    few large events (agent outputs of many MiB) was read and applied at once. Now a chunk also
    stops at the byte bound, and the card waits parked at the first event after it (named by
    its header, not read twice)."""
    scene = Scene(app)
    with projector_side(database_url) as (pool, log):
        runner = ProjectionRunner(KanbanProjector(), pool, log)
        runner.process(whole_log(log))
        scene.poison_and_go_on()
        for n in range(7):
            description = chr(ord("a") + n) * LARGE
            app.update_card(m.UpdateCard(card_id=scene.a1, description=description), scene.a.owner)
        runner.process(whole_log(log, runner.position()))
        assert [p[2] for p in parked(database_url)] == [scene.bad_version]
        monkeypatch.setattr(KanbanProjector, "apply_batch", KanbanProjector.apply_batch)
        install_fix()
        chunks: list[tuple[list[EventEnvelope], list[Parked]]] = []
        process = runner.process

        def recording(envelopes: Sequence[EventEnvelope], **kwargs: Any) -> BatchOutcome:
            chunks.append((list(envelopes), list(kwargs.get("park", ()))))
            return process(envelopes, **kwargs)

        runner.process = recording  # type: ignore[method-assign]
        runner.max_retry_bytes = BOUND
        (retried,) = runner.retry_parked()
    assert (retried.applied, retried.parked) == (9, None)  # the move, the label, seven edits
    assert sum(large_in(envelopes) for envelopes, _ in chunks) == 7 * LARGE
    assert max(large_in(envelopes) for envelopes, _ in chunks) <= 3 * LARGE
    assert len(chunks) >= 3
    for (envelopes, (waiting,)), (following, _) in itertools.pairwise(chunks):
        first = following[0]
        assert waiting.originator_version == envelopes[-1].originator_version + 1
        assert (waiting.originator_version, waiting.position, waiting.event_type) == (
            first.originator_version, first.position, first.type,
        )  # fmt: skip
        assert waiting.workspace_id == first.workspace_id == scene.a.workspace_id
        assert waiting.error.startswith(RETRY_PENDING)
    assert chunks[-1][1] == []
    assert parked(database_url) == []
    ((description,),) = rows(
        database_url, "SELECT description FROM rm_cards WHERE card_id = %s", scene.a1
    )
    assert description == "g" * LARGE


def test_the_sweep_holds_a_parked_aggregate_back_too(database_url: str, app: AgentWorks) -> None:
    """Events that never reached the projector, applied by the sweep: the same parking."""
    scene = Scene(app)
    scene.poison_and_go_on()
    with projector_side(database_url) as (pool, log):
        runner = ProjectionRunner(KanbanProjector(), pool, log)
        sweep = ProjectionSweep(runner)
        head = to_the_head(lambda: sweep.sweep(stored_head(log)), sweep.watermark, log)
        assert sweep.watermark() == head
    assert card(database_url, scene.a2)[0] == "Doing"
    assert card(database_url, scene.b1)[2] == ["fine"]
    assert [(p[0], p[1], p[2]) for p in parked(database_url, "error", "attempts")] == [
        ("kanban", scene.a1, scene.bad_version)
    ]
    assert card(database_url, scene.a1)[2:] == ([], scene.bad_version - 1)


def test_gap_healing_stops_before_the_parked_event(database_url: str, app: AgentWorks) -> None:
    """Only the card's newest event is delivered: healing reads the ones before it from the
    store, applies those before the planted one, and holds the rest."""
    scene = Scene(app)
    with projector_side(database_url) as (pool, log):
        runner = ProjectionRunner(KanbanProjector(), pool, log)
        runner.process(whole_log(log))
        scene.app.update_card(m.UpdateCard(card_id=scene.a1, title="edited before"), scene.a.owner)
        scene.poison_and_go_on()
        newest = [e for e in whole_log(log) if e.originator_id == scene.a1][-1]
        outcome = runner.process([newest])
        assert outcome.healed == 1  # the edit
        assert outcome.held == 1  # the delivered label, behind the planted move
    (row,) = rows(database_url, "SELECT title FROM rm_cards WHERE card_id = %s", scene.a1)
    assert row == ("edited before",)
    assert [(p[1], p[2]) for p in parked(database_url, "error", "attempts")] == [
        (scene.a1, scene.bad_version)
    ]


# -- the Kafka path --------------------------------------------------------------------------------


@pytest.mark.slow
def test_kafka_workers_park_only_the_aggregate_they_cannot_apply(
    database_url: str,
    app: AgentWorks,
    kafka_broker: Any,
    tmp_path: Path,
) -> None:
    scene = Scene(app)
    fanout = KafkaFanout(
        database_url,
        kafka_broker.bootstrap,
        tmp_path,
        topic_prefix=f"parking-{uuid.uuid4().hex[:8]}.",
        partitions=2,
        projectors=["kanban", "activity"],
    )
    fanout.start()
    try:
        wait_until(
            lambda: len(rows(database_url, "SELECT 1 FROM rm_cards")) == 3,
            timeout=90,
            what="the workers project the first cards",
            poll=0.2,
        )
        scene.poison_and_go_on()
        wait_until(
            lambda: scene.others_projected(database_url),
            timeout=60,
            what=f"the others are projected\n{fanout.diagnostics()}",
            poll=0.2,
        )
        scene.assert_parked_alone(database_url)
        assert fanout.dead() == []

        # The retry runs beside the live worker, which keeps its hands off the parked card.
        retried = agentworks(database_url, "parked", "retry", "--projector", "kanban", fixed=True)
        assert retried.returncode == 0, retried.stderr
        scene.assert_retried(database_url)
        app.label_card(m.LabelCard(card_id=scene.a1, label="later"), scene.a.owner)
        wait_until(
            lambda: card(database_url, scene.a1)[2] == ["after", "later"],
            timeout=60,
            what="the worker applies the card's next event",
            poll=0.2,
        )
    finally:
        fanout.stop()


# -- rebuild ---------------------------------------------------------------------------------------


def test_a_rebuild_completes_past_a_poison_event_and_parks_it(
    database_url: str, app: AgentWorks
) -> None:
    scene = Scene(app)
    scene.poison_and_go_on()
    for i in range(3):
        new_card(app, scene.b, f"after {i}")
    with projector_side(database_url) as (pool, log):
        results = rebuild_many(all_projectors(), pool, log)
    assert all(result.swapped for result in results)
    scene.assert_parked_alone(database_url)
    assert len(rows(database_url, "SELECT 1 FROM rm_cards")) == 6


def test_after_a_poison_event_a_rebuild_in_small_batches_equals_the_live_read_models(
    database_url: str, app: AgentWorks
) -> None:
    """A failed batch is rolled back and applied again event by event, and what the projectors
    remembered of it is dropped: every batch after it still builds the same rows as the live
    path (which parks the same aggregate)."""
    scene = Scene(app)
    scene.poison_and_go_on()
    for i in range(6):
        card_id = new_card(app, scene.a if i % 2 else scene.b, f"later {i}")
        board = scene.a if i % 2 else scene.b
        app.move_card(m.MoveCard(card_id=card_id, to_lane="Done"), board.owner)
        app.label_card(m.LabelCard(card_id=card_id, label=f"l{i}"), board.owner)
    # Cards from before the failed batch, changed batches after it (what a memo forgets).
    app.label_card(m.LabelCard(card_id=scene.b1, label="late"), scene.b.owner)
    app.update_card(m.UpdateCard(card_id=scene.a2, title="renamed late"), scene.a.owner)
    path = EmbeddedPath(database_url)
    try:
        path.fanout.drain()
    finally:
        path.stop()
    assert rebuild_differences(database_url, batch_size=5) == {}
    assert rows(
        database_url,
        "SELECT projector, originator_id, originator_version FROM projection_parked"
        " ORDER BY projector",
    ) == [
        ("kanban", scene.a1, scene.bad_version),
        ("kanban#rebuild", scene.a1, scene.bad_version),
    ]


# -- text PostgreSQL cannot store ------------------------------------------------------------------


def test_an_event_with_nul_in_its_text_projects_with_a_replacement_character(
    database_url: str, app: AgentWorks
) -> None:
    scene = Scene(app)
    version = plant_block(app, scene.b1, "a\x00b")
    path = EmbeddedPath(database_url)
    try:
        path.fanout.drain()
        (stored,) = [e for e in whole_log(path.log) if e.originator_id == scene.b1][-1:]
    finally:
        path.stop()
    assert parked(database_url, "error", "attempts") == []
    assert rows(
        database_url, "SELECT blocked_reason, version FROM rm_cards WHERE card_id = %s", scene.b1
    ) == [("a\ufffdb", version)]
    assert rows(
        database_url,
        "SELECT summary FROM rm_activity WHERE subject_id = %s ORDER BY position DESC LIMIT 1",
        scene.b1,
    ) == [("blocked card: a\ufffdb",)]
    assert stored.payload["reason"] == "a\x00b"  # the event itself is never changed

    with projector_side(database_url) as (pool, log):
        rebuild_many(all_projectors(), pool, log)
    assert rows(
        database_url, "SELECT blocked_reason FROM rm_cards WHERE card_id = %s", scene.b1
    ) == [("a\ufffdb",)]
    assert parked(database_url, "error", "attempts") == []


# -- the CLI, status, metrics and readiness ----------------------------------------------------


@pytest.fixture
def parked_scene(database_url: str, app: AgentWorks) -> Scene:
    scene = Scene(app)
    scene.poison_and_go_on()
    with projector_side(database_url) as (pool, log):
        for projector in all_projectors():
            ProjectionRunner(projector, pool, log).process(whole_log(log))
    scene.assert_parked_alone(database_url)
    return scene


def test_a_read_waiting_for_a_parked_write_is_answered_stale_without_waiting(
    database_url: str, parked_scene: Scene
) -> None:
    """A token naming a write that a projector parked cannot be reached until an operator
    retries: the read waited out its whole budget, polling all along, for every such request.
    It is answered stale after its first check; a token of the same card before the planted
    event is still answered as caught up."""
    app = parked_scene.app
    with psycopg.connect(database_url) as conn:
        positions = dict(
            conn.execute(
                "SELECT originator_version, notification_id FROM agentworks_events"
                " WHERE originator_id = %s",
                (parked_scene.a1,),
            ).fetchall()
        )
    bad = parked_scene.bad_version
    offloader = CountingOffloader()
    pool = make_pool(database_url, role=API_ROLE, max_size=2)
    waiter = ConsistencyWaiter(
        pool=pool, offloader=offloader, projectors=ALL_PROJECTORS, wait_ms=5_000,
        mapper=app.mapper,
    )  # fmt: skip

    def wait(version: int) -> tuple[bool, int]:
        offloader.calls = 0
        token = ConsistencyToken(positions[version], parked_scene.a1, version)
        reached = asyncio.run(waiter.wait_for_token(token, parked_scene.a.workspace_id))
        return reached, offloader.calls

    try:
        before, planted, after = wait(bad - 1), wait(bad), wait(bad + 1)
    finally:
        offloader.shutdown()
        pool.close()
    # The look-up of the token's aggregate, then one check of the projectors' tracking.
    assert before == (True, 2)
    assert planted == (False, 2)
    assert after == (False, 2)


@pytest.mark.slow
def test_parked_list_and_retry_on_the_command_line(database_url: str, parked_scene: Scene) -> None:
    listed = agentworks(database_url, "parked", "list")
    assert listed.returncode == 0, listed.stderr
    assert str(parked_scene.a1) in listed.stdout
    assert "Card.Moved" in listed.stdout
    assert "kanban" in listed.stdout
    empty = agentworks(database_url, "parked", "list", "--projector", "activity")
    assert empty.returncode == 0, empty.stderr
    assert str(parked_scene.a1) not in empty.stdout

    status = agentworks(database_url, "status")
    assert status.returncode == 0, status.stderr
    (kanban_line,) = [line for line in status.stdout.splitlines() if "projector kanban" in line]
    assert kanban_line.split("│")[-2].strip() == "1"  # the "parked" column

    # Without the fix the retry fails again: exit 1, still parked, the attempt counted.
    again = agentworks(database_url, "parked", "retry", "--aggregate", str(parked_scene.a1))
    assert again.returncode == 1, again.stderr
    assert str(parked_scene.a1) in again.stdout
    assert [p[-1] for p in parked(database_url, "error", "attempts")] == [2]

    unknown = agentworks(database_url, "parked", "retry", "--projector", "nope")
    assert unknown.returncode == 2
    assert "no projector named 'nope'" in unknown.stderr

    fixed = agentworks(database_url, "parked", "retry", fixed=True)
    assert fixed.returncode == 0, fixed.stderr
    assert "retrying parked aggregates" in fixed.stdout  # its progress, an aggregate at a time
    assert "1/1" in fixed.stdout
    parked_scene.assert_retried(database_url)
    listed = agentworks(database_url, "parked", "list")
    assert listed.returncode == 0
    assert str(parked_scene.a1) not in listed.stdout


def test_metrics_and_readyz_show_parked_aggregates(
    database_url: str, app: AgentWorks, parked_scene: Scene
) -> None:
    """``/metrics`` has the parked aggregates per projector; ``/readyz`` names the projectors
    that have any and stays ready (the decision documented in ``read_api.app.Health``)."""
    import httpx

    from adapters.metrics import LagCollector
    from adapters.postgres import make_pool
    from read_api.app import create_app
    from read_api.broadcast import LocalBroadcaster
    from read_api.services import ApiServices, JwtVerification
    from read_api.testing import start_in_thread

    pool = make_pool(database_url, role="agentworks_api", max_size=2, name="api")
    services = ApiServices(
        write=app,
        pool=pool,
        jwt=JwtVerification(secret="x" * 48),
        broadcaster=LocalBroadcaster(),
        lag_collector=LagCollector(database_url),
    )
    server = start_in_thread(create_app(services))
    try:
        ready = httpx.get(f"{server.url}/readyz", timeout=30)
        metrics = httpx.get(f"{server.url}/metrics", timeout=30).text
    finally:
        server.stop()
        pool.close()
    assert ready.status_code == 200, ready.text
    body = ready.json()
    assert body["status"] == "ready"
    assert body["parked"] == {"kanban": 1}
    assert body["projectors"]["kanban"]["parked"] == 1
    assert body["projectors"]["activity"]["parked"] == 0
    assert 'agentworks_projector_parked_aggregates{projector="kanban"} 1.0' in metrics
    assert 'agentworks_projector_parked_aggregates{projector="activity"} 0.0' in metrics


@pytest.mark.slow
def test_agentworks_rebuild_completes_past_a_poison_event_and_reports_it(
    database_url: str, app: AgentWorks
) -> None:
    scene = Scene(app)
    scene.poison_and_go_on()
    rebuilt = agentworks(database_url, "rebuild", "all")
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert "kanban: 1 parked aggregate(s)" in rebuilt.stderr
    scene.assert_parked_alone(database_url)


# -- what is not the events' fault ---------------------------------------------------------------


class BrokenBatchPath(KanbanProjector):
    """A projector whose fold fails on every batch of several events while each event, in a
    batch of its own, applies."""

    def apply_batch(self, ctx: Any, envelopes: Any) -> None:
        if len(envelopes) > 1:
            raise RuntimeError("the batch path is broken")
        super().apply_batch(ctx, envelopes)


class MissingTable(KanbanProjector):
    """A deployment without one of the projector's tables: no event can be blamed for that."""

    def apply_batch(self, ctx: Any, envelopes: Any) -> None:
        ctx.cur.execute("SELECT FROM rm_no_such_table")


def test_a_batch_that_fails_only_as_a_whole_is_applied_event_by_event(
    database_url: str, app: AgentWorks
) -> None:
    scene = Scene(app)
    with projector_side(database_url) as (pool, log):
        outcome = ProjectionRunner(BrokenBatchPath(), pool, log).process(whole_log(log))
    assert outcome.parked == []
    assert parked(database_url, "error", "attempts") == []
    assert card(database_url, scene.b1)[3] == 1


def test_a_missing_table_is_raised_and_parks_nothing(database_url: str, app: AgentWorks) -> None:
    Scene(app)
    with projector_side(database_url) as (pool, log):
        runner = ProjectionRunner(MissingTable(), pool, log)
        with pytest.raises(psycopg.errors.UndefinedTable):
            runner.process(whole_log(log))
        assert runner.position() == 0
    assert parked(database_url, "error", "attempts") == []


def test_an_event_delivered_while_a_retry_unparks_its_aggregate_is_applied(
    side: ReadSide,
) -> None:
    """A retry's last transaction unparks the aggregate while a delivery of its next event (one
    the retry read the store too early to see) waits for the aggregate's tracking row. The
    delivery found the row's newest version, but whether the aggregate is parked as its
    statement's snapshot, taken before the wait, had it: parked. It held the event back and
    moved its position past it, with nothing parked any more to hold it for: the event was
    never applied (and the embedded path's watermark passed it too, so no sweep looked)."""
    world, card_id, runner = parked_card(side, "Card.Edited", title="before")
    # Written after the retry read the store, before its last transaction began (which, begun
    # after it, does not hold it back from the log's readers).
    side.app.update_card(m.UpdateCard(card_id=card_id, title="after"), world.owner)
    with psycopg.connect(side.database_url) as retry:
        # The retry's last transaction: the tracking row locked, the aggregate unparked.
        retry.execute(
            "SELECT version FROM projection_versions WHERE projector = 'kanban'"
            " AND originator_id = %s FOR UPDATE",
            (card_id,),
        )
        retry.execute(
            "DELETE FROM projection_parked WHERE projector = 'kanban' AND originator_id = %s",
            (card_id,),
        )
        edited = side.envelopes()[-1]
        assert (edited.originator_id, edited.type) == (card_id, "Card.Edited")
        with ThreadPoolExecutor(1) as pool:
            delivery = pool.submit(runner.process, [edited], read_after=edited.position - 1)
            wait_until(
                lambda: bool(
                    rows(
                        side.database_url,
                        "SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                        " AND query LIKE %s",
                        "%FOR UPDATE%",
                    )
                ),
                timeout=30,
                what="the delivery waiting for the tracking row",
            )
            retry.commit()
            outcome = delivery.result()

    assert (outcome.applied, outcome.held) == (1, 0)
    assert side.row("SELECT title FROM rm_cards WHERE card_id = %s", (card_id,))["title"] == "after"
    assert not side.rows("SELECT 1 FROM projection_parked WHERE originator_id = %s", (card_id,))


def test_an_event_held_back_between_a_retrys_read_and_its_last_transaction_is_applied(
    side: ReadSide,
) -> None:
    """A retry reads the aggregate's events from the store, then applies them and unparks it.
    An event written after that read and delivered before the retry's transaction began was
    held back (the aggregate was still parked), and the retry, which had not read it, unparked
    the aggregate without it: never applied (the delivery's position, and the embedded path's
    watermark, had passed it). The retry's transaction now looks, once its tracking row is
    locked, for events after those it applied, and goes on with them."""
    world, card, runner = parked_card(side, "Card.Labelled")
    side.app.label_card(m.LabelCard(card_id=card, label="before"), world.owner)
    assert runner.process(side.envelopes(after=runner.position())).held == 1
    read = runner.log.between_batch
    delivered: list[BatchOutcome] = []

    def read_then_deliver_the_next(*args: Any, **kwargs: Any) -> Any:
        batch = read(*args, **kwargs)
        if not delivered:
            side.app.label_card(m.LabelCard(card_id=card, label="after"), world.owner)
            delivered.append(side.runner(KanbanProjector()).process(side.envelopes()[-1:]))
        return batch

    runner.log.between_batch = read_then_deliver_the_next  # type: ignore[method-assign]
    (retried,) = runner.retry_parked()

    assert [outcome.held for outcome in delivered] == [1]
    assert (retried.applied, retried.parked) == (2, None)
    labels = side.row("SELECT labels FROM rm_cards WHERE card_id = %s", (card,))["labels"]
    assert sorted(labels) == ["after", "before"]
    assert not side.rows("SELECT 1 FROM projection_parked WHERE originator_id = %s", (card,))
