"""A small client of the AgentWorks API, as a real client would use it: HTTP and WebSocket.

Tests speak GraphQL through it instead of calling resolvers, so they exercise what a client sees:
status codes, headers, error shapes, subscriptions over graphql-transport-ws.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
from websockets.sync.client import ClientConnection, connect
from websockets.typing import Subprotocol

PROTOCOL = Subprotocol("graphql-transport-ws")

T = TypeVar("T")


class GraphQLFailed(AssertionError):
    """A request expected to succeed answered with errors."""


@dataclass
class Answer:
    status: int
    body: dict[str, Any]
    headers: httpx.Headers

    @property
    def data(self) -> Any:
        return self.body.get("data")

    @property
    def errors(self) -> list[dict[str, Any]]:
        return list(self.body.get("errors") or [])

    @property
    def codes(self) -> list[str]:
        return [e.get("extensions", {}).get("code") for e in self.errors]

    @property
    def stale(self) -> bool:
        return bool((self.body.get("extensions") or {}).get("stale"))


class ApiClient:
    """One caller (one bearer token) talking to one API server."""

    def __init__(self, base_url: str, token: str | None, *, timeout: float = 15.0) -> None:
        self.base_url = base_url
        self.token = token
        self.http = httpx.Client(base_url=base_url, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        return {**headers, **(extra or {})}

    def post(
        self,
        query: str,
        variables: dict[str, Any] | None = None,
        *,
        headers: dict[str, str] | None = None,
        operation_name: str | None = None,
    ) -> Answer:
        body: dict[str, Any] = {"query": query}
        if variables is not None:
            body["variables"] = variables
        if operation_name is not None:
            body["operationName"] = operation_name
        response = self.http.post("/graphql", json=body, headers=self.headers(headers))
        return Answer(response.status_code, response.json(), response.headers)

    def raw(
        self, content: bytes, *, content_type: str = "application/json", token: bool = True
    ) -> httpx.Response:
        headers = {"Content-Type": content_type}
        if token and self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return self.http.post("/graphql", content=content, headers=headers)

    def data(
        self,
        query: str,
        variables: dict[str, Any] | None = None,
        *,
        headers: dict[str, str] | None = None,
    ) -> Any:
        """The data of a request that must succeed without any error."""
        answer = self.post(query, variables, headers=headers)
        if answer.status != 200 or answer.errors:
            raise GraphQLFailed(f"HTTP {answer.status}: {json.dumps(answer.body)[:2000]}")
        return answer.data

    def error_codes(self, query: str, variables: dict[str, Any] | None = None) -> list[str]:
        return self.post(query, variables).codes

    # -- a few operations many tests need ---------------------------------------------------------

    def create_workspace(self, name: str) -> Any:
        return self.data(
            "mutation($name: String!) { createWorkspace(input: {name: $name}) {"
            " consistencyToken workspace { id name members { userId role } } } }",
            {"name": name},
        )["createWorkspace"]

    def create_project(self, workspace_id: str, name: str, lanes: list[dict[str, Any]]) -> Any:
        return self.data(
            "mutation($input: CreateProjectInput!) { createProject(input: $input) {"
            " consistencyToken project { id name board { lanes { name wipLimit count } } } } }",
            {"input": {"workspaceId": workspace_id, "name": name, "lanes": lanes}},
        )["createProject"]

    def create_card(self, project_id: str, title: str, lane: str | None = None) -> Any:
        return self.data(
            "mutation($input: CreateCardInput!) { createCard(input: $input) {"
            " consistencyToken card { id title lane position version } } }",
            {"input": {"projectId": project_id, "title": title, "lane": lane}},
        )["createCard"]

    def start_agent_run(self, card_id: str, agent: str = "coder") -> Any:
        return self.data(
            "mutation($input: StartAgentRunInput!) { startAgentRun(input: $input) { run { id } } }",
            {"input": {"cardId": card_id, "agent": agent}},
        )["startAgentRun"]

    def add_member(self, workspace_id: str, user_id: str, role: str) -> Any:
        return self.data(
            "mutation($input: AddMemberInput!) { addMember(input: $input) {"
            " consistencyToken workspace { members { userId role } } } }",
            {"input": {"workspaceId": workspace_id, "userId": user_id, "role": role}},
        )["addMember"]


class Subscription:
    """One graphql-transport-ws operation on its own WebSocket connection."""

    def __init__(self, socket: ClientConnection, operation_id: str) -> None:
        self.socket = socket
        self.id = operation_id

    def next_message(self, timeout: float = 10.0) -> dict[str, Any]:
        """The next message for this operation (pings are answered on the way)."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no subscription message in time")
            message = json.loads(self.socket.recv(timeout=remaining))
            if message.get("type") == "ping":
                self.socket.send(json.dumps({"type": "pong"}))
                continue
            return dict(message)

    def next(self, timeout: float = 10.0) -> dict[str, Any]:
        """The payload of the next ``next`` message; fails on ``error`` or ``complete``."""
        message = self.next_message(timeout)
        if message.get("type") != "next":
            raise AssertionError(f"expected a 'next' message, got {message}")
        return dict(message["payload"])

    def complete(self) -> None:
        self.socket.send(json.dumps({"id": self.id, "type": "complete"}))


@contextmanager
def subscribe(
    ws_url: str,
    token: str | None,
    query: str,
    variables: dict[str, Any] | None = None,
    *,
    auth_in_payload: bool = True,
) -> Iterator[Subscription]:
    """Open a WebSocket, authenticate in ``connection_init``, start one subscription."""
    headers = {} if auth_in_payload or token is None else {"Authorization": f"Bearer {token}"}
    with connect(
        f"{ws_url}/graphql",
        subprotocols=[PROTOCOL],
        additional_headers=headers,
        open_timeout=10,
    ) as socket:
        payload = {"Authorization": f"Bearer {token}"} if auth_in_payload and token else {}
        socket.send(json.dumps({"type": "connection_init", "payload": payload}))
        ack = json.loads(socket.recv(timeout=10))
        if ack.get("type") != "connection_ack":
            raise AssertionError(f"connection refused: {ack}")
        socket.send(
            json.dumps(
                {
                    "id": "1",
                    "type": "subscribe",
                    "payload": {"query": query, "variables": variables or {}},
                }
            )
        )
        yield Subscription(socket, "1")


def first_change(
    sub: Subscription, make_change: Callable[[], object], *, attempts: int = 20
) -> dict[str, Any]:
    """Cause changes until the subscription reports one: graphql-transport-ws says nothing when a
    subscription has started on the server, so a change made right after subscribing may come
    before it listens."""
    for _ in range(attempts):
        make_change()
        try:
            return sub.next(timeout=1.0)
        except TimeoutError:
            continue
    raise AssertionError("the subscription never reported a change")


def wait_for(
    read: Callable[[], T],
    timeout: float = 10.0,
    *,
    until: Callable[[T], object] = bool,
    every: float = 0.05,
    what: str = "condition not met",
) -> T:
    """Call ``read`` until ``until`` holds for its answer, and return that answer: the read side
    catches up with a write asynchronously, so a client sees the write only after a while. Past
    ``timeout`` it fails, saying ``what`` it waited for and the last answer read."""
    deadline = time.monotonic() + timeout
    while True:
        value = read()
        if until(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout}s; last read: {value!r}")
        time.sleep(every)
