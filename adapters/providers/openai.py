"""OpenAI-compatible chat completions, streamed (``POST {base}/chat/completions``).

With ``stream_options.include_usage`` the final chunk carries ``usage`` (and no choices); that
block is authoritative. Nothing before it counts the prompt: a call cut earlier is charged our
estimate of its prompt. A stream that ends without ``[DONE]`` broke off, unless that final chunk
(after a finish reason) came: then the answer is whole and only the closing was lost. A server
that ignores ``stream_options`` (an older OpenAI-compatible one) ends a whole answer (a finish
reason, then ``[DONE]``) without usage: it is charged our counts (estimated), not made again;
so is one whose usage block holds no counts we can read (null, a fraction, a string of another
thing than digits). A chunk ``{"error": ...}`` mid-stream is judged as the HTTP status of its
``code`` or ``type`` would be (``invalid_request_error`` permanent, ``invalid_api_key`` our key
refused, ``rate_limit_exceeded`` a 429, ``insufficient_quota`` our account refused,
``server_error`` or an unknown one transient).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from adapters.providers.base import (
    ChatRequest,
    ReadPiece,
    SseProvider,
    StreamBroken,
    Usage,
    Working,
    error_names,
    provider_error,
    token_count,
    usage_field,
)

DEFAULT_BASE_URL = "https://api.openai.com/v1"

#: The HTTP status OpenAI answers an error with, by its ``code`` (looked up first) or its
#: ``type``: a chunk ``{"error": ...}`` mid-stream is judged as that status would be (see
#: :func:`provider_error`), a refused request or key as permanent, a rate limit as a 429, and
#: ``insufficient_quota`` as our account out of credit. A ``server_error``, or an error of any
#: other name (or none), is transient with no status.
_ERROR_STATUS = {
    "invalid_request_error": 400,
    "context_length_exceeded": 400,
    "invalid_api_key": 401,
    "authentication_error": 401,
    "permission_error": 403,
    "model_not_found": 404,
    "not_found_error": 404,
    "rate_limit_exceeded": 429,
    "rate_limit_error": 429,
    "tokens": 429,
    "insufficient_quota": 429,
}

#: What a delta carries besides answer text while the model works: reasoning (``reasoning`` or
#: ``reasoning_content``, as OpenAI-compatible servers name it), tool calls.
_WORK_KEYS = ("reasoning_content", "reasoning", "tool_calls", "function_call")


class OpenAIProvider(SseProvider):
    name = "openai"
    default_base_url = DEFAULT_BASE_URL
    path = "/chat/completions"
    event_noun = "a chunk"

    def _headers(self, api_key: str) -> dict[str, str]:
        return {"authorization": f"Bearer {api_key}"}

    def _body(self, request: ChatRequest) -> dict[str, object]:
        return {
            "model": request.model,
            "messages": request.messages,
            "max_tokens": request.max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }

    async def _read(self, events: AsyncIterator[tuple[str, str]]) -> AsyncIterator[ReadPiece]:
        usage: Usage | None = None
        done = finished = False
        async for _, data in events:
            if data.strip() == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if chunk.get("error"):
                # The provider's own failure, as Anthropic's ``error`` event: billed (and
                # charged) only for the text that streamed before it, none before any.
                names = error_names(chunk["error"])
                raise provider_error(
                    f"openai stream error: {chunk['error']}",
                    provider=self.name,
                    http_status=next((_ERROR_STATUS[n] for n in names if n in _ERROR_STATUS), None),
                    names=names,
                )
            for choice in chunk.get("choices") or ():
                delta = choice.get("delta") or {}
                # A refusal is the model's answer (billed as output): in ``refusal``, not
                # ``content``, it ended the run with an empty output that said nothing of why.
                text = delta.get("content") or delta.get("refusal")
                if text:
                    yield text
                elif any(delta.get(key) for key in _WORK_KEYS):
                    yield Working()
                finished = finished or bool(choice.get("finish_reason"))
            if chunk.get("usage"):
                prompt = token_count(usage_field(chunk, "usage", "prompt_tokens"))
                completion = token_count(usage_field(chunk, "usage", "completion_tokens"))
                if prompt is not None and completion is not None:
                    usage = Usage(prompt, completion)
                elif usage is None:
                    # Counts that are no counts (null, "12.5", 1e400): the block came, so a
                    # whole answer is whole, but uncounted, as one without a block.
                    usage = Usage(0, 0, estimated=True)
                if finished:
                    # The final chunk (after the finish reason): the answer is whole, whatever
                    # becomes of the [DONE] that closes the stream.
                    yield usage
                    return
        if done and usage is None and finished:
            yield Usage(0, 0, estimated=True)  # whole, but uncounted: see SseProvider._read
            return
        if not done or usage is None:
            raise StreamBroken(
                "openai stream ended before " + ("[DONE]" if not done else "its usage block"),
                provider=self.name,
            )
        yield usage
