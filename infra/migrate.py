"""Apply the SQL migrations in ``infra/migrations`` to a PostgreSQL database.

Migrations are plain SQL files named ``NNNN_description.sql`` (``0001_event_store.sql``), applied
in version order, each in its own transaction together with its row in ``schema_migrations`` —
so a file is applied entirely or not at all, and exactly once. A session-level advisory lock
serialises runners, so any number of processes (every replica of a deployment at start, say)
may run :func:`migrate` at once; the first applies, the others find nothing left to do.

Each row of ``schema_migrations`` keeps the SHA-256 of the file's text as applied: a file edited
after it was applied is refused, by name, before anything runs, since the databases it already
ran on would silently differ from new ones. Rows recorded before checksums existed (NULL) get
the file's checksum on the next run, which trusts the files as they are then and logs it.

Every statement of a migration waits at most :data:`LOCK_TIMEOUT_SECONDS` for a lock: an
``ALTER TABLE`` queued behind a long read would otherwise hold up every query queued behind it.
Such a migration fails as a whole and may simply be run again.

A migration file must not contain transaction control (``BEGIN``/``COMMIT``) nor statements that
refuse to run inside a transaction block (``CREATE INDEX CONCURRENTLY``). While it runs, the
setting ``agentworks.app_role`` holds the application's role name, for SQL that grants to it:
``current_setting('agentworks.app_role')``.

Migrations create the roles each process logs in as (NOLOGIN); given ``logins``, :func:`migrate`
then lets each of them log in with its password, every run (so a changed password takes
effect), and refuses a login role that is a superuser, bypasses row-level security or is a member
of another role: such a role would carry more than its own privileges.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING

import psycopg
import structlog
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import TupleRow

from adapters.postgres import connect
from domain.errors import SetupError

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

__all__ = [
    "DEFAULT_APP_ROLE",
    "LOCK_TIMEOUT_SECONDS",
    "Migration",
    "MigrationError",
    "applied_versions",
    "default_directory",
    "discover",
    "ensure_database",
    "ensure_logins",
    "migrate",
]

#: Key of the advisory lock that serialises runners (advisory locks are per database).
MIGRATION_LOCK_KEY = 0x61_67_65_6E_74_77_6B_73  # "agentwks"

DEFAULT_APP_ROLE = "agentworks_app"

#: Longest wait of a migration's statement (and of the bookkeeping) for a lock, in seconds.
#: Behind a waiting ``ALTER TABLE`` every other query of that table queues too, so a migration
#: gives up soon and is run again later rather than stall the application.
LOCK_TIMEOUT_SECONDS = 5.0

_FILE_NAME = re.compile(r"^(?P<version>\d{4})_(?P<name>[A-Za-z0-9][A-Za-z0-9_-]*)\.sql$")

_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version text PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now(),
    checksum text
)
"""

# Nullable, so a runner from before checksums keeps working on a database that has the column
# (its rows get their checksum on the next run of this one).
_ADD_CHECKSUM = "ALTER TABLE schema_migrations ADD COLUMN IF NOT EXISTS checksum text"

_HAS_CHECKSUM = """
SELECT 1 FROM pg_attribute
WHERE attrelid = 'schema_migrations'::regclass AND attname = 'checksum' AND NOT attisdropped
"""

_log = structlog.get_logger(__name__)


class MigrationError(SetupError):
    """Migrations could not be found, read or applied; the message names the file at fault."""

    code = "MIGRATION"


@dataclass(frozen=True, slots=True)
class Migration:
    """One SQL file: ``version`` is its four-digit prefix, ``name`` the rest of its stem."""

    version: str
    name: str
    sql: str

    @property
    def filename(self) -> str:
        return f"{self.version}_{self.name}.sql"

    @property
    def checksum(self) -> str:
        """SHA-256 (hex) of the file's text, as recorded in ``schema_migrations``.

        Of the text as read, with line ends normalised: a checkout with CRLF ends agrees.
        """
        return hashlib.sha256(self.sql.encode("utf-8")).hexdigest()


def default_directory() -> Traversable:
    """The migrations shipped inside the installed ``infra`` package."""
    return resources.files("infra").joinpath("migrations")


def discover(directory: Traversable | None = None) -> list[Migration]:
    """The migrations in ``directory`` (default: the packaged ones), sorted by version.

    A missing default directory means no migrations; a missing explicit one is an error, as is
    a ``.sql`` file whose name does not follow ``NNNN_description.sql`` or a repeated version.
    """
    source = default_directory() if directory is None else directory
    if not source.is_dir():
        if directory is None:
            return []
        raise MigrationError(f"migrations directory {source} does not exist")
    found: dict[str, Migration] = {}
    for entry in source.iterdir():
        if not entry.name.endswith(".sql") or not entry.is_file():
            continue
        match = _FILE_NAME.match(entry.name)
        if match is None:
            raise MigrationError(f"migration file {entry.name!r} is not named NNNN_description.sql")
        version = match["version"]
        if version in found:
            raise MigrationError(
                f"migrations {found[version].filename!r} and {entry.name!r} share version {version}"
            )
        try:
            text = entry.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise MigrationError(f"cannot read migration {entry.name!r}: {exc}") from exc
        found[version] = Migration(version=version, name=match["name"], sql=text)
    return [found[version] for version in sorted(found)]


def migrate(
    url: str,
    *,
    directory: Traversable | None = None,
    app_role: str = DEFAULT_APP_ROLE,
    logins: Mapping[str, str] | None = None,
    connect_timeout: int = 10,
    lock_timeout: float = LOCK_TIMEOUT_SECONDS,
) -> list[str]:
    """Apply every migration not yet applied to the database at ``url``; return their versions.

    Idempotent and safe to run concurrently (see the module docstring). ``logins`` maps role
    names to passwords: see :func:`ensure_logins`. ``lock_timeout`` bounds, in seconds, each
    statement's wait for a lock. Raises :class:`MigrationError` when a migration fails (the
    ones before it stay applied) or when an applied migration's file has changed (nothing runs).
    """
    migrations = discover(directory)
    try:
        conn = connect(url, autocommit=True, connect_timeout=connect_timeout)
    except psycopg.Error as exc:
        raise MigrationError(f"cannot connect to {_redacted(url)}: {exc}") from exc
    with conn:
        try:
            conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_KEY,))
        except psycopg.Error as exc:
            raise MigrationError(f"cannot take the migration lock: {exc}") from exc
        try:
            applied = _apply_pending(conn, migrations, app_role=app_role, lock_timeout=lock_timeout)
            if logins:
                ensure_logins(conn, logins)
        except psycopg.Error as exc:
            raise MigrationError(f"cannot migrate {_redacted(url)}: {exc}") from exc
        else:
            return applied
        finally:
            # Closing the session releases the lock too; unlock early so waiters go on at once.
            with contextlib.suppress(psycopg.Error):
                conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_KEY,))


def applied_versions(url: str, *, connect_timeout: int = 10) -> list[str]:
    """Versions recorded in ``schema_migrations``, in order; empty if it does not exist yet."""
    try:
        with connect(url, connect_timeout=connect_timeout) as conn:
            exists = conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL").fetchone()
            if not exists or not exists[0]:
                return []
            rows = conn.execute("SELECT version FROM schema_migrations ORDER BY version")
            return [str(row[0]) for row in rows]
    except psycopg.Error as exc:
        raise MigrationError(f"cannot read schema_migrations at {_redacted(url)}: {exc}") from exc


def ensure_database(url: str, *, connect_timeout: int = 10) -> None:
    """Create the database named in ``url`` unless it exists.

    Connects to the target first, so an existing database needs no extra privilege; only when
    that fails does it ask the ``postgres`` maintenance database (``template1`` as fallback)
    whether the database exists, and create it. Concurrent callers are fine.
    """
    dbname = conninfo_to_dict(url).get("dbname")
    if not dbname:
        raise MigrationError(f"{_redacted(url)} names no database")
    try:
        with connect(url, connect_timeout=connect_timeout):
            return
    except psycopg.OperationalError as exc:
        target_error = exc
    maintenance = _maintenance_connection(url, connect_timeout=connect_timeout, cause=target_error)
    with maintenance:
        try:
            row = maintenance.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (str(dbname),)
            ).fetchone()
        except psycopg.Error as exc:
            raise MigrationError(f"cannot look up database {dbname!r}: {exc}") from exc
        if row is not None:
            # The database exists, so the first failure was something else (auth, privilege).
            raise MigrationError(
                f"cannot connect to {_redacted(url)}: {target_error}"
            ) from target_error
        try:
            maintenance.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(str(dbname))))
        except (psycopg.errors.DuplicateDatabase, psycopg.errors.UniqueViolation):
            pass  # created by a concurrent caller
        except psycopg.Error as exc:
            raise MigrationError(f"cannot create database {dbname!r}: {exc}") from exc
        _log.info("database.created", database=str(dbname))


def _apply_pending(
    conn: psycopg.Connection[TupleRow],
    migrations: list[Migration],
    *,
    app_role: str,
    lock_timeout: float,
) -> list[str]:
    with _transaction(conn, lock_timeout, doing="prepare schema_migrations"):
        conn.execute(_CREATE_TABLE)
        if conn.execute(_HAS_CHECKSUM).fetchone() is None:
            # Checked first: ADD COLUMN IF NOT EXISTS locks the table even when it has it.
            conn.execute(_ADD_CHECKSUM)
        recorded = {
            str(version): None if checksum is None else str(checksum)
            for version, checksum in conn.execute("SELECT version, checksum FROM schema_migrations")
        }
    _check_unchanged(conn, migrations, recorded, lock_timeout=lock_timeout)
    applied: list[str] = []
    for migration in migrations:
        if migration.version in recorded:
            continue
        started = time.perf_counter()
        with _transaction(conn, lock_timeout, doing=f"migration {migration.filename}"):
            conn.execute("SELECT set_config('agentworks.app_role', %s, true)", (app_role,))
            if migration.sql.strip():
                # bytes: sent as one simple query, so a file may hold many statements.
                conn.execute(migration.sql.encode("utf-8"))
            conn.execute(
                "INSERT INTO schema_migrations (version, checksum) VALUES (%s, %s)",
                (migration.version, migration.checksum),
            )
        _log.info(
            "migration.applied",
            version=migration.version,
            name=migration.name,
            elapsed_ms=round((time.perf_counter() - started) * 1000, 1),
        )
        applied.append(migration.version)
    return applied


def _check_unchanged(
    conn: psycopg.Connection[TupleRow],
    migrations: list[Migration],
    recorded: Mapping[str, str | None],
    *,
    lock_timeout: float,
) -> None:
    """Refuse an applied migration whose file changed; record the checksums still missing.

    A row without a checksum was applied by a runner from before checksums: the file as it is
    now is taken for the one applied (nothing else is known), and the log says so.
    """
    for migration in migrations:
        stored = recorded.get(migration.version)
        if stored is not None and stored != migration.checksum:
            raise MigrationError(
                f"migration {migration.filename} was changed after it was applied (stored "
                f"checksum {stored}, file now {migration.checksum}); restore the file as "
                "applied and put the change in a new migration (if the database already "
                "matches the file, clear its checksum: UPDATE schema_migrations SET checksum "
                f"= NULL WHERE version = '{migration.version}', and run migrate again)"
            )
    missing = [m for m in migrations if m.version in recorded and recorded[m.version] is None]
    if not missing:
        return
    with _transaction(conn, lock_timeout, doing="record migration checksums"):
        for migration in missing:
            conn.execute(
                "UPDATE schema_migrations SET checksum = %s"
                " WHERE version = %s AND checksum IS NULL",
                (migration.checksum, migration.version),
            )
    _log.warning(
        "migration.checksums_recorded",
        versions=[m.version for m in missing],
        note="applied before checksums were kept: trusting the migration files as they are "
        "now; a later change to them is refused",
    )


@contextlib.contextmanager
def _transaction(
    conn: psycopg.Connection[TupleRow], lock_timeout: float, *, doing: str
) -> Iterator[None]:
    """A transaction whose statements wait at most ``lock_timeout`` seconds for a lock; its
    database errors become a :class:`MigrationError` naming what it was ``doing``."""
    try:
        with conn.transaction():
            conn.execute(
                "SELECT set_config('lock_timeout', %s, true)", (f"{round(lock_timeout * 1000)}ms",)
            )
            yield
    except psycopg.errors.LockNotAvailable as exc:
        raise MigrationError(
            f"{doing} waited more than {lock_timeout:g} s for a lock held by another session "
            f"(a long query or transaction on the same table?) and was rolled back; it may be "
            f"retried: run migrate again ({exc})"
        ) from exc
    except psycopg.Error as exc:
        raise MigrationError(f"{doing} failed: {exc}") from exc


def ensure_logins(conn: psycopg.Connection[TupleRow], logins: Mapping[str, str]) -> None:
    """Let each role of ``logins`` log in with its password; create the roles that are missing.

    Roles belong to the whole cluster, so test sessions migrating databases of their own race
    here: a role created or altered concurrently is retried. Passwords travel already hashed by
    the client (as ``psql``'s ``\\password`` does), so they never appear in the server's log.
    Raises :class:`MigrationError` for a role that would hold more than its own privileges.
    """
    for role, password in logins.items():
        if not password:
            raise MigrationError(f"no password for database role {role!r}")
        hashed = conn.pgconn.encrypt_password(password.encode(), role.encode()).decode()
        _with_retries(
            conn,
            sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(role)),
            unless_role_exists=role,
        )
        _with_retries(
            conn,
            sql.SQL("ALTER ROLE {} WITH LOGIN PASSWORD {}").format(
                sql.Identifier(role), sql.Literal(hashed)
            ),
        )
    rows = conn.execute(
        "SELECT r.rolname, r.rolsuper, r.rolbypassrls,"
        " array(SELECT g.rolname::text FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid"
        "       WHERE m.member = r.oid ORDER BY 1)"
        " FROM pg_roles r WHERE r.rolname = ANY(%s) ORDER BY 1",
        (list(logins),),
    ).fetchall()
    for role, superuser, bypassrls, member_of in rows:
        if superuser or bypassrls:
            raise MigrationError(
                f"database role {role!r} is a superuser or bypasses row-level security; "
                f"a process must not log in with it (ALTER ROLE {role} NOSUPERUSER NOBYPASSRLS)"
            )
        if member_of:
            raise MigrationError(
                f"database role {role!r} is a member of {', '.join(member_of)}; a process's "
                f"login role must hold only its own privileges (REVOKE ... FROM {role})"
            )
    _log.info("database.logins", roles=sorted(logins))


#: Errors of two sessions creating or altering the same role at once (``tuple concurrently
#: updated`` is an internal error; a concurrent CREATE ROLE ends as a unique violation).
_CONCURRENT_ROLE_CHANGE = (
    psycopg.errors.DuplicateObject,
    psycopg.errors.UniqueViolation,
    psycopg.errors.InternalError_,
)


def _with_retries(
    conn: psycopg.Connection[TupleRow],
    statement: sql.Composed,
    *,
    unless_role_exists: str | None = None,
    attempts: int = 20,
) -> None:
    for attempt in range(1, attempts + 1):
        if (
            unless_role_exists is not None
            and conn.execute(
                "SELECT 1 FROM pg_roles WHERE rolname = %s", (unless_role_exists,)
            ).fetchone()
        ):
            return
        try:
            conn.execute(statement)
        except _CONCURRENT_ROLE_CHANGE:
            if attempt == attempts:
                raise
            # Jittered: sessions that collided and retry in step would collide again.
            time.sleep(random.uniform(0, 0.02 * attempt))  # noqa: S311
        else:
            return


def _maintenance_connection(
    url: str, *, connect_timeout: int, cause: Exception
) -> psycopg.Connection[TupleRow]:
    last: Exception = cause
    for dbname in ("postgres", "template1"):
        try:
            return connect(
                make_conninfo(url, dbname=dbname), autocommit=True, connect_timeout=connect_timeout
            )
        except psycopg.OperationalError as exc:
            last = exc
    raise MigrationError(f"cannot connect to {_redacted(url)}: {cause}") from last


def _redacted(url: str) -> str:
    """``url`` without its password, for messages and logs."""
    try:
        params = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "<unparseable database URL>"
    host = params.get("host", "localhost")
    port = params.get("port", "5432")
    user = params.get("user", "")
    dbname = params.get("dbname", "")
    return f"postgresql://{user}@{host}:{port}/{dbname}"
