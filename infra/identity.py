"""Builds the sign-in service (``/auth/*``) from settings: the composition root's identity part."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from uuid import UUID

from adapters.credentials import Argon2Passwords, DeviceCookies, SecretBox, Totp, dev_totp_key
from adapters.oidc import OidcVerifier
from adapters.tokens import issue_user_token
from commands.handlers import AgentWorks
from commands.identity import Identity
from domain.errors import Forbidden, Unavailable
from infra.settings import ConfigurationError, JwtKeys, Settings
from read_api.oidc import OidcSignIn
from read_api.services import AuthSettings


@dataclass(frozen=True)
class UserTokenIssuer:
    """Signs user access tokens with the deployment's JWT key."""

    keys: JwtKeys
    ttl_seconds: int

    def issue(self, user_id: UUID) -> str:
        if self.keys.algorithm == "RS256" and self.keys.private_key is None:
            raise Unavailable(
                "this server only verifies tokens; set AGENTWORKS_JWT_PRIVATE_KEY to sign users in"
            )
        return issue_user_token(
            user_id=str(user_id),
            ttl_seconds=self.ttl_seconds,
            secret=self.keys.secret if self.keys.algorithm == "HS256" else None,
            private_key=self.keys.private_key if self.keys.algorithm == "RS256" else None,
        )


class NoSealingKey:
    """Production without ``AGENTWORKS_TOTP_ENCRYPTION_KEY``: MFA cannot be enrolled or used."""

    def seal(self, plaintext: str) -> str:
        raise Forbidden("MFA is not configured here: AGENTWORKS_TOTP_ENCRYPTION_KEY is not set")

    def open(self, sealed: str) -> str:
        raise Unavailable(
            "TOTP secrets cannot be opened: AGENTWORKS_TOTP_ENCRYPTION_KEY is not set"
        )


def build_auth(
    settings: Settings, write: AgentWorks, keys: JwtKeys, data_dir: Path | None
) -> AuthSettings:
    if settings.totp_encryption_key is not None:
        sealer: SecretBox | NoSealingKey = SecretBox(
            settings.totp_encryption_key.get_secret_value()
        )
    elif settings.env == "prod":
        sealer = NoSealingKey()
    else:
        sealer = SecretBox(dev_totp_key(data_dir or settings.data_dir))
    identity = Identity(
        write,
        passwords=Argon2Passwords(),
        totp=Totp(),
        sealer=sealer,
        access_tokens=UserTokenIssuer(keys, settings.access_token_ttl),
        refresh_ttl_seconds=settings.refresh_token_ttl,
    )
    return AuthSettings(
        identity=identity,
        secure_cookie=settings.env != "dev",
        refresh_ttl_seconds=settings.refresh_token_ttl,
        login_per_account_per_minute=settings.login_rate_per_account or None,
        login_per_address_per_minute=settings.login_rate_per_address or None,
        invitation_ttl_seconds=settings.invitation_ttl,
        device_cookies=device_cookies(keys),
    )


def device_cookies(keys: JwtKeys) -> DeviceCookies | None:
    """Device cookies signed under a key derived from the one that signs access tokens (no
    setting more to keep secret); none where this server signs no one in (RS256 without its
    private key)."""
    secret = keys.secret if keys.algorithm == "HS256" else keys.private_key
    return DeviceCookies(secret) if secret else None


def build_oidc(settings: Settings, identity: Identity) -> OidcSignIn | None:
    """The OpenID Connect provider of settings; ``None`` when none is configured."""
    if settings.oidc_issuer is None and settings.oidc_audience is None:
        return None
    if settings.oidc_issuer is None or settings.oidc_audience is None:
        raise ConfigurationError(
            "set both AGENTWORKS_OIDC_ISSUER and AGENTWORKS_OIDC_AUDIENCE (or neither)"
        )
    verifier = OidcVerifier(
        issuer=settings.oidc_issuer,
        audience=settings.oidc_audience,
        jwks_url=settings.oidc_jwks_url,
    )
    return OidcSignIn(verifier, identity)
