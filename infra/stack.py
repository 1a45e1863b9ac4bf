"""Running the product: the API server, and the all-in-one ``agentworks dev`` stack.

``serve`` runs the API alone against the configured PostgreSQL (and Redis). ``dev`` runs
everything in one process: the embedded PostgreSQL unless a database is configured, migrations,
the API, and the fan-out — straight from the log in-process, or, with Kafka configured, the relay
and one faust worker per projector as in-process threads. Ctrl-C stops it all.

Both expose ``/metrics`` with the lag of their database (:class:`~adapters.metrics.LagCollector`)
and, when ``AGENTWORKS_OTLP_ENDPOINT`` is set, export traces (:func:`start_tracing`).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis
import redis.asyncio
import structlog
import uvicorn

from adapters.eventstore import EventStoreRecorder
from adapters.metrics import LagCollector
from adapters.postgres import PROJECTOR_ROLE, make_pool
from adapters.telemetry import configure_tracing
from infra.bootstrap import (
    ReadSide,
    build_read_side,
    build_relay,
    component_url,
    write_side_from,
)
from infra.identity import build_auth, build_oidc
from infra.migrate import ensure_database, migrate
from infra.settings import ConfigurationError, Settings, db_logins, deployed_relays, jwt_keys
from projections.rebuild import rebuild_stale
from projections.registry import projector_names
from read_api.broadcast import Broadcaster, LocalBroadcaster, RedisBroadcaster
from read_api.services import ApiServices, JwtVerification, RateLimits
from streams.embedded import EmbeddedFanout

if TYPE_CHECKING:
    import socket

    from fastapi import FastAPI

    from adapters.eventlog import EventLog
    from commands.handlers import AgentWorks
    from orchestrator.service import OrchestratorThread
    from projections.base import Change
    from streams.relay import Relay
    from streams.worker import PartitionHolding

log = structlog.get_logger(__name__)

EMBEDDED_DATABASE = "agentworks"


def embedded_database_url(data_dir: Path) -> str:
    """Start (or join) the embedded PostgreSQL kept under ``data_dir/postgres``."""
    from infra.embedded import open_embedded

    return open_embedded(data_dir).url


def database_url_for(settings: Settings, data_dir: Path) -> str:
    """The configured database, else the embedded one; created and migrated either way, with
    every component's login role set up."""
    url = settings.database_url or embedded_database_url(data_dir)
    ensure_database(url)
    migrate(url, app_role=settings.db_app_role, logins=db_logins(settings, data_dir=data_dir))
    return url


def make_broadcaster(settings: Settings) -> Broadcaster:
    if settings.redis_url:
        return RedisBroadcaster.from_url(settings.redis_url)
    return LocalBroadcaster()


def _write_reachable(write: AgentWorks) -> Callable[[float], None] | None:
    """How ``/readyz`` checks the write side reaches its database (its own pool and login)."""
    recorder = write.recorder
    return recorder.reachable if isinstance(recorder, EventStoreRecorder) else None


def api_services(
    settings: Settings,
    database_url: str,
    *,
    write: AgentWorks,
    broadcaster: Broadcaster,
    data_dir: Path | None = None,
) -> ApiServices:
    keys = jwt_keys(settings, data_dir=data_dir)
    auth = build_auth(settings, write, keys, data_dir)
    hint = _signature_hint(settings, data_dir)
    api_url = component_url(settings, database_url, "api", data_dir=data_dir)
    verification = (
        JwtVerification(public_key=keys.public_key, signature_hint=hint)
        if keys.algorithm == "RS256"
        else JwtVerification(secret=keys.secret, signature_hint=hint)
    )
    pool = make_pool(
        api_url, max_size=settings.api_pool_size, name="api", timeout=settings.pool_timeout
    )
    from infra.orchestration import build_spend_reader

    # startAgentRun refuses a run over the month's limit from what spend checks read.
    write.spend = build_spend_reader(settings, pool)
    return ApiServices(
        write=write,
        pool=pool,
        jwt=verification,
        broadcaster=broadcaster,
        # Short timeouts: a request that asks a Redis that does not answer waits this long.
        redis=(
            redis.asyncio.Redis.from_url(
                settings.redis_url, socket_timeout=1.0, socket_connect_timeout=1.0
            )
            if settings.redis_url
            else None
        ),
        consistency_wait_ms=settings.consistency_wait_ms,
        rate_limits=RateLimits(
            per_user_per_minute=settings.rate_limit_per_user or None,
            per_workspace_per_minute=settings.rate_limit_per_workspace or None,
            per_address_per_minute=settings.rate_limit_per_address or None,
            cost_per_user_per_minute=settings.query_cost_per_user or None,
            cost_per_workspace_per_minute=settings.query_cost_per_workspace or None,
        ),
        cors_origins=tuple(o.strip() for o in settings.cors_origins.split(",") if o.strip()),
        trusted_proxies=tuple(p.strip() for p in settings.trusted_proxies.split(",") if p.strip()),
        cors_origin_regex=(
            DEV_CORS_ORIGIN_REGEX
            if settings.env == "dev" and not settings.cors_origins.strip()
            else None
        ),
        graphiql=settings.env == "dev",
        max_body_bytes=settings.max_body_bytes,
        request_head_timeout_seconds=settings.request_head_timeout_seconds,
        request_body_timeout_seconds=settings.request_body_timeout_seconds,
        send_timeout_seconds=settings.send_timeout_seconds,
        max_connections_per_address=settings.max_connections_per_address or None,
        metrics_token=settings.metrics_token.get_secret_value() if settings.metrics_token else None,
        max_projector_lag=settings.max_projector_lag,
        projector_stall_seconds=settings.projector_stall_seconds or None,
        lag_collector=LagCollector(
            api_url, projectors=projector_names(), relays=deployed_relays(settings)
        ),
        write_reachable=_write_reachable(write),
        max_subscriptions_per_connection=settings.max_subscriptions_per_connection,
        max_subscriptions_per_user=settings.max_subscriptions_per_user,
        max_unsigned_websockets_per_address=settings.max_unsigned_websockets_per_address,
        stripe_webhook_secret=(
            settings.stripe_webhook_secret.get_secret_value()
            if settings.stripe_webhook_secret
            else None
        ),
        auth=auth,
        oidc=build_oidc(settings, auth.identity),
    )


#: CORS origins a dev server allows unless ``AGENTWORKS_CORS_ORIGINS`` is set: a SPA's dev server.
DEV_CORS_ORIGIN_REGEX = r"http://(localhost|127\.0\.0\.1)(:\d+)?"


def _signature_hint(settings: Settings, data_dir: Path | None) -> str | None:
    """What a 401 for a foreign signature adds outside production: which key signs here."""
    if settings.env == "prod":
        return None
    if settings.jwt_secret is None and settings.algorithm == "HS256":
        where = (data_dir or settings.data_dir).resolve()
        return (
            f"this server uses the dev secret of data dir {where}; a token made for another "
            f"data dir is refused here, get one with `agentworks token --data-dir {where} ...`"
        )
    return (
        "this server verifies with the configured AGENTWORKS_JWT_* key; the token was signed "
        "with another one"
    )


@dataclass
class DevStack:
    """Everything ``agentworks dev`` runs besides the HTTP server itself."""

    settings: Settings
    database_url: str
    """The database, as the URL of the user that migrated it; components log in as their own
    roles (``infra.bootstrap.component_url``)."""
    write: AgentWorks
    read_side: ReadSide
    services: ApiServices
    fanout: EmbeddedFanout | None = None
    relay: Relay | None = None
    relay_log: EventLog | None = None
    data_dir: Path | None = None
    threads: list[threading.Thread] = field(default_factory=list)
    _worker_loops: list[tuple[asyncio.AbstractEventLoop, Any]] = field(default_factory=list)
    _holdings: dict[str, PartitionHolding] = field(default_factory=dict)
    orchestrator: OrchestratorThread | None = None
    orchestrator_write: AgentWorks | None = None

    @property
    def mode(self) -> str:
        return "kafka" if self.relay is not None else "embedded"

    def start(self) -> None:
        if self.settings.kafka_bootstrap:
            self._start_kafka_path(self.settings.kafka_bootstrap)
        else:
            self.fanout = EmbeddedFanout(
                self.read_side.event_log,
                self.read_side.runners,
                listen_url=component_url(
                    self.settings, self.database_url, "projector", data_dir=self.data_dir
                ),
                poll_interval=0.2,
            )
            self.fanout.start()
        if self.settings.orchestrator_in_dev:
            self._start_orchestrator()

    def _start_orchestrator(self) -> None:
        """Agent runs executed in-process, through a write side of the orchestrator's own."""
        from infra.orchestration import build_orchestrator
        from orchestrator.service import OrchestratorThread

        # The orchestrator writes events: it logs in as the writer (no role of its own yet).
        self.orchestrator_write = write_side_from(
            self.settings, self.database_url, data_dir=self.data_dir
        )
        self.orchestrator_write.write_each_command_alone()
        self.orchestrator = OrchestratorThread(
            build_orchestrator(
                self.settings,
                self.orchestrator_write,
                self.orchestrator_write.event_log(),
                self.services.pool,
                listen_url=component_url(
                    self.settings, self.database_url, "writer", data_dir=self.data_dir
                ),
            )
        )
        self.orchestrator.start()

    def _start_kafka_path(self, bootstrap: str) -> None:
        from streams.worker import build_worker_app

        self.relay, self.relay_log = build_relay(
            self.settings, self.database_url, data_dir=self.data_dir
        )
        relay_thread = threading.Thread(target=self.relay.run_forever, name="relay", daemon=True)
        relay_thread.start()
        self.threads.append(relay_thread)
        for runner in self.read_side.runners:
            app = build_worker_app(
                runner,
                bootstrap,
                topic_prefix=self.settings.topic_prefix,
                sweep_interval=self.settings.sweep_interval,
                fetch_wait_ms=self.settings.worker_fetch_wait_ms,
            )
            loop = asyncio.new_event_loop()
            thread = threading.Thread(
                target=_run_faust, args=(loop, app), name=f"worker-{runner.name}", daemon=True
            )
            thread.start()
            self.threads.append(thread)
            self._worker_loops.append((loop, app))
            self._holdings[runner.name] = app.holding

    def readiness(self) -> dict[str, str]:
        """What of the in-process fan-out could not deliver an event now: component -> ``"ok"``
        or why not. Through Kafka: the relay holds its lease and every projector's worker
        consumes all of its partitions; the embedded fan-out reads the log and is always ready."""
        if self.relay is None:
            return {}
        checks = {"relay": "ok" if self.relay.leading else "waiting for the relay lease"}
        for name, holding in self._holdings.items():
            checks[f"worker {name}"] = holding.status
        return checks

    def ready(self) -> bool:
        return all(status == "ok" for status in self.readiness().values())

    def wait_until_ready(self, *, report_every: float = 10.0) -> None:
        """Block until :meth:`ready`, logging what is still missing now and then."""
        reported = time.monotonic()
        while not self.ready():
            if time.monotonic() - reported >= report_every:
                log.info("dev.waiting_for_fanout", checks=self.readiness())
                reported = time.monotonic()
            time.sleep(0.05)

    def stop(self) -> None:
        if self.orchestrator is not None:
            self.orchestrator.stop()
        if self.orchestrator_write is not None:
            self.orchestrator_write.close()
        if self.fanout is not None:
            self.fanout.stop()
        if self.relay is not None:
            self.relay.stop()
        for loop, app in self._worker_loops:
            with contextlib.suppress(RuntimeError):
                asyncio.run_coroutine_threadsafe(app.stop(), loop).result(timeout=15)
            loop.call_soon_threadsafe(loop.stop)
        for thread in self.threads:
            thread.join(timeout=15)
        self.services.pool.close()
        self.read_side.close()
        if self.relay_log is not None:
            self.relay_log.close()
        self.write.close()


def _run_faust(loop: asyncio.AbstractEventLoop, app: Any) -> None:
    asyncio.set_event_loop(loop)
    loop.run_until_complete(app.start())
    loop.run_forever()


def build_dev_stack(settings: Settings, data_dir: Path) -> DevStack:
    url = database_url_for(settings, data_dir)
    broadcaster = make_broadcaster(settings)
    change_publisher = _change_publisher(settings, broadcaster)
    write = write_side_from(settings, url, data_dir=data_dir)
    read_side = build_read_side(settings, url, on_commit=change_publisher, data_dir=data_dir)
    rebuild_stale_read_models(read_side)
    services = api_services(settings, url, write=write, broadcaster=broadcaster, data_dir=data_dir)
    stack = DevStack(settings, url, write, read_side, services, data_dir=data_dir)
    services.fanout_readiness = stack.readiness
    return stack


def rebuild_stale_read_models(read_side: ReadSide) -> None:
    """Rebuild, before serving, the read models an older revision of their projector built
    (what ``agentworks migrate`` does at a deployment's upgrade; see
    :mod:`projections.revisions`)."""
    stale, revisions = read_side.revisions()
    for line in revisions.describe_newer():
        log.warning(line)
    for line in revisions.describe_stale():
        log.info(line)
    for result in rebuild_stale(stale, read_side.pool, read_side.event_log):
        log.info(
            "read model rebuilt", projector=result.projector, events=result.events,
            position=result.position,
        )  # fmt: skip


def _change_publisher(
    settings: Settings, broadcaster: Broadcaster
) -> Callable[[list[Change]], None]:
    """Projectors publish through Redis when it is configured, so every API instance hears."""
    if settings.redis_url:
        from read_api.broadcast import RedisChangePublisher

        return RedisChangePublisher.from_url(settings.redis_url).publish_changes
    return broadcaster.publish_changes


def start_tracing(settings: Settings, service_name: str) -> Any:
    """Export this process's spans to ``AGENTWORKS_OTLP_ENDPOINT``; nothing when it is unset.

    Call once, at start: OpenTelemetry's tracer provider can only be installed once per process.
    Returns the SDK tracer provider (it flushes at exit), or ``None``.
    """
    if not settings.otlp_endpoint:
        return None
    try:
        return configure_tracing(service_name=service_name, otlp_endpoint=settings.otlp_endpoint)
    except ImportError as error:
        raise ConfigurationError(
            "AGENTWORKS_OTLP_ENDPOINT is set but the OpenTelemetry SDK is not installed; "
            "install the 'otel' extra (pip install 'agentworks[otel]')"
        ) from error


#: How long a stopping server waits for requests in flight before it cancels them.
GRACEFUL_SHUTDOWN_SECONDS = 5


def serve_app(
    app: FastAPI,
    *,
    host: str,
    port: int,
    graceful_seconds: int = GRACEFUL_SHUTDOWN_SECONDS,
    sock: socket.socket | None = None,
) -> None:
    """Serve ``app`` until SIGINT, SIGTERM or SIGHUP, then stop cleanly and return.

    uvicorn's own logging setup is skipped: its lines go through ours (JSON, with trace ids).
    ``sock``, when given, is the listening socket already bound (so that a busy port was refused
    before anything started).
    """
    from read_api.serving import uvicorn_options

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=None,
        log_level="warning",
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=graceful_seconds,
        # Its protocols bound what one client can make the server hold (read_api.serving); the
        # app decides whose X-Forwarded-For to believe (AGENTWORKS_TRUSTED_PROXIES).
        **uvicorn_options(app),
    )
    tune_garbage_collection()
    server = _Server(config)
    quiet = _CancelledAtShutdown(server)
    uvicorn_logger = logging.getLogger("uvicorn.error")
    uvicorn_logger.addFilter(quiet)
    try:
        server.run(sockets=None if sock is None else [sock])
    finally:
        uvicorn_logger.removeFilter(quiet)


GC_THRESHOLDS = (20_000, 20, 20)


def tune_garbage_collection() -> None:
    """Keep the cyclic collector from eating a busy API's CPU.

    A board query allocates tens of thousands of short-lived objects; at CPython's default
    thresholds (700, 10, 10) fifty interleaved requests set off collections that traverse every
    request in flight and the whole long-lived heap (modules, the schema, pools), again and
    again. Freezing what exists at start-up takes that heap out of every collection, and a larger
    first threshold lets most request garbage die by reference counting before a collection
    looks at it. Measured in-process at 25 concurrent board queries: 24-28 ms of CPU per request
    before, 15-18 ms after; nothing changes for one request at a time.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


class _Server(uvicorn.Server):
    """uvicorn's server, made to stop on SIGINT/SIGTERM without tracebacks or leftovers.

    uvicorn handles the signal, shuts down, and then raises the same signal again. A re-raised
    SIGTERM killed ``agentworks dev`` before it stopped its stack and the embedded PostgreSQL.
    Re-raised SIGINTs land in ``asyncio.run``'s own handler, which cancels the main task and, at
    the second one, raises ``KeyboardInterrupt``; ``asyncio.run`` then cancels every task still
    pending — the app's lifespan, which uvicorn skips on a forced exit, and hanging requests
    (without a graceful-shutdown timeout a single hanging request kept Ctrl-C waiting until a
    second one forced it) — and each printed a ``CancelledError`` traceback.

    Here a signal only asks the server to stop, and the caller goes on to clean up and return;
    on a forced exit the lifespan shutdown runs anyway (ours only closes clients).
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {
            sig: signal.signal(sig, self.handle_exit)
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        }
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await super().shutdown(sockets=sockets)
        if self.force_exit:
            await self.lifespan.shutdown()


class _CancelledAtShutdown(logging.Filter):
    """Turns uvicorn's traceback for a request cancelled at shutdown into one warning line.

    Requests still running when the graceful-shutdown timeout ends (or at a second Ctrl-C) are
    cancelled; that is the shutdown working, not a bug in the request.
    """

    def __init__(self, server: uvicorn.Server) -> None:
        super().__init__()
        self.server = server

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if self.server.should_exit and isinstance(error, asyncio.CancelledError):
            record.msg, record.args = "a request still running at shutdown was cancelled", ()
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def api_process(settings: Settings) -> tuple[FastAPI, AgentWorks]:
    """The API alone (``agentworks serve``) on the configured database."""
    from read_api.app import create_app

    if settings.database_url is None:
        raise ValueError("AGENTWORKS_DATABASE_URL is not set; `agentworks serve` needs it")
    write = write_side_from(settings, settings.database_url)
    services = api_services(
        settings,
        settings.database_url,
        write=write,
        broadcaster=make_broadcaster(settings),
        data_dir=settings.data_dir,
    )
    return create_app(services), write


__all__ = [
    "PROJECTOR_ROLE",
    "DevStack",
    "api_process",
    "build_dev_stack",
    "database_url_for",
    "serve_app",
    "start_tracing",
]
