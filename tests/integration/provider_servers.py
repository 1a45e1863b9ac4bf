"""Local HTTP servers that speak the providers' wire formats, with scripted misbehaviour.

A :class:`FakeProviderServer` serves raw HTTP/1.1 from a thread of its own (so it serves blocking
and asyncio clients alike). Each request takes the next scripted :class:`Reply` (the last one
repeats): a status with headers and body, or an SSE stream that may be cut off mid-way or start
late. Requests are recorded (path, headers, JSON body) so tests check what went on the wire.
"""

from __future__ import annotations

import asyncio
import json
import threading
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Reply:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    events: list[str] | None = None
    """SSE frames (each already ``event:``/``data:`` lines); sent chunked, one chunk each."""
    cut_after: int | None = None
    """Close the connection after this many events, mid-stream, without ending the body."""
    first_byte_delay: float = 0.0
    event_delay: float = 0.0
    hold: threading.Event | None = None
    """After the first frame, the rest waits until this is set (a test decides when the call
    goes on)."""
    keep_alive: str | None = None
    """After the events, this frame again and again, every ``event_delay``, and never the end of
    the body: a stream kept alive that brings nothing more."""


def openai_events(pieces: list[str], *, prompt_tokens: int, completion_tokens: int,
                  usage: bool = True) -> list[str]:  # fmt: skip
    frames = [
        "data: " + json.dumps({"id": "c1", "object": "chat.completion.chunk", "choices": [
            {"index": 0, "delta": {"role": "assistant", "content": ""}}]})
    ]  # fmt: skip
    for piece in pieces:
        frames.append(
            "data: " + json.dumps({"id": "c1", "object": "chat.completion.chunk",
                                   "choices": [{"index": 0, "delta": {"content": piece}}]})
        )  # fmt: skip
    frames.append(
        "data: " + json.dumps({"id": "c1", "choices": [
            {"index": 0, "delta": {}, "finish_reason": "stop"}]})
    )  # fmt: skip
    if usage:
        frames.append(
            "data: " + json.dumps({"id": "c1", "choices": [], "usage": {
                "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}})
        )  # fmt: skip
    frames.append("data: [DONE]")
    return frames


def anthropic_events(pieces: list[str], *, input_tokens: int, output_tokens: int) -> list[str]:
    def ev(name: str, data: dict[str, Any]) -> str:
        return f"event: {name}\ndata: {json.dumps(data)}"

    frames = [
        ev("message_start", {"type": "message_start", "message": {
            "id": "m1", "role": "assistant", "content": [], "model": "claude",
            "usage": {"input_tokens": input_tokens, "output_tokens": 1}}}),
        ev("content_block_start", {"type": "content_block_start", "index": 0,
                                   "content_block": {"type": "text", "text": ""}}),
        "event: ping\ndata: {\"type\": \"ping\"}",
    ]  # fmt: skip
    for piece in pieces:
        frames.append(
            ev("content_block_delta", {"type": "content_block_delta", "index": 0,
                                       "delta": {"type": "text_delta", "text": piece}})
        )  # fmt: skip
    frames += [
        ev("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ev("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                             "usage": {"output_tokens": output_tokens}}),
        ev("message_stop", {"type": "message_stop"}),
    ]  # fmt: skip
    return frames


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


class FakeProviderServer:
    def __init__(self, replies: list[Reply]) -> None:
        self.replies = list(replies)
        self.requests: list[Recorded] = []
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fake-provider", daemon=True)
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> FakeProviderServer:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def script(self, replies: list[Reply]) -> None:
        self.replies = list(replies)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._serve, "127.0.0.1", 0)
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            self._server.close()
            self._loop.run_until_complete(self._server.wait_closed())
            pending = asyncio.all_tasks(self._loop)
            for task in pending:
                task.cancel()
            if pending:
                self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self._loop.close()

    def _next(self) -> Reply:
        return self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode().split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {
                    k.strip().lower(): v.strip()
                    for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)
                }
                raw = await reader.readexactly(int(headers.get("content-length", "0")))
                body = json.loads(raw) if raw else None
                self.requests.append(Recorded(method, path, headers, body))
                if not await self._reply(self._next(), writer):
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _reply(self, reply: Reply, writer: asyncio.StreamWriter) -> bool:
        """Write one reply; ``False`` when the connection must close (a cut stream)."""
        if reply.first_byte_delay:
            await asyncio.sleep(reply.first_byte_delay)
        if reply.events is None:
            fields = {"content-length": str(len(reply.body)), "content-type": "application/json"}
            fields |= {k.lower(): v for k, v in reply.headers.items()}
            head = [f"HTTP/1.1 {reply.status} X", *(f"{k}: {v}" for k, v in fields.items())]
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + reply.body)
            await writer.drain()
            return True
        head = [f"HTTP/1.1 {reply.status} OK", "content-type: text/event-stream",
                "transfer-encoding: chunked"]  # fmt: skip
        head += [f"{k}: {v}" for k, v in reply.headers.items()]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode())
        await writer.drain()
        for index, frame in enumerate(reply.events):
            if reply.cut_after is not None and index >= reply.cut_after:
                writer.transport.abort()
                return False
            data = (frame + "\n\n").encode()
            writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            await writer.drain()
            if reply.event_delay:
                await asyncio.sleep(reply.event_delay)
            if index == 0 and reply.hold is not None:
                while not reply.hold.is_set():
                    await asyncio.sleep(0.02)
        while reply.keep_alive is not None:  # until the client goes (drain raises then)
            data = (reply.keep_alive + "\n\n").encode()
            writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            await writer.drain()
            await asyncio.sleep(reply.event_delay)
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True
