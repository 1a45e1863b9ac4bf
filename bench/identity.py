"""Login cost and per-request token verification cost, each next to its baseline, same run.

* argon2id verification alone (the parameters of ``adapters.credentials``), CPU and wall time;
* a whole login through ``commands.identity.Identity`` on the in-memory store (password check,
  session start, LoginSucceeded event, access token signed): p50/p99 wall and CPU per login;
* per-request credential checks: a plain HS256 workspace token (the baseline), an HS256 user
  token, an API key (looked up in the in-memory store), an OIDC RS256 and ES256 token with the
  provider's key already cached.

Usage: ``python -m bench.identity [--logins 200] [--checks 20000] [--out FILE]`` (default
``bench/results/identity.json``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from uuid import uuid4

import jwt
from cryptography.fernet import Fernet
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from adapters.credentials import (
    ARGON2_MEMORY_KIB,
    ARGON2_PARALLELISM,
    ARGON2_TIME_COST,
    Argon2Passwords,
    SecretBox,
    Totp,
)
from adapters.tokens import issue_token, issue_user_token, verify_token
from bench._provenance import Provenance
from commands.access import CreateApiKey, check_api_key, create_api_key
from commands.handlers import USER_SCOPE, Actor, AgentWorks
from commands.identity import Identity
from commands.models import CreateWorkspace
from domain.errors import Unauthenticated
from infra.identity import UserTokenIssuer
from infra.settings import JwtKeys

SECRET = "a-benchmark-secret-of-more-than-32-bytes!"
PASSWORD = "correct horse battery"


def _percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "p50_ms": round(statistics.median(ordered) * 1000, 3),
        "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000, 3),
        "n": len(ordered),
    }


def _timed(fn: Callable[[], object], n: int) -> tuple[list[float], list[float]]:
    walls, cpus = [], []
    for _ in range(n):
        w, c = time.perf_counter(), time.process_time()
        fn()
        cpus.append(time.process_time() - c)
        walls.append(time.perf_counter() - w)
    return walls, cpus


def _per_op_us(fn: Callable[[], object], n: int) -> float:
    for _ in range(min(n, 200)):
        fn()
    started = time.perf_counter()
    for _ in range(n):
        fn()
    return round((time.perf_counter() - started) / n * 1e6, 2)


def run(logins: int, checks: int) -> dict[str, Any]:
    provenance = Provenance.start()
    passwords = Argon2Passwords()
    stored = passwords.hash(PASSWORD)
    argon_wall, argon_cpu = _timed(lambda: passwords.verify(stored, PASSWORD), logins)

    app = AgentWorks(env={"PERSISTENCE_MODULE": "eventsourcing.popo"})
    identity = Identity(
        app,
        passwords=passwords,
        totp=Totp(),
        sealer=SecretBox(Fernet.generate_key().decode()),
        access_tokens=UserTokenIssuer(JwtKeys(algorithm="HS256", secret=SECRET), 900),
    )
    user_id = identity.signup(email="bench@example.com", password=PASSWORD, name="Bench")
    login_wall, login_cpu = _timed(
        lambda: identity.login(email="bench@example.com", password=PASSWORD), logins
    )
    unknown_wall, _ = _timed(
        lambda: _refused(lambda: identity.login(email="nobody@example.com", password=PASSWORD)),
        max(20, logins // 4),
    )

    workspace_token = issue_token(
        user_id=str(user_id), workspace_id=str(uuid4()), role="OWNER", ttl_seconds=3600,
        secret=SECRET,
    )  # fmt: skip
    user_token = issue_user_token(user_id=str(user_id), ttl_seconds=3600, secret=SECRET)
    workspace = app.create_workspace(
        CreateWorkspace(name="Bench"), Actor(user_id=str(user_id), workspace_id=USER_SCOPE)
    )
    key = create_api_key(
        app,
        CreateApiKey(workspace_id=workspace.id, name="bench", role="MEMBER"),
        Actor(user_id=str(user_id), workspace_id=USER_SCOPE),
    ).secret
    assert key is not None
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    claims = {
        "iss": "https://idp.example",
        "aud": "bench",
        "sub": "s",
        "exp": int(time.time()) + 3600,
    }
    rs256 = jwt.encode(claims, rsa_key, algorithm="RS256")
    es256 = jwt.encode(claims, ec_key, algorithm="ES256")
    rsa_public, ec_public = rsa_key.public_key(), ec_key.public_key()

    def oidc(token: str, key: Any, algorithm: str) -> Callable[[], object]:
        return lambda: jwt.decode(
            token, key, algorithms=[algorithm], audience="bench", issuer="https://idp.example"
        )

    verification = {
        "hs256_workspace_token_us": _per_op_us(
            lambda: verify_token(workspace_token, secret=SECRET), checks
        ),
        "hs256_user_token_us": _per_op_us(lambda: verify_token(user_token, secret=SECRET), checks),
        "api_key_in_memory_store_us": _per_op_us(lambda: check_api_key(app, key), checks),
        "oidc_rs256_cached_key_us": _per_op_us(oidc(rs256, rsa_public, "RS256"), checks),
        "oidc_es256_cached_key_us": _per_op_us(oidc(es256, ec_public, "ES256"), checks),
    }
    return {
        "argon2id": {
            "time_cost": ARGON2_TIME_COST,
            "memory_kib": ARGON2_MEMORY_KIB,
            "parallelism": ARGON2_PARALLELISM,
            "verify_wall": _percentiles(argon_wall),
            "verify_cpu": _percentiles(argon_cpu),
        },
        "login_in_memory_store": {
            "wall": _percentiles(login_wall),
            "cpu": _percentiles(login_cpu),
            "unknown_email_wall": _percentiles(unknown_wall),
        },
        "verification_per_request": verification,
        "provenance": provenance.finish(),
    }


def _refused(fn: Callable[[], object]) -> None:
    with contextlib.suppress(Unauthenticated):  # the refusal is what is measured
        fn()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--logins", type=int, default=200)
    parser.add_argument("--checks", type=int, default=20_000)
    parser.add_argument("--out", type=Path, default=Path("bench/results/identity.json"))
    args = parser.parse_args()
    result = run(args.logins, args.checks)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
