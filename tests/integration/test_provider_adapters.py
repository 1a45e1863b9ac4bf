"""Provider adapters against local servers speaking each real wire format."""

from __future__ import annotations

import asyncio
import json
import time
import tracemalloc
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from provider_servers import FakeProviderServer, Reply, anthropic_events, openai_events

from adapters.providers.anthropic import AnthropicProvider
from adapters.providers.base import (
    MAX_EVENT_CHARS,
    Accepted,
    ChatRequest,
    PermanentProviderError,
    StreamBroken,
    TransientProviderError,
    Usage,
    retry_after_seconds,
    sse_lines,
)
from adapters.providers.openai import OpenAIProvider
from adapters.providers.simulated import SimulatedProvider
from adapters.tokenizer import count_message_tokens, count_tokens

REQUEST = ChatRequest(
    model="gpt-4o-mini",
    messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}],
    max_tokens=64,
)
FAST = httpx.Timeout(2.0, connect=2.0)


async def collect(provider: Any, request: ChatRequest = REQUEST) -> tuple[str, Usage]:
    text, usage = "", None
    async for piece in provider.stream(request):
        if isinstance(piece, Usage):
            usage = piece
        elif isinstance(piece, str):
            text += piece
    assert usage is not None
    return text, usage


def run_openai(server: FakeProviderServer, **kwargs: Any) -> tuple[str, Usage]:
    async def go() -> tuple[str, Usage]:
        provider = OpenAIProvider(api_key="sk-test", base_url=server.url + "/v1", timeout=FAST)
        try:
            return await collect(provider, **kwargs)
        finally:
            await provider.aclose()

    return asyncio.run(go())


def run_anthropic(server: FakeProviderServer) -> tuple[str, Usage]:
    async def go() -> tuple[str, Usage]:
        provider = AnthropicProvider(api_key="ak-test", base_url=server.url, timeout=FAST)
        try:
            return await collect(provider)
        finally:
            await provider.aclose()

    return asyncio.run(go())


def test_openai_streams_text_and_takes_usage_from_the_final_chunk() -> None:
    events = openai_events(["Hel", "lo ", "world"], prompt_tokens=17, completion_tokens=3)
    with FakeProviderServer([Reply(events=events)]) as server:
        text, usage = run_openai(server)
    assert text == "Hello world"
    assert usage == Usage(17, 3, estimated=False)
    sent = server.requests[0]
    assert sent.path == "/v1/chat/completions"
    assert sent.headers["authorization"] == "Bearer sk-test"
    assert sent.body["stream"] is True
    assert sent.body["stream_options"] == {"include_usage": True}
    assert sent.body["model"] == "gpt-4o-mini"


def pieces_of(provider: Any) -> list[Any]:
    """Every piece a call streams, closing the provider after it."""

    async def go() -> list[Any]:
        try:
            return [piece async for piece in provider.stream(REQUEST)]
        finally:
            await provider.aclose()

    return asyncio.run(go())


def test_a_call_is_said_accepted_before_its_text_with_the_prompt_count_the_wire_gives() -> None:
    """A call cut before any text is charged for its prompt once the provider took it: the
    adapters say when that is, and Anthropic's count of the prompt (message_start) with it;
    OpenAI's wire counts nothing before its last chunk."""
    openai = openai_events(["Hi"], prompt_tokens=17, completion_tokens=1)
    anthropic = anthropic_events(["Hi"], input_tokens=21, output_tokens=1)
    with FakeProviderServer([Reply(events=openai), Reply(events=anthropic)]) as server:
        first = pieces_of(OpenAIProvider(api_key="k", base_url=server.url, timeout=FAST))
        second = pieces_of(AnthropicProvider(api_key="k", base_url=server.url, timeout=FAST))
    assert first == [Accepted(), "Hi", Usage(17, 1)]
    assert second == [Accepted(), Accepted(21), "Hi", Usage(21, 1)]
    simulated = pieces_of(SimulatedProvider(tokens_per_second=0, output_tokens=5))
    assert simulated[0] == Accepted(simulated[-1].input_tokens)


def test_an_error_response_is_not_accepted() -> None:
    received: list[Any] = []

    async def go(server: FakeProviderServer) -> None:
        provider = OpenAIProvider(api_key="k", base_url=server.url, timeout=FAST)
        try:
            async for piece in provider.stream(REQUEST):
                received.append(piece)
        finally:
            await provider.aclose()

    with (
        FakeProviderServer([Reply(status=500, body=b"down")]) as server,
        pytest.raises(TransientProviderError),
    ):
        asyncio.run(go(server))
    assert received == []


def test_openai_429_is_transient_and_carries_retry_after() -> None:
    reply = Reply(status=429, headers={"retry-after": "3"}, body=b'{"error":"slow down"}')
    with FakeProviderServer([reply]) as server, pytest.raises(TransientProviderError) as caught:
        run_openai(server)
    assert caught.value.http_status == 429
    assert caught.value.retry_after == 3.0
    assert "slow down" in caught.value.message


@pytest.mark.parametrize(
    ("headers", "wait"),
    [
        ({"retry-after-ms": "1500"}, 1.5),
        ({"retry-after-ms": "1500", "retry-after": "2"}, 1.5),
        ({"retry-after-ms": "soon", "retry-after": "2"}, 2.0),
        ({"retry-after-ms": "nan"}, None),
        ({"retry-after-ms": "-20"}, 0.0),
    ],
)
def test_a_429s_retry_after_in_milliseconds_is_waited_out(
    headers: dict[str, str], wait: float | None
) -> None:
    """OpenAI says when to ask again in ``retry-after-ms`` (its own SDK reads it first): it was
    not read, and a run pinned to OpenAI spent its attempts within a second of backoff against
    a rate limit that had said how long it would last, and failed."""
    reply = Reply(status=429, headers=headers, body=b'{"error":"slow down"}')
    with FakeProviderServer([reply]) as server, pytest.raises(TransientProviderError) as caught:
        run_openai(server)
    assert (caught.value.http_status, caught.value.retry_after) == (429, wait)


@pytest.mark.parametrize(
    ("run", "status"),
    [
        (run_openai, 503),
        (run_openai, 500),
        (run_openai, 502),
        (run_openai, 408),
        (run_openai, 409),
        (run_anthropic, 529),
        (run_anthropic, 500),
    ],
)
def test_the_retry_after_of_any_transient_status_is_waited_out(
    run: Callable[[FakeProviderServer], tuple[str, Usage]], status: int
) -> None:
    """A ``retry-after`` is waited out with any transient status, not with 429 and 503 alone
    (RFC 9110's): Anthropic sends one with its 529 ``overloaded_error``, providers with other
    5xx. Unread there, a pinned run asked again after its own short backoff, into the same
    outage."""
    reply = Reply(status=status, headers={"retry-after": "7"}, body=b'{"error":"overloaded"}')
    with FakeProviderServer([reply]) as server, pytest.raises(TransientProviderError) as caught:
        run(server)
    assert (caught.value.http_status, caught.value.retry_after) == (status, 7.0)


def test_an_openai_refusal_is_the_answer_text() -> None:
    """A model that refuses streams its refusal in ``delta.refusal``, not ``content``: the run
    ended SUCCEEDED with an empty output, and nothing in its log said why. The refusal is the
    answer (OpenAI bills its tokens as output)."""
    events = openai_events([], prompt_tokens=12, completion_tokens=9)
    for index, piece in enumerate(["I'm sorry, ", "I can't help with that."]):
        refusal = {"choices": [{"index": 0, "delta": {"content": None, "refusal": piece}}]}
        events.insert(1 + index, "data: " + json.dumps(refusal))
    with FakeProviderServer([Reply(events=events)]) as server:
        text, usage = run_openai(server)
    assert text == "I'm sorry, I can't help with that."
    assert usage == Usage(12, 9)


def test_openai_500_is_transient_and_401_permanent() -> None:
    with FakeProviderServer([Reply(status=500, body=b"boom")]) as server:
        with pytest.raises(TransientProviderError) as caught:
            run_openai(server)
        assert caught.value.http_status == 500
        server.script([Reply(status=401, body=b'{"error":"bad key"}')])
        with pytest.raises(PermanentProviderError) as refused:
            run_openai(server)
        assert refused.value.http_status == 401


def test_openai_stream_cut_midway_is_a_broken_stream_after_the_text_so_far() -> None:
    events = openai_events(["one ", "two ", "three"], prompt_tokens=5, completion_tokens=3)
    received: list[str] = []

    async def go(server: FakeProviderServer) -> None:
        provider = OpenAIProvider(api_key="k", base_url=server.url, timeout=FAST)
        try:
            async for piece in provider.stream(REQUEST):
                assert isinstance(piece, str | Accepted)
                if isinstance(piece, str):
                    received.append(piece)
        finally:
            await provider.aclose()

    with (
        FakeProviderServer([Reply(events=events, cut_after=3)]) as server,
        pytest.raises(StreamBroken),
    ):
        asyncio.run(go(server))
    assert "".join(received) == "one two "


def test_openai_stream_without_usage_block_is_whole_and_charged_our_counts() -> None:
    """A server that ignores ``stream_options`` ends a whole answer without usage: it broke
    the stream, and the answer, charged, was made (and charged) again, for every call."""
    events = openai_events(["one ", "two"], prompt_tokens=1, completion_tokens=1, usage=False)
    with FakeProviderServer([Reply(events=events)]) as server:
        text, usage = run_openai(server)
    assert text == "one two"
    expected = Usage(count_message_tokens(REQUEST.messages), count_tokens(text), estimated=True)
    assert usage == expected


def test_openai_stream_without_usage_nor_finish_reason_is_broken() -> None:
    events = openai_events(["x"], prompt_tokens=1, completion_tokens=1, usage=False)
    events.pop(-2)  # its finish reason
    with (
        FakeProviderServer([Reply(events=events)]) as server,
        pytest.raises(StreamBroken, match="usage"),
    ):
        run_openai(server)


def test_slow_first_byte_times_out_as_transient() -> None:
    events = openai_events(["late"], prompt_tokens=1, completion_tokens=1)

    async def go(server: FakeProviderServer) -> None:
        provider = OpenAIProvider(
            api_key="k", base_url=server.url, timeout=httpx.Timeout(0.3, connect=2.0)
        )
        try:
            await collect(provider)
        finally:
            await provider.aclose()

    with (
        FakeProviderServer([Reply(events=events, first_byte_delay=1.5)]) as server,
        pytest.raises(TransientProviderError, match="timed out"),
    ):
        asyncio.run(go(server))


def test_anthropic_takes_input_from_message_start_and_output_from_message_delta() -> None:
    events = anthropic_events(["Bon", "jour"], input_tokens=21, output_tokens=2)
    with FakeProviderServer([Reply(events=events)]) as server:
        text, usage = run_anthropic(server)
    assert text == "Bonjour"
    assert usage == Usage(21, 2)
    sent = server.requests[0]
    assert sent.path == "/v1/messages"
    assert sent.headers["x-api-key"] == "ak-test"
    assert sent.headers["anthropic-version"] == "2023-06-01"
    assert sent.body["stream"] is True
    assert sent.body["system"] == "be brief"
    assert sent.body["messages"] == [{"role": "user", "content": "hello"}]


def test_anthropic_overloaded_error_event_and_cut_stream_are_transient() -> None:
    frames = anthropic_events(["a"], input_tokens=3, output_tokens=1)
    overloaded = [*frames[:3], 'event: error\ndata: {"type": "error", "error": '
                  '{"type": "overloaded_error", "message": "Overloaded"}}']  # fmt: skip
    with FakeProviderServer([Reply(events=overloaded)]) as server:
        with pytest.raises(TransientProviderError, match="overloaded"):
            run_anthropic(server)
        server.script([Reply(events=frames, cut_after=4)])
        with pytest.raises(StreamBroken):
            run_anthropic(server)
        server.script([Reply(status=529, body=b"overloaded")])
        with pytest.raises(TransientProviderError):
            run_anthropic(server)


def test_simulated_provider_is_deterministic_and_reports_tokenizer_counts() -> None:
    provider = SimulatedProvider(tokens_per_second=0, output_tokens=50)
    first = asyncio.run(collect(provider))
    second = asyncio.run(collect(provider))
    assert first == second
    text, usage = first
    assert usage.output_tokens == count_tokens(text)
    assert 40 <= usage.output_tokens <= 50
    assert usage.input_tokens > count_tokens("be brief hello")


def test_retry_after_accepts_seconds_and_http_dates() -> None:
    assert retry_after_seconds("2.5") == 2.5
    assert retry_after_seconds(None) is None
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
    assert retry_after_seconds("soon") is None


def test_line_separators_inside_a_chunk_are_text_not_line_ends() -> None:
    """An event stream's lines end at CR, LF or CRLF only; JSON carries U+2028, U+2029 and NEL
    unescaped inside a ``data:`` line, and a model that wrote one broke its call."""
    odd = "one\u2028two\u2029three\x85four"

    def raw(name: str | None, data: dict[str, Any]) -> str:
        return (f"event: {name}\n" if name else "") + "data: " + json.dumps(
            data, ensure_ascii=False
        )  # fmt: skip

    events = openai_events(["a"], prompt_tokens=4, completion_tokens=2)
    events.insert(1, raw(None, {"id": "c1", "choices": [{"index": 0, "delta": {"content": odd}}]}))
    with FakeProviderServer([Reply(events=events)]) as server:
        assert run_openai(server) == (odd + "a", Usage(4, 2))
    frames = anthropic_events(["a"], input_tokens=5, output_tokens=2)
    delta = {
        "type": "content_block_delta",
        "index": 0,
        "delta": {"type": "text_delta", "text": odd},
    }
    frames.insert(3, raw("content_block_delta", delta))
    with FakeProviderServer([Reply(events=frames)]) as server:
        assert run_anthropic(server) == (odd + "a", Usage(5, 2))


def test_event_stream_lines_are_the_same_however_the_bytes_are_chunked() -> None:
    stream = "\ufeffdata: a\u2028b\r\n\r\nevent: x\rdata:y\n\n: note\r\ndata: é€𝄞\r".encode()

    async def lines(chunks: list[bytes]) -> list[str]:
        async def feed() -> AsyncIterator[bytes]:
            for chunk in chunks:
                yield chunk

        return [line async for line in sse_lines(feed())]

    expected = ["data: a\u2028b", "", "event: x", "data:y", "", ": note", "data: é€𝄞"]
    for cut in range(len(stream) + 1):
        for second in range(cut, len(stream) + 1):
            pieces = [stream[:cut], stream[cut:second], stream[second:]]
            assert asyncio.run(lines(pieces)) == expected, (cut, second)
    assert asyncio.run(lines([b"data: \xff ok"])) == ["data: \ufffd ok"]


def assert_broken_by(
    run: Callable[[FakeProviderServer], object], events: list[str], at: int, odd: str
) -> None:
    """``events`` with ``odd`` put in at ``at`` break the call ``run`` makes, as unreadable."""
    with (
        FakeProviderServer([Reply(events=[*events[:at], odd, *events[at:]])]) as server,
        pytest.raises(StreamBroken, match="cannot read"),
    ):
        run(server)


def test_an_event_of_another_shape_than_the_apis_is_a_broken_stream() -> None:
    """JSON of the wrong shape (or nested too deep to decode) breaks the call like JSON that is
    not JSON: a transient error whose text so far is charged, not a crash of the run."""
    nested = "data: " + "[" * 100_000 + "]" * 100_000
    openai = openai_events(["a"], prompt_tokens=1, completion_tokens=1)
    for odd in ('data: {"choices": ["x"]}', "data: [1]", nested):
        assert_broken_by(run_openai, openai, 2, odd)
    anthropic = anthropic_events(["a"], input_tokens=3, output_tokens=1)
    for odd in ("data: [1]", nested):
        assert_broken_by(run_anthropic, anthropic, 4, odd)
    # A usage block whose count is no count (1e999: infinity) is an uncounted usage, not an
    # unreadable event: the later one counts (see test_provider_hostile for a whole answer
    # with no other).
    odd = 'data: {"choices": [], "usage": {"prompt_tokens": 1e999}}'
    with FakeProviderServer([Reply(events=[*openai[:2], odd, *openai[2:]])]) as server:
        assert run_openai(server)[1] == Usage(1, 1)
    odd = 'event: message_delta\ndata: {"type": "message_delta"}'
    with FakeProviderServer([Reply(events=[*anthropic[:4], odd, *anthropic[4:]])]) as server:
        assert run_anthropic(server)[1] == Usage(3, 1)
    # A negative count is readable, but no call's: see test_provider_hostile (estimated).
    events = openai_events(["a"], prompt_tokens=-5, completion_tokens=1)
    with FakeProviderServer([Reply(events=events)]) as server:
        assert run_openai(server)[1].estimated


def test_answer_text_that_is_no_string_is_a_broken_stream_not_a_piece() -> None:
    """A delta whose text is no string (a list of parts, as some OpenAI-compatible servers
    send, a number, an object) was handed on as a piece of text: the orchestrator then failed
    the run "internal error" on it, the call (accepted, streaming) recorded nowhere."""
    openai = openai_events(["a"], prompt_tokens=1, completion_tokens=1)
    for content in ([{"type": "text", "text": "hi"}], 7, {"text": "hi"}):
        odd = "data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": content}}]})
        assert_broken_by(run_openai, openai, 2, odd)
    anthropic = anthropic_events(["a"], input_tokens=3, output_tokens=1)
    for text in (7, ["hi"], {"text": "hi"}):
        odd = "event: content_block_delta\ndata: " + json.dumps(
            {"type": "content_block_delta", "index": 0,
             "delta": {"type": "text_delta", "text": text}}
        )  # fmt: skip
        assert_broken_by(run_anthropic, anthropic, 4, odd)


def test_an_event_longer_than_any_providers_is_a_broken_stream_not_kept_whole() -> None:
    """A line (or an event's data lines) without end was kept whole in the orchestrator's
    memory, for every run in it to go down with; past MAX_EVENT_CHARS the call breaks."""
    huge = "x" * (MAX_EVENT_CHARS + 10)
    chunk = {"id": "c1", "choices": [{"index": 0, "delta": {"content": huge}}]}
    for odd in ("data: " + json.dumps(chunk), "data: y\n" * (MAX_EVENT_CHARS // 2 + 10)):
        events = openai_events(["a"], prompt_tokens=1, completion_tokens=1)
        events.insert(1, odd.rstrip("\n"))
        with (
            FakeProviderServer([Reply(events=events)]) as server,
            pytest.raises(StreamBroken, match="longer than"),
        ):
            run_openai(server)


def test_anthropic_stream_without_message_delta_is_estimated_not_billed_one_output_token() -> None:
    """Output tokens come from message_delta; message_start's count is a placeholder (1). A stream
    that stopped without message_delta was billed that 1 token for however much text it
    streamed; then it was broken (charged from estimates, and the whole answer made and charged
    again); now, whole (message_stop came), it is charged from estimates, once."""
    frames = anthropic_events(["a long answer " * 50], input_tokens=21, output_tokens=150)
    frames = [f for f in frames if not f.startswith("event: message_delta")]
    with FakeProviderServer([Reply(events=frames)]) as server:
        text, usage = run_anthropic(server)
    assert text == "a long answer " * 50
    assert usage.estimated
    assert usage.output_tokens > 1


def test_openai_stream_cut_after_its_usage_block_is_complete() -> None:
    """The final chunk's usage is authoritative, sent after the finish reason: a connection
    lost before the closing [DONE] took nothing from the answer. It was a broken stream: charged
    from estimates instead of the usage, and the whole call made (and billed) again."""
    events = openai_events(["all ", "of it"], prompt_tokens=12, completion_tokens=3)
    assert events[-1] == "data: [DONE]"
    with FakeProviderServer([Reply(events=events, cut_after=len(events) - 1)]) as server:
        assert run_openai(server) == ("all of it", Usage(12, 3))
    usage_only = [e for e in events if "finish_reason" not in e]  # no sign the answer ended
    with (
        FakeProviderServer([Reply(events=usage_only, cut_after=len(usage_only) - 1)]) as server,
        pytest.raises(StreamBroken),
    ):
        run_openai(server)


def test_an_error_response_is_judged_on_its_first_bytes_not_read_to_its_end() -> None:
    """An error's body was read whole before the error was raised: a 5xx whose body streamed
    slowly held the call (and its run) until the body ended, and a huge one was kept in memory.
    Its first bytes name the error."""
    frames = ["data: " + "e" * 3000] * 20
    began = time.monotonic()
    with (
        FakeProviderServer([Reply(status=503, events=frames, event_delay=0.5)]) as server,
        pytest.raises(TransientProviderError) as caught,
    ):
        run_openai(server)
    assert time.monotonic() - began < 3.0
    assert caught.value.http_status == 503
    assert "eeee" in caught.value.message


def test_a_line_without_end_that_comes_in_small_pieces_is_kept_in_memory_as_its_bytes() -> None:
    """White space without a line end, two bytes a read (as a server trickling it makes the
    reads): the line waited as a list of its pieces, some 60 bytes of memory for every two of
    the line, so a line within the bound took 30 times its length. One buffer now."""
    pieces, piece = 200_000, b"  "

    async def peak() -> int:
        async def feed() -> AsyncIterator[bytes]:
            for _ in range(pieces):
                yield piece
            tracemalloc_peak.append(tracemalloc.get_traced_memory()[1])

        tracemalloc_peak: list[int] = []
        tracemalloc.start()
        try:
            assert [line async for line in sse_lines(feed())] == [" " * (2 * pieces)]
        finally:
            tracemalloc.stop()
        return tracemalloc_peak[0]

    assert asyncio.run(peak()) < 5 * pieces * len(piece)
