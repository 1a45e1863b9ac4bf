"""Requests without a valid token are limited per client address: guessing tokens from one
address ends in ``429 RATE_LIMITED`` with ``Retry-After``, not in an endless stream of 401s."""

from __future__ import annotations

import json
import secrets
from typing import Any
from uuid import UUID, uuid4

import httpx
import pytest
from api_client import PROTOCOL
from e2e_stack import MakeStack, Stack
from rate_windows import clear_of_a_window_end
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from domain.access import ApiKey
from read_api.services import RateLimits

LIMIT = 5
QUERY = {"query": "{ __typename }"}


def _stack(make_stack: MakeStack, *, broadcaster: str = "local", **options: object) -> Stack:
    limits = RateLimits(
        per_user_per_minute=100_000,
        per_workspace_per_minute=100_000,
        per_address_per_minute=LIMIT,
        key_prefix=f"aw-test-address:{secrets.token_hex(6)}",
    )
    stack = make_stack(broadcaster=broadcaster, rate_limits=limits, **options)
    clear_of_a_window_end()
    return stack


def _post(stack: Stack, token: str | None, **headers: str) -> httpx.Response:
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return httpx.post(f"{stack.url}/graphql", json=QUERY, headers=headers, timeout=15)


@pytest.mark.parametrize("counters", ["local", "redis"])
def test_bad_tokens_from_one_address_are_refused_after_the_limit(
    make_stack: MakeStack, counters: str
) -> None:
    stack = _stack(make_stack, broadcaster=counters)
    statuses = [_post(stack, None if i % 2 else f"guess-{i}").status_code for i in range(LIMIT)]
    assert statuses == [401] * LIMIT

    refused = _post(stack, "one-more-guess")
    assert refused.status_code == 429
    assert refused.json()["errors"][0]["extensions"]["code"] == "RATE_LIMITED"
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    # Claiming to be someone else does not help: X-Forwarded-For is not trusted by default.
    assert _post(stack, "guess", **{"X-Forwarded-For": "203.0.113.9"}).status_code == 429

    # A caller with a valid token from the same address is not locked out.
    owner, _ = stack.owner_with_workspace()
    assert owner.post("{ __typename }").status == 200


def test_api_keys_from_an_address_past_its_limit_are_not_looked_up(
    make_stack: MakeStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A made-up ``awk_`` key was looked up in the event store before its address was counted:
    once the address was past its limit each guess still cost a read of the store before it
    was answered 429. The address's limit is checked before the key is looked for now."""
    stack = _stack(make_stack)
    looked_up: list[UUID] = []
    aggregate = stack.write.aggregate

    def counted(cls: type[Any], aggregate_id: UUID, **options: Any) -> Any:
        if cls is ApiKey:
            looked_up.append(aggregate_id)
        return aggregate(cls, aggregate_id, **options)

    monkeypatch.setattr(stack.write, "aggregate", counted)
    guesses = [f"awk_{uuid4().hex}_{secrets.token_urlsafe(24)}" for _ in range(LIMIT + 10)]
    statuses = [_post(stack, guess).status_code for guess in guesses]
    assert statuses == [401] * LIMIT + [429] * 10
    assert len(looked_up) == LIMIT


def test_failed_websocket_handshakes_count_too(make_stack: MakeStack) -> None:
    stack = _stack(make_stack)
    for i in range(LIMIT):
        with connect(f"{stack.ws_url}/graphql", subprotocols=[PROTOCOL]) as socket:
            init = {"type": "connection_init", "payload": {"Authorization": f"Bearer guess-{i}"}}
            socket.send(json.dumps(init))
            with pytest.raises(ConnectionClosed):
                socket.recv(timeout=10)
    assert _post(stack, "guess").status_code == 429


def test_a_trusted_proxy_names_the_client(make_stack: MakeStack) -> None:
    stack = _stack(make_stack, trusted_proxies=("127.0.0.1",))
    mallory = {"X-Forwarded-For": "203.0.113.9"}
    assert [_post(stack, "guess", **mallory).status_code for _ in range(LIMIT)] == [401] * LIMIT
    assert _post(stack, "guess", **mallory).status_code == 429
    assert _post(stack, "guess", **{"X-Forwarded-For": "198.51.100.7"}).status_code == 401


def test_addresses_of_one_ipv6_network_share_one_limit(make_stack: MakeStack) -> None:
    """An IPv6 client is given a whole /64 network (2^64 addresses) by its provider: limits
    kept per address gave each guess a fresh budget of its own."""
    stack = _stack(make_stack, trusted_proxies=("127.0.0.1",))
    statuses = [
        _post(stack, "guess", **{"X-Forwarded-For": f"2001:db8:0:1::{n:x}"}).status_code
        for n in range(1, LIMIT + 2)
    ]
    assert statuses == [401] * LIMIT + [429]
    # Another network has a budget of its own; IPv4 clients are counted by address as before.
    assert _post(stack, "guess", **{"X-Forwarded-For": "2001:db8:0:2::1"}).status_code == 401
    assert _post(stack, "guess", **{"X-Forwarded-For": "203.0.113.10"}).status_code == 401
