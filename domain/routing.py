"""Which provider and model answer a call: router policy, fallback chain and circuit breakers.

All of it is pure: the orchestrator feeds in what it observed (latencies, failures, the clock)
and gets back an ordered list of candidates to try. A run pinned to a provider never falls back to
another provider's model; an unpinned run walks the chain in policy order, skipping providers
whose circuit is open.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

from domain.errors import ValidationFailed
from domain.pricing import PriceTable

POLICIES = ("cheapest", "fastest", "pinned")
PROVIDERS = ("simulated", "openai", "anthropic")


@dataclass(frozen=True)
class ModelOption:
    """A model the router may choose, and what it can do."""

    provider: str
    model: str
    capabilities: frozenset[str] = frozenset({"text", "code"})


MODEL_CATALOGUE: tuple[ModelOption, ...] = (
    ModelOption("simulated", "sim-1"),
    ModelOption("openai", "gpt-4o-mini"),
    ModelOption("openai", "gpt-4o"),
    ModelOption("anthropic", "claude-3-5-haiku-latest"),
    ModelOption("anthropic", "claude-3-5-sonnet-latest"),
)


@dataclass(frozen=True)
class RouteRequest:
    """What a run asks of the router."""

    policy: str = "cheapest"
    provider: str | None = None
    model: str | None = None
    needs: frozenset[str] = frozenset({"text"})

    @property
    def pinned(self) -> bool:
        return self.provider is not None or self.policy == "pinned"


def validate_choice(
    *,
    provider: str | None,
    model: str | None,
    policy: str | None,
    prices: PriceTable,
    at: datetime,
    catalogue: Sequence[ModelOption] = MODEL_CATALOGUE,
) -> None:
    """Refuse an unknown policy, provider or model, or a model with no price in force."""
    if policy is not None and policy not in POLICIES:
        raise ValidationFailed(f"policy {policy!r} is not one of {', '.join(POLICIES)}")
    if policy == "pinned" and provider is None:
        raise ValidationFailed("policy 'pinned' needs a provider (and optionally a model)")
    if provider is None:
        if model is not None:
            raise ValidationFailed(f"model {model!r} needs its provider")
        return
    if provider not in PROVIDERS:
        raise ValidationFailed(f"provider {provider!r} is not one of {', '.join(PROVIDERS)}")
    if model is None:
        return
    known = {(o.provider, o.model) for o in catalogue} | set(prices.models())
    if (provider, model) not in known:
        raise ValidationFailed(f"model {model!r} is not a known model of provider {provider}")
    prices.require(provider, model, at)


def route(
    request: RouteRequest,
    *,
    available: Iterable[str],
    prices: PriceTable,
    at: datetime,
    latency_ms: dict[tuple[str, str], float] | None = None,
    catalogue: Sequence[ModelOption] = MODEL_CATALOGUE,
) -> list[ModelOption]:
    """The candidates in the order to try them; the first is the choice, the rest the fallbacks.

    Only models of available providers with a price in force and the capabilities asked for are
    candidates. ``cheapest`` orders by the price of a typical call (output weighs 4x input, as
    agents answer at length); ``fastest`` by observed latency, unknown latencies last (then by
    price); a pin keeps only the pinned provider (and model).
    """
    up = set(available)
    options = [
        o
        for o in _with_priced(catalogue, prices)
        if o.provider in up
        and request.needs <= o.capabilities
        and prices.in_force(o.provider, o.model, at) is not None
    ]
    if request.provider is not None:
        options = [o for o in options if o.provider == request.provider]
        if request.model is not None:
            options = [o for o in options if o.model == request.model]
    if not options:
        wanted = (
            f"{request.provider}/{request.model or 'any model'}"
            if request.provider
            else "any provider"
        )
        raise ValidationFailed(f"no model is available for {wanted}: no API key or no price")

    def price_key(o: ModelOption) -> tuple[object, ...]:
        row = prices.require(o.provider, o.model, at)
        return (row.input_per_mtok + 4 * row.output_per_mtok, o.provider, o.model)

    if request.policy == "fastest":
        seen = latency_ms or {}
        return sorted(
            options,
            key=lambda o: (
                (o.provider, o.model) not in seen,
                seen.get((o.provider, o.model), 0.0),
                *price_key(o),
            ),
        )
    return sorted(options, key=price_key)


def _with_priced(catalogue: Sequence[ModelOption], prices: PriceTable) -> list[ModelOption]:
    """The catalogue plus any model the price table adds (a price makes a model callable)."""
    known = {(o.provider, o.model) for o in catalogue}
    extra = [
        ModelOption(p, m) for p, m in prices.models() if (p, m) not in known and p in PROVIDERS
    ]
    return [*catalogue, *extra]


@dataclass
class LatencyTracker:
    """Observed latency per model, an exponentially weighted mean so recent calls count most."""

    weight: float = 0.3
    means: dict[tuple[str, str], float] = field(default_factory=dict)

    def observe(self, provider: str, model: str, latency_ms: float) -> None:
        key = (provider, model)
        old = self.means.get(key)
        self.means[key] = latency_ms if old is None else old + self.weight * (latency_ms - old)


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


@dataclass
class CircuitBreaker:
    """One provider's breaker: opens after ``threshold`` failures in a row, lets one trial call
    through after ``cooldown_seconds``, closes on its success and opens again on its failure.
    A trial whose call ends without a verdict (cancelled, stopped by a budget) is given up a
    cooldown after it went out, and another goes.

    Times are monotonic seconds given by the caller, so the policy is testable without a clock.

    ``workspaces_to_open``: how many workspaces' calls must be among the failures in a row
    (those named by ``failed(by=...)``) before it opens, so that a provider's breaker shared by
    every tenant opens on what several of them see, not on one tenant's requests alone.
    """

    threshold: int = 3
    cooldown_seconds: float = 30.0
    workspaces_to_open: int = 1
    state: BreakerState = BreakerState.CLOSED
    failures: int = 0
    opened_at: float = 0.0
    trial_out: bool = False
    trial_at: float = 0.0
    failing: set[str] = field(default_factory=set)

    def would_allow(self, now: float) -> bool:
        """Whether :meth:`allows` would let a call through now, taking no trial."""
        if self.state is BreakerState.CLOSED:
            return True
        if self.state is BreakerState.OPEN:
            return now - self.opened_at >= self.cooldown_seconds
        return not self.trial_out or now - self.trial_at >= self.cooldown_seconds

    def wait(self, now: float) -> float:
        """Seconds until :meth:`would_allow` may say yes (0: now). A half-open breaker whose
        trial is out may close sooner, when that trial succeeds."""
        if self.state is BreakerState.CLOSED or (
            self.state is BreakerState.HALF_OPEN and not self.trial_out
        ):
            return 0.0
        since = self.opened_at if self.state is BreakerState.OPEN else self.trial_at
        return max(0.0, since + self.cooldown_seconds - now)

    def allows(self, now: float) -> bool:
        """Whether a call may go out now (a half-open breaker lets exactly one through)."""
        if not self.would_allow(now):
            return False
        if self.state is not BreakerState.CLOSED:
            # Cooled down (open) or its trial free again (half-open): this call is the trial.
            self.state, self.trial_out, self.trial_at = BreakerState.HALF_OPEN, True, now
        return True

    def succeeded(self) -> BreakerState:
        self.state, self.failures, self.trial_out = BreakerState.CLOSED, 0, False
        self.failing.clear()
        return self.state

    def failed(self, now: float, *, by: str | None = None) -> BreakerState:
        """A failure; ``by``: the workspace whose call it was (``None``: the provider's own
        fault whoever called, which counts as every workspace's)."""
        self.failures += 1
        if by is not None:
            self.failing.add(by)
        widespread = by is None or len(self.failing) >= self.workspaces_to_open
        if self.state is BreakerState.HALF_OPEN or (self.failures >= self.threshold and widespread):
            self.state, self.opened_at, self.trial_out = BreakerState.OPEN, now, False
        return self.state


@dataclass
class Breakers:
    """A breaker per provider, and one per provider and workspace, created closed on first use.

    A call goes to a provider only when both let it through. Failures of one workspace's calls
    open that workspace's breaker; the provider's opens once failures in a row come from two
    workspaces or more (or a failure is the provider's whoever calls: its key refused), so that
    one tenant whose requests time out (a huge prompt, say) does not turn every other tenant's
    runs away from a provider that answers them well."""

    threshold: int = 3
    cooldown_seconds: float = 30.0
    by_provider: dict[str, CircuitBreaker] = field(default_factory=dict)
    by_workspace: dict[tuple[str, str], CircuitBreaker] = field(default_factory=dict)

    def of(self, provider: str) -> CircuitBreaker:
        breaker = self.by_provider.get(provider)
        if breaker is None:
            breaker = self.by_provider[provider] = CircuitBreaker(
                threshold=self.threshold, cooldown_seconds=self.cooldown_seconds,
                workspaces_to_open=2,
            )  # fmt: skip
        return breaker

    def of_workspace(self, provider: str, workspace: str) -> CircuitBreaker:
        breaker = self.by_workspace.get((provider, workspace))
        if breaker is None:
            breaker = self.by_workspace[(provider, workspace)] = CircuitBreaker(
                threshold=self.threshold, cooldown_seconds=self.cooldown_seconds
            )
        return breaker

    def allows(self, provider: str, workspace: str, now: float) -> bool:
        """Whether a call of ``workspace`` may go to ``provider`` now. A half-open breaker's
        trial is taken only by a call both breakers let through: one breaker's trial taken while
        the other refused would wait a cooldown with no call made."""
        breakers = [self.of(provider)]
        if (mine := self.by_workspace.get((provider, workspace))) is not None:
            breakers.append(mine)
        if not all(breaker.would_allow(now) for breaker in breakers):
            return False
        return all([breaker.allows(now) for breaker in breakers])

    def wait(self, provider: str, workspace: str, now: float) -> float:
        """Seconds until both of a call's breakers may let it through (0: now); creates none
        (a breaker not yet made is closed)."""
        breakers = (self.by_provider.get(provider), self.by_workspace.get((provider, workspace)))
        return max((b.wait(now) for b in breakers if b is not None), default=0.0)

    def succeeded(self, provider: str, workspace: str) -> None:
        """A call answered: the provider works, for this workspace too (whose breaker, closed
        and clean, is forgotten: one per workspace that ever called would only grow)."""
        self.of(provider).succeeded()
        self.by_workspace.pop((provider, workspace), None)

    def failed(
        self, provider: str, workspace: str, now: float, *, provider_wide: bool = False
    ) -> list[str]:
        """A call failed; which breakers it opened: ``"provider"``, ``"workspace"``."""
        opened = []
        for name, breaker, by in (
            ("provider", self.of(provider), None if provider_wide else workspace),
            ("workspace", self.of_workspace(provider, workspace), workspace),
        ):
            was = breaker.state
            if breaker.failed(now, by=by) is BreakerState.OPEN and was is not BreakerState.OPEN:
                opened.append(name)
        return opened


def backoff_seconds(
    attempt: int, *, retry_after: float | None, base: float = 0.2, cap: float = 10.0, jitter: float
) -> float:
    """How long to wait before retry number ``attempt`` (1-based).

    The provider's ``retry-after`` when it gave one, else full-jitter exponential backoff
    (``jitter`` in [0, 1) comes from the caller, so the policy stays deterministic)."""
    if retry_after is not None:
        return max(0.0, retry_after)
    return float(min(cap, base * 2.0 ** (attempt - 1)) * jitter)
