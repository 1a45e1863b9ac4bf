"""Two replicas (each with cached reads and group commit) racing on a few cards, every command
sent twice at once under one commandId: each command is written at most once, both sendings of
one commandId get the same answer (a refusal for one and the result for the other is wrong: a
retry returns the first result), and what an answer says is what the store holds."""

from __future__ import annotations

import contextlib
import random
import threading
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any
from uuid import UUID, uuid4

import psycopg
from board_helpers import add_cards

from commands import models as m
from domain.errors import AgentWorksError
from infra.bootstrap import build_write_side

if TYPE_CHECKING:
    from board_helpers import Board

    from commands.handlers import AgentWorks


def test_duplicated_commands_on_hot_cards_from_two_replicas_are_written_once(
    database_url: str, write_side: AgentWorks, board: Board
) -> None:
    cards = add_cards(write_side, board, 3)
    with contextlib.closing(build_write_side(database_url, pool_size=4)) as other:
        replicas = [write_side, other]
        rng = random.Random(7)
        commands: list[m.Command] = []
        for i in range(120):
            card = rng.choice(cards)
            if rng.random() < 0.5:
                commands.append(m.UpdateCard(card_id=card, title=f"t{i}", command_id=uuid4()))
            else:
                lane = rng.choice(["Todo", "Done"])
                commands.append(m.MoveCard(card_id=card, to_lane=lane, command_id=uuid4()))
        answers: dict[UUID, list[Any]] = defaultdict(list)
        lock = threading.Lock()

        def send(item: tuple[int, m.Command]) -> None:
            index, command = item
            app = replicas[index % 2]
            call = app.update_card if isinstance(command, m.UpdateCard) else app.move_card
            try:
                result: Any = call(command, board.owner)  # type: ignore[arg-type]
                answer: Any = (result.id, result.version, result.position)
            except AgentWorksError as error:
                answer = error.code
            assert command.command_id is not None
            with lock:
                answers[command.command_id].append(answer)

        work = [(i, c) for c in commands for i in (0, 1)]
        with ThreadPoolExecutor(12) as pool:
            list(pool.map(send, work, timeout=120))

    with psycopg.connect(database_url) as conn:
        logged = {
            r[0]: r[1]
            for r in conn.execute("SELECT command_id, result FROM command_log").fetchall()
        }
        events = conn.execute(
            "SELECT (convert_from(state, 'UTF8')::jsonb -> 'meta' ->> 'command_id')::uuid, "
            "originator_id, originator_version, notification_id FROM agentworks_events"
        ).fetchall()
    written: dict[UUID, list[tuple[UUID, int, int]]] = defaultdict(list)
    for command_id, originator, version, position in events:
        written[command_id].append((originator, version, position))
    problems = []
    for command in commands:
        cid = command.command_id
        got = answers[cid]
        ok = [a for a in got if isinstance(a, tuple)]
        if len(set(ok)) > 1 or (ok and len(ok) < len(got)):
            problems.append(f"{cid}: different answers {got}")
        if cid not in logged:
            if ok or written.get(cid):
                problems.append(f"{cid}: not logged but answered {got} / wrote {written[cid]}")
            continue
        rows = written.get(cid, [])
        if ok:
            _, version, position = ok[0]
            if rows and position != max(r[2] for r in rows):
                problems.append(f"{cid}: position {position} but events at {rows}")
            if (command.card_id, version) not in {(r[0], r[1]) for r in rows} and rows:
                problems.append(f"{cid}: version {version} but events at {rows}")
        elif rows:
            problems.append(f"{cid}: wrote {rows} but every answer failed: {got}")
    assert not problems, "\n".join(problems[:20])
