"""A pool that cannot lend a connection answers at once: HTTP 503, UNAVAILABLE, Retry-After.

Issue 10 found every tenant's queries answering INTERNAL after 30 s once the API's connections
were held elsewhere. Here every connection of a pool is taken and held by the test while a
client asks: the answer comes within the pool timeout (an operator setting,
``AGENTWORKS_POOL_TIMEOUT``; 0.3 s here), says what it is, and the next request after the
connections come back is served normally.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import pytest
from outage_helpers import CREATE_CARD, card_titles_in_log, start_api_stack

if TYPE_CHECKING:
    from collections.abc import Iterator

    import httpx
    from outage_helpers import ApiStack

BOARD = "query($p: ID!) { board(projectId: $p) { lanes { name } } }"
#: Far above the 0.3 s pool timeout (the machine may be loaded) and half the 30 s the issue saw:
#: the bound that says the pool timeout applies, not the library's 30 s default.
ANSWER_WITHIN = 15.0


def assert_quick_unavailable(busy: httpx.Response, waited: float) -> None:
    """``busy`` is the answer of a request that found no connection: a 503 UNAVAILABLE (not an
    outcome to look up: nothing ran) with a Retry-After, given within :data:`ANSWER_WITHIN`."""
    assert busy.status_code == 503, busy.text
    (error,) = busy.json()["errors"]
    assert error["extensions"]["code"] == "UNAVAILABLE"
    assert "outcome" not in error["extensions"]
    assert int(busy.headers["retry-after"]) >= 1
    assert waited < ANSWER_WITHIN


@pytest.fixture
def stack(database_url: str) -> Iterator[ApiStack]:
    api = start_api_stack(
        database_url, pool_timeout=0.3, api_pool_size=1, write_pool_size=1, fanout=False
    )
    try:
        yield api
    finally:
        api.close()


def test_read_with_every_api_connection_taken_is_a_quick_503(stack: ApiStack) -> None:
    token, (project_id,) = stack.boards(1)
    held = stack.services.pool.getconn()
    try:
        started = time.monotonic()
        busy = stack.post(token, BOARD, {"p": project_id})
        waited = time.monotonic() - started
    finally:
        stack.services.pool.putconn(held)

    assert_quick_unavailable(busy, waited)
    assert stack.post(token, BOARD, {"p": project_id}).status_code == 200


def test_write_with_every_event_store_connection_taken_is_a_quick_503_and_writes_nothing(
    stack: ApiStack,
) -> None:
    token, (project_id,) = stack.boards(1)
    pool = stack.write.factory.datastore.pool  # type: ignore[attr-defined]
    held = [pool.getconn() for _ in range(pool.max_size)]
    try:
        started = time.monotonic()
        busy = stack.post(token, CREATE_CARD, {"input": {"projectId": project_id, "title": "x1"}})
        waited = time.monotonic() - started
    finally:
        for conn in held:
            pool.putconn(conn)

    assert_quick_unavailable(busy, waited)
    assert card_titles_in_log(stack.database_url)["x1"] == 0
    again = stack.post(token, CREATE_CARD, {"input": {"projectId": project_id, "title": "x1"}})
    assert again.status_code == 200, again.text


def test_write_that_happened_but_cannot_be_read_back_is_not_answered_as_an_outage(
    stack: ApiStack,
) -> None:
    """The command went through (its own pool had room); only reading its object back found the
    API's pool full: the answer is 200 with the consistencyToken (the truth: it was written) and
    an UNAVAILABLE error on the object alone, not a 503 that would read as "not written"."""
    token, (project_id,) = stack.boards(1)
    query = """mutation($input: CreateCardInput!) {
      createCard(input: $input) { consistencyToken card { id } } }"""
    held = stack.services.pool.getconn()
    try:
        answer = stack.post(token, query, {"input": {"projectId": project_id, "title": "x2"}})
    finally:
        stack.services.pool.putconn(held)

    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["data"]["createCard"]["consistencyToken"]
    assert body["data"]["createCard"]["card"] is None
    assert [e["extensions"]["code"] for e in body["errors"]] == ["UNAVAILABLE"]
    assert body["errors"][0]["path"] == ["createCard", "card"]
    assert card_titles_in_log(stack.database_url)["x2"] == 1
