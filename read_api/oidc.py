"""Tokens of an external OpenID Connect provider acting as user tokens (API.md "Identity")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from adapters.tokens import USER_SCOPE, Principal

if TYPE_CHECKING:
    from adapters.oidc import OidcVerifier
    from commands.identity import Identity


@dataclass(frozen=True)
class OidcSignIn:
    verifier: OidcVerifier
    identity: Identity

    def issued_here(self, token: str) -> bool:
        return self.verifier.issued_here(token)

    def principal(self, token: str) -> Principal:
        """Verify the provider's token and find (or provision) its user; blocking."""
        who = self.verifier.verify(token)
        user_id = self.identity.external_user(
            issuer=who.issuer,
            subject=who.subject,
            email=who.email,
            email_verified=who.email_verified,
            name=who.name,
        )
        return Principal(
            user_id=str(user_id), workspace_id=USER_SCOPE, role=None, is_bootstrap=False,
            expires_at=who.expires_at,
        )  # fmt: skip
