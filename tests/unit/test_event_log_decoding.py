"""The event log's fast decoding gives exactly the envelopes the library's path gives.

``EventLog`` parses stored JSON once, straight into the envelope's JSON-safe payload; the
reference is the library's mapper followed by ``envelope_from_event``. Both must agree on every
field (and on the JSON the relay sends), and whatever the fast path does not cover must take the
reference path, errors included.
"""

from __future__ import annotations

import functools
import json
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any
from uuid import UUID, uuid4

import pytest
from aw_builders import new_app
from eventsourcing.domain import Aggregate
from eventsourcing.persistence import StoredEvent
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from adapters.eventlog import EventLog, Row
from domain.agent_run import AgentRun
from domain.card import Card
from domain.envelope import EventEnvelope
from domain.meta import EventMeta
from domain.project import LaneSpec, Project
from domain.roles import Role
from domain.usage import MonthlySpend, UsageCharge
from domain.workspace import Workspace


class _NoRecorder:
    """EventLog only needs a recorder to read; these tests hand it rows themselves."""


def _log() -> EventLog:
    app = new_app()
    return EventLog(_NoRecorder(), app.mapper)  # type: ignore[arg-type]


def _rows(log: EventLog, aggregates: list[Aggregate]) -> list[Row]:
    rows: list[Row] = []
    for aggregate in aggregates:
        for event in aggregate.collect_events():
            stored = log.mapper.to_stored_event(event)
            rows.append(_row(len(rows) + 1, stored))
    return rows


def _row(position: int, stored: StoredEvent) -> Row:
    originator_id = stored.originator_id
    assert isinstance(originator_id, UUID)
    return (position, originator_id, stored.originator_version, stored.topic, stored.state)


def _every_kind_of_event() -> list[Aggregate]:
    ws = uuid4()
    meta = EventMeta.for_command(workspace_id=ws, actor="alice", traceparent="00-abc-def-01")
    workspace = Workspace.create(workspace_id=ws, name="Acme", owner_id="alice", meta=meta)
    workspace.add_member("bob", Role.MEMBER, meta=meta)
    workspace.set_plan(markup=Decimal("3.5"), billing_increment_micros=100_000, meta=meta)
    workspace.set_spend_limit(5_000_000, meta=meta)
    project = Project.create(
        project_id=uuid4(),
        workspace_id=ws,
        name="Board",
        lanes=[LaneSpec("Todo"), LaneSpec("Doing", 3), LaneSpec("Done")],
        meta=meta,
    )
    card_id = uuid4()
    position = project.place_card(card_id, "Todo", meta=meta).position
    card = Card.create(
        card_id=card_id,
        workspace_id=ws,
        project_id=project.id,
        title="Ünïcödé \u2603 title",
        description='quotes " and \\ backslashes \t tabs',
        lane="Todo",
        position=position,
        meta=meta,
    )
    card.label("bug", meta=meta)
    moved = project.move_card(card.id, "Doing", meta=meta).position
    card.move("Doing", moved, from_lane="Todo", meta=meta)
    run = AgentRun.request(
        run_id=uuid4(),
        workspace_id=ws,
        project_id=project.id,
        card_id=card.id,
        agent="coder",
        provider=None,
        model="gpt-4o",
        max_cost_micros=None,
        meta=meta,
    )
    run.start(worker="w1", meta=meta)
    now = datetime.now(UTC)
    run.append_log(
        [(now, "stdout", "line with \x00 NUL"), (now + timedelta(seconds=1), "stderr", "✓ ok")],
        meta=meta,
    )
    at = datetime(2025, 1, 31, 23, 59, 59, 999999, tzinfo=UTC)
    charge = UsageCharge.charge(
        workspace_id=ws,
        project_id=project.id,
        card_id=card.id,
        run_id=run.id,
        call_id="call-1",
        provider="openai",
        model="gpt-4o",
        input_tokens=1000,
        output_tokens=10,
        provider_cost_micros=1234,
        markup=Decimal("3.5"),
        billed_micros=4319,
        price_table_version="v1",
        at=at,
        meta=meta,
    )
    run.record_llm_call(
        call_id="call-1",
        charge_id=charge.id,
        provider="openai",
        model="gpt-4o",
        input_tokens=1000,
        output_tokens=10,
        latency_ms=50,
        provider_cost_micros=1234,
        billed_micros=4319,
        meta=meta,
    )
    charge.correct(100, "sorry", refund=False, at=at, meta=meta)
    spend = MonthlySpend.open(workspace_id=ws, month="2025-01", meta=meta)
    spend.add(charge.id, 4319, meta=meta)
    run.fail("boom", meta=meta)
    return [workspace, project, card, run, charge, spend]


def _same(log: EventLog, row: Row) -> None:
    fast = log._envelope(row)
    slow = log.decode_slowly(row)
    assert fast == slow
    assert fast.model_dump_json() == slow.model_dump_json()
    assert fast.model_fields_set == slow.model_fields_set
    assert type(fast.timestamp) is type(slow.timestamp)
    assert fast.timestamp.utcoffset() == slow.timestamp.utcoffset()


def test_fast_and_library_paths_agree_on_every_kind_of_event() -> None:
    log = _log()
    assert log._fast is not None, "the application's mapper is what the fast path covers"
    rows = _rows(log, _every_kind_of_event())
    assert len({row[3] for row in rows}) >= 15
    for row in rows:
        _same(log, row)


def _edited(row: Row, change: Any) -> Row:
    state = json.loads(row[4])
    change(state)
    return (*row[:4], json.dumps(state).encode())  # type: ignore[return-value]


def test_transcoded_values_below_the_top_level_are_found() -> None:
    log = _log()
    row = _rows(log, _every_kind_of_event())[0]
    nested = {"_type_": "uuid_hex", "_data_": uuid4().hex}
    when = {"_type_": "datetime_iso", "_data_": "2025-01-02T03:04:05+00:00"}
    amount = {"_type_": "decimal_str", "_data_": "1.50"}
    edited = _edited(row, lambda s: s.update(extra={"ids": [nested], "at": when, "x": amount}))
    _same(log, edited)
    payload = log._envelope(edited).payload["extra"]
    assert payload["ids"] == [str(UUID(nested["_data_"]))]
    assert payload["at"] == "2025-01-02T03:04:05+00:00"
    assert payload["x"] == "1.50"


def test_a_literal_type_key_in_text_does_not_confuse_the_fast_path() -> None:
    log = _log()
    row = _rows(log, _every_kind_of_event())[0]
    _same(log, _edited(row, lambda s: s.update(name='{"_type_": "uuid_hex"} "_type_"')))


@pytest.mark.parametrize(
    "change",
    [
        lambda s: s.update(weight=1.5),  # floats are refused
        lambda s: s.update(odd={"_type_": "not_registered", "_data_": "x"}),
        lambda s: s.update(timestamp={"_type_": "datetime_iso", "_data_": "not a time"}),
    ],
    ids=["float", "unknown transcoding", "bad datetime"],
)
def test_what_the_fast_path_does_not_cover_fails_as_the_library_does(change: Any) -> None:
    log = _log()
    row = _edited(_rows(log, _every_kind_of_event())[0], change)
    try:
        log.decode_slowly(row)
    except Exception as error:  # noqa: BLE001 - whatever the library raises, the fast path must too
        expected: type[Exception] = type(error)
    else:
        pytest.fail("the library's path accepted it")
    with pytest.raises(expected):
        log._envelope(row)


# -- arbitrary states ---------------------------------------------------------------------------
#
# The stored states above are what the domain writes today; the properties below hold the two
# paths together on any state the library's encoder could write (and some it would not), since
# the fast path reads the parsed values, not the text: text full of '.', 'e', digits, quotes and
# "_type_", numbers of every size, floats (which both paths refuse), transcoded values well- and
# ill-formed at any depth, and keys that are not payload.


@functools.cache
def _base_rows() -> tuple[EventLog, list[Row]]:
    log = _log()
    return log, _rows(log, _every_kind_of_event())


_TRICKY = '.eE+-0123456789"\\/:,[]{} \t\n\r\x00\x1f\x7f\u2028é☃😀_typedat'
_TEXT = st.text(
    alphabet=st.one_of(st.sampled_from(_TRICKY), st.characters(exclude_categories=["Cs"])),
    max_size=12,
)
_KEYS = st.one_of(
    _TEXT,
    st.sampled_from(
        ["_type_", "_data_", "timestamp", "meta", "class_version", "originator_id",
         "originator_version", "originator_topic", "workspace_id"]
    ),
)  # fmt: skip
_INT64 = st.integers(min_value=-(2**63), max_value=2**64 - 1)
_BIG_INTS = st.one_of(
    st.sampled_from([2**64, -(2**63) - 1, 10**20, 10**30, -(10**40)]),
    st.integers(min_value=2**64, max_value=2**200),
    st.integers(max_value=-(2**63) - 1, min_value=-(2**200)),
)
_WHEN = st.datetimes(
    timezones=st.one_of(
        st.none(),
        st.just(UTC),
        st.timedeltas(min_value=timedelta(hours=-23), max_value=timedelta(hours=23)).map(
            lambda d: timezone(d)
        ),
    )
).map(datetime.isoformat)
_TRANSCODED = st.one_of(
    st.builds(lambda u: {"_type_": "uuid_hex", "_data_": u.hex}, st.uuids()),
    st.builds(lambda w: {"_type_": "datetime_iso", "_data_": w}, _WHEN),
    st.builds(
        lambda d: {"_type_": "decimal_str", "_data_": str(d)},
        st.decimals(allow_nan=False, allow_infinity=False),
    ),
    st.fixed_dictionaries(  # ill-formed: what the library rejects or leaves alone
        {"_type_": st.one_of(st.sampled_from(["uuid_hex", "datetime_iso", "decimal_str"]), _TEXT)},
        optional={"_data_": st.one_of(_TEXT, st.integers(), st.none()), "x": st.integers()},
    ),
)


def _json(scalars: st.SearchStrategy[object]) -> st.SearchStrategy[object]:
    return st.recursive(
        scalars,
        lambda inner: st.one_of(
            st.lists(inner, max_size=4), st.dictionaries(_KEYS, inner, max_size=4)
        ),
        max_leaves=12,
    )


_PLAIN = _json(st.one_of(st.none(), st.booleans(), _INT64, _TEXT))
"""Values the fast path must decode itself: no float, integers within 64 bits, no object with a
"_type_" key (the keys' text is still anything else)."""
_ANY = _json(
    st.one_of(st.none(), st.booleans(), _INT64, _BIG_INTS, _TEXT, st.floats(), _TRANSCODED)
)


def _with(row: Row, state: dict[str, Any], **dumps: Any) -> Row:
    raw = json.dumps(state, ensure_ascii=False, **dumps).encode()
    return (*row[:4], raw)


def _outcome(decode: Any, row: Row) -> Any:
    try:
        return decode(row)
    except Exception as error:  # noqa: BLE001 - the two paths must fail alike, whatever it is
        return type(error)


def _agree(log: EventLog, row: Row) -> None:
    slow = _outcome(log.decode_slowly, row)
    fast = _outcome(log._envelope, row)
    if isinstance(slow, type):
        assert fast is slow
        return
    assert not isinstance(fast, type), fast
    assert fast == slow
    assert fast.model_fields_set == slow.model_fields_set
    assert type(fast.timestamp) is type(slow.timestamp)
    assert fast.timestamp.utcoffset() == slow.timestamp.utcoffset()
    # (a lone surrogate, which both read, is text no JSON encoder writes: both fail alike)
    assert _outcome(EventEnvelope.model_dump_json, fast) == _outcome(
        EventEnvelope.model_dump_json, slow
    )


def _no_plain_keys(value: object) -> bool:
    if isinstance(value, dict):
        return "_type_" not in value and all(map(_no_plain_keys, value.values()))
    if isinstance(value, list):
        return all(map(_no_plain_keys, value))
    return True


@settings(max_examples=300)
@given(data=st.data(), payload=st.dictionaries(_TEXT, _PLAIN, max_size=6))
def test_the_fast_path_decodes_plain_payloads_itself(data: Any, payload: dict[str, Any]) -> None:
    assume(_no_plain_keys(payload))
    log, rows = _base_rows()
    row = data.draw(st.sampled_from(rows))
    state = json.loads(row[4])
    for key in payload.keys() & {"timestamp", "meta", "class_version"}:
        del payload[key]
    state.update(payload)
    edited = _with(row, state, separators=(",", ":"))
    assert log._fast is not None
    fast = log._fast.envelope(edited)  # no fallback: these are the fast path's own
    slow = log.decode_slowly(edited)
    assert fast == slow
    assert fast.model_dump_json() == slow.model_dump_json()
    assert fast.model_fields_set == slow.model_fields_set


@settings(max_examples=500)
@given(
    data=st.data(),
    payload=st.dictionaries(_KEYS, _ANY, max_size=6),
    layout=st.sampled_from(
        [{"separators": (",", ":")}, {"indent": 1}, {"separators": (" , ", " : ")}]
    ),
)
def test_fast_and_library_paths_agree_on_arbitrary_states(
    data: Any, payload: dict[str, Any], layout: dict[str, Any]
) -> None:
    log, rows = _base_rows()
    row = data.draw(st.sampled_from(rows))
    state = json.loads(row[4])
    state.update(payload)
    _agree(log, _with(row, state, **layout))


@given(
    data=st.data(),
    where=st.sampled_from(["top", "list", "object", "deep"]),
    number=st.one_of(st.floats(), _BIG_INTS),
)
def test_floats_and_integers_beyond_64_bits_take_the_library_path(
    data: Any, where: str, number: float | int
) -> None:
    log, rows = _base_rows()
    row = data.draw(st.sampled_from(rows))
    state = json.loads(row[4])
    placed = {
        "top": number,
        "list": ["1.5", number],
        "object": {"e": "1e5", "n": number},
        "deep": [{"a": [{"b": number}]}],
    }[where]
    state["extra"] = placed
    edited = _with(row, state, separators=(",", ":"))
    assert log._fast is not None
    with pytest.raises(Exception):  # noqa: B017, PT011 - refused: the library's path decides
        log._fast.envelope(edited)
    _agree(log, edited)
    if isinstance(number, int):  # the library reads it exactly, and so does the log
        assert log._envelope(edited).payload["extra"] == placed


@pytest.mark.parametrize(
    "raw",
    [
        b'{"x":NaN}',
        b'{"x":[Infinity]}',
        b'{"x":-Infinity}',
        b'{"x":"\\ud800"}',
        b'{"x":"\\u005ftype_"}',
        b'{"x":{"\\u005ftype_":"uuid_hex","_data_":"00000000000000000000000000000001"}}',
        b'{"x":1,"x":2.5}',
        b'{"x":1.0e3}',
        b'{"x":1E400}',
        b'{"x":"1.5","y":12345678901234567890123}',
        b'\xef\xbb\xbf{"x":1}',
        b'{"x":"\xff"}',
        b"[1]",
    ],
)
def test_texts_the_library_reads_otherwise_than_orjson(raw: bytes) -> None:
    log, rows = _base_rows()
    row = rows[3]
    state = json.loads(row[4])
    if raw.startswith(b"{"):
        extra = raw[1:]
        raw = json.dumps(state, ensure_ascii=False, separators=(",", ":")).encode()[:-1]
        raw += b"," + extra
    _agree(log, (*row[:4], raw))
