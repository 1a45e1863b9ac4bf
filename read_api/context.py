"""The per-request (or per-WebSocket-connection) context every resolver receives."""

from __future__ import annotations

import contextvars
import copy
import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ParamSpec, TypeAlias, TypeVar
from uuid import UUID

import strawberry
from graphql import GraphQLError
from strawberry.fastapi import BaseContext

from adapters.telemetry import current_traceparent
from commands.access import api_key_revoked
from commands.handlers import Actor
from domain.errors import AgentWorksError, NotFound, Unauthenticated, Unavailable
from read_api.auth import workspace_uuid
from read_api.db import ReadScope, StatementCounter
from read_api.membership import member_workspace_of

if TYPE_CHECKING:
    from adapters.tokens import Principal
    from read_api.limits import Estimate
    from read_api.runtime import ApiRuntime

T = TypeVar("T")
P = ParamSpec("P")


@dataclass(frozen=True)
class Caller:
    """The authenticated caller and where the request came from."""

    principal: Principal
    request_id: str
    traceparent: str

    @property
    def workspace_id(self) -> UUID | None:
        return workspace_uuid(self.principal)

    def actor(self, *, traceparent: str | None = None) -> Actor:
        """The caller as a command's actor; ``traceparent`` (default: the request's) is the span
        its command span continues."""
        return Actor(
            user_id=self.principal.user_id,
            workspace_id=self.principal.workspace_id,
            role=self.principal.role,
            api_key_id=self.principal.api_key_id,
            correlation_id=self.request_id,
            traceparent=traceparent or self.traceparent,
        )


class RequestContext(BaseContext):
    """Resolvers' view of the request: who calls, the services, and read scopes.

    An HTTP request keeps its read scopes (and their DataLoaders) until it ends. A WebSocket
    connection has no long-lived scope: each subscription event reads in a fresh one
    (:meth:`fresh_scope`), so nothing is cached across events, and no connection is held
    between reads.
    """

    def __init__(
        self,
        runtime: ApiRuntime,
        *,
        request_id: str,
        traceparent: str,
        websocket: bool = False,
    ) -> None:
        super().__init__()
        self.runtime = runtime
        self.websocket = websocket
        """True for a WebSocket connection, which only carries subscriptions."""
        self.request_id = request_id
        self.traceparent = traceparent
        self.caller: Caller | None = None
        self.stale = False
        self.counter = StatementCounter()
        self.executed = 0
        """What the request's operation executed, as :mod:`read_api.execution` counts it: what
        it is charged against its caller's budgets (:mod:`read_api.ratelimit`)."""
        self.refusal: AgentWorksError | None = None
        """Why a WebSocket's ``connection_init`` was refused, for its close to say."""
        self._scopes: dict[UUID, ReadScope] = {}
        self._granted: set[UUID] = set()
        self._pinned: UUID | None = None
        """Where a user token's subscription reads (see :meth:`for_object`)."""
        self.disconnect: Callable[[], None] | None = None
        """On an accepted WebSocket: gives back its place among its user's open connections."""
        self._allowed_at = float("-inf")
        """When :meth:`still_allowed` last found the credentials holding (monotonic clock)."""
        self.list_lengths: dict[str, int] = {}
        """The longest of each list without pages read so far, by field name, for the cost
        estimate (:func:`read_api.limits.refuse_longer_than_estimated`)."""
        self.list_estimates: dict[tuple[tuple[str, int], ...], Estimate] = {}
        """The document's estimate for each set of :attr:`list_lengths` met in the request."""
        self.reported: list[GraphQLError] = []
        """Errors beside the data (see :meth:`report`), added to the answer's ``errors``."""

    def report(self, error: AgentWorksError, path: Sequence[str | int]) -> None:
        """Answer with ``error`` at ``path`` in ``errors`` and still with the data: for a part
        of an answer that is there but could not be read whole, where no field can say so
        (:class:`~read_api.errors.ErrorShaping` adds it, shaped like any of our errors)."""
        self.reported.append(GraphQLError(error.message, path=list(path), original_error=error))

    # -- who is calling ------------------------------------------------------------------------

    def authenticate(self, principal: Principal) -> None:
        self.caller = Caller(principal, self.request_id, self.traceparent)

    @property
    def who(self) -> Caller:
        if self.caller is None:
            raise Unauthenticated("missing bearer token")
        return self.caller

    def actor(self) -> Actor:
        """The caller as a command's actor, in the trace of the span active here (the request's,
        or one opened below it), so the command and its events join the request's trace."""
        return self.who.actor(traceparent=current_traceparent() or None)

    # -- reading -------------------------------------------------------------------------------

    def home_scope(self) -> ReadScope | None:
        """The scope of the token's workspace; ``None`` for a bootstrap token."""
        workspace_id = self.who.workspace_id
        return None if workspace_id is None else self.scope(workspace_id)

    async def for_object(self, aggregate_id: UUID) -> RequestContext:
        """This context; for a user token, a copy whose fresh scopes read the workspace that
        holds ``aggregate_id`` (a subscription's project or run) when the user is a member."""
        if not self.who.principal.is_user:
            return self
        workspace_id = await self.runtime.offloader.run(
            member_workspace_of, self.runtime.services.write, aggregate_id,
            self.who.principal.user_id,
        )  # fmt: skip
        pinned = copy.copy(self)
        pinned._pinned = workspace_id
        return pinned

    async def still_allowed(self) -> None:
        """For a subscription, before it sends more: raise when what let it start no longer
        holds (its token expired, or the API key that opened it was revoked or its creator
        removed since it was made: UNAUTHENTICATED; the caller is no longer a member of the
        workspace: NOT_FOUND). Asked at most once per
        ``subscription_recheck_seconds``: a revocation or removal ends a subscription within
        that time, however busy it is."""
        if time.monotonic() - self._allowed_at < self.runtime.services.subscription_recheck_seconds:
            return
        expires_at = self.who.principal.expires_at
        leeway = self.runtime.services.jwt.leeway_seconds
        if expires_at is not None and time.time() >= expires_at + leeway:
            raise Unauthenticated("token has expired")
        key_id = self.who.principal.api_key_id
        if key_id is not None and await self.runtime.offloader.run(
            api_key_revoked, self.runtime.services.write, key_id
        ):
            raise Unauthenticated(
                f"API key {key_id} was revoked, or outlived its creator's membership"
            )
        scope = self.fresh_scope()
        try:
            member = await scope.is_member()
        finally:
            await scope.close()
        if not member:
            raise NotFound(f"workspace {scope.workspace_id} does not exist")
        self._allowed_at = time.monotonic()
        # A subscription opened with an API key goes on using it as long as it delivers.
        self.runtime.key_uses.used(self.who.principal)

    async def scope_of(self, aggregate_id: UUID) -> ReadScope | None:
        """The home scope; for a user token (no home), the scope of the workspace that holds
        ``aggregate_id`` when the user is a member there, else ``None``."""
        if not self.who.principal.is_user:
            return self.home_scope()
        workspace_id = await self.runtime.offloader.run(
            member_workspace_of, self.runtime.services.write, aggregate_id,
            self.who.principal.user_id,
        )  # fmt: skip
        return None if workspace_id is None else self.scope(workspace_id)

    async def member_scope_of(self, aggregate_id: UUID) -> ReadScope | None:
        """:meth:`scope_of`, ``None`` too when the caller is not (or no longer) a member of its
        workspace: what a read of one object by its id starts with."""
        scope = await self.scope_of(aggregate_id)
        if scope is None or not await scope.is_member():
            return None
        return scope

    def scope_for(self, workspace_id: UUID) -> ReadScope:
        """The scope of ``workspace_id`` if the caller may read it, else :class:`NotFound`."""
        if (
            workspace_id != self.who.workspace_id
            and workspace_id not in self._granted
            and not self.who.principal.is_user  # a user token reads where it is a member
        ):
            raise NotFound(f"workspace {workspace_id} does not exist")
        return self.scope(workspace_id)

    def grant(self, workspace_id: UUID) -> None:
        """Let this request read a workspace it just created (the token predates it)."""
        self._granted.add(workspace_id)

    def scope(self, workspace_id: UUID) -> ReadScope:
        scope = self._scopes.get(workspace_id)
        if scope is None:
            scope = self.fresh_scope(workspace_id)
            self._scopes[workspace_id] = scope
        return scope

    async def read_model_version(self) -> str | None:
        """Open the home scope, reading the read models' version in its first statement (what
        ``read_api.response_cache`` keys answers on); ``None`` without a home workspace, when
        the caller is no member there, or when the database cannot say: the request then runs
        as it would without a cache, and answers (or fails) exactly as it always did."""
        workspace_id = self.who.workspace_id
        if workspace_id is None or workspace_id in self._scopes:
            return None
        scope = self.fresh_scope(workspace_id, versioned=True)
        self._scopes[workspace_id] = scope
        try:
            if not await scope.is_member():
                return None
        except Unavailable:
            return None
        return scope.version

    def fresh_scope(
        self, workspace_id: UUID | None = None, *, versioned: bool = False
    ) -> ReadScope:
        """A new scope the caller closes itself (subscriptions: one per event).

        On a WebSocket the scope holds a connection only while it reads (see ``read_api.db``).
        """
        target = self.who.workspace_id if workspace_id is None else workspace_id
        target = target or self._pinned
        if target is None:
            raise NotFound("a bootstrap token sees no workspace; create one first")
        runtime = self.runtime
        return ReadScope(
            pool=runtime.services.pool,
            offloader=runtime.offloader,
            workspace_id=target,
            user_id=self.who.principal.user_id,
            counter=self.counter,
            statement_timeout_ms=runtime.services.statement_timeout_ms,
            keep_connection=not self.websocket,
            gate=runtime.subscription_reads if self.websocket else None,
            versioned=versioned,
        )

    async def close(self) -> None:
        scopes, self._scopes = list(self._scopes.values()), {}
        for scope in scopes:
            await scope.close()

    # -- blocking work -------------------------------------------------------------------------

    async def offload(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``fn`` on a worker thread, in a copy of this request's context: the active span
        and the log fields bound to the request (``request_id``…) follow it there."""
        context = contextvars.copy_context()
        return await self.runtime.offloader.run(context.run, functools.partial(fn, *args, **kwargs))


Info: TypeAlias = strawberry.Info[RequestContext, None]
"""What resolvers declare as their ``info`` parameter."""
