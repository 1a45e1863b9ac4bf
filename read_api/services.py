"""What the GraphQL API needs from the rest of the system, handed in by the composition root.

``infra`` builds one :class:`ApiServices` from settings (the write side, an API-role pool, Redis,
JWT keys, limits) and passes it to :func:`read_api.app.create_app`. Nothing in ``read_api``
reads the environment or connects to anything at import time.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from projections.registry import ALL_PROJECTORS
from read_api.key_uses import API_KEY_USE_INTERVAL_SECONDS

if TYPE_CHECKING:
    import redis.asyncio
    from prometheus_client.registry import Collector
    from psycopg import Connection
    from psycopg.rows import DictRow
    from psycopg_pool import ConnectionPool

    from adapters.credentials import DeviceCookies
    from commands.handlers import AgentWorks
    from commands.identity import Identity
    from projections.base import Projector
    from read_api.broadcast import Broadcaster
    from read_api.oidc import OidcSignIn


@dataclass(frozen=True, kw_only=True)
class JwtVerification:
    """How bearer tokens are checked: exactly one of an HS256 ``secret`` or an RS256 key."""

    secret: str | None = None
    public_key: str | None = None
    leeway_seconds: int = 0
    signature_hint: str | None = None
    """Said after "token signature does not verify" (development only: which key signs here)."""

    def __post_init__(self) -> None:
        if (self.secret is None) == (self.public_key is None):
            raise ValueError("give exactly one of secret (HS256) and public_key (RS256)")


@dataclass(frozen=True, kw_only=True)
class RateLimits:
    """Requests allowed per fixed one-minute window; ``None`` switches a limit off.

    Counted in Redis when the API has a client (so every instance shares the count), in process
    otherwise. ``key_prefix`` namespaces the counters (several deployments on one Redis).
    """

    per_user_per_minute: int | None = 600
    per_workspace_per_minute: int | None = 6000
    per_address_per_minute: int | None = 60
    """Requests that fail authentication, per client address: a token guesser gets 429s."""
    cost_per_user_per_minute: int | None = 1_000_000
    """Fields the user's GraphQL operations may execute a minute, counted as
    ``QueryLimits.max_executed`` counts them (5-9 µs of CPU each: some 5-9 s a minute, a
    board of 200 cards 250 times); past it the user's requests are refused until the minute
    ends (see :mod:`read_api.ratelimit`)."""
    cost_per_workspace_per_minute: int | None = 3_000_000
    """The same for every request in one workspace."""
    key_prefix: str = "agentworks:ratelimit"


@dataclass(frozen=True, kw_only=True)
class QueryLimits:
    """Bounds on what one GraphQL document may ask for, checked before it runs."""

    max_depth: int = 12
    max_aliases: int = 30
    max_tokens: int = 4000
    max_cost: int = 100_000
    """Estimated cost of a document: the objects it may resolve, lists counted at their page
    size, and 3 for each list or field it may read by a query (``read_api.limits``)."""
    max_executed: int | None = 100_000
    """Fields one operation may execute, a field not read straight off its object counting 4
    (``read_api.execution``), about 1 s of CPU: past it the rest is not resolved (VALIDATION).
    ``None``: no limit."""
    max_expanded_selections: int = 10_000
    """Fields a document may stand for with its fragments spread (its text is max_tokens)."""
    max_log_reads: int = 3
    """Fields that fold the event log (``cardHistory``, ``reconciliation``, ``board`` with
    ``asOf``) one operation may ask for: each costs what the log holds, not what it returns."""
    max_field_merge_work: int = 10_000
    """Work validation may spend checking that fields of one name in one selection can merge
    (graphql-core's complexity budget of that rule: about 2 per pair of fields compared, some
    3 µs each); past it the document is refused (VALIDATION). graphql-core's own 500,000 is
    1.5-4 s of the event loop's CPU, every other request waiting, spent by a document within
    the token limit that asks for ``me { id }`` 950 times; real documents spend a few hundred.
    Process-wide: the rule reads it from its module (``read_api.schema.build_schema`` sets it).
    """


@dataclass(frozen=True, kw_only=True)
class RequestStats:
    """What one GraphQL request cost, reported to :attr:`ApiServices.stats_hook`."""

    request_id: str
    operation_name: str | None
    statements: int
    """SQL statements run for the request on the API pool (consistency waits excluded)."""
    duration_ms: float
    executed: int = 0
    """Fields its operation executed, as its caller's budgets are charged them."""


@dataclass(frozen=True, kw_only=True)
class AuthSettings:
    """How ``/auth`` behaves, from settings (the composition root builds it)."""

    identity: Identity
    secure_cookie: bool = True
    refresh_ttl_seconds: int = 30 * 86400
    login_per_account_per_minute: int | None = 10
    login_per_address_per_minute: int | None = 30
    invitation_ttl_seconds: int = 7 * 86400
    """How long an invitation can be accepted (``inviteMember``)."""
    key_prefix: str = "agentworks:ratelimit"
    device_cookies: DeviceCookies | None = None
    """Signs the ``aw_device`` cookie: a browser that signed in to an account before logs in
    on its own limit, not the account's (``None``: every login counts against its account)."""


@dataclass(kw_only=True)
class ApiServices:
    """Everything the API uses, built once by the composition root.

    The composition root closes the write side and the pool; the app closes, on shutdown, what
    lives in its event loop: the broadcaster and the ``redis`` client.
    """

    write: AgentWorks
    """The write side: commands go through its handlers, card history through ``card_at``."""
    pool: ConnectionPool[Connection[DictRow]]
    """A pool made with ``adapters.postgres.make_pool(url, role="agentworks_api")``."""
    jwt: JwtVerification
    broadcaster: Broadcaster
    """``RedisBroadcaster`` when Redis is configured, else ``LocalBroadcaster``."""
    redis: redis.asyncio.Redis | None = None
    """Shared rate-limit counters and readiness; ``None`` = in-process limiter."""
    consistency_wait_ms: int = 2000
    rate_limits: RateLimits = field(default_factory=RateLimits)
    query_limits: QueryLimits = field(default_factory=QueryLimits)
    cors_origins: tuple[str, ...] = ()
    trusted_proxies: tuple[str, ...] = ()
    """Proxies (addresses or networks) whose ``X-Forwarded-For`` is believed; none by default."""
    cors_origin_regex: str | None = None
    """Origins allowed by CORS besides ``cors_origins`` (development: any localhost port)."""
    graphiql: bool = False
    """Answer a browser's ``GET /graphql`` with GraphiQL (development only)."""
    max_body_bytes: int = 1_000_000
    request_head_timeout_seconds: float = 10.0
    """A request's head (request line and headers) must have arrived this long after the
    connection opened, or after its first byte on a kept-alive connection; else 408 and the
    connection is closed (``read_api.serving``)."""
    request_body_timeout_seconds: float = 30.0
    """A request's body must have arrived this long after its head; else 408 and the connection
    is closed (``read_api.input_checks.body_within``)."""
    max_connections_per_address: int | None = 256
    """HTTP connections one client address may hold open on this instance; one more is answered
    503 and closed. Not counted behind ``trusted_proxies`` (the proxy bounds its clients), nor
    WebSockets once upgraded. ``None``: no bound (``read_api.serving``)."""
    send_timeout_seconds: float = 60.0
    """A client that leaves what it was sent unread this long, once the server's send buffer
    for it is full (a response, subscription messages, pongs), is disconnected
    (``read_api.serving``)."""
    metrics_token: str | None = None
    """``GET /metrics`` answers 401 without ``Authorization: Bearer <this>``; ``None``: open."""
    projectors: tuple[type[Projector], ...] = ALL_PROJECTORS
    """The read models this deployment keeps: consistency waits and readiness look at these."""
    max_projector_lag: int | None = 10_000
    """``/readyz`` answers 503 when a projector is further behind the log head than this."""
    projector_stall_seconds: float | None = 30.0
    """``/readyz`` answers 503 when a projector is behind and has not moved for this long:
    nothing consumes (``serve`` alone, every worker down). ``None``: not checked."""
    db_threads: int = 32
    """Worker threads for blocking database and write-side calls."""
    statement_timeout_ms: int = 10_000
    subscription_recheck_seconds: float = 5.0
    """A quiet log subscription re-reads the read model this often, in case a message was lost."""
    stats_hook: Callable[[RequestStats], None] | None = None
    """Called after each HTTP GraphQL request (metrics, tests counting SQL statements)."""
    fanout_readiness: Callable[[], Mapping[str, str]] | None = None
    """The fan-out running in this process (``agentworks dev`` with Kafka: relay and workers),
    component -> ``"ok"`` or why it could not deliver an event now; ``/readyz`` is ready only
    when every one says ``"ok"``. Must not block: it is called on the event loop."""
    write_reachable: Callable[[float], None] | None = None
    """Borrows a connection of the write side's pool within the seconds given and runs an
    empty statement, raising what the pool or the database raise: ``/readyz`` answers 503
    while the write side cannot reach its database (its role's login refused, its pool empty)
    though the API's reads can. ``None``: not checked."""
    lag_collector: Collector | None = None
    """Log head, relay and projector lag of this deployment's database
    (``adapters.metrics.LagCollector``), exposed at ``/metrics`` beside the process-wide metrics;
    ``None``: ``/metrics`` has no lag gauges."""
    max_subscriptions_per_connection: int = 20
    """Active subscriptions one WebSocket connection may hold; more are ``RATE_LIMITED``."""
    max_subscriptions_per_user: int = 100
    """Active subscriptions one user may hold over all connections to this API instance."""
    max_unsigned_websockets_per_address: int | None = 50
    """WebSockets one client address may hold open before they sign in (``connection_init``),
    on this instance; ``None``: no bound (``read_api.subscription_limits``)."""
    stripe_webhook_secret: str | None = None
    """Signing secret of ``POST /webhooks/stripe``; ``None``: the route answers 404."""
    auth: AuthSettings | None = None
    """Sign-in (``/auth/*``); ``None``: this API only accepts tokens issued elsewhere."""
    oidc: OidcSignIn | None = None
    """Tokens of the configured OpenID Connect provider, accepted as user tokens."""
    response_cache_entries: int = 512
    """Answers of read-model queries kept per read-model version (``read_api.response_cache``);
    0 switches the cache off."""
    response_cache_bytes: int = 64 * 1024 * 1024
    """Bound on the rendered answers the response cache keeps."""
    api_key_use_interval_seconds: float = API_KEY_USE_INTERVAL_SECONDS
    """An API key's use is written at most this often (``ApiKey.lastUsedAt`` is precise to it)."""
