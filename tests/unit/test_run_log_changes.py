"""What the runs projector tells a run's subscribers of a log chunk: its lines while they are
small, and only that lines are stored once they are large.

A chunk may hold 10,000 lines of up to 16 KiB each. Sent whole, it was one pub/sub message of
that size through Redis, and each subscriber's queue (a thousand messages) could hold that many
of them in the API's memory; the subscription reads large chunks from the read model instead.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from hypothesis import given
from hypothesis import strategies as st

from domain.envelope import EventEnvelope
from projections.base import Change
from projections.runs import LIVE_LINES_MOST_TEXT, lines_changed, run_channel

RUN = UUID(int=7)
AT = "2026-01-02T03:04:05+00:00"


def _chunk(texts: list[str], first_seq: int = 1) -> tuple[EventEnvelope, list[dict[str, Any]]]:
    lines = [
        {"seq": first_seq + i, "at": AT, "stream": "stdout", "text": text}
        for i, text in enumerate(texts)
    ]
    envelope = EventEnvelope(
        position=42,
        originator_id=RUN,
        originator_version=3,
        aggregate="AgentRun",
        type="AgentRun.LogChunkAppended",
        event_version=1,
        timestamp=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
        workspace_id=UUID(int=9),
        metadata={"actor": "orchestrator"},
        payload={"first_seq": first_seq, "lines": lines},
    )
    return envelope, lines


def _published(texts: list[str], first_seq: int = 1) -> Change:
    envelope, lines = _chunk(texts, first_seq)
    changes: list[Change] = []
    lines_changed(envelope, changes, lines)
    (change,) = changes
    assert change.channel == run_channel(RUN)
    return change


def test_a_small_chunk_is_sent_with_its_lines() -> None:
    change = _published(["one", "two"], first_seq=5)
    assert change.payload == {
        "kind": "lines",
        "runId": str(RUN),
        "lines": _chunk(["one", "two"], 5)[1],
        "position": 42,
    }


def test_a_large_chunk_says_up_to_which_line_it_is_stored_and_carries_no_text() -> None:
    texts = ["x" * 16_384] * 100  # 1.6 MB of text
    change = _published(texts, first_seq=11)
    assert change.payload == {
        "kind": "lines_stored",
        "runId": str(RUN),
        "lastSeq": 110,
        "position": 42,
    }


@given(st.lists(st.integers(0, 3 * LIVE_LINES_MOST_TEXT // 4), min_size=1, max_size=8))
def test_what_is_sent_live_stays_within_the_bound(sizes: list[int]) -> None:
    texts = ["é" * size for size in sizes]  # two bytes each in UTF-8
    change = _published(texts)
    sent = sum(len(line["text"].encode()) for line in change.payload.get("lines", ()))
    assert sent <= LIVE_LINES_MOST_TEXT
    assert (change.payload["kind"] == "lines") == (sum(sizes) * 2 <= LIVE_LINES_MOST_TEXT)
