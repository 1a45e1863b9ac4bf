"""What the relay concludes from the broker's acknowledgements (:class:`BrokerMarks`)."""

from __future__ import annotations

import json
from typing import NamedTuple

from hypothesis import given
from hypothesis import strategies as st

from streams.relay import BrokerMarks


class Ack(NamedTuple):
    topic: str
    partition: int
    offset: int


def test_growing_offsets_and_a_known_topic_id_reveal_nothing() -> None:
    marks = BrokerMarks()
    assert marks.note([Ack("t", 0, 0), Ack("t", 0, 1)], {"t": "id-1"}) == []
    assert marks.note([Ack("t", 0, 2), Ack("t", 1, 0)], {"t": "id-1"}) == []
    assert marks.offsets == {"t:0": 2, "t:1": 0}
    assert marks.topic_ids == {"t": "id-1"}


def test_an_offset_at_or_below_one_acknowledged_before_means_the_log_was_lost() -> None:
    marks = BrokerMarks()
    marks.note([Ack("t", 0, 5)], {})
    assert marks.note([Ack("t", 0, 5)], {}) == ["t:0"]
    # What was recorded belonged to the lost log: only the new acknowledgements remain.
    assert marks.offsets == {"t:0": 5}
    assert marks.note([Ack("t", 0, 6)], {}) == []


def test_a_new_topic_id_means_the_topic_was_created_again() -> None:
    marks = BrokerMarks()
    marks.note([Ack("t", 0, 9)], {"t": "id-1"})
    assert marks.note([Ack("t", 3, 0)], {"t": "id-2"}) == ["t (re-created)"]
    assert marks.topic_ids == {"t": "id-2"}
    assert marks.offsets == {"t:3": 0}


def test_a_partition_never_written_and_an_unknown_id_prove_nothing() -> None:
    marks = BrokerMarks()
    marks.note([Ack("t", 0, 9)], {"t": "id-1"})
    assert marks.note([Ack("t", 1, 0)], {"t": None}) == []


@given(st.lists(st.tuples(st.integers(0, 3), st.integers(1, 20)), max_size=30))
def test_marks_survive_their_json_form(steps: list[tuple[int, int]]) -> None:
    marks = BrokerMarks()
    offset = 0
    for partition, grow in steps:
        offset += grow
        assert marks.note([Ack("t", partition, offset)], {"t": "id"}) == []
    assert BrokerMarks.from_json(json.loads(marks.to_json())) == marks
