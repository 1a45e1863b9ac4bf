"""Bearer tokens: issue and verify the JWTs that authenticate every API call.

Claims (API.md): ``sub`` user id, ``ws`` workspace id (``*`` for a bootstrap token that may only
create a workspace), ``role`` (OWNER|ADMIN|MEMBER|VIEWER), ``iat`` and ``exp``. Tokens are signed
either with HS256 and a shared secret or with RS256 and a private key (verified by its public
key). PyJWT's exceptions stop here: a token that cannot be trusted raises
:class:`domain.errors.Unauthenticated` whose message says why.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import jwt

from domain.errors import ConfigurationError, Unauthenticated, ValidationFailed
from domain.roles import Role

#: ``ws`` claim of a bootstrap token: no workspace yet, may only create one.
BOOTSTRAP_WORKSPACE = "*"

HS256 = "HS256"
RS256 = "RS256"

#: ``ws`` of a user token's principal: no claim, the user acts wherever they are a member.
USER_SCOPE = ""

# API.md "Tokens": only ``sub`` and ``exp`` are required (an identity provider's tokens may lack
# ``iat``); a token without ``ws`` is a user token.
_REQUIRED_CLAIMS = ("sub", "exp")

# PyJWT only warns about an HMAC secret shorter than the hash (or an RSA key under 2048 bits);
# refusing is safer, and a warning would be lost in a server's log.
_jwt = jwt.PyJWT(options={"enforce_minimum_key_length": True})


class InvalidKey(ConfigurationError, ValueError):
    """The configured signing or verification key is unusable (malformed PEM, too short)."""

    code = "INVALID_KEY"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling, as a verified token says."""

    user_id: str
    workspace_id: str
    role: Role | None
    is_bootstrap: bool
    api_key_id: UUID | None = None
    """The API key the caller presented (a revocation must end what it opened); else ``None``."""
    expires_at: float | None = field(default=None, compare=False)
    """The token's ``exp`` (seconds since the epoch): what it opened ends then; ``None`` for a
    credential without one (an API key)."""

    @property
    def is_user(self) -> bool:
        """A user token (login, OIDC): no workspace claim, membership decides everywhere."""
        return self.workspace_id == USER_SCOPE


def issue_token(
    *,
    user_id: str,
    workspace_id: str,
    role: Role | str,
    ttl_seconds: int,
    secret: str | None = None,
    private_key: str | None = None,
    now: datetime | None = None,
) -> str:
    """Sign a token for ``user_id`` in ``workspace_id`` with ``role``, valid ``ttl_seconds``.

    Exactly one of ``secret`` (HS256) and ``private_key`` (RS256, PEM) must be given. Pass
    ``workspace_id=BOOTSTRAP_WORKSPACE`` for a bootstrap token. Raises
    :class:`~domain.errors.ValidationFailed` for bad claims and :class:`InvalidKey` for a key
    that cannot sign.
    """
    key, algorithm = _one_key(secret=secret, asymmetric=private_key, asymmetric_name="private_key")
    if not user_id.strip():
        raise ValidationFailed("a token needs a non-empty user id")
    if not workspace_id.strip():
        raise ValidationFailed("a token needs a non-empty workspace id")
    if ttl_seconds <= 0:
        raise ValidationFailed(f"token lifetime must be positive, got {ttl_seconds} seconds")
    parsed_role = role if isinstance(role, Role) else Role.parse(role)
    claims = {"sub": user_id, "ws": workspace_id, "role": parsed_role.value}
    return _sign(claims, key, algorithm, issued=now or datetime.now(UTC), ttl_seconds=ttl_seconds)


def issue_user_token(
    *,
    user_id: str,
    ttl_seconds: int,
    secret: str | None = None,
    private_key: str | None = None,
    now: datetime | None = None,
) -> str:
    """Sign a user token (no ``ws``/``role``): it acts in every workspace ``user_id`` belongs to,
    at the membership's role."""
    key, algorithm = _one_key(secret=secret, asymmetric=private_key, asymmetric_name="private_key")
    if ttl_seconds <= 0:
        raise ValidationFailed(f"token lifetime must be positive, got {ttl_seconds} seconds")
    claims = {"sub": user_id}
    return _sign(claims, key, algorithm, issued=now or datetime.now(UTC), ttl_seconds=ttl_seconds)


def _sign(
    claims: dict[str, str], key: str, algorithm: str, *, issued: datetime, ttl_seconds: int
) -> str:
    """``claims`` signed, with ``iat`` and ``exp`` for a lifetime of ``ttl_seconds``."""
    expires = issued + timedelta(seconds=ttl_seconds)
    timed = {**claims, "iat": int(issued.timestamp()), "exp": int(expires.timestamp())}
    try:
        return _jwt.encode(timed, key, algorithm=algorithm)
    except (jwt.exceptions.InvalidKeyError, ValueError, TypeError) as exc:
        raise InvalidKey(f"cannot sign a token with the configured {algorithm} key: {exc}") from exc


class BadSignature(Unauthenticated):
    """A well-formed token whose signature this key does not verify (another key signed it)."""


def verify_token(
    token: str | None,
    *,
    secret: str | None = None,
    public_key: str | None = None,
    leeway_seconds: int = 0,
) -> Principal:
    """Check ``token``'s signature, expiry and claims; return who it speaks for.

    Exactly one of ``secret`` (HS256) and ``public_key`` (RS256, PEM) must be given; only that
    algorithm is accepted, so a token cannot choose how it is checked. Raises
    :class:`~domain.errors.Unauthenticated` for a missing, malformed, tampered, expired or
    incomplete token.
    """
    key, algorithm = _one_key(secret=secret, asymmetric=public_key, asymmetric_name="public_key")
    if token is None or not token.strip():
        raise Unauthenticated("missing bearer token")
    try:
        claims = _jwt.decode(
            token.strip(),
            key,
            algorithms=[algorithm],
            leeway=leeway_seconds,
            # ``aud``, like any claim API.md does not name, is ignored; PyJWT would refuse every
            # token carrying one (it checks an audience only when told it). A provider's
            # tokens are held to their audience in adapters.oidc.
            options={"require": list(_REQUIRED_CLAIMS), "verify_aud": False},
        )
    except jwt.exceptions.InvalidTokenError as exc:
        raise refused(exc, algorithms=algorithm) from exc
    except jwt.exceptions.InvalidKeyError as exc:
        raise InvalidKey(
            f"cannot verify tokens with the configured {algorithm} key: {exc}"
        ) from exc
    return replace(_principal(claims), expires_at=expiry_of(claims))


def expiry_of(claims: dict[str, Any]) -> float | None:
    """The ``exp`` of claims PyJWT checked (a number), as seconds since the epoch."""
    exp = claims.get("exp")
    return float(exp) if isinstance(exp, int | float) and not isinstance(exp, bool) else None


def refused(exc: jwt.exceptions.InvalidTokenError, *, algorithms: str) -> Unauthenticated:
    """Why PyJWT refused a token, in the API's words; ``algorithms``: those it accepts, as
    text. Shared with :mod:`adapters.oidc`, so both kinds of token are refused alike."""
    match exc:
        case jwt.exceptions.ExpiredSignatureError():
            return Unauthenticated("token has expired")
        case jwt.exceptions.ImmatureSignatureError():
            return Unauthenticated("token is not valid yet (iat or nbf in the future)")
        case jwt.exceptions.InvalidAudienceError():
            return Unauthenticated("token is not meant for this API (aud)")
        case jwt.exceptions.InvalidSignatureError():
            return BadSignature("token signature does not verify")
        case jwt.exceptions.MissingRequiredClaimError():
            return Unauthenticated(f"token lacks the {exc.claim!r} claim")
        case jwt.exceptions.InvalidAlgorithmError():
            return Unauthenticated(f"token is not signed with {algorithms}")
        case jwt.exceptions.DecodeError():
            # The decoder's own words ("Invalid header padding", "Not enough segments")
            # describe its internals, not what the caller sent.
            return Unauthenticated(
                "malformed token: expected a JWT (three base64url parts joined by dots)"
            )
    return Unauthenticated(f"token is invalid: {exc}")


def _principal(claims: dict[str, Any]) -> Principal:
    user_id = claims["sub"]
    if not isinstance(user_id, str) or not user_id:
        raise Unauthenticated("token 'sub' claim must be a non-empty string")
    if "ws" not in claims:
        return Principal(user_id=user_id, workspace_id=USER_SCOPE, role=None, is_bootstrap=False)
    workspace_id, role = claims["ws"], claims.get("role")
    if role is None:
        raise Unauthenticated("token lacks the 'role' claim (a token with 'ws' needs one)")
    if not isinstance(workspace_id, str) or not workspace_id:
        raise Unauthenticated("token 'ws' claim must be a non-empty string")
    if not isinstance(role, str):
        raise Unauthenticated("token 'role' claim must be a string")
    try:
        parsed_role = Role.parse(role)
    except ValidationFailed as exc:
        raise Unauthenticated(f"token 'role' claim is invalid: {exc.message}") from exc
    return Principal(
        user_id=user_id,
        workspace_id=_workspace_claim(workspace_id),
        role=parsed_role,
        is_bootstrap=workspace_id == BOOTSTRAP_WORKSPACE,
    )


def _workspace_claim(claimed: str) -> str:
    """A ``ws`` claim that is a workspace id, in the id's one spelling (``str(UUID)``), so that
    every spelling of it acts in the workspace and shares its idempotency and rate-limit
    buckets; anything else (``*``, a name) as it came: it matches no workspace's id."""
    try:
        return str(UUID(claimed))
    except ValueError:
        return claimed


def _one_key(
    *, secret: str | None, asymmetric: str | None, asymmetric_name: str
) -> tuple[str, str]:
    if secret is not None and asymmetric is None:
        return secret, HS256
    if asymmetric is not None and secret is None:
        return asymmetric, RS256
    raise InvalidKey(f"give exactly one of secret (HS256) and {asymmetric_name} (RS256)")
