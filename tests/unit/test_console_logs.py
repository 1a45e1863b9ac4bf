"""Console logs (``AGENTWORKS_LOG_JSON=false``) render an exception's traceback without the
frames' local variables: locals hold passwords and tokens, and rendering a deep stack's locals
held the event loop for minutes (found with variables nested ~960 deep)."""

from __future__ import annotations

import io
import secrets
from collections.abc import Iterator

import pytest
import structlog
from telemetry_fixtures import logged


@pytest.fixture
def console() -> Iterator[io.StringIO]:
    """What console logging writes while the test runs; logging restored after."""
    with logged(level="INFO", json=False) as stream:
        yield stream


def check_password(password: str) -> None:
    secret_in_a_local = f"argon2:{password}"
    raise ValueError(f"refused ({len(secret_in_a_local)} characters)")


def test_a_logged_exception_shows_its_traceback_but_no_local_variable(
    console: io.StringIO,
) -> None:
    password = secrets.token_hex(12)  # not in any source line a traceback quotes
    try:
        check_password(password)
    except ValueError:
        structlog.get_logger("test").exception("login.failed")

    text = console.getvalue()
    assert "login.failed" in text
    assert "ValueError" in text
    assert "check_password" in text
    assert password not in text
    assert "\x1b[" not in text  # no colour codes in a stream that is no terminal
