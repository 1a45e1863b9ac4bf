"""Observability as an operator sees it: ``/metrics``, one trace per write, logs tied to both.

* ``GET /metrics`` of a running API answers Prometheus text with command latency, events
  appended, log head, relay and per-projector lag, and HTTP responses by status.
* A GraphQL mutation, the command it sends, the events it stores and the projector that applies
  them share one trace (embedded fan-out path), continuing the caller's ``traceparent``.
* A log line written during a request carries its ``request_id``/``correlation_id`` and the
  ``trace_id``/``span_id`` of the request's span.

Spans are recorded with an SDK tracer provider and an in-memory exporter, installed for this
module only (the ``spans`` fixture of ``tests/telemetry_fixtures.py``).
"""

from __future__ import annotations

import io
import json
import time
from uuid import UUID

import httpx
import pg
from e2e_stack import MakeStack, Stack
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from prometheus_client.parser import text_string_to_metric_families

from adapters.eventlog import EventLog
from adapters.metrics import LagCollector
from projections.registry import projector_names
from streams.relay import RelayPositions

CREATE_CARD = (
    "mutation CreateTracedCard($input: CreateCardInput!) { createCard(input: $input) {"
    " consistencyToken card { id } } }"
)
INCOMING_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
INCOMING = f"00-{INCOMING_TRACE}-00f067aa0ba902b7-01"


# -- tracing for this module ---------------------------------------------------------------------


def trace_id(span: ReadableSpan) -> str:
    assert span.context is not None
    return format(span.context.trace_id, "032x")


def span_id(span: ReadableSpan) -> str:
    assert span.context is not None
    return format(span.context.span_id, "016x")


def ancestors(span: ReadableSpan, finished: list[ReadableSpan]) -> list[ReadableSpan]:
    """``span``'s parent, grandparent… among ``finished``, nearest first."""
    by_id = {s.context.span_id: s for s in finished if s.context is not None}
    chain = []
    parent = span.parent
    while parent is not None and parent.span_id in by_id:
        chain.append(by_id[parent.span_id])
        parent = chain[-1].parent
    return chain


def wait_for_span(
    exporter: InMemorySpanExporter, name: str, trace: str, timeout: float = 5.0
) -> ReadableSpan | None:
    deadline = time.monotonic() + timeout
    while True:
        for span in exporter.get_finished_spans():
            if span.name == name and trace_id(span) == trace:
                return span
        if time.monotonic() > deadline:
            return None
        time.sleep(0.05)


def traced_card(stack: Stack) -> tuple[str, UUID]:
    """Create a card with an incoming ``traceparent``; the request id and the card's id."""
    alice, ws = stack.owner_with_workspace()
    pid = alice.create_project(ws, "Traced", [{"name": "Todo"}])["project"]["id"]
    answer = alice.post(
        CREATE_CARD,
        {"input": {"projectId": pid, "title": "follow me"}},
        headers={"traceparent": INCOMING, "X-Request-Id": "trace-me-1"},
        operation_name="CreateTracedCard",
    )
    assert answer.status == 200, answer.body
    assert not answer.errors, answer.errors
    return answer.headers["X-Request-Id"], UUID(answer.data["createCard"]["card"]["id"])


# -- traces --------------------------------------------------------------------------------------


def test_mutation_command_and_stored_events_share_the_callers_trace(
    stack: Stack, exporter: InMemorySpanExporter
) -> None:
    _, card_id = traced_card(stack)
    finished = list(exporter.get_finished_spans())

    (command,) = [s for s in finished if s.name == "command CreateCard"]
    assert trace_id(command) == INCOMING_TRACE
    lineage = ancestors(command, finished)
    graphql = lineage[0]
    assert graphql.name == "graphql CreateTracedCard"
    assert graphql.attributes is not None
    assert graphql.attributes["graphql.operation.name"] == "CreateTracedCard"
    assert graphql.attributes["http.response.status_code"] == 200
    # Exactly one server span, at the top of the request: ours, or FastAPI's own when the
    # framework traces requests itself; it continues the caller's span.
    servers = [s for s in [command, *lineage] if s.kind is SpanKind.SERVER]
    assert len(servers) == 1
    assert servers[0] is lineage[-1]
    assert servers[0].parent is not None
    assert format(servers[0].parent.span_id, "016x") == INCOMING.split("-")[2]

    log = EventLog(stack.write.recorder, stack.write.mapper)  # type: ignore[arg-type]
    (created,) = log.between(card_id, after_version=0, before_version=2)
    # The stored event names the command's span as its parent: the relay and the projectors
    # continue from there.
    assert created.metadata["traceparent"].split("-")[1:3] == [INCOMING_TRACE, span_id(command)]
    assert created.metadata["correlation_id"] == "trace-me-1"


def test_a_request_without_traceparent_starts_its_own_trace(
    stack: Stack, exporter: InMemorySpanExporter
) -> None:
    stack.owner_with_workspace("uma", "Fresh")
    finished = list(exporter.get_finished_spans())
    (command,) = [s for s in finished if s.name == "command CreateWorkspace"]
    top = ancestors(command, finished)[-1]
    assert top.kind is SpanKind.SERVER
    assert top.parent is None
    assert trace_id(top) == trace_id(command) != INCOMING_TRACE


def test_the_projector_span_joins_the_mutations_trace(
    stack: Stack, exporter: InMemorySpanExporter
) -> None:
    traced_card(stack)
    command = wait_for_span(exporter, "command CreateCard", INCOMING_TRACE)
    assert command is not None
    projected = wait_for_span(exporter, "project kanban", INCOMING_TRACE)
    assert projected is not None, sorted({s.name for s in exporter.get_finished_spans()})
    assert command in ancestors(projected, list(exporter.get_finished_spans()))


# -- logs ----------------------------------------------------------------------------------------


def test_a_log_line_written_during_a_request_carries_request_and_trace_ids(
    stack: Stack, log_lines: io.StringIO
) -> None:
    alice, ws = stack.owner_with_workspace("lou", "Logged")
    answer = alice.post(
        "query Who($id: ID!) { workspace(id: $id) { id } }",
        {"id": ws},
        headers={"traceparent": INCOMING, "X-Request-Id": "logged-1"},
        operation_name="Who",
    )
    assert answer.status == 200
    records = [json.loads(line) for line in log_lines.getvalue().splitlines()]
    (line,) = [r for r in records if r.get("request_id") == "logged-1"]
    assert line["event"] == "graphql.request"
    assert line["operation"] == "Who"
    assert line["status"] == 200
    assert line["correlation_id"] == "logged-1"
    assert line["trace_id"] == INCOMING_TRACE
    assert len(line["span_id"]) == 16
    assert line["level"] == "debug"
    assert "timestamp" in line


# -- metrics -------------------------------------------------------------------------------------


def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    response = httpx.get(f"{url}/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_metrics_expose_commands_appends_lag_and_http_statuses(
    make_stack: MakeStack, database_url: str
) -> None:
    stack = make_stack(lag_collector=LagCollector(database_url))
    before = scrape(stack.url)

    alice, ws = stack.owner_with_workspace("mia", "Measured")
    pid = alice.create_project(ws, "M", [{"name": "Todo"}, {"name": "Done"}])["project"]["id"]
    for title in ("one", "two", "three"):
        alice.create_card(pid, title)
    refused = stack.client("not-a-token").post("{ __typename }")
    assert refused.status == 401
    head = pg.log_head(database_url)
    relay = RelayPositions(database_url, role=None, relay="e2e-relay")
    try:
        relay.save(head - 2)  # as if a relay had published all but the last two events
    finally:
        relay.close()

    deadline = time.monotonic() + 10
    while True:
        after = scrape(stack.url)
        lags = {
            name: value(after, "agentworks_projector_lag_events", projector=name)
            for name in projector_names()
        }
        if all(lag == 0 for lag in lags.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.1)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    # Command latency: one observation per command, by type and outcome, with a real duration.
    assert grew("agentworks_command_seconds_count", command="CreateCard", outcome="ok") == 3
    assert grew("agentworks_command_seconds_count", command="CreateProject", outcome="ok") == 1
    assert 0 < grew("agentworks_command_seconds_sum", command="CreateCard", outcome="ok") < 30
    assert grew("agentworks_command_seconds_bucket", command="CreateCard", outcome="ok", le="+Inf")
    # Appends: at least the workspace, the project and three cards (other stacks of this
    # process append too, so at least).
    assert grew("agentworks_events_appended_total") >= 5
    # Lag, read from this stack's database at scrape time.
    assert value(after, "agentworks_log_head_position") == head
    assert value(after, "agentworks_relay_lag_events", relay="e2e-relay") == 2
    for name in projector_names():
        assert ("agentworks_projector_lag_events", frozenset({("projector", name)})) in after
    assert lags == dict.fromkeys(projector_names(), 0.0)
    # HTTP responses by status: the mutations, the first scrape, the 401.
    assert grew("agentworks_http_responses_total", status="200") >= 6
    assert grew("agentworks_http_responses_total", status="401") == 1


def test_metrics_without_a_lag_collector_still_answer(stack: Stack) -> None:
    samples = scrape(stack.url)
    names = {name for name, _ in samples}
    assert "agentworks_http_responses_total" in names
    assert "agentworks_log_head_position" not in names


def test_metrics_behind_a_token_refuse_a_scrape_without_it(make_stack: MakeStack) -> None:
    """With ``AGENTWORKS_METRICS_TOKEN`` set, a scrape needs it; the health checks stay open."""
    stack = make_stack(metrics_token="scrape-secret")
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "scrape-secret"}):
        refused = httpx.get(f"{stack.url}/metrics", headers=headers, timeout=10)
        assert refused.status_code == 401
        assert refused.headers["www-authenticate"].startswith("Bearer")
        assert "agentworks_" not in refused.text
    allowed = httpx.get(
        f"{stack.url}/metrics", headers={"Authorization": "Bearer scrape-secret"}, timeout=10
    )
    assert allowed.status_code == 200
    assert "agentworks_http_responses_total" in allowed.text
    assert httpx.get(f"{stack.url}/healthz", timeout=10).status_code == 200


def test_graphql_operations_are_timed_by_type_root_field_and_outcome(stack: Stack) -> None:
    """Which root field is slow or failing, without a series per name a client makes up."""
    before = scrape(stack.url)
    alice, ws = stack.owner_with_workspace("gus", "Timed")
    pid = alice.create_project(ws, "T", [{"name": "Todo"}])["project"]["id"]
    alice.create_card(pid, "timed")
    board = alice.post("query B($id: ID!) { board(projectId: $id) { lanes { name } } }",
                       {"id": pid})  # fmt: skip
    assert not board.errors, board.errors
    bad_id = alice.post('{ card(id: "not-an-id") { id } }')
    unknown = alice.post("{ madeUpRootField123 { id } }")
    assert unknown.errors
    alice.post("{ __typename }")
    after = scrape(stack.url)

    def timed(operation: str, field: str, outcome: str) -> float:
        labels = {"operation": operation, "field": field, "outcome": outcome}
        name = "agentworks_graphql_seconds_count"
        return value(after, name, **labels) - value(before, name, **labels)

    assert timed("mutation", "createCard", "ok") == 1
    assert timed("mutation", "createProject", "ok") == 1
    assert timed("query", "board", "ok") == 1
    assert bad_id.errors[0]["extensions"]["code"] == "VALIDATION"
    assert timed("query", "card", "VALIDATION") == 1
    assert timed("query", "unknown", "VALIDATION") == 1
    assert timed("query", "introspection", "ok") == 1
    assert not any("madeUpRootField123" in str(labels) for _, labels in after)
