"""The agents that work cards: what each is asked (its prompt) and which models suit it.

A prompt is built from the card's title and description and the outputs of the earlier runs on
the card, newest last, so a coder sees the architect's design and a reviewer sees the code.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from domain.errors import ValidationFailed
from domain.money import billed_amount
from domain.pricing import PriceTable, call_cost_micros

#: How much of each earlier output a prompt quotes; long outputs would crowd out the card.
EARLIER_OUTPUT_CHARS = 4_000


@dataclass(frozen=True)
class AgentSpec:
    name: str
    role: str
    task: str
    needs: frozenset[str]
    max_output_tokens: int


AGENTS: dict[str, AgentSpec] = {
    spec.name: spec
    for spec in (
        AgentSpec(
            "ceo_copilot",
            "You are the CEO's co-pilot: you judge whether work is worth doing and why.",
            "Say in a few paragraphs why this card matters, the risks, and what to do first.",
            frozenset({"text"}),
            600,
        ),
        AgentSpec(
            "prd_writer",
            "You are a product manager who writes crisp product requirement documents.",
            "Write a PRD for this card: problem, users, goals, non-goals, requirements.",
            frozenset({"text"}),
            1200,
        ),
        AgentSpec(
            "architect",
            "You are a software architect.",
            "Design how to build this card: components, data, interfaces, trade-offs.",
            frozenset({"text"}),
            1200,
        ),
        AgentSpec(
            "coder",
            "You are a senior engineer who writes small, tested changes.",
            "Write the code for this card, with tests, following the design above.",
            frozenset({"text", "code"}),
            2000,
        ),
        AgentSpec(
            "reviewer",
            "You are a careful code reviewer.",
            "Review the work above: correctness, tests, risks; end with approve or changes.",
            frozenset({"text", "code"}),
            800,
        ),
    )
}


def agent_named(name: str) -> AgentSpec:
    spec = AGENTS.get(name)
    if spec is None:
        raise ValidationFailed(f"agent {name!r} is not one of {', '.join(sorted(AGENTS))}")
    return spec


EARLIER_RUNS = 3
"""How many of a card's earlier runs a prompt shows, the latest: with every one of them, each new
run on a busy card would send a longer prompt (until its model refuses it as too long), and the
orchestrator would keep every output ever written in memory."""


@dataclass(frozen=True)
class EarlierRun:
    agent: str
    output: str

    @classmethod
    def kept(cls, agent: str, output: str) -> EarlierRun:
        """``output`` as much of it as a prompt can show: stripped, cut one character past what
        is shown, so that the prompt still says it was cut."""
        return cls(agent, output.strip()[: EARLIER_OUTPUT_CHARS + 1])


def build_prompt(
    spec: AgentSpec, *, title: str, description: str, earlier: list[EarlierRun]
) -> list[dict[str, str]]:
    """Chat messages (system, user) for one run of ``spec`` on a card; of ``earlier`` (oldest
    first), the last :data:`EARLIER_RUNS`."""
    parts = [f"Card: {title}", "", description.strip() or "(no description)"]
    for run in earlier[-EARLIER_RUNS:]:
        text = run.output.strip()
        if len(text) > EARLIER_OUTPUT_CHARS:
            text = text[:EARLIER_OUTPUT_CHARS] + " [...]"
        parts += ["", f"--- earlier output of {run.agent} ---", text]
    parts += ["", f"Task: {spec.task}"]
    return [
        {"role": "system", "content": spec.role},
        {"role": "user", "content": "\n".join(parts)},
    ]


def rough_tokens(text: str) -> int:
    """A tokenizer-free estimate (about four characters a token) for checks inside the domain;
    the orchestrator counts with the real tokenizer before each call."""
    return -(-len(text) // 4)


def prompt_floor_micros(
    spec: AgentSpec,
    *,
    title: str,
    description: str,
    prices: PriceTable,
    provider: str | None,
    model: str | None,
    at: datetime,
    markup: Decimal,
) -> int:
    """What the prompt alone of a first call will be billed at least: a run whose budget cannot
    pay even that is refused before it starts."""
    messages = build_prompt(spec, title=title, description=description, earlier=[])
    tokens = sum(rough_tokens(m["content"]) for m in messages)
    candidates = [
        (p, m)
        for p, m in prices.models()
        if (provider is None or p == provider) and (model is None or m == model)
    ]
    costs = [
        call_cost_micros(row, input_tokens=tokens, output_tokens=0)
        for p, m in candidates
        if (row := prices.in_force(p, m, at)) is not None
    ]
    return billed_amount(min(costs), markup) if costs else 0
