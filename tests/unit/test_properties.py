"""Property tests of the write side: fold determinism, the board invariants, exact money.

(a) Folding an aggregate's events from nothing reproduces the live aggregate exactly, both from the
    event objects themselves and after a round trip through the stored (JSON) representation.
(b) Under any sequence of card commands sent through the handlers, no lane ever exceeds its WIP
    limit, positions in a lane are unique and strictly increasing, and the board and the cards
    agree on where every live card is. Refused commands write nothing.
(c) On the charge path every billed amount is exactly ``billed_amount(cost, markup)``, the month's
    spend is the exact integer sum of the charges, and no float is stored anywhere.
"""

from __future__ import annotations

import copy
import json
import random
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import cache
from typing import Any
from uuid import UUID

from aw_builders import (
    World,
    meta,
    new_app,
    position_of_log,
    state_of,
    stored_events,
    walk,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from commands import models as m
from domain.agent_run import AgentRun
from domain.card import Card
from domain.errors import AgentWorksError
from domain.money import billed_amount
from domain.positions import is_valid_position
from domain.project import LaneSpec, Project
from domain.roles import Role
from domain.usage import MonthlySpend, UsageCharge, month_of, spend_id_for
from domain.workspace import Workspace

SETTINGS = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
T0 = datetime(2025, 5, 1, 12, 0, tzinfo=UTC)
WS = UUID(int=0xA)


@cache
def mapper() -> Any:
    """The application's mapper: domain event <-> stored (JSON) event."""
    return new_app().mapper


Op = tuple[Any, ...]


def apply_ops(aggregate: Any, ops: list[Op], step: Callable[[Any, Op], None]) -> int:
    """Apply each op; a refused op must leave the aggregate exactly as it was."""
    refused = 0
    for op in ops:
        before = copy.deepcopy(state_of(aggregate))
        pending = len(aggregate.pending_events)
        try:
            step(aggregate, op)
        except AgentWorksError:
            refused += 1
            assert state_of(aggregate) == before, f"refused {op} changed the aggregate"
            assert len(aggregate.pending_events) == pending
    return refused


def assert_fold_reproduces(aggregate: Any) -> None:
    events = aggregate.collect_events()
    assert [e.originator_version for e in events] == list(range(1, aggregate.version + 1))
    folded: Any = None
    for event in events:
        folded = event.mutate(folded)
    assert state_of(folded) == state_of(aggregate)
    assert folded == aggregate

    replayed: Any = None
    for event in events:
        decoded: Any = mapper().to_domain_event(mapper().to_stored_event(event))
        replayed = decoded.mutate(replayed)
    assert state_of(replayed) == state_of(aggregate)


# -- (a) fold determinism ---------------------------------------------------------------------

USERS = ["alice", "bob", "carol", " dave "]
ROLES = list(Role)

workspace_ops = st.lists(
    st.one_of(
        st.tuples(st.just("rename"), st.sampled_from(["Acme", "  Beta ", "", "Gamma"])),
        st.tuples(st.just("add"), st.sampled_from(USERS), st.sampled_from(ROLES)),
        st.tuples(st.just("change"), st.sampled_from(USERS), st.sampled_from(ROLES)),
        st.tuples(st.just("remove"), st.sampled_from(USERS)),
        st.tuples(
            st.just("plan"),
            st.integers(-2, 10**7).map(lambda n: Decimal(n).scaleb(-6)),
            st.sampled_from([-1, 0, 1, 250_000]),
        ),
        st.tuples(st.just("limit"), st.none() | st.integers(-5, 10**9)),
        st.tuples(st.just("stripe"), st.sampled_from(["cus_1", "cus_2", " "])),
    ),
    max_size=25,
)


def workspace_step(ws: Workspace, op: Op) -> None:
    mt = meta(ws.id)
    match op:
        case ("rename", name):
            ws.rename(name, meta=mt)
        case ("add", user, role):
            ws.add_member(user, role, meta=mt)
        case ("change", user, role):
            ws.change_role(user, role, meta=mt)
        case ("remove", user):
            ws.remove_member(user, meta=mt)
        case ("plan", markup, increment):
            ws.set_plan(markup=markup, billing_increment_micros=increment, meta=mt)
        case ("limit", limit):
            ws.set_spend_limit(limit, meta=mt)
        case ("stripe", customer):
            ws.link_stripe_customer(customer, meta=mt)


@SETTINGS
@given(workspace_ops)
def test_folding_workspace_events_reproduces_the_workspace(ops: list[Op]) -> None:
    ws = Workspace.create(workspace_id=WS, name="Acme", owner_id="alice", meta=meta(WS))
    apply_ops(ws, ops, workspace_step)
    assert Role.OWNER in ws.members.values()
    assert_fold_reproduces(ws)


# known lanes are drawn more often than a lane that may not exist or an untrimmed name
LANE_NAMES = ["Todo", "Doing", "Done", "Todo", "Doing", "Done", "QA", " Todo "]
CARD_IDS = [UUID(int=i + 1) for i in range(5)]
card_ix = st.integers(0, len(CARD_IDS) - 1)
lane = st.sampled_from(LANE_NAMES)
# Where to put a card, resolved against the target lane as it is when the command is sent:
# "end" (no neighbours), "slot" k (between the (k-1)th and kth card), "after"/"before" card k
# only, or "any" two arbitrary cards (usually not adjacent or not in the lane: a Conflict).
spot = st.tuples(
    st.sampled_from(["end", "slot", "slot", "after", "before", "any"]), st.integers(0, 99)
)


def neighbours(
    order: list[UUID], pool: list[UUID], where: tuple[str, int]
) -> tuple[UUID | None, UUID | None]:
    """(after, before) for a move into a lane whose other cards are ``order``."""
    mode, k = where
    if mode == "end" or (not order and mode != "any"):
        return None, None
    if mode == "slot":
        i = k % (len(order) + 1)
        return (order[i - 1] if i else None), (order[i] if i < len(order) else None)
    if mode == "after":
        return order[k % len(order)], None
    if mode == "before":
        return None, order[k % len(order)]
    return pool[k % len(pool)], pool[(k // len(pool)) % len(pool)]


def assert_between(order: list[UUID], card: UUID, after: UUID | None, before: UUID | None) -> None:
    """The card landed exactly where it was asked to go."""
    at = order.index(card)
    if after is not None:
        assert order[at - 1 : at] == [after], f"{card} is not right after {after}: {order}"
    if before is not None:
        assert order[at + 1 : at + 2] == [before], f"{card} is not right before {before}: {order}"
    if after is None and before is None:
        assert at == len(order) - 1, f"{card} did not go to the end: {order}"


project_ops = st.lists(
    st.one_of(
        st.tuples(st.just("place"), card_ix, lane, spot),
        st.tuples(st.just("place"), card_ix, lane, spot),
        st.tuples(st.just("move"), card_ix, lane, spot),
        st.tuples(st.just("move"), card_ix, lane, spot),
        st.tuples(st.just("lift"), card_ix),
        st.tuples(st.just("wip"), lane, st.none() | st.integers(0, 4)),
        st.tuples(
            st.just("add_lane"), lane, st.none() | st.integers(0, 3), st.none() | st.integers(-1, 6)
        ),
        st.tuples(st.just("rename_lane"), lane, lane),
        st.tuples(st.just("reorder"), st.integers(0, 2**16), st.booleans()),
        st.tuples(st.just("remove_lane"), lane),
        st.tuples(st.just("rename"), st.sampled_from(["Rocket", "Moon", " "])),
        # archiving ends every other change, so it happens for one draw in ten
        st.tuples(st.just("archive"), st.integers(0, 9)),
    ),
    min_size=5,
    max_size=40,
)


def project_step(project: Project, op: Op) -> None:
    mt = meta(project.workspace_id)
    match op:
        case ("place" | "move" as kind, c, lane_name, where):
            card = CARD_IDS[c]
            order = [cid for _, cid in project.cards_in(lane_name) if cid != card]
            after, before = neighbours(order, CARD_IDS, where)
            act = project.place_card if kind == "place" else project.move_card
            act(card, lane_name, after_card_id=after, before_card_id=before, meta=mt)
            assert_between([cid for _, cid in project.cards_in(lane_name)], card, after, before)
        case ("lift", c):
            project.lift_card(CARD_IDS[c], meta=mt)
        case ("wip", lane_name, limit):
            project.set_wip_limit(lane_name, limit, meta=mt)
        case ("add_lane", name, limit, index):
            project.add_lane(name, wip_limit=limit, index=index, meta=mt)
        case ("rename_lane", old, new):
            project.rename_lane(old, new, meta=mt)
        case ("reorder", seed, drop_one):
            lane_order = [spec.name for spec in project.lanes]
            random.Random(seed).shuffle(lane_order)
            project.reorder_lanes(lane_order[1:] if drop_one else lane_order, meta=mt)
        case ("remove_lane", name):
            project.remove_lane(name, meta=mt)
        case ("rename", name):
            project.rename(name, meta=mt)
        case ("archive", draw):
            if draw == 0:
                project.archive(meta=mt)


def assert_board_invariants(project: Project) -> None:
    names = [spec.name for spec in project.lanes]
    assert len(set(names)) == len(names)
    for spec in project.lanes:
        positions = [position for position, _ in project.cards_in(spec.name)]
        assert positions == sorted(set(positions)), f"lane {spec.name} positions {positions}"
        assert all(is_valid_position(p) for p in positions)
        if spec.wip_limit is not None:
            assert project.count(spec.name) <= spec.wip_limit
    assert {p.lane for p in project.placements.values()} <= set(names)


@SETTINGS
@given(project_ops)
def test_folding_project_events_reproduces_the_board(ops: list[Op]) -> None:
    project = Project.create(
        project_id=UUID(int=0xB),
        workspace_id=WS,
        name="Rocket",
        lanes=[LaneSpec("Todo"), LaneSpec("Doing", 2), LaneSpec("Done")],
        meta=meta(WS),
    )
    for card_id in CARD_IDS[:3]:
        project.place_card(card_id, "Todo", meta=meta(WS))

    def step(project: Project, op: Op) -> None:
        project_step(project, op)
        assert_board_invariants(project)

    apply_ops(project, ops, step)
    assert_fold_reproduces(project)


card_ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("edit"),
            st.none() | st.sampled_from(["T", " ", "New"]),
            st.none() | st.text(max_size=5),
        ),
        st.tuples(st.just("move"), lane, st.sampled_from(["V1", "V2", "V1V"])),
        st.tuples(st.just("assign"), st.none() | st.sampled_from([*USERS, " "])),
        st.tuples(st.just("label"), st.sampled_from(["api", " ux ", "", "db"])),
        st.tuples(st.just("unlabel"), st.sampled_from(["api", "ux", "db"])),
        st.tuples(st.just("block"), st.sampled_from(["waiting", "  "])),
        st.tuples(st.just("unblock")),
        st.tuples(st.just("archive")),
        st.tuples(st.just("restore"), lane, st.sampled_from(["V3", "V4"])),
    ),
    max_size=30,
)


def card_step(card: Card, op: Op) -> None:
    mt = meta(card.workspace_id)
    match op:
        case ("edit", title, description):
            card.edit(title=title, description=description, meta=mt)
        case ("move", lane_name, position):
            card.move(lane_name, position, meta=mt)
        case ("assign", who):
            card.assign(who, meta=mt)
        case ("label", text):
            card.label(text, meta=mt)
        case ("unlabel", text):
            card.unlabel(text, meta=mt)
        case ("block", reason):
            card.block(reason, meta=mt)
        case ("unblock",):
            card.unblock(meta=mt)
        case ("archive",):
            card.archive(meta=mt)
        case ("restore", lane_name, position):
            card.restore(lane_name, position, from_lane=None, meta=mt)


@SETTINGS
@given(card_ops)
def test_folding_card_events_reproduces_the_card(ops: list[Op]) -> None:
    card = Card.create(
        card_id=UUID(int=0xC),
        workspace_id=WS,
        project_id=UUID(int=0xB),
        title="First",
        description="",
        lane="Todo",
        position="V1",
        meta=meta(WS),
    )
    apply_ops(card, ops, card_step)
    assert card.labels == sorted(set(card.labels))
    assert_fold_reproduces(card)


run_ops = st.lists(
    st.one_of(
        st.tuples(st.just("start")),
        st.tuples(st.just("step"), st.integers(1, 5)),
        st.tuples(
            st.just("log"),
            st.lists(st.sampled_from(["stdout", "stderr", "system", "bogus"]), max_size=4),
        ),
        st.tuples(
            st.just("call"), st.sampled_from(["c1", "c2", "c3", "c4"]), st.integers(-1, 10**9)
        ),
        st.tuples(st.just("succeed")),
        st.tuples(st.just("fail"), st.sampled_from(["boom", " "])),
        st.tuples(st.just("time_out"), st.integers(0, 600)),
        st.tuples(st.just("cancel"), st.sampled_from(["stop", ""])),
    ),
    max_size=30,
)


def run_step(run: AgentRun, op: Op) -> None:
    mt = meta(run.workspace_id)
    match op:
        case ("start",):
            run.start(worker="w1", meta=mt)
        case ("step", n):
            run.start_step(n, f"step {n}", meta=mt)
        case ("log", streams):
            run.append_log([(T0, s, f"line {i}") for i, s in enumerate(streams)], meta=mt)
        case ("call", call_id, billed):
            run.record_llm_call(
                call_id=call_id,
                charge_id=UUID(int=7),
                provider="sim",
                model="m1",
                input_tokens=3,
                output_tokens=4,
                latency_ms=5,
                provider_cost_micros=max(billed, 0) // 5,
                billed_micros=billed,
                meta=mt,
            )
        case ("succeed",):
            run.succeed(meta=mt)
        case ("fail", error):
            run.fail(error, meta=mt)
        case ("time_out", seconds):
            run.time_out(seconds, meta=mt)
        case ("cancel", reason):
            run.cancel(reason, meta=mt)


@SETTINGS
@given(run_ops)
def test_folding_run_events_reproduces_the_run(ops: list[Op]) -> None:
    run = AgentRun.request(
        run_id=UUID(int=0xD),
        workspace_id=WS,
        project_id=UUID(int=0xB),
        card_id=UUID(int=0xC),
        agent="coder",
        provider=None,
        model=None,
        max_cost_micros=None,
        meta=meta(WS),
    )
    apply_ops(run, ops, run_step)
    chunks = [e for e in run.pending_events if isinstance(e, AgentRun.LogChunkAppended)]
    seqs = [line["seq"] for chunk in chunks for line in chunk.lines]
    assert seqs == list(range(1, len(seqs) + 1))
    assert run.next_seq == len(seqs) + 1
    calls = [e for e in run.pending_events if isinstance(e, AgentRun.LlmCallCompleted)]
    assert run.billed_micros == sum(c.billed_micros for c in calls)
    assert len({c.call_id for c in calls}) == len(calls)
    assert_fold_reproduces(run)


# -- (b) the board under random card commands -------------------------------------------------

BOARD_LANES = [
    m.LaneInput(name="Todo"),
    m.LaneInput(name="Doing", wip_limit=1),
    m.LaneInput(name="Done", wip_limit=2),
]
START_LANES = ["Todo", "Todo", "Doing", "Done", "Done"]
lane_ix = st.integers(0, len(BOARD_LANES) - 1)
any_card = st.integers(0, 10**6)

card_commands = st.lists(
    st.one_of(
        st.tuples(st.just("create"), st.none() | lane_ix),
        st.tuples(st.just("move"), any_card, lane_ix, spot),
        st.tuples(st.just("move"), any_card, lane_ix, spot),
        st.tuples(st.just("archive"), any_card),
        st.tuples(st.just("restore"), any_card, st.none() | lane_ix),
        st.tuples(st.just("wip"), lane_ix, st.none() | st.integers(0, 4)),
        st.tuples(st.just("block"), any_card),
        st.tuples(st.just("unblock"), any_card),
        st.tuples(st.just("rename_lane"), lane_ix),
    ),
    min_size=10,
    max_size=40,
)


def board_agrees_with_cards(world: World, cards: list[UUID]) -> Project:
    """The board's placements and each card's own lane (through renames) and position agree."""
    project: Project = world.get(world.project_id)
    assert_board_invariants(project)
    for card_id in cards:
        card: Card = world.get(card_id)
        placement = project.placements.get(card_id)
        if card.archived:
            assert placement is None, f"archived card {card_id} is still on the board"
        else:
            assert placement is not None, f"live card {card_id} is not on the board"
            assert any(spec.name == placement.lane for spec in project.lanes)
            assert card.position == placement.position
    assert set(project.placements) <= set(cards)
    return project


def send_card_command(world: World, cards: list[UUID], op: Op) -> Callable[[Project], None]:
    """Send ``op``; return a check of where the moved card landed (a no-op for other commands).

    Lanes are picked by index among the board's lanes as they are now. Renames pick a name
    never used before in the project; reusing an old name is covered by test_card_commands.py.
    """
    app, actor = world.app, world.owner
    now: Project = world.get(world.project_id)
    names = [spec.name for spec in now.lanes]

    def no_check(project: Project) -> None:
        return None

    match op:
        case ("create", lane_i):
            name = None if lane_i is None else names[lane_i]
            cmd = m.CreateCard(project_id=world.project_id, title="c", lane=name)
            cards.append(app.create_card(cmd, actor).id)
        case ("move", c, lane_i, where):
            mover, to_lane = cards[c % len(cards)], names[lane_i]
            order = [cid for _, cid in now.cards_in(to_lane) if cid != mover]
            after, before = neighbours(order, cards, where)
            move = m.MoveCard(
                card_id=mover, to_lane=to_lane, after_card_id=after, before_card_id=before
            )
            was_blocked, lane_before = world.get(mover).blocked, now.placements.get(mover)
            app.move_card(move, actor)
            assert not (was_blocked and lane_before and lane_before.lane != to_lane), (
                f"blocked card {mover} changed lane"
            )
            return lambda project: assert_between(
                [cid for _, cid in project.cards_in(to_lane)], mover, after, before
            )
        case ("archive", c):
            app.archive_card(m.ArchiveCard(card_id=cards[c % len(cards)]), actor)
        case ("restore", c, lane_i):
            name = None if lane_i is None else names[lane_i]
            app.restore_card(m.RestoreCard(card_id=cards[c % len(cards)], lane=name), actor)
        case ("wip", lane_i, limit):
            wip = m.SetWipLimit(project_id=world.project_id, lane=names[lane_i], wip_limit=limit)
            app.set_wip_limit(wip, actor)
        case ("block", c):
            app.block_card(m.BlockCard(card_id=cards[c % len(cards)], reason="r"), actor)
        case ("unblock", c):
            app.unblock_card(m.UnblockCard(card_id=cards[c % len(cards)]), actor)
        case ("rename_lane", lane_i):
            fresh = f"{names[lane_i]}+"
            rename = m.RenameLane(project_id=world.project_id, lane=names[lane_i], name=fresh)
            app.rename_lane(rename, actor)
        case _:
            raise AssertionError(op)
    return no_check


@settings(SETTINGS, max_examples=80)
@given(card_commands)
def test_board_invariants_hold_under_any_card_commands(ops: list[Op]) -> None:
    world = World.build(lanes=BOARD_LANES)
    # start from a board with cards in every lane, Doing and Done at their WIP limits
    cards = [world.card_id, *(world.card(f"c{i}", lane) for i, lane in enumerate(START_LANES))]
    for op in ops:
        before = position_of_log(world.app)
        try:
            check_landing = send_card_command(world, cards, op)
        except AgentWorksError:
            assert position_of_log(world.app) == before, f"refused {op} wrote events"
            continue
        check_landing(board_agrees_with_cards(world, cards))
    board_agrees_with_cards(world, cards)


# -- (c) money on the charge path -------------------------------------------------------------

markups = st.integers(1, 10**8).map(lambda n: format(Decimal(n).scaleb(-6), "f"))
costs = st.lists(st.integers(0, 10**12), min_size=1, max_size=8)


def _no_float(value: str) -> Any:
    raise AssertionError(f"a float literal {value} was stored")


@settings(SETTINGS, max_examples=40)
@given(markups, costs, st.booleans())
def test_charges_bill_exactly_and_monthly_spend_is_their_exact_sum(
    markup_text: str, cost_list: list[int], two_months: bool
) -> None:
    world = World.build()
    world.app.set_plan(
        m.SetPlan(workspace_id=world.workspace_id, markup=markup_text, billing_increment="0.25"),
        world.operator(),
    )
    markup = Decimal(markup_text)
    run_id = world.run(begin=True)
    by_month: dict[str, int] = {}
    charge_ids = []
    for i, cost in enumerate(cost_list):
        at = T0 - timedelta(days=40 * (i % 2)) if two_months else T0
        result = world.llm_call(run_id, call_id=f"c{i}", cost=cost, at=at)
        expected = billed_amount(cost, markup)
        assert result.extra["billed"] == expected
        assert isinstance(expected, int)
        assert expected >= cost * markup  # never billed below cost x markup
        charge: UsageCharge = world.get(UUID(result.extra["charge_id"]))
        assert charge.billed_micros == expected
        charge_ids.append(charge.id)
        by_month[month_of(at)] = by_month.get(month_of(at), 0) + expected

    for month, total in by_month.items():
        spend: MonthlySpend = world.get(spend_id_for(world.workspace_id, month))
        assert spend.spent_micros == total
        assert type(spend.spent_micros) is int
    run: AgentRun = world.get(run_id)
    assert run.billed_micros == sum(by_month.values())
    assert run.provider_cost_micros == sum(cost_list)

    for event in stored_events(world.app):
        floats = [v for v in walk(vars(event)) if isinstance(v, float)]
        assert floats == [], f"{type(event).__name__} holds floats {floats}"
    notifications = world.app.recorder.select_notifications(start=1, limit=10_000)
    for notification in notifications:
        json.loads(notification.state, parse_float=_no_float)
