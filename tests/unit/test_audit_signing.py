"""Which key signs audit exports: the configured Ed25519 key, else the dev key in the data dir."""

from __future__ import annotations

import stat
from typing import TYPE_CHECKING

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.rsa import generate_private_key

from adapters.audit_signing import (
    DEV_AUDIT_KEY_FILE,
    BadKey,
    dev_signing_key,
    key_id,
    signature_holds,
)
from infra.audit_cli import audit_signer
from infra.settings import ConfigurationError, Settings

if TYPE_CHECKING:
    from pathlib import Path


def _pem(key: object) -> str:
    return key.private_bytes(  # type: ignore[attr-defined,no-any-return]
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def test_dev_key_is_generated_once_with_mode_0600(tmp_path: Path) -> None:
    assert dev_signing_key(tmp_path, create=False) is None
    first = audit_signer(Settings(data_dir=tmp_path))
    again = audit_signer(Settings(data_dir=tmp_path))
    assert first.key_id == again.key_id
    assert stat.S_IMODE((tmp_path / DEV_AUDIT_KEY_FILE).stat().st_mode) == 0o600
    message = b"count and head hash"
    assert signature_holds(again.public_key, message, first.sign(message))
    assert not signature_holds(again.public_key, b"something else", first.sign(message))


def test_configured_key_wins_and_accepts_escaped_newlines(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    escaped = _pem(key).strip().replace("\n", "\\n")
    signer = audit_signer(Settings(data_dir=tmp_path, audit_signing_key=escaped))
    assert signer.key_id == key_id(key.public_key())
    assert not (tmp_path / DEV_AUDIT_KEY_FILE).exists()


def test_production_without_a_key_is_refused(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, env="prod", jwt_secret="s" * 40)
    with pytest.raises(ConfigurationError, match="AGENTWORKS_AUDIT_SIGNING_KEY"):
        audit_signer(settings)


def test_a_key_that_is_not_ed25519_is_refused(tmp_path: Path) -> None:
    rsa = _pem(generate_private_key(public_exponent=65537, key_size=2048))
    with pytest.raises(BadKey, match="not an Ed25519 key"):
        audit_signer(Settings(data_dir=tmp_path, audit_signing_key=rsa))
    with pytest.raises(BadKey, match="not an unencrypted PEM"):
        audit_signer(Settings(data_dir=tmp_path, audit_signing_key="garbage"))
