"""The API's allocator cap: with it, threads share the arenas allowed; without it, each of many
threads gets one of its own (counted with glibc's ``malloc_info`` in a fresh process)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from adapters.allocator import _glibc, cap_malloc_arenas

pytestmark = pytest.mark.skipif(_glibc() is None, reason="the arena cap is glibc's")

THREADS = 12

_CHILD = textwrap.dedent(
    """
    import ctypes, ctypes.util, os, sys, tempfile, threading
    from adapters.allocator import cap_malloc_arenas

    limit = int(sys.argv[1])
    print("capped" if cap_malloc_arenas(limit) else "default")
    threads = int(sys.argv[2])
    all_allocated = threading.Barrier(threads + 1)
    done = threading.Event()
    kept = []

    def allocate():
        kept.append([bytearray(64 * 1024) for _ in range(8)])
        all_allocated.wait()
        done.wait()

    workers = [threading.Thread(target=allocate) for _ in range(threads)]
    for worker in workers:
        worker.start()
    all_allocated.wait()
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.fopen.restype = ctypes.c_void_p
    libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
    libc.fclose.argtypes = [ctypes.c_void_p]
    path = os.path.join(tempfile.mkdtemp(), "malloc.xml")
    stream = libc.fopen(path.encode(), b"w")
    libc.malloc_info(0, stream)
    libc.fclose(stream)
    done.set()
    for worker in workers:
        worker.join()
    print(open(path).read().count("<heap nr="))
    """
)


def _arenas_with(limit: int) -> tuple[str, int]:
    env = {key: value for key, value in os.environ.items() if key != "MALLOC_ARENA_MAX"}
    result = subprocess.run(
        [sys.executable, "-c", _CHILD, str(limit), str(THREADS)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    how, count = result.stdout.split()
    return how, int(count)


def test_capped_threads_share_the_arenas_allowed() -> None:
    assert _arenas_with(2) == ("capped", 2)


def test_without_the_cap_each_thread_gets_an_arena_of_its_own() -> None:
    how, arenas = _arenas_with(0)
    assert how == "default"
    assert arenas > 2


def test_an_operators_malloc_arena_max_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert cap_malloc_arenas(2) is False


def test_a_negative_limit_is_refused() -> None:
    with pytest.raises(ValueError, match="not -1"):
        cap_malloc_arenas(-1)
