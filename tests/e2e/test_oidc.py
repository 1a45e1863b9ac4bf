"""Tokens of an external OpenID Connect provider, served here by a local discovery + JWKS server.

RS256 and ES256 keys are generated per test module; tokens are signed with PyJWT as a provider
would. The API finds the keys through the discovery document, fetches them again when a token
names a new ``kid`` (rotation), and provisions each (issuer, subject) once.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import jwt
import pytest
from api_client import PROTOCOL
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from e2e_stack import Stack, StackBuilder
from test_identity_flow import UNSEEN_IN_ADDRESSES
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

AUDIENCE = "agentworks-spa"
ME = "{ me { id email name workspaces { id } } }"


class Provider:
    """A minimal OIDC provider: a discovery document and a JWKS that tests can rotate."""

    def __init__(self) -> None:
        self.keys: dict[str, Any] = {}
        self.fetches = 0
        provider = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/.well-known/openid-configuration":
                    body: dict[str, Any] = {"issuer": provider.issuer, "jwks_uri": provider.jwks}
                elif self.path == "/jwks.json":
                    provider.fetches += 1
                    body = {"keys": [provider.public_jwk(k) for k in provider.keys]}
                else:
                    self.send_error(404)
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.issuer = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.jwks = f"{self.issuer}/jwks.json"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)

    def add_key(self, kid: str, kind: str) -> None:
        if kind == "RS256":
            self.keys[kid] = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        else:
            self.keys[kid] = ec.generate_private_key(ec.SECP256R1())

    def public_jwk(self, kid: str) -> dict[str, Any]:
        key = self.keys[kid]
        algorithm = jwt.algorithms.RSAAlgorithm if isinstance(key, rsa.RSAPrivateKey) else (
            jwt.algorithms.ECAlgorithm
        )  # fmt: skip
        jwk: dict[str, Any] = json.loads(algorithm.to_jwk(key.public_key()))
        jwk.update(kid=kid, use="sig")
        return jwk

    def token(self, kid: str, *, audience: str = AUDIENCE, ttl: int = 300, **claims: Any) -> str:
        key = self.keys[kid]
        algorithm = "RS256" if isinstance(key, rsa.RSAPrivateKey) else "ES256"
        now = int(time.time())
        body = {"iss": self.issuer, "aud": audience, "exp": now + ttl, **claims}
        return jwt.encode(body, key, algorithm=algorithm, headers={"kid": kid})


@pytest.fixture(scope="module")
def provider() -> Iterator[Provider]:
    made = Provider()
    made.add_key("rsa-1", "RS256")
    made.add_key("ec-1", "ES256")
    yield made
    made.close()


@pytest.fixture(scope="module")
def oidc_stack(module_database_url: str, redis_url: str, provider: Provider) -> Iterator[Stack]:
    stacks = StackBuilder(redis_url)
    yield stacks.build(
        module_database_url,
        auth={},
        oidc={"issuer": provider.issuer, "audience": AUDIENCE, "refresh_cooldown_seconds": 0},
    )
    stacks.close()


def ask(stack: Stack, token: str, query: str = ME) -> httpx.Response:
    return httpx.post(
        f"{stack.url}/graphql",
        json={"query": query},
        headers={"Authorization": f"Bearer {token}"},
        timeout=15.0,
    )


def me(stack: Stack, token: str) -> dict[str, Any]:
    answer = ask(stack, token)
    assert answer.status_code == 200, answer.text
    assert "errors" not in answer.json(), answer.text
    found: dict[str, Any] = answer.json()["data"]["me"]
    return found


def test_rs256_and_es256_tokens_act_as_one_provisioned_user(
    oidc_stack: Stack, provider: Provider
) -> None:
    first = me(oidc_stack, provider.token("rsa-1", sub="sub-1", email="Oidc@Example.com"))
    assert first["email"] == "oidc@example.com"
    assert first["workspaces"] == []
    again = me(oidc_stack, provider.token("ec-1", sub="sub-1", email="ignored@example.com"))
    assert again["id"] == first["id"]  # linked by (iss, sub), not by e-mail
    created = ask(
        oidc_stack,
        provider.token("ec-1", sub="sub-1"),
        'mutation { createWorkspace(input: {name: "From the IdP"}) { workspace { id } } }',
    )
    assert "errors" not in created.json(), created.text
    assert me(oidc_stack, provider.token("rsa-1", sub="sub-1"))["workspaces"] == [
        {"id": created.json()["data"]["createWorkspace"]["workspace"]["id"]}
    ]


def test_a_rotated_key_is_fetched_when_a_token_names_it(
    oidc_stack: Stack, provider: Provider
) -> None:
    me(oidc_stack, provider.token("rsa-1", sub="sub-rot", email="rot@example.com"))
    fetched = provider.fetches
    provider.add_key("rsa-2", "RS256")
    rotated = me(oidc_stack, provider.token("rsa-2", sub="sub-rot"))
    assert rotated["email"] == "rot@example.com"
    assert provider.fetches == fetched + 1


def _unsigned(provider: Provider, header: dict[str, Any]) -> str:
    """A token of ``header`` naming ``provider`` as its issuer, with a made-up signature."""

    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    claims = {"iss": provider.issuer, "aud": AUDIENCE, "sub": "s", "exp": int(time.time()) + 60}
    return f"{part(header)}.{part(claims)}.c2lnbmF0dXJl"


@pytest.mark.parametrize(
    ("case", "make"),
    [
        ("wrong audience", lambda p: p.token("rsa-1", sub="s", email="a@b.co", audience="other")),
        ("expired", lambda p: p.token("rsa-1", sub="s", email="a@b.co", ttl=-120)),
        ("unknown key", lambda p: jwt.encode(
            {"iss": p.issuer, "aud": AUDIENCE, "sub": "s", "exp": int(time.time()) + 60},
            rsa.generate_private_key(public_exponent=65537, key_size=2048),
            algorithm="RS256", headers={"kid": "rsa-1"},
        )),
        ("HS256 with a guessed secret", lambda p: jwt.encode(
            {"iss": p.issuer, "aud": AUDIENCE, "sub": "s", "exp": int(time.time()) + 60},
            "a guessed secret that is long enough for HS256",
            algorithm="HS256", headers={"kid": "rsa-1"},
        )),
        # A header naming another kind of key than the one its kid picks (no signature needed
        # to reach the key): PyJWT's TypeError for the mismatch was an HTTP 500.
        ("ES256 header naming an RSA key", lambda p: jwt.encode(
            {"iss": p.issuer, "aud": AUDIENCE, "sub": "s", "exp": int(time.time()) + 60},
            p.keys["ec-1"], algorithm="ES256", headers={"kid": "rsa-1"},
        )),
        ("RS256 header naming an EC key", lambda p: jwt.encode(
            {"iss": p.issuer, "aud": AUDIENCE, "sub": "s", "exp": int(time.time()) + 60},
            p.keys["rsa-1"], algorithm="RS256", headers={"kid": "ec-1"},
        )),
        # Headers PyJWT refuses before any key is looked for (anyone can send them, naming
        # the provider): its InvalidTokenError escaped as an HTTP 500.
        ("a kid that is no string", lambda p: _unsigned(p, {"alg": "RS256", "kid": ["rsa-1"]})),
        ("an unknown critical extension", lambda p: _unsigned(
            p, {"alg": "RS256", "kid": "rsa-1", "crit": ["x-unknown"], "x-unknown": 1}
        )),
    ],
)  # fmt: skip
def test_bad_provider_tokens_are_unauthenticated(
    oidc_stack: Stack, provider: Provider, case: str, make: Any
) -> None:
    answer = ask(oidc_stack, make(provider))
    assert answer.status_code == 401, (case, answer.text)
    assert answer.json()["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"


def test_an_existing_address_is_linked_only_when_the_provider_verified_it(
    oidc_stack: Stack, provider: Provider
) -> None:
    signed_up = httpx.post(
        f"{oidc_stack.url}/auth/signup",
        json={"email": "local@example.com", "password": "correct horse battery", "name": "L"},
    )
    assert signed_up.status_code == 201
    unverified = ask(oidc_stack, provider.token("rsa-1", sub="x-1", email="local@example.com"))
    assert unverified.status_code == 401
    verified = me(
        oidc_stack,
        provider.token("rsa-1", sub="x-2", email="local@example.com", email_verified=True),
    )
    assert verified["id"] == signed_up.json()["userId"]


def test_a_verified_claim_sent_as_the_string_true_counts_as_verified(
    oidc_stack: Stack, provider: Provider
) -> None:
    """Some providers (Amazon Cognito among them) send ``email_verified`` as the string
    ``"true"``: such an owner could not sign in to the account of their own address. The
    string ``"true"`` counts (in any case); ``"false"``, ``"yes"``, ``1`` do not."""
    signed_up = httpx.post(
        f"{oidc_stack.url}/auth/signup",
        json={"email": "cognito@example.com", "password": "correct horse battery", "name": "C"},
    )
    assert signed_up.status_code == 201
    for sub, claim in [("c-1", "false"), ("c-2", "yes"), ("c-3", 1)]:
        refused = ask(
            oidc_stack,
            provider.token("rsa-1", sub=sub, email="cognito@example.com", email_verified=claim),
        )
        assert refused.status_code == 401, (claim, refused.text)
    verified = me(
        oidc_stack,
        provider.token("rsa-1", sub="c-4", email="cognito@example.com", email_verified="True"),
    )
    assert verified["id"] == signed_up.json()["userId"]


def test_a_password_set_before_the_address_was_proven_stops_working_once_its_owner_signs_in(
    oidc_stack: Stack, provider: Provider
) -> None:
    """Sign-up proves no address: whoever signed up first with another's address (a squatter)
    held a password to the account its owner then signed in to through the provider, and read
    every workspace the owner joined. The provider's verified sign-in now ends the password and
    every session begun with it."""
    url = oidc_stack.url
    password = "squatter's password"
    signed_up = httpx.post(
        f"{url}/auth/signup", json={"email": "owner@example.com", "password": password, "name": "S"}
    )
    assert signed_up.status_code == 201
    squatting = httpx.post(
        f"{url}/auth/login", json={"email": "owner@example.com", "password": password}
    )
    assert squatting.status_code == 200
    owner = me(
        oidc_stack,
        provider.token("rsa-1", sub="owner", email="owner@example.com", email_verified=True),
    )
    assert owner["id"] == signed_up.json()["userId"]
    again = httpx.post(
        f"{url}/auth/login", json={"email": "owner@example.com", "password": password}
    )
    assert again.status_code == 401, again.text
    refreshed = httpx.post(
        f"{url}/auth/refresh", json={"refreshToken": squatting.json()["refreshToken"]}
    )
    assert refreshed.status_code == 401, refreshed.text


def test_an_identity_linked_by_an_unverified_address_is_unlinked_when_its_owner_signs_in(
    oidc_stack: Stack, provider: Provider
) -> None:
    """A provider account claiming another's address unverified made the account; the owner's
    verified sign-in was then linked to it, and the squatter's sign-in went on working."""
    squatter = provider.token("rsa-1", sub="squatter", email="claimed@example.com")
    made = me(oidc_stack, squatter)
    owner = me(
        oidc_stack,
        provider.token("rsa-1", sub="claimed", email="claimed@example.com", email_verified=True),
    )
    assert owner["id"] == made["id"]
    refused = ask(oidc_stack, provider.token("rsa-1", sub="squatter"))
    assert refused.status_code == 401, refused.text
    assert refused.json()["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"
    verified_again = provider.token("rsa-1", sub="claimed", email_verified=True)
    assert me(oidc_stack, verified_again)["id"] == made["id"]


def test_a_second_verified_identity_of_a_proven_address_is_linked_beside_the_first(
    oidc_stack: Stack, provider: Provider
) -> None:
    first = me(
        oidc_stack,
        provider.token("rsa-1", sub="first", email="twice@example.com", email_verified=True),
    )
    second = me(
        oidc_stack,
        provider.token("rsa-1", sub="second", email="twice@example.com", email_verified=True),
    )
    assert second["id"] == first["id"]
    assert me(oidc_stack, provider.token("rsa-1", sub="first"))["id"] == first["id"]


def test_a_verified_address_only_folding_makes_equal_is_another_account(
    oidc_stack: Stack, provider: Provider
) -> None:
    """straße.example and strasse.example are two domains (IDNA 2008), two owners. Case-folding
    made them one address: the owner of the first, verified by the provider, signed in to the
    account of the second."""
    signed_up = httpx.post(
        f"{oidc_stack.url}/auth/signup",
        json={"email": "ceo@strasse.example", "password": "correct horse battery", "name": "C"},
    )
    assert signed_up.status_code == 201
    other = me(
        oidc_stack,
        provider.token("rsa-1", sub="fold", email="ceo@stra\u00dfe.example", email_verified=True),
    )
    assert other["id"] != signed_up.json()["userId"]
    assert other["email"] == "ceo@stra\u00dfe.example"
    login = httpx.post(
        f"{oidc_stack.url}/auth/login",
        json={"email": "CEO@Strasse.example", "password": "correct horse battery"},
    )
    assert login.status_code == 200, login.text


@pytest.mark.parametrize("name", ["x" * 300, "   ", "nul\x00in it", "lone \ud800 surrogate"])
def test_a_display_name_this_api_would_refuse_does_not_refuse_the_sign_in(
    oidc_stack: Stack, provider: Provider, name: str
) -> None:
    """The provider's ``name`` is only a display name: one too long, blank or with NUL was
    refused (VALIDATION), so that person could never sign in; now the address stands in."""
    subject = f"named-{len(name)}-{name[:3].strip()}"
    email = f"{subject}@example.com"
    found = me(oidc_stack, provider.token("rsa-1", sub=subject, email=email, name=name))
    assert found["email"] == email
    assert found["name"] in (email, name[:200])


@pytest.mark.parametrize("email", UNSEEN_IN_ADDRESSES.values(), ids=UNSEEN_IN_ADDRESSES.keys())
def test_an_email_claim_with_control_or_invisible_characters_provisions_no_one(
    oidc_stack: Stack, provider: Provider, email: str
) -> None:
    """The rule of a sign-up's address: a provider's claim is held to it as well, answered as
    one that is no address at all."""
    subject = f"unseen-{email.encode('unicode_escape').decode()}"
    answer = ask(oidc_stack, provider.token("rsa-1", sub=subject, email=email))
    no_address = ask(oidc_stack, provider.token("rsa-1", sub=f"{subject}-2", email="nope"))
    [refusal] = answer.json()["errors"]
    assert no_address.json()["errors"][0]["extensions"]["code"] == "VALIDATION"
    assert (answer.status_code, refusal["extensions"]) == (
        no_address.status_code,
        no_address.json()["errors"][0]["extensions"],
    )
    assert refusal["message"].startswith("email "), refusal


def test_a_provider_token_refused_on_a_websocket_closes_it_with_the_reason(
    oidc_stack: Stack, provider: Provider
) -> None:
    """A provider's token the API refuses for another reason than authentication (an email
    claim that is no address: VALIDATION) escaped the handshake: the socket was dropped without
    a close frame."""
    token = provider.token("rsa-1", sub="ws-bad-email", email="not an address")
    assert ask(oidc_stack, token).status_code == 400
    with connect(f"{oidc_stack.ws_url}/graphql", subprotocols=[PROTOCOL]) as socket:
        socket.send(json.dumps({"type": "connection_init", "payload": {"token": token}}))
        with pytest.raises(ConnectionClosed) as closed:
            socket.recv(timeout=10)
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 4403
