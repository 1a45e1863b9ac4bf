"""The subscription limits reach the API from the environment, through the composition root."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from infra.bootstrap import build_write_side
from infra.settings import ConfigurationError, Settings
from infra.stack import api_services
from read_api.broadcast import LocalBroadcaster

if TYPE_CHECKING:
    from pathlib import Path


def test_the_limits_are_read_from_the_environment_and_handed_to_the_api(
    database_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("AGENTWORKS_MAX_SUBSCRIPTIONS_PER_CONNECTION", "3")
    monkeypatch.setenv("AGENTWORKS_MAX_SUBSCRIPTIONS_PER_USER", "7")
    settings = Settings.load(env="test")
    write = build_write_side(database_url, pool_size=1)
    try:
        services = api_services(
            settings, database_url, write=write, broadcaster=LocalBroadcaster(), data_dir=tmp_path
        )
        try:
            assert services.max_subscriptions_per_connection == 3
            assert services.max_subscriptions_per_user == 7
        finally:
            services.pool.close()
    finally:
        write.close()


def test_defaults_are_20_per_connection_and_100_per_user(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AGENTWORKS_MAX_SUBSCRIPTIONS_PER_CONNECTION", raising=False)
    monkeypatch.delenv("AGENTWORKS_MAX_SUBSCRIPTIONS_PER_USER", raising=False)
    settings = Settings.load()
    assert settings.max_subscriptions_per_connection == 20
    assert settings.max_subscriptions_per_user == 100


@pytest.mark.parametrize(
    "variable",
    ["AGENTWORKS_MAX_SUBSCRIPTIONS_PER_CONNECTION", "AGENTWORKS_MAX_SUBSCRIPTIONS_PER_USER"],
)
@pytest.mark.parametrize("value", ["0", "-1", "many"])
def test_a_limit_that_is_not_a_positive_number_is_refused_naming_it(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigurationError, match=variable):
        Settings.load()
