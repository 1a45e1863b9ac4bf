"""``streams.audit.verify`` over hostile files: a trailer whose numbers are spelt otherwise, and
lines nested deeper than a JSON parser recurses, are named as bad lines, never accepted or
crashed on."""

from __future__ import annotations

from datetime import UTC, datetime
from uuid import UUID

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from adapters.audit_signing import Signer
from domain.envelope import EventEnvelope
from streams.audit import export_lines, verify

WORKSPACE = UUID(int=9)


def _export(events: int) -> tuple[list[str], Signer]:
    signer = Signer(Ed25519PrivateKey.generate())
    envelopes = [
        EventEnvelope(
            position=n,
            originator_id=UUID(int=5),
            originator_version=n,
            aggregate="Card",
            type="Card.Edited",
            event_version=1,
            timestamp=datetime(2026, 1, 2, 3, 4, n, tzinfo=UTC),
            workspace_id=WORKSPACE,
            metadata={"actor": "alice"},
            payload={"title": f"t{n}"},
        )
        for n in range(1, events + 1)
    ]
    lines = list(
        export_lines(envelopes, lambda e: e, workspace_id=WORKSPACE, signer=signer)  # type: ignore[arg-type]
    )
    return lines, signer


@pytest.mark.parametrize(("events", "spelt"), [(0, "0.0"), (0, "false"), (1, "1.0"), (1, "true")])
def test_a_trailer_count_spelt_otherwise_is_a_bad_line(events: int, spelt: str) -> None:
    lines, signer = _export(events)
    assert verify(lines, signer.public_key).ok
    lines[-1] = lines[-1].replace(f'"count":{events},', f'"count":{spelt},')
    verdict = verify(lines, signer.public_key)
    assert not verdict.ok
    assert verdict.line == len(lines)


@pytest.mark.parametrize("opening", ["[", '{"a":'])
def test_a_line_nested_too_deep_is_a_bad_line(opening: str) -> None:
    lines, signer = _export(2)
    lines.insert(1, opening * 100_000)
    verdict = verify(lines, signer.public_key)
    assert not verdict.ok
    assert verdict.line == 2
