"""What ``/auth/*`` reads of a request body: never more than its limit, never a crash."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from starlette.requests import Request

from domain.errors import ValidationFailed
from read_api.identity import _MAX_BODY, _body


def test_a_body_is_read_no_further_than_the_limit() -> None:
    """A sender without Content-Length (chunked) could make the server buffer any amount: the
    whole body was read before its size was checked."""
    sent = 0

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent > 100 * _MAX_BODY:
            raise AssertionError(f"read {sent} bytes of a body limited to {_MAX_BODY}")
        sent += 4096
        return {"type": "http.request", "body": b" " * 4096, "more_body": True}

    request = Request({"type": "http", "method": "POST", "headers": []}, receive)
    with pytest.raises(ValidationFailed, match="larger than"):
        asyncio.run(_body(request))
    assert sent <= _MAX_BODY + 4096


@pytest.mark.parametrize("raw", [b"[" * 16_000, b'{"a":' * 3_000, b'{"a": ' + b"1" * 5_000 + b"}"])
def test_json_nested_too_deep_is_a_validation_error(raw: bytes) -> None:
    """json.loads raises RecursionError (an HTTP 500) for arrays nested thousands deep, and a
    plain ValueError, no JSONDecodeError, for an integer of more than 4300 digits."""
    chunks = [raw]

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": chunks.pop() if chunks else b"", "more_body": False}

    request = Request({"type": "http", "method": "POST", "headers": []}, receive)
    with pytest.raises(ValidationFailed, match="not valid JSON"):
        asyncio.run(_body(request))
