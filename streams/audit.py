"""Audit export: a workspace's events as a hash chain with an Ed25519-signed trailer.

An auditor must be able to check an export offline without trusting us, so everything the check
needs is in the file and in this definition:

* **Canonical JSON** of a value: ``json.dumps(value, sort_keys=True, separators=(",", ":"),
  ensure_ascii=False)`` encoded as UTF-8 — keys sorted, no whitespace, non-ASCII characters as
  themselves. Payloads hold no floats (money and counts are exact), so numbers are integers.
* **Event line**: ``{position, originatorId, version, type, at, actor, data, prevHash, hash}``,
  written as its canonical JSON; ``hash`` is the lowercase hex SHA-256 of the ASCII ``prevHash``
  followed by the canonical JSON of the line without ``hash``. The first line's ``prevHash`` is
  64 zeros (:data:`GENESIS`); every other line's is the previous line's ``hash``.
* **Trailer** (last line): ``{count, headHash, keyId, signature}`` where ``count`` is the number of
  event lines, ``headHash`` the last line's ``hash`` (:data:`GENESIS` for none), ``keyId`` the
  first 16 hex digits of the SHA-256 of the raw Ed25519 public key, and ``signature`` the
  standard-base64 Ed25519 signature of the canonical JSON of the trailer without
  ``signature``. The trailer also says what was exported (:data:`SCOPE_FIELDS`): ``workspaceId``,
  the window ``from``/``to`` (ISO 8601 instants, ``null`` for an open end) and ``exportedAt``:
  every event of the window stored by that instant is in the export (the log was read as it
  stood then, or a moment later), so the signature binds the export to its workspace, window
  and time: a file of one workspace cannot be passed off as another's, nor a part of a history as
  the whole, nor last month's whole history as today's. Exports written before these fields
  have a trailer of the first four alone, signed over ``{count, headHash, keyId}``, or without
  ``exportedAt`` (:data:`EARLIER_SCOPE_FIELDS`); they still verify, and the verdict says what of
  their scope is not signed.

A line edited, removed, inserted, reordered or appended breaks the chain at that line (or the
trailer's count, head hash or signature); :func:`verify` names the first line that does not hold.
Lines must be in canonical form byte for byte, so no edit, not even of whitespace, goes unseen.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from uuid import UUID

from eventsourcing.utils import TopicError, resolve_topic
from psycopg.rows import tuple_row

from adapters.audit_signing import key_id, signature_holds
from adapters.eventlog import UNKNOWN_TIME
from domain.envelope import UNDECODABLE
from domain.errors import UndecodableEvent

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from psycopg import Connection

    from adapters.audit_signing import Signer
    from adapters.eventlog import Row
    from domain.envelope import EventEnvelope

GENESIS = "0" * 64
EVENT_FIELDS = frozenset(
    {"position", "originatorId", "version", "type", "at", "actor", "data", "prevHash", "hash"}
)
TRAILER_FIELDS = frozenset({"count", "headHash", "keyId", "signature"})
SCOPE_FIELDS = frozenset({"workspaceId", "from", "to", "exportedAt"})
#: The scope of exports written before the trailer said when (still verified).
EARLIER_SCOPE_FIELDS = SCOPE_FIELDS - {"exportedAt"}

#: Fields an export leaves out of an event's ``data``: the SHA-256 of an API key's secret and of
#: an invitation's accept token. An auditor is shown that the grant was made, by whom and at
#: which role, not a value to confirm a leaked secret against (exports are handed out).
#: ``tests/unit/test_audit_chain.py`` holds every exported event type's fields to this.
WITHHELD_FIELDS: dict[str, frozenset[str]] = {
    "ApiKey.Created": frozenset({"secret_hash"}),
    "Invitation.Created": frozenset({"token_hash"}),
}

#: Rows fetched per round trip of the server-side cursor; memory stays bounded by this.
PAGE = 2000


def canonical_json(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def line_hash(line: dict[str, Any]) -> str:
    """The ``hash`` of an event line (given without its ``hash``)."""
    digest = hashlib.sha256(str(line["prevHash"]).encode("ascii"))
    digest.update(canonical_json(line).encode("utf-8"))
    return digest.hexdigest()


def signed_part(
    *, count: int, head_hash: str, key: str, scope: dict[str, str | None] | None = None
) -> bytes:
    """What the trailer's signature signs; ``scope`` is the :data:`SCOPE_FIELDS` (``None``
    only to check an export written before the trailer carried them)."""
    signed: dict[str, object] = {"count": count, "headHash": head_hash, "keyId": key}
    return canonical_json(signed | (scope or {})).encode("utf-8")


def export_scope(
    workspace_id: UUID, since: datetime | None, until: datetime | None, exported_at: datetime
) -> dict[str, str | None]:
    return {
        "workspaceId": str(workspace_id),
        "from": None if since is None else since.isoformat(),
        "to": None if until is None else until.isoformat(),
        "exportedAt": exported_at.astimezone(UTC).isoformat(),
    }


def event_line(envelope: EventEnvelope, prev_hash: str) -> tuple[str, str]:
    """An event's line (canonical JSON) and its hash.

    An event that could not be decoded (see :data:`~domain.envelope.UNDECODABLE`) has a line
    too, of that ``type``: its ``data`` names the type it was stored under (``storedType``) and
    why it could not be read (``reason``), its ``at`` is null when its state does not say.
    ``data`` is the payload without its :data:`WITHHELD_FIELDS`."""
    reason = envelope.undecodable
    at: str | None = envelope.timestamp.isoformat()
    if reason and envelope.timestamp == UNKNOWN_TIME:
        at = None
    data = envelope.payload
    withheld = WITHHELD_FIELDS.get(envelope.type)
    if withheld:
        data = {name: value for name, value in data.items() if name not in withheld}
    content = {
        "position": envelope.position,
        "originatorId": str(envelope.originator_id),
        "version": envelope.originator_version,
        "type": UNDECODABLE if reason else envelope.type,
        "at": at,
        "actor": envelope.metadata.get("actor", ""),
        "data": {"storedType": envelope.type, "reason": reason} if reason else data,
        "prevHash": prev_hash,
    }
    body = canonical_json(content)
    digest = hashlib.sha256(prev_hash.encode("ascii"))
    digest.update(body.encode("utf-8"))
    line_hash_ = digest.hexdigest()
    # Keys are sorted: "hash" goes right before the top-level "originatorId", which is the last
    # occurrence of that key (only ids, numbers, hex and type names follow "data").
    cut = body.rindex(',"originatorId":')
    return f'{body[:cut]},"hash":"{line_hash_}"{body[cut:]}', line_hash_


# -- export ---------------------------------------------------------------------------------------


def workspace_exists(conn: Connection[Any], workspace_id: UUID) -> bool:
    """Whether ``workspace_id`` is a workspace's id; :class:`UndecodableEvent` when its first
    event's class no longer resolves (it cannot be told)."""
    topic = _first_value(
        conn,
        "SELECT topic FROM agentworks_events WHERE originator_id = %s AND originator_version = 1",
        (workspace_id,),
    )
    if topic is None:
        return False
    try:
        created = resolve_topic(str(topic))
    except TopicError as error:
        raise UndecodableEvent(
            f"{workspace_id}: its first event is stored as {topic}, which does not resolve "
            f"({error}); whether it is a workspace cannot be told",
            version=1,
        ) from error
    return getattr(created, "__qualname__", None) == "Workspace.Created"


def _first_value(conn: Connection[Any], sql: str, params: tuple[object, ...]) -> object:
    """The first column of the first row ``sql`` finds (None: no row), whichever row factory
    ``conn`` was opened with (the CLI's tuples, a test's dicts)."""
    row = conn.execute(sql, params).fetchone()
    if row is None:
        return None
    return row[0] if isinstance(row, tuple | list) else next(iter(row.values()))


#: Identity events an auditor of a workspace sees for its members (DESIGN.md: "the audit export
#: shows sign-ins"). Users belong to no workspace; a member's sign-ins while a member are shown,
#: nothing else of theirs (no e-mail address, no credential change).
SIGN_IN_TYPES = frozenset({"User.LoginSucceeded", "User.LoginFailed"})
_MEMBERSHIP_CHANGES = frozenset({"Workspace.Created", "Workspace.MemberAdded"})


def _identity_topics() -> tuple[list[str], list[str]]:
    """The sign-ins' topics, and the prefix of every identity aggregate's events' topics."""
    from eventsourcing.utils import get_topic

    from domain.user import IdentityAggregate, User

    identity: list[type] = [IdentityAggregate, *IdentityAggregate.__subclasses__()]
    return (
        [get_topic(User.LoginSucceeded), get_topic(User.LoginFailed)],
        [f"{get_topic(cls)}." for cls in identity],
    )


def workspace_rows(
    conn: Connection[Any], *, workspace_id: UUID, json_prefilter: bool
) -> Iterator[Row]:
    """Every stored event of ``workspace_id``, the sign-ins, and every other event that names no
    workspace and is no identity aggregate's, in log order, through a server-side cursor
    (:func:`export_lines` keeps the sign-ins of the workspace's members, and the unreadable
    events of its aggregates).

    Run inside a transaction (REPEATABLE READ gives one consistent snapshot of the log). With
    plain JSON states Postgres skips other workspaces' rows by the ``workspace_id`` column the
    recorder fills from each state's metadata (reading no state: one that is not JSON must not
    fail the export), and the identity events other than sign-ins by their topic: users and
    their sessions belong to no workspace, so none of those would be exported, and the whole
    installation's (a session's every refresh among them) would be read and decoded only to be
    dropped. Otherwise every row comes back and the caller filters on the decoded metadata.
    """
    sql = (
        "SELECT notification_id, originator_id, originator_version, topic, state"
        " FROM agentworks_events"
    )
    params: tuple[Any, ...] = ()
    if json_prefilter:
        sign_ins, identity = _identity_topics()
        sql += (
            " WHERE workspace_id = %s OR (workspace_id IS NULL AND (topic = ANY(%s)"
            " OR NOT EXISTS (SELECT 1 FROM unnest(%s::text[]) AS p WHERE starts_with(topic, p))))"
        )
        params = (workspace_id, sign_ins, identity)
    with conn.cursor(name="audit_export", row_factory=tuple_row, binary=True) as cur:
        cur.itersize = PAGE
        cur.execute(sql + " ORDER BY notification_id", params)
        yield from cur


def aggregate_workspace(conn: Connection[Any], originator_id: UUID) -> UUID | None:
    """The workspace that an aggregate's readable events name (None: none does): the one an
    event of it that names none itself, because it cannot be read, belongs to."""
    found = _first_value(
        conn,
        "SELECT workspace_id FROM agentworks_events"
        " WHERE originator_id = %s AND workspace_id IS NOT NULL LIMIT 1",
        (originator_id,),
    )
    return found if isinstance(found, UUID) else None


def export_lines(
    rows: Iterable[Row],
    decode: Callable[[Row], EventEnvelope],
    *,
    workspace_id: UUID,
    signer: Signer,
    since: datetime | None = None,
    until: datetime | None = None,
    progress: Callable[[int], None] | None = None,
    owner_of: Callable[[UUID], UUID | None] = lambda originator_id: None,
    exported_at: datetime | None = None,
) -> Iterator[str]:
    """The export's lines (without newlines): one per event of the workspace whose time is in
    ``[since, until)``, and one per sign-in of a user while a member of it, then the signed
    trailer. Holds one row at a time (and the set of current members).

    ``decode`` gives an event that cannot be decoded as an envelope marked so
    (:meth:`adapters.eventlog.EventLog.readable`); it is the workspace's when its stored
    metadata says so or, saying nothing, when ``owner_of`` its aggregate is the workspace, and
    is exported whatever the time window when its time is unknown.

    ``exported_at`` (signed as ``exportedAt``) is an instant no later than the snapshot
    ``rows`` are read from (every event stored by then is among them); by default the time the
    first line is asked for, before any row is read."""
    exported_at = datetime.now(UTC) if exported_at is None else exported_at
    prev = GENESIS
    count = 0
    members: set[str] = set()
    for row in rows:
        envelope = decode(row)
        if progress is not None:
            progress(envelope.position)
        unread = bool(envelope.undecodable)
        if envelope.workspace_id is None and envelope.type in SIGN_IN_TYPES:
            if str(envelope.originator_id) not in members:
                continue
        elif unread and envelope.workspace_id is None:
            if owner_of(envelope.originator_id) != workspace_id:
                continue
        elif envelope.workspace_id != workspace_id:
            continue
        elif not unread:
            _follow_membership(envelope, members)
        timed = not (unread and envelope.timestamp == UNKNOWN_TIME)
        if timed and (
            (since is not None and envelope.timestamp < since)
            or (until is not None and envelope.timestamp >= until)
        ):
            continue
        text, prev = event_line(envelope, prev)
        count += 1
        yield text
    scope = export_scope(workspace_id, since, until, exported_at)
    signature = signer.sign(
        signed_part(count=count, head_hash=prev, key=signer.key_id, scope=scope)
    )
    yield canonical_json(
        {"count": count, "headHash": prev, "keyId": signer.key_id, "signature": signature} | scope
    )


def _follow_membership(envelope: EventEnvelope, members: set[str]) -> None:
    payload = envelope.payload
    if envelope.type in _MEMBERSHIP_CHANGES:
        members.add(str(payload.get("owner_id") or payload.get("user_id")))
    elif envelope.type == "Workspace.MemberRemoved":
        members.discard(str(payload.get("user_id")))


# -- verify ---------------------------------------------------------------------------------------

#: The fields of a trailer as written now, and as written before (see the module's docstring).
_TRAILER_SHAPES = (
    TRAILER_FIELDS | SCOPE_FIELDS,
    TRAILER_FIELDS | EARLIER_SCOPE_FIELDS,
    TRAILER_FIELDS,
)


@dataclass(frozen=True)
class Verdict:
    """What :func:`verify` found: ``ok``, or the first bad ``line`` (1-based) and why."""

    ok: bool
    count: int
    line: int | None = None
    reason: str = ""
    undecodable: int = 0
    """Event lines of type :data:`~domain.envelope.UNDECODABLE`: events the export holds but
    could not read (the chain covers them like any other)."""
    scope: dict[str, str | None] | None = None
    """The signed :data:`SCOPE_FIELDS` of an export that holds (:data:`EARLIER_SCOPE_FIELDS`
    for one written before ``exportedAt``); ``None`` for an export written before the trailer
    carried them (its workspace and window are not signed)."""

    def describe(self) -> str:
        if not self.ok:
            return f"line {self.line}: {self.reason}"
        unread = (
            f"; {self.undecodable} of them could not be decoded when exported (type {UNDECODABLE})"
            if self.undecodable
            else ""
        )
        if self.scope is None:
            what = "its workspace and window are not signed (written before exports said them)"
        else:
            since = self.scope["from"] or "the beginning"
            exported = self.scope.get("exportedAt")
            if exported is None:
                until = self.scope["to"] or "the time of the export"
                when = "; when it was exported is not signed (written before exports said it)"
            else:
                until = self.scope["to"] or f"the export at {exported}"
                when = f"; exported at {exported}" if self.scope["to"] else ""
            what = f"workspace {self.scope['workspaceId']}, from {since} until {until}{when}"
        return f"ok: {self.count} events, chain and signature hold; {what}{unread}"


def verify(lines: Iterable[str | bytes], public_key: Ed25519PublicKey) -> Verdict:
    """Check an export's chain and trailer signature, reading one line at a time.

    Give a file's lines as bytes (a binary file, split on "\n" alone): a line that is not
    UTF-8 is then a bad line like any other, named, where decoding the whole file as text
    fails at its first such byte (read ahead of the lines checked) naming no line."""
    prev = GENESIS
    count = 0
    unread = 0
    number = 0
    trailer: dict[str, Any] | None = None
    trailer_line = 0

    def bad(line: int, reason: str) -> Verdict:
        return Verdict(ok=False, count=count, line=line, reason=reason)

    for number, raw in enumerate(lines, 1):
        if trailer is not None:
            return bad(number, "a line after the trailer (appended)")
        if isinstance(raw, bytes):
            try:
                text = raw.removesuffix(b"\n").decode("utf-8")
            except UnicodeDecodeError:
                return bad(number, "not UTF-8")
        else:
            text = raw.removesuffix("\n")
        try:
            obj = json.loads(text)
            canonical = canonical_json(obj)
        except (ValueError, RecursionError):  # a line nested deeper than the parser goes
            return bad(number, "not a JSON line")
        if not isinstance(obj, dict):
            return bad(number, "not a JSON object")
        if canonical != text:
            return bad(number, "not in canonical JSON form (edited)")
        if "signature" in obj:
            if set(obj) not in _TRAILER_SHAPES:
                return bad(
                    number,
                    f"a trailer must have exactly {sorted(TRAILER_FIELDS)}, with or without "
                    f"{sorted(SCOPE_FIELDS)} (earlier exports: without exportedAt)",
                )
            trailer, trailer_line = obj, number
            continue
        if set(obj) != EVENT_FIELDS:
            return bad(number, f"an event line must have exactly {sorted(EVENT_FIELDS)}")
        if obj["prevHash"] != prev:
            return bad(
                number,
                "prevHash is not the hash of the line before (a line removed, inserted or "
                "reordered)",
            )
        content = {k: v for k, v in obj.items() if k != "hash"}
        if obj["hash"] != line_hash(content):
            return bad(number, "hash does not match the line's content (edited)")
        prev = obj["hash"]
        count += 1
        unread += obj["type"] == UNDECODABLE
    if trailer is None:
        return bad(number + 1, "no trailer: the export is truncated or unsigned")
    # An int and nothing else: 1.0 and true equal 1 in Python, and are not what was signed.
    # The file's own values are named as JSON (ASCII, escaped): the verdict goes to a terminal,
    # and a file from elsewhere may hold what a terminal acts on.
    if type(trailer["count"]) is not int or trailer["count"] != count:
        return bad(
            trailer_line,
            f"trailer counts {json.dumps(trailer['count'])} events, the file has {count}",
        )
    if trailer["headHash"] != prev:
        return bad(trailer_line, "trailer headHash is not the last event line's hash")
    expected_key = key_id(public_key)
    if trailer["keyId"] != expected_key:
        return bad(
            trailer_line,
            f"signed with key {json.dumps(trailer['keyId'])}, not with the given key "
            f"{expected_key}",
        )
    scope = {name: trailer[name] for name in SCOPE_FIELDS if name in trailer} or None
    message = signed_part(count=count, head_hash=prev, key=expected_key, scope=scope)
    if not isinstance(trailer["signature"], str) or not signature_holds(
        public_key, message, trailer["signature"]
    ):
        return bad(trailer_line, "signature does not hold")
    return Verdict(ok=True, count=count, undecodable=unread, scope=scope)
