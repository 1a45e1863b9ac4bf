"""Settings a process could start with but never work under are refused at load, in one line.

Each of these used to pass the settings and fail later: a traceback from the first Redis client
or sealing box built (exit 1 instead of 2), or a server that answered ready and then failed
every authenticated request with INTERNAL.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from credentials import rsa_pem_pair

from infra.settings import ConfigurationError, Settings, jwt_keys


@pytest.mark.parametrize(
    "url",
    [
        "localhost:6379",
        "http://:hunter2secret@cache:6379/0",
        "redis//cache",
        # A redis:// scheme but a port redis cannot read (an unencoded ':' or '@' in the
        # password moves part of it there): passed, then every process that builds a Redis
        # client (serve, orchestrator) died with a traceback.
        "redis://:hunter2secret@cache:notaport/0",
        "rediss://cache:99999/0",
    ],
)
def test_a_redis_url_redis_cannot_use_is_refused_without_repeating_it(url: str) -> None:
    with pytest.raises(ConfigurationError, match="AGENTWORKS_REDIS_URL") as refused:
        Settings.load(redis_url=url)

    assert "hunter2secret" not in str(refused.value)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize(
    "url", ["redis://cache:6379/0", "rediss://:pw@cache:6380/1", "unix:///tmp/redis.sock", ""]
)
def test_redis_urls_redis_accepts_pass(url: str) -> None:
    assert Settings.load(redis_url=url).redis_url == (url or None)


def test_a_totp_key_that_is_no_fernet_key_is_refused_without_repeating_it() -> None:
    with pytest.raises(ConfigurationError, match="AGENTWORKS_TOTP_ENCRYPTION_KEY") as refused:
        Settings.load(totp_encryption_key="not-a-fernet-key-hunter2")

    assert "hunter2" not in str(refused.value)


def test_an_hs256_secret_too_short_to_verify_with_is_refused_in_every_environment(
    tmp_path: Path,
) -> None:
    for env in ("dev", "test"):
        settings = Settings.load(env=env, jwt_secret="short-secret", data_dir=tmp_path)
        with pytest.raises(ConfigurationError, match="AGENTWORKS_JWT_SECRET is 12 bytes") as no:
            jwt_keys(settings)
        assert "short-secret" not in str(no.value)

    assert jwt_keys(Settings.load(jwt_secret="s" * 32)).secret == "s" * 32


def test_an_rs256_public_key_that_is_no_key_is_refused(tmp_path: Path) -> None:
    private, public = rsa_pem_pair()
    settings = Settings.load(jwt_public_key="not a pem", data_dir=tmp_path)

    with pytest.raises(ConfigurationError, match="AGENTWORKS_JWT_PUBLIC_KEY"):
        jwt_keys(settings)
    with pytest.raises(ConfigurationError, match="AGENTWORKS_JWT_PRIVATE_KEY"):
        jwt_keys(Settings.load(jwt_public_key=public, jwt_private_key="not a pem"))
    keys = jwt_keys(Settings.load(jwt_public_key=public, jwt_private_key=private))
    assert keys.public_key == public
    assert keys.private_key == private


@pytest.mark.parametrize(
    "proxies", ["10.0.0.1/8", "proxy.internal", "10.0.0.0/33", "10.0.0.0/8,,x"]
)
def test_a_trusted_proxy_that_is_no_address_or_network_is_refused_naming_it(proxies: str) -> None:
    with pytest.raises(ConfigurationError, match="AGENTWORKS_TRUSTED_PROXIES") as refused:
        Settings.load(trusted_proxies=proxies)

    assert "is not an IP address or network" in str(refused.value)


def test_trusted_proxy_addresses_and_networks_pass() -> None:
    proxies = "10.0.0.0/8, 192.168.1.5,::1, fd00::/8"

    assert Settings.load(trusted_proxies=proxies).trusted_proxies == proxies
    assert Settings.load(trusted_proxies="").trusted_proxies == ""


@pytest.mark.parametrize(
    "origins",
    [
        "*",  # with credentials allowed, CORS echoed any origin back: every site could call
        "https://app.example, *",
        "null",  # the origin of sandboxed frames and local files, any page can claim it
        "https://app.example/",  # a path: no browser sends it, no request ever matched
        "app.example",
        "ftp://app.example",
        # Browsers leave the scheme's default port out of Origin, spell a host in its ASCII
        # (IDNA) form and an IPv6 address in its shortest: none of these ever matched.
        "https://app.example:443",
        "http://app.example:80",
        "https://bücher.example",
        "http://[0:0:0:0:0:0:0:1]:3000",
    ],
)
def test_a_cors_origin_that_is_no_single_web_origin_is_refused_naming_it(origins: str) -> None:
    with pytest.raises(ConfigurationError, match="AGENTWORKS_CORS_ORIGINS"):
        Settings.load(cors_origins=origins)


def test_cors_origins_that_are_web_origins_pass() -> None:
    origins = "https://app.example, http://localhost:5173,https://xn--bcher-kva.example:8443,"
    origins += "http://[::1]:3000"
    assert Settings.load(cors_origins=origins).cors_origins == origins
