"""The sweep finds what deliveries never brought (a lost tail of an aggregate, which gap healing
cannot see) and applies it from the store, against real Postgres and real events.

Also a property: whatever subset of the log is lost on the way, delivery plus one sweep leaves
every read model equal to a rebuild from scratch.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

import psycopg
from hypothesis import given
from hypothesis import strategies as st
from hypothesis_profiles import expensive_property
from parking_helpers import parked_card
from pg import log_head
from read_side_helpers import ReadSide, create_card, llm_call, running_run
from test_read_model_properties import (
    EVERYTHING_ONCE,
    Script,
    assert_rebuild_matches,
    deliver,
    operations,
    run_operation,
)

from commands import models as m
from projections.billing import BillingProjector
from projections.kanban import KanbanProjector
from projections.rebuild import rebuild
from projections.registry import all_projectors
from projections.sweep import ProjectionSweep
from streams.embedded import EmbeddedFanout
from streams.worker import MOST_DEFERRED_TICKS, SweepSchedule

if TYPE_CHECKING:
    from typing import Any
    from uuid import UUID

    from domain.envelope import EventEnvelope
    from projections.runner import ProjectionRunner


def _title(side: ReadSide, card_id: object) -> str:
    return str(side.row("SELECT title FROM rm_cards WHERE card_id = %s", (card_id,))["title"])


def _watermark(side: ReadSide, projector: str) -> int:
    found = side.rows(
        "SELECT swept_through FROM projection_positions WHERE projector = %s", (projector,)
    )
    return int(found[0]["swept_through"]) if found else 0


def _card_whose_edit_was_lost(
    side: ReadSide, first: str, second: str
) -> tuple[UUID, list[EventEnvelope], ProjectionRunner]:
    """A card created as ``first`` and renamed ``second``; the kanban runner was delivered
    every event but the rename (the last one in the log)."""
    world = side.new_world()
    card = create_card(side, world, title=first)
    side.app.update_card(m.UpdateCard(card_id=card, title=second), world.owner)
    everything = side.envelopes()
    assert (everything[-1].originator_id, everything[-1].type) == (card, "Card.Edited")
    runner = side.runner(KanbanProjector())
    runner.process(everything[:-1])
    return card, everything, runner


def test_a_lost_last_event_is_swept_in_from_the_store(side: ReadSide) -> None:
    card, everything, runner = _card_whose_edit_was_lost(side, "first", "second")
    lost = everything[-1]
    assert _title(side, card) == "first"

    outcome = ProjectionSweep(runner).sweep(through=lost.position)

    assert outcome.healed == 1
    assert outcome.swept_through == lost.position
    assert _title(side, card) == "second"
    assert _watermark(side, "kanban") == lost.position
    assert_rebuild_matches(side, KanbanProjector())


def _healed(side: ReadSide, projector: str) -> int:
    found = side.rows("SELECT healed FROM projection_positions WHERE projector = %s", (projector,))
    return int(found[0]["healed"]) if found else 0


def test_the_healed_counter_counts_what_came_from_the_store_not_from_deliveries(
    side: ReadSide,
) -> None:
    world = side.new_world()
    card = create_card(side, world, title="one")
    for title in ("two", "three", "four"):
        side.app.update_card(m.UpdateCard(card_id=card, title=title), world.owner)
    everything = side.envelopes()
    edits = [e for e in everything if e.originator_id == card and e.type == "Card.Edited"]
    runner = side.runner(KanbanProjector())

    # Delivered in order, twice: nothing came from the store.
    runner.process(everything[: -len(edits)])
    runner.process(everything[: -len(edits)])
    assert _healed(side, "kanban") == 0

    # The first two edits lost on the way: the third reveals them and they are read back.
    runner.process(edits[2:3])
    assert (_healed(side, "kanban"), _title(side, card)) == (2, "four")
    # The last edit lost too, a tail no successor reveals: the sweep brings it (one more).
    side.app.update_card(m.UpdateCard(card_id=card, title="five"), world.owner)
    head = side.envelopes()[-1].position
    assert ProjectionSweep(runner).sweep(through=head).healed == 1
    assert (_healed(side, "kanban"), _title(side, card)) == (3, "five")


def test_nothing_to_sweep_when_everything_arrived(side: ReadSide) -> None:
    world = side.new_world()
    create_card(side, world)
    runner = side.runner(KanbanProjector())
    head = side.envelopes()[-1].position
    runner.process(side.envelopes())

    outcome = ProjectionSweep(runner).sweep(through=head)

    assert (outcome.healed, outcome.swept_through) == (0, head)
    # The watermark is where the next sweep starts: a second sweep reads nothing again.
    assert ProjectionSweep(runner).sweep(through=head).healed == 0


def test_the_sweep_stops_at_through_and_pages_the_log(side: ReadSide) -> None:
    world = side.new_world()
    cards = [create_card(side, world, title=f"card {i}") for i in range(6)]
    everything = side.envelopes()
    runner = side.runner(KanbanProjector())
    through = side.position_of("Card.Created", cards[3])

    # Nothing delivered at all: a sweep in pages of 2 events applies the board and four cards,
    # and leaves the two cards created after ``through`` to their deliveries.
    outcome = ProjectionSweep(runner, page=2).sweep(through=through)

    assert outcome.swept_through == through
    assert outcome.healed == len([e for e in everything if e.position <= through])
    titles = {row["title"] for row in side.rows("SELECT title FROM rm_cards")}
    assert titles == {f"card {i}" for i in range(4)}
    assert _watermark(side, "kanban") == through


def test_a_sweep_after_late_deliveries_takes_effect_once(side: ReadSide) -> None:
    card, everything, runner = _card_whose_edit_was_lost(side, "one", "two")
    ProjectionSweep(runner).sweep(through=everything[-1].position)

    # The lost message turns up after all: a duplicate, ignored.
    outcome = runner.process(everything[-1:])

    assert (outcome.applied, outcome.duplicates) == (0, 1)
    assert _title(side, card) == "two"
    assert_rebuild_matches(side, KanbanProjector())


def _billing_delivered_all_its_topic(side: ReadSide) -> tuple[ProjectionRunner, int]:
    """A charge, then card events; the billing runner delivered all of its topic (the charge's
    events), and the relay's position recorded at the head. The runner, and the head."""
    world = side.new_world()
    run = running_run(side, world)
    llm_call(side, world, run, "call-1", cost=1_000)
    for i in range(3):
        create_card(side, world, title=f"after the charge {i}")
    everything = side.envelopes()
    runner = side.runner(BillingProjector())
    delivered = [env for env in everything if runner.projector.follows(env)]
    runner.process(delivered)
    head = everything[-1].position
    assert delivered[-1].position < head
    with psycopg.connect(side.database_url, autocommit=True) as conn:
        conn.execute("INSERT INTO relay_positions (relay, position) VALUES ('relay', %s)", (head,))
    return runner, head


def test_a_worker_whose_topics_the_log_ends_without_is_not_left_behind_the_head(
    side: ReadSide,
) -> None:
    """Through Kafka a worker is delivered its own topics only: the billing worker never sees
    the card events that follow the last charge, so its position stayed at that charge for as
    long as no charge came, lagging the head in `/metrics` and `agentworks status`, and turning
    `/readyz` not ready (behind the head without moving) while it had applied everything. The
    sweep has checked the log up to its watermark, so the position goes there with it."""
    runner, head = _billing_delivered_all_its_topic(side)
    schedule = SweepSchedule(runner)

    assert schedule.tick() == 0  # notes where the relay is
    assert schedule.tick() == 0  # nothing was missing

    assert _watermark(side, "billing") == head
    assert runner.position() == head


def test_a_check_without_healing_moves_the_position_up_to_the_first_event_not_applied(
    side: ReadSide,
) -> None:
    """What a worker with sweeps off does (``AGENTWORKS_SWEEP_INTERVAL=0``): the log checked
    against its tracking, nothing applied from the store. Its position and watermark go up to
    the first event it was not delivered, and past it once that is applied."""
    card, everything, runner = _card_whose_edit_was_lost(side, "before", "after")
    lost = everything[-1]
    create_card(side, side.new_world(), title="another workspace")  # not the kanban's to wait on
    head = side.envelopes()[-1].position
    runner.process([env for env in side.envelopes(after=lost.position)])
    sweep = ProjectionSweep(runner)

    outcome = sweep.sweep(through=head, heal=False)

    assert (outcome.healed, outcome.swept_through) == (0, lost.position - 1)
    assert _title(side, card) == "before"
    assert _watermark(side, "kanban") == lost.position - 1
    runner.process([lost])  # delivered after all
    # A parked card's held events wait for a retry, not for a delivery: they count as done.
    world, parked, _ = parked_card(side, "Card.Labelled")
    side.app.label_card(m.LabelCard(card_id=parked, label="held"), world.owner)
    head = side.envelopes()[-1].position
    assert runner.process(side.envelopes(after=head - 1)).held == 1

    assert sweep.sweep(through=head, heal=False).swept_through == head
    assert (_watermark(side, "kanban"), runner.position()) == (head, head)


def test_a_worker_without_sweeps_moves_its_position_past_the_events_it_does_not_follow(
    side: ReadSide,
) -> None:
    """Sweeps off, the billing worker's position stayed at the last charge it was delivered
    while card events went on: lag in `/metrics` and `agentworks status`, and `/readyz` not
    ready (behind the head without moving), with everything applied. Its schedule checks the
    log up to what the relay published instead, and the position follows."""
    runner, head = _billing_delivered_all_its_topic(side)

    assert SweepSchedule(runner).check() == head

    assert (runner.position(), _watermark(side, "billing")) == (head, head)


class _StoreReads:
    """Counts the events a runner's log reads whole from the store: the sweep's reads and the
    runner's own (gap healing). Not the log's small columns, which every sweep reads."""

    def __init__(self, runner: ProjectionRunner) -> None:
        self.events = 0
        log = runner.log
        for name in ("within_batch", "between_batch"):
            read = getattr(log, name)

            def counted(*args: Any, _read: Any = read, **kwargs: Any) -> Any:
                batch = _read(*args, **kwargs)
                self.events += len(batch.envelopes)
                return batch

            setattr(log, name, counted)


def _labels(side: ReadSide, card_id: object) -> list[str]:
    row = side.row("SELECT labels FROM rm_cards WHERE card_id = %s", (card_id,))
    return sorted(row["labels"])


def test_a_sweep_reads_only_the_new_events_of_a_parked_aggregate(side: ReadSide) -> None:
    """A parked aggregate's events wait behind it, unapplied, so each sweep whose page held a
    new one read the aggregate's whole held tail again (the runner held it all back again):
    with 1,000 parked cards of 20 held events, one new event each cost a sweep 21,000 events
    read whole and 1.1 s, against nothing for as many new events of healthy cards, and more at
    every sweep as the tails grew (``python -m bench.sweep_parked``). It reads the new events
    only; a tail with none is not read at all; and the retry still applies every one."""
    world, card, runner = parked_card(side, "Card.Labelled")
    for n in range(5):
        side.app.label_card(m.LabelCard(card_id=card, label=f"held {n}"), world.owner)
    assert runner.process(side.envelopes(after=runner.position())).held == 5
    sweep = ProjectionSweep(runner)
    sweep.sweep(through=side.envelopes()[-1].position)  # sees the held tail once
    reads = _StoreReads(runner)

    assert sweep.sweep(through=side.envelopes()[-1].position).healed == 0
    assert reads.events == 0  # an unchanged tail is not read again

    side.app.label_card(m.LabelCard(card_id=card, label="new"), world.owner)
    new = side.envelopes()[-1]
    assert runner.process([new]).held == 1
    assert sweep.sweep(through=new.position).healed == 0
    assert reads.events == 1  # the new event, not the five before it
    assert _watermark(side, "kanban") == new.position

    (retried,) = runner.retry_parked()
    assert (retried.applied, retried.parked) == (6, None)
    assert _labels(side, card) == sorted(["new", *(f"held {n}" for n in range(5))])


def _lane(side: ReadSide, card_id: object) -> str:
    return str(side.row("SELECT lane FROM rm_cards WHERE card_id = %s", (card_id,))["lane"])


def test_a_move_swept_in_after_its_lane_was_renamed_lands_in_the_renamed_lane(
    side: ReadSide,
) -> None:
    """A card moved into a lane that was renamed next: the move's delivery lost, the rename's
    applied (it renames the cards the lane holds, not yet this one), the move swept in after.
    The card was left in a lane of the old name, which the board no longer has; a rebuild puts
    it in the renamed lane."""
    world = side.new_world()
    card = create_card(side, world, title="moved")
    side.app.move_card(m.MoveCard(card_id=card, to_lane="Doing"), world.owner)
    side.app.rename_lane(
        m.RenameLane(project_id=world.project_id, lane="Doing", name="In progress"), world.owner
    )
    everything = side.envelopes()
    moved = next(e for e in everything if e.originator_id == card and e.type == "Card.Moved")
    runner = side.runner(KanbanProjector())
    runner.process([e for e in everything if e is not moved])
    assert _lane(side, card) == "Todo"

    ProjectionSweep(runner).sweep(through=everything[-1].position)

    assert _lane(side, card) == "In progress"
    assert_rebuild_matches(side, KanbanProjector())


def test_a_rename_applied_late_leaves_a_card_moved_after_it_alone(side: ReadSide) -> None:
    """The other order: a lane renamed, another renamed to its old name, a card moved there;
    the renames' deliveries late, the move's applied first. The first rename, applied next,
    moved the card out of the lane it was moved into after that rename."""
    world = side.new_world()
    card = create_card(side, world, title="moved")
    side.app.rename_lane(
        m.RenameLane(project_id=world.project_id, lane="Doing", name="Reviewing"), world.owner
    )
    side.app.rename_lane(
        m.RenameLane(project_id=world.project_id, lane="Done", name="Doing"), world.owner
    )
    side.app.move_card(m.MoveCard(card_id=card, to_lane="Doing"), world.owner)
    everything = side.envelopes()
    cards = [e for e in everything if e.originator_id == card]
    runner = side.runner(KanbanProjector())
    runner.process([e for e in everything if e.originator_id != world.project_id])
    runner.process(everything)  # the board's events late, the card's as duplicates
    assert _lane(side, card) == "Doing"
    assert cards[-1].type == "Card.Moved"
    assert_rebuild_matches(side, KanbanProjector())


def test_a_rebuild_leaves_nothing_to_sweep_behind_it(side: ReadSide) -> None:
    world = side.new_world()
    create_card(side, world)
    head = side.envelopes()[-1].position

    rebuild(KanbanProjector(), side.pool, side.log)

    assert _watermark(side, "kanban") == head


def test_the_schedule_sweeps_what_was_published_one_tick_earlier(side: ReadSide) -> None:
    card, everything, runner = _card_whose_edit_was_lost(side, "before", "after")
    with psycopg.connect(side.database_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO relay_positions (relay, position) VALUES ('relay', %s)",
            (everything[-1].position,),
        )
    schedule = SweepSchedule(runner)

    # The first tick only notes where the relay is: the delivery may still be on its way.
    assert schedule.tick() == 0
    assert _title(side, card) == "before"
    # One interval later it is not: lost, and swept in.
    assert schedule.tick() == 1
    assert _title(side, card) == "after"


@expensive_property(dev=12, ci=20)
@given(
    ops=st.lists(operations, min_size=6, max_size=30),
    seed=st.integers(0, 2**32),
    loss=st.floats(min_value=0.0, max_value=0.6),
)
def test_any_lost_deliveries_converge_on_a_rebuild_after_a_sweep(
    side: ReadSide, ops: list[tuple[Any, ...]], seed: int, loss: float
) -> None:
    rnd = random.Random(seed)
    script = Script(world=side.new_world(owner=f"owner-{seed}"))
    for op in [*EVERYTHING_ONCE[:8], *ops]:
        run_operation(side, script, op)

    for projector in all_projectors():
        runner = side.runner(projector)
        envelopes = side.envelopes()
        delivered = [env for env in envelopes if rnd.random() >= loss]
        deliver(runner, delivered, rnd, late=True)
        ProjectionSweep(runner, page=rnd.randint(1, 50)).sweep(through=envelopes[-1].position)

    for projector in all_projectors():
        assert_rebuild_matches(side, projector)


def test_the_embedded_fan_out_reads_in_order_and_carries_the_watermark(side: ReadSide) -> None:
    world = side.new_world()
    create_card(side, world)
    head = side.envelopes()[-1].position
    runner = side.runner(KanbanProjector())

    EmbeddedFanout(side.log, [runner]).drain()

    assert _watermark(side, "kanban") == head
    assert ProjectionSweep(runner).sweep(through=head).healed == 0


def test_an_in_order_reader_that_starts_above_the_watermark_leaves_it_alone(
    side: ReadSide,
) -> None:
    world = side.new_world()
    card = create_card(side, world, title="one")
    side.app.update_card(m.UpdateCard(card_id=card, title="two"), world.owner)
    everything = side.envelopes()
    runner = side.runner(KanbanProjector())
    # Delivered as Kafka would, with a gap that the runner healed: its position is the last
    # event's, and nothing has checked what lies below it, so the watermark is still 0.
    runner.process(everything[:-2] + everything[-1:])
    create_card(side, world, title="three")

    EmbeddedFanout(side.log, [runner]).drain()

    assert _watermark(side, "kanban") == 0
    head = side.envelopes()[-1].position
    assert ProjectionSweep(runner).sweep(through=head).healed == 0
    assert _watermark(side, "kanban") == head


def test_the_schedule_waits_while_deliveries_catch_up(side: ReadSide) -> None:
    world = side.new_world()
    cards = [create_card(side, world, title=f"card {i}") for i in range(3)]
    everything = side.envelopes()
    runner = side.runner(KanbanProjector())
    first_card = [e for e in everything if e.originator_id == cards[0]][-1].position
    runner.process([e for e in everything if e.position <= first_card])
    with psycopg.connect(side.database_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO relay_positions (relay, position) VALUES ('relay', %s)",
            (everything[-1].position,),
        )
    schedule = SweepSchedule(runner)
    assert schedule.tick() == 0  # notes where the relay is

    # Deliveries came in this interval but are still below that position: a backlog in Kafka,
    # not a loss. No sweep.
    schedule.delivered = True
    assert schedule.tick() == 0
    assert {row["title"] for row in side.rows("SELECT title FROM rm_cards")} == {"card 0"}

    # A quiet interval: nothing more is coming, so what is missing was lost.
    assert schedule.tick() == len([e for e in everything if e.position > first_card])
    assert len(side.rows("SELECT title FROM rm_cards")) == 3


def test_a_worker_that_stays_busy_below_the_relay_still_sweeps_in_the_end(
    side: ReadSide,
) -> None:
    """A worker whose deliveries kept coming, yet never reached what the relay had published a
    tick earlier (a backlog that does not shrink), put its sweep off at every tick, for good:
    an event lost meanwhile stayed missing for as long as the backlog lasted. It defers a
    bounded number of ticks in a row, then sweeps."""
    card, everything, runner = _card_whose_edit_was_lost(side, "before", "after")
    with psycopg.connect(side.database_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO relay_positions (relay, position) VALUES ('relay', %s)",
            (everything[-1].position + 1_000,),  # the relay is always further on
        )
    schedule = SweepSchedule(runner)
    assert schedule.tick() == 0  # notes where the relay is
    healed = []
    for _ in range(MOST_DEFERRED_TICKS + 1):
        schedule.delivered = True
        healed.append(schedule.tick())
    assert healed == [0] * MOST_DEFERRED_TICKS + [1]
    assert _title(side, card) == "after"


def test_the_watermark_never_passes_the_log_head(side: ReadSide) -> None:
    card, everything, runner = _card_whose_edit_was_lost(side, "old", "new")
    head = everything[-1].position

    outcome = ProjectionSweep(runner).sweep(through=head + 1_000)

    assert outcome.swept_through == head
    assert _watermark(side, "kanban") == head
    assert _title(side, card) == "new"


def test_the_watermark_never_passes_an_event_the_horizon_held_back(side: ReadSide) -> None:
    """The sweep bounds its walk by the head it read first, then reads the page in a statement
    of its own, whose horizon may be lower: a transaction of another database that ends between
    that statement's snapshot and its look-up of ``pg_locks`` is kept, as if it were this
    database's. The page then lacked events up to the head, yet the watermark was moved to the
    head: past an event the sweep never saw, which no later sweep would look at again.

    Shown here with a transaction of this database holding the horizon (a deterministic stand-in
    for that race) and the head as the first statement saw it."""
    world = side.new_world()
    card = create_card(side, world, title="old")
    runner = side.runner(KanbanProjector())
    runner.process(side.envelopes())
    with psycopg.connect(side.database_url) as holder:
        holder.execute("SELECT pg_current_xact_id()")  # an id older than the rename's
        side.app.update_card(m.UpdateCard(card_id=card, title="new"), world.owner)
        renamed = log_head(side.database_url)
        assert (
            runner.log.versions(after=0, through=renamed, limit=1000, aggregates={"Card"})[1]
            < renamed
        )
        runner.log.head = lambda: renamed  # type: ignore[method-assign]
        held = ProjectionSweep(runner).sweep(through=renamed)
        assert held.swept_through < renamed
        assert _watermark(side, "kanban") < renamed
        holder.rollback()
    outcome = ProjectionSweep(runner).sweep(through=renamed)
    assert (outcome.swept_through, outcome.healed) == (renamed, 1)
    assert _title(side, card) == "new"
