"""Issuing and verifying bearer tokens (adapters/tokens.py)."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta

import jwt
import pytest
from credentials import rsa_pem_pair

from adapters.tokens import (
    BOOTSTRAP_WORKSPACE,
    InvalidKey,
    Principal,
    issue_token,
    issue_user_token,
    verify_token,
)
from domain.errors import Unauthenticated, ValidationFailed
from domain.roles import Role

SECRET = "s3cr3t-" + "x" * 40
OTHER_SECRET = "other-" + "y" * 40


@pytest.fixture(scope="module")
def rsa_keys() -> tuple[str, str]:
    return rsa_pem_pair()


def _issue(**overrides: object) -> str:
    params: dict[str, object] = {
        "user_id": "user-1",
        "workspace_id": "ws-1",
        "role": Role.ADMIN,
        "ttl_seconds": 600,
        "secret": SECRET,
    }
    params.update(overrides)
    return issue_token(**params)  # type: ignore[arg-type]


def _tamper_payload(token: str, **claims: object) -> str:
    header, payload, signature = token.split(".")
    data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    data.update(claims)
    forged = base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()
    return f"{header}.{forged}.{signature}"


class TestHs256:
    def test_round_trip_gives_back_user_workspace_and_role(self) -> None:
        token = _issue(role="member")

        assert verify_token(token, secret=SECRET) == Principal(
            user_id="user-1", workspace_id="ws-1", role=Role.MEMBER, is_bootstrap=False
        )

    def test_token_carries_the_documented_claims(self) -> None:
        issued = datetime(2030, 1, 1, tzinfo=UTC)
        token = _issue(ttl_seconds=3600, now=issued)

        claims = jwt.decode(token, options={"verify_signature": False})

        assert claims == {
            "sub": "user-1",
            "ws": "ws-1",
            "role": "ADMIN",
            "iat": int(issued.timestamp()),
            "exp": int(issued.timestamp()) + 3600,
        }
        assert jwt.get_unverified_header(token)["alg"] == "HS256"

    def test_bootstrap_token_is_recognised(self) -> None:
        token = _issue(workspace_id=BOOTSTRAP_WORKSPACE, role=Role.OWNER)

        principal = verify_token(token, secret=SECRET)

        assert principal.is_bootstrap
        assert principal.workspace_id == "*"
        assert principal.role is Role.OWNER

    def test_expired_token_is_unauthenticated(self) -> None:
        token = _issue(ttl_seconds=60, now=datetime.now(UTC) - timedelta(hours=1))

        with pytest.raises(Unauthenticated, match="expired"):
            verify_token(token, secret=SECRET)

    def test_expired_token_within_leeway_is_accepted(self) -> None:
        token = _issue(ttl_seconds=60, now=datetime.now(UTC) - timedelta(seconds=90))

        assert verify_token(token, secret=SECRET, leeway_seconds=60).user_id == "user-1"

    def test_tampered_claims_are_unauthenticated(self) -> None:
        forged = _tamper_payload(_issue(role=Role.VIEWER), role="OWNER")

        with pytest.raises(Unauthenticated, match="signature"):
            verify_token(forged, secret=SECRET)

    def test_token_signed_with_another_secret_is_unauthenticated(self) -> None:
        with pytest.raises(Unauthenticated, match="signature"):
            verify_token(_issue(secret=OTHER_SECRET), secret=SECRET)

    @pytest.mark.parametrize("token", [None, "", "   "])
    def test_missing_token_is_unauthenticated(self, token: str | None) -> None:
        with pytest.raises(Unauthenticated, match="missing"):
            verify_token(token, secret=SECRET)

    @pytest.mark.parametrize("token", ["garbage", "a.b.c", "Bearer x.y.z"])
    def test_malformed_token_is_unauthenticated(self, token: str) -> None:
        with pytest.raises(Unauthenticated):
            verify_token(token, secret=SECRET)

    def test_unsigned_alg_none_token_is_unauthenticated(self) -> None:
        unsigned = jwt.encode(
            {"sub": "u", "ws": "w", "role": "OWNER", "iat": 0, "exp": 2**40},
            key="",
            algorithm="none",
        )

        with pytest.raises(Unauthenticated):
            verify_token(unsigned, secret=SECRET)

    @pytest.mark.parametrize("claim", ["sub", "role", "exp"])
    def test_token_without_a_required_claim_is_unauthenticated(self, claim: str) -> None:
        claims = {"sub": "u", "ws": "w", "role": "OWNER", "iat": 0, "exp": 2**40}
        del claims[claim]
        token = jwt.encode(claims, SECRET, algorithm="HS256")

        with pytest.raises(Unauthenticated, match=claim):
            verify_token(token, secret=SECRET)

    def test_iat_is_optional_and_no_ws_makes_a_user_token(self) -> None:
        """API.md "Tokens": only sub and exp are required; without ws the token is a user's."""
        workspace = jwt.encode({"sub": "u", "ws": "w", "role": "OWNER", "exp": 2**40}, SECRET)
        assert verify_token(workspace, secret=SECRET).workspace_id == "w"
        user = verify_token(jwt.encode({"sub": "u", "exp": 2**40, "x": 1}, SECRET), secret=SECRET)
        assert user.is_user
        assert user.role is None
        assert not user.is_bootstrap
        issued = issue_user_token(user_id="u2", ttl_seconds=60, secret=SECRET)
        assert verify_token(issued, secret=SECRET).user_id == "u2"
        assert "ws" not in jwt.decode(issued, SECRET, algorithms=["HS256"])

    def test_standard_claims_this_api_does_not_check_are_ignored(self) -> None:
        """API.md "Tokens": unknown extra claims are ignored. PyJWT refused any token carrying
        ``aud`` (it checks one only when told the audience), as many issuers add one."""
        claims = {"sub": "u", "exp": 2**40, "aud": ["agentworks", "other"], "iss": "x", "jti": "1"}
        assert verify_token(jwt.encode(claims, SECRET), secret=SECRET).user_id == "u"

    def test_token_with_unknown_role_is_unauthenticated(self) -> None:
        token = jwt.encode(
            {"sub": "u", "ws": "w", "role": "GOD", "iat": 0, "exp": 2**40},
            SECRET,
            algorithm="HS256",
        )

        with pytest.raises(Unauthenticated, match="role"):
            verify_token(token, secret=SECRET)

    def test_short_secret_is_refused_when_signing(self) -> None:
        with pytest.raises(InvalidKey, match="32 bytes"):
            _issue(secret="too-short")


class TestIssueValidation:
    def test_unknown_role_is_a_validation_error(self) -> None:
        with pytest.raises(ValidationFailed, match="unknown role"):
            _issue(role="superuser")

    @pytest.mark.parametrize("ttl", [0, -5])
    def test_non_positive_ttl_is_a_validation_error(self, ttl: int) -> None:
        with pytest.raises(ValidationFailed, match="positive"):
            _issue(ttl_seconds=ttl)

    @pytest.mark.parametrize("field", ["user_id", "workspace_id"])
    def test_empty_ids_are_validation_errors(self, field: str) -> None:
        with pytest.raises(ValidationFailed):
            _issue(**{field: " "})

    def test_exactly_one_key_is_required(self, rsa_keys: tuple[str, str]) -> None:
        with pytest.raises(InvalidKey, match="exactly one"):
            _issue(secret=None)
        with pytest.raises(InvalidKey, match="exactly one"):
            _issue(private_key=rsa_keys[0])
        with pytest.raises(InvalidKey, match="exactly one"):
            verify_token("x.y.z")


class TestRs256:
    def test_round_trip_with_a_generated_key_pair(self, rsa_keys: tuple[str, str]) -> None:
        private, public = rsa_keys
        token = _issue(secret=None, private_key=private, role="viewer")

        principal = verify_token(token, public_key=public)

        assert principal == Principal(
            user_id="user-1", workspace_id="ws-1", role=Role.VIEWER, is_bootstrap=False
        )
        assert jwt.get_unverified_header(token)["alg"] == "RS256"

    def test_token_from_another_key_pair_is_unauthenticated(
        self, rsa_keys: tuple[str, str]
    ) -> None:
        other_pem, _ = rsa_pem_pair()
        token = _issue(secret=None, private_key=other_pem)

        with pytest.raises(Unauthenticated, match="signature"):
            verify_token(token, public_key=rsa_keys[1])

    def test_hs256_token_is_refused_by_an_rs256_verifier(self, rsa_keys: tuple[str, str]) -> None:
        # The classic confusion attack: an HS256 token "signed" with the public key as secret.
        public = rsa_keys[1]
        forged = jwt.api_jws.PyJWS().encode(
            json.dumps({"sub": "u", "ws": "w", "role": "OWNER", "iat": 0, "exp": 2**40}).encode(),
            b"irrelevant-secret-that-is-long-enough-32b",
            algorithm="HS256",
        )

        with pytest.raises(Unauthenticated, match="RS256"):
            verify_token(forged, public_key=public)

    def test_expired_rs256_token_is_unauthenticated(self, rsa_keys: tuple[str, str]) -> None:
        token = _issue(
            secret=None,
            private_key=rsa_keys[0],
            ttl_seconds=1,
            now=datetime.now(UTC) - timedelta(minutes=5),
        )

        with pytest.raises(Unauthenticated, match="expired"):
            verify_token(token, public_key=rsa_keys[1])

    def test_malformed_private_key_is_refused(self) -> None:
        with pytest.raises(InvalidKey):
            _issue(secret=None, private_key="not a pem")


@pytest.mark.parametrize(
    "spelled",
    [
        "6F9619FF-8B86-D011-B42D-00C04FC964FF",
        "{6f9619ff-8b86-d011-b42d-00c04fc964ff}",
        "6f9619ff8b86d011b42d00c04fc964ff",
        "urn:uuid:6f9619ff-8b86-d011-b42d-00c04fc964ff",
    ],
)
def test_a_workspace_claim_speaks_for_its_workspace_however_the_id_is_spelled(
    spelled: str,
) -> None:
    """The ``ws`` claim was taken as written: a workspace id in capitals or braces acted in no
    workspace (its writes NOT_FOUND) and had rate-limit and idempotency buckets of its own. An
    id is the workspace's whatever its spelling; anything else is kept as it came (it matches
    no workspace)."""
    token = _issue(workspace_id=spelled)

    principal = verify_token(token, secret=SECRET)

    assert principal.workspace_id == "6f9619ff-8b86-d011-b42d-00c04fc964ff"
    assert verify_token(_issue(workspace_id="ws-1"), secret=SECRET).workspace_id == "ws-1"
