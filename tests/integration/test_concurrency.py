"""WIP limits hold, and no event is lost, when threads and processes move one board's cards.

Eight threads share one write side; four spawned processes each build their own from the
database URL, as separate API replicas would. All of them move random cards of one project into
random lanes at once. Refusals (a full lane, a race lost too often) are expected; what must hold
is read back from the store afterwards.
"""

from __future__ import annotations

import multiprocessing
import random
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import pytest
from board_helpers import (
    LANES,
    Moves,
    add_cards,
    fold,
    move_in_own_process,
    move_randomly,
    stored_rows,
    wait_for,
)

from commands import models as m
from domain.card import Card
from domain.errors import Conflict
from domain.positions import RESPREAD_THRESHOLD
from domain.project import Project

if TYPE_CHECKING:
    from uuid import UUID

    from board_helpers import Board

    from commands.handlers import AgentWorks

THREADS = 8
PROCESSES = 4
MOVES_PER_WORKER = 25
CARDS = 12


def race(app: AgentWorks, board: Board, card_ids: list[UUID], database_url: str) -> list[Moves]:
    """Run every worker at once; the processes boot first, then all start together."""
    ctx = multiprocessing.get_context("spawn")
    ready, results, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    processes = [
        ctx.Process(
            target=move_in_own_process,
            args=(database_url, board, card_ids, f"process-{i}", 100 + i, MOVES_PER_WORKER),
            kwargs={"ready": ready, "go": go, "results": results},
            daemon=True,
        )
        for i in range(PROCESSES)
    ]
    for process in processes:
        process.start()
    try:
        booted = [ready.get(timeout=60) for _ in processes]
        assert [error for _, error in booted if error] == []
        start = threading.Barrier(THREADS + 1)

        def in_thread(i: int) -> Moves:
            start.wait(timeout=30)
            return move_randomly(
                app, board, card_ids, worker=f"thread-{i}", seed=i, count=MOVES_PER_WORKER
            )

        with ThreadPoolExecutor(THREADS) as pool:
            futures = [pool.submit(in_thread, i) for i in range(THREADS)]
            go.set()
            start.wait(timeout=30)
            outcomes = [future.result(timeout=120) for future in futures]
        outcomes += [results.get(timeout=120) for _ in processes]
    finally:
        go.set()
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
    return outcomes


@pytest.mark.many_connections
@pytest.mark.slow
def test_concurrent_moves_keep_wip_limits_at_every_version_and_lose_no_event(
    write_side: AgentWorks, board: Board, database_url: str
) -> None:
    card_ids = add_cards(write_side, board, CARDS)
    rows_before = len(stored_rows(database_url))

    outcomes = race(write_side, board, card_ids, database_url)

    assert [u for moves in outcomes for u in moves.unexpected] == []
    accepted = [a for moves in outcomes for a in moves.accepted]
    refused = sum((moves.refused for moves in outcomes), Counter[str]())
    assert set(refused) <= {"WIP_LIMIT", "CONFLICT"}
    assert refused["WIP_LIMIT"] > 0, "the race never reached a WIP limit; it tests nothing"
    assert any(moves.accepted for moves in outcomes if moves.worker.startswith("process"))
    assert any(moves.accepted for moves in outcomes if moves.worker.startswith("thread"))

    # The board, folded one event at a time: never a lane over its limit, at any version.
    limits = dict(LANES)
    project_versions: list[int] = []
    board_moves: dict[str, int] = {}
    project = None
    for event, project in fold(write_side, board.project_id):
        project_versions.append(project.version)
        if isinstance(event, Project.CardMoved):
            assert event.meta["command_id"] not in board_moves
            board_moves[event.meta["command_id"]] = project.version
        counts = Counter(placement.lane for placement in project.placements.values())
        over = {
            lane: n
            for lane, n in counts.items()
            if (limit := limits[lane]) is not None and n > limit
        }
        assert not over, f"project version {project.version} breaks a WIP limit: {over}"
    assert project is not None
    assert project_versions == list(range(1, len(project_versions) + 1))

    # Every card, folded: its moves, and where it ends up agrees with the board.
    card_moves: dict[str, tuple[UUID, int]] = {}
    for card_id in card_ids:
        card = None
        for event, card in fold(write_side, card_id):
            if isinstance(event, Card.Moved):
                assert event.meta["command_id"] not in card_moves
                card_moves[event.meta["command_id"]] = (card_id, card.version)
        assert card is not None
        placement = project.placements[card_id]
        assert (card.lane, card.position) == (placement.lane, placement.position), card_id

    # No accepted move is missing from the store, none is stored twice, none was invented.
    accepted_commands = [str(command_id) for command_id, *_ in accepted]
    assert len(set(accepted_commands)) == len(accepted_commands)
    assert sorted(board_moves) == sorted(accepted_commands)
    assert sorted(card_moves) == sorted(accepted_commands)
    rows = stored_rows(database_url)
    position_of = {(originator, version): nid for nid, originator, version in rows}
    for command_id, card_id, card_version, position in accepted:
        assert card_moves[str(command_id)] == (card_id, card_version)
        written = (
            position_of[(card_id, card_version)],
            position_of[(board.project_id, board_moves[str(command_id)])],
        )
        assert position == max(written)
    assert len(rows) == rows_before + 2 * len(accepted)

    # Positions are unique, and a reader tailing the log sees every stored event in order.
    ids = [nid for nid, _, _ in rows]
    assert len(set(ids)) == len(ids)
    tail = wait_for(
        lambda: write_side.recorder.select_notifications(start=None, limit=len(rows) + 10),
        len(rows),
    )
    assert [(n.id, n.originator_id, n.originator_version) for n in tail] == rows


def _squeeze(
    app: AgentWorks,
    board: Board,
    movers: list[UUID],
    moves: int,
    errors: list[str],
    done: threading.Event,
) -> int:
    """Move ``movers`` in turn right after the Todo lane's first card (one ever narrower gap, so
    re-spreads come) until ``moves`` were accepted (a race lost, CONFLICT, is tried again), then
    set ``done``. Returns the races lost."""
    accepted = lost = n = 0
    while accepted < moves and lost < 10 * moves:
        n += 1
        project = app.aggregate(Project, board.project_id)
        order = [card for _, card in project.cards_in("Todo")]
        mover = movers[n % len(movers)]
        others = [card for card in order if card != mover]
        move = m.MoveCard(
            card_id=mover, to_lane="Todo", after_card_id=others[0], before_card_id=others[1]
        )
        try:
            app.move_card(move, board.owner)
        except Conflict:
            lost += 1
        except Exception as error:  # noqa: BLE001 - reported to the test, asserted there
            errors.append(f"squeeze: {error!r}")
            break
        else:
            accepted += 1
    done.set()
    return lost


def _disturb(
    app: AgentWorks,
    board: Board,
    card_ids: list[UUID],
    movable: list[UUID],
    seed: int,
    errors: list[str],
    done: threading.Event,
) -> None:
    """Meanwhile: label and unlabel the lane's cards (their versions race a re-spread's) and move
    ``movable`` to the end of the lane (the board's version races it), until the squeezing is
    done. Never the squeezed cards: a card squeezed into the gap since the board was read, moved
    to the end, undid that squeeze, and under load the gap never narrowed to a re-spread."""
    rng = random.Random(seed)
    while not done.is_set():
        card_id = rng.choice(card_ids)
        try:
            match rng.randrange(3):
                case 0:
                    label = m.LabelCard(card_id=card_id, label=f"l{rng.randrange(3)}")
                    app.label_card(label, board.owner)
                case 1:
                    unlabel = m.UnlabelCard(card_id=card_id, label=f"l{rng.randrange(3)}")
                    app.unlabel_card(unlabel, board.owner)
                case _:
                    move = m.MoveCard(card_id=rng.choice(movable), to_lane="Todo")
                    app.move_card(move, board.owner)
        except Conflict:
            continue
        except Exception as error:  # noqa: BLE001 - reported to the test, asserted there
            errors.append(f"disturb: {error!r}")


def test_moves_and_card_changes_racing_re_spreads_leave_one_order_and_short_unique_keys(
    write_side: AgentWorks, board: Board
) -> None:
    card_ids = add_cards(write_side, board, 8)
    # The first card bounds the gap; three cards are squeezed into it, the last three moved.
    movers, movable = card_ids[2:5], card_ids[5:]
    errors: list[str] = []
    done = threading.Event()
    with ThreadPoolExecutor(3) as pool:
        squeezed = pool.submit(
            _squeeze, write_side, board, movers, 9 * RESPREAD_THRESHOLD, errors, done
        )
        for seed in (1, 2):
            pool.submit(_disturb, write_side, board, card_ids, movable, seed, errors, done)
    squeezed.result()
    assert errors == []

    # The board, folded command by command: each keeps the lane's order exactly, the card it
    # moved aside (a re-spread re-keys cards, it never reorders them), and leaves unique keys.
    commands: list[tuple[list[UUID], list[Any], list[tuple[str, UUID]]]] = []
    order: list[tuple[str, UUID]] = []
    project: Any = None
    command = None
    for event, project in fold(write_side, board.project_id):
        if event.meta.get("command_id") != command or not commands:
            command = event.meta.get("command_id")
            commands.append(([card for _, card in order], [], []))
        order = project.cards_in("Todo")
        commands[-1][1].append(event)
        commands[-1][2][:] = order
    respreads = 0
    for before, events, after in commands:
        moves = [event for event in events if isinstance(event, Project.CardMoved)]
        if not moves:
            continue
        respreads += len(moves) > 1
        mover = moves[-1].card_id
        assert [card for _, card in after if card != mover] == [c for c in before if c != mover]
        keys = [key for key, _ in after]
        assert len(set(keys)) == len(keys)
        assert max(len(key) for key in keys) <= RESPREAD_THRESHOLD
    assert project is not None
    assert respreads > 0, "no re-spread happened; the test tests nothing"
    # Every card says what the board says, the re-spread ones included.
    for card_id in card_ids:
        card: Any = None
        for _, card in fold(write_side, card_id):  # noqa: B007 - the last one is the card
            pass
        placement = project.placements[card_id]
        assert (card.lane, card.position) == (placement.lane, placement.position), card_id
