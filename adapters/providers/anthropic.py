"""Anthropic messages API, streamed (``POST {base}/v1/messages``).

Input tokens come from ``message_start``, output tokens from the last ``message_delta``; the call
is complete at ``message_stop``. An ``error`` event (e.g. ``overloaded_error``) mid-stream is
transient.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx

from adapters.providers.base import (
    ChatRequest,
    StreamBroken,
    TransientProviderError,
    Usage,
    raise_for_status,
    sse_events,
    translate,
)

DEFAULT_BASE_URL = "https://api.anthropic.com"
API_VERSION = "2023-06-01"


class AnthropicProvider:
    name = "anthropic"

    def __init__(self, *, api_key: str, base_url: str = DEFAULT_BASE_URL,
                 timeout: httpx.Timeout | None = None) -> None:  # fmt: skip
        self.base_url = base_url.rstrip("/")
        self._client = httpx.AsyncClient(
            timeout=timeout or httpx.Timeout(30.0, connect=5.0),
            headers={"x-api-key": api_key, "anthropic-version": API_VERSION},
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def stream(self, request: ChatRequest) -> AsyncIterator[str | Usage]:
        system = "\n".join(m["content"] for m in request.messages if m["role"] == "system")
        body: dict[str, Any] = {
            "model": request.model,
            "max_tokens": request.max_tokens,
            "messages": [m for m in request.messages if m["role"] != "system"],
            "stream": True,
        }
        if system:
            body["system"] = system
        input_tokens: int | None = None
        output_tokens: int | None = None
        stopped = False
        started = False
        try:
            async with self._client.stream(
                "POST", f"{self.base_url}/v1/messages", json=body
            ) as response:
                await raise_for_status(response, self.name)
                started = True
                async for event, data in sse_events(response):
                    payload = json.loads(data)
                    kind = payload.get("type", event)
                    if kind == "message_start":
                        usage = payload["message"]["usage"]
                        input_tokens = int(usage["input_tokens"])
                        output_tokens = int(usage.get("output_tokens") or 0)
                    elif kind == "content_block_delta":
                        delta = payload.get("delta") or {}
                        if delta.get("type") == "text_delta" and delta.get("text"):
                            yield delta["text"]
                    elif kind == "message_delta":
                        output_tokens = int(payload["usage"]["output_tokens"])
                    elif kind == "message_stop":
                        stopped = True
                        break
                    elif kind == "error":
                        raise TransientProviderError(
                            f"anthropic stream error: {payload.get('error')}",
                            provider=self.name,
                        )
        except httpx.HTTPError as error:
            raise translate(error, self.name, streaming=started) from error
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise StreamBroken(
                f"anthropic sent an event we cannot read: {error}", provider=self.name
            ) from error
        if not stopped or input_tokens is None or output_tokens is None:
            raise StreamBroken("anthropic stream ended before message_stop", provider=self.name)
        yield Usage(input_tokens, output_tokens)
