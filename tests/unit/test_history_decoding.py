"""Time travel's decoding gives exactly the domain events the library's mapper gives.

``projections.history`` reads most of a board's events (card edits, whose one transcoded value
is their timestamp) with a plain JSON parse; everything else goes through the mapper. The two
must agree on the event's class, its attributes and their order, and whatever the plain read
does not cover must come out of the mapper, errors and upcasting included.
"""

from __future__ import annotations

import json
from typing import Any
from uuid import UUID

import pytest
from aw_builders import new_app
from eventsourcing.domain import Aggregate
from eventsourcing.persistence import MapperDeserialisationError, StoredEvent
from hypothesis import given
from hypothesis import strategies as st
from test_event_log_decoding import _every_kind_of_event

from domain.card import Card
from domain.meta import EventMeta
from projections.history import _Decoder

MAPPER = new_app().mapper


def _stored(aggregates: list[Aggregate]) -> list[StoredEvent]:
    return [MAPPER.to_stored_event(e) for a in aggregates for e in a.collect_events()]


def _decoded(stored: StoredEvent) -> Any:
    originator_id = stored.originator_id
    assert isinstance(originator_id, UUID)
    decode = _Decoder(MAPPER)
    return decode(originator_id, stored.originator_version, stored.topic, stored.state)


def _same(stored: StoredEvent) -> None:
    fast, slow = _decoded(stored), MAPPER.to_domain_event(stored)
    assert type(fast) is type(slow)
    assert list(vars(fast).items()) == list(vars(slow).items())
    assert repr(fast.timestamp) == repr(slow.timestamp)  # the same offset, too


def _edit() -> StoredEvent:
    (card,) = [a for a in _every_kind_of_event() if isinstance(a, Card)]
    meta = EventMeta.for_command(workspace_id=card.workspace_id, actor="alice")
    card.collect_events()
    card.edit(title="t", description="d", meta=meta)
    (stored,) = _stored([card])
    return stored


def _changed(stored: StoredEvent, change: Any) -> StoredEvent:
    state = json.loads(stored.state)
    change(state)
    text = json.dumps(state, separators=(",", ":"), ensure_ascii=False)
    return StoredEvent(
        originator_id=stored.originator_id,
        originator_version=stored.originator_version,
        topic=stored.topic,
        state=text.encode(),
    )


def _plain(stored: StoredEvent) -> bool:
    """Whether the plain read (not the mapper) decoded it."""
    originator_id = stored.originator_id
    assert isinstance(originator_id, UUID)
    read = _Decoder._plain_event(
        originator_id, stored.originator_version, stored.topic, stored.state
    )
    return read is not None


def test_every_kind_of_event_and_a_card_snapshot_decode_as_the_mapper_does() -> None:
    aggregates = _every_kind_of_event()
    (card,) = [a for a in aggregates if isinstance(a, Card)]
    snapshot = MAPPER.to_stored_event(Card.Snapshot.take(card))
    stored = [*_stored(aggregates), snapshot]
    assert len({s.topic for s in stored}) >= 16
    for each in stored:
        _same(each)


def test_a_card_edit_takes_the_plain_read() -> None:
    assert _Decoder(MAPPER)._fast
    assert _plain(_edit())
    _same(_edit())


@given(title=st.text(), description=st.text())
def test_any_edited_text_decodes_as_the_mapper_does(title: str, description: str) -> None:
    _same(_changed(_edit(), lambda s: s.update(title=title, description=description)))


@pytest.mark.parametrize(
    "change",
    [
        lambda s: s.update(title='{"_type_": "uuid_hex", "_data_": "00"} "_type_"'),
        lambda s: s.update(title="\x01 a control character, written as \\u0001"),
        lambda s: s.update(extra={"_type_": "uuid_hex", "_data_": "0" * 32}),
        lambda s: s.update(extra=[{"_type_": "datetime_iso", "_data_": "2025-01-02T03:04:05Z"}]),
        lambda s: s.update(extra={"_type_": "datetime_iso", "_data_": "x", "more": 1}),
        lambda s: s.update(timestamp=s["timestamp"] | {"third": 1}),
        lambda s: s.update(weight=1.5, count=3, nothing=None),
        lambda s: s.update(class_version=1),
    ],
    ids=[
        "type key in text",
        "escaped text",
        "a transcoded value",
        "a nested transcoded value",
        "a three-key object",
        "a three-key timestamp",
        "numbers",
        "current class version",
    ],
)
def test_states_beside_the_plain_case_decode_as_the_mapper_does(change: Any) -> None:
    _same(_changed(_edit(), change))


@pytest.mark.parametrize(
    "state",
    [
        b'{"timestamp":{"_type_":"datetime_iso","_data_":"not a time"},"title":"t"}',
        b'{"timestamp":{"_type_":"datetime_iso","_data_":"2025-01-02T03:04:05+00:00"},"t":1} x',
        b'{"timestamp":{"_type_":"datetime_iso","_data_":"2025-01-02T03:04:05+00:00"},"t":"\xff"}',
        b'{"timestamp":{"_type_":"datetime_iso","_data_":"2025-01-02T03:04:05+00:00"',
    ],
    ids=["bad time", "trailing text", "not UTF-8", "truncated"],
)
def test_what_the_plain_read_refuses_fails_as_the_mapper_does(state: bytes) -> None:
    edit = _edit()
    stored = StoredEvent(
        originator_id=edit.originator_id,
        originator_version=edit.originator_version,
        topic=edit.topic,
        state=state,
    )
    with pytest.raises(MapperDeserialisationError):
        MAPPER.to_domain_event(stored)
    with pytest.raises(MapperDeserialisationError):
        _decoded(stored)


def test_trailing_whitespace_is_read_as_the_mapper_reads_it() -> None:
    edit = _edit()
    _same(
        StoredEvent(
            originator_id=edit.originator_id,
            originator_version=edit.originator_version,
            topic=edit.topic,
            state=edit.state + b" \n",
        )
    )


def test_an_event_stored_at_an_older_class_version_is_upcast(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stored = _edit()

    def upcast(state: dict[str, Any]) -> None:
        state["description"] = f"{state['description']} (upcast)"

    monkeypatch.setattr(Card.Edited, "class_version", 2, raising=False)
    monkeypatch.setattr(Card.Edited, "upcast_v1_v2", staticmethod(upcast), raising=False)
    assert not _plain(stored)
    _same(stored)
    assert _decoded(stored).description == "d (upcast)"
