"""The C allocator of a long-running process: how many arenas glibc may give its threads.

glibc gives each thread that allocates its own arena, up to eight per core, and an arena keeps
the high-water mark of what was built in it. The API builds answers in a thread pool, so its RSS
grows by each thread's largest answers although Python holds nothing (BENCHMARKS.md, "Scale":
RSS still rising after six rounds at 50 clients, level within 2 % with two arenas). Capping the
arenas is the documented remedy (``MALLOC_ARENA_MAX``); doing it here, at start, means every
deployment gets it, not only those whose environment sets the variable.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_ARENA_MAX = -8
"""``mallopt``'s parameter for the arena limit (glibc's ``malloc.h``)."""


def cap_malloc_arenas(arenas: int) -> bool:
    """Let the allocator create at most ``arenas`` arenas from now on; 0 keeps its default.

    Call it before the process starts its threads: an arena already given to a thread stays.
    An operator's ``MALLOC_ARENA_MAX`` wins (glibc has applied it at start). Returns whether
    the limit was set here: False for 0, when the variable is set, or without glibc (musl,
    macOS), whose allocators have no such knob.
    """
    if arenas < 0:
        raise ValueError(f"an arena limit is 0 (the allocator's default) or more, not {arenas}")
    if arenas == 0 or "MALLOC_ARENA_MAX" in os.environ:
        return False
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(M_ARENA_MAX, arenas))


def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "gnu_get_libc_version"):
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    return libc
