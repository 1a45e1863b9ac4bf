"""Bearer tokens from an external OpenID Connect provider, checked against its JWKS.

Keys come from ``jwks_url``, or from the ``jwks_uri`` of the issuer's discovery document
(``{issuer}/.well-known/openid-configuration``), fetched on first use. The key set is kept
``keys_lifespan_seconds`` and fetched again when a token names a ``kid`` it does not hold (key
rotation), at most once per ``refresh_cooldown_seconds`` so a flood of forged ``kid``s cannot
turn into a flood of requests to the provider.

The provider is trusted for its keys, not for how it answers: a fetch is given
``timeout_seconds`` in all (not per read: a provider sending a byte now and then held the
request, and every sign-in queued behind it, for as long as it went on) and at most
:data:`MAX_DOCUMENT_BYTES`; an answer that is no key set is UNAVAILABLE, as an unreachable
provider is, never an error nobody expected. A failed fetch is the answer until the cooldown
has passed, and the keys of the last good fetch verify meanwhile.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import jwt

from adapters.tokens import expiry_of, refused
from domain.errors import Unauthenticated, Unavailable

ALGORITHMS = ("RS256", "ES256")
#: The most a discovery document or key set may hold (a provider's are a few KB).
MAX_DOCUMENT_BYTES = 512 * 1024
#: How far ahead of ours a provider's clock may run: a token's ``iat`` and ``nbf`` may be this
#: far in our future (a token it just issued is used at once). ``exp`` keeps no such margin:
#: a token ends when its provider said.
CLOCK_SKEW_SECONDS = 60


@dataclass(frozen=True)
class ExternalIdentity:
    """Who the provider says signed in."""

    issuer: str
    subject: str
    email: str | None
    email_verified: bool
    name: str | None
    expires_at: float | None = None
    """The token's ``exp``, seconds since the epoch."""


@dataclass(kw_only=True, eq=False)
class OidcVerifier:
    """Checks bearer tokens that ``issuer`` signed for ``audience``; shared by every request."""

    issuer: str
    audience: str
    jwks_url: str | None = None
    leeway_seconds: int = 0
    refresh_cooldown_seconds: float = 5.0
    timeout_seconds: float = 5.0
    keys_lifespan_seconds: float = 3600.0
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)
    _keys: dict[str, jwt.PyJWK] = field(init=False, default_factory=dict, repr=False)
    _fetched_at: float | None = field(init=False, default=None, repr=False)
    _failed: tuple[float, str] | None = field(init=False, default=None, repr=False)
    """When the last fetch failed, and why (cleared by a good one)."""
    _jwks_uri: str | None = field(init=False, default=None, repr=False)
    _lock: threading.Lock = field(init=False, default_factory=threading.Lock, repr=False)

    def issued_here(self, token: str) -> bool:
        """Whether ``token`` claims this provider as its issuer (not yet verified)."""
        try:
            claims = jwt.decode(token, options={"verify_signature": False})
        except jwt.exceptions.InvalidTokenError:
            return False
        return isinstance(claims, dict) and claims.get("iss") == self.issuer

    def verify(self, token: str) -> ExternalIdentity:
        """Check signature (RS256/ES256 only), ``iss``, ``aud`` and ``exp``; blocking (may fetch
        the key set)."""
        try:
            kid = jwt.get_unverified_header(token).get("kid")
        except jwt.exceptions.InvalidTokenError as exc:  # malformed, a kid no string, crit
            raise Unauthenticated(f"token is not signed by a key of {self.issuer}") from exc
        key = self._signing_key(kid) if isinstance(kid, str) else None
        if key is None:
            raise Unauthenticated(f"token is not signed by a key of {self.issuer}")
        # Only the algorithm of the key the ``kid`` picks: a header naming another (ES256 with
        # an RSA key) is a forged token, and PyJWT answers that mismatch with a TypeError.
        algorithm = key.algorithm_name
        if algorithm not in ALGORITHMS:
            raise Unauthenticated(f"token is not signed with {' or '.join(ALGORITHMS)}")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key.key,
                algorithms=[algorithm],
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway_seconds,
                # iat and nbf below, with the provider's clock allowed to run a little ahead.
                options={
                    "require": ["sub", "exp", "iss", "aud"],
                    "verify_iat": False,
                    "verify_nbf": False,
                },
            )
        except jwt.exceptions.InvalidTokenError as exc:
            raise refused(exc, algorithms=" or ".join(ALGORITHMS)) from exc
        _check_begun(claims, now=time.time() + self.leeway_seconds + CLOCK_SKEW_SECONDS)
        subject = claims["sub"]
        if not isinstance(subject, str) or not subject:
            raise Unauthenticated("token 'sub' claim must be a non-empty string")
        email = claims.get("email")
        name = claims.get("name")
        return ExternalIdentity(
            issuer=self.issuer,
            subject=subject,
            email=email if isinstance(email, str) else None,
            email_verified=_verified(claims.get("email_verified")),
            name=name if isinstance(name, str) else None,
            expires_at=expiry_of(claims),
        )

    def _signing_key(self, kid: str) -> jwt.PyJWK | None:
        """The provider's key ``kid``; ``None`` when its key set has none. UNAVAILABLE when the
        key set is needed and cannot be fetched."""
        with self._lock:
            now = self.clock()
            age = None if self._fetched_at is None else now - self._fetched_at
            failure = None
            if (
                age is None
                or age >= self.keys_lifespan_seconds
                or (kid not in self._keys and age >= self.refresh_cooldown_seconds)
            ):
                failure = self._refresh(now)
            key = self._keys.get(kid)
        if key is None and failure is not None:
            raise Unavailable(failure, retry_after_seconds=max(1.0, self.refresh_cooldown_seconds))
        return key

    def _refresh(self, now: float) -> str | None:
        """Fetch the key set again (under the lock), unless a fetch failed less than the
        cooldown ago; why it failed, or ``None``. The keys of the last good fetch stay."""
        if self._failed is not None and now - self._failed[0] < self.refresh_cooldown_seconds:
            return self._failed[1]
        try:
            self._keys = _signing_keys(self._fetch_json(self._jwks_location()))
        except Unavailable as error:
            self._failed = (now, error.message)
            return error.message
        self._fetched_at, self._failed = now, None
        return None

    def _jwks_location(self) -> str:
        if self.jwks_url is not None:
            return self.jwks_url
        if self._jwks_uri is None:
            url = self.issuer.rstrip("/") + "/.well-known/openid-configuration"
            document = self._fetch_json(url)
            if not isinstance(document, dict) or document.get("issuer") != self.issuer:
                # OpenID Connect Discovery 1.0, 4.3: whatever answered at that address is not
                # the issuer's own document, and its jwks_uri is not to be followed.
                named = document.get("issuer") if isinstance(document, dict) else None
                raise Unavailable(
                    f"the OIDC discovery document {url} names issuer {str(named)[:200]!r}, "
                    f"not {self.issuer!r}"
                )
            jwks_uri = document.get("jwks_uri")
            if not isinstance(jwks_uri, str) or not jwks_uri.startswith(("https://", "http://")):
                raise Unavailable(f"the OIDC discovery document {url} names no http(s) jwks_uri")
            self._jwks_uri = jwks_uri
        return self._jwks_uri

    def _fetch_json(self, url: str) -> object:
        """The JSON document at ``url``, read whole within ``timeout_seconds``."""
        if not url.startswith(("https://", "http://")):
            raise Unavailable(f"the identity provider's {url!r} is not an http(s) URL")
        deadline = time.monotonic() + self.timeout_seconds
        body = bytearray()
        try:
            with (
                httpx.Client(timeout=self.timeout_seconds, follow_redirects=False) as client,
                client.stream("GET", url, headers={"accept": "application/json"}) as answer,
            ):
                if answer.status_code != 200:
                    raise Unavailable(f"the identity provider answered {url} with HTTP "
                                      f"{answer.status_code}")  # fmt: skip
                for chunk in answer.iter_bytes():
                    body += chunk
                    if len(body) > MAX_DOCUMENT_BYTES:
                        raise Unavailable(f"{url} is larger than {MAX_DOCUMENT_BYTES} bytes")
                    if time.monotonic() > deadline:
                        raise Unavailable(
                            f"{url} did not arrive whole within {self.timeout_seconds:g} s"
                        )
        except httpx.HTTPError as exc:
            raise Unavailable(f"the identity provider's {url} cannot be read: {exc}") from exc
        try:
            return json.loads(body)
        except (ValueError, RecursionError):
            raise Unavailable(f"the identity provider's {url} is not JSON") from None


def _check_begun(claims: dict[str, Any], *, now: float) -> None:
    """Refuse a token whose ``iat`` or ``nbf`` is not a number, or is later than ``now``."""
    for claim in ("iat", "nbf"):
        if claim not in claims:
            continue
        value = claims[claim]
        if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
            raise Unauthenticated(f"token {claim!r} claim must be a number of seconds")
        if value > now:
            raise Unauthenticated("token is not valid yet (iat or nbf in the future)")


def _signing_keys(document: object) -> dict[str, jwt.PyJWK]:
    """The signing keys of a JWKS document by ``kid`` (``use`` ``sig`` or none given)."""
    try:
        keys = jwt.PyJWKSet.from_dict(document).keys  # type: ignore[arg-type]
    except (jwt.exceptions.PyJWTError, AttributeError, TypeError, ValueError) as exc:
        raise Unavailable(f"the identity provider's key set has no usable key: {exc}") from exc
    return {
        key.key_id: key
        for key in keys
        if isinstance(key.key_id, str) and key.public_key_use in ("sig", None)
    }


def _verified(claim: object) -> bool:
    """``email_verified`` as providers send it: JSON ``true``, or (Amazon Cognito, some others)
    the string ``"true"``; anything else is not a verification."""
    return claim is True or (isinstance(claim, str) and claim.strip().lower() == "true")
