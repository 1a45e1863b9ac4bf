"""Ed25519 keys that sign audit exports, and the development key kept in the data dir.

An auditor verifies an export offline with the public key alone, so the key id printed in every
trailer is derived from the public key (the first 16 hex digits of the SHA-256 of its raw 32
bytes): anyone holding the public key can tell whether a trailer claims it.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from domain.errors import ValidationFailed

if TYPE_CHECKING:
    from pathlib import Path

#: File of the development signing key in the data dir (PEM, PKCS#8, mode 0600).
DEV_AUDIT_KEY_FILE = "audit_signing_key.pem"


class BadKey(ValidationFailed):
    """A PEM that is not an Ed25519 key of the expected kind."""


@dataclass(frozen=True)
class Signer:
    """Signs with an Ed25519 private key; ``key_id`` names its public half."""

    private_key: Ed25519PrivateKey

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.private_key.public_key()

    @property
    def key_id(self) -> str:
        return key_id(self.public_key)

    def sign(self, message: bytes) -> str:
        """The signature of ``message``, standard base64."""
        return base64.b64encode(self.private_key.sign(message)).decode("ascii")

    def public_pem(self) -> str:
        return public_pem(self.public_key)


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_pem(public_key: Ed25519PublicKey) -> str:
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


def signature_holds(public_key: Ed25519PublicKey, message: bytes, signature: str) -> bool:
    """Whether ``signature`` (standard base64, spelt as :meth:`Signer.sign` spells it) holds.

    Only the one spelling: base64 of 64 bytes ends in a digit with 4 bits that decode to
    nothing, so 15 other spellings decode to the same signature, and a trailer edited so would
    pass for untouched."""
    try:
        raw = base64.b64decode(signature.encode("ascii"), validate=True)
        if base64.b64encode(raw).decode("ascii") != signature:
            return False
        public_key.verify(raw, message)
    except (InvalidSignature, ValueError, UnicodeEncodeError):
        return False
    return True


def load_private_key(pem: str, *, source: str) -> Ed25519PrivateKey:
    """An unencrypted Ed25519 private key from PEM text; ``source`` names it in errors."""
    try:
        key = serialization.load_pem_private_key(pem.encode(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise BadKey(f"{source} is not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise BadKey(f"{source} is not an Ed25519 key")
    return key


def load_public_key(pem: str, *, source: str) -> Ed25519PublicKey:
    """An Ed25519 public key from PEM text (a private key's PEM gives its public half)."""
    if "PRIVATE KEY" in pem:
        return load_private_key(pem, source=source).public_key()
    try:
        key = serialization.load_pem_public_key(pem.encode())
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise BadKey(f"{source} is not a PEM public key: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise BadKey(f"{source} is not an Ed25519 key")
    return key


def dev_signing_key(data_dir: Path, *, create: bool) -> Ed25519PrivateKey | None:
    """The development signing key kept in ``data_dir``; generated on first use when ``create``.

    Published like the dev JWT secret: written aside with mode 0600, then hard-linked into place,
    so two processes starting together agree on one key. ``None`` when absent and not created.
    """
    path = data_dir / DEV_AUDIT_KEY_FILE
    try:
        if path.exists() or not create:
            return _read_dev_key(path)
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        pem = Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        temp = data_dir / f".{DEV_AUDIT_KEY_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(pem)
                handle.flush()
                os.fsync(handle.fileno())
            with contextlib.suppress(FileExistsError):  # another process won: use its key
                os.link(temp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()
        return _read_dev_key(path)
    except OSError as exc:
        raise BadKey(f"cannot keep the dev audit signing key in {data_dir}: {exc}") from exc


def _read_dev_key(path: Path) -> Ed25519PrivateKey | None:
    try:
        pem = path.read_text(encoding="ascii")
    except FileNotFoundError:
        return None
    return load_private_key(pem, source=str(path))
