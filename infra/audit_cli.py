"""``agentworks audit`` and ``agentworks replay``: what an auditor and an operator run.

A thin edge like the rest of the CLI (see :mod:`infra.cli`, which registers these groups): parse,
resolve keys from settings, hand over to :mod:`streams.audit` and :mod:`projections.history`, print.
Bad input raises :class:`~domain.errors.AgentWorksError` (exit 2, one line); a verdict that the
user asked for and got — a tampered export, a card that did not exist yet — exits 1 with one
line naming what failed.
"""

from __future__ import annotations

import io
import os
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Annotated, Any, NoReturn, TextIO
from uuid import UUID

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from adapters.audit_signing import (
    Signer,
    dev_signing_key,
    load_private_key,
    load_public_key,
)
from domain.errors import NotFound, ValidationFailed
from infra.cli_common import (
    EXIT_FAILED,
    PROG,
    DataDirOption,
    data_dir_path,
    database_url_for,
    settings_for,
    shown,
)
from infra.settings import ConfigurationError, Settings

if TYPE_CHECKING:
    from collections.abc import Iterator

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from infra.bootstrap import StoredAgentWorks


audit_app = typer.Typer(help="Signed, verifiable exports of a workspace's events.")
replay_app = typer.Typer(help="Cards and boards as they were, from the event store.")


@audit_app.callback(invoke_without_command=True)
@replay_app.callback(invoke_without_command=True)
def _group(ctx: typer.Context) -> None:
    if ctx.invoked_subcommand is None:
        group = ctx.command
        names = group.list_commands(ctx) if isinstance(group, typer.core.TyperGroup) else []
        raise ValidationFailed(
            f"missing command, one of: {', '.join(names)} (see '{ctx.command_path} --help')"
        )


DataDir = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        help="Data dir of the dev signing key; default AGENTWORKS_DATA_DIR, else .agentworks.",
        show_default=False,
        parser=data_dir_path,
    ),
]
#: ``--data-dir`` of the commands that also read the event store.
StoreDataDir = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        help="Data dir whose embedded PostgreSQL (and dev signing key) to use when "
        "AGENTWORKS_DATABASE_URL is unset; default AGENTWORKS_DATA_DIR, else .agentworks.",
        show_default=False,
        parser=data_dir_path,
    ),
]


def _failed(message: str) -> NoReturn:
    """The verdict is "no": one line on stderr, exit 1."""
    print(f"{PROG}: error: {' '.join(message.split())}", file=sys.stderr)
    raise typer.Exit(EXIT_FAILED)


@contextmanager
def _utf8(stream: TextIO) -> Iterator[TextIO]:
    """``stream`` (stdout) as UTF-8 text with lines ending in "\n" alone, whatever encoding
    and newline translation the environment gave it; ``stream`` is left open."""
    buffer = getattr(stream, "buffer", None)
    if buffer is None:  # not backed by bytes (a test's stand-in): nothing to choose
        yield stream
        return
    stream.flush()
    wrapper = io.TextIOWrapper(buffer, encoding="utf-8", newline="\n")
    try:
        yield wrapper
    finally:
        wrapper.flush()
        wrapper.detach()


def _parse_id(text: str, what: str) -> UUID:
    try:
        return UUID(text)
    except ValueError:
        raise ValidationFailed(f"{what} {text!r} is not a UUID") from None


def _write_side(settings: Settings, url: str) -> StoredAgentWorks:
    from infra.bootstrap import write_side_from

    return write_side_from(settings, url)


# -- keys -----------------------------------------------------------------------------------------


def audit_signer(settings: Settings) -> Signer:
    """The key that signs exports: ``AGENTWORKS_AUDIT_SIGNING_KEY``, or outside production the
    development key kept in the data dir (generated on first use, mode 0600)."""
    if settings.audit_signing_key is not None:
        return Signer(
            load_private_key(
                settings.audit_signing_key.get_secret_value(),
                source="AGENTWORKS_AUDIT_SIGNING_KEY",
            )
        )
    if settings.env == "prod":
        raise ConfigurationError(
            "no audit signing key: set AGENTWORKS_AUDIT_SIGNING_KEY (Ed25519, PEM) in production"
        )
    key = dev_signing_key(settings.data_dir, create=True)
    if key is None:
        raise ConfigurationError(f"cannot keep the dev audit signing key in {settings.data_dir}")
    return Signer(key)


def _verifying_key(settings: Settings, given: str | None) -> Ed25519PublicKey:
    if given is not None:
        if given.lstrip().startswith("-----BEGIN"):
            return load_public_key(given, source="--public-key")
        try:
            pem = Path(given).read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValidationFailed(f"--public-key: cannot read {given}: {exc}") from exc
        return load_public_key(pem, source=given)
    if settings.audit_signing_key is not None:
        return audit_signer(settings).public_key
    if settings.env == "prod":
        # Production never signs with a dev key: one in the data dir verifies only forgeries.
        raise ValidationFailed(
            "no public key: pass --public-key PEM (AGENTWORKS_AUDIT_SIGNING_KEY is unset, and "
            "production exports are never signed by the dev key in the data dir)"
        )
    key = dev_signing_key(settings.data_dir, create=False)
    if key is None:
        raise ValidationFailed(
            "no public key: pass --public-key PEM (no AGENTWORKS_AUDIT_SIGNING_KEY and no dev "
            f"key in {settings.data_dir})"
        )
    return key.public_key()


# -- audit ----------------------------------------------------------------------------------------


@audit_app.command("export")
def export_command(
    workspace: Annotated[str, typer.Option("--workspace", help="Workspace id.")],
    since: Annotated[
        str | None,
        typer.Option(
            "--from", help="Only events at or after this ISO-8601 time.", show_default=False
        ),
    ] = None,
    until: Annotated[
        str | None,
        typer.Option("--to", help="Only events before this ISO-8601 time.", show_default=False),
    ] = None,
    data_dir: StoreDataDir = None,
) -> None:
    """Write the workspace's events as hash-chained JSON lines with a signed trailer to stdout.

    Streamed from one consistent snapshot of the log in constant memory; progress on stderr.
    Check a file with `agentworks audit verify FILE`.
    """
    from psycopg import IsolationLevel

    from adapters.postgres import connect
    from projections.history import parse_instant
    from streams.audit import aggregate_workspace, export_lines, workspace_exists, workspace_rows

    workspace_id = _parse_id(workspace, "--workspace")
    start = None if since is None else parse_instant(since, option="--from")
    end = None if until is None else parse_instant(until, option="--to")
    if start is not None and end is not None and end <= start:
        raise ValidationFailed("--to must be after --from")
    settings = settings_for(data_dir)
    url = database_url_for(settings)
    signer = audit_signer(settings)
    console = Console(stderr=True)
    with ExitStack() as stack:
        write = _write_side(settings, url)
        stack.callback(write.close)
        # An event that cannot be decoded is exported as such, not the end of the export.
        decode = write.event_log().readable
        plain = write.mapper.cipher is None and write.mapper.compressor is None
        conn = stack.enter_context(connect(url))
        conn.isolation_level = IsolationLevel.REPEATABLE_READ
        conn.read_only = True
        stack.enter_context(conn.transaction())
        if not workspace_exists(conn, workspace_id):
            raise NotFound(f"workspace {workspace_id} does not exist")
        # The transaction began before its snapshot was taken (at its first statement, above):
        # every event stored by then is in the snapshot, which the trailer signs (exportedAt).
        head = conn.execute(
            "SELECT coalesce(max(notification_id), 0), transaction_timestamp()"
            " FROM agentworks_events"
        )
        top, began = head.fetchone()  # type: ignore[misc]
        top = int(top)
        columns = (
            TextColumn("[bold]export"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]} events/s"),
            TimeRemainingColumn(),
        )
        progress = stack.enter_context(Progress(*columns, console=console, transient=False))
        task = progress.add_task("export", total=max(top, 1), rate="-")
        started = time.monotonic()
        seen = 0

        def advance(position: int) -> None:
            nonlocal seen
            seen += 1
            if seen % 1000 == 0:
                elapsed = max(time.monotonic() - started, 1e-6)
                progress.update(task, completed=position, rate=f"{seen / elapsed:,.0f}")

        # UTF-8 bytes, as the lines were hashed, whatever encoding the environment gives stdout.
        out = stack.enter_context(_utf8(sys.stdout))
        written = 0
        for line in export_lines(
            workspace_rows(conn, workspace_id=workspace_id, json_prefilter=plain),
            decode,
            workspace_id=workspace_id,
            signer=signer,
            since=start,
            until=end,
            progress=advance,
            owner_of=lambda originator_id: aggregate_workspace(conn, originator_id),
            exported_at=began,
        ):
            out.write(line + "\n")
            written += 1
        out.flush()
        progress.update(task, completed=max(top, 1))
    console.print(f"exported {written - 1:,} events, signed with key {signer.key_id}")


@audit_app.command("verify")
def verify_command(
    file: Annotated[str, typer.Argument(help="An export written by `audit export` ('-': stdin).")],
    public_key: Annotated[
        str | None,
        typer.Option(
            "--public-key",
            help="PEM file (or PEM text) of the signer's public key; default: this "
            "deployment's signing key.",
            show_default=False,
        ),
    ] = None,
    data_dir: DataDir = None,
) -> None:
    """Check an export's hash chain and signature; exit 1 naming the first bad line."""
    from streams.audit import verify

    settings = settings_for(data_dir)
    key = _verifying_key(settings, public_key)
    try:
        with ExitStack() as stack:
            # Bytes split on "\n" alone, whatever the environment's encoding: verify decodes
            # each line, so one that is not UTF-8 is named like any other bad line.
            stdin: Any = sys.stdin  # (a test's stand-in may have no buffer)
            handle: IO[bytes] = (
                getattr(stdin, "buffer", stdin)
                if file == "-"
                else stack.enter_context(open(file, "rb"))
            )
            # Drawn on a terminal only, and cleared before the verdict: a verdict read by a
            # program is its one line.
            bar = Progress(*_VERIFY_COLUMNS, console=Console(stderr=True), transient=True)
            verdict = verify(_read_with_progress(handle, stack.enter_context(bar)), key)
    except OSError as exc:
        raise ValidationFailed(f"cannot read {file}: {exc}") from exc
    if not verdict.ok:
        _failed(f"{file} {verdict.describe()}")
    typer.echo(f"{file}: {verdict.describe()}")


_VERIFY_COLUMNS = (
    TextColumn("[bold]verify"),
    BarColumn(),
    DownloadColumn(),
    TransferSpeedColumn(),
    TimeRemainingColumn(),
)


def _read_with_progress(handle: IO[bytes], progress: Progress) -> Iterator[bytes]:
    """``handle``'s lines, with the bytes read shown on ``progress``: a long export takes as
    long to check as to write."""
    try:
        size: int | None = os.fstat(handle.fileno()).st_size or None
    except (OSError, AttributeError, io.UnsupportedOperation):  # a test's stand-in for stdin
        size = None
    task = progress.add_task("verify", total=size)
    read = 0
    for number, line in enumerate(handle, 1):
        read += len(line)
        if number % 1000 == 0:
            progress.update(task, completed=read)
        yield line
    progress.update(task, completed=read)


@audit_app.command("public-key")
def public_key_command(data_dir: DataDir = None) -> None:
    """Print the public key (PEM) that verifies this deployment's exports, for auditors."""
    signer = audit_signer(settings_for(data_dir))
    typer.echo(signer.public_pem(), nl=False)


# -- replay ---------------------------------------------------------------------------------------


@replay_app.command("card")
def replay_card_command(
    card: Annotated[str, typer.Argument(help="Card id.")],
    as_of_version: Annotated[
        int | None,
        typer.Option("--as-of-version", help="The card as of this version.", show_default=False),
    ] = None,
    as_of: Annotated[
        str | None,
        typer.Option("--as-of", help="The card as of this ISO-8601 time.", show_default=False),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    data_dir: DataDirOption = None,
) -> None:
    """A card's history and state, folded from the event store (not a read model)."""
    import json

    from psycopg.rows import dict_row

    from adapters.postgres import connect
    from commands.handlers import Actor
    from projections.history import card_state, history_entries, lane_then, parse_instant
    from read_api.eventlog import card_log, chosen_version, foldable_version

    card_id = _parse_id(card, "card")
    instant = None if as_of is None else parse_instant(as_of, option="--as-of")
    if as_of_version is not None and instant is not None:
        raise ValidationFailed("give --as-of-version or --as-of, not both")
    settings = settings_for(data_dir)
    url = database_url_for(settings)
    with ExitStack() as stack:
        write = _write_side(settings, url)
        stack.callback(write.close)
        conn = stack.enter_context(connect(url, row_factory=dict_row))
        envelopes = card_log(conn, write.mapper, card_id=card_id)
        try:
            version = chosen_version(
                envelopes,
                as_of_version=as_of_version,
                as_of=instant,
                names=("--as-of-version", "--as-of"),
            )
        except NotFound as exc:
            _failed(str(exc))
        workspace_id = envelopes[0].workspace_id
        folded = foldable_version(card_id, envelopes, version)
        state = write.card_at(card_id, Actor.service("replay", str(workspace_id)), version=folded)
        # Its lane by the board's name for it then (at a version, when that was made).
        then = state.modified_on if as_of_version is not None else instant
        lane = lane_then(conn, write.mapper, state, envelopes, as_of=then)
    entries = history_entries(envelopes[:version])
    for entry in entries:
        if entry.reason:
            # Said on stderr (the history itself goes on): the operator can do something.
            cut = f"; the state is as of version {folded}" if entry.version == folded + 1 else ""
            print(
                f"{PROG}: warning: card {card_id} version {entry.version} could not be decoded"
                f" ({entry.reason}){cut}",
                file=sys.stderr,
            )
    events = [entry.as_dict() for entry in entries]
    result: dict[str, Any] = {
        "cardId": str(card_id),
        "workspaceId": str(workspace_id),
        "version": version,
        "state": card_state(state) | {"lane": lane},
        "events": events,
    }
    if as_json:
        typer.echo(json.dumps(result, indent=2, ensure_ascii=False))
        return
    _print_card(result)


def _print_card(result: dict[str, Any]) -> None:
    console = Console()
    table = Table(title=f"card {result['cardId']} — history up to version {result['version']}")
    table.add_column("version", justify="right")
    table.add_column("who")
    table.add_column("when")
    table.add_column("what")
    table.add_column("position", justify="right")
    for event in result["events"]:
        data = ", ".join(f"{k}={v}" for k, v in event["data"].items() if k != "meta")
        what = event["type"] + (f" ({data})" if data else "")
        when = event["at"] or "(unknown)"
        table.add_row(
            str(event["version"]), shown(event["actor"]), when, shown(what), event["position"]
        )
    console.print(table)
    state = Table(title="state", show_header=False)
    state.add_column("field")
    state.add_column("value")
    for key, value in result["state"].items():
        state.add_row(key, shown("" if value is None else str(value)))
    console.print(state)


@replay_app.command("board")
def replay_board_command(
    project: Annotated[str, typer.Argument(help="Project id.")],
    as_of: Annotated[str, typer.Option("--as-of", help="The board as of this ISO-8601 time.")],
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    data_dir: DataDirOption = None,
) -> None:
    """A board as it was at an instant, folded from the event store (not a read model)."""
    import json

    from adapters.postgres import connect
    from projections.history import NotYet, board_as_of, parse_instant

    project_id = _parse_id(project, "project")
    instant = parse_instant(as_of, option="--as-of")
    settings = settings_for(data_dir)
    url = database_url_for(settings)
    with ExitStack() as stack:
        write = _write_side(settings, url)
        stack.callback(write.close)
        conn = stack.enter_context(connect(url))
        try:
            board = board_as_of(conn, write.mapper, project_id=project_id, as_of=instant)
        except NotYet as exc:
            _failed(str(exc))
    for card_id, version in board.unreadable.items():
        # Said on stderr (the board itself goes on), as replay card says it.
        print(
            f"{PROG}: warning: card {card_id} version {version} could not be decoded; the card"
            f" is shown as of the version before it",
            file=sys.stderr,
        )
    result = board.as_dict()
    if as_json:
        typer.echo(json.dumps(result, indent=2, ensure_ascii=False))
        return
    console = Console()
    for lane in result["lanes"]:
        limit = "" if lane["wipLimit"] is None else f" / WIP {lane['wipLimit']}"
        table = Table(title=shown(f"{lane['name']} ({lane['count']}{limit})"))
        table.add_column("card")
        table.add_column("title")
        table.add_column("assignee")
        table.add_column("version", justify="right")
        for card in lane["cards"]:
            table.add_row(
                card["id"], shown(card["title"]), card["assignee"] or "", str(card["version"])
            )
        console.print(table)
    console.print(f"board version {result['version']} as of {result['asOf']}")
