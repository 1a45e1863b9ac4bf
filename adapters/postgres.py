"""PostgreSQL connections that log in as a component's own database role.

Each component (write side, API, projectors, relay) logs in as a role of its own rather than
connecting as a powerful user and ``SET ROLE``-ing: a session can always ``RESET ROLE`` back to
the user it logged in as, so only the login itself is a boundary.
"""

from __future__ import annotations

from urllib.parse import quote, unquote, urlsplit, urlunsplit

from psycopg import Connection
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import DictRow, dict_row
from psycopg_pool import ConnectionPool

PROJECTOR_ROLE = "agentworks_projector"
API_ROLE = "agentworks_api"
RELAY_ROLE = "agentworks_relay"


def login_url(database_url: str, role: str | None, password: str | None = None) -> str:
    """``database_url`` logging in as ``role`` with ``password`` instead of its own user.

    Host, port, database and options are kept; ``user`` and ``password`` (in the authority and
    in the query string alike) are replaced, percent-encoded. A ``key=value`` connection string
    stays one, quoted as libpq wants. ``role=None`` keeps the URL as is.
    """
    if role is None:
        return database_url
    if "://" not in database_url:
        params = {k: v for k, v in conninfo_to_dict(database_url).items() if k != "password"}
        params["user"] = role
        if password is not None:
            params["password"] = password
        return make_conninfo("", **params)
    parts = urlsplit(database_url)
    hosts = parts.netloc.rpartition("@")[2]
    userinfo = quote(role, safe="")
    if password is not None:
        userinfo += ":" + quote(password, safe="")
    query = "&".join(
        item
        for item in parts.query.split("&")
        if item and unquote(item.partition("=")[0]) not in ("user", "password")
    )
    return urlunsplit((parts.scheme, f"{userinfo}@{hosts}", parts.path, query, parts.fragment))


def make_pool(
    database_url: str,
    *,
    role: str | None = None,
    password: str | None = None,
    min_size: int = 1,
    max_size: int = 4,
    name: str = "agentworks",
) -> ConnectionPool[Connection[DictRow]]:
    """A pool whose sessions log in as ``role`` (default: the URL's own user).

    Privileges and row-level security then apply to everything the component does, not only to
    the queries someone remembered to scope.
    """
    pool: ConnectionPool[Connection[DictRow]] = ConnectionPool(
        login_url(database_url, role, password),
        min_size=min_size,
        max_size=max_size,
        kwargs={"row_factory": dict_row},
        connection_class=Connection[DictRow],
        name=name,
        open=False,
    )
    pool.open(wait=True, timeout=30)
    return pool
