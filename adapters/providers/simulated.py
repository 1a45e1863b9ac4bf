"""The built-in offline provider: deterministic text streamed at a configurable speed.

The same prompt always yields the same text (seeded by its hash), and the usage it reports is
counted with the same tokenizer real providers are estimated with, so metering, budgets and logs
behave as they would against a real model.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import AsyncIterator

from adapters.providers.base import Accepted, ChatRequest, Piece, Usage
from adapters.tokenizer import count_message_tokens, count_tokens

_WORDS = (
    (
        "the card needs a small design that keeps the board consistent while agents stream their "
        "work; we split it into steps, write tests first, measure the latency, review the risks, "
        "and ship behind a flag so that rollback stays cheap and every charge stays exact"
    )
    .replace(",", "")
    .replace(";", "")
    .split()
)


class SimulatedProvider:
    """``sim-1``: about ``output_tokens`` tokens at ``tokens_per_second``, 12 words a line."""

    name = "simulated"

    def __init__(self, *, tokens_per_second: float = 60.0, output_tokens: int = 120) -> None:
        self.tokens_per_second = tokens_per_second
        self.output_tokens = output_tokens

    async def aclose(self) -> None:
        return None

    async def stream(self, request: ChatRequest) -> AsyncIterator[Piece]:
        prompt = "\n".join(m["content"] for m in request.messages)
        seed = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big")
        rng = random.Random(seed)  # noqa: S311 - text, not secrets
        budget = min(self.output_tokens, request.max_tokens)
        delay = 1.0 / self.tokens_per_second if self.tokens_per_second > 0 else 0.0
        produced: list[str] = []
        words = 0
        spent = 0
        text = ""
        prompt_tokens = count_message_tokens(request.messages)
        # As a provider that counts the prompt up front: cut before any text, the call is
        # charged for it.
        yield Accepted(prompt_tokens)
        while True:
            word = rng.choice(_WORDS)
            piece = word if not produced or produced[-1].endswith("\n") else " " + word
            words += 1
            if words % 12 == 0:
                piece += ".\n"
            cost = count_tokens(piece)
            if spent + cost > budget:
                break
            spent += cost
            produced.append(piece)
            text += piece
            if delay:
                await asyncio.sleep(delay)
            yield piece
        yield Usage(prompt_tokens, count_tokens(text))
