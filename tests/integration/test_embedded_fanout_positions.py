"""The embedded fan-out's positions, read from another thread while the fan-out moves on.

``positions()`` (readiness, diagnostics, tests) runs on a thread of its caller, while the
fan-out's own thread records where each projector is. It used to record there too: a projector
it had no position for yet it read from the database and stored, after the fan-out had moved on,
and the fan-out went back to hand out again what it had applied (or met a key its loop had
dropped meanwhile, after an outage).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from board_helpers import stored_head
from fanout_helpers import EmbeddedPath, Workload

from projections.runner import ProjectionRunner

if TYPE_CHECKING:
    from types import FrameType

    from commands.handlers import AgentWorks


def test_reading_positions_from_another_thread_never_moves_the_fanout_back(
    database_url: str, write_side: AgentWorks
) -> None:
    work = Workload(write_side)
    work.card(work.tenant("positions", projects=1), "read while the fan-out moves on")
    path = EmbeddedPath(database_url)
    try:
        read, go = threading.Event(), threading.Event()
        seen: list[dict[str, int]] = []

        def held_after_reading(frame: FrameType, event: str, arg: object) -> object:
            # The reader is held once it has read a projector's recorded position, while the
            # fan-out (on the test's thread) applies everything the log holds.
            if event == "return" and not read.is_set():
                read.set()
                go.wait(30)
            return held_after_reading

        def calls(frame: FrameType, event: str, arg: object) -> object:
            reading = frame.f_code is ProjectionRunner.position.__code__
            return held_after_reading if reading else None

        threading.settrace(calls)
        try:
            reader = threading.Thread(target=lambda: seen.append(path.fanout.positions()))
            reader.start()
        finally:
            threading.settrace(None)  # type: ignore[arg-type]
        try:
            assert read.wait(30)
            path.fanout.drain()
        finally:
            go.set()
            reader.join(30)

        head = stored_head(path.log)
        assert len(seen) == 1
        assert min(seen[0].values()) < head  # read before the fan-out moved
        assert path.fanout.positions() == dict.fromkeys(seen[0], head)
    finally:
        path.stop()
