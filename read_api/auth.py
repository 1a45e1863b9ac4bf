"""Who is calling: bearer tokens, request ids and trace context from request headers."""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from dataclasses import replace
from typing import Any
from uuid import UUID

from strawberry.http.websocket_origin import is_same_origin

from adapters.tokens import BOOTSTRAP_WORKSPACE, BadSignature, Principal, verify_token
from domain.errors import Unauthenticated
from read_api.services import JwtVerification

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}", re.ASCII)
_TRACEPARENT = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}", re.ASCII)


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` value; ``None`` when absent."""
    if authorization is None or not authorization.strip():
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("Authorization must be 'Bearer <token>'")
    if not token.isascii():
        # JWTs and API keys are ASCII; a WebSocket's connection_init (JSON) can carry a lone
        # surrogate, which checking the token would fail to encode.
        raise Unauthenticated("malformed token: a bearer token is ASCII text")
    return token.strip()


def authenticate(authorization: str | None, jwt: JwtVerification) -> Principal:
    """Verify the bearer token and check its workspace claim names a workspace (or ``*``)."""
    token = bearer_token(authorization)
    if token is None:
        raise Unauthenticated("missing bearer token: send 'Authorization: Bearer <JWT>'")
    try:
        principal = verify_token(
            token, secret=jwt.secret, public_key=jwt.public_key, leeway_seconds=jwt.leeway_seconds
        )
    except BadSignature as exc:
        if jwt.signature_hint is None:
            raise
        raise Unauthenticated(f"{exc}: {jwt.signature_hint}") from exc
    if not principal.is_bootstrap and not principal.is_user:
        try:
            UUID(principal.workspace_id)
        except ValueError:
            raise Unauthenticated("token 'ws' claim is neither a workspace id nor '*'") from None
    # The user id becomes the actor of every event the caller causes and is what addMember and
    # assignCard name, so it is a UUID like every id of the API, in one canonical spelling.
    try:
        user_id = str(UUID(principal.user_id))
    except ValueError:
        raise Unauthenticated("token 'sub' claim is not a user id (a UUID)") from None
    return replace(principal, user_id=user_id)


def cookie_origin_allowed(
    headers: Mapping[str, str], *, allowed: tuple[str, ...], pattern: str | None
) -> bool:
    """Whether a request with these headers may act by the API's cookies: it names no
    ``Origin`` (no browser sent it), or the API's own (host and port, as a WebSocket's is
    judged), or one CORS lets call with credentials (``allowed``, ``pattern``: the same
    settings, compared as the CORS middleware compares them)."""
    origin = headers.get("origin")
    if origin is None or headers.get("sec-fetch-site") == "same-origin":
        return True
    if is_same_origin(origin, headers.get("host")) or origin in allowed:
        return True
    return pattern is not None and re.fullmatch(pattern, origin) is not None


def token_from_connection_params(params: Mapping[str, Any] | None) -> str | None:
    """An ``Authorization`` value from a graphql-transport-ws ``connection_init`` payload.

    Browsers cannot set headers on a WebSocket handshake, so clients put the token in the
    payload: ``{"Authorization": "Bearer <JWT>"}`` (any case) or ``{"token": "<JWT>"}``.
    """
    if not params:
        return None
    for key, value in params.items():
        if isinstance(value, str) and key.lower() == "authorization":
            return value
    token = params.get("token")
    if isinstance(token, str) and token:
        return f"Bearer {token}"
    return None


def workspace_uuid(principal: Principal) -> UUID | None:
    """The token's workspace; ``None`` for a bootstrap or a user token."""
    if principal.workspace_id == BOOTSTRAP_WORKSPACE or principal.is_user:
        return None
    return UUID(principal.workspace_id)


def request_id(incoming: str | None) -> str:
    """The caller's ``X-Request-Id`` when it is a sane token, else a fresh one."""
    if incoming and _REQUEST_ID.fullmatch(incoming):
        return incoming
    return uuid.uuid4().hex


def traceparent(incoming: str | None) -> str:
    """A W3C ``traceparent`` worth propagating into event metadata, else ``""``."""
    if incoming and _TRACEPARENT.fullmatch(incoming.strip().lower()):
        return incoming.strip().lower()
    return ""
