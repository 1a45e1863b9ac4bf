"""``agentworks audit export`` / ``audit verify``: a signed hash chain an auditor checks offline.

The CLI runs as a user runs it (a separate process); the tamper properties run the same
``verify`` in-process over a real export, so Hypothesis can try every line.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any
from uuid import UUID, uuid4

import pg
import pytest
from board_helpers import add_cards, bootstrap_board
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_cli import REPO, agentworks, assert_one_line_error
from undecodable import RENAMED, plant_undecodable
from users import user_id

from adapters.audit_signing import (
    DEV_AUDIT_KEY_FILE,
    Signer,
    dev_signing_key,
    load_public_key,
    public_pem,
)
from commands import models as m
from infra.bootstrap import build_write_side
from streams.audit import GENESIS, canonical_json, export_lines, line_hash, verify

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from board_helpers import Board

    from commands.handlers import AgentWorks


# Each test runs the CLI as separate processes (several seconds each on this machine).
pytestmark = pytest.mark.slow


def _activity(app: AgentWorks, board: Board) -> list[Any]:
    cards = add_cards(app, board, 3)
    app.move_card(m.MoveCard(card_id=cards[0], to_lane="Doing"), board.owner)
    app.update_card(m.UpdateCard(card_id=cards[1], title="Ünïcode — title"), board.owner)
    bob = user_id("bob")
    app.add_member(
        m.AddMember(workspace_id=board.workspace_id, user_id=bob, role="MEMBER"), board.owner
    )
    app.assign_card(m.AssignCard(card_id=cards[2], assignee=bob), board.owner)
    return cards


def _export(
    database_url: str, board: Board, tmp_path: Path
) -> tuple[subprocess.CompletedProcess[str], Path, dict[str, str]]:
    """``audit export`` of ``board``'s workspace, which must succeed; with the data dir (of
    the dev signing key) and the environment it ran with."""
    data_dir = tmp_path / "data"
    env = {"AGENTWORKS_DATABASE_URL": database_url}
    result = agentworks(
        "audit", "export", "--workspace", str(board.workspace_id), "--data-dir", str(data_dir),
        cwd=tmp_path, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result, data_dir, env


@pytest.fixture
def exported(write_side: AgentWorks, database_url: str, tmp_path: Path) -> dict[str, Any]:
    """Two workspaces with activity; the first one exported by the CLI into a file."""
    return _exported(write_side, database_url, tmp_path)


def _exported(write_side: AgentWorks, database_url: str, tmp_path: Path) -> dict[str, Any]:
    board = bootstrap_board(write_side)
    other = bootstrap_board(write_side, owner="mallory")
    _activity(write_side, board)
    _activity(write_side, other)
    result, data_dir, env = _export(database_url, board, tmp_path)
    path = tmp_path / "export.jsonl"
    path.write_text(result.stdout, encoding="utf-8")
    key = load_public_key((data_dir / DEV_AUDIT_KEY_FILE).read_text(), source="dev key")
    return {
        "board": board,
        "other": other,
        "path": path,
        "lines": result.stdout.splitlines(),
        "key": key,
        "data_dir": data_dir,
        "env": env,
    }


def _workspace_positions(database_url: str, workspace_id: object) -> list[int]:
    import psycopg

    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT notification_id FROM agentworks_events"
            " WHERE convert_from(state, 'UTF8')::jsonb #>> '{meta,workspace_id}' = %s"
            " ORDER BY notification_id",
            (str(workspace_id),),
        ).fetchall()
    return [int(r[0]) for r in rows]


class TestExport:
    def test_export_holds_exactly_the_workspaces_events_chained_and_signed(
        self, exported: dict[str, Any], database_url: str, tmp_path: Path
    ) -> None:
        lines = [json.loads(text) for text in exported["lines"]]
        events, trailer = lines[:-1], lines[-1]
        assert [e["position"] for e in events] == _workspace_positions(
            database_url, exported["board"].workspace_id
        )
        assert all(text == canonical_json(json.loads(text)) for text in exported["lines"])
        prev = GENESIS
        for event in events:
            assert set(event) == {
                "position", "originatorId", "version", "type", "at", "actor", "data",
                "prevHash", "hash",
            }  # fmt: skip
            assert event["prevHash"] == prev
            assert event["hash"] == line_hash({k: v for k, v in event.items() if k != "hash"})
            prev = event["hash"]
        assert trailer["count"] == len(events)
        assert trailer["headHash"] == prev
        assert {e["actor"] for e in events} == {"alice"}
        assert "Ünïcode — title" in exported["path"].read_text(encoding="utf-8")
        key_file = exported["data_dir"] / DEV_AUDIT_KEY_FILE
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600

    def test_the_trailer_signs_when_the_export_was_taken(
        self, exported: dict[str, Any], database_url: str, tmp_path: Path
    ) -> None:
        """Without it an export said "until the time of the export", signed, and not when:
        last month's whole history passed for today's."""
        before = datetime.now(UTC)
        result, data_dir, _ = _export(database_url, exported["board"], tmp_path)
        after = datetime.now(UTC)
        trailer = json.loads(result.stdout.splitlines()[-1])
        taken = datetime.fromisoformat(trailer["exportedAt"])
        assert before <= taken <= after
        assert taken.utcoffset() == timedelta(0)
        path = tmp_path / "now.jsonl"
        path.write_text(result.stdout, encoding="utf-8")
        checked = agentworks(
            "audit", "verify", str(path), "--data-dir", str(data_dir), cwd=tmp_path
        )
        assert checked.returncode == 0, checked.stderr
        assert f"until the export at {trailer['exportedAt']}" in checked.stdout

    def test_round_trip_verifies_with_the_cli(
        self, exported: dict[str, Any], tmp_path: Path
    ) -> None:
        result = agentworks(
            "audit", "verify", str(exported["path"]), "--data-dir", str(exported["data_dir"]),
            cwd=tmp_path,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert f"{len(exported['lines']) - 1} events" in result.stdout

    def test_verify_shows_its_progress_on_a_terminal(
        self, exported: dict[str, Any], tmp_path: Path
    ) -> None:
        """Checking a long export takes as long as writing it, which shows a bar: verify said
        nothing until its verdict. The bar is drawn on a terminal's stderr only, and cleared,
        so a verdict read by a program stays its one line (the other tests)."""
        import pty

        leader, follower = pty.openpty()
        env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTWORKS_")}
        env |= {"PYTHONPATH": str(REPO), "TERM": "xterm", "COLUMNS": "120"}
        args = ("audit", "verify", str(exported["path"]), "--data-dir", str(exported["data_dir"]))
        with subprocess.Popen(
            [sys.executable, "-m", "infra.cli", *args],
            cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=follower,
        ) as child:  # fmt: skip
            os.close(follower)
            drawn = b""
            with contextlib.suppress(OSError):  # EIO once the child has closed the terminal
                while chunk := os.read(leader, 4096):
                    drawn += chunk
            verdict = child.communicate(timeout=60)[0]
        os.close(leader)
        assert child.returncode == 0, drawn
        assert b"chain and signature hold" in verdict
        assert b"verify" in drawn
        assert f"{exported['path'].stat().st_size / 1000:.1f} kB".encode() in drawn

    def test_verify_with_the_printed_public_key(
        self, exported: dict[str, Any], tmp_path: Path
    ) -> None:
        printed = agentworks(
            "audit", "public-key", "--data-dir", str(exported["data_dir"]), cwd=tmp_path
        )
        assert printed.returncode == 0, printed.stderr
        pem = tmp_path / "audit.pub"
        pem.write_text(printed.stdout)
        # No data dir: only the given public key can verify.
        result = agentworks(
            "audit", "verify", str(exported["path"]), "--public-key", str(pem), cwd=tmp_path
        )
        assert result.returncode == 0, result.stderr

    def test_tampered_file_exits_1_naming_the_line(
        self, exported: dict[str, Any], tmp_path: Path
    ) -> None:
        lines = list(exported["lines"])
        lines[2] = lines[2].replace('"alice"', '"eve"')
        tampered = tmp_path / "tampered.jsonl"
        tampered.write_text("\n".join(lines) + "\n", encoding="utf-8")
        result = agentworks(
            "audit", "verify", str(tampered), "--data-dir", str(exported["data_dir"]), cwd=tmp_path
        )
        line = assert_one_line_error(result, code=1)
        assert "line 3:" in line

    def test_wrong_key_exits_1(self, exported: dict[str, Any], tmp_path: Path) -> None:
        pem = tmp_path / "other.pub"
        pem.write_text(public_pem(Ed25519PrivateKey.generate().public_key()))
        result = agentworks(
            "audit", "verify", str(exported["path"]), "--public-key", str(pem), cwd=tmp_path
        )
        line = assert_one_line_error(result, code=1)
        assert f"line {len(exported['lines'])}:" in line

    def test_time_window_exports_a_chain_of_its_own(
        self, exported: dict[str, Any], tmp_path: Path
    ) -> None:
        events = [json.loads(text) for text in exported["lines"][:-1]]
        cut = datetime.fromisoformat(events[4]["at"])
        result = agentworks(
            "audit", "export", "--workspace", str(exported["board"].workspace_id),
            "--from", cut.isoformat(), "--to", (cut + timedelta(days=1)).isoformat(),
            "--data-dir", str(exported["data_dir"]), cwd=tmp_path, env=exported["env"],
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        window = [json.loads(text) for text in result.stdout.splitlines()]
        assert [e["position"] for e in window[:-1]] == [
            e["position"] for e in events if datetime.fromisoformat(e["at"]) >= cut
        ]
        assert window[0]["prevHash"] == GENESIS
        assert verify(result.stdout.splitlines(), exported["key"]).ok


class TestEncoding:
    """The export is UTF-8 bytes whatever encoding the environment gives stdin and stdout."""

    def test_a_non_utf8_stdout_and_stdin_change_nothing(
        self, exported: dict[str, Any], tmp_path: Path
    ) -> None:
        latin = {**exported["env"], "PYTHONIOENCODING": "latin-1"}
        args = ("--data-dir", str(exported["data_dir"]))
        workspace = str(exported["board"].workspace_id)
        export = _run_bytes(("audit", "export", "--workspace", workspace, *args), tmp_path, latin)
        assert export.returncode == 0, export.stderr.decode(errors="replace")
        # The same bytes as under UTF-8 (the title holds an em dash latin-1 cannot encode), but
        # for the trailer's time of the export (and so its signature).
        *events, trailer = export.stdout.split(b"\n")[:-1]
        *earlier, earlier_trailer = exported["path"].read_bytes().split(b"\n")[:-1]
        assert events == earlier
        differing = {"exportedAt", "signature"}
        assert {k: v for k, v in json.loads(trailer).items() if k not in differing} == {
            k: v for k, v in json.loads(earlier_trailer).items() if k not in differing
        }
        checked = _run_bytes(("audit", "verify", "-", *args), tmp_path, latin, stdin=export.stdout)
        assert checked.returncode == 0, checked.stderr.decode(errors="replace")


def _run_bytes(
    args: tuple[str, ...], cwd: Path, env: dict[str, str], *, stdin: bytes = b""
) -> subprocess.CompletedProcess[bytes]:
    """``python -m infra.cli ARGS`` as :func:`test_cli.agentworks` runs it, bytes in and out."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AGENTWORKS_")}
    clean["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), clean.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "infra.cli", *args],
        cwd=cwd,
        env=clean | env,
        input=stdin,
        capture_output=True,
        timeout=60,
        check=False,
    )


class TestBadInput:
    def test_unknown_workspace_is_exit_2(self, database_url: str, tmp_path: Path) -> None:
        result = agentworks(
            "audit", "export", "--workspace", "00000000-0000-0000-0000-000000000001",
            "--data-dir", str(tmp_path), cwd=tmp_path,
            env={"AGENTWORKS_DATABASE_URL": database_url},
        )  # fmt: skip
        assert "does not exist" in assert_one_line_error(result)

    @pytest.mark.parametrize(
        "args",
        [
            ("--workspace", "not-a-uuid"),
            ("--workspace", "00000000-0000-0000-0000-000000000001", "--from", "yesterday"),
        ],
    )
    def test_malformed_input_is_exit_2(
        self, args: tuple[str, ...], database_url: str, tmp_path: Path
    ) -> None:
        result = agentworks(
            "audit", "export", *args, "--data-dir", str(tmp_path), cwd=tmp_path,
            env={"AGENTWORKS_DATABASE_URL": database_url},
        )  # fmt: skip
        assert_one_line_error(result)

    def test_an_id_whose_first_event_cannot_be_decoded_is_one_line_exit_1(
        self, write_side: AgentWorks, database_url: str, tmp_path: Path
    ) -> None:
        """Whether it is a workspace cannot be told: the export said so with a traceback (the
        topic of its first event, a class since renamed, did not resolve)."""
        board = bootstrap_board(write_side)
        (created,) = write_side.recorder.select_events(board.workspace_id, limit=1)
        renamed = created.topic.replace("Created", "Founded")
        founded = uuid4()
        write_side.recorder.insert_events(
            [type(created)(originator_id=founded, originator_version=1, topic=renamed,
                           state=created.state)]
        )  # fmt: skip
        result = agentworks(
            "audit", "export", "--workspace", str(founded),
            "--data-dir", str(tmp_path), cwd=tmp_path,
            env={"AGENTWORKS_DATABASE_URL": database_url},
        )  # fmt: skip
        line = assert_one_line_error(result, code=1)
        assert renamed in line

    def test_production_verifies_with_no_dev_key(self, tmp_path: Path) -> None:
        """Production signs only with AGENTWORKS_AUDIT_SIGNING_KEY, yet without it (and without
        --public-key) verify took the dev key from the data dir: a file signed by whoever put
        a key there verified, exit 0."""
        data_dir = tmp_path / "data"
        key = dev_signing_key(data_dir, create=True)
        assert key is not None
        workspace = UUID(int=1)
        lines = export_lines([], _no_row, workspace_id=workspace, signer=Signer(key))
        forged = tmp_path / "forged.jsonl"
        forged.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        prod = {"AGENTWORKS_ENV": "prod", "AGENTWORKS_JWT_SECRET": "s" * 40}
        args = ("audit", "verify", str(forged), "--data-dir", str(data_dir))
        refused = agentworks(*args, cwd=tmp_path, env=prod)
        assert "--public-key" in assert_one_line_error(refused)
        assert agentworks(*args, cwd=tmp_path).returncode == 0  # outside production it verifies

    def test_unreadable_file_is_exit_2(self, tmp_path: Path) -> None:
        pem = tmp_path / "k.pub"
        pem.write_text(public_pem(Ed25519PrivateKey.generate().public_key()))
        result = agentworks(
            "audit", "verify", str(tmp_path / "missing.jsonl"), "--public-key", str(pem),
            cwd=tmp_path,
        )  # fmt: skip
        assert "cannot read" in assert_one_line_error(result)


#: Every credential digest the log holds (of API keys' secrets, invitations' accept tokens).
_STORED_DIGESTS = (
    "SELECT convert_from(state, 'UTF8')::jsonb ->> key FROM agentworks_events,"
    " unnest(ARRAY['secret_hash', 'token_hash']) AS key"
    " WHERE convert_from(state, 'UTF8')::jsonb ? key"
)


def test_no_credential_digest_is_exported(
    write_side: AgentWorks, database_url: str, tmp_path: Path
) -> None:
    """An API key's and an invitation's creation are exported (who, which role), not the
    SHA-256 of their secrets (the export held both: a value to confirm a leaked key against,
    in a file handed to auditors)."""
    import psycopg

    from commands.access import CreateApiKey, InviteMember, create_api_key, invite_member

    board = bootstrap_board(write_side)
    workspace = board.workspace_id
    create_api_key(
        write_side, CreateApiKey(workspace_id=workspace, name="ci", role="MEMBER"), board.owner
    )
    invite_member(
        write_side,
        InviteMember(workspace_id=workspace, email="carol@example.com", role="MEMBER"),
        board.owner,
    )
    with psycopg.connect(database_url) as conn:
        stored = conn.execute(_STORED_DIGESTS).fetchall()
    digests = [str(digest) for (digest,) in stored]
    assert len(digests) == 2
    export, data_dir, _ = _export(database_url, board, tmp_path)
    events = {e["type"]: e["data"] for e in map(json.loads, export.stdout.splitlines()[:-1])}
    assert events["ApiKey.Created"] == {
        "created_by": "alice", "name": "ci", "role": "MEMBER", "workspace_id": str(workspace),
    }  # fmt: skip
    assert set(events["Invitation.Created"]) == {
        "email", "expires_at", "invited_by", "role", "workspace_id",
    }  # fmt: skip
    assert not [digest for digest in digests if digest in export.stdout]
    path = tmp_path / "export.jsonl"
    path.write_text(export.stdout, encoding="utf-8")
    checked = agentworks("audit", "verify", str(path), "--data-dir", str(data_dir), cwd=tmp_path)
    assert checked.returncode == 0, checked.stderr


class TestHostileFiles:
    """``verify`` over bytes that are not what an export writes: a verdict naming the line."""

    def test_a_line_that_is_not_utf8_is_named_exit_1(
        self, exported: dict[str, Any], tmp_path: Path
    ) -> None:
        """Such a file was "cannot read FILE: 'utf-8' codec can't decode ...", exit 2 like a
        mistyped path, naming no line (and the decoder reads ahead, so not even an edit on an
        earlier line was named)."""
        lines = [text.encode("utf-8") for text in exported["lines"]]
        lines[1] = lines[1].replace(b'"alice"', b'"al\xffce"')
        lines[3] = lines[3].replace(b'"alice"', b'"\xc0\xa0"')  # an overlong encoding
        tampered = tmp_path / "tampered.jsonl"
        tampered.write_bytes(b"\n".join(lines) + b"\n")
        args = ("--data-dir", str(exported["data_dir"]))
        result = agentworks("audit", "verify", str(tampered), *args, cwd=tmp_path)
        assert "line 2: not UTF-8" in assert_one_line_error(result, code=1)
        piped = _run_bytes(
            ("audit", "verify", "-", *args), tmp_path, {}, stdin=tampered.read_bytes()
        )
        assert piped.returncode == 1
        assert b"line 2: not UTF-8" in piped.stderr
        garbage = tmp_path / "garbage.bin"
        garbage.write_bytes(bytes(range(256)) * 64)
        result = agentworks("audit", "verify", str(garbage), *args, cwd=tmp_path)
        assert "line 1:" in assert_one_line_error(result, code=1)


def _no_row(row: Any) -> Any:  # never called: an export of no rows
    raise AssertionError(row)


# -- every single-line tamper is caught ----------------------------------------------------------

_EXAMPLES = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def _first_bad(lines: list[str], key: Any) -> int | None:
    verdict = verify(lines, key)
    return None if verdict.ok else verdict.line


@pytest.fixture(scope="module")
def one_export(
    clones: pg.Clones, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """:func:`exported` made once, for tests that only read it."""
    with (
        clones.database(pg.random_name("aw_t_tamper_")) as url,
        contextlib.closing(build_write_side(url)) as write_side,
    ):
        yield _exported(write_side, url, tmp_path_factory.mktemp("tamper"))


class TestTamper:
    @pytest.fixture
    def exported(self, one_export: dict[str, Any]) -> dict[str, Any]:
        """One export for all of these tests, which only read it (each tampers with a copy of
        its lines): the export is the costly part, what they check is ``verify``."""
        return one_export

    @_EXAMPLES
    @given(data=st.data())
    def test_an_edited_line_is_named(self, exported: dict[str, Any], data: st.DataObject) -> None:
        lines = list(exported["lines"])
        index = data.draw(st.integers(0, len(lines) - 1), label="line")
        text = lines[index]
        at = data.draw(st.integers(0, len(text) - 1), label="char")
        replacement = data.draw(st.characters(codec="utf-8").filter(lambda c: c != text[at]))
        lines[index] = text[:at] + replacement + text[at + 1 :]
        assert _first_bad(lines, exported["key"]) == index + 1

    @_EXAMPLES
    @given(data=st.data())
    def test_a_removed_line_is_caught(self, exported: dict[str, Any], data: st.DataObject) -> None:
        lines = list(exported["lines"])
        index = data.draw(st.integers(0, len(lines) - 1), label="line")
        del lines[index]
        # The line after the gap no longer chains (or the trailer no longer adds up, or is gone).
        assert _first_bad(lines, exported["key"]) == index + 1

    @_EXAMPLES
    @given(data=st.data())
    def test_two_swapped_lines_are_caught(
        self, exported: dict[str, Any], data: st.DataObject
    ) -> None:
        lines = list(exported["lines"])
        i = data.draw(st.integers(0, len(lines) - 2), label="first")
        j = data.draw(st.integers(i + 1, len(lines) - 1), label="second")
        trailer_moved_up = j == len(lines) - 1
        lines[i], lines[j] = lines[j], lines[i]
        # A trailer moved up ends the export early: the line after it is the first that cannot be.
        assert _first_bad(lines, exported["key"]) == (i + 2 if trailer_moved_up else i + 1)

    @_EXAMPLES
    @given(data=st.data())
    def test_an_inserted_line_is_caught(
        self, exported: dict[str, Any], data: st.DataObject
    ) -> None:
        lines = list(exported["lines"])
        index = data.draw(st.integers(0, len(lines)), label="where")
        source = json.loads(lines[data.draw(st.integers(0, len(lines) - 2), label="copy of")])
        # A well-formed line chained onto its predecessor: only the chain after it can tell.
        prev = GENESIS if index == 0 else json.loads(lines[index - 1]).get("hash", GENESIS)
        forged = {k: v for k, v in source.items() if k != "hash"} | {"prevHash": prev}
        forged["hash"] = line_hash(forged)
        after_trailer = index == len(lines)
        lines.insert(index, canonical_json(forged))
        # The forged line chains; the one after it (or the trailer's count) does not.
        assert _first_bad(lines, exported["key"]) == (index + 1 if after_trailer else index + 2)

    def test_a_wrong_key_is_caught(self, exported: dict[str, Any]) -> None:
        other = Ed25519PrivateKey.generate().public_key()
        assert _first_bad(list(exported["lines"]), other) == len(exported["lines"])

    def test_the_untouched_export_verifies(self, exported: dict[str, Any]) -> None:
        verdict = verify(list(exported["lines"]), exported["key"])
        assert verdict.ok, verdict.describe()
        assert verdict.count == len(exported["lines"]) - 1


def test_canonical_json_is_sorted_compact_utf8() -> None:
    assert canonical_json({"b": 1, "a": ["é", {"d": None, "c": True}]}) == (
        '{"a":["é",{"c":true,"d":null}],"b":1}'
    )
    assert datetime(2026, 1, 1, tzinfo=UTC).isoformat() == "2026-01-01T00:00:00+00:00"


def test_events_that_cannot_be_decoded_are_exported_marked_and_replayed(
    write_side: AgentWorks, database_url: str, tmp_path: Path
) -> None:
    """An event today's code cannot decode (a class renamed; a state that is not JSON, whose row
    names no workspace) used to end the export (the first with a traceback, the second with the
    database refusing to read the state as JSON). Now each of the workspace's is a line of type
    ``agentworks.undecodable`` in the chain, another workspace's stays out, ``verify`` holds and
    counts them, and ``replay card`` shows the history with its state before the first."""
    board = bootstrap_board(write_side)
    other = bootstrap_board(write_side, owner="mallory")
    (card, *_) = _activity(write_side, board)
    (theirs, *_) = _activity(write_side, other)
    renamed = plant_undecodable(write_side, card)
    broken = plant_undecodable(write_side, card, broken_json=True)
    plant_undecodable(write_side, theirs, broken_json=True)
    export, data_dir, env = _export(database_url, board, tmp_path)
    events = [json.loads(text) for text in export.stdout.splitlines()[:-1]]
    unread = [e for e in events if e["type"] == "agentworks.undecodable"]
    assert [(e["originatorId"], e["version"], e["data"]["storedType"]) for e in unread] == [
        (str(card), renamed, RENAMED),
        (str(card), broken, "Card.Labelled"),
    ]
    assert unread[0]["at"] is not None
    assert unread[0]["actor"] == "alice"
    assert unread[1]["at"] is None  # the state that would say is not JSON
    assert all(e["data"]["reason"] for e in unread)
    mine = [e["version"] for e in events if e["originatorId"] == str(card)]
    assert mine == list(range(1, broken + 2))  # every version of the card, none skipped
    path = tmp_path / "export.jsonl"
    path.write_text(export.stdout, encoding="utf-8")
    checked = agentworks("audit", "verify", str(path), "--data-dir", str(data_dir), cwd=tmp_path)
    assert checked.returncode == 0, checked.stderr
    assert "2 of them could not be decoded" in checked.stdout
    replayed = agentworks("replay", "card", str(card), "--json", cwd=tmp_path, env=env)
    assert replayed.returncode == 0, replayed.stderr
    shown = json.loads(replayed.stdout)
    assert [e["version"] for e in shown["events"]] == list(range(1, broken + 2))
    assert [e["type"] for e in shown["events"] if e["version"] in (renamed, broken)] == [
        "agentworks.undecodable"
    ] * 2
    assert shown["state"]["version"] == renamed - 1
    assert f"version {renamed} could not be decoded" in replayed.stderr
