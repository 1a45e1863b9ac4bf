"""A network path that can be cut without a sound, as a failed switch or a vanished host cuts it.

A server stopped or refused answers at once (a reset, a refused connection); a network partition
answers nothing: packets are dropped, a connection attempt waits, a query already sent waits for
an answer that never comes. Only then do a client's own timeouts matter.

:class:`Partition` puts the far end in a network namespace of its own, reached from this one
through a veth pair on a /30 of its own (``server_address``); :meth:`Partition.cut` takes the far
link down, so every packet between the two is dropped silently, and :meth:`Partition.heal`
brings it back (TCP then retransmits what waited). Processes run over there with
:meth:`Partition.command`. Needs root (``ip netns``); :func:`partition` skips the test without it.
The machine's own loopback, and every other test's traffic, is left alone.

No pytest in here but the skip.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterator


class Partition:
    def __init__(self) -> None:
        tag = secrets.token_hex(3)
        self.namespace = f"aw-part-{tag}"
        self._host_link = f"awh{tag}"
        self._far_link = f"awf{tag}"
        # A /30 of 10.64.0.0/10 of its own, so that partitions of tests running at once differ.
        net = int(tag, 16) % (1 << 20)
        base = (10 << 24) | (64 << 16) | (net << 2)
        self.host_address = _dotted(base + 1)
        self.server_address = _dotted(base + 2)

    def open(self) -> None:
        ns = self.namespace
        _ip("netns", "add", ns)
        try:
            _ip("link", "add", self._host_link, "type", "veth", "peer", "name", self._far_link)
            _ip("link", "set", self._far_link, "netns", ns)
            _ip("addr", "add", f"{self.host_address}/30", "dev", self._host_link)
            _ip("link", "set", self._host_link, "up")
            _ip("-n", ns, "addr", "add", f"{self.server_address}/30", "dev", self._far_link)
            _ip("-n", ns, "link", "set", self._far_link, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise

    def command(self, args: list[str]) -> list[str]:
        """The command line that runs ``args`` in the far namespace."""
        return ["ip", "netns", "exec", self.namespace, *args]

    def cut(self) -> None:
        """Drop every packet between here and there from now on (nothing is refused or reset)."""
        _ip("-n", self.namespace, "link", "set", self._far_link, "down")

    def heal(self) -> None:
        _ip("-n", self.namespace, "link", "set", self._far_link, "up")

    def close(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            _ip("link", "del", self._host_link)
        with contextlib.suppress(subprocess.CalledProcessError):
            _ip("netns", "del", self.namespace)


def available() -> bool:
    """Whether this process may make network namespaces (root, with ``ip``)."""
    if os.geteuid() != 0:
        return False
    try:
        subprocess.run(["ip", "netns", "list"], check=True, capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return True


@contextlib.contextmanager
def partition() -> Iterator[Partition]:
    import pytest

    if not available():
        pytest.skip("network partitions need root and `ip netns`")
    cut = Partition()
    cut.open()
    try:
        yield cut
    finally:
        cut.close()


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


def _dotted(address: int) -> str:
    return ".".join(str((address >> shift) & 0xFF) for shift in (24, 16, 8, 0))
