"""What every provider adapter shares: the request, the streamed pieces, and the errors.

Exceptions raised by adapters::

    AgentWorksError
     ├── Unavailable
     │    └── TransientProviderError   429, 408, 409, 5xx (each with its retry-after), timeouts,
     │         │                       connect errors
     │         └── StreamBroken        the stream ended before the provider said it was done,
     │                                 or stalled: nothing but keep-alives for the idle period
     └── PermanentProviderError        4xx other than 408, 409, 429 (bad key, unknown model, bad
                                       request)
          └── AccountRefused           OpenAI's ``insufficient_quota`` (out of credit): a 429, or
                                       an error chunk
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import zlib
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Protocol

import httpx

from adapters.tokenizer import count_message_tokens, count_tokens_upto
from domain.errors import AgentWorksError, Unavailable


class TransientProviderError(Unavailable):
    """The provider could not answer now; the same call may succeed later (or elsewhere)."""

    def __init__(
        self,
        message: str,
        *,
        provider: str,
        http_status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, retry_after_seconds=retry_after or 1.0)
        self.provider = provider
        self.http_status = http_status
        self.retry_after = retry_after


class StreamBroken(TransientProviderError):
    """The response stream stopped mid-way: what arrived was produced (and will be billed by
    the provider) but no usage block came, so the call is charged from token estimates."""


#: Statuses of a refusal that is the provider's, not the request's: our key (401, 403), our
#: account with it unpaid (402, Anthropic's ``billing_error``), a redirect (its base URL).
PROVIDER_WIDE_STATUSES = frozenset({401, 402, 403, 301, 302, 303, 307, 308})

#: Error codes (or types) of a 429 that is no rate limit but our account out of credit
#: (OpenAI's): no wait ends it, so it is refused as a 402 is.
_ACCOUNT_REFUSED_CODES = frozenset({"insufficient_quota"})


class PermanentProviderError(AgentWorksError):
    code = "PROVIDER_REFUSED"

    def __init__(self, message: str, *, provider: str, http_status: int | None = None) -> None:
        super().__init__(message)
        self.provider = provider
        self.http_status = http_status

    @property
    def provider_wide(self) -> bool:
        """The refusal is the provider's (our key, our account), not the request's: no model
        of it will answer any call."""
        return self.http_status in PROVIDER_WIDE_STATUSES


class AccountRefused(PermanentProviderError):
    """A refusal of our account whatever its status says (OpenAI's 429 ``insufficient_quota``:
    out of credit, which no wait ends)."""

    @property
    def provider_wide(self) -> bool:
        return True


@dataclass(frozen=True)
class ChatRequest:
    model: str
    messages: list[dict[str, str]]
    max_tokens: int = 1024


@dataclass(frozen=True)
class Accepted:
    """The provider took the call (it answered 2xx and its stream began): from here it has the
    prompt and bills it, however the call ends, even cut before any output. ``input_tokens``:
    its own count of the prompt when its wire gives one up front (Anthropic's
    ``message_start``); a later :class:`Accepted` with a count completes an earlier one."""

    input_tokens: int | None = None


@dataclass(frozen=True)
class Usage:
    """Token counts of one call; ``estimated`` when we counted them ourselves."""

    input_tokens: int
    output_tokens: int
    estimated: bool = False


#: What a provider's stream yields.
Piece = str | Accepted | Usage


@dataclass(frozen=True)
class Working:
    """The provider sent work that is not answer text (a model's thinking or reasoning, a tool
    call's arguments): no piece for the caller, but progress, so a model that thinks for
    minutes before it writes is not cut as a stalled stream (see :func:`_progressing`)."""


#: What an adapter reads from its API's events: a piece, or a sign of work.
ReadPiece = Piece | Working


class Provider(Protocol):
    """A provider streams text pieces (``str``) and ends with exactly one :class:`Usage`; before
    its first text it says :class:`Accepted` once the call is the provider's (and billed)."""

    name: str

    def stream(self, request: ChatRequest) -> AsyncIterator[Piece]: ...

    async def aclose(self) -> None: ...


def retry_after_seconds(value: str | None, *, now: datetime | None = None) -> float | None:
    """``Retry-After`` as seconds: delta-seconds or an HTTP date (RFC 9110)."""
    if not value:
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        # "nan" parses, and max() took it for 0: a retry at once, every time.
        return None if math.isnan(seconds) else max(0.0, seconds)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, OverflowError):
        # OverflowError: a year past what a date holds ("... 99999999999 ..."). Raised from
        # here, it was taken for an event we cannot read: a refused call charged as broken.
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def retry_after_of(headers: httpx.Headers) -> float | None:
    """When to ask again, in seconds, as a response says: OpenAI's ``retry-after-ms`` (finer,
    and read first by its own SDK) when it holds a number, else ``Retry-After``."""
    try:
        millis = float(headers.get("retry-after-ms", "").strip())
    except ValueError:
        millis = math.nan
    if math.isnan(millis):
        return retry_after_seconds(headers.get("retry-after"))
    return max(0.0, millis / 1000)


#: How much of an error response's body is read (its message keeps 500 characters of it).
ERROR_BODY_BYTES = 2048

#: The most bytes one step of reading a response inflates a compressed body to: every run of
#: the orchestrator waits on the one event loop while a step is read and split into lines.
INFLATE_STEP_BYTES = 16 * 1024

#: The media type of an event stream. A 2xx body of any other type is no stream, whatever its
#: status: an error (JSON, a proxy's HTML page or plain words, a gateway's XML) answered with
#: 200. One that names no type is read as a stream.
_EVENT_STREAM = re.compile(r"^text/event-stream\b", re.IGNORECASE)


async def body_bytes(response: httpx.Response) -> AsyncIterator[bytes]:
    """The response's body, inflated at most :data:`INFLATE_STEP_BYTES` at a time, with the
    event loop let go between steps. Not ``httpx``'s ``aiter_bytes``: that inflates each network
    chunk whole, so a few kilobytes of gzip became a gigabyte of blank lines split in one step
    (the call asks for no compression, but a server or proxy may send it all the same)."""
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding in ("", "identity"):
        async for chunk in response.aiter_raw():
            yield chunk
            await asyncio.sleep(0)
        return
    if encoding not in ("gzip", "x-gzip", "deflate"):
        raise ValueError(f"a body in the content-encoding {encoding!r}, which we did not ask for")
    inflate = zlib.decompressobj(zlib.MAX_WBITS | 32)  # gzip or zlib, by its header
    async for chunk in response.aiter_raw():
        data = chunk
        while data:
            piece = inflate.decompress(data, INFLATE_STEP_BYTES)
            data = inflate.unconsumed_tail
            if piece:
                yield piece
            await asyncio.sleep(0)


async def raise_for_status(response: httpx.Response, provider: str) -> None:
    """Turn a response that is no answer into our errors, with the provider's own message when
    it sent one: any status but 2xx (a redirect is not followed: it would take the API key to
    wherever it points, and it is the configured URL that is wrong), or a 2xx whose body says
    by its type that it is no event stream (an error a proxy answered with 200). Neither is a
    call the provider took, nor billed."""
    status = response.status_code
    content_type = response.headers.get("content-type", "").strip()
    if 200 <= status < 300 and (not content_type or _EVENT_STREAM.match(content_type)):
        return
    # Its first bytes name the error; read to its end, a body that streams slowly (or without
    # end) would hold the call, and a huge one would be kept whole.
    head = b""
    try:
        async for chunk in body_bytes(response):
            head += chunk
            if len(head) >= ERROR_BODY_BYTES:
                break
    except (ValueError, zlib.error):
        head = head or b"(a body we cannot read)"
    body = head.decode("utf-8", "replace")[:500]
    message = f"{provider} answered HTTP {status}: {body or response.reason_phrase}"
    if status < 300:
        message = (
            f"{provider} answered HTTP {status} with no event stream "
            f"({response.headers.get('content-type')}): {body}"
        )
    elif status < 400:
        message = (
            f"{provider} answered HTTP {status}, a redirect (not followed) to "
            f"{response.headers.get('location', 'nowhere')[:200]}: is its base URL right?"
        )
    raise provider_error(
        message,
        provider=provider,
        http_status=status,
        names=_error_names_in(head),
        # RFC 9110 gives Retry-After to 429 and 503, but providers send it with any transient
        # error (Anthropic's 529 overloaded_error); a permanent one drops it. A 2xx that is no
        # stream is a proxy's, whose Retry-After says nothing of the provider.
        retry_after=(retry_after_of(response.headers) if status >= 400 else None),
    )


def _error_names_in(body: bytes) -> tuple[str, ...]:
    """:func:`error_names` of an error body in OpenAI's shape (``{"error": {...}}``)."""
    try:
        return error_names(json.loads(body).get("error"))
    except (ValueError, AttributeError, RecursionError):
        return ()


def error_names(error: object) -> tuple[str, ...]:
    """What an error object in OpenAI's shape is named: its ``code`` (the finer), then its
    ``type``, those that are strings."""
    if not isinstance(error, dict):
        return ()
    return tuple(n for n in (error.get("code"), error.get("type")) if n and isinstance(n, str))


def provider_error(
    message: str,
    *,
    provider: str,
    http_status: int | None,
    retry_after: float | None = None,
    names: tuple[str, ...] = (),
) -> TransientProviderError | PermanentProviderError:
    """The failure of a call answered ``http_status`` (or whose error event says which status
    it stands for; ``None``: it does not say), as ours: transient for a 2xx that was no stream,
    429, 408, 409 and 5xx, permanent for any other 4xx (or a redirect not followed). A 429
    whose error is first named (:func:`error_names`) ``insufficient_quota`` is no rate limit
    but our account out of credit, refused as such."""
    status = http_status
    if status == 429 and names[:1] and names[0] in _ACCOUNT_REFUSED_CODES:
        return AccountRefused(message, provider=provider, http_status=status)
    if status is None or status < 300 or status == 429 or status >= 500 or status in (408, 409):
        return TransientProviderError(
            message, provider=provider, http_status=status, retry_after=retry_after
        )
    return PermanentProviderError(message, provider=provider, http_status=status)


def translate(error: httpx.HTTPError, provider: str, *, streaming: bool) -> TransientProviderError:
    """An httpx failure as ours: timeouts and lost connections are worth another try. Once the
    stream began, either broke it (the provider had the prompt, and bills it)."""
    if isinstance(error, httpx.TimeoutException):
        timed_out = StreamBroken if streaming else TransientProviderError
        return timed_out(f"{provider} timed out ({type(error).__name__})", provider=provider)
    if streaming:
        return StreamBroken(
            f"{provider} stream broke off: {type(error).__name__}: {error}", provider=provider
        )
    return TransientProviderError(
        f"{provider} unreachable: {type(error).__name__}: {error}", provider=provider
    )


#: What ends a line of an event stream: CRLF, LF or CR, and nothing else. Bytes: no byte of a
#: UTF-8 sequence is a CR or an LF, so lines are split before they are decoded.
_LINE_END = re.compile(b"\r\n|\r|\n")

#: The most characters one event's data may hold, and bytes one of its lines. A provider's
#: chunk is a few hundred; one without a bound (a broken or hostile server's endless line) would
#: be kept whole in memory, the whole orchestrator's, and every run in it would go down with it.
MAX_EVENT_CHARS = 4 * 1024 * 1024


async def sse_lines(chunks: AsyncIterator[bytes]) -> AsyncIterator[str]:
    """The lines of an event stream, as its format defines them: UTF-8 (whatever the headers
    say; invalid bytes become U+FFFD), a leading byte order mark dropped, ended by CRLF, LF or
    CR alone. Not ``httpx``'s ``aiter_lines``: that splits like ``str.splitlines``, also at
    U+2028, U+2029 and NEL, which JSON carries unescaped inside a ``data:`` line, so a model
    writing one of them broke its chunk in two and the call with it. A CR that ends one chunk
    and an LF that starts the next are one line end."""
    async for batch in _line_batches(chunks):
        for line in batch:
            yield line


async def _line_batches(chunks: AsyncIterator[bytes]) -> AsyncIterator[list[str]]:
    """:func:`sse_lines`' lines, a list per chunk: a chunk of keep-alives (blank lines,
    comments) is split in one call, not a step of the generators per line."""
    lines = _LineSplitter()
    async for chunk in chunks:
        batch = lines.feed(chunk)
        if batch:
            yield batch
    if lines.partial:
        yield lines.rest()


class _LineSplitter:
    """Bytes, chunk by chunk, into complete lines, decoded; what follows the last line end
    waits in ``partial`` (the scan never goes over bytes it has already seen, and what waits is
    one buffer, however many pieces it came in)."""

    def __init__(self) -> None:
        self.partial = bytearray()
        self._after_cr = False
        self._first = True

    def feed(self, data: bytes) -> list[str]:
        if not data:
            return []
        if self._after_cr and data.startswith(b"\n"):
            data = data[1:]
        self._after_cr = data.endswith(b"\r")
        parts = _LINE_END.split(data)
        tail = parts.pop()
        if parts and self.partial:
            self.partial += parts[0]
            parts[0] = bytes(self.partial)
            self.partial.clear()
        self.partial += tail
        # Only the first line can be longer than this chunk: it began in an earlier one.
        longest = len(parts[0]) if parts else 0
        if len(data) > MAX_EVENT_CHARS:
            longest = max(map(len, parts), default=0)
        if max(longest, len(self.partial)) > MAX_EVENT_CHARS:
            raise ValueError(f"an event-stream line is longer than {MAX_EVENT_CHARS} bytes")
        return [self._text(part) for part in parts]

    def rest(self) -> list[str]:
        """What follows the last line end, as the stream's last line."""
        line = self._text(bytes(self.partial))
        self.partial.clear()
        return [line]

    def _text(self, line: bytes) -> str:
        first, self._first = self._first, False
        if not line:
            return ""
        text = line.decode("utf-8", "replace")
        return text.removeprefix("\ufeff") if first else text


async def sse_events(response: httpx.Response) -> AsyncIterator[tuple[str, str]]:
    """Server-sent events as ``(event name, data)``; the name is ``message`` when unnamed."""
    event, data, size = "message", list[str](), 0
    async for batch in _line_batches(body_bytes(response)):
        for line in batch:
            if not line:
                if data:
                    yield event, "\n".join(data)
                    data, size = [], 0
                event = "message"
            elif line.startswith(":"):
                continue
            else:
                name, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if name == "event":
                    event = value
                elif name == "data":
                    size += len(value) + 1
                    if size > MAX_EVENT_CHARS:
                        raise ValueError(f"an event is longer than {MAX_EVENT_CHARS} characters")
                    data.append(value)
    if data:
        yield event, "\n".join(data)


#: Seconds a stream may go on without progress (a piece of :meth:`SseProvider._read`: text, the
#: usage, an :class:`Accepted` with the provider's count, :class:`Working`) before the call is
#: cut as stalled.
DEFAULT_IDLE_TIMEOUT = 60.0


async def _progressing(
    pieces: AsyncIterator[ReadPiece], idle: float, provider: str
) -> AsyncIterator[ReadPiece]:
    """``pieces``, cut with :class:`StreamBroken` when none comes for ``idle`` seconds. The read
    timeout cannot see this: any byte restarts it, so a stream of keep-alives (blank lines, SSE
    comments, ``ping`` events, white space) held the call, and the run's slot, until the run's
    own deadline with nothing produced. The clock runs only while a piece is awaited, not while
    the caller handles one."""
    while True:
        timeout = asyncio.timeout(idle)
        try:
            async with timeout:
                piece = await anext(pieces)
        except StopAsyncIteration:
            return
        except TimeoutError as error:
            if not timeout.expired():
                raise
            raise StreamBroken(
                f"{provider} stream stalled: no data for {idle:g}s (keep-alives aside)",
                provider=provider,
            ) from error
        yield piece


#: What reading an event the provider got wrong raises: JSON that is not JSON, or too deeply
#: nested to decode (``RecursionError``), or of another shape than the API's (a list where an
#: object belongs: ``AttributeError``; a number out of range: ``OverflowError``). The call broke;
#: it is not a fault of the orchestrator, which would fail the run and charge nothing of it.
_UNREADABLE = (
    ValueError, KeyError, IndexError, TypeError, AttributeError, ArithmeticError, RecursionError,
    zlib.error,
)  # fmt: skip


class SseProvider(ABC):
    """A provider that answers one ``POST`` with server-sent events: its client, the call, and
    what a failure on the wire or an event we cannot read becomes. A subclass says what to send
    (:meth:`_body`) and reads its API's events (:meth:`_read`).

    The usage comes last, once the response is closed, so a caller that stops at it leaves no
    connection open.
    """

    name: str
    default_base_url: str
    """The provider's own API, for when no ``base_url`` is configured."""
    path: str
    """Where the call goes, below ``base_url``."""
    event_noun: str
    """One event as the provider's API calls it ("a chunk"), for the message of one we cannot
    read."""

    def __init__(
        self,
        *,
        api_key: str,
        base_url: str | None = None,
        timeout: httpx.Timeout | None = None,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
    ) -> None:
        self.base_url = (base_url or self.default_base_url).rstrip("/")
        self.idle_timeout = idle_timeout
        # A key read from a file often ends in a newline, which no header may hold: every call
        # failed (and was tried again) with an error that quoted the key, stored on the run.
        api_key = api_key.strip()
        self._api_key = api_key
        # No compression asked for: an event stream's chunks are small, and whatever a server
        # sends compressed all the same is inflated a bounded step at a time (body_bytes).
        headers = self._headers(api_key) | {"accept-encoding": "identity"}
        self._client = httpx.AsyncClient(
            timeout=timeout or httpx.Timeout(30.0, connect=5.0), headers=headers
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    @abstractmethod
    def _headers(self, api_key: str) -> dict[str, str]:
        """The headers of every call: how ``api_key`` authenticates, and any API version."""

    @abstractmethod
    def _body(self, request: ChatRequest) -> dict[str, object]:
        """The JSON body of the call."""

    @abstractmethod
    def _read(self, events: AsyncIterator[tuple[str, str]]) -> AsyncIterator[ReadPiece]:
        """Text pieces, then the usage; raises :class:`StreamBroken` if the events end before
        the provider said it was done. An :class:`Accepted` with the provider's count of the
        prompt when the events carry one before the text. A usage marked ``estimated`` says
        the answer is whole but the provider counted nothing: the call is charged our counts."""

    async def stream(self, request: ChatRequest) -> AsyncIterator[Piece]:
        try:
            async for piece in self._stream(request):
                yield piece
        except (TransientProviderError, PermanentProviderError) as error:
            # Its message is stored on the run for every member to read, and a server (or a
            # proxy) that echoes the request's headers in its error would put the key there.
            _redact(error, self._api_key)
            raise

    async def _stream(self, request: ChatRequest) -> AsyncIterator[Piece]:
        usage: Usage | None = None
        started = False
        text: list[str] = []
        try:
            async with self._client.stream(
                "POST", f"{self.base_url}{self.path}", json=self._body(request)
            ) as response:
                await raise_for_status(response, self.name)
                started = True
                yield Accepted()
                read = self._read(sse_events(response))
                progress = _progressing(read, self.idle_timeout, self.name)
                async with contextlib.aclosing(progress) as pieces:  # type: ignore[type-var]
                    async for piece in pieces:
                        if isinstance(piece, Working):
                            continue
                        if isinstance(piece, Usage):
                            # The answer's final count, which the provider bills: what may
                            # follow is only the stream's close, not waited for. Lost (the
                            # connection broke) or held back (keep-alives until the idle cut),
                            # it made a whole answer broken: charged estimates, made again.
                            usage = piece
                            break
                        if isinstance(piece, Accepted):
                            # Its count is what a call cut short is charged: bounded as a
                            # usage is.
                            counted = piece.input_tokens
                            plausible_count = counted is None or plausible(
                                Usage(counted, 0), request
                            )
                            yield piece if plausible_count else Accepted()
                        elif isinstance(piece, str):
                            text.append(piece)
                            yield piece
                        else:
                            # Text of another type than the API's (a list of parts, a
                            # number): handed on, it failed the run as an internal error, its
                            # call unrecorded.
                            raise TypeError(f"answer text of type {type(piece).__name__}")
        except httpx.HTTPError as error:
            if usage is None:
                raise translate(error, self.name, streaming=started) from error
            # The final usage had come: the answer is whole, only the stream's closing was lost.
        except _UNREADABLE as error:
            raise StreamBroken(
                f"{self.name} sent {self.event_noun} we cannot read: "
                f"{type(error).__name__}: {error}",
                provider=self.name,
            ) from error
        if usage is None:
            raise StreamBroken(f"{self.name} stream ended without its usage", provider=self.name)
        counted = plausible(usage, request) and not usage.estimated
        yield usage if counted else _estimated(request, "".join(text))


#: How a count may be written on the wire as text (some proxies send numbers as strings).
_DIGITS = re.compile(r"[+-]?[0-9]{1,30}")


def token_count(value: object) -> int | None:
    """A token count as the wire gave it, or ``None`` when it is no count: a whole number (an
    integer, or a float or decimal string of one), else nothing (a fraction, a string of
    anything else, null, true, infinity). Read with ``int()``, a fraction was cut down (12.7
    charged as 12) and ``true`` charged as 1, while null, a string such as ``"12.5"`` or an
    infinite ``1e400`` broke the whole answer off as unreadable: a call made again, and
    charged again. Negative and huge counts are returned as they are: :func:`plausible` judges
    them."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if math.isfinite(value) and value.is_integer() else None
    if isinstance(value, str) and _DIGITS.fullmatch(value.strip()):
        return int(value.strip())
    return None


def usage_field(data: object, *path: str) -> object:
    """``data[path[0]][path[1]]...`` where each step is an object holding the key, else
    ``None`` (a usage block of another shape than the API's is no count, not a broken call)."""
    for key in path:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


#: Tokens a provider may add to a prompt beyond its text: role markers, its own framing and
#: system text (a tool-use preamble is some hundreds), with room to spare.
PROMPT_FRAMING_TOKENS = 8192


def plausible(usage: Usage, request: ChatRequest) -> bool:
    """Whether ``usage`` can be the count of a call of ``request``: no more output than its
    ``max_tokens`` (the provider stops there), no more prompt than the prompt has bytes (no
    tokenizer makes a token of less than a byte) and some framing. A count past them (or
    negative) is a broken or hostile provider's, or a proxy's: billed as it came, it charged
    the workspace any amount, past what the read models can even hold beyond 2^63."""
    prompt_bytes = sum(len(m.get("content", "").encode()) for m in request.messages)
    ceiling = prompt_bytes + 16 * len(request.messages) + PROMPT_FRAMING_TOKENS
    return 0 <= usage.input_tokens <= ceiling and 0 <= usage.output_tokens <= request.max_tokens


def _estimated(request: ChatRequest, text: str) -> Usage:
    """The call's usage by our own count, as a call cut short is charged."""
    output = count_tokens_upto(text, request.max_tokens)
    return Usage(count_message_tokens(request.messages), output, estimated=True)


def _redact(error: AgentWorksError, secret: str) -> None:
    """``error``'s message without ``secret`` (a key too short to be one is left alone)."""
    if len(secret) >= 8 and secret in error.message:
        error.message = error.message.replace(secret, "[api key]")
        error.args = (error.message,)
