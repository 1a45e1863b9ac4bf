"""Credential primitives: argon2id passwords, TOTP codes, sealed TOTP secrets, token digests,
device cookies.

Argon2id parameters (OWASP's second recommended set): memory 19 MiB (19456 KiB), 2 passes,
parallelism 1, 16-byte salt, 32-byte hash. On this 2-core machine one verification costs about
25-35 ms of CPU (BENCHMARKS.md), under the 100 ms budget of a login. Hashes carry their
parameters, so raising them later only affects new hashes (``needs_rehash``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from collections.abc import Callable
from pathlib import Path

import argon2
import pyotp
from cryptography.fernet import Fernet, InvalidToken

TOTP_PERIOD = 30
TOTP_DIGITS = 6

ARGON2_TIME_COST = 2
ARGON2_MEMORY_KIB = 19456
ARGON2_PARALLELISM = 1


class Argon2Passwords:
    """Hash and verify passwords with argon2id."""

    def __init__(
        self,
        *,
        time_cost: int = ARGON2_TIME_COST,
        memory_kib: int = ARGON2_MEMORY_KIB,
        parallelism: int = ARGON2_PARALLELISM,
    ) -> None:
        self._hasher = argon2.PasswordHasher(
            time_cost=time_cost,
            memory_cost=memory_kib,
            parallelism=parallelism,
            hash_len=32,
            salt_len=16,
            type=argon2.Type.ID,
        )
        # Checked against when the e-mail is unknown, so that answer costs what a wrong
        # password costs and timing does not tell which addresses have accounts.
        self._decoy = self._hasher.hash(secrets.token_urlsafe(16))

    def hash(self, password: str) -> str:
        return self._hasher.hash(password)

    def verify(self, password_hash: str | None, password: str) -> bool:
        try:
            return self._hasher.verify(password_hash or self._decoy, password) and (
                password_hash is not None
            )
        except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
            return False


class Totp:
    """RFC 6238 codes: SHA-1, 6 digits, 30-second steps, one step of drift either way."""

    def new_secret(self) -> str:
        return pyotp.random_base32()

    def uri(self, secret: str, *, account: str, issuer: str) -> str:
        return pyotp.TOTP(secret).provisioning_uri(name=account, issuer_name=issuer)

    def matching_step(self, secret: str, code: str, *, now: float) -> int | None:
        """The time step whose code ``code`` is (now, one before or one after), else ``None``."""
        code = code.strip().replace(" ", "")
        # isdigit() alone also holds for other scripts' digits (U+0661, U+FF11), which
        # compare_digest refuses to compare with a TypeError.
        if len(code) != TOTP_DIGITS or not (code.isascii() and code.isdigit()):
            return None
        totp = pyotp.TOTP(secret)
        current = int(now // TOTP_PERIOD)
        for step in (current - 1, current, current + 1):
            if hmac.compare_digest(totp.at(step * TOTP_PERIOD), code):
                return step
        return None


class SecretBox:
    """Seals TOTP secrets with Fernet (AES-128-CBC + HMAC-SHA256) under a key from settings."""

    def __init__(self, key: str) -> None:
        try:
            self._fernet = Fernet(key.encode())
        except (ValueError, TypeError) as exc:
            raise ValueError(
                "AGENTWORKS_TOTP_ENCRYPTION_KEY must be 32 url-safe base64-encoded bytes "
                "(python -c 'from cryptography.fernet import Fernet; print(Fernet.generate_key())')"
            ) from exc

    def seal(self, plaintext: str) -> str:
        return self._fernet.encrypt(plaintext.encode()).decode()

    def open(self, sealed: str) -> str:
        try:
            return self._fernet.decrypt(sealed.encode()).decode()
        except InvalidToken as exc:
            raise ValueError("a TOTP secret does not open with the configured key") from exc


class DeviceCookies:
    """Signed device cookies: proof that a browser signed in to an account before.

    A login that presents one for the account it names counts against that device's limit
    rather than the account's, so that whoever guesses an account's password (and so spends
    its limit) does not lock its owner out of the browsers they already use (OWASP's device
    cookies against lockout). A cookie is ``v1.<device>.<mac>``: a random device id and an
    HMAC of it and the account under a key derived from the deployment's signing secret. The
    account is named by the digest the login limits already key it by, so a cookie is checked
    before anything is read. No state: a cookie stays good as long as the key does.
    """

    VERSION = "v1"

    def __init__(self, signing_secret: str | bytes) -> None:
        secret = signing_secret.encode() if isinstance(signing_secret, str) else signing_secret
        self._key = hmac.new(secret, b"agentworks device cookies v1", hashlib.sha256).digest()

    def issue(self, account: str, device: str | None = None) -> str:
        """A cookie for ``account`` (its login-limit digest): for ``device`` when the browser
        has one (renewed), else for a new device."""
        device = device or secrets.token_urlsafe(16)
        return f"{self.VERSION}.{device}.{self._mac(device, account)}"

    def device_of(self, cookie: str | None, account: str) -> str | None:
        """The device id of ``cookie`` when it is one this key issued for ``account``."""
        if not cookie or len(cookie) > 200:
            return None
        version, _, rest = cookie.partition(".")
        device, _, mac = rest.partition(".")
        if version != self.VERSION or not device or not mac:
            return None
        if not hmac.compare_digest(mac, self._mac(device, account)):
            return None
        return device

    def _mac(self, device: str, account: str) -> str:
        signed = hmac.new(self._key, f"{device}\n{account}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(signed[:18]).decode()


def dev_totp_key(data_dir: Path) -> str:
    """The development sealing key kept in ``DATA_DIR/totp_key`` (made on first use, 0600)."""
    return kept_secret(data_dir / "totp_key", lambda: Fernet.generate_key().decode())


def kept_secret(path: Path, make: Callable[[], str]) -> str:
    """The secret kept in ``path`` (mode 0600), made with ``make`` and written on first use.

    Processes that start together (``dev`` and a ``token`` command) may race to make it: it is
    published whole, the first one written wins and every caller reads that one.
    """
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(make())
    try:
        os.link(partial, path)  # published whole; another process may have won the race
    except FileExistsError:
        pass
    finally:
        partial.unlink()
    return path.read_text().strip()
