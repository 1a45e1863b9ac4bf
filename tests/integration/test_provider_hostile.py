"""Provider adapters against local servers that misbehave as a broken or hostile provider (or a
proxy between) would: what they answer must not be charged as a call, nor stored as it came."""

from __future__ import annotations

import asyncio
import gzip
import json
from typing import Any

import pytest
from provider_servers import FakeProviderServer, Reply, anthropic_events, openai_events
from test_provider_adapters import FAST, REQUEST

from adapters.providers.anthropic import AnthropicProvider
from adapters.providers.base import (
    Accepted,
    AccountRefused,
    ChatRequest,
    PermanentProviderError,
    Piece,
    StreamBroken,
    TransientProviderError,
    Usage,
    retry_after_seconds,
)
from adapters.providers.openai import OpenAIProvider

KEY = "sk-live-0123456789abcdef"


def pieces(
    provider: Any, request: ChatRequest = REQUEST, *, within: float | None = None
) -> tuple[list[Piece], Exception | None]:
    """What the stream yielded, and what it raised (``None``: it ended); ``TimeoutError`` if it
    was still open after ``within`` seconds."""

    async def go() -> tuple[list[Piece], Exception | None]:
        got: list[Piece] = []
        try:
            async with asyncio.timeout(within):
                async for piece in provider.stream(request):
                    got.append(piece)
        except Exception as error:  # noqa: BLE001 - the test judges it
            return got, error
        finally:
            await provider.aclose()
        return got, None

    return asyncio.run(go())


def openai(server: FakeProviderServer) -> OpenAIProvider:
    return OpenAIProvider(api_key=KEY, base_url=server.url + "/v1", timeout=FAST)


def test_a_redirect_is_not_accepted_nor_followed_with_the_key() -> None:
    answer = openai_events(["x"], prompt_tokens=1, completion_tokens=1)
    with FakeProviderServer([Reply(events=answer)]) as other:
        moved = Reply(status=307, headers={"location": other.url + "/v1/chat/completions"})
        with FakeProviderServer([moved]) as server:
            got, error = pieces(openai(server))
        assert not other.requests
    assert not any(isinstance(p, Accepted) for p in got)
    assert isinstance(error, PermanentProviderError), error
    assert error.http_status == 307


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json",
        "application/problem+json",
        "text/html; charset=utf-8",
        # A proxy's own words (Envoy's "upstream connect error ...", a captive portal's), a
        # gateway's XML error: read as an event stream, they were a stream that broke before
        # its first event, and the call the provider never had was charged its prompt.
        "text/plain; charset=utf-8",
        "application/xml",
        "application/octet-stream",
    ],
)
def test_an_error_answered_with_200_is_not_accepted(content_type: str) -> None:
    body = json.dumps({"error": {"message": "upstream overloaded", "type": "server_error"}})
    reply = Reply(status=200, body=body.encode(), headers={"content-type": content_type})
    with FakeProviderServer([reply]) as server:
        got, error = pieces(openai(server))
    assert not any(isinstance(p, Accepted) for p in got)
    assert isinstance(error, TransientProviderError), error
    assert not isinstance(error, StreamBroken)
    assert "upstream overloaded" in str(error)


def usage_of(got: list[Piece]) -> Usage:
    found = [p for p in got if isinstance(p, Usage)]
    assert len(found) == 1, got
    return found[0]


@pytest.mark.parametrize(
    ("prompt_tokens", "completion_tokens"),
    [(2**70, 3), (12, 10**12), (-5, 3), (12, -1), (1e300, 3)],
)
def test_a_usage_no_call_of_the_request_could_have_is_charged_from_our_counts(
    prompt_tokens: Any, completion_tokens: Any
) -> None:
    """A count past what the request could use (more output than ``max_tokens``, more prompt
    than it has bytes) billed the workspace whatever the wire said, and a count past 2^63 could
    not even be kept in the read models; a negative one failed the whole answer, to be made
    (and charged) again."""
    events = openai_events(["one ", "two"], prompt_tokens=1, completion_tokens=1)
    usage_frame = next(i for i, f in enumerate(events) if '"usage"' in f)
    events[usage_frame] = "data: " + json.dumps({"id": "c1", "choices": [], "usage": {
        "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}})  # fmt: skip
    with FakeProviderServer([Reply(events=events)]) as server:
        got, error = pieces(openai(server))
    assert error is None, error
    assert "".join(p for p in got if isinstance(p, str)) == "one two"
    usage = usage_of(got)
    assert usage.estimated
    assert 0 < usage.input_tokens < 100
    assert 0 < usage.output_tokens <= REQUEST.max_tokens


def test_anthropic_output_count_past_max_tokens_is_not_the_calls() -> None:
    events = anthropic_events(["hi"], input_tokens=20, output_tokens=10**9)
    provider = AnthropicProvider(api_key=KEY, base_url="", timeout=FAST)
    with FakeProviderServer([Reply(events=events)]) as server:
        provider.base_url = server.url
        got, error = pieces(provider)
    assert error is None, error
    usage = usage_of(got)
    assert usage.estimated
    assert usage.output_tokens <= REQUEST.max_tokens


def test_a_plausible_usage_is_the_providers() -> None:
    events = openai_events(["one"], prompt_tokens=30, completion_tokens=64)
    with FakeProviderServer([Reply(events=events)]) as server:
        got, error = pieces(openai(server))
    assert error is None, error
    assert usage_of(got) == Usage(30, 64)


@pytest.mark.parametrize("status", [401, 400, 500])
def test_the_key_a_server_echoes_in_its_error_is_not_kept_in_the_message(status: int) -> None:
    """Errors are stored on the run (its attempts, its log, its error) for every member to
    read; a proxy that echoes the request's headers put the API key there."""
    body = json.dumps({"error": f"bad request, headers: authorization: Bearer {KEY}"})
    with FakeProviderServer([Reply(status=status, body=body.encode())]) as server:
        _, error = pieces(openai(server))
    assert error is not None
    assert KEY not in str(error)


@pytest.mark.parametrize("family", ["openai", "anthropic"])
def test_the_key_an_error_event_echoes_is_not_kept_in_the_message(family: str) -> None:
    error = {"type": "invalid_request_error", "code": "invalid_api_key",
             "message": f"Incorrect API key provided: {KEY}"}  # fmt: skip
    _, raised = error_after_text(family, error)
    assert isinstance(raised, TransientProviderError | PermanentProviderError), raised
    assert KEY not in str(raised)


def _gzip(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=9, mtime=0)


def test_the_call_asks_for_no_compression_and_reads_a_compressed_stream_all_the_same() -> None:
    events = openai_events(["zip", "ped"], prompt_tokens=5, completion_tokens=2)
    body = _gzip("".join(f + "\n\n" for f in events).encode())
    reply = Reply(body=body, headers={"content-type": "text/event-stream",
                                      "content-encoding": "gzip"})  # fmt: skip
    with FakeProviderServer([reply]) as server:
        got, error = pieces(openai(server))
        sent = server.requests[0].headers
    assert error is None, error
    assert "".join(p for p in got if isinstance(p, str)) == "zipped"
    assert usage_of(got) == Usage(5, 2)
    assert sent.get("accept-encoding") == "identity"


def test_a_decompression_bomb_is_read_a_bounded_piece_at_a_time() -> None:
    """A few kilobytes of gzip that inflate to megabytes of blank lines: httpx inflated each
    network chunk whole and the line splitter listed every line of it, some hundreds of
    megabytes for one call, all in one step of the event loop every other run waits on."""
    body = _gzip(b"data: {}\n\n" + b"\n" * (4 * 1024 * 1024))
    reply = Reply(body=body, headers={"content-type": "text/event-stream",
                                      "content-encoding": "gzip"})  # fmt: skip

    longest = 0.0

    async def go(url: str) -> Exception | None:
        nonlocal longest
        provider = OpenAIProvider(api_key=KEY, base_url=url, timeout=FAST)
        stop = asyncio.Event()

        async def watch() -> None:
            nonlocal longest
            loop = asyncio.get_running_loop()
            while not stop.is_set():
                before = loop.time()
                await asyncio.sleep(0.01)
                longest = max(longest, loop.time() - before - 0.01)

        watcher = asyncio.create_task(watch())
        try:
            async with asyncio.timeout(3):
                async for _ in provider.stream(REQUEST):
                    pass
        except Exception as error:  # noqa: BLE001 - the test judges it
            return error
        finally:
            stop.set()
            await watcher
            await provider.aclose()
        return None

    with FakeProviderServer([reply]) as server:
        error = asyncio.run(go(server.url))
    assert error is not None
    assert longest < 1.0, f"the event loop was held {longest:.2f}s at once"


def test_a_prompt_count_no_call_of_the_request_could_have_is_not_said_accepted() -> None:
    """A call cut after ``message_start`` is charged the prompt count it carried: one past
    what the prompt could be charged the workspace any amount for a call cut short."""
    events = anthropic_events(["hi"], input_tokens=10**15, output_tokens=1)
    provider = AnthropicProvider(api_key=KEY, base_url="", timeout=FAST)
    with FakeProviderServer([Reply(events=events)]) as server:
        provider.base_url = server.url
        got, error = pieces(provider)
    assert error is None, error
    assert [p for p in got if isinstance(p, Accepted)] == [Accepted(), Accepted()]
    assert usage_of(got).estimated


@pytest.mark.parametrize(("delta_input", "charged"), [(25, 25), (0, 20), (None, 20)])
def test_anthropic_input_count_is_its_final_cumulative_one(
    delta_input: int | None, charged: int
) -> None:
    """``message_delta``'s usage is cumulative, the input count too when it carries one (a
    prompt that grew during the call, by the provider's own tools); a smaller one than
    ``message_start``'s is no count (a proxy's placeholder 0): counts do not shrink."""
    events = anthropic_events(["hi"], input_tokens=20, output_tokens=3)
    delta = next(i for i, f in enumerate(events) if f.startswith("event: message_delta"))
    usage: dict[str, int] = {"output_tokens": 3}
    if delta_input is not None:
        usage["input_tokens"] = delta_input
    events[delta] = "event: message_delta\ndata: " + json.dumps(
        {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": usage}
    )
    provider = AnthropicProvider(api_key=KEY, base_url="", timeout=FAST)
    with FakeProviderServer([Reply(events=events)]) as server:
        provider.base_url = server.url
        got, error = pieces(provider)
    assert error is None, error
    assert usage_of(got) == Usage(charged, 3)


@pytest.mark.parametrize("provider_class", [OpenAIProvider, AnthropicProvider])
def test_a_key_read_with_its_line_end_is_sent_without_it(provider_class: Any) -> None:
    """A key from a file (a mounted secret) often ends in a newline, which no header may hold:
    every call failed, tried again and again, with an error quoting the key (httpx's "Illegal
    header value b'Bearer sk-…\\n'"), stored on the run's attempts for every member to read."""
    events = openai_events(["x"], prompt_tokens=1, completion_tokens=1)
    if provider_class is AnthropicProvider:
        events = anthropic_events(["x"], input_tokens=1, output_tokens=1)
    with FakeProviderServer([Reply(events=events)]) as server:
        base_url = server.url + ("/v1" if provider_class is OpenAIProvider else "")
        provider = provider_class(api_key=KEY + "\r\n", base_url=base_url, timeout=FAST)
        got, error = pieces(provider)
        sent = server.requests[0].headers
    assert error is None, error
    assert "".join(p for p in got if isinstance(p, str)) == "x"
    assert sent.get("x-api-key", sent.get("authorization")) in (KEY, f"Bearer {KEY}")


@pytest.mark.parametrize("value", ["nan", "-nan", "NaN"])
def test_a_retry_after_that_is_not_a_number_is_none(value: str) -> None:
    """``float`` reads "nan", and ``max(0.0, nan)`` is 0.0: every retry came at once."""
    assert retry_after_seconds(value) is None


#: The idle period of the stalled-stream tests, and how long their call is watched at most.
IDLE, WATCHED = 0.5, 20.0


def stream_of(family: str, pieces_: list[str], **reply: Any) -> tuple[Any, Reply]:
    """A provider of ``family`` (unconnected: its base URL is set once the server runs) and a
    reply of its wire format streaming ``pieces_``."""
    if family == "openai":
        provider: Any = OpenAIProvider(api_key=KEY, base_url="", timeout=FAST, idle_timeout=IDLE)
        events = openai_events(pieces_, prompt_tokens=7, completion_tokens=len(pieces_))
    else:
        provider = AnthropicProvider(api_key=KEY, base_url="", timeout=FAST, idle_timeout=IDLE)
        events = anthropic_events(pieces_, input_tokens=7, output_tokens=len(pieces_))
    return provider, Reply(events=events, **reply)


def at(provider: Any, server: FakeProviderServer) -> Any:
    provider.base_url = server.url + ("/v1" if isinstance(provider, OpenAIProvider) else "")
    return provider


@pytest.mark.parametrize(
    ("family", "keep_alive"),
    [
        ("openai", ": keep-alive"),
        ("openai", ""),
        ("openai", 'data: {"id": "c1", "choices": [{"index": 0, "delta": {"content": ""}}]}'),
        ("anthropic", 'event: ping\ndata: {"type": "ping"}'),
        ("anthropic", ": keep-alive"),
        ("anthropic", "   "),
        # The call's start said again and again: no work either (it held the slot as progress).
        (
            "anthropic",
            'event: message_start\ndata: {"type": "message_start", "message": {"usage":'
            ' {"input_tokens": 7, "output_tokens": 1}}}',
        ),
    ],
)
def test_a_stream_of_nothing_but_keep_alives_is_cut_as_stalled_after_the_idle_period(
    family: str, keep_alive: str
) -> None:
    """Every byte restarts the read timeout: a provider (or a proxy) that accepted the call and
    then sent only keep-alives, every 10 ms, held it open until the run's deadline (minutes),
    producing nothing. Cut after the idle period as a broken stream: the provider had the
    prompt (the call was accepted), so it is charged and tried again as a cut stream is."""
    provider, reply = stream_of(family, [])
    reply.events = (reply.events or [])[:1]  # accepted (Anthropic: with its prompt count)
    reply.keep_alive, reply.event_delay = keep_alive, 0.01
    with FakeProviderServer([reply]) as server:
        got, error = pieces(at(provider, server), within=WATCHED)
    assert isinstance(error, StreamBroken), error
    assert str(error) == f"{family} stream stalled: no data for {IDLE:g}s (keep-alives aside)"
    assert not [p for p in got if isinstance(p, str | Usage)]
    assert Accepted() in got
    if family == "anthropic":
        assert Accepted(7) in got


@pytest.mark.parametrize("family", ["openai", "anthropic"])
def test_a_slow_stream_whose_text_comes_within_the_idle_period_is_not_cut(family: str) -> None:
    """Text every quarter of a second, keep-alives between, for longer in all than the idle
    period (two seconds here): the period counts from the last progress, not from the start."""
    words = [f"w{i} " for i in range(12)]
    provider, reply = stream_of(family, words, event_delay=0.25)
    provider.idle_timeout = 2.0
    frames = reply.events or []
    reply.events = [f"{frame}\n\n: keep-alive" for frame in frames]
    with FakeProviderServer([reply]) as server:
        got, error = pieces(at(provider, server), within=WATCHED)
    assert error is None, error
    assert "".join(p for p in got if isinstance(p, str)) == "".join(words)
    assert usage_of(got) == Usage(7, len(words))


def _thinking_frame(family: str, i: int) -> str:
    """A frame of work that is not answer text: Anthropic's thinking, an OpenAI-compatible
    server's ``reasoning_content``."""
    if family == "openai":
        chunk = {"id": "c1", "choices": [{"index": 0, "delta": {
            "content": "", "reasoning_content": f"step {i}. "}}]}  # fmt: skip
        return "data: " + json.dumps(chunk)
    delta = {"type": "thinking_delta", "thinking": f"step {i}. "}
    return "event: content_block_delta\ndata: " + json.dumps(
        {"type": "content_block_delta", "index": 0, "delta": delta}
    )


@pytest.mark.parametrize("family", ["openai", "anthropic"])
def test_a_model_that_thinks_longer_than_the_idle_period_before_it_answers_is_not_cut(
    family: str,
) -> None:
    """Thinking (reasoning) streams no answer text, but it is the model at work: a model that
    reasons for longer than the idle period (three times it here) before its first word must
    get to answer, not be cut as a stream of keep-alives."""
    words = ["the ", "answer"]
    provider, reply = stream_of(family, words, event_delay=0.1)
    provider.idle_timeout = 1.0
    frames = reply.events or []
    thinking = [_thinking_frame(family, i) for i in range(30)]
    reply.events = [frames[0], *thinking, *frames[1:]]
    with FakeProviderServer([reply]) as server:
        got, error = pieces(at(provider, server), within=WATCHED)
    assert error is None, error
    assert "".join(p for p in got if isinstance(p, str)) == "the answer"
    assert usage_of(got) == Usage(7, len(words))


#: Counts a usage block may hold that are no counts, as raw JSON: a fraction, a string of a
#: fraction or of words, null, true, an object, a number past a double (read as infinity).
NO_COUNTS = ['"12.5"', "12.7", "null", "true", '"many"', '{"n": 3}', "1e400", "NaN", "[]"]


@pytest.mark.parametrize("family", ["openai", "anthropic"])
@pytest.mark.parametrize("count", NO_COUNTS)
def test_a_whole_answer_whose_usage_holds_no_count_is_charged_our_counts_not_broken(
    family: str, count: str
) -> None:
    """``int()`` of the count broke a whole answer off as unreadable (null, "12.5", 1e400): the
    orchestrator charged it, as a broken stream, and made the call again, charged again; or it
    cut a fraction down (12.7 billed as 12) and took ``true`` for 1. A whole answer whose usage
    holds no count is charged our own counts, once, as one without a usage block."""
    if family == "openai":
        provider: Any = OpenAIProvider(api_key=KEY, base_url="", timeout=FAST)
        events = openai_events(["one ", "two"], prompt_tokens=1, completion_tokens=1)
        block = next(i for i, f in enumerate(events) if '"usage"' in f)
        events[block] = (
            'data: {"id": "c1", "choices": [], "usage": {"prompt_tokens": '
            + count
            + ', "completion_tokens": 3}}'
        )
    else:
        provider = AnthropicProvider(api_key=KEY, base_url="", timeout=FAST)
        events = anthropic_events(["one ", "two"], input_tokens=20, output_tokens=1)
        delta = next(i for i, f in enumerate(events) if f.startswith("event: message_delta"))
        events[delta] = (
            'event: message_delta\ndata: {"type": "message_delta", "delta": {}, '
            '"usage": {"output_tokens": ' + count + "}}"
        )
    with FakeProviderServer([Reply(events=events)]) as server:
        got, error = pieces(at(provider, server))
    assert error is None, error
    assert "".join(p for p in got if isinstance(p, str)) == "one two"
    usage = usage_of(got)
    assert usage.estimated
    assert type(usage.input_tokens) is int
    assert type(usage.output_tokens) is int
    assert 0 < usage.input_tokens < 100
    assert 0 < usage.output_tokens <= REQUEST.max_tokens


@pytest.mark.parametrize("family", ["openai", "anthropic"])
def test_a_count_written_as_digits_or_a_whole_float_is_the_providers(family: str) -> None:
    """What is a count stays one: ``"30"`` and ``64.0`` are read as 30 and 64."""
    if family == "openai":
        provider: Any = OpenAIProvider(api_key=KEY, base_url="", timeout=FAST)
        events = openai_events(["one"], prompt_tokens=1, completion_tokens=1)
        block = next(i for i, f in enumerate(events) if '"usage"' in f)
        events[block] = (
            'data: {"id": "c1", "choices": [], '
            '"usage": {"prompt_tokens": "30", "completion_tokens": 64.0}}'
        )
    else:
        provider = AnthropicProvider(api_key=KEY, base_url="", timeout=FAST)
        events = anthropic_events(["one"], input_tokens=30, output_tokens=1)
        delta = next(i for i, f in enumerate(events) if f.startswith("event: message_delta"))
        events[delta] = (
            'event: message_delta\ndata: {"type": "message_delta", "delta": {}, '
            '"usage": {"output_tokens": "64"}}'
        )
    with FakeProviderServer([Reply(events=events)]) as server:
        got, error = pieces(at(provider, server))
    assert error is None, error
    assert usage_of(got) == Usage(30, 64)


def test_an_anthropic_answer_whose_start_holds_no_count_is_whole_and_estimated() -> None:
    """``message_start`` without a readable input count: the answer still streams and ends whole
    (it broke off at once, before any text, and was made again)."""
    events = anthropic_events(["one ", "two"], input_tokens=20, output_tokens=2)
    events[0] = events[0].replace('"input_tokens": 20', '"input_tokens": null')
    provider = AnthropicProvider(api_key=KEY, base_url="", timeout=FAST)
    with FakeProviderServer([Reply(events=events)]) as server:
        got, error = pieces(at(provider, server))
    assert error is None, error
    assert "".join(p for p in got if isinstance(p, str)) == "one two"
    assert usage_of(got).estimated


@pytest.mark.parametrize(
    "value", ["Mon, 01 Jan 99999999999 00:00:00 GMT", "Fri, 31 Dec 123456789012 23:59:59 +0000"]
)
def test_a_429_whose_retry_after_is_a_date_past_any_calendar_is_a_429_not_charged(
    value: str,
) -> None:
    """An HTTP date with a year past what a date can hold raised ``OverflowError`` from reading
    ``Retry-After``, which the adapter took for an event it cannot read: a broken stream, so
    the orchestrator charged the workspace the prompt of a call the provider refused (429), at
    every retry. It is a 429 with no ``Retry-After`` we can use."""
    assert retry_after_seconds(value) is None
    reply = Reply(status=429, headers={"retry-after": value}, body=b'{"error": "slow down"}')
    with FakeProviderServer([reply]) as server:
        got, error = pieces(openai(server))
    assert not any(isinstance(p, Accepted) for p in got)
    assert isinstance(error, TransientProviderError), error
    assert not isinstance(error, StreamBroken), error
    assert error.http_status == 429
    assert error.retry_after is None


@pytest.mark.parametrize("family", ["openai", "anthropic"])
@pytest.mark.parametrize("after", ["connection lost", "keep-alives"])
def test_a_stream_whose_final_usage_came_is_whole_whatever_becomes_of_its_close(
    family: str, after: str
) -> None:
    """The provider bills a call by the usage that ends its answer (OpenAI's final chunk after
    the finish reason; Anthropic's ``message_delta`` with its ``stop_reason``): what may follow
    is only the stream's close (``[DONE]``, ``message_stop``). Lost, or kept waiting behind
    keep-alives, it took nothing from the answer; the call was a broken stream all the same
    (Anthropic's lost close, either provider's stall), charged our estimates instead of the
    provider's counts and made, and billed, again."""
    provider, reply = stream_of(family, ["all ", "of it"])
    frames = reply.events or []
    final = max(i for i, f in enumerate(frames) if '"usage"' in f)
    if after == "connection lost":
        reply.cut_after = final + 1
    else:
        reply.events = frames[: final + 1]
        reply.keep_alive, reply.event_delay = ": keep-alive", 0.01
    with FakeProviderServer([reply]) as server:
        got, error = pieces(at(provider, server), within=WATCHED)
    assert error is None, error
    assert "".join(p for p in got if isinstance(p, str)) == "all of it"
    assert usage_of(got) == Usage(7, 2)


def error_after_text(family: str, error: dict[str, Any]) -> tuple[list[Piece], Exception | None]:
    """What a stream of ``family`` yields and raises that sends some text ("so far") and then
    ``error``: in Anthropic's ``error`` event, or in an OpenAI chunk ``{"error": ...}``."""
    provider, reply = stream_of(family, ["so far"])
    events = reply.events or []
    text = next(i for i, frame in enumerate(events) if "so far" in frame)
    if family == "openai":
        frame = "data: " + json.dumps({"error": error})
    else:
        frame = "event: error\ndata: " + json.dumps({"type": "error", "error": error})
    reply.events = [*events[: text + 1], frame]
    with FakeProviderServer([reply]) as server:
        return pieces(at(provider, server))


@pytest.mark.parametrize(
    ("kind", "status", "permanent"),
    [
        ("invalid_request_error", 400, True),
        ("authentication_error", 401, True),
        ("billing_error", 402, True),
        ("permission_error", 403, True),
        ("not_found_error", 404, True),
        ("request_too_large", 413, True),
        ("rate_limit_error", 429, False),
        ("api_error", 500, False),
        ("timeout_error", 504, False),
        ("overloaded_error", 529, False),
        ("some_future_error", None, False),
    ],
)
def test_an_anthropic_error_event_is_judged_as_its_http_status_would_be(
    kind: str, status: int | None, permanent: bool
) -> None:
    """Anthropic's ``error`` event carries the type its HTTP error would have (its errors
    page pairs each with a status). Every one was transient with no status: a refusal of the
    request or of our key (``invalid_request_error``, ``authentication_error``) was made again
    up to the run's attempts, each charged for the text before it, and never counted against
    the provider's circuit as a refused key is; a ``rate_limit_error`` was no 429."""
    got, error = error_after_text("anthropic", {"type": kind, "message": "no"})
    assert "so far" in got
    assert isinstance(error, PermanentProviderError if permanent else TransientProviderError)
    assert not isinstance(error, StreamBroken)
    assert error.http_status == status
    assert kind in str(error)


@pytest.mark.parametrize(
    ("error", "refused", "status", "wide"),
    [
        ({"type": "invalid_request_error", "code": None}, PermanentProviderError, 400, False),
        ({"type": "invalid_request_error", "code": "context_length_exceeded"},
         PermanentProviderError, 400, False),
        ({"type": "invalid_request_error", "code": "a_future_code"},
         PermanentProviderError, 400, False),
        ({"type": "invalid_request_error", "code": "invalid_api_key"},
         PermanentProviderError, 401, True),
        ({"type": "authentication_error"}, PermanentProviderError, 401, True),
        ({"type": "permission_error"}, PermanentProviderError, 403, True),
        ({"type": "invalid_request_error", "code": "model_not_found"},
         PermanentProviderError, 404, False),
        ({"type": "not_found_error"}, PermanentProviderError, 404, False),
        ({"type": "tokens", "code": "rate_limit_exceeded"}, TransientProviderError, 429, False),
        ({"type": "rate_limit_error"}, TransientProviderError, 429, False),
        ({"type": "insufficient_quota", "code": "insufficient_quota"}, AccountRefused, 429, True),
        ({"type": "server_error", "code": "server_error"}, TransientProviderError, None, False),
        ({"type": "a_future_error", "code": None}, TransientProviderError, None, False),
        ({}, TransientProviderError, None, False),
    ],
)  # fmt: skip
def test_an_openai_error_chunk_is_judged_as_its_http_status_would_be(
    error: dict[str, Any], refused: type[Exception], status: int | None, wide: bool
) -> None:
    """An OpenAI chunk ``{"error": ...}`` carries the ``type`` and ``code`` its HTTP error
    would have. Every one was transient with no status: a refused request or key, or an
    account out of credit, was made again up to the run's attempts, each charged for the text
    before it, and a refused key or account never took the other OpenAI models out of the run;
    a rate limit was no 429."""
    got, raised = error_after_text("openai", {"message": "no", **error})
    assert "so far" in got
    assert type(raised) is refused, raised
    assert isinstance(raised, TransientProviderError | PermanentProviderError)
    assert raised.http_status == status
    assert (isinstance(raised, PermanentProviderError) and raised.provider_wide) == wide
