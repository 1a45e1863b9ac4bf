"""Running the API under uvicorn in a background thread: for tests and embedded tooling.

>>> with serve_in_thread(create_app(services)) as server:   # doctest: +SKIP
...     httpx.post(f"{server.url}/graphql", json={...})
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import uvicorn
from fastapi import FastAPI

from read_api.serving import uvicorn_options


@dataclass
class RunningServer:
    host: str
    port: int
    server: uvicorn.Server
    thread: threading.Thread

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.port}"

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)


def start_in_thread(
    app: FastAPI, *, host: str = "127.0.0.1", port: int = 0, timeout: float = 10.0
) -> RunningServer:
    """Start uvicorn serving ``app`` on ``host:port`` (0 = a free port) and wait until it listens.

    The socket is bound here, before the thread starts, so the port is known and cannot be taken
    by someone else in between.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound_port = sock.getsockname()[1]
    config = uvicorn.Config(
        app, log_level="warning", lifespan="on", access_log=False, **uvicorn_options(app)
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name=f"uvicorn-{bound_port}", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the API server thread died while starting")
        if time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"the API server did not start within {timeout}s")
        time.sleep(0.01)
    return RunningServer(host=host, port=bound_port, server=server, thread=thread)


@contextlib.contextmanager
def serve_in_thread(
    app: FastAPI, *, host: str = "127.0.0.1", port: int = 0
) -> Iterator[RunningServer]:
    running = start_in_thread(app, host=host, port=port)
    try:
        yield running
    finally:
        running.stop()
