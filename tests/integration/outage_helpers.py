"""The API stack and a load of writers, for tests (and ``bench/recovery.py``) that take the
database away under it.

* :func:`start_api_stack`: the write side, the API (uvicorn in a thread) and the embedded fan-out
  on one database, with short pool and settle timeouts as an operator would set them;
* :class:`Writers`: client threads creating cards over HTTP at a bounded rate, some sending a
  ``commandId`` and some not, each answer classified as done, failed (UNAVAILABLE, nothing
  written), unknown (UNAVAILABLE, outcome unknown, with the commandId to retry with) or other
  (anything else: a bug);
* :func:`card_titles_in_log`: what the event log holds, to hold the answers to.

No pytest in here.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID, uuid4

import httpx
import psycopg
from in_process_api import broadcasting, serve_api, start_embedded_fanout
from users import user_id

from adapters.postgres import make_pool
from adapters.tokens import BOOTSTRAP_WORKSPACE, issue_token
from commands.handlers import AgentWorks
from infra.bootstrap import build_write_side
from read_api.services import ApiServices, RateLimits
from read_api.testing import RunningServer
from streams.embedded import EmbeddedFanout

CREATE_CARD = """mutation($input: CreateCardInput!) {
  createCard(input: $input) { consistencyToken } }"""


@dataclass
class ApiStack:
    database_url: str
    write: AgentWorks
    services: ApiServices
    fanout: EmbeddedFanout | None
    server: RunningServer
    secret: str
    pools: list[Any]

    @property
    def url(self) -> str:
        return self.server.url

    def token(self, user: str, workspace: str, role: str = "OWNER") -> str:
        return issue_token(
            user_id=user_id(user),
            workspace_id=workspace,
            role=role,
            ttl_seconds=3600,
            secret=self.secret,
        )

    def post(
        self, token: str, query: str, variables: dict[str, Any] | None = None
    ) -> httpx.Response:
        return httpx.post(
            f"{self.url}/graphql",
            json={"query": query, "variables": variables or {}},
            headers={"Authorization": f"Bearer {token}"},
            timeout=60,
        )

    def boards(self, count: int, owner: str = "alice") -> tuple[str, list[str]]:
        """A new workspace with ``count`` projects, created over HTTP: (owner's token, project
        ids). Writers on one board contend for it (a card is saved with its board)."""
        created = self.post(
            self.token(owner, BOOTSTRAP_WORKSPACE),
            'mutation { createWorkspace(input: {name: "Outage"}) { consistencyToken } }',
        ).json()
        workspace_id = created["data"]["createWorkspace"]["consistencyToken"].split(":")[1]
        token = self.token(owner, workspace_id)
        projects = []
        for _ in range(count):
            project = self.post(
                token,
                'mutation($w: ID!) { createProject(input: {workspaceId: $w, name: "P"})'
                " { consistencyToken } }",
                {"w": workspace_id},
            ).json()
            projects.append(project["data"]["createProject"]["consistencyToken"].split(":")[1])
        return token, projects

    def close(self) -> None:
        if self.fanout is not None:
            self.fanout.stop()
        self.server.stop()
        for pool in self.pools:
            pool.close(timeout=1)
        self.write.close()


def start_api_stack(
    database_url: str,
    *,
    pool_timeout: float = 1.0,
    settle_seconds: float = 5.0,
    api_pool_size: int = 4,
    write_pool_size: int = 4,
    fanout: bool = True,
    redis_url: str | None = None,
) -> ApiStack:
    secret = secrets.token_urlsafe(48)
    write = build_write_side(
        database_url,
        pool_size=write_pool_size,
        pool_timeout=pool_timeout,
        settle_seconds=settle_seconds,
    )
    api_pool = make_pool(
        database_url, role="agentworks_api", max_size=api_pool_size, name="api",
        timeout=pool_timeout,
    )  # fmt: skip
    pools: list[Any] = [api_pool]
    hub, redis_client = broadcasting(redis_url)
    limits = RateLimits(per_user_per_minute=None, per_workspace_per_minute=None)
    if redis_url is not None:
        limits = RateLimits(per_user_per_minute=1_000_000, per_workspace_per_minute=None)
    embedded = None
    if fanout:
        projector_pool = make_pool(
            database_url, role="agentworks_projector", max_size=2, name="projectors",
            timeout=pool_timeout,
        )  # fmt: skip
        pools.append(projector_pool)
        embedded = start_embedded_fanout(write, projector_pool, database_url, hub)
    services, server = serve_api(
        write,
        api_pool,
        secret=secret,
        hub=hub,
        redis_client=redis_client,
        rate_limits=limits,
        consistency_wait_ms=200,
    )
    return ApiStack(database_url, write, services, embedded, server, secret, pools)


# -- writers under load ---------------------------------------------------------------------------


@dataclass
class Answer:
    title: str
    command_id: str | None
    """The commandId the client sent (None: it sent none)."""
    kind: str
    """done, failed, unknown or other."""
    sent_at: float
    answered_at: float
    card_id: str | None = None
    position: int = 0
    """For ``done``: where the write landed in the log."""
    retry_id: str | None = None
    """For ``unknown``: the commandId the answer said to retry with."""
    detail: str = ""


def classify(title: str, command_id: str | None, response: httpx.Response, sent: float) -> Answer:
    now = time.monotonic()
    try:
        body = response.json()
    except json.JSONDecodeError:
        return Answer(title, command_id, "other", sent, now, detail=response.text[:200])
    data = (body.get("data") or {}).get("createCard")
    if response.status_code == 200 and data and not body.get("errors"):
        position, card_id, _ = data["consistencyToken"].split(":")
        return Answer(title, command_id, "done", sent, now, card_id=card_id, position=int(position))
    errors = body.get("errors") or []
    extensions = errors[0].get("extensions", {}) if errors else {}
    if (
        response.status_code == 503
        and extensions.get("code") == "UNAVAILABLE"
        and response.headers.get("retry-after")
    ):
        if extensions.get("outcome") == "unknown":
            return Answer(
                title, command_id, "unknown", sent, now, retry_id=extensions.get("commandId")
            )
        return Answer(title, command_id, "failed", sent, now)
    return Answer(
        title, command_id, "other", sent, now, detail=f"{response.status_code} {body}"[:300]
    )


@dataclass
class Writers:
    """One thread per project creating cards on it, one request every ``interval`` each; the
    first ``with_ids`` of them send a ``commandId``."""

    stack: ApiStack
    token: str
    project_ids: list[str]
    with_ids: int = 2
    interval: float = 0.02
    answers: list[Answer] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        for n in range(len(self.project_ids)):
            thread = threading.Thread(target=self._run, args=(n,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=120)

    def counts(self) -> Counter[str]:
        with self._lock:
            return Counter(answer.kind for answer in self.answers)

    def since(self, index: int) -> list[Answer]:
        """The answers from the ``index``-th on, as they stand now."""
        with self._lock:
            return self.answers[index:]

    def first_done_after(self, instant: float) -> float | None:
        with self._lock:
            sent = [a.sent_at for a in self.answers if a.kind == "done" and a.sent_at >= instant]
        return min(sent) if sent else None

    def _run(self, n: int) -> None:
        with httpx.Client(base_url=self.stack.url, timeout=60) as client:
            i = 0
            while not self._stop.is_set():
                title = f"w{n}-{i}-{uuid4().hex[:6]}"
                command_id = str(uuid4()) if n < self.with_ids else None
                answer = self.send(client, self.project_ids[n], title, command_id)
                with self._lock:
                    self.answers.append(answer)
                i += 1
                self._stop.wait(self.interval)

    def send(
        self, client: httpx.Client, project_id: str, title: str, command_id: str | None
    ) -> Answer:
        card: dict[str, Any] = {"projectId": project_id, "title": title}
        if command_id is not None:
            card["commandId"] = command_id
        sent = time.monotonic()
        try:
            response = client.post(
                "/graphql",
                json={"query": CREATE_CARD, "variables": {"input": card}},
                headers={"Authorization": f"Bearer {self.token}"},
            )
        except httpx.HTTPError as error:
            return Answer(title, command_id, "other", sent, time.monotonic(), detail=repr(error))
        return classify(title, command_id, response, sent)

    def resolve_unknowns(self) -> list[Answer]:
        """Retry every ``unknown`` with the commandId it was given; returns the new answers."""
        resolved = []
        with httpx.Client(base_url=self.stack.url, timeout=60) as client:
            for answer in [a for a in self.answers if a.kind == "unknown"]:
                project_id = self.project_ids[int(answer.title[1:].split("-")[0])]
                resolved.append(self.send(client, project_id, answer.title, answer.retry_id))
        return resolved


def _cards_created_in_log(database_url: str) -> list[tuple[str, UUID]]:
    """(title, card id) of every ``Card.Created`` event in the log."""
    with contextlib.closing(psycopg.connect(database_url)) as conn:
        rows = conn.execute(
            "SELECT convert_from(state, 'UTF8')::jsonb ->> 'title', originator_id "
            "FROM agentworks_events WHERE topic LIKE %s",
            ("%Card.Created",),
        ).fetchall()
    return [(str(title), originator_id) for title, originator_id in rows]


def card_titles_in_log(database_url: str) -> Counter[str]:
    """How many times each card title was created, according to the event log."""
    return Counter(title for title, _ in _cards_created_in_log(database_url))


def card_ids_in_log(database_url: str) -> dict[str, UUID]:
    """Title → the id of the card created with it (titles are unique in these tests)."""
    return dict(_cards_created_in_log(database_url))
