"""The database's network goes silent (a partition, a failed-over primary's vanished host): the
API answers UNAVAILABLE instead of waiting on it, and serves again once the network is back.

A stopped server resets its connections and refuses new ones; a partition does neither: packets
are dropped, and a connection that was open waits for an answer that never comes. The server
here is a dedicated one in a network namespace of its own (``network_partition``), whose link
the test takes down; the machine's shared server and loopback are left alone.
"""

from __future__ import annotations

import concurrent.futures
import time
import uuid
from typing import TYPE_CHECKING

import httpx
import pg
import psycopg
import pytest
from dedicated_postgres import dedicated_postgres
from network_partition import Partition, partition
from outage_helpers import CREATE_CARD, ApiStack, card_titles_in_log, start_api_stack

from infra.migrate import migrate
from streams.relay import RelayLease, RelayPositions

if TYPE_CHECKING:
    from collections.abc import Iterator

pytestmark = pytest.mark.slow

BOARD = "query($p: ID!) { board(projectId: $p) { lanes { name } } }"
#: Far above the ten seconds in which a silent connection is given up, far below the minutes
#: (retransmissions) and hours (keepalive defaults) a request waited with the kernel's defaults.
ANSWER_WITHIN = 40.0


@pytest.fixture
def partitioned_server() -> Iterator[tuple[Partition, str]]:
    """A migrated database on a server across a link the test can cut, and its URL."""
    with (
        partition() as cut,
        dedicated_postgres(host=cut.server_address, run_in=cut.command) as server,
    ):
        url = server.create_database("agentworks")
        migrate(url, app_role="agentworks_app", logins=pg.LOGIN_PASSWORDS)
        try:
            yield cut, url
        finally:
            cut.heal()


@pytest.fixture
def partitioned(partitioned_server: tuple[Partition, str]) -> Iterator[tuple[Partition, ApiStack]]:
    """The API stack on a server across a link the test can cut."""
    cut, url = partitioned_server
    api = start_api_stack(url, pool_timeout=1.0, settle_seconds=2.0, fanout=False)
    try:
        yield cut, api
    finally:
        cut.heal()
        api.close()


def test_requests_during_a_partition_answer_unavailable_and_service_resumes_after_it(
    partitioned: tuple[Partition, ApiStack],
) -> None:
    cut, stack = partitioned
    token, (project_id,) = stack.boards(1)
    assert stack.post(token, BOARD, {"p": project_id}).status_code == 200
    time.sleep(0.5)  # the pool's connections idle: the next requests check them first

    cut.cut()
    titles = [f"partition-{uuid.uuid4()}" for _ in range(2)]
    requests = [(BOARD, {"p": project_id})] * 3 + [
        (CREATE_CARD, {"input": {"projectId": project_id, "title": title}}) for title in titles
    ]
    try:
        with concurrent.futures.ThreadPoolExecutor(len(requests)) as clients:
            answers = list(clients.map(lambda request: _post(stack, token, *request), requests))
    finally:
        cut.heal()

    for answer in answers:
        assert not isinstance(answer, httpx.TimeoutException), "the request hung"
        assert answer.status_code == 503, answer.text
        (error,) = answer.json()["errors"]
        assert error["extensions"]["code"] == "UNAVAILABLE"
        assert int(answer.headers["retry-after"]) >= 1

    # The network is back: the pools drop what the partition broke and serve again.
    deadline = time.monotonic() + 30
    while (read := stack.post(token, BOARD, {"p": project_id})).status_code != 200:
        assert time.monotonic() < deadline, read.text
        time.sleep(0.2)
    written = stack.post(token, CREATE_CARD, {"input": {"projectId": project_id, "title": "after"}})
    assert written.status_code == 200, written.text
    # Nothing answered UNAVAILABLE was written (none could reach the server to commit).
    in_log = card_titles_in_log(stack.database_url)
    assert "after" in in_log
    assert not set(titles) & set(in_log)


def test_the_relays_connections_give_up_a_silent_server(
    partitioned_server: tuple[Partition, str],
) -> None:
    """The relay's connections of its own (its position, its lease) waited out the kernel's
    retransmissions across a partition: the relay stalled for some fifteen minutes, holding a
    lease it could no longer know it held, instead of failing and trying again."""
    cut, url = partitioned_server
    positions = RelayPositions(url, role=None)
    lease = RelayLease(url, role=None)
    clients = concurrent.futures.ThreadPoolExecutor(2)
    try:
        assert positions.load() == 0
        assert lease.acquire()
        cut.cut()
        loaded = clients.submit(positions.load)
        held = clients.submit(lease.still_held)
        done, _ = concurrent.futures.wait([loaded, held], timeout=ANSWER_WITHIN)
        assert done == {loaded, held}, "the relay's connections hung"
        with pytest.raises(psycopg.OperationalError):
            loaded.result()
        assert held.result() is False
    finally:
        cut.heal()  # (a connection still waiting gets its answer once TCP retransmits)
        clients.shutdown()
        positions.close()
        lease.release()


def _post(
    stack: ApiStack, token: str, query: str, variables: dict[str, object]
) -> httpx.Response | httpx.TimeoutException:
    try:
        return httpx.post(
            f"{stack.url}/graphql",
            json={"query": query, "variables": variables},
            headers={"Authorization": f"Bearer {token}"},
            timeout=ANSWER_WITHIN,
        )
    except httpx.TimeoutException as error:
        return error
