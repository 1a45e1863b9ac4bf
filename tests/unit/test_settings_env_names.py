"""An ``AGENTWORKS_*`` environment variable that is no setting is refused at load, naming it.

Settings used to ignore such names: ``AGENTWORKS_DATABSE_URL`` ran the process on the embedded
database (the default) without a word.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from infra.settings import (
    ENV_PREFIX,
    OTHER_ENV_NAMES,
    ConfigurationError,
    Settings,
    check_env_names,
)

REPO = Path(__file__).resolve().parents[2]


def test_a_misspelt_setting_is_refused_naming_it_and_the_setting_meant(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AGENTWORKS_DATABSE_URL", "postgresql://db.internal/agentworks")

    with pytest.raises(ConfigurationError) as refused:
        Settings.load()

    message = str(refused.value)
    assert "AGENTWORKS_DATABSE_URL (did you mean AGENTWORKS_DATABASE_URL?)" in message
    assert "db.internal" not in message  # values may be secrets: only names are repeated
    assert "\n" not in message


def test_every_unknown_name_is_listed_each_with_its_closest_setting_or_none() -> None:
    environ = {
        "AGENTWORKS_LOG_LEVLE": "DEBUG",
        "AGENTWORKS_JWT_SECERT": "x",
        "AGENTWORKS_QWERTY": "1",
        "AGENTWORKS_LOG_LEVEL": "DEBUG",
        "PATH": "/usr/bin",
    }

    with pytest.raises(ConfigurationError) as refused:
        check_env_names(environ)

    message = str(refused.value)
    assert "AGENTWORKS_JWT_SECERT (did you mean AGENTWORKS_JWT_SECRET?)" in message
    assert "AGENTWORKS_LOG_LEVLE (did you mean AGENTWORKS_LOG_LEVEL?)" in message
    assert "AGENTWORKS_QWERTY (no setting is named like it)" in message
    assert "AGENTWORKS_LOG_LEVEL " not in message
    assert "PATH" not in message


def test_names_are_compared_without_case_as_the_settings_read_them() -> None:
    check_env_names({"agentworks_log_level": "DEBUG"})

    with pytest.raises(ConfigurationError, match=r"agentworks_log_levle \(did you mean"):
        check_env_names({"agentworks_log_levle": "DEBUG"})


def test_every_setting_and_the_names_read_elsewhere_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    names = [f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields]
    check_env_names(dict.fromkeys([*names, *OTHER_ENV_NAMES], ""))
    for name, value in {"AGENTWORKS_TEST_DB_PREFIX": "aw_", "AGENTWORKS_LOG_LEVEL": "INFO"}.items():
        monkeypatch.setenv(name, value)

    assert Settings.load().log_level == "INFO"


def test_every_agentworks_name_the_repository_sets_or_reads_is_a_setting_or_declared() -> None:
    # Tests, CI, benchmarks, compose and the image set these for processes that load settings.
    known = {f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields} | set(OTHER_ENV_NAMES)
    places = [
        *REPO.glob("tests/**/*.py"),
        *REPO.glob("bench/**/*.py"),
        REPO / ".ci" / "run",
        REPO / "docker-compose.yml",
        REPO / "infra" / "Dockerfile",
    ]
    found: dict[str, set[str]] = {}
    for path in places:
        if path.is_file() and path != Path(__file__).resolve():  # this file misspells on purpose
            for name in re.findall(r"\bAGENTWORKS_[A-Z0-9_]*[A-Z0-9]\b", path.read_text()):
                found.setdefault(name, set()).add(str(path.relative_to(REPO)))
    # A Python name in a test, not an environment variable; a typo test_cli sets on purpose.
    not_env = {"AGENTWORKS_SERVICES", "AGENTWORKS_DATABSE_URL"}

    stray = {name: where for name, where in found.items() if name not in known | not_env}

    assert stray == {}


def test_kubernetes_service_links_of_a_service_named_agentworks_pass() -> None:
    # Kubernetes gives every pod these for each Service of its namespace (enableServiceLinks,
    # on by default): a Service named "agentworks" (or "agentworks-redis") yields names with the
    # prefix that no operator chose. Refusing them stopped every process of such a deployment.
    check_env_names(
        {
            "AGENTWORKS_SERVICE_HOST": "10.96.12.7",
            "AGENTWORKS_SERVICE_PORT": "8000",
            "AGENTWORKS_SERVICE_PORT_HTTP": "8000",
            "AGENTWORKS_PORT": "tcp://10.96.12.7:8000",
            "AGENTWORKS_PORT_8000_TCP": "tcp://10.96.12.7:8000",
            "AGENTWORKS_PORT_8000_TCP_PROTO": "tcp",
            "AGENTWORKS_PORT_8000_TCP_PORT": "8000",
            "AGENTWORKS_PORT_8000_TCP_ADDR": "10.96.12.7",
            "AGENTWORKS_REDIS_SERVICE_HOST": "fd00::12",
            "AGENTWORKS_REDIS_PORT": "tcp://[fd00::12]:6379",
        }
    )


def test_a_typo_shaped_like_a_service_link_but_not_valued_like_one_is_still_refused() -> None:
    with pytest.raises(ConfigurationError, match=r"AGENTWORKS_REDIS_PORT \("):
        check_env_names({"AGENTWORKS_REDIS_PORT": "redis://cache:6379/0"})
    with pytest.raises(ConfigurationError, match=r"AGENTWORKS_SERVICE_HOST \("):
        check_env_names({"AGENTWORKS_SERVICE_HOST": "postgresql://db/agentworks"})
