"""Budget holds: the pure decision and the in-process store.

Whatever order calls ask in, the holds granted for a month never add up to more than the month
leaves, and no call starts that could not pay for its prompt.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from uuid import UUID, uuid4

from hypothesis import given
from hypothesis import strategies as st

from domain.budget_holds import Hold, HoldRequest, decide_hold
from orchestrator.holds import LocalHolds

WORKSPACE = UUID("6a1f0d2e-3b4c-4d5e-8f60-718293a4b5c6")
MONTH = "2026-12"
amounts = st.integers(min_value=0, max_value=10**12)


def request(
    *, want: int, floor: int = 0, spent: int = 0, limit: int | None = None,
    run_room: int | None = None, hold_id: UUID | None = None, month: str = MONTH,
    counted: frozenset[UUID] = frozenset(), written: int = 0,
) -> HoldRequest:  # fmt: skip
    return HoldRequest(
        workspace_id=WORKSPACE, month=month, hold_id=hold_id or uuid4(), want=want,
        floor=floor, spent=spent, limit=limit, run_room=run_room, counted=counted,
        written=written,
    )  # fmt: skip


@given(
    extra=amounts, floor=amounts, spent=amounts, elsewhere=amounts,
    limit=st.none() | amounts, run_room=st.none() | st.integers(-(10**6), 10**12),
)  # fmt: skip
def test_a_grant_fits_every_limit_and_covers_the_prompt(
    extra: int, floor: int, spent: int, elsewhere: int, limit: int | None, run_room: int | None
) -> None:
    """A call always wants at least its prompt (``want = floor + extra``)."""
    decided = decide_hold(
        request(want=floor + extra, floor=floor, spent=spent, limit=limit, run_room=run_room),
        elsewhere,
    )
    want = floor + extra
    if limit is None and run_room is None:
        assert decided == Hold(granted=want, room=None)
        return
    assert decided.room is not None
    if decided.granted is None:
        assert floor > decided.room
        return
    assert floor <= decided.granted == min(want, decided.room)
    assert decided.granted <= decided.room
    if limit is not None:
        assert spent + elsewhere + decided.granted <= limit
    if run_room is not None:
        assert decided.granted <= run_room


def test_no_limit_holds_what_the_call_could_cost() -> None:
    assert decide_hold(request(want=900, floor=100), 10**9) == Hold(900, None)


def test_the_smaller_room_decides_and_a_prompt_that_does_not_fit_is_refused() -> None:
    assert decide_hold(request(want=900, limit=1000, spent=200, run_room=500), 100) == Hold(
        500, 500
    )
    assert decide_hold(request(want=900, floor=50, limit=1000, spent=960), 0) == Hold(None, 40)


@given(
    limit=amounts,
    spent=amounts,
    calls=st.lists(st.tuples(amounts, st.integers(0, 10**4)), min_size=1, max_size=30),
)
def test_concurrent_holds_never_add_up_past_the_month(
    limit: int, spent: int, calls: list[tuple[int, int]]
) -> None:
    holds = LocalHolds()

    async def ask_all() -> list[Hold]:
        return list(
            await asyncio.gather(
                *(
                    holds.hold(request(want=want, floor=floor, spent=spent, limit=limit), ttl=60)
                    for want, floor in calls
                )
            )
        )

    decided = asyncio.run(ask_all())
    granted = sum(hold.granted or 0 for hold in decided)
    assert granted == holds.held(WORKSPACE, MONTH)
    assert granted <= max(limit - spent, 0)


def test_a_released_hold_gives_its_room_back_and_a_lapsed_one_too() -> None:
    now = [0.0]
    holds = LocalHolds(clock=lambda: now[0])
    first, second, third = uuid4(), uuid4(), uuid4()

    async def scenario() -> list[int | None]:
        granted = []
        a = await holds.hold(request(want=800, limit=1000, hold_id=first), ttl=10)
        b = await holds.hold(request(want=800, limit=1000, hold_id=second), ttl=10)
        granted += [a.granted, b.granted]
        await holds.release(WORKSPACE, MONTH, first)
        c = await holds.hold(request(want=800, limit=1000, hold_id=third), ttl=10)
        granted.append(c.granted)
        now[0] = 11.0  # every hold lapsed: a dead process's holds stop holding back
        d = await holds.hold(request(want=800, limit=1000, hold_id=first), ttl=10)
        granted.append(d.granted)
        return granted

    assert asyncio.run(scenario()) == [800, 200, 800, 800]


def test_a_hold_asked_for_again_replaces_itself_rather_than_adding_to_it() -> None:
    holds = LocalHolds()
    hold_id = uuid4()

    async def twice() -> tuple[Hold, Hold]:
        first = await holds.hold(request(want=600, limit=1000, hold_id=hold_id), ttl=10)
        again = await holds.hold(request(want=600, limit=1000, hold_id=hold_id), ttl=10)
        return first, again

    assert asyncio.run(twice()) == (Hold(600, 1000), Hold(600, 1000))
    assert holds.held(WORKSPACE, MONTH) == 600


def test_months_and_workspaces_hold_apart() -> None:
    holds = LocalHolds()

    async def apart() -> tuple[Hold, Hold]:
        december = await holds.hold(request(want=1000, limit=1000), ttl=10)
        january = await holds.hold(request(want=1000, limit=1000, month="2027-01"), ttl=10)
        return december, january

    assert asyncio.run(apart()) == (Hold(1000, 1000), Hold(1000, 1000))


def test_a_store_that_knows_a_later_usage_decides_with_it() -> None:
    asked = request(want=900, limit=1000, spent=200)
    assert decide_hold(asked, 0, spent=700) == Hold(300, 300)
    assert decide_hold(asked, 0, spent=100) == Hold(800, 800)


def test_a_settled_hold_holds_what_was_billed_until_a_reading_counts_its_charge() -> None:
    holds = LocalHolds()
    charge = uuid4()

    async def scenario() -> list[Hold]:
        decided = [await holds.hold(request(want=800, limit=1000, hold_id=charge), ttl=10)]
        await holds.settle(WORKSPACE, MONTH, charge, billed=300, ttl=10)
        assert holds.settled(WORKSPACE, MONTH) == {charge}
        # The read model has not counted the charge yet: its hold still holds what it billed.
        decided.append(await holds.hold(request(want=900, limit=1000, spent=0), ttl=10))
        # Now it has: the reading includes the 300 and the hold goes, so it is not counted twice.
        counted = frozenset({charge})
        decided.append(await holds.hold(request(want=900, limit=1000, spent=300,
                                                counted=counted), ttl=10))  # fmt: skip
        return decided

    first, behind, caught_up = asyncio.run(scenario())
    assert first == Hold(800, 1000)
    assert behind == Hold(700, 700)
    # 300 counted; the 700 granted just before is still held.
    assert caught_up == Hold(0, 0)
    assert holds.settled(WORKSPACE, MONTH) == frozenset()


def test_a_reading_older_than_one_already_seen_cannot_lose_a_dropped_hold() -> None:
    """Two calls read the usage, then decide in the other order: the newer reading dropped the
    settled hold its charge is counted in, and the older reading does not count that charge."""
    holds = LocalHolds()
    charge = uuid4()

    async def scenario() -> Hold:
        await holds.hold(request(want=400, limit=1000, hold_id=charge), ttl=10)
        await holds.settle(WORKSPACE, MONTH, charge, billed=400, ttl=10)
        await holds.hold(request(want=100, limit=1000, spent=400,
                                 counted=frozenset({charge})), ttl=10)  # fmt: skip
        return await holds.hold(request(want=900, limit=1000, spent=0), ttl=10)

    assert asyncio.run(scenario()) == Hold(500, 500)


def test_settling_a_hold_already_dropped_does_not_bring_it_back() -> None:
    holds = LocalHolds()
    charge = uuid4()

    async def scenario() -> None:
        await holds.hold(request(want=400, limit=1000, hold_id=charge), ttl=10)
        await holds.release(WORKSPACE, MONTH, charge)
        await holds.settle(WORKSPACE, MONTH, charge, billed=400, ttl=10)

    asyncio.run(scenario())
    assert holds.held(WORKSPACE, MONTH) == 0


def test_an_unsettled_hold_is_not_dropped_by_a_reading_that_names_it() -> None:
    """Only a written charge can be counted; a hold still in flight keeps its room."""
    holds = LocalHolds()
    charge = uuid4()

    async def scenario() -> Hold:
        await holds.hold(request(want=400, limit=1000, hold_id=charge), ttl=10)
        return await holds.hold(request(want=900, limit=1000, counted=frozenset({charge})),
                                ttl=10)  # fmt: skip

    assert asyncio.run(scenario()) == Hold(600, 600)


@given(
    counted=amounts, uncounted=st.lists(amounts, max_size=5),
    lapsed=st.lists(st.booleans(), min_size=5, max_size=5), in_flight=amounts, want=amounts,
    limit=amounts,
)  # fmt: skip
def test_every_written_charge_counts_whether_its_hold_is_kept_or_has_lapsed(
    counted: int, uncounted: list[int], lapsed: list[bool], in_flight: int, want: int,
    limit: int,
) -> None:  # fmt: skip
    """The reading counts ``counted``; charges written since hold their amounts while kept, and
    some of those holds have lapsed (the billing projector stopped for longer than they live).
    The write model counts all of them. Whatever lapsed, the month's usage, the holds of calls
    still in flight and the grant never pass the limit; and while every hold is kept, knowing
    the write model's usage changes nothing."""
    written = counted + sum(uncounted)
    kept = [amount for amount, gone in zip(uncounted, lapsed, strict=False) if not gone]
    asked = request(want=want, spent=counted, limit=limit, written=written)
    decided = decide_hold(asked, sum(kept) + in_flight, settled_elsewhere=sum(kept))
    if decided.granted is not None:
        assert written + in_flight + decided.granted <= limit
    if len(kept) == len(uncounted):
        assert decided == decide_hold(replace(asked, written=0), sum(kept) + in_flight)


def test_a_settled_hold_that_lapses_uncounted_leaves_its_charge_counted() -> None:
    """The billing projector is stopped: the reading stays at 0 while two calls are charged.
    Their settled holds lapse (a run timeout and ``stale_after`` later); the write model still
    counts the charges, and a call in flight still holds beside them. Before, the month's room
    came back whole once the holds lapsed: a workspace could spend its limit again every
    330 s while the projector was down."""
    now = [0.0]
    holds = LocalHolds(clock=lambda: now[0])
    first, second, flying = uuid4(), uuid4(), uuid4()

    async def scenario() -> list[Hold]:
        for charge, billed in ((first, 300), (second, 200)):
            await holds.hold(request(want=400, limit=1000, hold_id=charge), ttl=10)
            await holds.settle(WORKSPACE, MONTH, charge, billed=billed, ttl=10)
        kept = await holds.hold(request(want=900, limit=1000, written=500), ttl=10)
        now[0] = 11.0  # every hold lapses; nothing counted the two charges
        await holds.hold(request(want=100, limit=1000, written=500, hold_id=flying), ttl=10)
        lapsed = await holds.hold(request(want=900, limit=1000, written=500), ttl=10)
        return [kept, lapsed]

    kept, lapsed = asyncio.run(scenario())
    assert kept == Hold(500, 500)  # the two settled holds count the charges, once
    assert lapsed == Hold(400, 400)  # 500 written, 100 in flight
