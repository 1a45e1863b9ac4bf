"""WIP limits hold, and no event is lost, when threads and processes move one board's cards.

Eight threads share one write side; four spawned processes each build their own from the
database URL, as separate API replicas would. All of them move random cards of one project into
random lanes at once. Refusals (a full lane, a race lost too often) are expected; what must hold
is read back from the store afterwards.
"""

from __future__ import annotations

import multiprocessing
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

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

from domain.card import Card
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
