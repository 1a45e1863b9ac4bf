"""Wiring of agent runs: the price table, the providers and the orchestrator, from settings."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import httpx
import redis.asyncio
import yaml  # type: ignore[import-untyped]

from adapters.budget_holds import RedisBudgetHolds
from adapters.providers.anthropic import AnthropicProvider
from adapters.providers.openai import OpenAIProvider
from adapters.providers.simulated import SimulatedProvider
from adapters.spend_counter import RedisSpend
from domain.errors import ValidationFailed
from domain.pricing import PriceTable, built_in_price_table
from infra.settings import ConfigurationError
from orchestrator.service import Orchestrator, OrchestratorConfig
from projections.spend import ReadModelSpend

if TYPE_CHECKING:
    from psycopg import Connection
    from psycopg.rows import DictRow
    from psycopg_pool import ConnectionPool
    from pydantic import SecretStr

    from adapters.eventlog import EventLog
    from adapters.providers.base import Provider, SseProvider
    from commands.handlers import AgentWorks
    from domain.budget_holds import SpendReader
    from infra.settings import Settings
    from orchestrator.holds import BudgetHolds


def load_price_table(settings: Settings) -> PriceTable:
    """The built-in prices, or the whole table from ``AGENTWORKS_PRICE_TABLE`` (JSON or YAML)."""
    path = settings.price_table
    if path is None:
        return built_in_price_table()
    try:
        text = path.read_text(encoding="utf-8")
        document = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
        return PriceTable.from_document(document)
    except (OSError, ValueError, yaml.YAMLError, ValidationFailed) as error:
        raise ConfigurationError(f"AGENTWORKS_PRICE_TABLE {path}: {error}") from error


def build_providers(settings: Settings) -> dict[str, Provider]:
    """``simulated`` always; OpenAI and Anthropic only with an API key."""
    timeout = httpx.Timeout(settings.provider_timeout, connect=min(10.0, settings.provider_timeout))
    providers: dict[str, Provider] = {
        "simulated": SimulatedProvider(
            tokens_per_second=settings.simulated_tokens_per_second,
            output_tokens=settings.simulated_output_tokens,
        )
    }
    sse_providers: list[tuple[type[SseProvider], SecretStr | None, str | None]] = [
        (OpenAIProvider, settings.openai_api_key, settings.openai_base_url),
        (AnthropicProvider, settings.anthropic_api_key, settings.anthropic_base_url),
    ]
    for provider_class, key, base_url in sse_providers:
        # An empty key (docker-compose passes unset variables as "") means no key.
        if key is not None and key.get_secret_value():
            providers[provider_class.name] = provider_class(
                api_key=key.get_secret_value(),
                base_url=base_url,
                timeout=timeout,
                idle_timeout=settings.provider_idle_timeout,
            )
    return providers


def orchestrator_config(settings: Settings) -> OrchestratorConfig:
    return OrchestratorConfig(
        concurrency=settings.orchestrator_concurrency,
        run_timeout=settings.run_timeout,
        heartbeat_interval=settings.heartbeat_interval,
        stale_after=settings.stale_after,
        max_reclaims=settings.max_reclaims,
        max_attempts=settings.provider_max_attempts,
    )


def build_orchestrator(
    settings: Settings,
    write: AgentWorks,
    event_log: EventLog,
    read_pool: ConnectionPool[Connection[DictRow]],
    *,
    listen_url: str | None = None,
) -> Orchestrator:
    """An orchestrator writing through ``write`` and following ``event_log`` (its own), whose
    spend checks read the billing read model through ``read_pool`` (or the Redis counter);
    ``listen_url`` wakes it on the store's NOTIFY as soon as runs are requested."""
    write.spend = build_spend_reader(settings, read_pool)
    return Orchestrator(
        write,
        event_log,
        build_providers(settings),
        orchestrator_config(settings),
        holds=build_budget_holds(settings),
        listen_url=listen_url,
    )


def build_budget_holds(settings: Settings) -> BudgetHolds | None:
    """Holds shared through Redis when it is configured, so several orchestrators never
    together overshoot a month; without it each orchestrator holds for its own runs."""
    if settings.redis_url is None:
        return None
    # Short timeouts: each provider call asks for its hold before it starts.
    return RedisBudgetHolds(
        redis.asyncio.Redis.from_url(
            settings.redis_url, socket_timeout=1.0, socket_connect_timeout=1.0
        )
    )


def build_spend_reader(
    settings: Settings, read_pool: ConnectionPool[Connection[DictRow]]
) -> SpendReader:
    """Spend checks read the Redis counter the billing projector feeds when Redis is
    configured (the read model on a missing key or a failure), else the billing read model.
    ``read_pool``: read-model connections (the API's role will do: reads are scoped to their
    workspace)."""
    read_model = ReadModelSpend(read_pool)
    if settings.redis_url is None:
        return read_model
    client = redis.Redis.from_url(
        settings.redis_url, socket_timeout=1.0, socket_connect_timeout=1.0
    )
    return RedisSpend(client, read_model)
