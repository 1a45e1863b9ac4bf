"""The whole stack in-process, as ``agentworks dev`` runs it, for tests that speak HTTP/WebSocket.

* the write side (``build_write_side``) on a migrated database;
* every projector from ``projections.registry`` fed by an ``EmbeddedFanout`` (LISTEN + polling),
  each runner's ``on_commit`` publishing to the API's broadcaster;
* the API (``read_api.app.create_app``) under uvicorn in a thread on a free port.

``StackBuilder.build(url, broadcaster="redis")`` puts subscriptions and rate limits on Redis
instead of in process; ``stack.token(...)`` signs JWTs the server accepts.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from api_client import ApiClient
from cryptography.fernet import Fernet
from identities import cheap_passwords
from in_process_api import broadcasting, serve_api, start_embedded_fanout
from psycopg.conninfo import make_conninfo
from users import user_id

from adapters.credentials import DeviceCookies, SecretBox, Totp
from adapters.oidc import OidcVerifier
from adapters.postgres import make_pool
from adapters.tokens import BOOTSTRAP_WORKSPACE, issue_token
from commands import models as m
from commands.handlers import Actor, AgentWorks
from commands.identity import Identity
from infra.bootstrap import build_write_side
from infra.identity import UserTokenIssuer
from infra.settings import JwtKeys
from read_api.oidc import OidcSignIn
from read_api.services import ApiServices, AuthSettings, RateLimits, RequestStats
from read_api.testing import RunningServer
from streams.embedded import EmbeddedFanout

MakeStack = Callable[..., "Stack"]

API_APPLICATION_NAME = "agentworks-api"
"""``application_name`` of the API pool's connections, to find them in ``pg_stat_activity``."""


@dataclass
class Stack:
    server: RunningServer
    write: AgentWorks
    fanout: EmbeddedFanout
    services: ApiServices
    secret: str
    database_url: str
    stats: list[RequestStats] = field(default_factory=list)
    clients: list[ApiClient] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def ws_url(self) -> str:
        return self.server.ws_url

    def token(self, user: str, workspace: UUID | str, role: str = "OWNER") -> str:
        return issue_token(
            user_id=user_id(user), workspace_id=str(workspace), role=role, ttl_seconds=3600,
            secret=self.secret,
        )  # fmt: skip

    def bootstrap_token(self, user: str) -> str:
        return self.token(user, BOOTSTRAP_WORKSPACE, "OWNER")

    def client(self, token: str | None) -> ApiClient:
        client = ApiClient(self.url, token)
        self.clients.append(client)
        return client

    def as_user(self, user: str, workspace: UUID | str, role: str = "OWNER") -> ApiClient:
        return self.client(self.token(user, workspace, role))

    def owner_with_workspace(
        self, user: str = "alice", name: str = "Acme"
    ) -> tuple[ApiClient, str]:
        """A workspace created through the API by ``user``, and that owner's client."""
        created = self.client(self.bootstrap_token(user)).create_workspace(name)
        workspace_id = created["workspace"]["id"]
        return self.as_user(user, workspace_id), workspace_id

    def begun_run(
        self, owner: ApiClient, workspace: str, title: str = "Card"
    ) -> tuple[str, str, str]:
        """A new one-lane project of ``workspace``, a card of it and a run of the card that the
        orchestrator (worker ``w1``, with :meth:`orchestrator`'s actor) has begun: their ids."""
        pid = owner.create_project(workspace, "P", [{"name": "Todo"}])["project"]["id"]
        card = owner.create_card(pid, title)["card"]["id"]
        run = owner.start_agent_run(card)["run"]["id"]
        self.write.begin_run(
            m.BeginRun(run_id=UUID(run), worker="w1"), self.orchestrator(workspace)
        )
        return pid, card, run

    def orchestrator(self, workspace: str) -> Actor:
        return Actor.service("orchestrator", UUID(workspace))


def auth_settings(
    write: AgentWorks, secret: str, namespace: str, *, access_token_ttl: int = 900, **fields: Any
) -> AuthSettings:
    """Sign-in as ``infra.identity.build_auth`` wires it, on this stack's secret (argon2id at the
    tests' cheap parameters: what the flows check does not depend on the hash's cost)."""
    identity = Identity(
        write,
        passwords=cheap_passwords(),
        totp=Totp(),
        sealer=SecretBox(Fernet.generate_key().decode()),
        access_tokens=UserTokenIssuer(JwtKeys(algorithm="HS256", secret=secret), access_token_ttl),
    )
    return AuthSettings(
        identity=identity, secure_cookie=False, key_prefix=f"{namespace}:auth",
        device_cookies=DeviceCookies(secret), **fields,
    )  # fmt: skip


class StackBuilder:
    """Builds stacks and takes them down again, last built first."""

    def __init__(self, redis_url: str) -> None:
        self.redis_url = redis_url
        self._built: list[tuple[Stack, list[Any]]] = []

    def build(
        self,
        database_url: str,
        *,
        broadcaster: str = "local",
        secret: str | None = None,
        auth: dict[str, Any] | None = None,
        oidc: dict[str, Any] | None = None,
        **overrides: Any,
    ) -> Stack:
        """``auth``: serve ``/auth/*`` (``AuthSettings`` fields besides ``identity``, plus
        ``access_token_ttl``); ``None``: no sign-in routes, as before identity existed."""
        secret = secret or secrets.token_urlsafe(48)
        write = build_write_side(database_url, pool_size=4)
        api_pool = make_pool(
            make_conninfo(database_url, application_name=API_APPLICATION_NAME),
            role="agentworks_api",
            max_size=10,
            name="api",
        )
        projector_pool = make_pool(
            database_url, role="agentworks_projector", max_size=4, name="projectors"
        )
        namespace = f"aw-test:{secrets.token_hex(6)}"
        hub, redis_client = broadcasting(
            self.redis_url if broadcaster == "redis" else None, channel_prefix=f"{namespace}:"
        )
        fanout = start_embedded_fanout(write, projector_pool, database_url, hub)
        stats: list[RequestStats] = []
        options: dict[str, Any] = {
            "rate_limits": RateLimits(
                per_user_per_minute=100_000,
                per_workspace_per_minute=100_000,
                per_address_per_minute=100_000,
                key_prefix=namespace,
            ),
            # Generous: projectors share the cluster-wide reader horizon with every other
            # database on this server (CREATE/DROP DATABASE of parallel test sessions).
            "consistency_wait_ms": 10_000,
            "stats_hook": stats.append,
            **overrides,
        }
        if auth is not None:
            options["auth"] = auth_settings(write, secret, namespace, **auth)
            if oidc is not None:  # OidcVerifier's arguments
                options["oidc"] = OidcSignIn(OidcVerifier(**oidc), options["auth"].identity)
        services, server = serve_api(
            write, api_pool, secret=secret, hub=hub, redis_client=redis_client, **options
        )
        stack = Stack(
            server=server, write=write, fanout=fanout, services=services, secret=secret,
            database_url=database_url, stats=stats,
        )  # fmt: skip
        self._built.append((stack, [api_pool, projector_pool]))
        return stack

    def close(self) -> None:
        while self._built:
            stack, pools = self._built.pop()
            for client in stack.clients:
                client.close()
            stack.fanout.stop()
            stack.server.stop()
            for pool in pools:
                pool.close(timeout=1)
            stack.write.close()
