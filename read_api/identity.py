"""``/auth/*``: what a single-page app needs to sign people in (API.md "Identity").

JSON in, JSON out, errors as ``{"error": {"code", "message"}}``. The refresh token is also set as
the ``aw_refresh`` cookie (HttpOnly, SameSite=Strict, path ``/auth``, Secure outside dev), so a
SPA need not keep it in script-readable storage; ``/auth/refresh`` and ``/auth/logout`` take it
from there when the body has none. Logins are limited per account and per client address; a
browser that signed in to the account before (its ``aw_device`` cookie) logs in on its own limit
instead of the account's, so that guessing an account's password does not lock its owner out.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any
from uuid import UUID

import structlog
from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from domain.errors import (
    AgentWorksError,
    Forbidden,
    RateLimited,
    Unauthenticated,
    Unavailable,
    UndecodableEvent,
    ValidationFailed,
)
from domain.text import storable_text, text_problem
from domain.user import email_to_find
from read_api.auth import authenticate, cookie_origin_allowed, request_id
from read_api.input_checks import BodyTooSlow, NotJson, body_within, closing, require_json
from read_api.ratelimit import Limit, client_network
from read_api.services import AuthSettings

if TYPE_CHECKING:
    from commands.identity import SessionGrant
    from read_api.runtime import ApiRuntime

log = structlog.get_logger(__name__)

REFRESH_COOKIE = "aw_refresh"
DEVICE_COOKIE = "aw_device"
DEVICE_COOKIE_SECONDS = 180 * 86400
"""How long a browser that signed in stays a known device of its account (each sign-in renews
it; see :class:`~adapters.credentials.DeviceCookies`)."""
_STATUS = {
    "VALIDATION": 400,
    "UNAUTHENTICATED": 401,
    "MFA_REQUIRED": 401,
    "FORBIDDEN": 403,
    "NOT_FOUND": 404,
    "DUPLICATE": 409,
    "CONFLICT": 409,
    "INVALID_TRANSITION": 409,
    "RATE_LIMITED": 429,
    "UNAVAILABLE": 503,
    "UNDECODABLE": 500,
}
#: What a client of these routes is told of a stored event that cannot be read: anyone may try
#: a login, so neither the account's id nor the event's (the server's log has them).
_UNDECODABLE_MESSAGE = (
    "a stored event this request needs cannot be read; an operator must repair it"
)
_MAX_BODY = 16_384


def add_auth_routes(app: FastAPI, runtime: ApiRuntime, auth: AuthSettings) -> None:
    routes = _AuthRoutes(runtime, auth)
    for path, handler in [
        ("/auth/signup", routes.signup),
        ("/auth/login", routes.login),
        ("/auth/refresh", routes.refresh),
        ("/auth/logout", routes.logout),
        ("/auth/mfa/enroll", routes.mfa_enroll),
        ("/auth/mfa/confirm", routes.mfa_confirm),
        ("/auth/mfa/disable", routes.mfa_disable),
        ("/auth/password", routes.change_password),
    ]:
        app.add_api_route(path, _answering(handler), methods=["POST"], include_in_schema=False)


def _answering(
    handler: Callable[[Request, str], Awaitable[Response]],
) -> Callable[[Request], Awaitable[Response]]:
    """Turns refusals into the ``{"error": ...}`` bodies of API.md; nothing else escapes."""

    async def endpoint(request: Request) -> Response:
        rid = request_id(request.headers.get("x-request-id"))
        with structlog.contextvars.bound_contextvars(request_id=rid):
            try:
                response = await handler(request, rid)
            except AgentWorksError as error:
                response = _error(error, rid)
            response.headers["X-Request-Id"] = rid
            response.headers["Cache-Control"] = "no-store"
            # An answer given before the body was read whole (a refused token, a body past its
            # size or time, a route that takes none) cannot leave the rest of it to arrive.
            read = getattr(request.state, "auth_body_read", False)  # set by _body
            response.headers.update(closing({}, request, read=read) or {})
            return response

    return endpoint


def _error(error: AgentWorksError, rid: str) -> Response:
    status = _STATUS.get(error.code, 400)
    headers: dict[str, str] = {}
    if isinstance(error, BodyTooSlow):
        status = 408
    if isinstance(error, NotJson):
        status = 415
    if isinstance(error, RateLimited | Unavailable):
        headers["Retry-After"] = str(max(1, round(error.retry_after_seconds)))
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="agentworks"'
    log.info("auth.refused", code=error.code, status=status)
    message = _UNDECODABLE_MESSAGE if isinstance(error, UndecodableEvent) else error.message
    body = {"error": {"code": error.code, "message": message}}
    return JSONResponse(body, status_code=status, headers=headers)


class _AuthRoutes:
    def __init__(self, runtime: ApiRuntime, auth: AuthSettings) -> None:
        self.runtime = runtime
        self.auth = auth
        self.identity = auth.identity
        self.body_seconds = runtime.services.request_body_timeout_seconds

    async def signup(self, request: Request, rid: str) -> Response:
        body = await _body(request, seconds=self.body_seconds)
        await self._limit_address(request)
        user_id = await self.runtime.offloader.run(
            lambda: self.identity.signup(
                email=_text(body, "email"),
                password=_text(body, "password"),
                name=_text(body, "name"),
                correlation_id=rid,
            )
        )
        return JSONResponse({"userId": str(user_id)}, status_code=201)

    async def login(self, request: Request, rid: str) -> Response:
        body = await _body(request, seconds=self.body_seconds)
        email, password = _text(body, "email"), _text(body, "password")
        totp = _optional_text(body, "totp")
        account = _login_account(email)
        device = self._known_device(request, account)
        counted, what = (
            (f"login-account:{account}", "account's logins")
            if device is None
            else (f"login-device:{device}", "device's logins")
        )
        await self._limit_guesses(request, counted, what, "address's logins")
        grant = await self.runtime.offloader.run(
            lambda: self.identity.login(
                email=email, password=password, totp=totp, correlation_id=rid
            )
        )
        response = self._session(grant)
        if self.auth.device_cookies is not None:
            response.set_cookie(
                DEVICE_COOKIE,
                self.auth.device_cookies.issue(account, device),
                max_age=DEVICE_COOKIE_SECONDS,
                path="/auth/login",
                secure=self.auth.secure_cookie,
                httponly=True,
                samesite="strict",
            )
        return response

    async def refresh(self, request: Request, rid: str) -> Response:
        token = await self._refresh_token(request)
        # Only a failed refresh counts against the address, but one past its limit is refused
        # before the session is looked for (or its counter made): a refused request costs
        # nothing more, as a login refused for its address does.
        await self.runtime.limiter.check(self._address_limit(request))
        try:
            # The session is read once: to count against its account, then to rotate.
            session = await self.runtime.offloader.run(lambda: self.identity.session_of(token))
            # Refreshes count per account at its sign-in rate: each one is a write, and counted
            # per session an account's writes grew with its sessions (a login makes one more).
            account = self._account_rate(
                f"refresh-account:{session.user_id}", "account's refreshes"
            )
            await self.runtime.limiter.check(account)
            grant = await self.runtime.offloader.run(
                lambda: self.identity.refresh(token, correlation_id=rid, session=session)
            )
        except Unauthenticated:
            await self._limit_address(request)
            raise
        # Counted once it rotated (a made-up secret naming a session spends nothing of its
        # account's), and never refused then: the old token is spent, the new one must go.
        with contextlib.suppress(RateLimited):
            await self.runtime.limiter.hit(account)
        return self._session(grant)

    async def logout(self, request: Request, rid: str) -> Response:
        try:
            token = await self._refresh_token(request)
        except Unauthenticated:
            token = None
        if token is not None:
            # As a refresh: an address past its limit is refused before the session is looked
            # for, and a token that is none of its session's counts against the address (each
            # made-up session id costs a read of the store).
            await self.runtime.limiter.check(self._address_limit(request))
            held = await self.runtime.offloader.run(
                lambda: self.identity.logout(token, correlation_id=rid)
            )
            if not held:
                await self._limit_address(request)
        response = Response(status_code=204)
        response.delete_cookie(
            REFRESH_COOKIE, path="/auth", secure=self.auth.secure_cookie, httponly=True,
            samesite="strict",
        )  # fmt: skip
        return response

    async def mfa_enroll(self, request: Request, rid: str) -> Response:
        user_id = await self._user(request)
        await self._limit_enrolment(user_id)
        secret, uri = await self.runtime.offloader.run(
            lambda: self.identity.mfa_enroll(user_id, correlation_id=rid)
        )
        return JSONResponse({"secret": secret, "otpauthUri": uri})

    async def mfa_confirm(self, request: Request, rid: str) -> Response:
        user_id = await self._user(request)
        code = _text(await _body(request, seconds=self.body_seconds), "code")
        await self._limit_enrolment(user_id)
        codes = await self.runtime.offloader.run(
            lambda: self.identity.mfa_confirm(user_id, code, correlation_id=rid)
        )
        return JSONResponse({"recoveryCodes": codes})

    async def mfa_disable(self, request: Request, rid: str) -> Response:
        user_id = await self._user(request)
        code = _text(await _body(request, seconds=self.body_seconds), "code")
        await self._limit_account(request, user_id)
        await self.runtime.offloader.run(
            lambda: self.identity.mfa_disable(user_id, code, correlation_id=rid)
        )
        return Response(status_code=204)

    async def change_password(self, request: Request, rid: str) -> Response:
        user_id = await self._user(request)
        body = await _body(request, seconds=self.body_seconds)
        current, new = _text(body, "currentPassword"), _text(body, "newPassword")
        await self._limit_account(request, user_id)
        await self.runtime.offloader.run(
            lambda: self.identity.change_password(
                user_id, current=current, new=new, correlation_id=rid
            )
        )
        return Response(status_code=204)

    # -- helpers ------------------------------------------------------------------------------

    def _session(self, grant: SessionGrant) -> Response:
        response = JSONResponse(grant.as_json())
        response.set_cookie(
            REFRESH_COOKIE,
            grant.refresh_token,
            max_age=self.auth.refresh_ttl_seconds,
            path="/auth",
            secure=self.auth.secure_cookie,
            httponly=True,
            samesite="strict",
        )
        return response

    async def _refresh_token(self, request: Request) -> str:
        body = await _body(request, seconds=self.body_seconds, optional=True)
        token = body.get("refreshToken")
        if token is None:
            token = request.cookies.get(REFRESH_COOKIE)
            services = self.runtime.services
            if token is not None and not cookie_origin_allowed(
                request.headers, allowed=services.cors_origins, pattern=services.cors_origin_regex
            ):
                # SameSite=Strict keeps other sites' requests from carrying the cookie, not a
                # sibling subdomain's page (same site) nor a browser ignoring the attribute; a
                # body-less POST asks no preflight.
                raise Forbidden(
                    f"the {REFRESH_COOKIE} cookie is taken only from this API's own origin or "
                    "one its CORS settings allow"
                )
        if not isinstance(token, str) or not token:
            raise Unauthenticated(f"send refreshToken in the body or the {REFRESH_COOKIE} cookie")
        if text_problem(token) is not None:
            raise Unauthenticated("refresh token is not valid")
        return token

    async def _user(self, request: Request) -> UUID:
        try:
            principal = authenticate(
                request.headers.get("authorization"), self.runtime.services.jwt
            )
        except Unauthenticated:
            await self._limit_address(request)
            raise
        if not principal.is_user:
            raise Forbidden("this needs a user token (from /auth/login)")
        try:
            return UUID(principal.user_id)
        except ValueError:
            raise Forbidden("this token's user has no account here") from None

    def _known_device(self, request: Request, account: str) -> str | None:
        """The device id of the request's device cookie, when it is one issued to a browser
        that signed in to ``account`` before."""
        cookies = self.auth.device_cookies
        if cookies is None:
            return None
        return cookies.device_of(request.cookies.get(DEVICE_COOKIE), account)

    async def _limit_account(self, request: Request, user_id: UUID) -> None:
        """A password or TOTP code checked outside a login (changing the password, turning MFA
        off) counts like a login attempt of that account and address: otherwise a holder of an
        access token could guess there past the login limits."""
        await self._limit_guesses(
            request,
            f"secret-checks:{user_id}",
            "account's password and code checks",
            "address's sign-in attempts",
        )

    async def _limit_guesses(
        self, request: Request, account_key: str, per_account: str, per_address: str
    ) -> None:
        """Count a guess of a secret against the client's address and then its account
        (``account_key``), at the login limits; ``per_…`` name them in a refusal.

        The address first: a request it refuses counts nothing further, so an address past its
        limit adds no key to the limiter's store however many accounts it names (the account
        first, each request naming a new one added a key, refused or not)."""
        limits = self._address_limit(request, per_address)
        if self.auth.login_per_account_per_minute is not None:
            limits.append(
                Limit(
                    f"{self.auth.key_prefix}:{account_key}",
                    self.auth.login_per_account_per_minute,
                    per_account,
                )
            )
        await self.runtime.limiter.hit(limits)

    async def _limit_enrolment(self, user_id: UUID) -> None:
        """Enrolling and confirming MFA count at the account's sign-in rate: each enrolment is
        a write, and anyone may sign up for a user token (a client needs one or two)."""
        limit = self._account_rate(f"mfa-enrolment:{user_id}", "account's MFA enrolments")
        await self.runtime.limiter.hit(limit)

    def _account_rate(self, key: str, what: str) -> list[Limit]:
        most = self.auth.login_per_account_per_minute
        return [] if most is None else [Limit(f"{self.auth.key_prefix}:{key}", most, what)]

    async def _limit_address(self, request: Request) -> None:
        await self.runtime.limiter.hit(self._address_limit(request))

    def _address_limit(
        self, request: Request, what: str = "address's sign-in attempts"
    ) -> list[Limit]:
        """The limit of the client address's sign-in attempts (none when not configured)."""
        most = self.auth.login_per_address_per_minute
        if most is None:
            return []
        return [Limit(f"{self.auth.key_prefix}:login-address:{_address(request)}", most, what)]


def _login_account(email: str) -> str:
    """The account a login names, as its limits and device cookies key it: a digest, for the
    email is whatever the body held, up to its 16 KB, and a key as long would sit in the
    limiter's store for a minute per request."""
    try:
        account = email_to_find(email)
    except ValidationFailed:
        account = email.strip().casefold()
    return hashlib.blake2b(account.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def _address(request: Request) -> str:
    return client_network(request.client.host if request.client is not None else None)


async def _body(request: Request, *, seconds: float, optional: bool = False) -> dict[str, Any]:
    """The JSON object of the body, read for at most ``seconds``."""
    raw = await body_within(request, _MAX_BODY, seconds=seconds)  # anyone may send it
    if raw is None:
        raise ValidationFailed(f"request body is larger than {_MAX_BODY} bytes")
    request.state.auth_body_read = True
    if not raw.strip():
        if optional:
            return {}
        raise ValidationFailed("send a JSON object body")
    require_json(request.headers.get("content-type"))
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: arrays nested thousands deep
        raise ValidationFailed("request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ValidationFailed("request body must be a JSON object")
    return body


def _text(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str):
        raise ValidationFailed(f"{name} is required and must be a string")
    # A lone surrogate (a JSON \\ud800 escape) has no UTF-8 form to hash or look up.
    return storable_text(value, what=name)


def _optional_text(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValidationFailed(f"{name} must be a string")
    return storable_text(value, what=name)
