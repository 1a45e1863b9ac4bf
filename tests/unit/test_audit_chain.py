"""The export's event lines are the canonical JSON of their fields, hash included, whatever the
payload holds (the line is assembled without a second serialisation)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from hypothesis import given
from hypothesis import strategies as st

from domain.envelope import TOPIC_BY_AGGREGATE, EventEnvelope
from domain.events import PAYLOAD_TYPES
from streams.audit import (
    GENESIS,
    SIGN_IN_TYPES,
    WITHHELD_FIELDS,
    canonical_json,
    event_line,
    line_hash,
)

keys = st.sampled_from(["originatorId", "hash", "data", "a", "zz", "é", ',"originatorId":'])
values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(keys | st.text(), inner, max_size=3)
    ),
    max_leaves=12,
)


def _envelope(event_type: str, payload: dict[str, Any], actor: str = "alice") -> EventEnvelope:
    return EventEnvelope(
        position=7,
        originator_id=UUID(int=5),
        originator_version=3,
        aggregate=event_type.split(".")[0],
        type=event_type,
        event_version=1,
        timestamp=datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC),
        workspace_id=UUID(int=9),
        metadata={"actor": actor},
        payload=payload,
    )


@given(payload=st.dictionaries(keys | st.text(), values, max_size=5), actor=st.text())
def test_event_line_is_canonical_json_with_its_hash(payload: dict[str, Any], actor: str) -> None:
    text, digest = event_line(_envelope("Card.Edited", payload, actor), GENESIS)
    parsed = json.loads(text)
    assert text == canonical_json(parsed)
    assert parsed["data"] == payload
    assert parsed["actor"] == actor
    assert digest == parsed["hash"] == line_hash({k: v for k, v in parsed.items() if k != "hash"})


#: Field names of a credential or of what verifies one.
_CREDENTIAL = ("hash", "hashes", "sealed", "secret", "password", "token")


def test_every_exported_field_that_verifies_a_credential_is_withheld() -> None:
    """A new event of a workspace's aggregates (or a sign-in) with such a field must say
    whether the export shows it: add it to ``WITHHELD_FIELDS`` (or rename it)."""
    exported = [
        cls for event, cls in PAYLOAD_TYPES.items()
        if cls.aggregate in TOPIC_BY_AGGREGATE or event in SIGN_IN_TYPES
    ]  # fmt: skip
    found = {
        (cls.event_type, name)
        for cls in exported
        for name in cls.__annotations__
        if any(part in _CREDENTIAL for part in name.split("_"))
    }
    withheld = {(event, name) for event, names in WITHHELD_FIELDS.items() for name in names}
    assert found == withheld


def test_a_withheld_field_is_not_in_the_line() -> None:
    payload = {"name": "ci", "role": "MEMBER", "secret_hash": "ab" * 32}
    text, digest = event_line(_envelope("ApiKey.Created", payload), GENESIS)
    parsed = json.loads(text)
    assert parsed["data"] == {"name": "ci", "role": "MEMBER"}
    assert digest == line_hash({k: v for k, v in parsed.items() if k != "hash"})
