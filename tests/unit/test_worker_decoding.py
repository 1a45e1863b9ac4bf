"""A Kafka worker decodes only the messages whose payload its projector reads.

The board's and the activity feed's workers receive every event of a run, its log chunks (up
to thousands of lines each) among them, and ignore most. The relay's headers say where such an
event sits and what it is, which is all a projector needs of an event it ignores.
"""

from __future__ import annotations

from datetime import UTC, datetime
from uuid import UUID

from hypothesis import given
from hypothesis import strategies as st

from domain.envelope import UNREAD, EventEnvelope
from streams.relay import envelope_of_headers, headers_for
from streams.worker import decode_batch

RUN = UUID(int=5)
WORKSPACE = UUID(int=9)
LOG_CHUNK = "AgentRun.LogChunkAppended"


def envelope(position: int, event_type: str, payload: dict[str, object]) -> EventEnvelope:
    return EventEnvelope(
        position=position,
        originator_id=RUN,
        originator_version=position + 1,
        aggregate=event_type.split(".", 1)[0],
        type=event_type,
        event_version=1,
        timestamp=datetime(2026, 12, 7, tzinfo=UTC),
        workspace_id=WORKSPACE,
        metadata={"traceparent": ""},
        payload=payload,
    )


CHUNK = envelope(7, LOG_CHUNK, {"first_seq": 0, "lines": [{"text": "x" * 100}] * 50})
STARTED = envelope(6, "AgentRun.StepStarted", {"step": 1, "name": "plan"})


def test_an_ignored_type_is_taken_from_its_headers_without_decoding_the_message() -> None:
    garbled = b"\xff not an envelope"  # decoded, this message would be left out
    decoded = decode_batch(
        [garbled, STARTED.to_bytes()],
        headers=[dict(headers_for(CHUNK)), dict(headers_for(STARTED))],
        unread={LOG_CHUNK},
    )

    assert [e.position for e in decoded] == [6, 7]
    chunk = decoded[1]
    assert (chunk.type, chunk.aggregate, chunk.originator_id, chunk.originator_version) == (
        LOG_CHUNK, "AgentRun", RUN, 8,
    )  # fmt: skip
    assert chunk.workspace_id == WORKSPACE
    assert chunk.payload == {}
    assert UNREAD in chunk.metadata
    assert decoded[0] == STARTED


def test_a_type_read_or_headers_that_do_not_say_it_all_decode_the_message() -> None:
    whole = dict(headers_for(CHUNK))
    partial = {name: value for name, value in whole.items() if name != "version"}
    bad = {**whole, "originator": b"not a uuid"}
    for headers, unread in [(whole, set()), ({}, {LOG_CHUNK}), (partial, {LOG_CHUNK}),
                            (bad, {LOG_CHUNK})]:  # fmt: skip
        decoded = decode_batch([CHUNK.to_bytes()], headers=[headers], unread=unread)
        assert decoded == [CHUNK]


@given(
    st.integers(1, 2**63 - 1),
    st.integers(1, 2**31),
    st.uuids(),
    st.one_of(st.none(), st.uuids()),
    st.integers(1, 9),
)
def test_headers_describe_the_envelope_they_were_made_for(
    position: int, version: int, originator: UUID, workspace: UUID | None, event_version: int
) -> None:
    made = CHUNK.model_copy(
        update={
            "position": position,
            "originator_version": version,
            "originator_id": originator,
            "workspace_id": workspace,
            "event_version": event_version,
        }
    )
    told = envelope_of_headers(dict(headers_for(made)))
    assert told is not None
    assert told.model_dump(exclude={"metadata", "payload", "timestamp"}) == made.model_dump(
        exclude={"metadata", "payload", "timestamp"}
    )
