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
``app.add_typer``), get settings with :func:`load_settings`, raise :class:`CliError`,
:class:`~domain.errors.AgentWorksError` or :class:`~infra.settings.ConfigurationError` for
anything the user should fix; :func:`main` turns them into one line and an exit code.
"""

from __future__ import annotations

import signal
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

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

from adapters.tokens import BOOTSTRAP_WORKSPACE, InvalidKey, issue_token
from domain.errors import AgentWorksError
from domain.roles import Role
from infra.logging import configure_logging
from infra.migrate import MigrationError, discover, ensure_database, migrate
from infra.settings import ConfigurationError, Settings, jwt_keys

if TYPE_CHECKING:
    from collections.abc import Sequence

PROG = "agentworks"

#: ``sub`` of a bootstrap token when ``--user`` is not given.
BOOTSTRAP_USER = "bootstrap"

EXIT_FAILED = 1
EXIT_USAGE = 2

app = typer.Typer(
    name=PROG,
    help="AgentWorks backend: event-sourced Kanban for AI agents, metered and billed.",
    add_completion=False,
    pretty_exceptions_enable=False,
)


class CliError(Exception):
    """A problem the user can fix; printed as one line on stderr with ``exit_code``."""

    def __init__(self, message: str, *, exit_code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment (plus ``overrides``), with logging configured from them."""
    settings = Settings.load(**overrides)
    configure_logging(level=settings.log_level, json=settings.log_json)
    return settings


@app.callback(invoke_without_command=True)
def _root(ctx: typer.Context) -> None:
    if ctx.invoked_subcommand is None:
        group = ctx.command
        names = group.list_commands(ctx) if isinstance(group, typer.core.TyperGroup) else []
        raise CliError(f"missing command, one of: {', '.join(names)} (see '{PROG} --help')")


# --- Subcommands -------------------------------------------------------------------------------


@app.command("migrate")
def migrate_command(
    database_url: Annotated[
        str | None,
        typer.Option(
            "--database-url",
            help="postgresql:// URL; default AGENTWORKS_DATABASE_URL.",
            show_default=False,
        ),
    ] = None,
    create_database: Annotated[
        bool,
        typer.Option("--create-database/--no-create-database", help="Create it if missing."),
    ] = True,
) -> None:
    """Apply pending SQL migrations to the database (safe to run concurrently, idempotent)."""
    overrides: dict[str, object] = {} if database_url is None else {"database_url": database_url}
    settings = load_settings(**overrides)
    if settings.database_url is None:
        raise CliError(
            "AGENTWORKS_DATABASE_URL is not set (or pass --database-url); "
            "the embedded dev database is migrated by `agentworks dev` itself"
        )
    if create_database:
        ensure_database(settings.database_url)
    known = {m.version: m for m in discover()}
    applied = migrate(settings.database_url, app_role=settings.db_app_role)

    console = Console()
    if not applied:
        latest = max(known, default="none")
        console.print(f"Database is up to date (latest migration: {latest}).")
        return
    table = Table(title=f"Applied {len(applied)} migration(s)")
    table.add_column("version")
    table.add_column("name")
    for version in applied:
        table.add_row(version, known[version].name if version in known else "")
    console.print(table)


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
        typer.Option("--user", help="User id (the 'sub' claim).", show_default=False),
    ] = None,
    role: Annotated[
        str | None,
        typer.Option("--role", help="OWNER, ADMIN, MEMBER or VIEWER.", show_default=False),
    ] = None,
    ttl: Annotated[int, typer.Option("--ttl", help="Lifetime in seconds.", min=1)] = 3600,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            "--data-dir",
            help="Dev data dir whose JWT secret to use when no key is configured; "
            "default AGENTWORKS_DATA_DIR.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Print a signed JWT for development and scripts (the token alone, on stdout)."""
    if bootstrap:
        if workspace is not None:
            raise CliError("--bootstrap and --workspace exclude each other")
        if role is not None and Role.parse(role) is not Role.OWNER:
            raise CliError("a --bootstrap token is always OWNER; drop --role")
        workspace_id, user_id, parsed_role = BOOTSTRAP_WORKSPACE, user or BOOTSTRAP_USER, Role.OWNER
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
        workspace_id, user_id, parsed_role = workspace, user, Role.parse(role)

    settings = load_settings()
    keys = jwt_keys(settings, data_dir=data_dir)
    if not keys.can_sign:
        raise CliError(
            "AGENTWORKS_JWT_PUBLIC_KEY only verifies tokens; "
            "set AGENTWORKS_JWT_PRIVATE_KEY to sign them"
        )
    token = issue_token(
        user_id=user_id,
        workspace_id=workspace_id,
        role=parsed_role,
        ttl_seconds=ttl,
        secret=keys.secret,
        private_key=keys.private_key,
    )
    typer.echo(token)


def _database_url(settings: Settings) -> str:
    if settings.database_url is None:
        raise CliError(
            "AGENTWORKS_DATABASE_URL is not set; point it at the PostgreSQL that holds the "
            "event store (or use `agentworks dev`)"
        )
    return settings.database_url


def _stop_on_signals(stop: Callable[[], None]) -> None:
    """SIGTERM and SIGINT ask a long-running loop to finish its batch and exit cleanly."""

    def handle(signum: int, _frame: object) -> None:
        stop()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)


@app.command("dev")
def dev_command(
    host: Annotated[str, typer.Option("--host", help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to listen on.")] = 8000,
    data_dir: Annotated[
        Path | None,
        typer.Option("--data-dir", help="Where the embedded database and dev secret live."),
    ] = None,
    demo: Annotated[bool, typer.Option("--demo", help="Seed a demo workspace.")] = False,
) -> None:
    """Run everything in one process: database (embedded by default), API and projectors."""
    from adapters.tokens import issue_token
    from infra.demo import seed_demo
    from infra.stack import build_dev_stack, serve_app, start_tracing
    from read_api.app import create_app

    # SIGTERM stops the stack like Ctrl-C does, so the embedded PostgreSQL is stopped too.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    overrides: dict[str, object] = {} if data_dir is None else {"data_dir": data_dir}
    settings = load_settings(**overrides)
    start_tracing(settings, "agentworks-dev")
    console = Console(stderr=True, soft_wrap=True)
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    stack = build_dev_stack(settings, settings.data_dir)
    try:
        stack.start()
        where = "embedded PostgreSQL" if settings.database_url is None else "configured PostgreSQL"
        console.print(
            f"[bold]AgentWorks dev[/bold] on {where}, fan-out: {stack.mode}; "
            f"data dir {settings.data_dir.resolve()}"
        )
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
            console.print(
                f"Demo workspace {seeded.workspace_id}, project {seeded.project_id} "
                f"({seeded.cards} cards). Token for {seeded.owner} (OWNER):"
            )
            typer.echo(token)
        console.print(f"GraphQL: http://{host}:{port}/graphql  (Ctrl-C to stop)")
        serve_app(create_app(stack.services), host=host, port=port)
    finally:
        stack.stop()
        console.print("stopped")


@app.command("serve")
def serve_command(
    host: Annotated[str, typer.Option("--host", help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to listen on.")] = 8000,
) -> None:
    """Run the GraphQL API alone against the configured PostgreSQL (and Redis)."""
    from infra.stack import api_process, serve_app, start_tracing

    settings = load_settings()
    _database_url(settings)
    start_tracing(settings, "agentworks-api")
    app_, write_side = api_process(settings)
    try:
        serve_app(app_, host=host, port=port)
    finally:
        write_side.close()


@app.command("relay")
def relay_command() -> None:
    """Publish the event log to Kafka, in order, resuming where the last run stopped."""
    from infra.bootstrap import build_relay
    from infra.stack import start_tracing

    settings = load_settings()
    start_tracing(settings, "agentworks-relay")
    relay, write_side = build_relay(settings, _database_url(settings))
    _stop_on_signals(relay.stop)
    try:
        relay.run_forever()
    finally:
        write_side.close()


@app.command("worker")
def worker_command(
    projector: Annotated[
        str | None,
        typer.Option("--projector", help="Run only this projector (default: one process each)."),
    ] = None,
) -> None:
    """Feed read models from Kafka: one consumer group per projector."""
    settings = load_settings()
    url = _database_url(settings)
    if not settings.kafka_bootstrap:
        raise CliError("AGENTWORKS_KAFKA_BOOTSTRAP is not set; workers consume from Kafka")
    if projector is None:
        _run_one_process_per_projector()
        return
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
    from streams.envelope import TOPICS

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


def _run_one_process_per_projector() -> None:
    import subprocess

    from projections.registry import projector_names

    children = [
        subprocess.Popen(  # noqa: S603 - our own interpreter and module
            [sys.executable, "-m", "infra.cli", "worker", "--projector", name]
        )
        for name in projector_names()
    ]

    def stop() -> None:
        for child in children:
            if child.poll() is None:
                child.terminate()

    _stop_on_signals(stop)
    codes = [child.wait() for child in children]
    if any(code not in (0, -signal.SIGTERM) for code in codes):
        raise CliError(f"a projector worker failed (exit codes {codes})", exit_code=EXIT_FAILED)


@app.command("rebuild")
def rebuild_command(
    name: Annotated[str, typer.Argument(help="Projector name, or 'all'.")],
) -> None:
    """Rebuild read models from the event log into fresh tables, then swap them in atomically.

    The API keeps answering from the live tables meanwhile; an interrupted rebuild leaves them
    untouched.
    """
    from infra.bootstrap import build_read_side
    from projections.rebuild import rebuild_many

    settings = load_settings()
    names = None if name == "all" else [name]
    read_side = build_read_side(settings, _database_url(settings), projector_names=names)
    console = Console(stderr=True)
    label = ", ".join(runner.name for runner in read_side.runners)
    try:
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

            # One pass over the log feeds every projector being rebuilt.
            results = rebuild_many(
                [runner.projector for runner in read_side.runners],
                read_side.pool,
                read_side.event_log,
                progress=advance,
            )
            top = max((result.position for result in results), default=0)
            progress.update(task, completed=max(top, 1), total=max(top, 1))
        for result in results:
            console.print(
                f"{result.projector}: {result.events:,} events replayed, swapped in at position "
                f"{result.position:,}"
            )
    finally:
        read_side.close()


@app.command("sweep")
def sweep_command(
    name: Annotated[str, typer.Argument(help="Projector name, or 'all'.")],
    through: Annotated[
        int | None,
        typer.Option("--through", help="Log position to sweep up to (default: the log head)."),
    ] = None,
) -> None:
    """Check read models against the event log and apply any event they never received.

    What workers do every AGENTWORKS_SWEEP_INTERVAL, on demand: after an incident, or to confirm
    that every projector is complete up to a position. Safe while workers run; each event takes
    effect once.
    """
    from infra.bootstrap import build_read_side
    from projections.sweep import ProjectionSweep

    settings = load_settings()
    names = None if name == "all" else [name]
    read_side = build_read_side(settings, _database_url(settings), projector_names=names)
    console = Console(stderr=True)
    try:
        target = read_side.event_log.head() if through is None else through
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
def status_command() -> None:
    """Where the log, the relay and every projector stand (lag in events)."""
    import psycopg

    settings = load_settings()
    url = _database_url(settings)
    with psycopg.connect(url) as conn:
        head = conn.execute("SELECT coalesce(max(notification_id), 0) FROM agentworks_events")
        head_position = int(head.fetchone()[0])  # type: ignore[index]
        relays = conn.execute(
            "SELECT relay, position, NULL FROM relay_positions ORDER BY relay"
        ).fetchall()
        projectors = conn.execute(
            "SELECT projector, position, swept_through FROM projection_positions "
            "WHERE projector NOT LIKE '%#%' ORDER BY projector"
        ).fetchall()
    table = Table(title=f"event log head: {head_position:,}")
    table.add_column("component")
    table.add_column("position", justify="right")
    table.add_column("lag", justify="right")
    table.add_column("swept through", justify="right")
    for kind, rows in (("relay", relays), ("projector", projectors)):
        for component, position, swept in rows:
            table.add_row(
                f"{kind} {component}",
                f"{position:,}",
                f"{head_position - position:,}",
                "" if swept is None else f"{swept:,}",
            )
    Console().print(table)


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
    sys.exit(run(argv))


def run(argv: Sequence[str] | None = None) -> int:
    """Run the CLI on ``argv`` and return the exit code instead of exiting."""
    command = typer.main.get_command(app)
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        result = command.main(args=args, prog_name=PROG, standalone_mode=False)
    except CliError as exc:
        return _fail(exc.message, exc.exit_code)
    except (ConfigurationError, AgentWorksError, InvalidKey) as exc:
        return _fail(str(exc), EXIT_USAGE)
    except MigrationError as exc:
        return _fail(str(exc), EXIT_FAILED)
    except TyperException as exc:  # usage errors: unknown option, bad value, missing argument
        code = getattr(exc, "exit_code", EXIT_USAGE)
        return _fail(_usage_message(exc), code if isinstance(code, int) else EXIT_USAGE)
    except typer.Abort:
        return _fail("aborted", EXIT_FAILED)
    except KeyboardInterrupt:
        return 130
    return result if isinstance(result, int) else 0


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
