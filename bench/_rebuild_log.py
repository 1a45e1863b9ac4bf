"""A realistic AgentWorks event log, generated fast for the rebuild benchmark.

Events are real domain events: the aggregates in ``domain/`` decide them (boards admit and
position cards, runs check their lifecycle, charges carry the workspace's markup), and the
application's own mapper turns them into stored events, which go in with
``recorder.insert_events`` a few thousand at a time. The command handlers (loading, idempotency,
one transaction per command) are skipped: at a million events they would take an hour.

The work of many users and agents is interleaved: a few hundred card "lifecycles" are live at
any moment and the next command is taken from a random one, so a card's events are spread over
tens of thousands of log positions, as they are in production, and a rebuild batch touches
thousands of aggregates that earlier batches created.

A card's life: created on the backlog, assigned, labelled, sometimes edited or blocked, moved
lane by lane (2 events per move: the card and its board), worked on by one to three agent runs
while in progress (requested, started, steps, log chunks of ~20 lines, LLM calls that each record
the call on the run, a usage charge and the workspace's month-to-date spend), the odd credit or
refund on a charge, finished (mostly succeeded), and in a third of the cases archived at the end.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any
from uuid import UUID

from domain.agent_run import AgentRun
from domain.card import Card
from domain.meta import EventMeta
from domain.metering import LlmCall, charge_llm_call
from domain.money import billed_amount
from domain.project import LaneSpec, Project
from domain.roles import Role
from domain.usage import MonthlySpend, UsageCharge, month_of, spend_id_for
from domain.workspace import Workspace

if TYPE_CHECKING:
    from eventsourcing.domain import Aggregate
    from eventsourcing.persistence import StoredEvent

    from commands.handlers import AgentWorks

LANES = ("Backlog", "Todo", "In progress", "Review", "Done")
PROVIDERS = (
    ("openai", "gpt-4o", 2_500, 10_000),
    ("openai", "gpt-4o-mini", 150, 600),
    ("anthropic", "claude-sonnet", 3_000, 15_000),
    ("simulated", "sim-small", 10, 20),
)
AGENTS = ("ceo", "prd-writer", "architect", "coder", "reviewer")
STEPS = ("plan", "edit", "test", "review", "summarise")

_WORDS = (
    "src/agentworks/projections/kanban.py",
    "src/app/main.py",
    "tests/test_board.py",
    "module",
    "function",
    "class",
    "build",
    "compile",
    "lint",
    "format",
    "install",
    "resolve",
    "fetch",
    "clone",
    "pytest",
    "ruff",
    "mypy",
    "cargo",
    "npm",
    "node",
    "python",
    "uvicorn",
    "postgres",
    "kafka",
    "redis",
    "docker",
    "ok",
    "passed",
    "failed",
    "skipped",
    "warning",
    "error",
    "note",
    "info",
    "debug",
    "retry",
    "timeout",
    "cached",
    "collected",
    "items",
    "workers",
    "seconds",
    "bytes",
    "files",
    "changed",
    "insertions",
    "deletions",
)


def _line_pool(rnd: random.Random, size: int = 4096) -> list[str]:
    """Terminal-like lines: commands, progress, test results, compiler chatter."""
    shapes: list[Callable[[], str]] = [
        lambda: f"$ {rnd.choice(_WORDS)} {rnd.choice(_WORDS)} --{rnd.choice(_WORDS)}",
        lambda: (
            f"{rnd.choice(_WORDS)}:{rnd.randint(1, 900)}: {rnd.choice(_WORDS)} "
            f"{' '.join(rnd.choices(_WORDS, k=rnd.randint(3, 9)))}"
        ),
        lambda: f"collected {rnd.randint(1, 2000)} items / {rnd.randint(0, 40)} skipped",
        lambda: "." * rnd.randint(5, 60) + f" [{rnd.randint(0, 100):3d}%]",
        lambda: (
            f"[{rnd.randint(0, 59):02d}:{rnd.randint(0, 59):02d}] "
            + " ".join(rnd.choices(_WORDS, k=rnd.randint(4, 12)))
        ),
        lambda: (
            f"{rnd.randint(1, 40)} files changed, {rnd.randint(0, 900)} insertions(+), "
            f"{rnd.randint(0, 400)} deletions(-)"
        ),
    ]
    return [rnd.choice(shapes)() for _ in range(size)]


@dataclass
class _Tenant:
    workspace: Workspace
    projects: list[Project]
    users: list[str]
    markup: Decimal
    spends: dict[str, MonthlySpend] = field(default_factory=dict)
    charges: list[UsageCharge] = field(default_factory=list)


@dataclass
class LogStats:
    events: int = 0
    by_type: dict[str, int] = field(default_factory=dict)
    workspaces: int = 0
    projects: int = 0
    cards: int = 0
    runs: int = 0
    log_chunks: int = 0
    log_lines: int = 0
    charges: int = 0
    corrections: int = 0
    stored_bytes: int = 0


class LogGenerator:
    """Yields groups of aggregates changed together (one "command" each), interleaved."""

    #: Projects (boards) each new workspace gets.
    projects_per_tenant = 3

    def __init__(self, seed: int = 7, *, concurrent_cards: int = 400) -> None:
        self.rnd = random.Random(seed)
        self.lines = _line_pool(self.rnd)
        self.concurrent_cards = concurrent_cards
        self.tenants: list[_Tenant] = []
        self.now = datetime.now(UTC).replace(microsecond=0)
        self.stats = LogStats()
        self._ids = 0

    # -- ids and metadata -----------------------------------------------------------------------

    def _uuid(self) -> UUID:
        return UUID(int=self.rnd.getrandbits(128), version=4)

    def _meta(
        self, tenant: _Tenant | None, actor: str, workspace_id: UUID | None = None
    ) -> EventMeta:
        if workspace_id is None:
            assert tenant is not None
            workspace_id = tenant.workspace.id
        return EventMeta.for_command(
            workspace_id=workspace_id, actor=actor, command_id=self._uuid()
        )

    def _user_id(self, number: int) -> str:
        return f"user-{number}"

    # -- tenants --------------------------------------------------------------------------------

    def _new_tenant(self) -> Iterator[list[Aggregate]]:
        rnd = self.rnd
        ws_id = self._uuid()
        owner = self._user_id(len(self.tenants) * 10)
        meta = self._meta(None, owner, ws_id)
        workspace = Workspace.create(
            workspace_id=ws_id, name=f"Workspace {len(self.tenants)}", owner_id=owner, meta=meta
        )
        users = [owner]
        for i, role in enumerate((Role.ADMIN, Role.MEMBER, Role.MEMBER, Role.VIEWER)):
            user = self._user_id(len(self.tenants) * 10 + i + 1)
            workspace.add_member(user, role, meta=meta)
            users.append(user)
        markup = Decimal(rnd.choice(("5", "5", "3.5", "4.25")))
        workspace.set_plan(markup=markup, billing_increment_micros=250_000, meta=meta)
        if rnd.random() < 0.5:
            workspace.set_spend_limit(500_000_000_000, meta=meta)
        projects = []
        for p in range(self.projects_per_tenant):
            project = Project.create(
                project_id=self._uuid(),
                workspace_id=ws_id,
                name=f"Project {p}",
                lanes=[LaneSpec(lane) for lane in LANES],
                meta=self._meta(None, owner, ws_id),
            )
            projects.append(project)
        tenant = _Tenant(workspace, projects, users, markup)
        self._created(tenant)
        self.tenants.append(tenant)
        self.stats.workspaces += 1
        self.stats.projects += len(projects)
        yield [workspace, *projects]

    def _created(self, tenant: _Tenant) -> None:
        """Called for each new workspace before its first event is stored."""

    # -- one card's life --------------------------------------------------------------------------

    def _card_life(self, tenant: _Tenant) -> Iterator[list[Aggregate]]:
        rnd = self.rnd
        project = rnd.choice(tenant.projects)
        user = rnd.choice(tenant.users[:4])
        meta = self._meta(tenant, user)
        card_id = self._uuid()
        position = project.place_card(card_id, "Backlog", meta=meta).position
        card = Card.create(
            card_id=card_id,
            workspace_id=tenant.workspace.id,
            project_id=project.id,
            title=f"Card {self.stats.cards}: " + " ".join(rnd.choices(_WORDS, k=4)),
            description=" ".join(rnd.choices(_WORDS, k=rnd.randint(5, 40))),
            lane="Backlog",
            position=position,
            meta=meta,
        )
        self.stats.cards += 1
        yield [card, project]

        card.assign(rnd.choice(tenant.users[:4]), meta=self._meta(tenant, user))
        yield [card]
        for label in rnd.sample(("bug", "feature", "ui", "infra", "docs"), rnd.randint(1, 2)):
            card.label(label, meta=self._meta(tenant, user))
            yield [card]
        if rnd.random() < 0.3:
            card.edit(title=card.title + " (v2)", description=None, meta=self._meta(tenant, user))
            yield [card]

        def move(to: str) -> list[Aggregate]:
            meta = self._meta(tenant, user)
            from_lane = project.lane_of(card.id)
            position = project.move_card(card.id, to, meta=meta).position
            card.move(to, position, from_lane=from_lane, meta=meta)
            return [card, project]

        yield move("Todo")
        if rnd.random() < 0.2:
            yield move("Todo")  # reordered within the lane
        yield move("In progress")
        if rnd.random() < 0.1:
            card.block("waiting for review capacity", meta=self._meta(tenant, user))
            yield [card]
            card.unblock(meta=self._meta(tenant, user))
            yield [card]
        for round_ in range(rnd.choice((1, 1, 2, 3))):
            yield from self._run(tenant, project, card)
            yield move("Review")
            if round_ < 2 and rnd.random() < 0.3:
                yield move("In progress")
        if project.lane_of(card.id) != "Review":
            yield move("Review")
        yield move("Done")
        if rnd.random() < 0.33:
            meta = self._meta(tenant, user)
            project.lift_card(card.id, meta=meta)
            card.archive(meta=meta)
            yield [card, project]

    def _run(self, tenant: _Tenant, project: Project, card: Card) -> Iterator[list[Aggregate]]:
        rnd = self.rnd
        bot = f"agent:{rnd.choice(AGENTS)}"
        provider, model, in_price, out_price = rnd.choice(PROVIDERS)
        run = AgentRun.request(
            run_id=self._uuid(),
            workspace_id=tenant.workspace.id,
            project_id=project.id,
            card_id=card.id,
            agent=bot.split(":", 1)[1],
            provider=provider if rnd.random() < 0.5 else None,
            model=model if rnd.random() < 0.5 else None,
            max_cost_micros=rnd.choice((None, 50_000_000)),
            meta=self._meta(tenant, rnd.choice(tenant.users[:3])),
        )
        self.stats.runs += 1
        yield [run]
        run.start(worker=f"worker-{rnd.randint(1, 8)}", meta=self._meta(tenant, "orchestrator"))
        yield [run]
        for step in range(1, 4):
            run.start_step(step, rnd.choice(STEPS), meta=self._meta(tenant, bot))
            yield [run]
            for _ in range(2):
                n = rnd.randint(15, 25)
                at = datetime.now(UTC)
                lines = [(at, rnd.choice(("stdout", "stdout", "stderr")), t)
                         for t in rnd.choices(self.lines, k=n)]  # fmt: skip
                run.append_log(lines, meta=self._meta(tenant, bot))
                self.stats.log_chunks += 1
                self.stats.log_lines += n
                yield [run]
            yield self._llm_call(tenant, run, provider, model, in_price, out_price)
        if rnd.random() < 0.05 and tenant.charges:
            charge = rnd.choice(tenant.charges[-50:])
            amount = max(1, charge.net_micros // 4)
            if charge.net_micros >= amount:
                # A correction follows its charge (``UsageCharge.correct`` refuses one before).
                at = max(self._charge_time(), charge.modified_on)
                meta = self._meta(tenant, tenant.users[0])
                if rnd.random() < 0.5:
                    charge.correct(amount, "goodwill credit", refund=False, at=at, meta=meta)
                else:
                    charge.correct(amount, "refund after review", refund=True, at=at, meta=meta)
                self.stats.corrections += 1
                yield [charge]
        outcome = rnd.random()
        meta = self._meta(tenant, "orchestrator")
        if outcome < 0.9:
            run.succeed(meta=meta)
        elif outcome < 0.98:
            run.fail("tests failed: 3 errors in tests/test_board.py", meta=meta)
        else:
            run.time_out(900, meta=meta)
        yield [run]

    def _charge_time(self) -> datetime:
        """Charges land on days over the last ~3 months, so rollups have many days and months."""
        return self.now - timedelta(minutes=self.rnd.randint(0, 90 * 24 * 60))

    def _llm_call(
        self,
        tenant: _Tenant,
        run: AgentRun,
        provider: str,
        model: str,
        in_price: int,
        out_price: int,
    ) -> list[Aggregate]:
        rnd = self.rnd
        meta = self._meta(tenant, "orchestrator")
        input_tokens = rnd.randint(500, 20_000)
        output_tokens = rnd.randint(50, 4_000)
        cost = (input_tokens * in_price + output_tokens * out_price) // 1_000
        billed = billed_amount(cost, tenant.markup)
        at = self._charge_time()
        month = month_of(at)
        spend = tenant.spends.get(month)
        if spend is None:
            spend = MonthlySpend.open(workspace_id=tenant.workspace.id, month=month, meta=meta)
            assert spend.id == spend_id_for(tenant.workspace.id, month)
            tenant.spends[month] = spend
        call = LlmCall(
            call_id=f"call-{self.stats.charges}",
            provider=provider,
            model=model,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            latency_ms=rnd.randint(200, 9_000),
            provider_cost_micros=cost,
            billed_micros=billed,
            price_table_version="2025-01",
            at=at,
        )
        charge = charge_llm_call(run, tenant.workspace, spend, call, meta=meta)
        tenant.charges.append(charge)
        if len(tenant.charges) > 200:
            del tenant.charges[:100]
        self.stats.charges += 1
        return [run, charge, spend]

    # -- the interleaved stream -------------------------------------------------------------------

    def groups(self, cards_per_tenant: int = 600) -> Iterator[list[Aggregate]]:
        """Endless: groups of aggregates with new events, a few hundred card lives interleaved."""
        live: list[Iterator[list[Aggregate]]] = []
        cards_started = 0
        while True:
            if not self.tenants or cards_started >= cards_per_tenant * len(self.tenants):
                yield from self._new_tenant()
            while len(live) < self.concurrent_cards:
                tenant = (
                    self.tenants[-1] if self.rnd.random() < 0.7 else self.rnd.choice(self.tenants)
                )
                live.append(self._card_life(tenant))
                cards_started += 1
            i = self.rnd.randrange(len(live))
            try:
                yield next(live[i])
            except StopIteration:
                live[i] = live[-1]
                live.pop()


def generate(
    app: AgentWorks,
    events: int,
    *,
    seed: int = 7,
    chunk: int = 5_000,
    progress: Callable[[int], None] | None = None,
    generator: LogGenerator | None = None,
) -> LogStats:
    """Append about ``events`` events (whole commands only, so a few more) to ``app``'s store,
    or fewer when ``generator``'s groups run out first."""
    generator = generator or LogGenerator(seed)
    stats = generator.stats
    to_stored = app.mapper.to_stored_event
    pending: list[StoredEvent] = []
    by_type: dict[str, int] = {}
    for group in generator.groups():
        for aggregate in group:
            for event in aggregate.collect_events():
                stored = to_stored(event)
                pending.append(stored)
                name = type(event).__qualname__
                by_type[name] = by_type.get(name, 0) + 1
                stats.stored_bytes += len(stored.state)
        if len(pending) >= chunk:
            app.recorder.insert_events(pending)
            stats.events += len(pending)
            pending = []
            if progress is not None:
                progress(stats.events)
            if stats.events >= events:
                break
    if pending:
        app.recorder.insert_events(pending)
        stats.events += len(pending)
    stats.by_type = dict(sorted(by_type.items(), key=lambda kv: -kv[1]))
    return stats


def describe(stats: LogStats) -> dict[str, Any]:
    return {
        "events": stats.events,
        "workspaces": stats.workspaces,
        "projects": stats.projects,
        "cards": stats.cards,
        "runs": stats.runs,
        "log_chunks": stats.log_chunks,
        "log_lines": stats.log_lines,
        "charges": stats.charges,
        "corrections": stats.corrections,
        "stored_mb": round(stats.stored_bytes / 1e6, 1),
        "by_type": stats.by_type,
    }
