"""The ``agentworks`` command line: a thin edge over the composition root.

Each subcommand parses its options, loads :class:`~infra.settings.Settings` once, calls into the
application and maps errors to exit codes; no business rule lives here. Exit codes:

* 0 — done;
* 1 — the work failed (database unreachable, a migration failed);
* 2 — bad input or configuration (unknown option, missing argument, bad env var), reported as
  one line on stderr, never a traceback.

Adding a subcommand (``dev``, ``serve``, ``relay``, ``worker``, ``orchestrator``, ``rebuild``,
``replay``, ``invoice``, ``reconcile``, ``audit``): write a function decorated with
``@app.command()`` in the section "Subcommands" below (or a module of its own registered with
``app.add_typer``, taking what it shares with this module from :mod:`infra.cli_common`), get
settings with :func:`~infra.cli_common.settings_for`, raise :class:`~infra.cli_common.CliError`,
:class:`~domain.errors.AgentWorksError` or :class:`~infra.settings.ConfigurationError` for
anything the user should fix; :func:`main` turns them into one line and an exit code.
"""

from __future__ import annotations

import errno
import inspect
import io
import os
import signal
import socket
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Protocol
from uuid import NAMESPACE_URL, UUID, uuid5

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from typer.exceptions import TyperException

from adapters.allocator import cap_malloc_arenas
from adapters.tokens import BOOTSTRAP_WORKSPACE, issue_token
from domain.errors import AgentWorksError, ConfigurationError, SetupError, UndecodableEvent
from domain.roles import Role
from infra import billing_cli
from infra.cli_common import (
    EXIT_FAILED,
    EXIT_USAGE,
    PROG,
    CliError,
    DataDirOption,
    database_url_for,
    resources,
    settings_for,
    shown,
)
from infra.migrate import MigrationError, discover, ensure_database, migrate
from infra.settings import (
    Settings,
    checked_database_url,
    db_logins,
    deployed_relays,
    jwt_keys,
)
from projections.registry import projector_names

if TYPE_CHECKING:
    from collections.abc import Sequence

    from _typeshed import ReadableBuffer

    from infra.bootstrap import ReadSide
    from infra.stack import DevStack
    from projections.rebuild import RebuildResult
    from projections.runner import Retried

#: ``sub`` of a bootstrap token when ``--user`` is not given (user ids are UUIDs, API.md).
BOOTSTRAP_USER = str(uuid5(NAMESPACE_URL, "https://agentworks.dev/users/bootstrap"))

app = typer.Typer(
    name=PROG,
    help="AgentWorks backend: event-sourced Kanban for AI agents, metered and billed.",
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"{PROG} {version('agentworks')}")
        except PackageNotFoundError:
            typer.echo(f"{PROG} (version unknown: not installed as a package)")
        raise typer.Exit


@app.callback(invoke_without_command=True)
def _root(
    ctx: typer.Context,
    _show_version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    if ctx.invoked_subcommand is None:
        group = ctx.command
        names = group.list_commands(ctx) if isinstance(group, typer.core.TyperGroup) else []
        raise CliError(f"missing command, one of: {', '.join(names)} (see '{PROG} --help')")


# --- Subcommands -------------------------------------------------------------------------------

_PROJECTOR_HELP = f"Projector name ({', '.join(projector_names())}), or 'all'."


def _database_url_option(value: str | None) -> str | None:
    """``--database-url`` held to ``AGENTWORKS_DATABASE_URL``'s rule, and named as itself. An
    empty one is refused: taken for none (a ``--database-url "$URL"`` whose variable is unset),
    it left the configured database alone and migrated the data dir's embedded one."""
    if value is None:
        return None
    if not value.strip():
        raise typer.BadParameter(
            "is empty; give a postgresql:// URL, or leave the option out for "
            "AGENTWORKS_DATABASE_URL"
        )
    try:
        return checked_database_url(value)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None


@app.command("migrate")
def migrate_command(
    database_url: Annotated[
        str | None,
        typer.Option(
            "--database-url",
            help="postgresql:// URL; default AGENTWORKS_DATABASE_URL.",
            show_default=False,
            callback=_database_url_option,
        ),
    ] = None,
    create_database: Annotated[
        bool,
        typer.Option("--create-database/--no-create-database", help="Create it if missing."),
    ] = True,
    rebuild: Annotated[
        bool,
        typer.Option(
            "--rebuild/--no-rebuild",
            help="Rebuild the read models that an older revision of their projector built.",
        ),
    ] = True,
    data_dir: DataDirOption = None,
) -> None:
    """Apply pending SQL migrations to the database (safe to run concurrently, idempotent),
    then rebuild the read models an older revision of their projector built.

    Run it as the database's owner: it also lets each component's role log in, with its password
    from AGENTWORKS_DB_*_PASSWORD (outside production, generated and kept in the data dir).
    """
    overrides: dict[str, object] = {} if database_url is None else {"database_url": database_url}
    settings = settings_for(data_dir, **overrides)
    url = database_url_for(settings)
    if create_database:
        ensure_database(url)
    known = {m.version: m for m in discover()}
    applied = migrate(url, app_role=settings.db_app_role, logins=db_logins(settings))

    console = Console()
    if not applied:
        latest = max(known, default="none")
        console.print(f"Database is up to date (latest migration: {latest}).")
    else:
        table = Table(title=f"Applied {len(applied)} migration(s)")
        table.add_column("version")
        table.add_column("name")
        for version in applied:
            table.add_row(version, known[version].name if version in known else "")
        console.print(table)
    _rebuild_stale_read_models(settings, url, console, rebuild=rebuild)


def _rebuild_stale_read_models(
    settings: Settings, url: str, console: Console, *, rebuild: bool
) -> None:
    from infra.bootstrap import build_read_side
    from projections.rebuild import rebuild_stale

    read_side = build_read_side(settings, url)
    try:
        stale, revisions = read_side.revisions()
        for line in revisions.describe_newer():
            console.print(f"[yellow]{line}")
        if not revisions.stale:
            return
        if not rebuild:
            for line in revisions.describe_stale(
                then=f"run '{PROG} rebuild {{name}}' (--no-rebuild)"
            ):
                console.print(f"[yellow]{line}")
            return
        for line in revisions.describe_stale():
            console.print(line)
        _replay_with_progress(
            read_side,
            console,
            ", ".join(projector.name for projector in stale),
            lambda progress: rebuild_stale(
                stale, read_side.pool, read_side.event_log, progress=progress
            ),
        )
    finally:
        read_side.close()


@app.command("token")
def token_command(
    bootstrap: Annotated[
        bool,
        typer.Option("--bootstrap", help="Token for creating a workspace (ws='*', OWNER)."),
    ] = False,
    workspace: Annotated[
        str | None, typer.Option("--workspace", help="Workspace id.", show_default=False)
    ] = None,
    user: Annotated[
        str | None,
        typer.Option(
            "--user",
            help=f"User id, a UUID (the 'sub' claim); with --bootstrap default {BOOTSTRAP_USER}.",
            show_default=False,
        ),
    ] = None,
    role: Annotated[
        str | None,
        typer.Option("--role", help="OWNER, ADMIN, MEMBER or VIEWER.", show_default=False),
    ] = None,
    ttl: Annotated[int, typer.Option("--ttl", help="Lifetime in seconds.", min=1)] = 3600,
    data_dir: DataDirOption = None,
) -> None:
    """Print a signed JWT for development and scripts (the token alone, on stdout)."""
    if bootstrap:
        if workspace is not None:
            raise CliError("--bootstrap and --workspace exclude each other")
        if role is not None and Role.parse(role) is not Role.OWNER:
            raise CliError("a --bootstrap token is always OWNER; drop --role")
        user_id = BOOTSTRAP_USER if user is None else _id_option("--user", user)
        workspace_id, parsed_role = BOOTSTRAP_WORKSPACE, Role.OWNER
    else:
        if workspace is None or user is None or role is None:
            missing = [
                name
                for name, value in (("--workspace", workspace), ("--user", user), ("--role", role))
                if value is None
            ]
            raise CliError(f"missing {', '.join(missing)} (or pass --bootstrap)")
        if workspace == BOOTSTRAP_WORKSPACE:
            raise CliError("--workspace '*' is the bootstrap workspace; use --bootstrap")
        workspace_id, user_id = _id_option("--workspace", workspace), _id_option("--user", user)
        parsed_role = Role.parse(role)

    settings = settings_for(data_dir)
    keys = jwt_keys(settings, data_dir=data_dir)
    if not keys.can_sign:
        raise CliError(
            "AGENTWORKS_JWT_PUBLIC_KEY only verifies tokens; "
            "set AGENTWORKS_JWT_PRIVATE_KEY to sign them"
        )
    try:
        token = issue_token(
            user_id=user_id,
            workspace_id=workspace_id,
            role=parsed_role,
            ttl_seconds=ttl,
            secret=keys.secret,
            private_key=keys.private_key,
        )
    except OverflowError:
        raise CliError(f"--ttl {ttl} is too large for an expiry date") from None
    typer.echo(token)


def _id_option(option: str, value: str) -> str:
    """An id option as the API reads ids: a UUID, in canonical form; else a usage error."""
    try:
        return str(UUID(value))
    except ValueError:
        raise CliError(f"{option} must be a UUID, got {value[:60]!r}") from None


def _listen(host: str, port: int, *, choose: str = "--port") -> socket.socket:
    """The server's listening socket, bound now so that a busy port is refused up front
    (naming ``choose``, where another port is set)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise CliError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    family, kind, proto, _, address = infos[0]
    listener = socket.socket(family, kind, proto)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind(address)
        listener.listen(2048)
    except OSError as exc:
        listener.close()
        if exc.errno == errno.EADDRINUSE:
            raise CliError(
                f"port {port} on {host} is already in use (another agentworks?); "
                f"choose another with {choose}"
            ) from exc
        raise CliError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    return listener


def _without_password(url: str) -> str:
    """``url`` fit to print: a password in it is masked."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    try:
        parts = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "(unparsable database URL)"
    if not parts.get("password"):
        return url
    parts["password"] = "***"  # noqa: S105 - the mask, not a password
    return make_conninfo("", **parts)


def _serve_process_metrics(settings: Settings) -> None:
    """``GET /metrics`` of this relay, worker or orchestrator process, on
    ``AGENTWORKS_METRICS_PORT`` when it is set, until the command ends."""
    if settings.metrics_port is None:
        return
    from adapters.metrics import MetricsServer

    listener = _listen(
        settings.metrics_host, settings.metrics_port, choose="AGENTWORKS_METRICS_PORT"
    )
    token = settings.metrics_token
    server = MetricsServer(listener, token=None if token is None else token.get_secret_value())
    resources.callback(server.close)


def _stop_on_signals(stop: Callable[[], None]) -> None:
    """SIGTERM and SIGINT ask a long-running loop to finish its batch and exit cleanly."""

    def handle(signum: int, _frame: object) -> None:
        stop()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    signal.signal(signal.SIGHUP, handle)


_Host = Annotated[str, typer.Option("--host", help="Interface to listen on.")]
_Port = Annotated[int, typer.Option("--port", help="Port to listen on.", min=1, max=65535)]


@app.command("dev")
def dev_command(
    host: _Host = "127.0.0.1",
    port: _Port = 8000,
    data_dir: DataDirOption = None,
    demo: Annotated[bool, typer.Option("--demo", help="Seed a demo workspace.")] = False,
) -> None:
    """Run everything in one process: database (embedded by default), API and projectors."""
    from adapters.tokens import issue_token
    from infra.demo import seed_demo, seed_demo_user
    from infra.stack import build_dev_stack, serve_app, start_tracing
    from read_api.app import create_app

    settings = settings_for(data_dir)
    if settings.database_url is None and settings.env == "prod":
        # As every other command refuses it (cli_common): production has no embedded database.
        raise CliError("AGENTWORKS_DATABASE_URL is not set; production has no embedded database")
    cap_malloc_arenas(settings.malloc_arena_max)
    # Before anything starts or is announced: a busy port is one line and exit 2.
    listener = _listen(host, port)
    resources.callback(listener.close)
    start_tracing(settings, "agentworks-dev")
    console = Console(stderr=True, soft_wrap=True)
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    embedded = None
    if settings.database_url is None:
        from infra.embedded import open_embedded

        # Held here so that the server stops when dev ends, whichever signal ends it.
        embedded = open_embedded(settings.data_dir)
        resources.callback(embedded.close)
    stack = build_dev_stack(settings, settings.data_dir)
    try:
        stack.start()
        where = "embedded PostgreSQL" if settings.database_url is None else "configured PostgreSQL"
        console.print(
            f"[bold]AgentWorks dev[/bold] on {where}, fan-out: {stack.mode}; "
            f"data dir {settings.data_dir.resolve()}"
        )
        console.print(f"Database: {_without_password(stack.database_url)}", highlight=False)
        if demo:
            seeded = seed_demo(stack.write)
            keys = jwt_keys(settings, data_dir=settings.data_dir)
            token = issue_token(
                user_id=seeded.owner,
                workspace_id=str(seeded.workspace_id),
                role=Role.OWNER,
                ttl_seconds=7 * 24 * 3600,
                secret=keys.secret,
                private_key=keys.private_key,
            )
            if stack.services.auth is not None:
                email, password = seed_demo_user(
                    stack.write, stack.services.auth.identity, seeded, settings.data_dir
                )
                console.print(
                    f"Demo user: {email} / {password} (POST /auth/login)", highlight=False
                )
            console.print(
                f"Demo workspace {seeded.workspace_id}, project {seeded.project_id} "
                f"({seeded.cards} cards). Token for {seeded.owner} (OWNER):"
            )
            typer.echo(token)
        else:
            dir_option = f"--data-dir {settings.data_dir}"
            console.print(
                f"Tokens: `{PROG} token --bootstrap {dir_option}` (may create a workspace), then "
                f"`{PROG} token --workspace ID --user ID --role OWNER {dir_option}`; "
                "or restart with --demo for a seeded workspace and its token.",
                highlight=False,
            )
        # The URL only once an event written now reaches the read models (through Kafka: the
        # workers hold their partitions), so a client's first writes read back fresh.
        announce = threading.Thread(
            target=_announce_when_ready,
            args=(stack, console, f"GraphQL: http://{host}:{port}/graphql  (Ctrl-C to stop)"),
            name="dev-ready",
            daemon=True,
        )
        announce.start()
        serve_app(create_app(stack.services), host=host, port=port, sock=listener)
    finally:
        stack.stop()
        if embedded is not None:
            embedded.close()
        console.print("stopped")


def _announce_when_ready(stack: DevStack, console: Console, line: str) -> None:
    stack.wait_until_ready()
    console.print(line)


@app.command("serve")
def serve_command(
    host: _Host = "127.0.0.1",
    port: _Port = 8000,
    data_dir: DataDirOption = None,
) -> None:
    """Run the GraphQL API alone against the configured PostgreSQL (and Redis)."""
    from infra.stack import api_process, serve_app, start_tracing

    settings = settings_for(data_dir)
    cap_malloc_arenas(settings.malloc_arena_max)
    listener = _listen(host, port)
    resources.callback(listener.close)
    if settings.database_url is None:
        settings = settings.model_copy(update={"database_url": database_url_for(settings)})
    start_tracing(settings, "agentworks-api")
    app_, write_side = api_process(settings)
    _announce_serve(settings, host=host, port=port)
    try:
        serve_app(app_, host=host, port=port, sock=listener)
    finally:
        write_side.close()


def _announce_serve(settings: Settings, *, host: str, port: int) -> None:
    """Say what this process runs and what it counts on other processes for."""
    import structlog

    log = structlog.get_logger(__name__)
    log.info(
        "serving the GraphQL API only",
        url=f"http://{host}:{port}/graphql",
        database=_without_password(settings.database_url or ""),
        redis="configured"
        if settings.redis_url
        else "not configured: subscriptions and rate limits are local to this process",
    )
    if settings.kafka_bootstrap:
        expects = (
            f"run `agentworks relay` and `agentworks worker` against {settings.kafka_bootstrap}"
        )
    else:
        expects = (
            "AGENTWORKS_KAFKA_BOOTSTRAP is not set, so only `agentworks dev` on this database "
            "feeds the read models"
        )
    log.warning(
        f"no projectors in this process: {expects}; until one runs, writes are accepted but "
        "reads stay stale and /readyz answers 503",
        projector_stall_seconds=settings.projector_stall_seconds,
    )


@app.command("relay")
def relay_command(data_dir: DataDirOption = None) -> None:
    """Publish the event log to Kafka, in order, resuming where the last run stopped."""
    from infra.bootstrap import build_relay
    from infra.stack import start_tracing

    settings = settings_for(data_dir)
    _serve_process_metrics(settings)
    start_tracing(settings, "agentworks-relay")
    relay, event_log = build_relay(settings, database_url_for(settings))
    _stop_on_signals(relay.stop)
    try:
        relay.run_forever()
    finally:
        event_log.close()


@app.command("orchestrator")
def orchestrator_command(data_dir: DataDirOption = None) -> None:
    """Execute agent runs: follow the log for requested runs, call providers, meter and log."""
    import asyncio

    from adapters.postgres import make_pool
    from infra.bootstrap import component_url, write_side_from
    from infra.orchestration import build_orchestrator
    from infra.stack import start_tracing

    settings = settings_for(data_dir)
    _serve_process_metrics(settings)
    start_tracing(settings, "agentworks-orchestrator")
    url = database_url_for(settings)
    # The orchestrator writes events: it logs in as the writer (no role of its own yet); its
    # spend checks read the billing read model as the API does, one workspace at a time.
    write_side = write_side_from(settings, url, data_dir=settings.data_dir)
    write_side.write_each_command_alone()
    read_pool = make_pool(
        component_url(settings, url, "api", data_dir=settings.data_dir),
        max_size=2,
        name="orchestrator-reads",
        timeout=settings.pool_timeout,
    )
    orchestrator = build_orchestrator(
        settings,
        write_side,
        write_side.event_log(),
        read_pool,
        listen_url=component_url(settings, url, "writer", data_dir=settings.data_dir),
    )

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, orchestrator.stop)
        await orchestrator.run()

    try:
        asyncio.run(main())
    finally:
        read_pool.close()
        write_side.close()


@app.command("worker")
def worker_command(
    projector: Annotated[
        str | None,
        typer.Option("--projector", help="Run only this projector (default: one process each)."),
    ] = None,
    data_dir: DataDirOption = None,
) -> None:
    """Feed read models from Kafka: one consumer group per projector."""
    from projections.registry import projector_named

    if projector is not None:
        projector_named(projector)  # a typo is refused with the valid names, before Kafka
    settings = settings_for(data_dir)
    if not settings.kafka_bootstrap:
        raise CliError("AGENTWORKS_KAFKA_BOOTSTRAP is not set; workers consume from Kafka")
    url = database_url_for(settings)
    if projector is None:
        _run_one_process_per_projector(data_dir, metrics_port=settings.metrics_port)
        return
    _serve_process_metrics(settings)
    from infra.stack import start_tracing

    start_tracing(settings, f"agentworks-worker-{projector}")
    from infra.bootstrap import build_read_side
    from streams.worker import run_worker

    on_commit = None
    if settings.redis_url:
        from read_api.broadcast import RedisChangePublisher

        # Subscribers on any API instance hear what this worker's projector committed.
        on_commit = RedisChangePublisher.from_url(settings.redis_url).publish_changes
    from adapters.kafka import create_topics
    from domain.envelope import TOPICS

    # Created here too, so a worker started before the relay does not let the broker
    # auto-create them with its own partition count.
    create_topics(
        settings.kafka_bootstrap,
        [settings.topic_prefix + topic for topic in TOPICS],
        settings.topic_partitions,
    )
    read_side = build_read_side(settings, url, projector_names=[projector], on_commit=on_commit)
    try:
        run_worker(
            read_side.runners[0],
            settings.kafka_bootstrap,
            topic_prefix=settings.topic_prefix,
            loglevel=settings.log_level,
            sweep_interval=settings.sweep_interval,
            fetch_wait_ms=settings.worker_fetch_wait_ms,
        )
    finally:
        read_side.close()


def _run_one_process_per_projector(data_dir: Path | None, *, metrics_port: int | None) -> None:
    import subprocess

    def environment(index: int) -> dict[str, str] | None:
        # Each process serves its own metrics: this port, and the next ones in projector order.
        if metrics_port is None:
            return None
        return {**os.environ, "AGENTWORKS_METRICS_PORT": str(metrics_port + index)}

    named = {
        name: subprocess.Popen(  # noqa: S603 - our own interpreter and module
            [sys.executable, "-m", "infra.cli", "worker", "--projector", name]
            + ([] if data_dir is None else ["--data-dir", str(data_dir)]),
            env=environment(index),
            preexec_fn=_terminated_with_parent(os.getpid()),
        )
        for index, name in enumerate(projector_names())
    }
    children = list(named.values())
    asked_to_stop = threading.Event()

    def stop() -> None:
        for child in children:
            if child.poll() is None:
                child.terminate()

    def on_signal() -> None:
        asked_to_stop.set()
        stop()

    _stop_on_signals(on_signal)
    # One projector process ending on its own ends them all, and this one with exit 1: what
    # runs the worker (docker's restart policy, systemd) then restarts it, where waiting on
    # the survivors left that projector's read model behind with nothing to restart it.
    while not asked_to_stop.is_set() and all(child.poll() is None for child in children):
        time.sleep(0.2)
    ended = [name for name, child in named.items() if child.poll() is not None]
    stop()
    codes = [child.wait() for child in children]
    if not asked_to_stop.is_set():
        raise CliError(
            f"projector worker {', '.join(ended)} ended (exit codes {codes}); stopped the others",
            exit_code=EXIT_FAILED,
        )
    if any(code not in (0, -signal.SIGTERM) for code in codes):
        raise CliError(f"a projector worker failed (exit codes {codes})", exit_code=EXIT_FAILED)


def _terminated_with_parent(parent: int) -> Callable[[], None] | None:
    """What a projector process runs before ``exec``: have the kernel send it SIGTERM when the
    worker that started it dies, however it dies. Stopped by a signal the worker stops them
    itself; killed outright (SIGKILL, the OOM killer) it cannot, and they went on consuming
    beside the ones its restart started, each holding database connections, with nothing
    left to stop them. Linux only (``prctl``); elsewhere nothing."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    set_parent_death_signal = 1  # PR_SET_PDEATHSIG

    def arrange() -> None:
        libc.prctl(set_parent_death_signal, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # it died before the line above: no signal will come
            os.kill(os.getpid(), signal.SIGTERM)

    return arrange


@app.command("rebuild")
def rebuild_command(
    name: Annotated[str, typer.Argument(help=_PROJECTOR_HELP, show_default=False)],
    data_dir: DataDirOption = None,
) -> None:
    """Rebuild read models from the event log into fresh tables, then swap them in atomically.

    The API keeps answering from the live tables meanwhile; an interrupted rebuild leaves them
    untouched.
    """
    from infra.bootstrap import build_read_side
    from projections.rebuild import rebuild_many

    settings = settings_for(data_dir)
    names = None if name == "all" else [name]
    read_side = build_read_side(settings, database_url_for(settings), projector_names=names)
    try:
        projectors = [runner.projector for runner in read_side.runners]
        _replay_with_progress(
            read_side,
            Console(stderr=True),
            ", ".join(projector.name for projector in projectors),
            # One pass over the log feeds every projector being rebuilt.
            lambda progress: rebuild_many(
                projectors, read_side.pool, read_side.event_log, progress=progress
            ),
        )
    finally:
        read_side.close()


def _replay_with_progress(
    read_side: ReadSide,
    console: Console,
    label: str,
    replay: Callable[[Callable[[int, int], None]], list[RebuildResult]],
) -> None:
    """Run ``replay`` (a rebuild of the read models ``label`` names, given a progress
    callback) under a progress bar, then say what each rebuilt one replayed and parked."""
    head = read_side.event_log.head()
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]} events/s"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(label, total=max(head, 1), rate="-")
        started = time.monotonic()

        def advance(position: int, top: int) -> None:
            elapsed = max(time.monotonic() - started, 1e-6)
            progress.update(
                task, completed=position, total=max(top, 1), rate=f"{position / elapsed:,.0f}"
            )

        results = replay(advance)
        top = max((result.position for result in results), default=0)
        progress.update(task, completed=max(top, 1), total=max(top, 1))
    for result in results:
        console.print(
            f"{result.projector}: {result.events:,} events replayed, swapped in at position "
            f"{result.position:,}"
        )
    with read_side.pool.connection() as conn:
        parked = conn.execute(
            "SELECT projector, count(*) AS n FROM projection_parked"
            " WHERE projector = ANY(%s) GROUP BY projector ORDER BY projector",
            ([result.projector for result in results],),
        ).fetchall()
    for row in parked:
        console.print(
            f"{row['projector']}: {row['n']:,} parked aggregate(s), events it could not "
            f"apply (see '{PROG} parked list')"
        )


_LAST_LOG_POSITION = 2**63 - 1
"""The largest position an event log can hold (a PostgreSQL ``bigint``)."""


@app.command("sweep")
def sweep_command(
    name: Annotated[str, typer.Argument(help=_PROJECTOR_HELP, show_default=False)],
    through: Annotated[
        int | None,
        typer.Option(
            "--through",
            help="Log position to sweep up to (default: the log head).",
            min=0,
            max=_LAST_LOG_POSITION,
        ),
    ] = None,
    data_dir: DataDirOption = None,
) -> None:
    """Check read models against the event log and apply any event they never received.

    What workers do every AGENTWORKS_SWEEP_INTERVAL, on demand: after an incident, or to confirm
    that every projector is complete up to a position. Safe while workers run; each event takes
    effect once.
    """
    from infra.bootstrap import build_read_side
    from projections.sweep import ProjectionSweep

    settings = settings_for(data_dir)
    names = None if name == "all" else [name]
    read_side = build_read_side(settings, database_url_for(settings), projector_names=names)
    console = Console(stderr=True)
    try:
        head = read_side.event_log.head()
        target = head if through is None else min(through, head)
        if through is not None and through > head:
            # Past it, a position may yet be written: no sweep passes an event it has not seen.
            console.print(f"--through {through:,} is past the log's head: sweeping to {head:,}")
        columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn())
        outcomes = []
        with Progress(*columns, console=console, transient=False) as progress:
            for runner in read_side.runners:
                sweep = ProjectionSweep(runner)
                task = progress.add_task(runner.name, total=max(target, 1))
                progress.update(task, completed=min(sweep.watermark(), target))

                def advance(position: int, task: TaskID = task) -> None:
                    progress.update(task, completed=position)

                outcome = sweep.sweep(target, progress=advance)
                progress.update(task, completed=max(target, 1))
                outcomes.append((runner.name, outcome))
        for projector, outcome in outcomes:
            console.print(
                f"{projector}: swept through {outcome.swept_through:,}, "
                f"{outcome.healed:,} missing events applied"
            )
    finally:
        read_side.close()


@app.command("status")
def status_command(data_dir: DataDirOption = None) -> None:
    """Where the log, the relay and every projector stand (lag in events)."""
    from adapters.metrics import read_standing
    from adapters.postgres import connect

    settings = settings_for(data_dir)
    with connect(database_url_for(settings)) as conn:
        standing = read_standing(conn, expected=projector_names(), relays=deployed_relays(settings))
    head_position, parked = standing.head, standing.parked
    rows: list[tuple[str, str, int, int | None]] = [
        *(("relay", name, position, None) for name, position in standing.relays),
        *(("projector", p.name, p.position, p.swept_through) for p in standing.projectors),
    ]
    table = Table(title=f"event log head: {head_position:,}")
    table.add_column("component")
    table.add_column("position", justify="right")
    table.add_column("lag", justify="right")
    table.add_column("swept through", justify="right")
    table.add_column("parked", justify="right")
    for kind, component, position, swept in rows:
        table.add_row(
            f"{kind} {component}",
            f"{position:,}",
            f"{head_position - position:,}",
            "" if swept is None else f"{swept:,}",
            "" if kind == "relay" else f"{parked.get(component, 0):,}",
        )
    Console().print(table)
    if any(parked.values()):
        Console(stderr=True).print(
            f"{sum(parked.values()):,} parked aggregate(s): see '{PROG} parked list'"
        )


# --- parked aggregates ---------------------------------------------------------------------------

parked_app = typer.Typer(
    help="Aggregates a projector could not apply an event of (their events wait): list, retry.",
    no_args_is_help=True,
)
app.add_typer(parked_app, name="parked")

_ProjectorOption = Annotated[
    str | None, typer.Option("--projector", help="Only this projector's parked aggregates.")
]


@parked_app.command("list")
def parked_list_command(projector: _ProjectorOption = None, data_dir: DataDirOption = None) -> None:
    """The parked aggregates: the event each stopped at, the error, how often it was tried."""
    from adapters.postgres import connect
    from projections.registry import projector_named

    if projector is not None:
        projector_named(projector)  # an unknown name is refused with the valid ones
    settings = settings_for(data_dir)
    with connect(database_url_for(settings)) as conn:
        rows = conn.execute(
            "SELECT projector, originator_id, originator_version, position, event_type,"
            " workspace_id, attempts, failed_at, error FROM projection_parked"
            " WHERE projector NOT LIKE '%%#%%' AND (%s::text IS NULL OR projector = %s)"
            " ORDER BY projector, position",
            (projector, projector),
        ).fetchall()
    table = Table(title=f"parked aggregates: {len(rows):,}")
    for column in ("projector", "aggregate", "version", "position", "event", "workspace"):
        table.add_column(column, no_wrap=column in ("aggregate", "workspace"))
    table.add_column("tries", justify="right")
    table.add_column("last failed")
    table.add_column("error", overflow="fold")
    for name, aggregate, version, position, event, workspace, attempts, failed, error in rows:
        table.add_row(
            name,
            str(aggregate),
            str(version),
            f"{position:,}",
            shown(event),
            "" if workspace is None else str(workspace),
            str(attempts),
            failed.isoformat(timespec="seconds"),
            shown(error),
        )
    Console().print(table)


@parked_app.command("retry")
def parked_retry_command(
    projector: _ProjectorOption = None,
    aggregate: Annotated[
        str | None, typer.Option("--aggregate", help="Only this aggregate (its id).")
    ] = None,
    data_dir: DataDirOption = None,
) -> None:
    """Apply the parked aggregates' events again, in order, after a fix.

    Safe while workers run. An aggregate that fails again stays parked with the new error;
    then the command exits with 1.
    """
    from uuid import UUID

    from infra.bootstrap import build_read_side

    ids = None
    if aggregate is not None:
        try:
            ids = [UUID(aggregate)]
        except ValueError:
            raise CliError(
                f"--aggregate must be an aggregate id (a UUID), not {aggregate!r}"
            ) from None
    settings = settings_for(data_dir)
    on_commit = None
    if settings.redis_url:
        from read_api.broadcast import RedisChangePublisher

        # Subscribers hear about the rows a retry finally wrote, as from a worker.
        on_commit = RedisChangePublisher.from_url(settings.redis_url).publish_changes
    read_side = build_read_side(
        settings,
        database_url_for(settings),
        projector_names=None if projector is None else [projector],
        on_commit=on_commit,
    )
    console = Console()
    try:
        found = [(runner, runner.parked(ids)) for runner in read_side.runners]
        results: list[tuple[str, list[Retried]]] = [(runner.name, []) for runner, _ in found]
        columns = (
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=console, transient=False) as progress:
            task = progress.add_task(
                "retrying parked aggregates", total=sum(len(parked) for _, parked in found)
            )
            for (runner, parked), (_, retried) in zip(found, results, strict=True):
                for oid, version in parked:
                    retried.append(runner.retry_from(oid, version))
                    progress.advance(task)
    finally:
        read_side.close()
    table = Table(title="parked aggregates retried")
    table.add_column("projector")
    table.add_column("aggregate", no_wrap=True)
    table.add_column("events applied", justify="right")
    table.add_column("outcome", overflow="fold")
    still = 0
    for name, retried in results:
        for one in retried:
            if one.parked is None:
                outcome = "applied; no longer parked"
            else:
                still += 1
                outcome = (
                    f"parked again at version {one.parked.originator_version}: {one.parked.error}"
                )
            table.add_row(name, str(one.originator_id), f"{one.applied:,}", shown(outcome))
    console.print(table)
    if still:
        raise CliError(
            f"{still} aggregate(s) still parked; fix the cause and retry "
            f"(see '{PROG} parked list')",
            exit_code=EXIT_FAILED,
        )


# --- Billing (infra/billing_cli.py) ----------------------------------------------------------

app.command("credit")(billing_cli.credit_command)
app.command("plan")(billing_cli.plan_command)
app.command("invoice")(billing_cli.invoice_command)
app.command("reconcile")(billing_cli.reconcile_command)


def _register_groups() -> None:
    # Imported here, not at the top: the groups' module must not import this one (run as
    # ``python -m infra.cli`` this module is ``__main__``, and a second copy would not be).
    from infra.audit_cli import audit_app, replay_app

    app.add_typer(audit_app, name="audit")
    app.add_typer(replay_app, name="replay")


_register_groups()


# --- Entry point -------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    """Run the CLI (the ``agentworks`` console script); exits the process with its code."""
    from infra.logging import log_uncaught_exceptions

    # Here, not in run(): a test that calls run() keeps the test runner's own hooks.
    log_uncaught_exceptions()
    _watch_standard_output()
    sys.exit(run(argv))


class OutputFailed(OSError):
    """Standard output could not be written: a full disk, a reader gone (``| head -1``)."""


class _StandardOutput(io.FileIO):
    """Standard output's file, whose failure is told apart from any other ``OSError`` (a full
    disk where the data dir is must not read as the output's). After its first failure it
    takes what it is given and drops it: the buffers above it still hold what could not be
    written, and flushed again at exit (or when collected) each would fail once more, reported
    as an exception nobody caught."""

    _failed = False

    def write(self, data: ReadableBuffer, /) -> int:
        if self._failed:
            return memoryview(data).nbytes
        try:
            return super().write(data)
        except OSError as error:
            self._failed = True
            raise OutputFailed(error.errno, error.strerror) from error


def _watch_standard_output() -> None:
    """Make ``sys.stdout`` write through :class:`_StandardOutput` (same descriptor, encoding,
    buffering)."""
    stdout = sys.stdout
    try:
        descriptor = stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return  # none, or not a file (an embedding program's stand-in): left as it is
    stdout.flush()
    sys.stdout = io.TextIOWrapper(
        io.BufferedWriter(_StandardOutput(descriptor, "w", closefd=False)),
        encoding=stdout.encoding,
        errors=stdout.errors,
        line_buffering=bool(stdout.line_buffering),
    )


def run(argv: Sequence[str] | None = None) -> int:
    """Run the CLI on ``argv`` and return the exit code instead of exiting."""
    command = typer.main.get_command(app)
    _reflow_help(command)
    args = list(sys.argv[1:] if argv is None else argv)
    _end_on_signals()
    try:
        with resources:
            result = command.main(args=args, prog_name=PROG, standalone_mode=False)
        sys.stdout.flush()  # what is still buffered fails here, not at the interpreter's exit
    except OutputFailed as exc:
        if exc.errno == errno.EPIPE:
            return EXIT_FAILED  # the reader went away: quietly, as typer does within a command
        return _fail(f"cannot write to standard output: {exc.strerror}", EXIT_FAILED)
    except CliError as exc:
        return _fail(exc.message, exc.exit_code)
    except MigrationError as exc:
        return _fail(str(exc), EXIT_FAILED)
    except AgentWorksError as exc:
        if isinstance(exc, SetupError) and not isinstance(exc, ConfigurationError):
            # Kafka, the local broker or faust could not be set up: the work failed, told in
            # one line (the README) that names the error's kind and why.
            return _fail(f"{type(exc).__name__}: {exc}", EXIT_FAILED)
        if isinstance(exc, UndecodableEvent):
            # Stored data this code cannot read: no input of the user's is wrong, the work
            # failed until an operator repairs the event.
            return _fail(str(exc), EXIT_FAILED)
        return _fail(str(exc), EXIT_USAGE)  # a refused command, the configuration, a key
    except TyperException as exc:  # usage errors: unknown option, bad value, missing argument
        code = getattr(exc, "exit_code", EXIT_USAGE)
        return _fail(_usage_message(exc), code if isinstance(code, int) else EXIT_USAGE)
    except typer.Abort:
        return _fail("aborted", EXIT_FAILED)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if _schema_missing(exc):
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            return _fail(f"{first}; is the database migrated? run '{PROG} migrate'", EXIT_FAILED)
        if not _database_unavailable(exc):
            raise
        message = str(exc)
        if "database" not in message:
            message = f"database error: {message}"
        return _fail(message, EXIT_FAILED)
    return result if isinstance(result, int) else 0


def _schema_missing(exc: BaseException) -> bool:
    """Whether ``exc`` is a table, column or function of our schema missing (no migrations run,
    or code newer than the database), directly or wrapped by the ``eventsourcing`` library."""
    from psycopg import errors

    missing = (errors.UndefinedTable, errors.UndefinedFunction, errors.UndefinedColumn)
    return isinstance(exc, missing) or isinstance(exc.__cause__, missing)


def _database_unavailable(exc: Exception) -> bool:
    """Whether ``exc`` says the database could not be reached or used (work failed: exit 1).

    psycopg's own (pool timeouts included) and the ``eventsourcing`` library's wrapper of them;
    their messages name host, port and database, never the password.
    """
    import psycopg

    if isinstance(exc, psycopg.OperationalError):
        return True
    persistence = sys.modules.get("eventsourcing.persistence")
    return persistence is not None and isinstance(exc, persistence.OperationalError)


class _Documented(Protocol):
    """A click command as help reflowing sees it (typer vendors its own click)."""

    help: str | None


def _reflow_help(command: _Documented) -> None:
    """Join the source line breaks inside each paragraph of every command's help.

    Docstrings are wrapped at 100 columns in the source; typer keeps those breaks in every
    paragraph after the first, so ``--help`` broke sentences mid-line on any other width.
    """
    if command.help:
        paragraphs = inspect.cleandoc(command.help).split("\n\n")
        command.help = "\n\n".join(" ".join(p.split()) for p in paragraphs)
    for sub in getattr(command, "commands", {}).values():
        _reflow_help(sub)


def _end_on_signals() -> None:
    """SIGTERM and SIGHUP (a closed terminal) end a command the way Ctrl-C does.

    Their default action kills the process on the spot, leaving behind what it started (the
    embedded PostgreSQL); as ``KeyboardInterrupt`` they unwind through every ``finally``.
    Long-running commands install their own handlers on top.
    """
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.default_int_handler)


def _usage_message(exc: TyperException) -> str:
    ctx = getattr(exc, "ctx", None)
    path = getattr(ctx, "command_path", PROG)
    return f"{exc.format_message()} (see '{path} --help')"


def _fail(message: str, code: int) -> int:
    # One line: a message with newlines (a psycopg error, say) is folded.
    text = " ".join(message.split())
    print(f"{PROG}: error: {text}", file=sys.stderr)
    return code


if __name__ == "__main__":
    main()
