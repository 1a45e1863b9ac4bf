"""Helpers for the fan-out tests (and ``bench/freshness.py``): workloads, processes, convergence.

* :class:`Workload` drives real commands through the write side: workspaces with members and
  plans, projects whose boards change, cards that are created, edited, moved, archived and
  restored, agent runs with log chunks, LLM calls (usage charges) and outcomes, and credits.
  :meth:`Workload.bulk_log_chunks` appends a large backlog fast (many events per transaction).
* :class:`Appender` keeps a workload running in a background thread while a fault happens.
* :class:`Service` is one ``agentworks`` subprocess (relay or worker) in its own process group,
  so SIGKILL reaches the process and any children; :class:`KafkaFanout` runs the relay and one
  worker per projector against a broker and a database, the way production runs them;
  :class:`EmbeddedPath` runs the in-process fan-out.
* :func:`wait_converged` waits until every projector has applied every version of every
  aggregate it follows; :func:`rebuild_differences` rebuilds every read model from scratch into
  ``<table>__rebuild`` tables and compares them with the live tables, row for row.

No pytest in here: the benchmark imports this module too.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast
from uuid import UUID

import pg
import psycopg
from board_helpers import read_log_to
from psycopg import sql

from adapters.eventlog import EventLog
from adapters.kafka_broker import LocalBroker
from adapters.postgres import PROJECTOR_ROLE, make_pool
from commands import models as m
from commands.access import (
    CreateApiKey,
    InviteMember,
    RevokeApiKey,
    RevokeInvitation,
    create_api_key,
    invite_member,
    revoke_api_key,
    revoke_invitation,
)
from commands.billing import Billing, GrantCredit
from commands.handlers import Actor
from domain.envelope import TOPICS
from domain.errors import AgentWorksError
from domain.meta import EventMeta
from infra.bootstrap import build_write_side
from projections.rebuild import REBUILD_BATCH_SIZE, SCRATCH_SUFFIX, rebuild
from projections.registry import all_projectors, projector_names
from projections.runner import ProjectionRunner
from streams.embedded import EmbeddedFanout
from streams.relay import headers_for, topic_for

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

    from psycopg import Connection
    from psycopg.rows import DictRow
    from psycopg_pool import ConnectionPool

    from adapters.eventstore import EventStoreRecorder
    from commands.handlers import AgentWorks
    from domain.envelope import EventEnvelope
    from projections.base import Projector

#: Per-process log files and faust's data directories go under the directory a fan-out runs in.
LANES = (("Todo", None), ("Doing", 4), ("Review", None), ("Done", None))


# == workload =====================================================================================


@dataclass
class Tenant:
    """What the workload knows about one workspace it drives."""

    workspace_id: UUID
    owner: Actor
    orchestrator: Actor
    projects: list[UUID] = field(default_factory=list)
    lanes: dict[UUID, list[str]] = field(default_factory=dict)
    cards: list[UUID] = field(default_factory=list)
    archived: list[UUID] = field(default_factory=list)
    running: list[UUID] = field(default_factory=list)
    charges: list[UUID] = field(default_factory=list)
    members: list[str] = field(default_factory=list)
    calls: int = 0


class Workload:
    """A realistic, seeded mix of commands; refused commands (a full lane...) are skipped."""

    def __init__(self, app: AgentWorks, *, seed: int = 7) -> None:
        self.app = app
        self.rng = random.Random(seed)
        self.commands = 0
        self.refused = 0

    # -- set-up ----------------------------------------------------------------------------------

    def tenant(self, name: str = "acme", *, projects: int = 2) -> Tenant:
        created = self.app.create_workspace(
            m.CreateWorkspace(name=f"{name} inc"), Actor(user_id=f"{name}-owner", workspace_id="*")
        )
        owner = Actor(user_id=f"{name}-owner", workspace_id=str(created.id))
        tenant = Tenant(created.id, owner, Actor.service("orchestrator", created.id))
        ws = created.id
        self._do(
            self.app.set_plan,
            m.SetPlan(workspace_id=ws, markup="4", billing_increment="0.10"),
            Actor.service("operator", ws),
        )
        self._do(
            self.app.set_spend_limit,
            m.SetSpendLimit(workspace_id=ws, monthly_limit="5000.00"),
            owner,
        )
        for user, role in ((f"{name}-dev", "MEMBER"), (f"{name}-lead", "ADMIN")):
            self._do(
                self.app.add_member, m.AddMember(workspace_id=ws, user_id=user, role=role), owner
            )
            tenant.members.append(user)
        for index in range(projects):
            result = self.app.create_project(
                m.CreateProject(
                    workspace_id=ws,
                    name=f"{name} project {index}",
                    lanes=[m.LaneInput(name=lane, wip_limit=limit) for lane, limit in LANES],
                ),
                owner,
            )
            tenant.projects.append(result.id)
            tenant.lanes[result.id] = [lane for lane, _ in LANES]
        self.commands += 3 + projects
        return tenant

    def card(self, tenant: Tenant, title: str = "a card", project: UUID | None = None) -> UUID:
        project_id = project or tenant.projects[0]
        card_id = self.app.create_card(
            m.CreateCard(project_id=project_id, title=title, description="details"), tenant.owner
        ).id
        tenant.cards.append(card_id)
        self.commands += 1
        return card_id

    def running_run(self, tenant: Tenant, card_id: UUID | None = None) -> UUID:
        card = card_id or self.card(tenant, "run me")
        run_id = self.app.start_agent_run(
            m.StartAgentRun(
                card_id=card, agent="coder", provider="simulated", model="sim-1", max_cost="50.00"
            ),
            tenant.owner,
        ).id
        self.app.begin_run(m.BeginRun(run_id=run_id, worker="worker-1"), tenant.orchestrator)
        tenant.running.append(run_id)
        self.commands += 2
        return run_id

    def llm_call(self, tenant: Tenant) -> None:
        """One provider call of one of the tenant's running runs (start one first), charged."""
        self._llm_call(tenant)

    # -- the mix ---------------------------------------------------------------------------------

    def mixed(self, tenant: Tenant, steps: int) -> None:
        """``steps`` commands drawn from the whole vocabulary, weighted like a busy board."""
        ops: list[tuple[int, Callable[[Tenant], object]]] = [
            (8, self._create_card),
            (10, self._move_card),
            (3, self._edit_card),
            (2, self._assign_card),
            (3, self._label_card),
            (1, self._block_card),
            (2, self._archive_card),
            (1, self._restore_card),
            (4, self._start_run),
            (8, self._log_chunk),
            (6, self._llm_call),
            (2, self._finish_run),
            (1, self._credit),
            (1, self._board_change),
            (1, self._workspace_change),
        ]
        weights = [w for w, _ in ops]
        for _ in range(steps):
            (_, op) = self.rng.choices(ops, weights)[0]
            self._do(op, tenant)

    def finale(self, tenant: Tenant) -> None:
        """Archive the second project, give out (and take back) API keys and invitations, and
        finish every open run: every terminal state shows."""
        self._access(tenant)
        if len(tenant.projects) > 1:
            self._do(
                self.app.archive_project,
                m.ArchiveProject(project_id=tenant.projects[-1]),
                tenant.owner,
            )
        self._do(
            Billing(self.app).grant_credit,
            GrantCredit(
                workspace_id=tenant.workspace_id,
                amount="2.50",
                reason="goodwill",
                at=datetime.now(UTC),
            ),
            tenant.owner,
        )
        outcomes = ["SUCCEEDED", "FAILED", "TIMED_OUT", "CANCELLED"]
        for index, run_id in enumerate(list(tenant.running)):
            outcome = outcomes[index % len(outcomes)]
            # A provider refused one attempt (no tokens, nothing charged): the attempts model.
            self._do(
                self.app.record_provider_attempt,
                m.RecordProviderAttempt(
                    run_id=run_id,
                    worker=self.app.repository.get(run_id).worker,
                    provider="simulated",
                    model="sim-1",
                    status="failed",
                    http_status=503,
                    error="overloaded",
                    latency_ms=self.rng.randint(5, 500),
                    input_tokens=0,
                    output_tokens=0,
                    started_at=datetime.now(UTC),
                ),
                tenant.orchestrator,
            )
            if outcome == "CANCELLED":
                self._do(
                    self.app.cancel_agent_run,
                    m.CancelAgentRun(run_id=run_id, reason="enough"),
                    tenant.owner,
                )
            else:
                self._do(
                    self.app.finish_run,
                    m.FinishRun(
                        run_id=run_id,
                        outcome=outcome,
                        error="boom",
                        after_seconds=30,
                        output=f"output of run {index}" if outcome == "SUCCEEDED" else None,
                    ),
                    tenant.orchestrator,
                )
        tenant.running.clear()

    def _access(self, tenant: Tenant) -> None:
        """Two API keys and two invitations, one of each revoked."""
        ws, owner = tenant.workspace_id, tenant.owner
        try:
            keys = [
                create_api_key(
                    self.app, CreateApiKey(workspace_id=ws, name=name, role="MEMBER"), owner
                )
                for name in ("ci", "deploy")
            ]
            invited = [
                invite_member(
                    self.app, InviteMember(workspace_id=ws, email=e, role="VIEWER"), owner
                )
                for e in ("one@example.test", "two@example.test")
            ]
        except AgentWorksError:
            self.refused += 1
            return
        self.commands += 4
        self._do(revoke_api_key, self.app, RevokeApiKey(api_key_id=keys[0].result.id), owner)
        revoke = RevokeInvitation(invitation_id=invited[0].result.id)
        self._do(revoke_invitation, self.app, revoke, owner)

    def bulk_log_chunks(self, tenant: Tenant, events: int, *, per_save: int = 500) -> int:
        """Append ``events`` log chunks (one line each) to one run, ``per_save`` per transaction.

        The fast way to a large backlog: one save of many events costs about what one command
        costs. Returns the id of nothing; the run stays running.
        """
        run_id = self.running_run(tenant)
        now = datetime.now(UTC)
        written = 0
        while written < events:
            run: Any = self.app.repository.get(run_id)
            meta = EventMeta.for_command(workspace_id=tenant.workspace_id, actor="orchestrator")
            for i in range(min(per_save, events - written)):
                run.append_log([(now, "stdout", f"bulk line {written + i}")], meta=meta)
            written += len(run.pending_events)
            self.app.save(run)
        return written

    # -- operations ------------------------------------------------------------------------------

    def _do(self, action: Callable[..., object], *args: Any) -> None:
        try:
            action(*args)
            self.commands += 1
        except AgentWorksError:
            self.refused += 1

    def _live_project(self, tenant: Tenant) -> UUID:
        return tenant.projects[0] if len(tenant.projects) == 1 else self.rng.choice(tenant.projects)

    def _a_card(self, tenant: Tenant) -> UUID | None:
        return self.rng.choice(tenant.cards) if tenant.cards else None

    def _create_card(self, tenant: Tenant) -> None:
        project = self._live_project(tenant)
        lane = self.rng.choice(tenant.lanes[project][:2])
        card_id = self.app.create_card(
            m.CreateCard(project_id=project, title=f"card {len(tenant.cards)}", lane=lane),
            tenant.owner,
        ).id
        tenant.cards.append(card_id)

    def _move_card(self, tenant: Tenant) -> None:
        card_id = self._a_card(tenant)
        if card_id is None:
            return
        card: Any = self.app.repository.get(card_id)
        lanes = [lane for lane in tenant.lanes[card.project_id] if lane != card.lane]
        neighbours = [c for c in tenant.cards if c != card_id]
        after = self.rng.choice(neighbours) if neighbours and self.rng.random() < 0.3 else None
        try:
            self.app.move_card(
                m.MoveCard(card_id=card_id, to_lane=self.rng.choice(lanes), after_card_id=after),
                tenant.owner,
            )
        except AgentWorksError:
            # The neighbour may sit in another lane: move without one.
            self.app.move_card(
                m.MoveCard(card_id=card_id, to_lane=self.rng.choice(lanes)), tenant.owner
            )

    def _edit_card(self, tenant: Tenant) -> None:
        if (card_id := self._a_card(tenant)) is not None:
            self.app.update_card(
                m.UpdateCard(
                    card_id=card_id,
                    title=f"edited {self.rng.randrange(1000)}",
                    description="more details",
                ),
                tenant.owner,
            )

    def _assign_card(self, tenant: Tenant) -> None:
        if (card_id := self._a_card(tenant)) is not None:
            who = self.rng.choice([*tenant.members, None])
            self.app.assign_card(m.AssignCard(card_id=card_id, assignee=who), tenant.owner)

    def _label_card(self, tenant: Tenant) -> None:
        if (card_id := self._a_card(tenant)) is not None:
            label = self.rng.choice(["bug", "ui", "backend", "p1"])
            if self.rng.random() < 0.7:
                self.app.label_card(m.LabelCard(card_id=card_id, label=label), tenant.owner)
            else:
                self.app.unlabel_card(m.UnlabelCard(card_id=card_id, label=label), tenant.owner)

    def _block_card(self, tenant: Tenant) -> None:
        if (card_id := self._a_card(tenant)) is not None:
            card: Any = self.app.repository.get(card_id)
            if getattr(card, "blocked_reason", None):
                self.app.unblock_card(m.UnblockCard(card_id=card_id), tenant.owner)
            else:
                self.app.block_card(m.BlockCard(card_id=card_id, reason="waiting"), tenant.owner)

    def _archive_card(self, tenant: Tenant) -> None:
        if (card_id := self._a_card(tenant)) is not None:
            self.app.archive_card(m.ArchiveCard(card_id=card_id), tenant.owner)
            tenant.cards.remove(card_id)
            tenant.archived.append(card_id)

    def _restore_card(self, tenant: Tenant) -> None:
        if tenant.archived:
            card_id = tenant.archived.pop(0)
            self.app.restore_card(m.RestoreCard(card_id=card_id), tenant.owner)
            tenant.cards.append(card_id)

    def _start_run(self, tenant: Tenant) -> None:
        if (card_id := self._a_card(tenant)) is not None:
            run_id = self.app.start_agent_run(
                m.StartAgentRun(card_id=card_id, agent=self.rng.choice(["coder", "reviewer"])),
                tenant.owner,
            ).id
            if self.rng.random() < 0.85:
                self.app.begin_run(m.BeginRun(run_id=run_id, worker="w1"), tenant.orchestrator)
                tenant.running.append(run_id)
                if self.rng.random() < 0.5:
                    self.app.start_run_step(
                        m.StartRunStep(run_id=run_id, step=1, name="plan"), tenant.orchestrator
                    )

    def _log_chunk(self, tenant: Tenant) -> None:
        if tenant.running:
            run_id = self.rng.choice(tenant.running)
            now = datetime.now(UTC)
            lines = [
                m.LogLineInput(
                    at=now,
                    stream=self.rng.choice(["stdout", "stderr"]),
                    text=f"step {i}: compiling module {self.rng.randrange(99)}",
                )
                for i in range(self.rng.randint(1, 6))
            ]
            self.app.append_run_log(m.AppendRunLog(run_id=run_id, lines=lines), tenant.orchestrator)

    def _llm_call(self, tenant: Tenant) -> None:
        if tenant.running:
            run_id = self.rng.choice(tenant.running)
            tenant.calls += 1
            result = self.app.record_llm_call(
                m.RecordLlmCall(
                    run_id=run_id,
                    call_id=f"call-{tenant.calls}",
                    provider="simulated",
                    model=self.rng.choice(["sim-small", "sim-large"]),
                    input_tokens=self.rng.randint(100, 4000),
                    output_tokens=self.rng.randint(10, 900),
                    latency_ms=self.rng.randint(50, 900),
                    provider_cost_micros=self.rng.randint(10, 40_000),
                    price_table_version="2025-01",
                    at=datetime.now(UTC),
                ),
                tenant.orchestrator,
            )
            tenant.charges.append(UUID(result.extra["charge_id"]))

    def _finish_run(self, tenant: Tenant) -> None:
        if tenant.running:
            run_id = tenant.running.pop(self.rng.randrange(len(tenant.running)))
            outcome = self.rng.choice(["SUCCEEDED", "SUCCEEDED", "FAILED"])
            self.app.finish_run(
                m.FinishRun(run_id=run_id, outcome=outcome, error="tests failed"),
                tenant.orchestrator,
            )

    def _credit(self, tenant: Tenant) -> None:
        if tenant.charges:
            charge_id = self.rng.choice(tenant.charges)
            refund = self.rng.random() < 0.3
            self.app.credit_charge(
                m.CreditCharge(
                    charge_id=charge_id,
                    amount="0.000010",
                    reason="goodwill",
                    refund=refund,
                    at=datetime.now(UTC),
                ),
                tenant.owner,
            )

    def _board_change(self, tenant: Tenant) -> None:
        project = tenant.projects[0]
        lanes = tenant.lanes[project]
        choice = self.rng.randrange(4)
        if choice == 0 and len(lanes) < 8:
            name = f"Lane {len(lanes)}"
            self.app.add_lane(
                m.AddLane(project_id=project, name=name, wip_limit=None, index=1), tenant.owner
            )
            lanes.insert(1, name)
        elif choice == 1:
            old = lanes[-1]
            new = f"{old}!"[:40]
            self.app.rename_lane(m.RenameLane(project_id=project, lane=old, name=new), tenant.owner)
            lanes[-1] = new
        elif choice == 2:
            lane = self.rng.choice(lanes)
            self.app.set_wip_limit(
                m.SetWipLimit(project_id=project, lane=lane, wip_limit=self.rng.choice([None, 9])),
                tenant.owner,
            )
        else:
            order = lanes[:]
            self.rng.shuffle(order)
            self.app.reorder_lanes(m.ReorderLanes(project_id=project, order=order), tenant.owner)
            lanes[:] = order

    def _workspace_change(self, tenant: Tenant) -> None:
        ws = tenant.workspace_id
        if self.rng.random() < 0.5:
            self.app.rename_workspace(
                m.RenameWorkspace(workspace_id=ws, name=f"renamed {self.rng.randrange(99)}"),
                tenant.owner,
            )
        else:
            user = self.rng.choice(tenant.members)
            role = self.rng.choice(["MEMBER", "VIEWER", "ADMIN"])
            self.app.change_role(
                m.ChangeRole(workspace_id=ws, user_id=user, role=role), tenant.owner
            )


class Appender:
    """A workload in a background thread, on a write side of its own, until :meth:`stop`."""

    def __init__(self, database_url: str, *, seed: int = 11, pause: float = 0.0) -> None:
        self.app = build_write_side(database_url, pool_size=2)
        self.workload = Workload(self.app, seed=seed)
        self.tenant = self.workload.tenant(f"bg{seed}", projects=1)
        self.pause = pause
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="appender", daemon=True)

    def __enter__(self) -> Appender:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self.workload.mixed(self.tenant, 5)
                if self.pause:
                    self._stop.wait(self.pause)
        except BaseException as error:  # noqa: BLE001 - any error, reported by stop()
            self.error = error

    def stop(self) -> int:
        """Stop, close the write side and return how many commands ran."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(30)
        self.workload.finale(self.tenant)
        self.app.close()
        if self.error is not None:
            raise RuntimeError("the background workload failed") from self.error
        return self.workload.commands


# == processes ====================================================================================


class Service:
    """One long-running subprocess in a process group of its own, logging to a file."""

    def __init__(self, name: str, argv: Sequence[str], *, env: dict[str, str], cwd: Path) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = env
        self.cwd = cwd
        self.log_path = cwd / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> Service:
        if self.running:
            return self
        self.starts += 1
        with self.log_path.open("ab") as log:
            log.write(f"\n=== start #{self.starts} {time.strftime('%X')} ===\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.argv,
                env=self.env,
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL, no goodbye: the process group, so spawned children die too."""
        self._signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(10)

    def pause(self) -> None:
        """SIGSTOP: the process stays, but neither works nor heartbeats (a stalled consumer)."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def terminate(self) -> None:
        """Ask for a clean exit (SIGTERM): the relay finishes its batch, a worker leaves its
        group. :meth:`stop` waits for it."""
        if self.running:
            self._signal(signal.SIGCONT)
            self._signal(signal.SIGTERM)

    def stop(self, grace: float = 15.0) -> int | None:
        """SIGTERM, SIGKILL after ``grace`` seconds; returns the exit code."""
        if self.proc is None:
            return None
        self.terminate()
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            self.proc.wait(10)
        # Children (of `agentworks worker` without --projector) may outlive their parent.
        self._signal(signal.SIGKILL)
        return self.proc.returncode

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""

    def _signal(self, signum: int) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signum)


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "infra.cli", *args]


class KafkaFanout:
    """The Kafka path as production runs it: ``agentworks relay`` and ``agentworks worker``
    processes against one database and one broker, each in its own process group.

    ``per_projector=True`` starts ``agentworks worker --projector NAME`` for each projector (so a
    test can kill one; ``projectors`` narrows them); otherwise one ``agentworks worker``, which
    spawns one process per projector.
    """

    def __init__(
        self,
        database_url: str,
        bootstrap: str,
        workdir: Path,
        *,
        topic_prefix: str = "",
        partitions: int = 3,
        per_projector: bool = True,
        log_level: str = "INFO",
        pool_size: int = 1,
        projectors: Sequence[str] | None = None,
        sweep_interval: float = 0,
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.database_url = database_url
        self.bootstrap = bootstrap
        self.workdir = workdir
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("AGENTWORKS_")},
            "AGENTWORKS_DATABASE_URL": database_url,
            "AGENTWORKS_KAFKA_BOOTSTRAP": bootstrap,
            "AGENTWORKS_TOPIC_PARTITIONS": str(partitions),
            "AGENTWORKS_TOPIC_PREFIX": topic_prefix,
            "AGENTWORKS_LOG_JSON": "false",
            "AGENTWORKS_LOG_LEVEL": log_level,
            # The event-store pool opens all of its connections up front; one (plus one of
            # overflow) is plenty for a relay or a worker, and Postgres (max_connections=100) is
            # shared with other test sessions and benchmarks.
            "AGENTWORKS_POOL_SIZE": str(pool_size),
            # Off unless a test asks: a sweep would hide a delivery the Kafka path failed.
            "AGENTWORKS_SWEEP_INTERVAL": str(sweep_interval),
            "PYTHONUNBUFFERED": "1",
        }
        self.topic_prefix = topic_prefix
        self.relay = Service("relay", cli("relay"), env=self.env, cwd=workdir)
        self.workers: dict[str, Service] = (
            {
                name: Service(
                    f"worker-{name}", cli("worker", "--projector", name), env=self.env, cwd=workdir
                )
                for name in projectors or projector_names()
            }
            if per_projector
            else {"all": Service("workers", cli("worker"), env=self.env, cwd=workdir)}
        )

    @property
    def services(self) -> list[Service]:
        return [self.relay, *self.workers.values()]

    def start(self) -> KafkaFanout:
        self.relay.start()
        for worker in self.workers.values():
            worker.start()
        return self

    def stop(self) -> None:
        """Stop every process (all asked at once, then each waited for), whatever happens."""
        errors: list[BaseException] = []
        for service in self.services:
            with contextlib.suppress(BaseException):
                service.terminate()
        for service in self.services:
            try:
                service.stop()
            except BaseException as error:  # noqa: BLE001 - stop them all, whatever happens to one
                errors.append(error)
        if errors:
            raise errors[0]

    def dead(self) -> list[str]:
        """Services that were started and have exited."""
        return [s.name for s in self.services if s.proc is not None and not s.running]

    def diagnostics(self) -> str:
        return "\n".join(f"--- {s.name} (log tail) ---\n{s.log_tail()}" for s in self.services)


class EmbeddedPath:
    """The in-process path: :class:`EmbeddedFanout` feeding every projector from the log."""

    def __init__(self, database_url: str) -> None:
        self.database_url = database_url
        self.reader = build_write_side(database_url, pool_size=2)
        recorder = cast("EventStoreRecorder", self.reader.recorder)
        self.log = EventLog(recorder, self.reader.mapper)
        self.pool = make_pool(database_url, role=PROJECTOR_ROLE, max_size=4)
        self.fanout = EmbeddedFanout(
            self.log,
            [ProjectionRunner(p, self.pool, self.log) for p in all_projectors()],
            listen_url=database_url,
            poll_interval=0.2,
        )

    def start(self) -> EmbeddedPath:
        self.fanout.start()
        return self

    def stop(self) -> None:
        try:
            self.fanout.stop()
        finally:
            self.pool.close()
            self.reader.close()

    def dead(self) -> list[str]:
        thread = self.fanout._thread  # a dead loop thread is a failure worth naming
        return ["embedded-fanout"] if thread is not None and not thread.is_alive() else []

    def diagnostics(self) -> str:
        return f"embedded fan-out positions: {self.fanout.positions()}"


class KafkaStack:
    """A broker of its own, the relay and one worker per projector, and a write side."""

    def __init__(
        self,
        database_url: str,
        broker: LocalBroker,
        workdir: Path,
        *,
        seed: int,
        converge_timeout: float = 120.0,
        sweep_interval: float = 0,
        partitions: int = 3,
    ) -> None:
        self.database_url = database_url
        self.broker = broker
        self.converge_timeout = converge_timeout
        self.fanout = KafkaFanout(
            database_url,
            broker.bootstrap,
            workdir,
            partitions=partitions,
            sweep_interval=sweep_interval,
        )
        self.app: AgentWorks = build_write_side(database_url, pool_size=2)
        self.workload = Workload(self.app, seed=seed)

    def converge(self, *, stall: float | None = None) -> float:
        return wait_converged(
            self.database_url, timeout=self.converge_timeout, path=self.fanout, stall=stall
        )

    def assert_equals_rebuild(self) -> None:
        """The test of record: converged, and every live table equals its rebuild."""
        self.converge()
        differences = rebuild_differences(self.database_url)
        assert differences == {}, "live read models differ from a rebuild from scratch"

    def rows(self, query: str, *params: object) -> list[tuple[Any, ...]]:
        with connect(self.database_url) as conn:
            return conn.execute(query, params).fetchall()

    def close(self) -> None:
        try:
            self.app.close()
        finally:
            try:
                self.fanout.stop()
            finally:
                self.broker.stop()


@contextlib.contextmanager
def kafka_stack(
    database_url: str, workdir: Path, *, seed: int, sweep_interval: float = 0, partitions: int = 3
) -> Iterator[KafkaStack]:
    """A :class:`KafkaStack` on a new :class:`LocalBroker`, all of it stopped on exit."""
    broker = LocalBroker()
    stack: KafkaStack | None = None
    try:
        broker.start()
        stack = KafkaStack(
            database_url,
            broker,
            workdir,
            seed=seed,
            sweep_interval=sweep_interval,
            partitions=partitions,
        )
        stack.fanout.start()
        yield stack
    finally:
        if stack is not None:
            stack.close()
        else:
            broker.stop()


# == convergence and the test of record ===========================================================


def _aggregate_of_topic() -> sql.Composable:
    # topic is "module:Aggregate.Event"; the aggregate is the qualname's first part.
    return sql.SQL("split_part(split_part(topic, ':', 2), '.', 1)")


def lag(database_url: str, projectors: Sequence[Projector] | None = None) -> dict[str, int]:
    """Per projector: how many followed aggregates its tracking has not brought to their
    latest stored version, plus one if its position is below the newest event it follows."""
    found: dict[str, int] = {}
    with connect(database_url) as conn:
        for projector in projectors or all_projectors():
            aggregates = sorted(projector.aggregates)
            query = sql.SQL(
                "WITH latest AS (SELECT originator_id, max(originator_version) AS version,"
                " max(notification_id) AS position FROM agentworks_events"
                " WHERE {agg} = ANY(%(aggs)s) GROUP BY originator_id)"
                " SELECT count(*) FILTER (WHERE v.version IS DISTINCT FROM latest.version),"
                " coalesce(max(latest.position), 0),"
                " (SELECT coalesce(max(position), 0) FROM projection_positions"
                "  WHERE projector = %(name)s)"
                " FROM latest LEFT JOIN projection_versions v"
                " ON v.projector = %(name)s AND v.originator_id = latest.originator_id"
            ).format(agg=_aggregate_of_topic())
            row = conn.execute(query, {"aggs": aggregates, "name": projector.name}).fetchone()
            assert row is not None
            behind, head, position = int(row[0]), int(row[1]), int(row[2])
            found[projector.name] = behind + (1 if position < head else 0)
    return found


def wait_converged(
    database_url: str,
    *,
    timeout: float,
    path: KafkaFanout | EmbeddedPath | None = None,
    stall: float | None = None,
    poll: float = 0.2,
) -> float:
    """Wait until every projector has applied everything in the store; returns seconds waited.

    Raises ``TimeoutError`` (with the lag and the processes' log tails) after ``timeout``
    seconds, or after ``stall`` seconds without any change in the lag, or at once when a
    process of ``path`` died.
    """
    started = time.monotonic()
    deadline = started + timeout
    last: dict[str, int] = {}
    changed_at = started
    while True:
        behind = lag(database_url)
        now = time.monotonic()
        if not any(behind.values()):
            return now - started
        if behind != last:
            last, changed_at = behind, now
        dead = path.dead() if path is not None else []
        stalled = stall is not None and now - changed_at > stall
        if dead or stalled or now > deadline:
            why = (
                f"died: {dead}"
                if dead
                else f"stalled for {stall:.0f}s"
                if stalled
                else f"not converged after {timeout:.0f}s"
            )
            details = path.diagnostics() if path is not None else ""
            raise TimeoutError(f"read models {why}; lag {behind}\n{details}")
        time.sleep(poll)


def primary_key(conn: Connection[Any], table: str) -> list[str]:
    rows = conn.execute(
        "SELECT a.attname FROM pg_index i"
        " JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)"
        " WHERE i.indrelid = %s::regclass AND i.indisprimary"
        " ORDER BY array_position(i.indkey::int2[], a.attnum)",
        (table,),
    ).fetchall()
    return [str(r[0]) for r in rows]


def table_rows(conn: Connection[Any], table: str, order_by: list[str]) -> list[tuple[Any, ...]]:
    query = sql.SQL("SELECT * FROM {} ORDER BY {}").format(
        sql.Identifier(table), sql.SQL(", ").join(sql.Identifier(c) for c in order_by)
    )
    return [tuple(row) for row in conn.execute(query).fetchall()]


@contextlib.contextmanager
def projector_side(
    database_url: str,
) -> Iterator[tuple[ConnectionPool[Connection[DictRow]], EventLog]]:
    app = build_write_side(database_url, pool_size=2)
    pool = make_pool(database_url, role=PROJECTOR_ROLE, max_size=2)
    try:
        yield pool, EventLog(cast("EventStoreRecorder", app.recorder), app.mapper)
    finally:
        pool.close()
        app.close()


def rebuild_differences(
    database_url: str, *, batch_size: int = REBUILD_BATCH_SIZE
) -> dict[str, str]:
    """Rebuild every projector from position 0 into ``<table>__rebuild`` and compare each live
    table with its rebuild, ``SELECT * ... ORDER BY <primary key>``; returns what differs
    (table → a description of the first differing rows), empty when all are equal."""
    differences: dict[str, str] = {}
    projectors = all_projectors()
    with projector_side(database_url) as (pool, event_log):
        for projector in projectors:
            rebuild(projector, pool, event_log, swap=False, batch_size=batch_size)
    with connect(database_url) as conn:
        for projector in projectors:
            for table in projector.tables:
                key = primary_key(conn, table)
                live = table_rows(conn, table, key)
                fresh = table_rows(conn, table + SCRATCH_SUFFIX, key)
                if live != fresh:
                    differences[table] = describe_difference(live, fresh, len(key))
    return differences


def describe_difference(
    live: list[tuple[Any, ...]], fresh: list[tuple[Any, ...]], key_len: int
) -> str:
    live_by_key = {row[:key_len]: row for row in live}
    fresh_by_key = {row[:key_len]: row for row in fresh}
    only_live = [k for k in live_by_key if k not in fresh_by_key]
    only_fresh = [k for k in fresh_by_key if k not in live_by_key]
    changed = [k for k in live_by_key if k in fresh_by_key and live_by_key[k] != fresh_by_key[k]]
    parts = [f"{len(live)} live rows vs {len(fresh)} rebuilt"]
    if only_live:
        parts.append(f"only live: {[live_by_key[k] for k in only_live[:3]]}")
    if only_fresh:
        parts.append(f"only rebuilt: {[fresh_by_key[k] for k in only_fresh[:3]]}")
    for k in changed[:3]:
        pairs = [
            (i, a, b)
            for i, (a, b) in enumerate(zip(live_by_key[k], fresh_by_key[k], strict=True))
            if a != b
        ]
        parts.append(f"key {k}: (column, live, rebuilt) {pairs}")
    if changed:
        parts.append(f"{len(changed)} rows differ")
    return "; ".join(parts)


# == talking to Kafka as the relay does ===========================================================


#: A run's line count as the runs read model keeps it, and how many lines it holds for the run.
LOG_LINE_COUNTS = (
    "SELECT log_line_count, (SELECT count(*) FROM rm_log_lines l WHERE l.run_id = r.run_id)"
    " FROM rm_runs r WHERE run_id = %s"
)


def envelopes_after(database_url: str, after: int, *, timeout: float = 30.0) -> list[EventEnvelope]:
    """Every event after position ``after`` up to the current head, as the relay reads them.

    The log holds an event back while an older transaction anywhere in the cluster is open, so
    this keeps reading until it reaches the head the table shows now.
    """
    target = head(database_url)
    with projector_side(database_url) as (_, event_log):
        return read_log_to(event_log, after, target, timeout=timeout)


def publish_envelopes(
    bootstrap: str, envelopes: Sequence[EventEnvelope], *, topic_prefix: str = ""
) -> None:
    """Publish ``envelopes`` with the relay's topic, key and headers, and wait for the acks."""
    from adapters.kafka import make_producer

    producer = make_producer(bootstrap, client_id="fanout-test")
    try:
        deliveries = [
            producer.send(
                topic_for(envelope, topic_prefix),
                value=envelope.to_bytes(),
                key=str(envelope.workspace_id or envelope.originator_id).encode(),
                headers=headers_for(envelope),
            )
            for envelope in envelopes
        ]
        producer.flush(timeout=30)
        for delivery in deliveries:
            delivery.get(timeout=30)
    finally:
        producer.close(timeout=5)


def published_positions(bootstrap: str, *, topic_prefix: str = "") -> set[int]:
    """The global positions of every record on the event topics, read from the beginning up to
    each partition's end offset (what the broker holds now, duplicates folded)."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    try:
        topics = {topic_prefix + topic for topic in (*TOPICS, "other-events")}
        partitions = [
            TopicPartition(topic, p)
            for topic in sorted(topics & consumer.topics())
            for p in consumer.partitions_for_topic(topic) or ()
        ]
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        ends = consumer.end_offsets(partitions)
        found: set[int] = set()
        deadline = time.monotonic() + 60
        while any(consumer.position(tp) < end for tp, end in ends.items()):
            if time.monotonic() > deadline:
                raise TimeoutError("the topics were not read to their end offsets within 60s")
            for records in consumer.poll(timeout_ms=500).values():
                found.update(int(dict(record.headers)["position"]) for record in records)
        return found
    finally:
        consumer.close()


def positions_in_store(database_url: str, *, after: int) -> set[int]:
    with connect(database_url) as conn:
        rows = conn.execute(
            "SELECT notification_id FROM agentworks_events WHERE notification_id > %s", (after,)
        ).fetchall()
    return {int(row[0]) for row in rows}


def healed_from_store(database_url: str) -> dict[str, int]:
    """Per projector, the events it applied from the store instead of from a delivery."""
    with connect(database_url) as conn:
        rows = conn.execute(
            "SELECT projector, healed FROM projection_positions WHERE projector NOT LIKE '%#%'"
        ).fetchall()
    return {str(name): int(count) for name, count in rows}


# == small database helpers =======================================================================


def connect(database_url: str, *, patience: float = 60.0) -> psycopg.Connection[Any]:
    """An autocommit superuser connection (row-level security does not hide rows from it).

    Postgres is shared with other test sessions and benchmarks; when they have taken every
    connection slot ("too many clients"), wait for one instead of failing the test.
    """
    deadline = time.monotonic() + patience
    while True:
        try:
            return psycopg.connect(database_url, autocommit=True)
        except psycopg.OperationalError as error:
            if "too many clients" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def rows(url: str, query: str, *params: object) -> list[tuple[Any, ...]]:
    """``query``'s rows, read past row-level security (:func:`connect`)."""
    with connect(url) as conn:
        return conn.execute(query, params).fetchall()


def parked(url: str, *columns: str) -> list[tuple[Any, ...]]:
    """The parked aggregates of the live projectors (not a rebuild's), by projector: projector,
    aggregate, version, event type, then ``columns``."""
    chosen = "".join(f", {column}" for column in columns)
    return rows(
        url,
        f"SELECT projector, originator_id, originator_version, event_type{chosen}"
        " FROM projection_parked WHERE projector NOT LIKE '%%#%%' ORDER BY projector",
    )


def scalar(database_url: str, query: str, params: Sequence[Any] = ()) -> Any:
    with connect(database_url) as conn:
        row = conn.execute(query, params).fetchone()
    return None if row is None else row[0]


def head(database_url: str) -> int:
    return pg.log_head(database_url)


def relay_position(database_url: str) -> int:
    return int(scalar(database_url, "SELECT coalesce(max(position), 0) FROM relay_positions"))


def record_relay_position(database_url: str, position: int) -> None:
    """As if the relay had published everything up to ``position``: an upsert, so it holds
    also for a relay that never recorded a position (it would start from 0 and publish all)."""
    with connect(database_url) as conn:
        conn.execute(
            "INSERT INTO relay_positions (relay, position) VALUES ('relay', %s) "
            "ON CONFLICT (relay) DO UPDATE SET position = EXCLUDED.position",
            (position,),
        )


def projector_position(database_url: str, projector: str) -> int:
    return int(
        scalar(
            database_url,
            "SELECT coalesce(max(position), 0) FROM projection_positions WHERE projector = %s",
            (projector,),
        )
    )


def wait_until(check: Callable[[], bool], *, timeout: float, what: str, poll: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f}s")
        time.sleep(poll)
