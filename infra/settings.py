"""Settings of every AgentWorks process, read once from ``AGENTWORKS_*`` environment variables.

Nothing outside :mod:`infra` reads the environment: the composition root loads one validated
:class:`Settings` at start and hands the values it needs to each component.

With nothing set, a process runs on the embedded development default (embedded PostgreSQL under
``data_dir``, in-process fan-out instead of Kafka and Redis, a JWT secret and the database roles'
passwords generated and kept in ``data_dir``). In ``env=prod`` the settings refuse what would be
unsafe there, such as a short JWT secret or a missing database password.
"""

from __future__ import annotations

import contextlib
import difflib
import ipaddress
import logging
import os
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Self
from urllib.parse import quote, urlsplit, urlunsplit

from cryptography.hazmat.primitives import serialization
from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Re-exported: callers of the settings import it from here.
from domain.errors import ConfigurationError as ConfigurationError
from streams.relay import RELAY

ENV_PREFIX = "AGENTWORKS_"

#: ``AGENTWORKS_*`` names that are no setting but are read by something else, and why; every
#: other name with the prefix that is no setting is refused at start (a typo would otherwise
#: leave its setting at the default without a word). The test suite's own knobs reach the
#: processes it starts and the settings its tests load.
OTHER_ENV_NAMES: Mapping[str, str] = {
    "AGENTWORKS_TEST_DB_PREFIX": "prefix of the test suite's database names (tests/pg.py)",
    "AGENTWORKS_TEST_SESSION_PID": "the test session a process belongs to (tests/pg.py)",
    "AGENTWORKS_TEST_CONNECTION_BUDGET": "the test suite's connection budget (tests/conftest.py)",
}

#: HS256 signs with SHA-256; a shorter secret than its 32-byte output is guessable offline.
MIN_JWT_SECRET_BYTES = 32

#: Name of the file, inside the data dir, that keeps the generated development JWT secret.
DEV_JWT_SECRET_FILE = "jwt_secret"  # noqa: S105 - a file name, not a secret

#: Where the dev mode keeps its embedded database and secrets, unless told otherwise.
DEFAULT_DATA_DIR = Path(".agentworks")

JwtAlgorithm = Literal["HS256", "RS256"]

_LOG_LEVELS = frozenset(logging.getLevelNamesMapping())

#: URL schemes ``redis.Redis.from_url`` accepts.
_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


class Settings(BaseSettings):
    """Every knob of AgentWorks; each field is the env var ``AGENTWORKS_<FIELD NAME>``."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="ignore",
        validate_default=True,
        hide_input_in_errors=True,
    )

    # --- storage -------------------------------------------------------------------------
    database_url: str | None = None
    """``postgresql://user[:password]@host[:port]/dbname``; None runs the embedded dev database."""
    db_app_role: str = "agentworks_app"
    """Role the write side logs in as (INSERT/SELECT on the event store and command log)."""
    db_writer_password: SecretStr | None = None
    """Password of ``db_app_role``; outside production, generated and kept in ``data_dir``."""
    db_api_password: SecretStr | None = None
    """Password of ``agentworks_api`` (the API's reads); generated outside production."""
    db_projector_password: SecretStr | None = None
    """Password of ``agentworks_projector`` (workers, rebuild); generated outside production."""
    db_relay_password: SecretStr | None = None
    """Password of ``agentworks_relay``; generated outside production."""
    pool_size: int = Field(default=10, ge=1)
    database_password: SecretStr | None = None
    """Password put into ``database_url`` (percent-encoded), so that one holding ``@``, ``/`` or
    ``:`` needs no encoding by hand (docker-compose passes ``POSTGRES_PASSWORD`` here)."""

    # --- fan-out -------------------------------------------------------------------------
    kafka_bootstrap: str | None = None
    """``host:port[,host:port…]``; None means in-process fan-out straight from the event log."""
    topic_prefix: str = ""
    topic_partitions: int = Field(default=6, ge=1)
    sweep_interval: float = Field(default=10.0, ge=0)
    """Seconds between a worker's sweeps for events its deliveries never brought (a lost tail);
    a sweep looks only at what the relay had published one interval earlier. 0: no sweeps; the
    worker still checks its position without applying anything (``SweepSchedule.check``)."""
    worker_fetch_wait_ms: int = Field(default=100, ge=0, le=60_000)
    """Longest time a worker's fetch waits for records (faust's own is 1500 ms); bounds the
    delay an event sees on a broker that holds a fetch for its whole wait."""
    redis_url: str | None = None
    """``redis://host:port/db`` for subscriptions and rate limits across API instances and
    budget holds shared by orchestrators; None = in-process."""

    # --- auth ----------------------------------------------------------------------------
    jwt_secret: SecretStr | None = None
    """HS256 secret. None (and no RS256 keys) means the dev secret kept in ``data_dir``."""
    jwt_public_key: str | None = None
    """RS256 public key (PEM) that verifies tokens."""
    jwt_private_key: SecretStr | None = None
    """RS256 private key (PEM) that signs tokens (``agentworks token``)."""
    jwt_algorithm: JwtAlgorithm | None = None
    """Derived when unset: RS256 if an RS256 key is configured, else HS256."""

    # --- billing -------------------------------------------------------------------------
    stripe_api_key: SecretStr | None = None
    stripe_api_base: str | None = None
    """Base URL of the Stripe API (a local fake in tests); None means Stripe's own."""
    stripe_webhook_secret: SecretStr | None = None
    """Signing secret of the Stripe webhook endpoint (``POST /webhooks/stripe``)."""

    # --- audit -------------------------------------------------------------------------
    audit_signing_key: SecretStr | None = None
    """Ed25519 private key (PEM) that signs audit exports; None: the dev key in ``data_dir``
    (refused in ``prod``)."""

    # --- behaviour -----------------------------------------------------------------------
    # --- API ---------------------------------------------------------------------------
    api_pool_size: int = Field(default=20, ge=1)
    """Connections of the API role; a GraphQL request holds one while it reads."""
    malloc_arena_max: int = Field(default=2, ge=0)
    """Arenas glibc may give the API's threads (``agentworks serve`` and ``dev``); each keeps
    its high-water mark, so fewer bound RSS. 0 keeps glibc's default (8 per core); an
    operator's ``MALLOC_ARENA_MAX`` wins."""
    cors_origins: str = ""
    """Comma-separated origins allowed by CORS (empty: same origin only)."""
    rate_limit_per_user: int = Field(default=600, ge=0)
    """Requests per minute per user; 0 switches the limit off."""
    rate_limit_per_workspace: int = Field(default=6000, ge=0)
    """Requests per minute per workspace; 0 switches the limit off."""
    rate_limit_per_address: int = Field(default=60, ge=0)
    """Requests without a valid token per minute per client address; 0 switches it off."""
    query_cost_per_user: int = Field(default=1_000_000, ge=0)
    """Fields the user's GraphQL operations may execute per minute; 0 switches it off."""
    query_cost_per_workspace: int = Field(default=3_000_000, ge=0)
    """Fields GraphQL operations in one workspace may execute per minute; 0 switches it off."""
    trusted_proxies: str = ""
    """Comma-separated addresses (or networks) of proxies whose ``X-Forwarded-For`` names the
    client; empty: the header is ignored and the connecting address is the client."""
    max_subscriptions_per_connection: int = Field(default=20, ge=1)
    """Active subscriptions one WebSocket connection may hold; more get ``RATE_LIMITED``."""
    max_subscriptions_per_user: int = Field(default=100, ge=1)
    """Active subscriptions one user may hold over all their connections to one API instance
    (counted per instance, not across instances); more get ``RATE_LIMITED``."""
    max_unsigned_websockets_per_address: int = Field(default=50, ge=1)
    """WebSockets one client address may hold open on one API instance before they sign in
    (``connection_init``); one more is refused at its handshake (HTTP 403)."""
    max_body_bytes: int = Field(default=1_000_000, ge=1024)
    request_head_timeout_seconds: float = Field(default=10.0, gt=0)
    """A request's head (request line and headers) must arrive within this long of the
    connection opening (or of its first byte, on a kept-alive connection); else 408, closed."""
    request_body_timeout_seconds: float = Field(default=30.0, gt=0)
    """A request's body must arrive within this long of its head; else 408, closed."""
    max_connections_per_address: int = Field(default=256, ge=0)
    """HTTP connections one client address may hold open on one API instance (0: no bound);
    one more is answered 503 and closed. Not applied behind trusted proxies."""
    send_timeout_seconds: float = Field(default=60.0, gt=0)
    """A client that leaves what it was sent unread this long, once the server's buffer for it
    is full (a response, subscription messages), is disconnected."""
    metrics_token: SecretStr | None = None
    """Bearer token ``GET /metrics`` asks for (``Authorization: Bearer …``); unset: it answers
    anyone, so keep the port off the public network."""
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    """Port on which ``relay``, ``worker`` and ``orchestrator`` serve ``GET /metrics`` (each
    process records metrics no other process shows); None: they serve none. ``worker`` without
    ``--projector`` gives its projector processes this port and the next ones."""
    metrics_host: str = "127.0.0.1"
    """Interface those processes serve ``/metrics`` on (``0.0.0.0`` for a scraper elsewhere)."""
    max_projector_lag: int = Field(default=10_000, ge=0)
    """``/readyz`` answers 503 when a projector is further behind the log head than this."""
    projector_stall_seconds: float = Field(default=30.0, ge=0)
    """``/readyz`` answers 503 when a projector is behind and has not moved for this long
    (nothing consumes the log: no worker runs); 0 switches the check off."""
    otlp_endpoint: str | None = None
    """OTLP/HTTP traces endpoint (``http://collector:4318/v1/traces``); None: no export."""
    consistency_wait_ms: int = Field(default=2000, ge=0)
    """Longest wait of a read that carries ``X-Consistency-Token``."""
    command_retries: int = Field(default=5, ge=0)
    """Retries of a command that lost an optimistic-concurrency race before it answers CONFLICT."""
    pool_timeout: float = Field(default=2.0, gt=0, le=60)
    """Longest wait for a free database connection before answering UNAVAILABLE (HTTP 503)."""
    commit_settle_seconds: float = Field(default=5.0, ge=0, le=60)
    """How long a write whose commit was interrupted waits to learn whether it committed, before
    answering UNAVAILABLE with ``outcome: "unknown"`` and its commandId."""
    data_dir: Path = DEFAULT_DATA_DIR
    env: Literal["dev", "test", "prod"] = "dev"
    log_level: str = "INFO"
    log_json: bool = True

    # --- agent runs (orchestrator, providers, prices) -----------------------------------------
    openai_base_url: str = "https://api.openai.com/v1"
    openai_api_key: SecretStr | None = None
    """Without a key the router never picks OpenAI."""
    anthropic_base_url: str = "https://api.anthropic.com"
    anthropic_api_key: SecretStr | None = None
    price_table: Path | None = None
    """JSON or YAML price table replacing the built-in one (see API.md)."""
    provider_timeout: float = Field(default=30.0, gt=0)
    """Seconds a provider may stay silent (first byte or between chunks) before a call fails."""
    provider_idle_timeout: float = Field(default=60.0, gt=0)
    """Seconds a provider's stream may go on without progress (text, usage, Anthropic's
    message_start; keep-alives, pings and blank lines do not count) before the call is cut."""
    simulated_tokens_per_second: float = Field(default=60.0, ge=0)
    """Speed of the built-in simulated provider; 0 streams as fast as it can."""
    simulated_output_tokens: int = Field(default=120, ge=1)
    orchestrator_concurrency: int = Field(default=20, ge=1)
    """Runs one orchestrator executes at once; more wait QUEUED (for it or another one)."""
    run_timeout: float = Field(default=300.0, gt=0)
    """Seconds a run may take from its start before it ends TIMED_OUT."""
    heartbeat_interval: float = Field(default=5.0, gt=0)
    stale_after: float = Field(default=30.0, gt=0)
    """A RUNNING run whose events stopped this long ago is taken over by another orchestrator."""
    max_reclaims: int = Field(default=2, ge=0)
    """Takeovers of one run before it is failed instead (a run that kills its workers)."""
    provider_max_attempts: int = Field(default=4, ge=1)
    """Provider calls (retries and fallbacks included) one run may make before it fails."""
    orchestrator_in_dev: bool = True
    """``agentworks dev`` runs an orchestrator in-process."""
    # --- identity (sign-in for a SPA) -----------------------------------------------------
    access_token_ttl: int = Field(default=900, ge=30, le=86_400)
    """Seconds a user access token from ``/auth/login`` or ``/auth/refresh`` lives."""
    refresh_token_ttl: int = Field(default=2_592_000, ge=300)
    """Seconds a sign-in session lives, however often it is refreshed (default 30 days)."""
    totp_encryption_key: SecretStr | None = None
    """Fernet key sealing TOTP secrets; None: outside production, ``DATA_DIR/totp_key``."""
    login_rate_per_account: int = Field(default=10, ge=0)
    """Login attempts per minute per e-mail address; 0 switches the limit off."""
    login_rate_per_address: int = Field(default=30, ge=0)
    """Sign-in attempts (login, signup, failed refresh) per minute per client address; 0: off."""
    oidc_issuer: str | None = None
    """Issuer (``iss``) of an OpenID Connect provider whose tokens act as user tokens."""
    oidc_audience: str | None = None
    """Audience (``aud``) those tokens must carry; needed with ``oidc_issuer``."""
    oidc_jwks_url: str | None = None
    """JWKS URL of the provider; None: the ``jwks_uri`` of the issuer's discovery document."""
    invitation_ttl: int = Field(default=604_800, ge=60)
    """Seconds an invitation can be accepted (default 7 days)."""

    @classmethod
    def load(cls, **overrides: Any) -> Self:
        """Read the environment, apply ``overrides`` (which win), validate.

        Raises :class:`ConfigurationError` with a one-line message instead of pydantic's
        multi-line report, so that CLIs and servers can refuse to start cleanly; also for an
        ``AGENTWORKS_*`` variable that is no setting (see :func:`check_env_names`).
        """
        check_env_names(os.environ)
        try:
            return cls(**overrides)
        except ValidationError as exc:
            raise ConfigurationError(_describe(exc)) from exc

    @field_validator("database_url")
    @classmethod
    def _postgres_url(cls, value: str | None) -> str | None:
        if value is None or value.strip() == "":
            return None
        return checked_database_url(value)

    @field_validator("data_dir", mode="before")
    @classmethod
    def _empty_data_dir_is_unset(cls, value: object) -> object:
        # Path('') is '.': an empty AGENTWORKS_DATA_DIR made the working directory the data dir.
        return DEFAULT_DATA_DIR if isinstance(value, str) and not value.strip() else value

    @field_validator("kafka_bootstrap", "redis_url", "stripe_api_base")
    @classmethod
    def _empty_is_unset(cls, value: str | None) -> str | None:
        return None if value is None or value.strip() == "" else value

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        # Checked here, not by the first Redis client built: that failed with a traceback.
        if value is not None and not value.startswith(_REDIS_SCHEMES):
            raise ValueError("must be a redis://, rediss:// or unix:// URL")
        if value is not None:
            from redis.connection import parse_url

            try:
                parse_url(value)  # type: ignore[no-untyped-call]
            except ValueError:
                # Not redis's message: it quotes the part it could not read, which may be a
                # piece of the password.
                raise ValueError(
                    "is not a Redis URL redis can read (a port that is no number from 1 to "
                    "65535? percent-encode an @, / or : in the password)"
                ) from None
        return value

    @field_validator("cors_origins")
    @classmethod
    def _web_origins(cls, value: str) -> str:
        # CORS is told to allow credentials (the aw_refresh cookie), and with ``*`` among the
        # origins Starlette answers any Origin back with credentials allowed: every site could
        # call the API as its visitor. ``null`` (sandboxed frames, local files) any page can
        # send; an entry with a path or upper case matches no Origin a browser sends.
        for entry in (part.strip() for part in value.split(",")):
            if entry and not _is_web_origin(entry):
                raise ValueError(
                    f"{entry!r} is not a web origin: name each one as a browser sends it, "
                    "scheme://host[:port] in lower case (http or https, no path, no default "
                    "port, a non-ASCII name in its xn-- form), never '*'"
                )
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _proxy_addresses(cls, value: str) -> str:
        # uvicorn takes an entry it cannot parse (10.0.0.1/8, a host name) as a literal that no
        # client address ever equals: the proxy went untrusted without a word, and every
        # client behind it shared the proxy's per-address rate limits.
        for entry in (part.strip() for part in value.split(",")):
            if not entry or entry == "*":
                continue
            try:
                if "/" in entry:
                    ipaddress.ip_network(entry)
                else:
                    ipaddress.ip_address(entry)
            except ValueError:
                raise ValueError(
                    f"{entry!r} is not an IP address or network (such as 10.0.0.0/8, with "
                    "the host bits zero)"
                ) from None
        return value

    @field_validator("totp_encryption_key")
    @classmethod
    def _fernet_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or value.get_secret_value().strip() == "":
            return None
        from cryptography.fernet import Fernet

        try:
            Fernet(value.get_secret_value().encode())
        except (ValueError, TypeError):
            raise ValueError(
                "must be a Fernet key, 32 url-safe base64-encoded bytes (python -c 'from "
                "cryptography.fernet import Fernet; print(Fernet.generate_key().decode())')"
            ) from None
        return value

    @field_validator(
        "jwt_secret",
        "stripe_api_key",
        "stripe_webhook_secret",
        "db_writer_password",
        "db_api_password",
        "db_projector_password",
        "db_relay_password",
    )
    @classmethod
    def _empty_secret_is_unset(cls, value: SecretStr | None) -> SecretStr | None:
        return None if value is None or value.get_secret_value().strip() == "" else value

    @field_validator("jwt_public_key")
    @classmethod
    def _public_pem(cls, value: str | None) -> str | None:
        return None if value is None or value.strip() == "" else _unescape_pem(value)

    @field_validator("jwt_private_key", "audit_signing_key")
    @classmethod
    def _private_pem(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or value.get_secret_value().strip() == "":
            return None
        return SecretStr(_unescape_pem(value.get_secret_value()))

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        level = value.strip().upper()
        if level not in _LOG_LEVELS:
            raise ValueError(f"must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL; got {value!r}")
        return level

    @model_validator(mode="after")
    def _password_into_url(self) -> Self:
        if self.database_password is not None and self.database_url is not None:
            self.database_url = with_password(
                self.database_url, self.database_password.get_secret_value()
            )
        return self

    @model_validator(mode="after")
    def _consistent_auth(self) -> Self:
        has_rsa = self.jwt_public_key is not None or self.jwt_private_key is not None
        if self.jwt_algorithm is None:
            self.jwt_algorithm = "RS256" if has_rsa else "HS256"
        elif self.jwt_algorithm == "RS256" and not has_rsa:
            raise ValueError(
                "AGENTWORKS_JWT_ALGORITHM=RS256 needs AGENTWORKS_JWT_PUBLIC_KEY "
                "or AGENTWORKS_JWT_PRIVATE_KEY"
            )
        if self.env == "prod" and self.jwt_secret is not None:
            size = len(self.jwt_secret.get_secret_value().encode())
            if size < MIN_JWT_SECRET_BYTES:
                raise ValueError(
                    f"AGENTWORKS_JWT_SECRET is {size} bytes; production needs at least "
                    f"{MIN_JWT_SECRET_BYTES} (e.g. python -c 'import secrets; "
                    "print(secrets.token_urlsafe(48))')"
                )
        return self

    @property
    def algorithm(self) -> JwtAlgorithm:
        """The JWT algorithm in force (``jwt_algorithm`` after derivation)."""
        return self.jwt_algorithm or "HS256"


@dataclass(frozen=True, slots=True)
class JwtKeys:
    """The keys that sign and verify tokens, resolved from settings (see :func:`jwt_keys`)."""

    algorithm: JwtAlgorithm
    secret: str | None = None
    """HS256 secret: signs and verifies."""
    private_key: str | None = None
    """RS256 PEM private key: signs. None on a verify-only process."""
    public_key: str | None = None
    """RS256 PEM public key: verifies."""

    @property
    def can_sign(self) -> bool:
        return self.secret is not None or self.private_key is not None


def deployed_relays(settings: Settings) -> tuple[str, ...]:
    """The relays the deployment keeps: one through Kafka, none when the fan-out is embedded."""
    return (RELAY,) if settings.kafka_bootstrap else ()


def jwt_keys(settings: Settings, *, data_dir: Path | None = None) -> JwtKeys:
    """Resolve which keys sign and verify tokens.

    RS256 when an RS256 key is configured (the public key is derived from the private one when
    only that is given); else HS256 with ``AGENTWORKS_JWT_SECRET``; else, outside production,
    the development secret kept in ``data_dir`` (default ``settings.data_dir``), generated on
    first use. Raises :class:`ConfigurationError` when production has no key.
    """
    if settings.algorithm == "RS256":
        private = settings.jwt_private_key.get_secret_value() if settings.jwt_private_key else None
        public = settings.jwt_public_key
        if public is None and private is not None:
            public = _public_from_private(private)
        else:
            if private is not None:
                _public_from_private(private)  # refused now, not at the first sign-in
            if public is not None:
                _check_public_key(public)
        return JwtKeys(algorithm="RS256", private_key=private, public_key=public)
    if settings.jwt_secret is not None:
        secret = settings.jwt_secret.get_secret_value()
        size = len(secret.encode())
        if size < MIN_JWT_SECRET_BYTES:
            # Token checks refuse such a key in every environment (adapters.tokens): a process
            # started with it would answer every authenticated request with an internal error.
            raise ConfigurationError(
                f"AGENTWORKS_JWT_SECRET is {size} bytes; HS256 needs at least "
                f"{MIN_JWT_SECRET_BYTES} (e.g. python -c 'import secrets; "
                "print(secrets.token_urlsafe(48))')"
            )
        return JwtKeys(algorithm="HS256", secret=secret)
    if settings.env == "prod":
        raise ConfigurationError(
            "no JWT key configured: set AGENTWORKS_JWT_SECRET (HS256) or "
            "AGENTWORKS_JWT_PUBLIC_KEY/AGENTWORKS_JWT_PRIVATE_KEY (RS256) in production"
        )
    return JwtKeys(algorithm="HS256", secret=dev_jwt_secret(data_dir or settings.data_dir))


DbComponent = Literal["writer", "api", "projector", "relay"]

#: The role each component logs in as, but the writer's (``Settings.db_app_role``).
DB_ROLES: dict[DbComponent, str] = {
    "api": "agentworks_api",
    "projector": "agentworks_projector",
    "relay": "agentworks_relay",
}


@dataclass(frozen=True, slots=True)
class DbLogin:
    """The PostgreSQL role one component logs in as, and its password."""

    role: str
    password: str = field(repr=False)


def db_login(
    settings: Settings, component: DbComponent, *, data_dir: Path | None = None
) -> DbLogin:
    """Who ``component`` logs in as: its role and its password.

    The password is ``AGENTWORKS_DB_<COMPONENT>_PASSWORD``; outside production, when unset, one
    generated on first use and kept in ``data_dir`` (``db_password_<component>``, mode 0600),
    shared by ``agentworks migrate``, which sets it, and the processes that log in with it.
    Raises :class:`ConfigurationError` when production has none.
    """
    role = settings.db_app_role if component == "writer" else DB_ROLES[component]
    configured: SecretStr | None = getattr(settings, f"db_{component}_password")
    if configured is not None:
        return DbLogin(role, configured.get_secret_value())
    if settings.env == "prod":
        raise ConfigurationError(
            f"{ENV_PREFIX}DB_{component.upper()}_PASSWORD is not set; production needs the "
            f"password of the database role {role!r}"
        )
    folder = data_dir or settings.data_dir
    try:
        return DbLogin(role, _keep_dev_secret(folder, f"db_password_{component}"))
    except OSError as exc:
        raise ConfigurationError(
            f"cannot keep the dev database password in {folder}: {exc}"
        ) from exc


def db_logins(settings: Settings, *, data_dir: Path | None = None) -> dict[str, str]:
    """Every component's role and password, for ``agentworks migrate`` to set."""
    logins = (db_login(settings, c, data_dir=data_dir) for c in ("writer", *DB_ROLES))
    return {login.role: login.password for login in logins}


def dev_jwt_secret(data_dir: Path) -> str:
    """The development JWT secret kept in ``data_dir/jwt_secret``, generated on first use.

    ``agentworks dev`` and ``agentworks token --data-dir DIR`` share it, so tokens printed by the
    CLI are accepted by a dev server on the same data dir across restarts. The file is created
    with mode 0600 and published atomically (written aside, then hard-linked into place), so two
    processes starting together agree on one secret and never read a half-written file.
    """
    try:
        return _keep_dev_secret(data_dir)
    except OSError as exc:
        raise ConfigurationError(f"cannot keep the dev JWT secret in {data_dir}: {exc}") from exc


def _keep_dev_secret(data_dir: Path, name: str = DEV_JWT_SECRET_FILE) -> str:
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = data_dir / name
    existing = _read_secret(path)
    if existing is not None:
        return existing
    secret = secrets.token_urlsafe(48)
    temp = data_dir / f".{name}.{os.getpid()}.{secrets.token_hex(4)}"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            handle.write(secret + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(temp, path)
        except FileExistsError:
            # Another process published its secret first: use that one.
            winner = _read_secret(path)
            if winner is None:
                raise ConfigurationError(f"{path} exists but holds no secret") from None
            return winner
    finally:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
    return secret


def _read_secret(path: Path) -> str | None:
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"cannot read the dev secret {path}: {exc}") from exc
    if not text:
        raise ConfigurationError(f"{path} is empty; delete it to generate a new dev secret")
    return text


_DEFAULT_PORTS = {"http": 80, "https": 443}


def _is_web_origin(entry: str) -> bool:
    """Whether ``entry`` is one origin as a browser's ``Origin`` header spells it: the scheme's
    default port left out, the host in ASCII (a name's IDNA form, ``xn--``) and an IPv6
    address in its shortest form. Spelt otherwise it names the same site, yet no request's
    ``Origin`` ever equals it."""
    try:
        parts = urlsplit(entry)
        port = parts.port  # a port that is no number raises
    except ValueError:
        return False
    host = parts.hostname or ""
    if ":" in host:  # an IPv6 address
        try:
            named = f"[{ipaddress.IPv6Address(host).compressed}]"
        except ValueError:
            return False
    else:
        named = host
    shown = None if port == _DEFAULT_PORTS.get(parts.scheme) else port
    rebuilt = f"{parts.scheme}://{named}" + ("" if shown is None else f":{shown}")
    return (
        parts.scheme in _DEFAULT_PORTS
        and bool(host)
        and host.isascii()
        and "*" not in host
        and entry == rebuilt
    )


def checked_database_url(url: str) -> str:
    """``url`` when it is a PostgreSQL URL libpq reads as written; else :class:`ValueError`
    saying what is wrong without quoting it (the rule of ``AGENTWORKS_DATABASE_URL``, which
    ``migrate --database-url`` applies to its option too)."""
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme not in ("postgresql", "postgres"):
        raise ValueError("must be a postgresql:// URL")
    _check_parses(url)
    return url


def _check_parses(url: str) -> None:
    """Refuse a URL libpq would misread, without repeating any of it (it may hold a password).

    An unencoded ``@`` or ``/`` in a password moves the host part into the password or the
    database name, and the connection error then quoted pieces of the password.
    """
    from psycopg import ProgrammingError
    from psycopg.conninfo import conninfo_to_dict

    split = urlsplit(url)
    misread = ValueError(
        "is not a valid postgresql:// URL (is there an @, / or : in the password? "
        "percent-encode it, or set the password alone in AGENTWORKS_DATABASE_PASSWORD)"
    )
    if "@" in split.path or "@" in split.query or split.netloc.count("@") > 1:
        raise misread
    try:
        conninfo_to_dict(url)
        if "," not in split.netloc:  # several hosts: libpq checks their ports itself
            _ = split.port
    except (ProgrammingError, ValueError):
        raise misread from None


def with_password(url: str, password: str) -> str:
    """``url`` with ``password`` (percent-encoded) as its password."""
    split = urlsplit(url)
    user = split.username or ""
    host = split.netloc.rpartition("@")[2]
    netloc = f"{user}:{quote(password, safe='')}@{host}"
    return urlunsplit(split._replace(netloc=netloc))


def _unescape_pem(value: str) -> str:
    # A PEM passed through an env var (docker, CI) often arrives with literal "\n" sequences.
    text = value.strip()
    if "\n" not in text and "\\n" in text:
        text = text.replace("\\n", "\n")
    return text + "\n"


def _public_from_private(private_pem: str) -> str:
    try:
        key = serialization.load_pem_private_key(private_pem.encode(), password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigurationError(
            f"AGENTWORKS_JWT_PRIVATE_KEY is not an unencrypted PEM private key: {exc}"
        ) from exc
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def _check_public_key(public_pem: str) -> None:
    """Refuse a verification key tokens could never be checked with (each request would fail)."""
    from jwt.algorithms import RSAAlgorithm
    from jwt.exceptions import InvalidKeyError

    try:
        RSAAlgorithm(RSAAlgorithm.SHA256).prepare_key(public_pem)
    except (InvalidKeyError, ValueError, TypeError) as exc:
        raise ConfigurationError(
            f"AGENTWORKS_JWT_PUBLIC_KEY is not an RSA public key in PEM: {exc}"
        ) from exc


def check_env_names(environ: Mapping[str, str]) -> None:
    """Refuse ``AGENTWORKS_*`` names in ``environ`` that are neither a setting nor one of
    :data:`OTHER_ENV_NAMES`, each named with the closest valid name.

    Settings ignore such names, so ``AGENTWORKS_DATABSE_URL`` would run on the embedded database
    without a word. Compared without case, as the settings read names.
    """
    settings = {f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields}
    known = settings | set(OTHER_ENV_NAMES)
    unknown = sorted(
        name
        for name, value in environ.items()
        if name.upper().startswith(ENV_PREFIX)
        and name.upper() not in known
        and not is_service_link(name, value)
    )
    if not unknown:
        return
    suffixes = {name.removeprefix(ENV_PREFIX): name for name in known}
    problems = []
    for name in unknown:
        close = difflib.get_close_matches(
            name.upper().removeprefix(ENV_PREFIX), list(suffixes), n=1
        )
        hint = f"did you mean {suffixes[close[0]]}?" if close else "no setting is named like it"
        problems.append(f"{name} ({hint})")
    raise ConfigurationError(
        f"unknown {ENV_PREFIX}* environment variable{'s' if len(unknown) > 1 else ''}: "
        f"{', '.join(problems)}; every {ENV_PREFIX}* variable must be a setting (README, "
        "Configuration)"
    )


#: The names Kubernetes gives every pod for each Service of its namespace (``enableServiceLinks``,
#: on by default), for a Service named ``agentworks`` or ``agentworks-<anything>``, each with the
#: shape of its value: ``<NAME>_SERVICE_HOST`` (the cluster IP), ``<NAME>_SERVICE_PORT[_<PORT
#: NAME>]`` and the Docker links' ``<NAME>_PORT[_<port>_<PROTO>]`` (``tcp://IP:port``) and
#: ``<NAME>_PORT_<port>_<PROTO>_PROTO|_PORT|_ADDR``.
_NAME = rf"{ENV_PREFIX}(?:[A-Z0-9_]+_)?"
_LINK = r"PORT_[0-9]+_(?:TCP|UDP|SCTP)"
_SERVICE_LINKS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(rf"{_NAME}SERVICE_HOST"), "ip"),
    (re.compile(rf"{_NAME}SERVICE_PORT(?:_[A-Z0-9_]+)?"), "port"),
    (re.compile(rf"{_NAME}PORT(?:_[0-9]+_(?:TCP|UDP|SCTP))?"), "url"),
    (re.compile(rf"{_NAME}{_LINK}_PROTO"), "proto"),
    (re.compile(rf"{_NAME}{_LINK}_PORT"), "port"),
    (re.compile(rf"{_NAME}{_LINK}_ADDR"), "ip"),
)
_LINK_URL = re.compile(r"(?:tcp|udp|sctp)://(?P<host>\[[0-9A-Fa-f:.]+\]|[0-9.]+):[0-9]{1,5}")


def is_service_link(name: str, value: str) -> bool:
    """Whether ``name`` is one Kubernetes sets for a Service (see :data:`_SERVICE_LINKS`) and
    ``value`` is shaped as Kubernetes writes it (a cluster IP, a port number, a protocol, a
    ``tcp://IP:port`` address): such names are nobody's typo of a setting, and refusing them
    would stop every process of a deployment that names its Service ``agentworks``."""
    return any(
        pattern.fullmatch(name.upper()) and _LINK_VALUES[shape](value)
        for pattern, shape in _SERVICE_LINKS
    )


def _link_url(value: str) -> bool:
    address = _LINK_URL.fullmatch(value)
    return address is not None and _is_ip(address["host"].strip("[]"))


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


_LINK_VALUES: Mapping[str, Callable[[str], bool]] = {
    "ip": _is_ip,
    "port": lambda value: value.isascii() and value.isdigit(),
    "proto": lambda value: value in ("tcp", "udp", "sctp"),
    "url": _link_url,
}


def _describe(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        field = ".".join(str(part) for part in error["loc"])
        message = str(error["msg"]).removeprefix("Value error, ")
        problems.append(f"{ENV_PREFIX}{field.upper()}: {message}" if field else message)
    return "invalid configuration: " + "; ".join(problems)
