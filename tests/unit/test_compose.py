"""``docker-compose.yml`` describes the production stack, and every command it runs exists."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import typer
import typer.core
import yaml  # type: ignore[import-untyped]

from infra.cli import app

REPO = Path(__file__).resolve().parents[2]
AGENTWORKS_SERVICES = ("serve", "relay", "worker")


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


#: The database roles' passwords each service may hold: its own roles' only.
DB_PASSWORDS = {
    "migrate": {"WRITER", "API", "PROJECTOR", "RELAY"},
    "serve": {"WRITER", "API"},
    "relay": {"RELAY"},
    "worker": {"PROJECTOR"},
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
        owner_password = "${POSTGRES_PASSWORD" in env["AGENTWORKS_DATABASE_URL"]
        assert owner_password == (name == "migrate"), name
        assert ("AGENTWORKS_JWT_SECRET" in env) == (name == "serve"), name
