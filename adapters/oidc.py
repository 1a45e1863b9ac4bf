"""Bearer tokens from an external OpenID Connect provider, checked against its JWKS.

Keys come from ``jwks_url``, or from the ``jwks_uri`` of the issuer's discovery document
(``{issuer}/.well-known/openid-configuration``), fetched on first use. PyJWT's ``PyJWKClient``
caches the key set and fetches it again when a token names a ``kid`` it does not hold (key
rotation), at most once per ``refresh_cooldown_seconds`` so a flood of forged ``kid``s cannot
turn into a flood of requests to the provider.
"""

from __future__ import annotations

import json
import threading
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import jwt

from adapters.tokens import expiry_of, refused
from domain.errors import Unauthenticated, Unavailable

ALGORITHMS = ("RS256", "ES256")


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
    _client: jwt.PyJWKClient | None = field(init=False, default=None, repr=False)
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
            key = self._keys().get_signing_key_from_jwt(token)
        except jwt.exceptions.PyJWKClientConnectionError as exc:
            raise Unavailable("the identity provider's keys cannot be fetched now") from exc
        except (jwt.exceptions.PyJWKClientError, jwt.exceptions.DecodeError) as exc:
            raise Unauthenticated(f"token is not signed by a key of {self.issuer}") from exc
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
                options={"require": ["sub", "exp", "iss", "aud"]},
            )
        except jwt.exceptions.InvalidTokenError as exc:
            raise refused(exc, algorithms=" or ".join(ALGORITHMS)) from exc
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

    def _keys(self) -> jwt.PyJWKClient:
        with self._lock:
            if self._client is None:
                url = self.jwks_url or self._discover()
                self._client = jwt.PyJWKClient(
                    url, cache_jwk_set=True, lifespan=3600, timeout=self.timeout_seconds,
                    cooldown_duration=self.refresh_cooldown_seconds,
                )  # fmt: skip
            return self._client

    def _discover(self) -> str:
        url = self.issuer.rstrip("/") + "/.well-known/openid-configuration"
        if not url.startswith(("https://", "http://")):
            raise Unavailable(f"the OIDC issuer {self.issuer!r} is not an http(s) URL")
        try:
            with urllib.request.urlopen(url, timeout=self.timeout_seconds) as answer:  # noqa: S310
                document = json.load(answer)
        except (OSError, ValueError) as exc:
            raise Unavailable(f"the OIDC discovery document {url} cannot be read") from exc
        jwks_uri = document.get("jwks_uri") if isinstance(document, dict) else None
        if not isinstance(jwks_uri, str):
            raise Unavailable(f"the OIDC discovery document {url} names no jwks_uri")
        return jwks_uri


def _verified(claim: object) -> bool:
    """``email_verified`` as providers send it: JSON ``true``, or (Amazon Cognito, some others)
    the string ``"true"``; anything else is not a verification."""
    return claim is True or (isinstance(claim, str) and claim.strip().lower() == "true")
