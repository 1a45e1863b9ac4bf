"""What ``/auth/*`` and Stripe's webhook read of a request body: never more than its limit,
never a crash."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any, cast

import pytest
from starlette.requests import Request

from domain.errors import ValidationFailed
from read_api.identity import _MAX_BODY, _body
from read_api.input_checks import BodyTooSlow
from read_api.webhooks import StripeWebhook


class EndlessBody:
    """A chunked body (no Content-Length) that never ends; counts what was read of it."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.sent = 0

    async def __call__(self) -> dict[str, Any]:
        if self.sent > 100 * self.limit:
            raise AssertionError(f"read {self.sent} bytes of a body limited to {self.limit}")
        self.sent += 4096
        return {"type": "http.request", "body": b" " * 4096, "more_body": True}

    def request(self) -> Request:
        return Request({"type": "http", "method": "POST", "headers": []}, self)


def test_a_body_is_read_no_further_than_the_limit() -> None:
    """A sender without Content-Length (chunked) could make the server buffer any amount: the
    whole body was read before its size was checked."""
    body = EndlessBody(_MAX_BODY)
    with pytest.raises(ValidationFailed, match="larger than"):
        asyncio.run(_body(body.request(), seconds=30))
    assert body.sent <= _MAX_BODY + 4096


def test_a_webhook_body_is_read_no_further_than_the_limit() -> None:
    """The route takes anyone's requests (the signature is checked on the whole body): it read
    the body whole, then compared its size with the limit."""
    services = SimpleNamespace(
        stripe_webhook_secret="whsec_test", max_body_bytes=20_000, request_body_timeout_seconds=30
    )
    body = EndlessBody(services.max_body_bytes)
    answer = asyncio.run(StripeWebhook(cast("Any", SimpleNamespace(services=services))).receive(
        body.request()
    ))  # fmt: skip
    assert answer.status_code == 413
    assert body.sent <= services.max_body_bytes + 4096


@pytest.mark.parametrize("raw", [b"[" * 16_000, b'{"a":' * 3_000, b'{"a": ' + b"1" * 5_000 + b"}"])
def test_json_nested_too_deep_is_a_validation_error(raw: bytes) -> None:
    """json.loads raises RecursionError (an HTTP 500) for arrays nested thousands deep, and a
    plain ValueError, no JSONDecodeError, for an integer of more than 4300 digits."""
    chunks = [raw]

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": chunks.pop() if chunks else b"", "more_body": False}

    request = Request({"type": "http", "method": "POST", "headers": []}, receive)
    with pytest.raises(ValidationFailed, match="not valid JSON"):
        asyncio.run(_body(request, seconds=30))


class StalledBody:
    """A body whose first bytes came and whose rest never does."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self) -> dict[str, Any]:
        self.calls += 1
        if self.calls == 1:
            return {"type": "http.request", "body": b'{"email": ', "more_body": True}
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    def request(self) -> Request:
        return Request({"type": "http", "method": "POST", "headers": []}, self)


def test_a_body_that_stops_arriving_is_given_up_after_its_time() -> None:
    """Nothing bounded how long a body could take: the route waited for the rest for good."""
    started = time.monotonic()
    with pytest.raises(BodyTooSlow, match=r"did not arrive within 0\.2 s"):
        asyncio.run(_body(StalledBody().request(), seconds=0.2))
    assert time.monotonic() - started < 5


def test_a_webhook_body_that_stops_arriving_answers_408() -> None:
    services = SimpleNamespace(
        stripe_webhook_secret="whsec_test", max_body_bytes=20_000, request_body_timeout_seconds=0.2
    )
    answer = asyncio.run(StripeWebhook(cast("Any", SimpleNamespace(services=services))).receive(
        StalledBody().request()
    ))  # fmt: skip
    assert answer.status_code == 408
    assert answer.headers["connection"] == "close"
