"""An OpenID Connect provider's key set as the verifier fetches it, from a provider that
misbehaves: answers that are no key set, answers that never end, a provider that is down; and
tokens of a provider whose clock runs ahead of ours.

Each would otherwise cost more than a refusal: an exception no caller expected (an HTTP 500 for
every token naming the provider), a request thread held for as long as the provider liked, one
fetch per request while it is down, each behind the one before.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from provider_servers import FakeProviderServer, Reply

from adapters.oidc import OidcVerifier
from domain.errors import Unauthenticated, Unavailable

AUDIENCE = "agentworks-spa"
KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _jwks() -> bytes:
    jwk: dict[str, Any] = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(KEY.public_key()))
    jwk.update(kid="k1", use="sig")
    return json.dumps({"keys": [jwk]}).encode()


def _token(issuer: str, **extra: Any) -> str:
    claims = {"iss": issuer, "aud": AUDIENCE, "sub": "s1", "exp": int(time.time()) + 300}
    return jwt.encode({**claims, **extra}, KEY, algorithm="RS256", headers={"kid": "k1"})


def _verifier(server: FakeProviderServer, **options: Any) -> OidcVerifier:
    options.setdefault("jwks_url", f"{server.url}/jwks.json")
    return OidcVerifier(issuer=server.url, audience=AUDIENCE, timeout_seconds=1.0, **options)


def _verify_in_a_thread(verifier: OidcVerifier, token: str) -> BaseException | object:
    """What ``verify`` answered or raised; fails the test when it has not after 30 s."""
    outcome: list[BaseException | object] = []

    def run() -> None:
        try:
            outcome.append(verifier.verify(token))
        except BaseException as error:  # noqa: BLE001 - the test looks at what it was
            outcome.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(30)
    assert not thread.is_alive(), "still waiting for the provider after 30 s"
    return outcome[0]


@pytest.mark.parametrize(
    "body",
    [
        b"<html><body>502 Bad Gateway</body></html>",
        b'{"keys": "none"}',
        b"[]",
        b'{"keys": [{"kty": "RSA", "kid": "k1"}]}',
        b'{"keys": [{"kid": "k1"' + b', "x": "' + b"a" * 2_000_000 + b'"}]}',
    ],
    ids=["html", "keys not a list", "not an object", "a key without its numbers", "2 MB"],
)
def test_a_key_set_that_is_no_key_set_is_unavailable(body: bytes) -> None:
    """A provider's garbage (an HTML error page from its proxy, a malformed set) escaped as a
    ValueError or PyJWKSetError: an HTTP 500 for every token naming the provider."""
    with FakeProviderServer([Reply(body=body)]) as server, pytest.raises(Unavailable):
        _verifier(server).verify(_token(server.url))


@pytest.mark.parametrize("where", ["jwks", "discovery"])
def test_an_answer_that_never_ends_is_given_up(where: str) -> None:
    """The fetch's timeout bounded each read, not the answer: a provider (or whatever answers
    for it) sending a byte now and then held the request, and every sign-in through that
    provider queued behind it, for as long as it went on."""
    trickle = Reply(events=["{"], keep_alive=" ", event_delay=0.2)
    with FakeProviderServer([trickle]) as server:
        jwks_url = f"{server.url}/jwks.json" if where == "jwks" else None
        outcome = _verify_in_a_thread(_verifier(server, jwks_url=jwks_url), _token(server.url))
    assert isinstance(outcome, Unavailable), outcome


@pytest.mark.parametrize(
    "named", ["https://login.elsewhere.example", None], ids=["another issuer", "no issuer"]
)
def test_a_discovery_document_of_another_issuer_is_not_followed(named: str | None) -> None:
    """OpenID Connect Discovery: the document's ``issuer`` must be the issuer whose address it
    was fetched from. One naming another (or none) may have come from whatever answers at that
    address (a proxy, a stale cache, another tenant of the host); its ``jwks_uri`` was followed
    all the same, and the keys found there signed sign-ins."""
    with FakeProviderServer([]) as server:
        document: dict[str, Any] = {"jwks_uri": f"{server.url}/jwks.json"}
        if named is not None:
            document["issuer"] = named
        server.script([Reply(body=json.dumps(document).encode()), Reply(body=_jwks())])
        with pytest.raises(Unavailable, match="issuer"):
            _verifier(server, jwks_url=None).verify(_token(server.url))


def test_a_discovery_document_of_its_own_issuer_is_followed() -> None:
    with FakeProviderServer([]) as server:
        document = {"issuer": server.url, "jwks_uri": f"{server.url}/jwks.json"}
        server.script([Reply(body=json.dumps(document).encode()), Reply(body=_jwks())])
        assert _verifier(server, jwks_url=None).verify(_token(server.url)).subject == "s1"


@pytest.mark.parametrize("where", ["jwks", "discovery"])
def test_a_provider_that_failed_is_asked_again_only_after_the_cooldown(where: str) -> None:
    """While the provider was down, every token naming it fetched again, one after another
    (each up to the timeout): a flood of made-up tokens was a flood of fetches, each holding a
    request thread. A failed fetch is now the answer until the cooldown passes."""
    with FakeProviderServer([Reply(status=503, body=b"down")]) as server:
        jwks_url = f"{server.url}/jwks.json" if where == "jwks" else None
        verifier = _verifier(server, jwks_url=jwks_url, refresh_cooldown_seconds=600)
        for _ in range(10):
            with pytest.raises(Unavailable):
                verifier.verify(_token(server.url))
        assert len(server.requests) == 1, [r.path for r in server.requests]


def test_known_keys_still_verify_while_the_provider_cannot_be_reached() -> None:
    """Past the key set's lifespan the verifier fetches it again; a provider down then no
    longer turns every sign-in into an error while the keys it knows still verify."""
    now = [1_000.0]
    with FakeProviderServer([Reply(body=_jwks()), Reply(status=503, body=b"down")]) as server:
        verifier = _verifier(server, keys_lifespan_seconds=60, clock=lambda: now[0])
        assert verifier.verify(_token(server.url)).subject == "s1"
        now[0] += 61
        assert verifier.verify(_token(server.url)).subject == "s1"
        assert len(server.requests) == 2


@pytest.mark.parametrize("claim", ["iat", "nbf"])
def test_a_token_from_a_provider_whose_clock_is_a_little_ahead_is_taken(claim: str) -> None:
    """A provider's clock seconds ahead of ours made each token it had just issued "not valid
    yet" (its iat or nbf was in our future, with no leeway), so the first request a client made
    with it was a 401. Up to a minute ahead is taken; further is still refused."""
    with FakeProviderServer([Reply(body=_jwks())]) as server:
        verifier = _verifier(server)
        ahead = _token(server.url, **{claim: int(time.time()) + 5})
        assert verifier.verify(ahead).subject == "s1"
        with pytest.raises(Unauthenticated, match="not valid yet"):
            verifier.verify(_token(server.url, **{claim: int(time.time()) + 3600}))
        with pytest.raises(Unauthenticated):
            verifier.verify(_token(server.url, **{claim: "soon"}))
        with pytest.raises(Unauthenticated, match="expired"):  # the expiry keeps no leeway
            verifier.verify(_token(server.url, exp=int(time.time()) - 2))


@pytest.mark.parametrize(
    "header",
    [{"alg": "RS256", "kid": ["k1"]}, {"alg": "RS256", "kid": "k1", "crit": ["x-unknown"]}],
    ids=["a kid that is no string", "an unknown critical extension"],
)
def test_a_header_refused_before_any_key_is_unauthenticated(header: dict[str, Any]) -> None:
    """verify() let PyJWT's InvalidTokenError for such a header escape (only its DecodeError was
    caught): the app routes these tokens to its own keys today, but verify is the provider's
    word on a token and answers UNAUTHENTICATED for any it refuses."""

    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    with FakeProviderServer([Reply(body=_jwks())]) as server:
        claims = {"iss": server.url, "aud": AUDIENCE, "sub": "s1", "exp": int(time.time()) + 60}
        token = f"{part(header)}.{part(claims)}.c2lnbmF0dXJl"  # PyJWT would not make it
        with pytest.raises(Unauthenticated):
            _verifier(server).verify(token)
