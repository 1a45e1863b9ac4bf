"""Anthropic messages API, streamed (``POST {base}/v1/messages``).

Input tokens come from ``message_start``, said at once as :class:`Accepted` (a call cut before
any text is charged the provider's count of its prompt), or from the last ``message_delta`` when
it counts more; output tokens from the last ``message_delta``; the call is complete at the
``message_delta`` that gives the ``stop_reason`` (only ``message_stop`` may follow it), or at
``message_stop``. A whole answer without counts we can read (no ``message_delta``, or a count
that is null, a fraction, a string of another thing than digits) is charged our own counts
(estimated), as SseProvider charges an implausible one, not made again. An ``error`` event
mid-stream is judged as the HTTP status of its type would be (``overloaded_error`` transient,
``invalid_request_error`` permanent).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from adapters.providers.base import (
    Accepted,
    ChatRequest,
    ReadPiece,
    SseProvider,
    StreamBroken,
    Usage,
    Working,
    provider_error,
    token_count,
    usage_field,
)

DEFAULT_BASE_URL = "https://api.anthropic.com"
API_VERSION = "2023-06-01"

#: The HTTP status of each type of error Anthropic names (its API's errors page): an ``error``
#: event in the stream is judged as its status would be, a refusal of the request or of our key
#: as permanent (it was made again, up to the run's attempts, each charged for the text before
#: it), a ``rate_limit_error`` as a 429.
_ERROR_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}

#: What a ``content_block_delta`` other than text carries while the model works: its thinking,
#: the signature that closes it, a tool call's arguments.
_WORK_KEYS = ("thinking", "signature", "partial_json")


class AnthropicProvider(SseProvider):
    name = "anthropic"
    default_base_url = DEFAULT_BASE_URL
    path = "/v1/messages"
    event_noun = "an event"

    def _headers(self, api_key: str) -> dict[str, str]:
        return {"x-api-key": api_key, "anthropic-version": API_VERSION}

    def _body(self, request: ChatRequest) -> dict[str, object]:
        system = "\n".join(m["content"] for m in request.messages if m["role"] == "system")
        body: dict[str, object] = {
            "model": request.model,
            "max_tokens": request.max_tokens,
            "messages": [m for m in request.messages if m["role"] != "system"],
            "stream": True,
        }
        if system:
            body["system"] = system
        return body

    async def _read(self, events: AsyncIterator[tuple[str, str]]) -> AsyncIterator[ReadPiece]:
        input_tokens: int | None = None
        output_tokens: int | None = None
        stopped = started = False
        async for event, data in events:
            payload = json.loads(data)
            kind = payload.get("type", event)
            if kind == "message_start":
                if started:
                    continue  # said again, it is no work: the idle cut would never come
                started = True
                # Its output_tokens is a placeholder (1); the count is message_delta's.
                input_tokens = token_count(usage_field(payload, "message", "usage", "input_tokens"))
                yield Accepted(input_tokens)
            elif kind == "content_block_delta":
                delta = payload.get("delta") or {}
                if delta.get("type") == "text_delta":
                    if delta.get("text"):
                        yield delta["text"]
                elif any(delta.get(key) for key in _WORK_KEYS):
                    yield Working()
            elif kind == "message_delta":
                # Cumulative: the last count is the call's (one that is no count leaves it).
                counted = token_count(usage_field(payload, "usage", "output_tokens"))
                output_tokens = output_tokens if counted is None else counted
                grown = token_count(usage_field(payload, "usage", "input_tokens"))
                if input_tokens is not None and grown is not None:
                    # Cumulative, as its output count is: the final one when the prompt grew
                    # during the call; a smaller one (a placeholder 0) is no count.
                    input_tokens = max(input_tokens, grown)
                if (payload.get("delta") or {}).get("stop_reason"):
                    # The answer's end, with its final counts: only message_stop may follow,
                    # and the answer is whole without it (lost, it was a broken stream,
                    # charged our estimates and made, and billed, again).
                    stopped = True
                    break
            elif kind == "message_stop":
                stopped = True
                break
            elif kind == "error":
                error = payload.get("error")
                named = error.get("type") if isinstance(error, dict) else None
                raise provider_error(
                    f"anthropic stream error: {error}",
                    provider=self.name,
                    http_status=_ERROR_STATUS.get(named) if isinstance(named, str) else None,
                )
        if not stopped:
            raise StreamBroken("anthropic stream ended before message_stop", provider=self.name)
        if input_tokens is None or output_tokens is None:
            # Whole (message_stop came), but without counts we can read (no message_delta, or
            # null or "12.5" in it): charged our counts, not made (and charged) again.
            yield Usage(0, 0, estimated=True)
            return
        yield Usage(input_tokens, output_tokens)
