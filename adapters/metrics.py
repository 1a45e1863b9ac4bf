"""Prometheus metrics: what commands cost, what was appended, how far behind fan-out is.

The counters and histograms are process-wide (the default registry): every component of a
process records into them. :class:`LagCollector` reads positions from Postgres at scrape time,
so it belongs to one deployment's database; :class:`Exposition` renders both for ``/metrics``.
"""

from __future__ import annotations

import hmac
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, NamedTuple

import psycopg
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from adapters.postgres import connect
from adapters.telemetry import continue_trace, current_traceparent

if TYPE_CHECKING:
    import socket

    from prometheus_client.core import Metric

COMMAND_SECONDS = Histogram(
    "agentworks_command_seconds",
    "Time to handle a command, by command type and outcome (ok or the error code).",
    ["command", "outcome"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
EVENTS_APPENDED = Counter(
    "agentworks_events_appended_total", "Events appended to the event store by this process."
)
COMMIT_GROUP_SIZE = Histogram(
    "agentworks_commit_group_appends",
    "Appends (commands) written together in one transaction by the event store's group commit.",
    buckets=(1, 2, 4, 8, 16, 32),
)
HTTP_RESPONSES = Counter(
    "agentworks_http_responses_total", "HTTP responses by status code.", ["status"]
)
SWEEP_HEALED = Counter(
    "agentworks_sweep_healed_events_total",
    "Events a projector's sweep found unapplied behind its watermark and applied from the store "
    "(deliveries that never arrived).",
    ["projector"],
)
BROKER_LOG_LOST = Counter(
    "agentworks_relay_broker_log_lost_total",
    "Times the relay found the broker had lost acknowledged records (offsets going back, a "
    "re-created topic, a producer it no longer knew) and republished from the projectors' "
    "lowest sweep watermark.",
)

OMITTED_EVENTS_MISSING = Counter(
    "agentworks_worker_omitted_events_missing_total",
    "Events a worker was delivered without their payload (too large for a message) and could "
    "not read from the store, which does not hold them (topics that outlived a database restored "
    "to an earlier point): their aggregates are parked.",
    ["projector"],
)

SPEND_COUNTER_FAILURES = Counter(
    "agentworks_spend_counter_failures_total",
    "Times the Redis spend counter could not be reached: ``feed`` (the billing projector kept "
    "the totals to write next time and went on), ``read`` (a spend check read the billing read "
    "model instead).",
    ["operation"],
)
API_KEY_USES_UNRECORDED = Counter(
    "agentworks_api_key_uses_unrecorded_total",
    "API key uses the API meant to record as a key's lastUsedAt and could not: ``failed`` (the "
    "database refused or was unreachable), ``dropped`` (the writer was too far behind to queue "
    "one more). The requests themselves were served.",
    ["reason"],
)


LLM_CALLS = Counter(
    "agentworks_llm_calls_total",
    "Provider calls made by agent runs, by provider, model and outcome: ``ok``; ``budget`` (cut "
    "at the run's or the month's budget); ``cut`` (its run cancelled, timed out or taken over, "
    "or its worker stopping); ``rate_limited`` (429); ``unavailable`` (the provider failing or "
    "unreachable: retried or fallen back from); ``refused`` (a request the provider judged bad, "
    "or its key); ``broken`` (a stream that could not be read, or ran past its cap).",
    ["provider", "model", "outcome"],
)
LLM_CALL_SECONDS = Histogram(
    "agentworks_llm_call_seconds",
    "Time from a provider call being sent to its end, for calls the provider answered (not those "
    "cut short by their run), by provider.",
    ["provider"],
    buckets=(0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0),
)
LLM_FIRST_TOKEN_SECONDS = Histogram(
    "agentworks_llm_first_token_seconds",
    "Time from a provider call being sent to its first piece of answer text, by provider.",
    ["provider"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
LLM_TOKENS = Counter(
    "agentworks_llm_tokens_total",
    "Tokens of provider calls as charged (the provider's counts, ours where it gave none), by "
    "provider and direction (``input``, ``output``).",
    ["provider", "direction"],
)
LLM_BILLED = Counter(
    "agentworks_llm_billed_micro_usd_total",
    "Micro-USD billed for provider calls charged by this process, markup included, by provider: "
    "for spend-rate alerts. The bill itself is the event log's charges, never this.",
    ["provider"],
)
PROVIDER_CIRCUITS_OPENED = Counter(
    "agentworks_provider_circuit_opened_total",
    "Times a provider's circuit opened: ``provider`` (closed to every workspace) or "
    "``workspace`` (to the workspace whose calls failed).",
    ["provider", "scope"],
)
AGENT_RUNS_IN_FLIGHT = Gauge(
    "agentworks_agent_runs_in_flight", "Agent runs this process's orchestrators are executing."
)
AGENT_RUNS_FINISHED = Counter(
    "agentworks_agent_runs_finished_total",
    "Agent runs this process's orchestrators finished, by outcome (``SUCCEEDED``, ``FAILED``, "
    "``TIMED_OUT``).",
    ["outcome"],
)
AGENT_RUN_SECONDS = Histogram(
    "agentworks_agent_run_seconds",
    "Time an orchestrator spent executing a run it finished, from its claim (or takeover) to "
    "its finish, by outcome.",
    ["outcome"],
    buckets=(1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0),
)

_WORK_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Seconds for a request's or a batch's work: milliseconds, up to the ten seconds past which
something is wrong."""
GRAPHQL_SECONDS = Histogram(
    "agentworks_graphql_seconds",
    "Time to run a GraphQL query or mutation the API executed (parse, validation, execution; "
    "not answers from the response cache), by operation type, root field (the first one the "
    "operation selects, ``unknown`` for a name the schema lacks) and outcome (``ok`` or the "
    "first error's code).",
    ["operation", "field", "outcome"],
    buckets=_WORK_BUCKETS,
)

PROJECTOR_BATCH_SECONDS = Histogram(
    "agentworks_projector_batch_seconds",
    "Time a projector took to apply one batch of deliveries (its retries and fallback "
    "included; rebuilds not counted), by projector.",
    ["projector"],
    buckets=_WORK_BUCKETS,
)
PROJECTOR_EVENTS_APPLIED = Counter(
    "agentworks_projector_events_applied_total",
    "Events projectors applied (delivered, or healed from the store), by projector.",
    ["projector"],
)
PROJECTOR_BATCH_RETRIES = Counter(
    "agentworks_projector_batch_retries_total",
    "Times a projector's batch was rolled back and tried again, by projector and reason: "
    "``race`` (another worker applied an overlapping delivery first) or ``one_by_one`` (the "
    "batch failed as a whole, and its events were applied one at a time to find the one at "
    "fault).",
    ["projector", "reason"],
)


@contextmanager
def observe_command(command_type: str, traceparent: str) -> Iterator[str]:
    """Time and trace one command; yields the ``traceparent`` its events should carry."""
    started = time.perf_counter()
    outcome = "ok"
    with continue_trace(f"command {command_type}", traceparent or None) as span:
        span.set_attribute("agentworks.command", command_type)
        try:
            yield current_traceparent()
        except Exception as error:
            outcome = str(getattr(error, "code", type(error).__name__))
            span.set_attribute("agentworks.error_code", outcome)
            raise
        finally:
            COMMAND_SECONDS.labels(command_type, outcome).observe(time.perf_counter() - started)


class ProjectorStanding(NamedTuple):
    name: str
    position: int
    swept_through: int
    healed: int


@dataclass(frozen=True, slots=True)
class Standing:
    """Where the log head, each relay and each projector stand, by name: what the lag metrics
    export and ``agentworks status`` shows. Temporary projectors (a rebuild's ``name#…``) are
    not listed."""

    head: int
    relays: list[tuple[str, int]]
    projectors: list[ProjectorStanding]
    parked: dict[str, int]
    """Parked aggregates per projector, for those that have any."""


def read_standing(
    conn: psycopg.Connection[Any],
    *,
    expected: Sequence[str] = (),
    relays: Sequence[str] = (),
) -> Standing:
    """Where everything stands. The ``expected`` projectors and ``relays`` (those the deployment
    keeps) are each listed, at position 0 while they have no row of positions yet (they never
    ran, as ``/readyz`` counts them): only the rows found would leave a projector whose worker
    never started, or a relay never run, out of the status and the lag metrics altogether, as
    if nothing were wrong."""
    # A function: the API's role, under row-level security, sees no event itself.
    row = conn.execute("SELECT agentworks_log_head()").fetchone()
    relay_rows = conn.execute("SELECT relay, position FROM relay_positions")
    projectors = conn.execute(
        "SELECT projector, position, swept_through, healed FROM projection_positions "
        "WHERE projector NOT LIKE '%#%' ORDER BY projector"
    )
    parked = conn.execute(
        "SELECT projector, count(*) FROM projection_parked "
        "WHERE projector NOT LIKE '%#%' GROUP BY projector"
    )
    found = {n: ProjectorStanding(n, int(p), int(s), int(h)) for n, p, s, h in projectors}
    for name in expected:
        found.setdefault(name, ProjectorStanding(name, 0, 0, 0))
    relayed = dict.fromkeys(relays, 0) | {name: int(position) for name, position in relay_rows}
    return Standing(
        head=int(row[0]) if row else 0,
        relays=sorted(relayed.items()),
        projectors=sorted(found.values()),
        parked={name: int(count) for name, count in parked},
    )


class LagCollector(Collector):
    """Log head, relay and projector positions and lags, read from Postgres at scrape time."""

    def __init__(
        self, database_url: str, *, projectors: Sequence[str] = (), relays: Sequence[str] = ()
    ) -> None:
        self.database_url = database_url
        self.projectors = tuple(projectors)
        """The projectors the deployment keeps: each is reported (see :func:`read_standing`)."""
        self.relays = tuple(relays)
        """The relays it keeps (one, through Kafka; none embedded), reported likewise."""

    def collect(self) -> Iterator[Metric]:
        head = GaugeMetricFamily(
            "agentworks_log_head_position", "Highest global position in the event log."
        )
        relay = GaugeMetricFamily(
            "agentworks_relay_lag_events",
            "Events appended but not yet published.",
            labels=["relay"],
        )
        projector = GaugeMetricFamily(
            "agentworks_projector_lag_events",
            "Events appended but not yet applied, per projector.",
            labels=["projector"],
        )
        unswept = GaugeMetricFamily(
            "agentworks_projector_unswept_events",
            "Events above a projector's sweep watermark: not yet checked for deliveries that "
            "never arrived (grows without bound when its worker does not sweep).",
            labels=["projector"],
        )
        parked = GaugeMetricFamily(
            "agentworks_projector_parked_aggregates",
            "Aggregates a projector could not apply an event of: their events wait until "
            "`agentworks parked retry` (see `agentworks parked list`).",
            labels=["projector"],
        )
        healed = CounterMetricFamily(
            "agentworks_projector_healed_events",
            "Events a projector applied from the store instead of from a delivery (gaps filled "
            "and sweeps), since its last rebuild: zero while no delivery is lost.",
            labels=["projector"],
        )
        read_up = GaugeMetricFamily(
            "agentworks_lag_read_up",
            "1 when this scrape read the positions below from the database, 0 when it could "
            "not (the lag series are then absent: alert on this, not on their absence).",
        )
        try:
            with connect(self.database_url) as conn:
                standing = read_standing(conn, expected=self.projectors, relays=self.relays)
        except psycopg.Error:
            read_up.add_metric([], 0)
            yield read_up
            return
        read_up.add_metric([], 1)
        yield read_up
        top = standing.head
        head.add_metric([], top)
        for name, position in standing.relays:
            relay.add_metric([name], top - position)
        for name, position, swept, from_store in standing.projectors:
            projector.add_metric([name], top - position)
            unswept.add_metric([name], top - swept)
            healed.add_metric([name], from_store)
        parked_counts = standing.parked
        for name in sorted({name for name, *_ in standing.projectors} | set(parked_counts)):
            parked.add_metric([name], parked_counts.get(name, 0))
        yield head
        yield relay
        yield projector
        yield unswept
        yield parked
        yield healed


class Exposition:
    """The Prometheus text exposition a ``/metrics`` endpoint answers with.

    It holds the process-wide metrics (``registry``, the default one) and the ``collectors`` of
    one deployment, such as its :class:`LagCollector`, in a registry of its own: an app (or
    several, in tests) can add its database's lag without registering anything globally.
    Rendering runs the collectors, which may query the database: call it off the event loop.
    """

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, *collectors: Collector, registry: CollectorRegistry = REGISTRY) -> None:
        self._process = registry
        self._deployment = CollectorRegistry(auto_describe=False)
        for collector in collectors:
            self._deployment.register(collector)

    def render(self) -> bytes:
        return generate_latest(self._process) + generate_latest(self._deployment)


class MetricsServer:
    """``GET /metrics`` of a process that serves no API (``relay``, ``worker``,
    ``orchestrator``): what only that process records (its outages as
    ``agentworks_dependency_up``, the relay's broker losses, a worker's sweeps, the
    orchestrator's commands) is on no other process's ``/metrics``.

    Served from a thread of its own on ``listener`` (bound by the caller, so that a busy port
    is refused before anything starts), behind ``token`` when the deployment set one, as the
    API's route is. Requests are not logged: an access line per scrape would be noise, and
    not a JSON line.
    """

    def __init__(
        self, listener: socket.socket, *, token: str | None, exposition: Exposition | None = None
    ) -> None:
        self._server = _MetricsHTTPServer(
            listener,
            exposition=exposition or Exposition(),
            expected=None if token is None else f"Bearer {token}".encode(),
        )
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="metrics", daemon=True
        )
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


class _MetricsHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self, listener: socket.socket, *, exposition: Exposition, expected: bytes | None
    ) -> None:
        super().__init__(listener.getsockname()[:2], _MetricsHandler, bind_and_activate=False)
        self.socket.close()
        self.socket = listener
        self.server_address = listener.getsockname()
        self.exposition = exposition
        self.expected = expected
        self.rendering = threading.Lock()
        """One render at a time, as the API's route: each may query the database."""


class _MetricsHandler(BaseHTTPRequestHandler):
    server: _MetricsHTTPServer

    def do_GET(self) -> None:
        if self.path.partition("?")[0] != "/metrics":
            self._answer(404, b"not found\n", "text/plain")
            return
        given = self.headers.get("Authorization", "").encode("latin-1", "replace")
        expected = self.server.expected
        if expected is not None and not hmac.compare_digest(given, expected):
            self._answer(
                401,
                b"metrics need the deployment's metrics token\n",
                "text/plain",
                {"WWW-Authenticate": 'Bearer realm="metrics"'},
            )
            return
        with self.server.rendering:
            body = self.server.exposition.render()
        self._answer(200, body, self.server.exposition.content_type)

    def _answer(
        self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """No access line per scrape (see :class:`MetricsServer`)."""
