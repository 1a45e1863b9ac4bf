"""Who each component logs in as: its role's URL and password, from settings or the data dir."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
from hypothesis import given
from hypothesis import strategies as st
from psycopg.conninfo import conninfo_to_dict

from adapters.postgres import login_url
from infra.bootstrap import component_url
from infra.settings import ConfigurationError, Settings, db_login, db_logins

if TYPE_CHECKING:
    from pathlib import Path

URLS = (
    "postgresql://owner:secret@db.example:6543/agentworks?sslmode=require",
    "postgres://owner@[::1]:5432/agentworks",
    "postgresql://postgres:@/agentworks?host=/tmp/socket-dir",
    "postgresql://h1:5432,h2:5433/agentworks?user=owner&password=secret&application_name=aw",
    "host=127.0.0.1 port=5432 dbname=agentworks user=owner password='s e\\'cret' sslmode=prefer",
)


@pytest.mark.parametrize("url", URLS)
@given(
    password=st.text(
        st.characters(exclude_categories=["Cs"], exclude_characters="\x00"),
        min_size=1,
        max_size=40,
    )
)
def test_login_url_swaps_only_the_user_and_password(url: str, password: str) -> None:
    swapped = conninfo_to_dict(login_url(url, "agentworks_api", password))
    original = conninfo_to_dict(url)
    assert swapped["user"] == "agentworks_api"
    assert swapped["password"] == password
    assert {k: v for k, v in swapped.items() if k not in ("user", "password")} == {
        k: v for k, v in original.items() if k not in ("user", "password")
    }


def test_login_url_without_a_password_keeps_none_of_the_owner_s() -> None:
    swapped = conninfo_to_dict(login_url(URLS[0], "agentworks_relay"))
    assert swapped["user"] == "agentworks_relay"
    assert "password" not in swapped
    assert login_url(URLS[0], None) == URLS[0]


def test_configured_passwords_are_used(tmp_path: Path) -> None:
    settings = Settings.load(
        data_dir=tmp_path,
        db_app_role="writer_role",
        db_writer_password="w",
        db_api_password="a",
        db_projector_password="p",
        db_relay_password="r",
    )
    assert db_logins(settings) == {
        "writer_role": "w",
        "agentworks_api": "a",
        "agentworks_projector": "p",
        "agentworks_relay": "r",
    }
    assert list(tmp_path.iterdir()) == []
    url = conninfo_to_dict(component_url(settings, URLS[0], "projector"))
    assert (url["user"], url["password"]) == ("agentworks_projector", "p")


def test_dev_passwords_are_generated_once_and_kept_private(tmp_path: Path) -> None:
    settings = Settings.load(data_dir=tmp_path / "data")
    first = db_logins(settings)
    again = db_logins(Settings.load(data_dir=tmp_path / "data"))
    assert first == again
    assert len(set(first.values())) == 4
    assert all(len(password) >= 32 for password in first.values())
    for component in ("writer", "api", "projector", "relay"):
        path = tmp_path / "data" / f"db_password_{component}"
        assert path.stat().st_mode & 0o077 == 0
    assert first["agentworks_api"] not in repr(db_login(settings, "api"))


def test_production_refuses_to_run_without_the_component_s_password(tmp_path: Path) -> None:
    settings = Settings.load(env="prod", data_dir=tmp_path, db_api_password="a")
    assert db_login(settings, "api").password == "a"
    with pytest.raises(ConfigurationError, match="AGENTWORKS_DB_RELAY_PASSWORD is not set"):
        db_login(settings, "relay")
    assert list(tmp_path.iterdir()) == []
