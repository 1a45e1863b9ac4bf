"""The export's event lines are the canonical JSON of their fields, hash included, whatever the
payload holds (the line is assembled without a second serialisation)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from hypothesis import given
from hypothesis import strategies as st

from domain.envelope import EventEnvelope
from streams.audit import GENESIS, canonical_json, event_line, line_hash

keys = st.sampled_from(["originatorId", "hash", "data", "a", "zz", "é", ',"originatorId":'])
values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(keys | st.text(), inner, max_size=3)
    ),
    max_leaves=12,
)


@given(payload=st.dictionaries(keys | st.text(), values, max_size=5), actor=st.text())
def test_event_line_is_canonical_json_with_its_hash(payload: dict[str, Any], actor: str) -> None:
    envelope = EventEnvelope(
        position=7,
        originator_id=UUID(int=5),
        originator_version=3,
        aggregate="Card",
        type="Card.Edited",
        event_version=1,
        timestamp=datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC),
        workspace_id=UUID(int=9),
        metadata={"actor": actor},
        payload=payload,
    )
    text, digest = event_line(envelope, GENESIS)
    parsed = json.loads(text)
    assert text == canonical_json(parsed)
    assert parsed["data"] == payload
    assert parsed["actor"] == actor
    assert digest == parsed["hash"] == line_hash({k: v for k, v in parsed.items() if k != "hash"})
