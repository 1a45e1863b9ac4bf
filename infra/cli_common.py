"""What every module of the ``agentworks`` command line shares: the settings a command loads,
the database it works on, what it opens for its own use, and how it reports a usage error.

:mod:`infra.cli` registers the other CLI modules (:mod:`infra.billing_cli`,
:mod:`infra.audit_cli`); they take these from here, so no CLI module imports the one that
registers it.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from domain.errors import UsageError
from infra.logging import configure_logging
from infra.migrate import ensure_database, migrate
from infra.settings import Settings, db_logins

PROG = "agentworks"

EXIT_FAILED = 1
EXIT_USAGE = 2


class CliError(UsageError):
    """A problem the user can fix; printed as one line on stderr with ``exit_code``."""

    def __init__(self, message: str, *, exit_code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


#: Characters a terminal acts on rather than shows: C0 and C1 controls (ANSI and OSC escape
#: sequences that restyle the screen, retitle the window, write the clipboard) but newline and
#: tab, and the bidi embeddings, overrides and isolates (text shown in another order than
#: stored).
_ACTED_ON = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def shown(text: str) -> Text:
    """Text from the data (a card title, a lane name, a stored error), as a rich table cell or
    line prints it: literally, never read as rich markup (a title such as ``[/bold]`` stopped
    the command with a ``MarkupError`` traceback, ``[link=…]`` made a link), and with what the
    terminal would act on shown as escapes (``\\x1b``): clients choose these texts, the
    operator's terminal runs the command."""
    return Text(printable(text))


def printable(text: str) -> str:
    """``text`` with what a terminal would act on shown as escapes (see :func:`shown`)."""
    return _ACTED_ON.sub(_escape, text)


def _escape(found: re.Match[str]) -> str:
    return found.group().encode("unicode_escape").decode("ascii")


#: What a command opened for its own use (the embedded server) and closes when it ends.
resources = contextlib.ExitStack()


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment (plus ``overrides``), with logging configured from them."""
    settings = Settings.load(**overrides)
    configure_logging(level=settings.log_level, json=settings.log_json)
    return settings


def data_dir_path(text: str) -> Path:
    """A ``--data-dir`` as given; an empty one is refused, since ``Path('')`` is ``.``: the
    working directory became the data dir, its secrets and an embedded PostgreSQL written there
    beside whatever else it holds."""
    if not text.strip():
        raise typer.BadParameter(
            "is empty; name a directory, or leave the option out for AGENTWORKS_DATA_DIR "
            "(else .agentworks)"
        )
    return Path(text)


#: ``--data-dir`` of every command: the embedded database (and dev JWT secret) it works on.
DataDirOption = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        help="Data dir whose embedded PostgreSQL (and dev JWT secret) to use when "
        "AGENTWORKS_DATABASE_URL is unset; default AGENTWORKS_DATA_DIR, else .agentworks.",
        show_default=False,
        parser=data_dir_path,
    ),
]


def settings_for(data_dir: Path | None, **overrides: object) -> Settings:
    """:func:`load_settings` with ``--data-dir`` (when given) winning over the environment."""
    if data_dir is not None:
        overrides["data_dir"] = data_dir
    return load_settings(**overrides)


def database_url_for(settings: Settings) -> str:
    """The configured database, else the data dir's embedded one (started for this command
    when ``dev`` is not running, and stopped when the command ends)."""
    return settings.database_url or _embedded_url(settings)


def _embedded_url(settings: Settings) -> str:
    """Join (or start) the embedded PostgreSQL of ``settings.data_dir``, created and migrated."""
    import structlog

    from infra.embedded import open_embedded

    if settings.env == "prod":
        raise CliError("AGENTWORKS_DATABASE_URL is not set; production has no embedded database")
    embedded = open_embedded(settings.data_dir)
    resources.callback(embedded.close)
    url = embedded.url
    ensure_database(url)
    migrate(url, app_role=settings.db_app_role, logins=db_logins(settings))
    structlog.get_logger(__name__).info(
        "using the embedded PostgreSQL of the data dir",
        data_dir=str(settings.data_dir.resolve()),
        database_url=url,
    )
    return url
