"""``streams.audit.verify`` over hostile files: a trailer whose numbers are spelt otherwise, and
lines nested deeper than a JSON parser recurses, are named as bad lines, never accepted or
crashed on."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from uuid import UUID

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from adapters.audit_signing import Signer
from domain.envelope import EventEnvelope
from streams.audit import canonical_json, export_lines, verify

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


EXPORTED_AT = datetime(2026, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)


def _scoped_export(**window: datetime) -> tuple[list[str], Signer]:
    signer = Signer(Ed25519PrivateKey.generate())
    lines = list(
        export_lines(
            [], lambda e: e, workspace_id=WORKSPACE, signer=signer, exported_at=EXPORTED_AT,  # type: ignore[arg-type]
            **window,
        )
    )  # fmt: skip
    return lines, signer


def test_the_verdict_names_the_signed_workspace_and_window() -> None:
    since = datetime(2026, 3, 1, tzinfo=UTC)
    lines, signer = _scoped_export(since=since)
    verdict = verify(lines, signer.public_key)
    assert verdict.ok
    assert verdict.scope == {
        "workspaceId": str(WORKSPACE),
        "from": since.isoformat(),
        "to": None,
        "exportedAt": EXPORTED_AT.isoformat(),
    }
    assert (
        f"workspace {WORKSPACE}, from {since.isoformat()} until the export at "
        f"{EXPORTED_AT.isoformat()}"
    ) in verdict.describe()


@pytest.mark.parametrize(
    ("field", "forged"),
    [
        ("workspaceId", str(UUID(int=10))),
        ("from", None),
        ("to", "2026-04-01T00:00:00+00:00"),
        # An export of the whole history taken long ago, shown as today's.
        ("exportedAt", "2026-12-01T00:00:00+00:00"),
    ],
)
def test_an_export_passed_off_as_another_workspace_or_window_does_not_verify(
    field: str, forged: str | None
) -> None:
    """One workspace's export shown as another's, a month of it as its whole history, or its
    whole history as it stood long ago as it stands now (the trailer did not say when it was
    taken, and the verdict said "until the time of the export")."""
    lines, signer = _scoped_export(since=datetime(2026, 3, 1, tzinfo=UTC))
    trailer = json.loads(lines[-1])
    assert trailer[field] != forged
    lines[-1] = canonical_json(trailer | {field: forged})
    verdict = verify(lines, signer.public_key)
    assert not verdict.ok
    assert (verdict.line, verdict.reason) == (len(lines), "signature does not hold")


def test_an_export_written_before_the_trailer_said_its_scope_still_verifies() -> None:
    lines, signer = _export(2)
    trailer = json.loads(lines[-1])
    head = {"count": 2, "headHash": trailer["headHash"], "keyId": signer.key_id}
    old = head | {"signature": signer.sign(canonical_json(head).encode("utf-8"))}
    lines[-1] = canonical_json(old)
    verdict = verify(lines, signer.public_key)
    assert verdict.ok
    assert verdict.scope is None
    assert "not signed" in verdict.describe()
    lines[-1] = canonical_json(old | {"workspaceId": str(WORKSPACE)})
    assert not verify(lines, signer.public_key).ok


def test_an_export_written_before_the_trailer_said_when_still_verifies() -> None:
    lines, signer = _scoped_export(since=datetime(2026, 3, 1, tzinfo=UTC))
    trailer = json.loads(lines[-1])
    del trailer["exportedAt"], trailer["signature"]
    earlier = trailer | {"signature": signer.sign(canonical_json(trailer).encode("utf-8"))}
    lines[-1] = canonical_json(earlier)
    verdict = verify(lines, signer.public_key)
    assert verdict.ok, verdict.describe()
    assert verdict.scope is not None
    assert "exportedAt" not in verdict.scope
    assert "when it was exported is not signed" in verdict.describe()


_BASE64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


@pytest.mark.parametrize("unused", range(1, 16))
def test_a_signature_respelt_in_its_unused_base64_bits_is_a_bad_line(unused: int) -> None:
    # A 64-byte signature is 86 base64 digits and "==": the last digit carries 2 bits of the
    # signature and 4 bits that decode to nothing. Another digit there decodes to the same
    # signature, so the trailer line was edited and still verified.
    lines, signer = _export(2)
    trailer = json.loads(lines[-1])
    signature = trailer["signature"]
    assert signature.endswith("==")
    last = _BASE64.index(signature[-3])
    trailer["signature"] = signature[:-3] + _BASE64[last ^ unused] + "=="
    lines[-1] = canonical_json(trailer)
    verdict = verify(lines, signer.public_key)
    assert not verdict.ok
    assert verdict.line == len(lines)
    assert verdict.reason == "signature does not hold"


@pytest.mark.parametrize("field", ["count", "keyId"])
def test_a_trailers_own_text_is_named_with_what_a_terminal_acts_on_escaped(field: str) -> None:
    # `audit verify` runs on files from elsewhere and prints its verdict to a terminal: a count
    # or key id holding an escape sequence (here: clear the screen, write the clipboard) was
    # printed as it was, for the terminal to act on.
    lines, signer = _export(2)
    trailer = json.loads(lines[-1])
    trailer[field] = "\x1b[2J\x1b]52;c;cm0gLXJmIH4=\x07\u202e"
    lines[-1] = canonical_json(trailer)
    verdict = verify(lines, signer.public_key)
    assert not verdict.ok
    said = verdict.describe()
    assert not [c for c in said if c < " " or c == "\x7f" or c == "\u202e"], said
    assert "\\u001b[2J" in said
