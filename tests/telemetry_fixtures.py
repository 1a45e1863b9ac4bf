"""Telemetry test fixtures: the spans and log lines a test's code emits, kept in memory.

* ``spans`` (module): an in-memory exporter of this process's finished spans.
* ``exporter`` (function): the same exporter, emptied for this test.
* ``log_lines`` (function): everything logged (JSON, DEBUG and up) while the test runs.

Loaded for every test by ``pytest_plugins`` in ``tests/conftest.py``; as with
``kafka_fixtures``, do not import names from this module in a test module.
"""

from __future__ import annotations

import io
import logging
from contextlib import contextmanager
from typing import TYPE_CHECKING

import pytest
import structlog
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.util._once import Once

from adapters.telemetry import configure_tracing
from infra.logging import configure_logging

if TYPE_CHECKING:
    from collections.abc import Iterator


@pytest.fixture(scope="module")
def spans() -> Iterator[InMemorySpanExporter]:
    """Finished spans of this process, kept in memory while the requesting module runs.

    OpenTelemetry lets a process install its tracer provider once. If one is installed already,
    the exporter is added to it; otherwise this fixture installs one and, when done, uninstalls
    it the way OpenTelemetry's own test utilities do, so that later tests run untraced as they
    expect (with an SDK provider every command span gets a span id of its own).
    """
    exporter = InMemorySpanExporter()
    current = trace.get_tracer_provider()
    installed = None
    if isinstance(current, TracerProvider):
        current.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        installed = configure_tracing(service_name="agentworks-tests", exporter=exporter)
        assert trace.get_tracer_provider() is installed
    yield exporter
    exporter.shutdown()
    if installed is not None:
        installed.shutdown()
        trace._TRACER_PROVIDER = None
        trace._TRACER_PROVIDER_SET_ONCE = Once()


@pytest.fixture
def exporter(spans: InMemorySpanExporter) -> InMemorySpanExporter:
    spans.clear()
    return spans


@contextmanager
def logged(*, level: str, json: bool) -> Iterator[io.StringIO]:
    """Everything logged at ``level`` and up (JSON or console lines) inside the block; the
    logging configured before is restored after.

    Without caching loggers on first use, as production configures it: a module's logger used
    first inside the block was cached with the block's processors and kept writing to its
    stream for the rest of the run, out of reach of every later ``capture_logs``."""
    root = logging.getLogger()
    handlers, before, config = list(root.handlers), root.level, structlog.get_config()
    stream = io.StringIO()
    configure_logging(level=level, json=json, stream=stream)
    structlog.configure(cache_logger_on_first_use=False)
    try:
        yield stream
    finally:
        root.handlers[:] = handlers
        root.setLevel(before)
        structlog.configure(**config)


@pytest.fixture
def log_lines() -> Iterator[io.StringIO]:
    """Everything logged (JSON, DEBUG and up) while the test runs; logging restored after."""
    with logged(level="DEBUG", json=True) as stream:
        yield stream
