"""One hostile client against the server's shared resources (memory, sockets, the rate limiter's
keys): whatever it sends, or fails to read, it holds a bounded share and the others are served.

These speak raw TCP where a well-behaved client library would not do what is tested (a head that
never ends, a body sent a byte at a time, pings whose pongs are never read).
"""

from __future__ import annotations

import base64
import gc
import json
import os
import secrets
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import redis
from e2e_stack import MakeStack, Stack
from graphql import DocumentNode

from adapters.metrics import LagCollector


def _connect(stack: Stack, *, receive_buffer: int | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if receive_buffer is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.connect((stack.server.host, stack.server.port))
    return sock


def _answer(sock: socket.socket, *, within: float) -> bytes:
    """What the server sends until it closes the connection or ``within`` seconds pass."""
    return _closed_by_server(sock, within=within)[1]


def _closed_by_server(sock: socket.socket, *, within: float) -> tuple[bool, bytes]:
    """Whether the server closed ``sock`` within ``within`` seconds, and what it said first."""
    sock.settimeout(0.2)
    received = b""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return True, received
        if not chunk:
            return True, received
        received += chunk
    return False, received


def _still_serves(stack: Stack) -> None:
    assert httpx.get(f"{stack.url}/healthz", timeout=5).status_code == 200


# -- the request head ----------------------------------------------------------------------------


def _endless_headers() -> Iterator[bytes]:
    yield b"POST /graphql HTTP/1.1\r\nHost: api\r\n"
    line = b"X-Padding: " + b"a" * 8_000 + b"\r\n"
    for _ in range(4_000):  # 32 MB of headers, never ended
        yield line


def _endless_url() -> Iterator[bytes]:
    yield b"GET /"
    for _ in range(4_000):  # a request line of 32 MB, never ended
        yield b"a" * 8_000


@pytest.mark.parametrize("head", [_endless_headers, _endless_url])
def test_a_request_head_past_its_limit_is_refused_and_read_no_further(
    stack: Stack, head: Callable[[], Iterator[bytes]]
) -> None:
    """uvicorn (httptools) bounds neither the request line nor the headers while they arrive: a
    head of 200 MB was read into memory, every byte of it, as long as its sender cared to send
    (and parsed on the event loop, a bearer token of megabytes included)."""
    sock = _connect(stack)
    sent = 0
    sock.settimeout(5)
    try:
        for piece in head():
            sock.sendall(piece)
            sent += len(piece)
    except (BrokenPipeError, ConnectionResetError, TimeoutError):
        pass  # the server stopped reading: what is tested
    answer = _answer(sock, within=5)
    sock.close()
    assert sent < 4 * 1024 * 1024, f"the server read {sent} bytes of one request's head"
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
    _still_serves(stack)


def test_heads_within_the_limit_are_served_as_before(stack: Stack) -> None:
    big_but_fine = {f"X-Header-{n}": "v" * 100 for n in range(200)}  # some 24 KB
    response = httpx.get(f"{stack.url}/healthz", headers=big_but_fine, timeout=5)
    assert response.status_code == 200


def test_a_client_that_never_finishes_its_head_is_disconnected(make_stack: MakeStack) -> None:
    """Without a timeout on the head, a socket that sent half a request line (or nothing) was
    held open for good: a few thousand of them took every file descriptor of the process."""
    stack = make_stack(request_head_timeout_seconds=1.0)
    silent = _connect(stack)
    slow = _connect(stack)
    slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: api\r\n")
    trickling = _connect(stack)
    trickling.sendall(b"GET /healthz HTTP/1.1\r\n")
    started = time.monotonic()
    for _ in range(8):  # a byte every half second: progress, but never a whole head
        time.sleep(0.5)
        try:
            trickling.sendall(b"X")
        except (BrokenPipeError, ConnectionResetError):
            break
    for sock in (silent, slow, trickling):
        closed, said = _closed_by_server(sock, within=max(0.5, 6 - (time.monotonic() - started)))
        sock.close()
        assert closed, "the server still holds a connection whose head never came"
        assert said == b"" or said.startswith(b"HTTP/1.1 408"), said[:200]
    _still_serves(stack)


def test_a_keep_alive_connection_serves_request_after_request(make_stack: MakeStack) -> None:
    """The head's timer is per request: a connection kept alive and reused is not cut off."""
    stack = make_stack(request_head_timeout_seconds=1.0)
    with httpx.Client(base_url=stack.url, timeout=5) as client:
        for _ in range(4):
            assert client.get("/healthz").status_code == 200
            time.sleep(0.6)


def test_connections_from_one_address_are_bounded(make_stack: MakeStack) -> None:
    """With the head's timeout a connection still lives as long as its client sends a request
    now and then (a cheap one: ``GET /healthz`` every few seconds), and nothing bounded how many
    one address held: enough of them took every file descriptor of the process."""
    stack = make_stack(max_connections_per_address=5)
    held = [_connect(stack) for _ in range(5)]
    try:
        one_more = _connect(stack)
        one_more.sendall(b"GET /healthz HTTP/1.1\r\nHost: api\r\n\r\n")
        closed, said = _closed_by_server(one_more, within=5)
        one_more.close()
        assert closed, "a sixth connection of one address was kept"
        assert said.startswith(b"HTTP/1.1 503"), said[:200]
        held.pop().close()
        time.sleep(0.2)
        _still_serves(stack)  # a place was freed
        # A WebSocket leaves the count at its upgrade: sockets have bounds of their own.
        socket_ = _websocket(stack)
        _still_serves(stack)
        socket_.close()
    finally:
        for sock in held:
            sock.close()


# -- the request body ----------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/graphql", "/auth/login", "/webhooks/stripe"])
def test_a_body_sent_a_trickle_at_a_time_is_cut_off(make_stack: MakeStack, path: str) -> None:
    """Nothing bounded how long a body could take: 1 MB at a byte a second held its request
    (and its socket) for eleven days; ``/auth/*`` and the webhook read it from anyone."""
    stack = make_stack(
        request_body_timeout_seconds=1.0,
        auth={},
        stripe_webhook_secret="whsec_" + secrets.token_hex(8),
    )
    token = stack.token("alice", "00000000-0000-0000-0000-000000000001")
    sock = _connect(stack)
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: api\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {token}\r\nContent-Length: 1000\r\n\r\n{{".encode()
    )
    started = time.monotonic()
    answer = b""
    while time.monotonic() - started < 6:
        answer += _answer(sock, within=0.5)
        if answer:
            break
        try:
            sock.sendall(b" ")
        except (BrokenPipeError, ConnectionResetError):
            break
    sock.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer[:300]
    _still_serves(stack)


def test_an_answer_given_before_the_body_was_read_closes_the_connection(stack: Stack) -> None:
    """A request refused before its body is read (no valid token: 401) was answered and the
    connection kept: its client could go on streaming the body it had announced, a megabyte at
    a time, each byte parsed and thrown away, for as long as it liked. The answer now says
    ``Connection: close`` and the server closes, as for a body too slow."""
    sock = _connect(stack)
    sock.sendall(
        b"POST /graphql HTTP/1.1\r\nHost: api\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer not-a-token\r\nContent-Length: 1000000\r\n\r\n{"
    )
    closed, answer = _closed_by_server(sock, within=5)
    sock.close()
    assert answer.startswith(b"HTTP/1.1 401"), answer[:300]
    assert b"connection: close" in answer.lower()
    assert closed
    _still_serves(stack)


@pytest.mark.parametrize(
    ("path", "authorization", "sent", "status"),
    [
        ("/auth/mfa/confirm", "Bearer not-a-token", b"{", b"401"),  # refused before the body
        ("/auth/password", "workspace", b"{", b"403"),  # a workspace token: before the body too
        ("/auth/login", None, b"{" + b" " * 20_000, b"400"),  # past the 16 KB /auth/* read
    ],
)
def test_an_auth_answer_given_before_the_body_was_read_closes_the_connection(
    make_stack: MakeStack, path: str, authorization: str | None, sent: bytes, status: bytes
) -> None:
    """``/auth/*`` answered a request refused before its body was read whole (a bad or wrong
    kind of token on the routes that need one, a body past their size) and kept the connection,
    as ``/graphql`` did: the client could go on streaming the megabyte it had announced."""
    stack = make_stack(auth={})
    if authorization == "workspace":
        workspace = "00000000-0000-0000-0000-000000000002"
        authorization = f"Bearer {stack.token('00000000-0000-0000-0000-000000000001', workspace)}"
    header = f"Authorization: {authorization}\r\n" if authorization else ""
    sock = _connect(stack)
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: api\r\nContent-Type: application/json\r\n"
        f"{header}Content-Length: 1000000\r\n\r\n".encode()
        + sent
    )
    closed, answer = _closed_by_server(sock, within=5)
    sock.close()
    assert answer.startswith(b"HTTP/1.1 " + status), answer[:300]
    assert b"connection: close" in answer.lower()
    assert closed
    _still_serves(stack)


def test_an_auth_answer_to_a_body_read_whole_keeps_the_connection(make_stack: MakeStack) -> None:
    """Only a body left unread closes: a refused login whose body was read keeps it."""
    stack = make_stack(auth={})
    with httpx.Client(base_url=stack.url, timeout=10) as client:
        body = {"email": "nobody@example.com", "password": "x" * 12}
        first = client.post("/auth/login", json=body)
        assert first.status_code == 401, first.text
        assert "close" not in first.headers.get("connection", "")
        assert client.post("/auth/login", json=body).status_code == 401


# -- WebSocket -----------------------------------------------------------------------------------


def _websocket(stack: Stack) -> socket.socket:
    sock = _connect(stack, receive_buffer=4096)
    key = base64.b64encode(os.urandom(16))
    sock.sendall(
        b"GET /graphql HTTP/1.1\r\nHost: api\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n"
        b"Sec-WebSocket-Protocol: graphql-transport-ws\r\n\r\n"
    )
    sock.settimeout(5)
    assert sock.recv(4096).startswith(b"HTTP/1.1 101")
    return sock


def test_pings_whose_pongs_are_never_read_do_not_pile_up_in_the_server(stack: Stack) -> None:
    """The server answers every WebSocket ping with a pong whether or not the client reads: a
    client sending pings and reading nothing grew the server's send buffer by what it sent,
    some 20 MB a second here, without bound (the process's memory, every tenant's)."""
    sock = _websocket(stack)
    ping = bytes([0x89, 0x80 | 125]) + b"\0\0\0\0" + b"p" * 125
    batch = ping * 1_000
    sent = 0
    sock.settimeout(2)
    try:
        while sent < 40_000_000:
            sock.sendall(batch)
            sent += len(batch)
    except (TimeoutError, BrokenPipeError, ConnectionResetError):
        pass  # the server stopped reading: what is tested
    connections = stack.server.server.server_state.connections
    buffered = max(
        (c.transport.get_write_buffer_size() for c in list(connections) if hasattr(c, "conn")),
        default=0,
    )
    sock.close()
    assert buffered < 1_000_000, f"{buffered} bytes of pongs wait in the server for one client"
    _still_serves(stack)


# -- the rate limiter's keys ---------------------------------------------------------------------


def test_logins_refused_for_their_address_leave_no_keys_behind(
    make_stack: MakeStack, redis_url: str
) -> None:
    """A login counted its account before its address, the account named by whatever email the
    body held (up to 16 KB): one address refused for its rate still made a key of 16 KB per
    request, in Redis (or the process) for a minute, each request a new one."""
    stack = make_stack(
        broadcaster="redis",
        auth={"login_per_address_per_minute": 5, "login_per_account_per_minute": 10},
    )
    auth = stack.services.auth
    assert auth is not None
    statuses = []
    with httpx.Client(base_url=stack.url, timeout=10) as client:
        for _ in range(40):
            email = secrets.token_hex(5_000) + "@example.com"
            answer = client.post("/auth/login", json={"email": email, "password": "x" * 12})
            statuses.append(answer.status_code)
    assert statuses.count(429) >= 35, statuses
    store = redis.Redis.from_url(redis_url)
    try:
        keys = list(store.scan_iter(match=f"{auth.key_prefix}:*", count=1000))
    finally:
        store.close()
    accounts = [k for k in keys if b"login-account" in k]
    assert len(accounts) <= 5, f"{len(accounts)} account keys for 5 logins let through"
    assert max(len(k) for k in keys) < 200, "a rate limit key holds what the client sent"


def test_refreshes_refused_for_their_address_read_nothing_and_leave_no_keys_behind(
    make_stack: MakeStack, redis_url: str
) -> None:
    """A failed refresh counted its address only after it had looked for the session the token
    named: once the address was past its limit, each refresh naming a made-up session still
    read the store and left a key for that session's refreshes in the limiter's store for a
    minute before it was answered 429. An address past its limit is now refused first."""
    stack = make_stack(
        broadcaster="redis",
        auth={"login_per_address_per_minute": 3, "login_per_account_per_minute": 10},
    )
    auth = stack.services.auth
    assert auth is not None
    if time.time() % 60 > 45:  # the limits count in minutes of the clock: start in one
        time.sleep(61 - time.time() % 60)
    statuses = []
    with httpx.Client(base_url=stack.url, timeout=10) as client:
        for _ in range(20):
            token = f"{uuid.uuid4().hex}.{secrets.token_urlsafe(32)}"
            answer = client.post("/auth/refresh", json={"refreshToken": token})
            statuses.append(answer.status_code)
    assert statuses == [401] * 3 + [429] * 17, statuses
    store = redis.Redis.from_url(redis_url)
    try:
        keys = list(store.scan_iter(match=f"{auth.key_prefix}:refresh-*", count=1000))
    finally:
        store.close()
    assert len(keys) <= 3, f"{len(keys)} refresh keys for 3 refreshes let through"


def test_logouts_naming_made_up_sessions_are_limited_per_address(
    make_stack: MakeStack, redis_url: str
) -> None:
    """A logout looked for the session its token named, whatever it named, without limit: one
    read of the store per made-up session id, as fast as a client could send them. A logout
    that names no session of its secret counts against its address now, as a failed refresh
    does, and an address past its limit is refused before the session is looked for."""
    stack = make_stack(
        broadcaster="redis",
        auth={"login_per_address_per_minute": 3, "login_per_account_per_minute": 10},
    )
    if time.time() % 60 > 45:  # the limits count in minutes of the clock: start in one
        time.sleep(61 - time.time() % 60)
    statuses, codes = [], set()
    with httpx.Client(base_url=stack.url, timeout=10) as client:
        for _ in range(20):
            token = f"{uuid.uuid4()}.{secrets.token_urlsafe(32)}"
            answer = client.post("/auth/logout", json={"refreshToken": token})
            statuses.append(answer.status_code)
            if answer.status_code == 429:
                codes.add(answer.json()["error"]["code"])
                assert int(answer.headers["retry-after"]) >= 1
    assert statuses == [204] * 3 + [429] * 17, statuses
    assert codes == {"RATE_LIMITED"}


# -- clients that never read ---------------------------------------------------------------------

_BOARD = "board(projectId: $id) { lanes { cards { edges { node { description } } } } }"
BOARDS = "query($id: ID!) { " + " ".join(f"b{n}: {_BOARD}" for n in range(8)) + " }"


def test_a_client_that_never_reads_its_answer_is_dropped(make_stack: MakeStack) -> None:
    """An answer its client did not read waited in the server for good, with its socket: each
    request within the client's rate limit held one more (600 a minute, by default)."""
    stack = make_stack(send_timeout_seconds=1.0)
    alice, ws = stack.owner_with_workspace()
    project = alice.create_project(ws, "P", [{"name": "Todo"}])["project"]["id"]
    for n in range(12):
        alice.data(
            "mutation($input: CreateCardInput!) { createCard(input: $input) { card { id } } }",
            {"input": {"projectId": project, "title": f"c{n}", "description": "d" * 100_000}},
        )
    cards = "query($id: ID!) { board(projectId: $id) { lanes { count } } }"
    deadline = time.monotonic() + 20
    while alice.data(cards, {"id": project})["board"]["lanes"][0]["count"] < 12:
        assert time.monotonic() < deadline, "the cards were never projected"
        time.sleep(0.2)
    # Some 10 MB of answer: more than the kernel's send buffer (4 MB here) takes in.
    body = json.dumps({"query": BOARDS, "variables": {"id": project}}).encode()
    sock = _connect(stack, receive_buffer=4096)
    sock.sendall(
        b"POST /graphql HTTP/1.1\r\nHost: api\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {alice.token}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    ours = sock.getsockname()

    def held() -> int | None:
        """What the server holds for our connection, unsent; None: the connection is gone
        (closing is not gone: a closed transport still waits to send what it holds)."""
        for connection in list(stack.server.server.server_state.connections):
            if connection.client == ours:
                return int(connection.transport.get_write_buffer_size())
        return None

    deadline = time.monotonic() + 10
    while (held() or 0) < 1_000_000 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert (held() or 0) >= 1_000_000, "the answer never waited in the server"
    deadline = time.monotonic() + 5
    while held() is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    left = held()
    sock.close()
    assert left is None, f"{left} bytes still wait for a client that reads nothing"
    _still_serves(stack)


# -- /metrics ------------------------------------------------------------------------------------


def test_a_flood_of_scrapes_holds_one_worker_thread_not_all_of_them(make_stack: MakeStack) -> None:
    """``/metrics`` answers anyone by default, on the API's own port, and each scrape read the
    lag from a new database connection on one of the worker threads every request's reads run
    on: scrapes sent faster than that connection answers (a database slow to accept, here one
    that never does) took every thread, and every tenant's queries waited behind them."""
    silent = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    silent.bind(("127.0.0.1", 0))
    silent.listen(200)  # accepts connections, never answers: each connect waits its 3 s
    try:
        lag = LagCollector(f"postgresql://agentworks@127.0.0.1:{silent.getsockname()[1]}/x")
        stack = make_stack(lag_collector=lag, db_threads=8)
        alice, ws = stack.owner_with_workspace()
        query = "query($id: ID!) { workspace(id: $id) { id } }"
        assert alice.data(query, {"id": ws})
        with ThreadPoolExecutor(max_workers=40) as scrapers:
            scrapes = [
                scrapers.submit(httpx.get, f"{stack.url}/metrics", timeout=30) for _ in range(40)
            ]
            time.sleep(0.5)
            started = time.monotonic()
            assert alice.data(query, {"id": ws})
            took = time.monotonic() - started
            assert all(scrape.result().status_code == 200 for scrape in scrapes)
    finally:
        silent.close()
    assert took < 1.5, f"a query waited {took:.1f} s behind scrapes of /metrics"


# -- GraphQL documents ---------------------------------------------------------------------------


def test_large_documents_are_not_kept_by_the_parse_and_validation_caches(stack: Stack) -> None:
    """The caches of parsed and validated documents hold 512 each, whatever their size: 512
    different documents of nearly a megabyte (a long string literal passes every other limit),
    well within one user's rate limit, were kept in memory (the text, and the literal again in
    the parsed document) until 512 others pushed them out."""
    alice, ws = stack.owner_with_workspace()
    document = 'query($id: ID!) { workspace(id: $id) { id name(x: "%s") } }'
    for n in range(20):
        answer = alice.post(document.replace("%s", f"{n}-" + "x" * 900_000), {"id": ws})
        assert answer.status == 200
        assert answer.codes == ["VALIDATION"], answer.errors
    gc.collect()
    kept = [
        o for o in gc.get_objects()
        if isinstance(o, DocumentNode) and o.loc is not None and len(o.loc.source.body) > 500_000
    ]  # fmt: skip
    assert not kept, f"{len(kept)} documents of 900 KB are kept after their requests"
    # Long documents run as before, parsed and validated each time.
    long = "# " + "c" * 100_000 + "\nquery($id: ID!) { workspace(id: $id) { id } }"
    assert alice.data(long, {"id": ws}) == {"workspace": {"id": ws}}
    too_deep = "# " + "c" * 100_000 + "\n{ " + "me { " * 13 + "id" + " }" * 14
    refused = alice.post(too_deep)
    assert set(refused.codes) == {"VALIDATION"}
    assert any("depth" in error["message"] for error in refused.errors), refused.errors
