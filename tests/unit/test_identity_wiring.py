"""How settings shape sign-in: the cookie's Secure flag, the sealing key, OIDC configuration."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from domain.errors import Forbidden
from infra.identity import build_auth, build_oidc
from infra.settings import ConfigurationError, JwtKeys, Settings
from tests.unit.aw_builders import new_app

KEYS = JwtKeys(algorithm="HS256", secret="s" * 40)


def test_the_refresh_cookie_is_secure_outside_dev(tmp_path: Path) -> None:
    dev = build_auth(Settings(env="dev", data_dir=tmp_path), new_app(), KEYS, tmp_path)
    prod = build_auth(
        Settings(env="prod", totp_encryption_key=Fernet.generate_key().decode()),
        new_app(), KEYS, tmp_path,
    )  # fmt: skip
    assert dev.secure_cookie is False
    assert prod.secure_cookie is True
    assert dev.identity.access_tokens.ttl_seconds == 900


def test_dev_keeps_a_sealing_key_in_the_data_dir_and_prod_without_one_refuses_mfa(
    tmp_path: Path,
) -> None:
    build_auth(Settings(env="dev", data_dir=tmp_path), new_app(), KEYS, tmp_path)
    key = tmp_path / "totp_key"
    assert key.stat().st_mode & 0o777 == 0o600
    assert Fernet(key.read_text().encode())
    prod = build_auth(Settings(env="prod"), new_app(), KEYS, tmp_path / "unused")
    user_id = prod.identity.signup(email="a@example.com", password="long enough pw", name="A")
    with pytest.raises(Forbidden, match="AGENTWORKS_TOTP_ENCRYPTION_KEY"):
        prod.identity.mfa_enroll(user_id)


def test_oidc_needs_issuer_and_audience_together(tmp_path: Path) -> None:
    identity = build_auth(
        Settings(env="dev", data_dir=tmp_path), new_app(), KEYS, tmp_path
    ).identity
    assert build_oidc(Settings(), identity) is None
    with pytest.raises(ConfigurationError, match="AUDIENCE"):
        build_oidc(Settings(oidc_issuer="https://idp.example"), identity)
    made = build_oidc(Settings(oidc_issuer="https://idp.example", oidc_audience="spa"), identity)
    assert made is not None
    assert made.verifier.issuer == "https://idp.example"


def test_processes_starting_together_agree_on_one_dev_sealing_key(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from adapters.credentials import dev_totp_key

    with ThreadPoolExecutor(8) as pool:
        keys = set(pool.map(lambda _: dev_totp_key(tmp_path), range(32)))
    assert len(keys) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["totp_key"]


def test_device_cookies_are_signed_per_account_under_the_token_key(tmp_path: Path) -> None:
    auth = build_auth(Settings(env="dev", data_dir=tmp_path), new_app(), KEYS, tmp_path)
    cookies = auth.device_cookies
    assert cookies is not None
    cookie = cookies.issue("account-a")
    device = cookies.device_of(cookie, "account-a")
    assert device is not None
    assert cookies.issue("account-a", device).split(".")[1] == device  # renewed, same device
    assert cookies.device_of(cookie, "account-b") is None
    version, _, mac = cookie.split(".")
    for forged in [
        f"{version}.another-device.{mac}",
        f"v2.{device}.{mac}",
        f"{version}.{device}.{mac[:-1]}",
        f"{version}.{device}",
        "",
        None,
        cookie + "." + "x" * 300,
    ]:
        assert cookies.device_of(forged, "account-a") is None, forged
    other_key = JwtKeys(algorithm="HS256", secret="t" * 40)
    elsewhere = build_auth(Settings(env="dev", data_dir=tmp_path), new_app(), other_key, tmp_path)
    assert elsewhere.device_cookies is not None
    assert elsewhere.device_cookies.device_of(cookie, "account-a") is None
    verify_only = JwtKeys(algorithm="RS256", public_key="unused here")
    assert (
        build_auth(Settings(data_dir=tmp_path), new_app(), verify_only, tmp_path).device_cookies
        is None
    )
