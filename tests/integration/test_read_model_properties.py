"""Properties of the read models under random command sequences, against real Postgres.

* Incremental = rebuild: whatever batches, duplicates and late deliveries the projectors are fed,
  their tables end up row for row what a rebuild from the event log writes into fresh tables.
* Billing adds up: every rollup is exactly the sum of the ledger entries under it, the ledger is
  exactly the charges less their corrections, and both match what the write side billed.

Each Hypothesis example works in a workspace of its own inside one database per test function.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar
from uuid import UUID

from hypothesis import example, given
from hypothesis import strategies as st
from hypothesis_profiles import expensive_property
from psycopg import sql
from read_side_helpers import (
    ReadSide,
    World,
    api_connection,
    append_log,
    correct,
    llm_call,
    squeeze,
)

from commands import models as m
from domain.errors import (
    AgentWorksError,
    BudgetExceeded,
    Conflict,
    InvalidTransition,
    ValidationFailed,
    WipLimitExceeded,
)
from domain.money import format_usd, round_up_to_increment
from projections import queries
from projections.billing import UsageDimension
from projections.rebuild import SCRATCH_SUFFIX, rebuild
from projections.registry import all_projectors

if TYPE_CHECKING:
    from collections.abc import Callable

    from domain.envelope import EventEnvelope
    from projections.base import Projector
    from projections.runner import ProjectionRunner

LANES = ["Todo", "Doing", "Done"]
EPOCH = datetime(2025, 1, 30, 12, 0, tzinfo=UTC)

index = st.integers(min_value=0, max_value=50)
words = st.text(alphabet="abcdefgh xyz-_./", min_size=1, max_size=24).filter(str.strip)

card_operations = st.one_of(
    st.tuples(st.just("create_card"), st.sampled_from(LANES), words),
    st.tuples(st.just("move"), index, st.sampled_from(LANES), st.booleans()),
    st.tuples(st.just("edit"), index, words),
    st.tuples(st.just("assign"), index, st.sampled_from([None, "bob", "carol"])),
    st.tuples(st.just("label"), index, st.sampled_from(["bug", "ui", "infra"]), st.booleans()),
    st.tuples(st.just("block"), index, st.booleans()),
    st.tuples(st.just("archive"), index, st.booleans()),
    st.tuples(st.just("wip"), st.sampled_from(LANES), st.sampled_from([None, 2, 5])),
    st.tuples(st.just("swap_lanes"), st.sampled_from(LANES), st.sampled_from(LANES)),
    st.tuples(
        st.just("plan"),
        st.sampled_from(["1", "1.5", "5"]),
        st.sampled_from(["0.01", "0.10", "0.25", "1"]),
    ),
)
run_operations = st.one_of(
    st.tuples(
        st.just("llm"),
        index,
        st.integers(min_value=0, max_value=3_000_000),
        st.integers(min_value=0, max_value=5_000),
        st.sampled_from([("simulated", "sim-small"), ("openai", "gpt-4o"), ("anthropic", "c3")]),
        st.integers(min_value=-1, max_value=70),  # days after EPOCH; -1: now
    ),
    st.tuples(st.just("correct"), index, st.integers(min_value=1, max_value=100), st.booleans()),
    st.tuples(
        st.just("log"),
        index,
        st.lists(words, min_size=1, max_size=4),
        st.sampled_from(["stdout", "stderr", "system"]),
    ),
    st.tuples(st.just("run"), index),
    st.tuples(st.just("finish"), index, st.sampled_from(["SUCCEEDED", "FAILED", "TIMED_OUT"])),
    st.tuples(st.just("cancel"), index, st.booleans()),
)
operations = st.one_of(run_operations, card_operations)
#: What one example does: enough operations to touch most projectors, few enough to stay fast.
scripts = st.lists(operations, min_size=6, max_size=40)
TestFunction = TypeVar("TestFunction", bound="Callable[..., None]")

#: A fixed example that touches every event type the projectors handle.
EVERYTHING_ONCE: list[tuple[Any, ...]] = [
    ("create_card", "Todo", "first"),
    ("create_card", "Doing", "second"),
    ("move", 0, "Doing", True),
    ("edit", 1, "second, renamed"),
    ("assign", 0, "bob"),
    ("label", 0, "bug", True),
    ("label", 0, "bug", False),
    ("block", 1, True),
    ("block", 1, False),
    ("wip", "Done", 2),
    ("swap_lanes", "Todo", "Doing"),
    ("move", 1, "Todo", False),
    ("plan", "1.5", "0.10"),
    ("log", 0, ["cloning", "building"], "stdout"),
    ("llm", 0, 1_234_567, 900, ("openai", "gpt-4o"), 3),
    ("llm", 0, 999, 10, ("simulated", "sim-small"), -1),
    ("llm", 0, 3_000_000, 4_000, ("anthropic", "c3"), 40),
    ("correct", 0, 50, False),
    ("correct", 0, 100, True),
    ("correct", 2, 10, True),
    ("log", 0, ["done"], "system"),
    ("finish", 0, "FAILED"),
    ("run", 1),
    ("cancel", 0, True),
    ("llm", 1, 42, 7, ("openai", "gpt-4o"), 3),
    ("finish", 0, "TIMED_OUT"),
    ("archive", 1, True),
    ("archive", 1, False),
]


def script_property(*, dev: int, ci: int) -> Callable[[TestFunction], TestFunction]:
    """A property of random operation scripts (``ops``) and delivery seeds (``seed``), the
    script that does everything once always among its examples."""

    def decorate(test: TestFunction) -> TestFunction:
        test = example(ops=EVERYTHING_ONCE, seed=7)(test)
        test = given(ops=scripts, seed=st.integers(0, 2**32))(test)
        return expensive_property(dev=dev, ci=ci)(test)

    return decorate


@dataclass
class Script:
    """What the commands of one example did, as the write side reported it."""

    world: World
    cards: list[UUID] = field(default_factory=list)
    archived: set[UUID] = field(default_factory=set)
    runs: dict[UUID, str] = field(default_factory=dict)
    """Run id → its status as far as this script knows."""
    charges: dict[UUID, int] = field(default_factory=dict)
    """Charge id → what is left of it to correct."""
    billed: int = 0
    members: set[str] = field(default_factory=set)
    """Users this script added (assignCard only takes members)."""
    corrected: int = 0
    lines: dict[UUID, int] = field(default_factory=lambda: defaultdict(int))


def _card(side: ReadSide, script: Script, i: int, *, live: bool = False) -> UUID:
    """Card number ``i`` (a live one if asked), made when there is none to pick."""
    candidates = [c for c in script.cards if not (live and c in script.archived)]
    if candidates:
        return candidates[i % len(candidates)]
    w = script.world
    card = side.app.create_card(m.CreateCard(project_id=w.project_id, title=f"card {i}"), w.owner)
    script.cards.append(card.id)
    return card.id


def _run(
    side: ReadSide, script: Script, i: int, *, status: str = "RUNNING", new: bool = False
) -> UUID:
    """A run in ``status`` (QUEUED or RUNNING), requested (and begun) when there is none."""
    candidates = [r for r, s in script.runs.items() if s == status]
    if candidates and not new:
        return candidates[i % len(candidates)]
    w = script.world
    card_id = _card(side, script, i, live=True)
    run_id = side.app.start_agent_run(m.StartAgentRun(card_id=card_id, agent="coder"), w.owner).id
    script.runs[run_id] = "QUEUED"
    if status == "RUNNING":
        side.app.begin_run(m.BeginRun(run_id=run_id, worker="w1"), w.orchestrator)
        script.runs[run_id] = "RUNNING"
    return run_id


#: What the rules may answer a random command with. Anything else (a missing aggregate, a
#: refused actor, an internal error, an arithmetic slip) is a bug and fails the property.
RULE_REFUSALS: tuple[type[AgentWorksError], ...] = (
    WipLimitExceeded,
    InvalidTransition,
    ValidationFailed,
    BudgetExceeded,
    Conflict,
)


def run_operation(side: ReadSide, script: Script, op: tuple[Any, ...]) -> None:
    """Run one random command; refusals by the rules are part of the game."""
    app, w = side.app, script.world
    owner, bot = w.owner, w.orchestrator
    kind, *args = op
    try:
        if kind == "create_card":
            lane, title = args
            card = app.create_card(
                m.CreateCard(project_id=w.project_id, title=title, lane=lane), owner
            )
            script.cards.append(card.id)
        elif kind == "move":
            i, lane, to_front = args
            card_id = _card(side, script, i)
            before = next((c for c in script.cards if c != card_id), None) if to_front else None
            app.move_card(m.MoveCard(card_id=card_id, to_lane=lane, before_card_id=before), owner)
        elif kind == "edit":
            i, title = args
            app.update_card(m.UpdateCard(card_id=_card(side, script, i), title=title), owner)
        elif kind == "assign":
            i, who = args
            if who is not None and who not in script.members:
                app.add_member(
                    m.AddMember(workspace_id=w.workspace_id, user_id=who, role="MEMBER"), owner
                )
                script.members.add(who)
            app.assign_card(m.AssignCard(card_id=_card(side, script, i), assignee=who), owner)
        elif kind == "label":
            i, label, add = args
            command = m.LabelCard if add else m.UnlabelCard
            getattr(app, "label_card" if add else "unlabel_card")(
                command(card_id=_card(side, script, i), label=label), owner
            )
        elif kind == "block":
            i, block = args
            card_id = _card(side, script, i)
            if block:
                app.block_card(m.BlockCard(card_id=card_id, reason="waiting"), owner)
            else:
                app.unblock_card(m.UnblockCard(card_id=card_id), owner)
        elif kind == "archive":
            i, archive = args
            card_id = _card(side, script, i)
            if archive:
                app.archive_card(m.ArchiveCard(card_id=card_id), owner)
                script.archived.add(card_id)
            else:
                app.restore_card(m.RestoreCard(card_id=card_id), owner)
                script.archived.discard(card_id)
        elif kind == "wip":
            lane, limit = args
            app.set_wip_limit(
                m.SetWipLimit(project_id=w.project_id, lane=lane, wip_limit=limit), owner
            )
        elif kind == "swap_lanes":
            # Two lanes trade names (three renames, one name reused): the board keeps its lane
            # names while their cards' rows must follow the renames in log order.
            first, second = args
            renames = [(first, "swapping"), (second, first), ("swapping", second)]
            for lane, name in renames if first != second else []:
                app.rename_lane(m.RenameLane(project_id=w.project_id, lane=lane, name=name), owner)
        elif kind == "plan":
            markup, increment = args
            app.set_plan(
                m.SetPlan(workspace_id=w.workspace_id, markup=markup, billing_increment=increment),
                w.operator,
            )
        elif kind == "run":
            (i,) = args
            _run(side, script, i, status="QUEUED", new=True)
        elif kind == "log":
            i, texts, stream = args
            run_id = _run(side, script, i)
            append_log(side, w, run_id, texts, stream=stream)
            script.lines[run_id] += len(texts)
        elif kind == "llm":
            i, cost, tokens, (provider, model), days = args
            run_id = _run(side, script, i)
            at = datetime.now(UTC) if days < 0 else EPOCH + timedelta(days=days, minutes=i)
            call = llm_call(
                side,
                w,
                run_id,
                f"call-{len(script.charges)}",
                cost=cost,
                at=at,
                provider=provider,
                model=model,
                input_tokens=tokens,
                output_tokens=tokens // 3,
            )
            script.charges[UUID(call.extra["charge_id"])] = call.extra["billed"]
            script.billed += call.extra["billed"]
        elif kind == "correct":
            i, percent, refund = args
            if not script.charges:
                return  # nothing charged yet, nothing to correct
            charge_id = list(script.charges)[i % len(script.charges)]
            amount = max(1, script.charges[charge_id] * percent // 100)
            correct(side, w, charge_id, format_usd(amount), refund=refund)
            script.charges[charge_id] -= amount
            script.corrected += amount
        elif kind == "finish":
            i, outcome = args
            run_id = _run(side, script, i)
            app.finish_run(
                m.FinishRun(run_id=run_id, outcome=outcome, error="boom", after_seconds=30), bot
            )
            script.runs[run_id] = outcome
        elif kind == "cancel":
            i, queued = args
            run_id = _run(side, script, i, status="QUEUED" if queued else "RUNNING")
            app.cancel_agent_run(m.CancelAgentRun(run_id=run_id), owner)
            script.runs[run_id] = "CANCELLED"
    except RULE_REFUSALS:
        pass  # a rule refused it (full lane, blocked card...): part of the game


# -- delivery --------------------------------------------------------------------------------------


def deliver(
    runner: ProjectionRunner,
    envelopes: list[EventEnvelope],
    rnd: random.Random,
    *,
    late: bool,
) -> None:
    """Feed ``envelopes`` in random batches with repeats and, if ``late``, some delivered late.

    A late envelope is moved further down the stream: a later event of its aggregate then finds
    the gap and heals it from the store, and the late copy arrives as a duplicate.
    """
    stream = list(envelopes)
    if late:
        for _ in range(len(stream) // 4):
            i = rnd.randrange(len(stream))
            stream.insert(rnd.randrange(i, len(stream)), stream.pop(i))
    delivered: list[EventEnvelope] = []
    while stream:
        size = rnd.randint(1, 8)
        batch, stream = stream[:size], stream[size:]
        if delivered and rnd.random() < 0.5:
            batch.insert(rnd.randrange(len(batch) + 1), rnd.choice(delivered))
        runner.process(batch)
        delivered.extend(batch)


# -- comparing tables ------------------------------------------------------------------------------


def table_rows(side: ReadSide, table: str) -> list[tuple[Any, ...]]:
    with side.pool.connection() as conn, conn.cursor() as cur:
        cur.execute(sql.SQL("SELECT * FROM {}").format(sql.Identifier(table)))
        assert cur.description is not None
        columns = [column.name for column in cur.description]
        rows = [tuple(row[c] for c in columns) for row in cur.fetchall()]
    return sorted(rows, key=repr)


def assert_rebuild_matches(side: ReadSide, projector: Projector) -> None:
    rebuild(projector, side.pool, side.log, swap=False)
    for table in projector.tables:
        live = table_rows(side, table)
        rebuilt = table_rows(side, table + SCRATCH_SUFFIX)
        assert live == rebuilt, f"{projector.name}: {table} differs from its rebuild"


# -- billing sums ----------------------------------------------------------------------------------

_LEDGER_BY_DIMENSION = """
SELECT l.day, d.dimension, d.key,
       count(*) FILTER (WHERE l.kind = 'CHARGE') AS calls,
       sum(l.input_tokens) AS input_tokens, sum(l.output_tokens) AS output_tokens,
       sum(l.provider_cost_micros) AS provider_cost_micros, sum(l.billed_micros) AS billed_micros
FROM rm_ledger_entries AS l
CROSS JOIN LATERAL (VALUES ('PROJECT', l.project_id::text), ('CARD', l.card_id::text),
    ('AGENT_RUN', l.run_id::text), ('PROVIDER', l.provider), ('MODEL', l.model),
    ('DAY', l.day::text)) AS d(dimension, key)
WHERE l.workspace_id = %s
GROUP BY l.day, d.dimension, d.key
ORDER BY l.day, d.dimension, d.key
"""


def assert_billing_adds_up(side: ReadSide, script: Script) -> None:
    ws = (script.world.workspace_id,)
    usage = side.rows(
        "SELECT day, dimension, key, calls, input_tokens, output_tokens, provider_cost_micros,"
        " billed_micros FROM rm_usage_daily WHERE workspace_id = %s ORDER BY day, dimension, key",
        ws,
    )
    assert usage == side.rows(_LEDGER_BY_DIMENSION, ws)

    assert side.rows(
        "SELECT month, project_id, billed_exact_micros FROM rm_statement_lines"
        " WHERE workspace_id = %s ORDER BY month, project_id",
        ws,
    ) == side.rows(
        "SELECT month, project_id, sum(billed_micros) AS billed_exact_micros"
        " FROM rm_ledger_entries WHERE workspace_id = %s GROUP BY month, project_id"
        " ORDER BY month, project_id",
        ws,
    )
    assert side.rows(
        "SELECT month, billed_micros FROM rm_monthly_spend WHERE workspace_id = %s ORDER BY month",
        ws,
    ) == side.rows(
        "SELECT month, sum(billed_micros) AS billed_micros FROM rm_ledger_entries"
        " WHERE workspace_id = %s GROUP BY month ORDER BY month",
        ws,
    )
    # Per charge: the ledger holds the charge and exactly its corrections.
    assert side.rows(
        "SELECT c.charge_id, c.billed_micros - c.credited_micros AS net"
        " FROM rm_charges AS c WHERE c.workspace_id = %s ORDER BY c.charge_id",
        ws,
    ) == side.rows(
        "SELECT charge_id, sum(billed_micros) AS net FROM rm_ledger_entries"
        " WHERE workspace_id = %s GROUP BY charge_id ORDER BY charge_id",
        ws,
    )
    # Runs show what their calls cost before any correction, as the charges do.
    assert side.rows(
        "SELECT run_id, llm_calls AS calls, input_tokens, provider_cost_micros, billed_micros"
        " FROM rm_runs WHERE workspace_id = %s AND llm_calls > 0 ORDER BY run_id",
        ws,
    ) == side.rows(
        "SELECT run_id, count(*) AS calls, sum(input_tokens) AS input_tokens,"
        " sum(provider_cost_micros) AS provider_cost_micros, sum(billed_micros) AS billed_micros"
        " FROM rm_charges WHERE workspace_id = %s GROUP BY run_id ORDER BY run_id",
        ws,
    )
    for run_id, lines in script.lines.items():
        assert side.row(
            "SELECT log_line_count, (SELECT count(*) FROM rm_log_lines WHERE run_id = %s) AS rows"
            " FROM rm_runs WHERE run_id = %s",
            (run_id, run_id),
        ) == {"log_line_count": lines, "rows": lines}

    # And the whole agrees with what the write side said it billed and corrected.
    net = script.billed - script.corrected
    total = side.row(
        "SELECT coalesce(sum(billed_micros), 0) AS billed FROM rm_ledger_entries"
        " WHERE workspace_id = %s",
        ws,
    )
    assert total == {"billed": net}
    with api_connection(side.database_url, script.world.workspace_id) as conn:
        everything = {"from_": EPOCH - timedelta(days=365), "to": datetime.now(UTC) + timedelta(2)}
        for dimension in UsageDimension:
            rows = queries.usage(conn, script.world.workspace_id, group_by=dimension, **everything)
            assert sum(row.billed_micros for row in rows) == net
            assert sum(row.calls for row in rows) == len(script.charges)
        months = {
            row["month"]
            for row in side.rows("SELECT month FROM rm_monthly_spend WHERE workspace_id = %s", ws)
        }
        spent = 0
        for month in months:
            statement = queries.statement(conn, script.world.workspace_id, month)
            increment = statement.billing_increment_micros
            for line in statement.lines:
                assert line.billed_micros == round_up_to_increment(
                    line.billed_exact_micros, increment
                )
                assert 0 <= line.billed_micros - line.billed_exact_micros < increment
            assert statement.total_micros == sum(line.billed_micros for line in statement.lines)
            spent += queries.month_to_date_spend(conn, script.world.workspace_id, month=month)
        assert spent == net


# -- the properties --------------------------------------------------------------------------------


@script_property(dev=20, ci=30)
def test_incremental_read_models_equal_a_rebuild_and_billing_adds_up(
    side: ReadSide, ops: list[tuple[Any, ...]], seed: int
) -> None:
    # Delivery draws from its own generator: how many draws it makes depends on how many events
    # the commands wrote, which Hypothesis must not mistake for a change in the example.
    rnd = random.Random(seed)
    script = Script(world=side.new_world(owner=f"owner-{seed}"))
    for op in ops:
        run_operation(side, script, op)

    for projector in all_projectors():
        runner = side.runner(projector)
        envelopes = side.envelopes(after=runner.position())
        # Every projector converges whatever the delivery order: Kanban's run data on cards
        # commutes with the card's own events.
        deliver(runner, envelopes, rnd, late=True)

    for projector in all_projectors():
        assert_rebuild_matches(side, projector)
    assert_billing_adds_up(side, script)


def test_read_models_after_a_re_spread_delivered_late_and_twice_equal_a_rebuild(
    side: ReadSide,
) -> None:
    """A re-spread's many events (a board move and a ``Card.Respread`` per re-keyed card, in one
    transaction), delivered in random batches with repeats and late copies, leave every read
    model as a rebuild from the log does."""
    world = side.new_world(owner="owner-respread")
    cards = [
        side.app.create_card(m.CreateCard(project_id=world.project_id, title=f"c{n}"), world.owner)
        for n in range(6)
    ]
    squeeze(side, world, "Todo", cards[1].id)
    assert side.position_of("Card.Respread") > 0, "no re-spread happened; the test tests nothing"
    rnd = random.Random(20261206)
    for projector in all_projectors():
        runner = side.runner(projector)
        deliver(runner, side.envelopes(after=runner.position()), rnd, late=True)
    for projector in all_projectors():
        assert_rebuild_matches(side, projector)
