"""OpenAI-compatible chat completions, streamed (``POST {base}/chat/completions``).

With ``stream_options.include_usage`` the final chunk carries ``usage`` (and no choices); that
block is authoritative. A stream that ends without ``[DONE]`` broke off.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx

from adapters.providers.base import (
    ChatRequest,
    StreamBroken,
    Usage,
    raise_for_status,
    sse_events,
    translate,
)

DEFAULT_BASE_URL = "https://api.openai.com/v1"


class OpenAIProvider:
    name = "openai"

    def __init__(self, *, api_key: str, base_url: str = DEFAULT_BASE_URL,
                 timeout: httpx.Timeout | None = None) -> None:  # fmt: skip
        self.base_url = base_url.rstrip("/")
        self._client = httpx.AsyncClient(
            timeout=timeout or httpx.Timeout(30.0, connect=5.0),
            headers={"authorization": f"Bearer {api_key}"},
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def stream(self, request: ChatRequest) -> AsyncIterator[str | Usage]:
        body: dict[str, Any] = {
            "model": request.model,
            "messages": request.messages,
            "max_tokens": request.max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        usage: Usage | None = None
        done = False
        started = False
        try:
            async with self._client.stream(
                "POST", f"{self.base_url}/chat/completions", json=body
            ) as response:
                await raise_for_status(response, self.name)
                started = True
                async for _, data in sse_events(response):
                    if data.strip() == "[DONE]":
                        done = True
                        break
                    chunk = json.loads(data)
                    if chunk.get("error"):
                        raise StreamBroken(
                            f"openai stream error: {chunk['error']}", provider=self.name
                        )
                    for choice in chunk.get("choices") or ():
                        text = (choice.get("delta") or {}).get("content")
                        if text:
                            yield text
                    if chunk.get("usage"):
                        u = chunk["usage"]
                        usage = Usage(int(u["prompt_tokens"]), int(u["completion_tokens"]))
        except httpx.HTTPError as error:
            raise translate(error, self.name, streaming=started) from error
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise StreamBroken(
                f"openai sent a chunk we cannot read: {error}", provider=self.name
            ) from error
        if not done or usage is None:
            raise StreamBroken(
                "openai stream ended before " + ("[DONE]" if not done else "its usage block"),
                provider=self.name,
            )
        yield usage
